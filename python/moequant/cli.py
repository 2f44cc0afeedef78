"""The `moequant` command line: one subcommand per module, mlx-lm style flags.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
Exit codes: 0 success, 1 a failure while running, 2 bad usage or bad input.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys

# name -> (module, one-line help). A module is imported only when its command runs.
COMMANDS = {
    "convert": (
        "moequant.convert",
        "Convert an INT4 compressed-tensors (or bf16) Kimi/DeepSeek-V3 "
        "checkpoint to a mixed-bit MLX model that stock mlx-lm loads.",
    ),
    "plan": (
        "moequant.plan",
        "Show what a recipe does to a model: per-component bits, params, "
        "size and bits/weight, without reading tensor data.",
    ),
    "demo": ("moequant.demo", "Run the built-in end-to-end demo on generated data."),
    "eval": (
        "moequant.evaluate",
        "KL divergence, top-1 flips and perplexity of a build against its reference.",
    ),
    "inspect": (
        "moequant.inspect_model",
        "What a converted model is made of, and its expert error against the INT4 source.",
    ),
    "generate": (
        "moequant.generate_cli",
        "Generate text with mlx-lm and the fused MoE decode path (mlx-lm's flags).",
    ),
    "serve": (
        "moequant.serve_cli",
        "mlx-lm's OpenAI-compatible server with the fused MoE decode path.",
    ),
}


from .errors import UserError  # noqa: E402,F401  (commands raise it; main maps it to exit 2)


def _did_you_mean(word: str, choices) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


class _Parser(argparse.ArgumentParser):
    """argparse with a close-match suggestion for a mistyped command."""

    def error(self, message):
        if message.startswith("argument COMMAND: invalid choice:"):
            bad = message.split("'")[1] if "'" in message else ""
            message += _did_you_mean(bad, COMMANDS)
        super().error(message)


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def v(dist):
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    return f"moequant {v('moequant')} (mlx {v('mlx')}, mlx-lm {v('mlx-lm')})"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="moequant",
        description="Native INT4 -> MLX requantization and fused MoE kernels for MLX.",
    )
    parser.add_argument("--version", action="version", version=_versions())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def _unrecognized(parser, args, extras) -> None:
    """Unknown arguments of a subcommand: its own usage and the closest flag (argparse
    would print the top-level usage). Exits with code 2."""
    sub = parser._subparsers._group_actions[0].choices.get(args.command) if args.command else None
    target = sub or parser
    flags = [o for o in target._option_string_actions if o.startswith("--")]
    hints = [_did_you_mean(e.split("=", 1)[0], flags) for e in extras if e.startswith("-")]
    target.error(f"unrecognized arguments: {' '.join(extras)}" + "".join(h for h in hints if h))


def main(argv=None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        _unrecognized(parser, args, extras)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except UserError as e:
        if not e.printed:
            print(f"moequant {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moequant {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
