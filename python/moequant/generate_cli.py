"""`moequant generate`: mlx-lm's generate (same flags and output: prompt and generation
tok/s, peak memory) with the fused MoE decode path; --no-fused for comparison.

Under ``mlx.launch`` (more than one rank) the model is sharded across the ranks with
mlx-lm's ``sharded_load``: tensor-parallel by default, layer-pipelined with
``--pipeline`` (as mlx-lm's server does); every rank runs the same generation and only
rank 0 prints."""

from __future__ import annotations

import importlib
import random

# importlib: mlx_lm re-exports a function named `generate` over the module's name.


def add_arguments(p) -> None:
    module = importlib.import_module("mlx_lm.generate")

    from .mlx_lm_cli import add_mlx_lm_arguments

    add_mlx_lm_arguments(p, module.main)
    p.add_argument(
        "--pipeline",
        action="store_true",
        help="Under mlx.launch: split the layers across the ranks (pipeline) instead of "
        "sharding every layer (tensor parallelism, the default), as mlx_lm.server's flag.",
    )


def run(args) -> int:
    module = importlib.import_module("mlx_lm.generate")

    from . import distributed
    from .mlx_lm_cli import check_model_dir, run_mlx_lm_main, sharded_as_load

    group = distributed.world()
    if group.size() == 1:
        from .vision import is_vision_build, run_generate_image

        check_model_dir(args.model)
        # mlx-lm's --image needs a model mlx-lm runs images through; its kimi_k25 drops
        # the tower, so a `convert --keep-vision` build generates through mlx-vlm instead.
        if getattr(args, "image", None) and is_vision_build(args.model):
            return run_generate_image(args)
        return run_mlx_lm_main(module, args)

    facts, error = {}, None
    try:
        check_model_dir(args.model)
        if args.adapter_path or args.draft_model:
            from .errors import UserError

            raise UserError(
                "--adapter-path and --draft-model are not supported under "
                "mlx.launch (mlx-lm's sharded loading has neither)"
            )
        facts = {
            "model (config.json and weight index)": distributed.model_identity(args.model),
            "arguments": {
                k: v
                for k, v in sorted(vars(args).items())
                if k not in ("model", "func", "_module") and not callable(v)
            },
        }
    except Exception as e:  # any local failure must reach every rank, not hang them
        error = e
    distributed.agree(group, facts, error, "moequant generate")
    if args.seed is None:
        # Every rank samples from the same logits: they must draw the same numbers.
        args.seed = distributed.lead(group, lambda: random.randrange(2**31))
    saved = module.load
    module.load = sharded_as_load(group, pipeline=args.pipeline)
    try:
        with distributed.quiet_unless_leader(group):
            rc = run_mlx_lm_main(module, args)
        # mlx-lm's generate_step leaves one step in flight when it stops; a rank that
        # exited now would cut the others' pending send/recv ("connection to a peer was
        # lost"). Every rank finishes it before any leaves.
        distributed.barrier(group)
        return rc
    finally:
        module.load = saved
