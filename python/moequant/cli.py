"""The `moequant` command line: one subcommand per module, mlx-lm style flags.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
Exit codes: 0 success, 1 a failure while running, 2 bad usage or bad input.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). A module is imported only when its command runs.
COMMANDS = {
    "convert": ("moequant.convert", "Convert an INT4 compressed-tensors (or bf16) Kimi/DeepSeek-V3 "
                "checkpoint to a mixed-bit MLX model that stock mlx-lm loads."),
    "plan": ("moequant.plan", "Show what a recipe does to a model: per-component bits, params, "
             "size and bits/weight, without reading tensor data."),
    "demo": ("moequant.demo", "Run the built-in end-to-end demo on generated data."),
    "eval": ("moequant.evaluate", "KL divergence, top-1 flips and perplexity of a build against its reference."),
    "inspect": ("moequant.inspect_model", "What a converted model is made of, and its expert error against the INT4 source."),
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moequant",
        description="Native INT4 -> MLX requantization and fused MoE kernels for MLX.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except UserError as e:
        print(f"moequant {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moequant {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
