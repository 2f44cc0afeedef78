"""Run an mlx-lm command-line entry point with moequant's fused MoE path.

The mlx-lm ``main()`` functions build their own argparse parser and load the model
through module-level ``load``/``sharded_load``. We reuse their parsers' arguments
verbatim (so every mlx-lm flag works and is documented in ``--help``), add ours, and
run ``main()`` with the namespace we parsed and with loaders that patch the model.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from typing import Callable

from . import mlx_lm_patch


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


@contextmanager
def _parse_args_returns(fn: Callable):
    orig = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = fn
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = orig


def mlx_lm_parser(main: Callable) -> argparse.ArgumentParser:
    """The parser an mlx-lm ``main()`` builds, captured at its parse_args call."""

    def grab(self, *a, **k):
        raise _Captured(self)

    with _parse_args_returns(grab):
        try:
            main()
        except _Captured as c:
            return c.parser
    raise RuntimeError("mlx-lm's main() did not parse arguments")


def add_mlx_lm_arguments(p: argparse.ArgumentParser, main: Callable) -> None:
    src = mlx_lm_parser(main)
    for a in list(src._actions):
        if isinstance(a, argparse._HelpAction):
            src._remove_action(a)
            for s in a.option_strings:
                src._option_string_actions.pop(s, None)
            for g in src._action_groups:
                if a in g._group_actions:
                    g._group_actions.remove(a)
    p._add_container_actions(src)
    g = p.add_argument_group("moequant")
    g.add_argument(
        "--no-fused",
        action="store_true",
        help="Use mlx-lm's MoE path (for comparison). MOEQUANT_FUSED=0 does the same.",
    )
    g.add_argument(
        "--fused-max-tokens",
        type=int,
        default=mlx_lm_patch.DEFAULT_MAX_TOKENS,
        help="Largest number of tokens per MoE call that takes the fused decode GEMV; "
        "larger calls (prefill) run the batched moe_prefill on the CPU and mlx-lm's path "
        "on a GPU. Default: %(default)s.",
    )
    g.add_argument(
        "--huge-pages",
        action="store_true",
        help="After loading, move the model's large arrays into transparent huge pages "
        "(Linux; decode streams the expert weights every token). Starting the process "
        "with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 gets them at load time instead.",
    )


def _patching(load_fn, args):
    def load(*a, **k):
        out = load_fn(*a, **k)
        model = out[0]
        if args.no_fused or not mlx_lm_patch.env_enabled():
            print("[moequant] fused MoE path: off", file=sys.stderr, flush=True)
        else:
            n = mlx_lm_patch.patch(model, max_tokens=args.fused_max_tokens)
            print(f"[moequant] fused MoE path: {n} MoE blocks", file=sys.stderr, flush=True)
        if args.huge_pages:
            from .ops import huge_pages

            moved = huge_pages(model)
            print(f"[moequant] huge pages: {moved / 2**20:.0f} MiB moved", file=sys.stderr, flush=True)
        return out

    return load


def run_mlx_lm_main(module, args, loaders=("load",)) -> int:
    """Run ``module.main()`` with ``args`` and patched loaders."""
    saved = {name: getattr(module, name) for name in loaders}
    for name, fn in saved.items():
        setattr(module, name, _patching(fn, args))
    try:
        with _parse_args_returns(lambda self, *a, **k: args):
            module.main()
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)
    return 0
