"""Conversion speed and peak memory: `moequant convert` vs mlx-lm's own route on the same
fixture with real Kimi expert dimensions (hidden 7168, moe_intermediate 2048).

mlx-lm's route, the way to convert such a checkpoint with mlx-lm alone (it cannot
load compressed-tensors INT4 into a quantized model directly): lazy ``load_model`` -> ``dequantize_model`` -> drop the quantization configs ->
``quantize_model`` with the same per-module bits as our recipe -> ``save_model``.
Each route runs in a fresh process; peak memory is the process's VmHWM (Linux) or
ru_maxrss. Input GB/s = source safetensors bytes / wall time.

    python bench/bench_convert.py [--experts 16] [--layers 4] [--recipe alis-3.6]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OURS = r"""
import json, sys, time
from moequant.convert import convert
t0 = time.perf_counter()
r = convert(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
wall = time.perf_counter() - t0
print(json.dumps({"wall": wall, "out_bytes": r.total_bytes, "peak": PEAK()}))
"""

MLX_LM = r"""
import json, sys, time
from pathlib import Path
import mlx.core as mx
from mlx_lm.utils import dequantize_model, load_model, quantize_model, save_config, save_model
src, dst, recipe = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
# The per-module bits our recipe picks, so both routes write the same format.
from moequant.plan import make_plan
plan = make_plan(src, recipe)
prefix = "language_model." if plan.cfg.prefix else ""
decisions = {prefix + p: d for p, d in plan.resolution.decisions.items()}
del plan, make_plan
t0 = time.perf_counter()
model, config = load_model(src, lazy=True)
model = dequantize_model(model)
config.pop("quantization", None)
config.pop("quantization_config", None)
config.get("text_config", {}).pop("quantization_config", None)
def predicate(path, module):
    d = decisions.get(path)
    return False if d is None else {"group_size": d.group_size, "bits": d.bits, "mode": "affine"}
model, config = quantize_model(model, config, 64, 4, quant_predicate=predicate)
save_model(dst, model, donate_model=True)
save_config(config, dst / "config.json")
wall = time.perf_counter() - t0
out_bytes = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
print(json.dumps({"wall": wall, "out_bytes": out_bytes, "peak": PEAK()}))
"""

PEAK = r"""
def PEAK():
    try:
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
    except OSError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
"""


def run_route(code, src, dst, recipe):
    r = subprocess.run([sys.executable, "-c", PEAK + code, str(src), str(dst), recipe],
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"route failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=16,
                    help="routed experts per MoE layer of the generated fixture (default: %(default)s)")
    ap.add_argument("--layers", type=int, default=4,
                    help="decoder layers, layer 0 dense (default: %(default)s)")
    ap.add_argument("--recipe", default="alis-3.6",
                    help="recipe for both routes (default: %(default)s)")
    ap.add_argument("--workdir", default=None,
                    help="where the fixture and both outputs go; an existing fixture there is "
                    "reused (default: a new temporary directory)")
    return ap


def main():
    args = build_parser().parse_args()

    from moequant import get_num_threads
    from moequant.testing import make_checkpoint

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-convert-"))
    src = work / "src"
    if not (src / "config.json").exists():
        t0 = time.perf_counter()
        make_checkpoint(src, "kimi_k25", layers=args.layers, shards=4, random_codes=True,
                        text_overrides={
                            "hidden_size": 7168, "moe_intermediate_size": 2048,
                            "n_routed_experts": args.experts, "num_experts_per_tok": 2,
                            "intermediate_size": 2048, "num_attention_heads": 4,
                            "num_key_value_heads": 4, "q_lora_rank": 512, "kv_lora_rank": 512,
                            "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
                            "vocab_size": 1024})
        print(f"fixture generated in {time.perf_counter() - t0:.1f} s")
    in_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    print(f"fixture: kimi_k25, {args.layers} layers, {args.experts} experts of 7168x2048, "
          f"{in_bytes / 1e9:.2f} GB of safetensors; recipe {args.recipe}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores (shared with other jobs), "
          f"moequant threads {get_num_threads()}")

    results = {}
    for name, code in (("moequant convert", OURS), ("mlx-lm route", MLX_LM)):
        dst = work / name.split()[0]
        shutil.rmtree(dst, ignore_errors=True)
        results[name] = run_route(code, src, dst, args.recipe)
        shutil.rmtree(dst, ignore_errors=True)

    print(f"\n{'route':<18} {'wall s':>8} {'input GB/s':>11} {'peak GB':>8} {'output GB':>10}")
    for name, r in results.items():
        print(f"{name:<18} {r['wall']:>8.2f} {in_bytes / r['wall'] / 1e9:>11.3f} "
              f"{r['peak'] / 1e9:>8.2f} {r['out_bytes'] / 1e9:>10.3f}")
    ours, theirs = results["moequant convert"], results["mlx-lm route"]
    speedup, mem = theirs["wall"] / ours["wall"], ours["peak"] / theirs["peak"]
    ok = speedup >= 5 and mem <= 1 / 3
    print(f"\nspeedup {speedup:.1f}x, peak memory {mem:.2f}x of mlx-lm's "
          f"(target >= 5x and <= 0.33x: {'met' if ok else 'NOT met'})")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
