"""`moequant generate`: mlx-lm's generate (same flags and output: prompt and generation
tok/s, peak memory) with the fused MoE decode path; --no-fused for comparison."""

from __future__ import annotations

import importlib

# importlib: mlx_lm re-exports a function named `generate` over the module's name.


def add_arguments(p) -> None:
    module = importlib.import_module("mlx_lm.generate")

    from .mlx_lm_cli import add_mlx_lm_arguments

    add_mlx_lm_arguments(p, module.main)


def run(args) -> int:
    module = importlib.import_module("mlx_lm.generate")

    from .mlx_lm_cli import check_model_dir, run_mlx_lm_main
    from .vision import is_vision_build, run_generate_image

    check_model_dir(args.model)
    # mlx-lm's --image needs a model mlx-lm runs images through; its kimi_k25 drops the
    # tower, so a `convert --keep-vision` build generates through mlx-vlm instead.
    if getattr(args, "image", None) and is_vision_build(args.model):
        return run_generate_image(args)
    return run_mlx_lm_main(module, args)
