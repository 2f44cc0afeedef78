"""`moequant demo`: the main job end to end on a generated model. Make a tiny Kimi-K2.5
style checkpoint (INT4 compressed-tensors experts, bf16 rest, tokenizer, shards),
convert it with a recipe, check the routed experts against mx.quantize of their exact
dequantization, load the result with stock mlx-lm and generate a few tokens, with
mlx-lm's MoE path and with moequant's fused one."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import int4


def add_arguments(p):
    p.add_argument(
        "--workdir",
        default=None,
        help="Keep the generated INT4 checkpoint (WORKDIR/kimi-int4) and the converted "
        "MLX model (WORKDIR/kimi-mlx) here, to try the other commands on them "
        "(default: a temporary directory, removed at the end).",
    )
    p.add_argument("--recipe", default="alis-3.6", help="Recipe for the conversion (default alis-3.6).")
    p.add_argument("--layers", type=int, default=6, help="Decoder layers of the toy model (default 6).")
    p.add_argument("--max-tokens", type=int, default=12, help="Tokens to generate (default 12).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the generated weights (default 0).")


def check_experts(src: Path, dst: Path, prefix: str) -> tuple:
    """(tensors checked, mismatching words/scales/biases) for every routed expert projection:
    the output against mx.quantize (CPU) of the exact float32 dequantization."""
    from .checkpoint import Source

    source = Source.open(src)
    out, inp = {}, {}
    for f in sorted(dst.glob("model*.safetensors")):
        out.update(mx.load(str(f)))
    for f in sorted(src.glob("model*.safetensors")):
        inp.update(mx.load(str(f)))
    gs = source.cfg.scheme.group_size
    checked = mismatched = 0
    for unit in source.units:
        for job in unit.jobs:
            if job.kind != "experts":
                continue
            path = prefix + job.items[0].path
            packed = mx.stack([inp[n] for n in job.sources[0::3]])
            scales = mx.stack([inp[n] for n in job.sources[1::3]])
            w = int4.dequantize(np.array(packed), np.array(scales.astype(mx.float32)), gs)
            k = w.shape[-1]
            bits = out[path + ".weight"].shape[-1] * 32 // k
            group = k // out[path + ".scales"].shape[-1]
            ref = mx.quantize(mx.array(w), group_size=group, bits=bits, stream=mx.cpu)
            for suffix, r in zip((".weight", ".scales", ".biases"), ref):
                mismatched += int(mx.sum(out[path + suffix] != r.astype(out[path + suffix].dtype)).item())
            checked += 1
    return checked, mismatched


def _generate(mlx_lm, model, tok, max_tokens, sampler):
    """Greedy text and the decode speed mlx-lm reports."""
    text, tps = "", 0.0
    for r in mlx_lm.stream_generate(
        model, tok, "The quick brown fox", max_tokens=max_tokens, sampler=sampler
    ):
        text += r.text
        tps = r.generation_tps
    return text, tps


def run(args) -> int:
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    from .convert import convert
    from .errors import UserError
    from .mlx_lm_patch import patch
    from .testing import make_checkpoint

    if args.layers < 2:
        raise UserError("--layers must be at least 2 (layer 0 is the dense layer)")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moequant-demo-") as tmp:
        work = Path(args.workdir or tmp)
        src, dst = work / "kimi-int4", work / "kimi-mlx"
        print(f"1. generating a tiny Kimi-K2.5-style INT4 checkpoint ({args.layers} layers) in {src}")
        make_checkpoint(
            src,
            "kimi_k25",
            layers=args.layers,
            shards=4,
            seed=args.seed,
            text_overrides={
                "hidden_size": 512,
                "moe_intermediate_size": 256,
                "n_routed_experts": 16,
                "intermediate_size": 1024,
            },
        )
        print(f"2. converting with recipe {args.recipe} -> {dst}")
        result = convert(src, dst, args.recipe, overwrite=True)
        print("3. checking routed experts against mx.quantize of the exact INT4 dequantization")
        if args.recipe != "int4-native":
            n, bad = check_experts(src, dst, "language_model.")
            print(f"   {n} stacked expert tensors, {bad} mismatching words/scales/biases")
            if bad:
                return 1
        print("4. loading with stock mlx_lm.load and generating (greedy)")
        model, tok = mlx_lm.load(str(dst))
        text, tps = _generate(mlx_lm, model, tok, args.max_tokens, make_sampler(temp=0.0))
        print(
            f"   {text!r} ({args.max_tokens} tokens at {tps:.1f} tok/s; random weights, so the text is noise)"
        )
        print("5. the same with moequant's fused MoE decode path (moequant.patch)")
        n_blocks = patch(model)
        fused_text, fused_tps = _generate(mlx_lm, model, tok, args.max_tokens, make_sampler(temp=0.0))
        same = (
            "the same tokens"
            if fused_text == text
            else ("different tokens (bf16 activations: the fused path accumulates in float32)")
        )
        print(f"   {n_blocks} MoE blocks patched: {fused_tps:.1f} tok/s vs {tps:.1f}, {same}")
        print("\n" + result.summary())
        print(f"\ndemo finished in {time.perf_counter() - t0:.1f} s")
        if args.workdir:
            print(f"\nkept in {work}; try the other commands on them:\n" + next_steps(src, dst))
        else:
            print("\n(the generated files were removed; `moequant demo --workdir DIR` keeps them)")
    return 0


def next_steps(src: Path, dst: Path) -> str:
    """Commands to try on the demo's kept checkpoint and build."""
    return "\n".join(
        f"  moequant {c}"
        for c in (
            f"plan --hf-path {src}",
            f"convert --hf-path {src} --mlx-path {dst.parent / 'kimi-mlx-uniform-4'} --recipe uniform-4",
            f"inspect {dst} --source {src}",
            f'generate --model {dst} --prompt "The quick brown fox" --max-tokens 8',
            f"serve --model {dst} --port 8080",
        )
    )
