"""`moequant serve`: mlx-lm's OpenAI-compatible HTTP server (same flags) with the fused
MoE decode path, also under distributed (sharded/pipelined) loading; --no-fused for
comparison."""

from __future__ import annotations

import importlib


def add_arguments(p) -> None:
    module = importlib.import_module("mlx_lm.server")

    from .mlx_lm_cli import add_mlx_lm_arguments

    add_mlx_lm_arguments(p, module.main)


def run(args) -> int:
    module = importlib.import_module("mlx_lm.server")

    from .mlx_lm_cli import run_mlx_lm_main

    return run_mlx_lm_main(module, args, loaders=("load", "sharded_load"))
