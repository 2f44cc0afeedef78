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


def check_model_dir(path, arg: str = "--model") -> dict:
    """The config.json of the local MLX model directory ``path`` given as ``arg``, or a
    UserError (exit 2, one line naming ``arg``) when it is not one. mlx-lm would take a
    missing path for a Hugging Face repo id and try to download it; moequant never
    downloads. One definition for generate, serve and eval."""
    import json
    from pathlib import Path

    from .errors import UserError

    if path is None:
        raise UserError(f"{arg} DIR is required (moequant never downloads a default model)")
    d = Path(path)
    if not d.exists():
        raise UserError(
            f"{arg} {path}: no such directory (a local model directory is "
            "required; moequant does not download from the Hugging Face Hub)"
        )
    if not d.is_dir():
        raise UserError(f"{arg} {path}: not a directory")
    cfg = d / "config.json"
    if not cfg.is_file():
        raise UserError(f"{arg} {path}: not a model directory (no config.json)")
    try:
        config = json.loads(cfg.read_bytes())
    except (OSError, ValueError) as e:
        raise UserError(f"{arg} {cfg}: not a readable JSON file ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise UserError(f"{arg} {cfg}: not a model config (a JSON object with a model_type)")
    if not any(p.is_file() for p in d.glob("*.safetensors")):
        raise UserError(f"{arg} {path}: not a model directory (no *.safetensors weights)")
    return config


def _patching(load_fn, args, load_error=None):
    load_error = load_error or _load_error

    def load(*a, **k):
        try:
            out = load_fn(*a, **k)
        except Exception as e:
            raise load_error(e, a[0] if a else k.get("path_or_hf_repo")) from e
        model = out[0]
        if args.no_fused or not mlx_lm_patch.env_enabled():
            print("[moequant] fused MoE path: off", file=sys.stderr, flush=True)
            # --kv-bits still needs the MLA latent cache and its attention.
            from .kv_cache import patch_kv_cache

            patch_kv_cache(model)
        else:
            n = mlx_lm_patch.patch(model, max_tokens=args.fused_max_tokens)
            print(f"[moequant] fused MoE path: {n} MoE blocks", file=sys.stderr, flush=True)
        if args.huge_pages:
            from .ops import huge_pages

            moved = huge_pages(model)
            print(f"[moequant] huge pages: {moved / 2**20:.0f} MiB moved", file=sys.stderr, flush=True)
        return out

    return load


def _read_config(model) -> dict:
    import json
    from pathlib import Path

    try:
        return json.loads((Path(model) / "config.json").read_text())
    except (TypeError, OSError, ValueError):
        return {}


def _load_error(e, path):
    from .errors import UserError

    return UserError(f"--model {path}: cannot load the model: {type(e).__name__}: {e}")


def run_mlx_lm_main(module, args, loaders=("load",), load_error=_load_error) -> int:
    """Run ``module.main()`` with ``args`` and patched loaders; a loader's exception is
    raised as ``load_error(exception, path)`` (default: a UserError, exit code 2)."""
    # Registers the MLA cache classes for mlx-lm's load_prompt_cache (--prompt-cache-file
    # is read before the model) and checks --kv-bits against the model.
    from . import kv_cache

    kv_cache.check_kv_args(args, _read_config(getattr(args, "model", None)))
    saved = {name: getattr(module, name) for name in loaders}
    for name, fn in saved.items():
        setattr(module, name, _patching(fn, args, load_error))
    try:
        with _parse_args_returns(lambda self, *a, **k: args):
            module.main()
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)
    return 0


def sharded_as_load(group, pipeline: bool):
    """mlx-lm's ``load`` signature over ``sharded_load`` on ``group``: layer-pipelined
    when ``pipeline``, tensor-parallel otherwise."""
    from mlx_lm.utils import sharded_load

    def load(
        path_or_hf_repo,
        tokenizer_config=None,
        model_config=None,
        adapter_path=None,
        lazy=False,
        return_config=False,
        revision=None,
        trust_remote_code=False,
    ):
        return sharded_load(
            path_or_hf_repo,
            pipeline_group=group if pipeline else None,
            tensor_group=None if pipeline else group,
            return_config=return_config,
            tokenizer_config=tokenizer_config,
            trust_remote_code=trust_remote_code,
        )

    return load
