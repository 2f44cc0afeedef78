"""Benchmark of the fused MoE expert GEMV against mlx-lm's decode path.

One Kimi-K2-shaped decode layer (D 7168, I 2048, k 8 of E experts, a fresh random
expert choice every step) per bit recipe, ours (moequant.moe_swiglu) versus mlx-lm's
SwitchGLU chain (three gather_qmm, SwiGLU) plus the float32 weighted sum, on the same
weights in the same run, with float32 and bfloat16 activations. The read bandwidth of
this machine is measured in the same run (threaded numpy sums over 1 GiB). Optionally
end to end on a scaled DeepSeek-V3-shaped model (D 2048, 32 experts top-8, 4 layers,
4-bit), with and without moequant.patch in the same run: decode tok/s against the
roofline of its own weight bytes per token (at the probe's bandwidth), and prefill
tok/s of 256 and 2048 tokens.

    python bench/bench_moe.py [--experts 64] [--steps 12] [--e2e | --e2e-only] [--quick] [--device gpu]
                              [--no-huge-pages] [--prefill-lengths 256,2048] [--prefill-dtypes float32]
    python bench/bench_moe.py --stream 128 [--steps 40]   # the e2e experts streaming from memory

The read-bandwidth probe reads numpy memory, which Linux backs with transparent huge
pages; by default the expert weights are moved into huge pages too
(moequant.huge_pages), so both read the same kind of memory.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import statistics
import sys
import time

import mlx.core as mx
import numpy as np

import moequant
from bandwidth import read_bandwidth

D, I, K = 7168, 2048, 8
RECIPES = [  # (gate, up, down) bits, group size
    ((3, 3, 3), 64),
    ((3, 3, 4), 64),
    ((4, 4, 4), 64),
    ((4, 4, 4), 32),
]


def random_proj(E, out_dims, in_dims, bits, gs, sdtype=mx.bfloat16):
    """Random codes and affine parameters (no float weights: 64 Kimi experts in float32
    would take 11 GB)."""
    rng = np.random.default_rng(out_dims * 7 + bits)
    w = mx.array(rng.integers(0, 2**32, (E, out_dims, in_dims * bits // 32), dtype=np.uint32))
    s = (mx.random.normal((E, out_dims, in_dims // gs)) * 2e-3).astype(sdtype)
    b = (mx.random.normal((E, out_dims, in_dims // gs)) * 1e-2).astype(sdtype)
    mx.eval(w, s, b)
    return (w, s, b, bits, gs)


def switch_linear(p):
    """mlx-lm's QuantizedSwitchLinear holding the given arrays (its constructor would
    first build and quantize random float weights)."""
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    m = QuantizedSwitchLinear.__new__(QuantizedSwitchLinear)
    nn.Module.__init__(m)
    m.weight, m.scales, m.biases, m.bits, m.group_size = p
    m.mode = "affine"
    m.global_scale = None
    m.freeze()
    return m


def mlx_chain(projs):
    """mlx-lm's decode computation: SwitchGLU then (y * scores).sum(-2)."""
    from mlx_lm.models.switch_layers import SwitchGLU

    sm = SwitchGLU.__new__(SwitchGLU)
    import mlx.nn as nn

    nn.Module.__init__(sm)
    from mlx_lm.models.switch_layers import SwiGLU

    sm.activation = SwiGLU()
    sm.gate_proj, sm.up_proj, sm.down_proj = (switch_linear(p) for p in projs)

    def f(x, idx, scores):
        y = sm(x, idx)
        return (y * scores[..., None]).sum(axis=-2).astype(y.dtype)

    return f


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def time_steps(fn, x, E, steps, rng, warmup=1):
    """Median wall time per step, and median process CPU time per step (which other
    jobs on a shared machine do not inflate; divided by the thread count it estimates
    the wall time on an idle machine), after `warmup` untimed steps."""
    ts, cs = [], []
    for s in range(warmup + steps):
        idx = mx.array(rng.permutation(E)[:K].reshape(1, 1, K).astype(np.uint32))
        sc = mx.softmax(mx.array(rng.standard_normal((1, 1, K)).astype(np.float32)), axis=-1)
        mx.eval(idx, sc)
        c = cpu_seconds()
        t = time.perf_counter()
        mx.eval(fn(x, idx, sc))
        if s >= warmup:
            ts.append(time.perf_counter() - t)
            cs.append(cpu_seconds() - c)
    return statistics.median(ts), statistics.median(cs)


def layer_bench(args, bw):
    rows = []
    rng = np.random.default_rng(0)
    for bits, gs in RECIPES[: 2 if args.quick else None]:
        mx.random.seed(1)
        projs = [
            random_proj(args.experts, I, D, bits[0], gs),
            random_proj(args.experts, I, D, bits[1], gs),
            random_proj(args.experts, D, I, bits[2], gs),
        ]
        per_expert = sum((p[0].nbytes + p[1].nbytes + p[2].nbytes) / args.experts for p in projs)
        nbytes = per_expert * K  # the minimum a decode step must read
        if args.huge_pages:
            hp = moequant.huge_pages(projs)
            print(f"# {bits} g{gs}: {hp / 2**20:.0f} MiB of expert weights moved into huge pages", flush=True)
        chain = mlx_chain(projs)

        def ours(x, idx, sc, projs=projs):
            return moequant.moe_swiglu(x, idx, sc, *projs)

        for xname, xdt in (("float32", mx.float32), ("bfloat16", mx.bfloat16)):
            x = mx.array(rng.standard_normal((1, 1, D)).astype(np.float32)).astype(xdt)
            # Ours is timed before the mlx chain runs on this x, and both after untimed
            # warm-up steps (3 of ours, 1 of the chain, which takes seconds): a bf16
            # step of the chain (2 s, GBs of temporaries) slows the next steps of
            # anything after it (measured: ours' first step after it 17 ms, the next
            # two 9-10, against 6.6 before).
            t_ours, c_ours = time_steps(ours, x, args.experts, args.steps, rng, warmup=3)
            # Agreement of the two paths on one step (a sanity check, not the oracle).
            idx = mx.array(rng.permutation(args.experts)[:K].reshape(1, 1, K).astype(np.uint32))
            sc = mx.softmax(mx.array(rng.standard_normal((1, 1, K)).astype(np.float32)), axis=-1)
            a = np.array(ours(x, idx, sc).astype(mx.float32))
            b = np.array(chain(x, idx, sc).astype(mx.float32))
            agree = float(np.abs(a - b).max() / np.abs(b).max())
            mlx_steps = args.mlx_steps if xname == "float32" else max(1, args.mlx_steps - 1)
            t_mlx, c_mlx = time_steps(chain, x, args.experts, mlx_steps, rng)
            gbs = nbytes / t_ours / 1e9
            threads = moequant.get_num_threads()
            gbs_cpu = nbytes / (c_ours / threads) / 1e9
            rows.append(
                dict(
                    recipe=f"{bits[0]}/{bits[1]}/{bits[2]} g{gs}",
                    x=xname,
                    mb=nbytes / 1e6,
                    ours_ms=t_ours * 1e3,
                    mlx_ms=t_mlx * 1e3,
                    speedup=t_mlx / t_ours,
                    gbs=gbs,
                    frac=gbs / bw,
                    cpu_ms=c_ours / threads * 1e3,
                    frac_cpu=gbs_cpu / bw,
                    mlx_cpu_ms=c_mlx * 1e3,
                    agree=agree,
                )
            )
            r = rows[-1]
            print(
                f"{r['recipe']:>12} x={xname:<8} {r['mb']:7.1f} MB  ours {r['ours_ms']:8.2f} ms"
                f"  mlx {r['mlx_ms']:9.1f} ms  x{r['speedup']:6.1f}  {gbs:5.2f} GB/s"
                f" = {100 * r['frac']:4.0f}% of read bw | cpu-time: ours {r['cpu_ms']:6.2f} ms/thread"
                f" = {100 * r['frac_cpu']:4.0f}% of read bw, mlx {r['mlx_cpu_ms']:8.1f} ms total"
                f" (paths differ by {agree:.1e})",
                flush=True,
            )
        del projs, chain
        gc.collect()
    return rows


def launch_geometry():
    """(simdgroups per threadgroup, rows per simdgroup) of the Metal kernels, read off the
    host dispatch itself (metal/moe_swiglu_launch.h is their one definition): a lane
    reads 32 codes per step, with the scale and bias of their group."""
    rows, e, d = 4096, 2, 64
    z = (mx.zeros((e, rows, d * 4 // 32), mx.uint32), mx.zeros((e, rows, 1)), mx.zeros((e, rows, 1)), 4, 64)
    zd = (
        mx.zeros((e, d, rows * 4 // 32), mx.uint32),
        mx.zeros((e, d, rows // 64)),
        mx.zeros((e, d, rows // 64)),
        4,
        64,
    )
    y = moequant.moe_swiglu(
        mx.zeros((1, d)), mx.zeros((1, 1), mx.uint32), mx.ones((1, 1)), z, z, zd, stream=mx.cpu
    )
    launch = moequant._ext._metal_dispatch_plan([y])["launches"][0]
    sg = launch["threadgroup"][1]
    return sg, rows // launch["grid"][0] // sg


MQ_SG, MQ_RPS = launch_geometry()


def metal_bytes(bits, gs, xsize=2, ssize=2, D=D, I=I, k=K):
    """Bytes one call of the two Metal kernels reads from device memory, by design,
    for one token: the minimum (each selected weight, scale and bias byte once) and
    what the kernels load beyond it (scales and biases re-read by the G/32 lanes of a
    group, x re-read by each simdgroup, h by each simdgroup of kernel B), which hits
    the GPU caches (x is 14 KB, h 64 KB). Checked against the emulator's counts in
    tests/test_moe_metal_emulated.py."""
    rows_tg = MQ_SG * MQ_RPS
    w = lambda out_d, in_d, b: out_d * in_d * b // 8
    sb = lambda out_d, in_d: out_d * (in_d // gs) * 2 * ssize
    minimum = k * (w(I, D, bits[0]) + w(I, D, bits[1]) + w(D, I, bits[2]) + 2 * sb(I, D) + sb(D, I))
    extra_sb = k * (2 * I * (D // 32 - D // gs) + D * (I // 32 - I // gs)) * 2 * ssize
    extra_x = -(-I // rows_tg) * k * MQ_SG * D * xsize
    extra_h = -(-D // rows_tg) * MQ_SG * k * I * 4
    written = k * I * 4 + D * xsize
    return dict(
        minimum=minimum,
        loads=minimum + extra_sb + extra_x + extra_h,
        dram=minimum + k * I * 4,
        written=written,
    )


def metal_report():
    """Kimi-K2 per-layer Metal byte counts and the decode rate they predict on an M3
    Ultra (692 GB/s measured), for the routed experts of the 60 MoE layers."""
    print("# Metal kernels, one Kimi decode layer (D 7168, I 2048, k 8), bf16 x and scales:")
    for bits, gs in RECIPES:
        m = metal_bytes(bits, gs)
        t_layer = m["dram"] / 692e9
        print(
            f"  {bits[0]}/{bits[1]}/{bits[2]} g{gs}: minimum {m['minimum'] / 1e6:6.1f} MB,"
            f" kernel loads {m['loads'] / 1e6:6.1f} MB ({m['loads'] / m['minimum']:.2f}x, the excess"
            f" from cache), DRAM ~{m['dram'] / 1e6:6.1f} MB -> PREDICTION at 692 GB/s:"
            f" {t_layer * 1e3:.3f} ms/layer, {1 / (60 * t_layer):5.1f} tok/s for the routed"
            " experts of 60 layers alone",
            flush=True,
        )


E2E_CONFIG = dict(
    model_type="deepseek_v3",
    vocab_size=4096,
    hidden_size=2048,
    intermediate_size=4096,
    moe_intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=16,
    n_shared_experts=1,
    n_routed_experts=32,
    routed_scaling_factor=2.5,
    kv_lora_rank=256,
    q_lora_rank=512,
    qk_rope_head_dim=32,
    v_head_dim=64,
    qk_nope_head_dim=64,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=8,
    first_k_dense_replace=1,
    max_position_embeddings=2048,
)


def bytes_per_token(model, cfg):
    """Weight bytes one decode step must read: every parameter once, the routed
    experts only for the k of E selected (the same fraction of each stacked array),
    the embedding only for one row. The KV cache (a few hundred KB at these lengths)
    is left out."""
    from mlx.utils import tree_flatten

    k, E = cfg["num_experts_per_tok"], cfg["n_routed_experts"]
    total = 0.0
    for name, a in tree_flatten(model.parameters()):
        if ".switch_mlp." in name:
            total += a.nbytes * k / E
        elif "embed_tokens" in name:
            total += a.nbytes / a.shape[0]
        else:
            total += a.nbytes
    return total


def decode_tps(model, prompt, n):
    """Greedy tokens and tok/s of generate_step after the first token (the prefill)."""
    from mlx_lm.generate import generate_step

    toks, t0 = [], None
    for tok, _ in generate_step(prompt, model, max_tokens=n):
        toks.append(int(tok))
        if t0 is None:
            t0 = time.perf_counter()
    return (len(toks) - 1) / (time.perf_counter() - t0), toks


def prefill_tps(model, n, reps):
    """Tokens/s of one forward pass over n tokens with a fresh cache (what
    generate_step's prefill and moequant eval run), best of reps."""
    from mlx_lm.models.cache import make_prompt_cache

    x = mx.array(np.random.default_rng(n).integers(1, E2E_CONFIG["vocab_size"], (1, n)))
    best = float("inf")
    for _ in range(reps):
        cache = make_prompt_cache(model)
        t = time.perf_counter()
        mx.eval(model(x, cache=cache))
        best = min(best, time.perf_counter() - t)
    return n / best


def e2e_bench(args, bw):
    from moequant.testing import tiny_deepseek

    out = []
    for dtype in (mx.bfloat16, mx.float32):
        name = "bfloat16" if dtype == mx.bfloat16 else "float32"
        model, cfg = tiny_deepseek.build(E2E_CONFIG, seed=0, bits=4, group_size=64, dtype=dtype)
        if args.huge_pages:
            moequant.huge_pages(model)
        nbytes = bytes_per_token(model, cfg)
        roof = bw * 1e9 / nbytes
        prompt = mx.array(list(range(1, 17)))
        res, pre = {}, {}
        do_prefill = name in args.prefill_dtypes
        for fused in (False, True):
            if fused:
                n = moequant.patch(model)
                print(f"# e2e {name}: moequant.patch: {n} MoE blocks", flush=True)
                if args.huge_pages:
                    # Arrays the patch made (fused linear pairs) too, as the CLIs do.
                    moequant.huge_pages(model)
            steps = args.e2e_tokens if fused else max(3, args.e2e_tokens // 4)
            if fused:
                decode_tps(model, prompt, 3)  # warm-up
            res[fused] = decode_tps(model, prompt, steps)
            if do_prefill:
                prefill_tps(model, 32, 1)  # warm-up
                for n in args.prefill_lengths:
                    # mlx-lm's prefill takes minutes at 2048 tokens: one pass.
                    pre[fused, n] = prefill_tps(model, n, 2 if fused else 1)
                    who = "ours" if fused else "mlx-lm"
                    print(f"# e2e {name}: prefill {n} tokens, {who}: {pre[fused, n]:.2f} tok/s", flush=True)
        same = res[True][1][: len(res[False][1])] == res[False][1]
        print(
            f"e2e {name}: decode mlx-lm {res[False][0]:.2f} tok/s, ours {res[True][0]:.2f} tok/s"
            f" (x{res[True][0] / res[False][0]:.1f}); roofline {roof:.1f} tok/s"
            f" ({nbytes / 1e6:.1f} MB/token at {bw:.2f} GB/s): ours {100 * res[True][0] / roof:.0f}%,"
            f" mlx-lm {100 * res[False][0] / roof:.0f}%; greedy tokens equal over the"
            f" {len(res[False][1])} compared: {same}"
            # Both round every op to bfloat16, each its own way, and this random model
            # amplifies the difference (mlx-lm's bf16 logits agree with its own float32
            # ones at top-1 less often than ours do): the token oracle is float32.
            + (" (bfloat16: not an oracle, see float32)" if dtype != mx.float32 else ""),
            flush=True,
        )
        for n in args.prefill_lengths if do_prefill else ():
            print(
                f"e2e {name}: prefill {n:5d} tokens: mlx-lm {pre[False, n]:8.2f} tok/s,"
                f" ours {pre[True, n]:8.2f} tok/s (x{pre[True, n] / pre[False, n]:.1f})",
                flush=True,
            )
        out.append((name, res, pre, roof, same))
        del model
        gc.collect()
    return out


def prefill_op_bench(args):
    """moe_prefill against moe_swiglu (the GEMV) on one MoE layer of the e2e model's
    shape (D 2048, I 1024, 32 experts, top-8, 4-bit g64, float32 x) over token counts:
    where the batched op starts to pay (mlx_lm_patch.PREFILL_MIN_PAIRS)."""
    E, Dm, Im, k = (
        E2E_CONFIG["n_routed_experts"],
        E2E_CONFIG["hidden_size"],
        E2E_CONFIG["moe_intermediate_size"],
        E2E_CONFIG["num_experts_per_tok"],
    )
    projs = [random_proj(E, Im, Dm, 4, 64), random_proj(E, Im, Dm, 4, 64), random_proj(E, Dm, Im, 4, 64)]
    rng = np.random.default_rng(0)
    for T in (4, 8, 16, 32, 64, 256, 2048):
        x = mx.array(rng.standard_normal((T, Dm)).astype(np.float32))
        idx = mx.array(np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.uint32))
        sc = mx.softmax(mx.array(rng.standard_normal((T, k)).astype(np.float32)), axis=-1)
        ms = {}
        for name, op in (("gemv", moequant.moe_swiglu), ("prefill", moequant.moe_prefill)):
            if name == "gemv" and T > 256:
                continue
            mx.eval(op(x, idx, sc, *projs))
            ts = []
            for _ in range(3):
                t = time.perf_counter()
                mx.eval(op(x, idx, sc, *projs))
                ts.append(time.perf_counter() - t)
            ms[name] = 1e3 * min(ts)
        flops = 2 * T * k * 3 * Dm * Im
        gemv = f"moe_swiglu {ms['gemv']:8.1f} ms" if "gemv" in ms else " " * 22
        print(
            f"moe layer T={T:5d} ({T * k / E:6.1f} pairs/expert): {gemv}  moe_prefill"
            f" {ms['prefill']:8.1f} ms = {flops / ms['prefill'] / 1e6:6.1f} GFLOP/s",
            flush=True,
        )


def stream_bench(args, bw):
    """moe_swiglu at the e2e model's expert shapes (D 2048, I 1024, 4-bit g64: rows of 1024
    bytes), `--stream` experts (several layers' worth, far more than the caches hold), a
    fresh top-8 choice every step, as a decode token streams them: GB/s of expert weights
    against the read probe, and the step time against the row kernels' cache-resident
    bound (bench_linear.row_rate x threads) measured in the same run, 1 and 2 threads."""
    from bench_linear import row_rate

    cfg = E2E_CONFIG
    Dm, Im, k = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts_per_tok"]
    E = args.stream
    mx.random.seed(1)
    projs = [random_proj(E, Im, Dm, 4, 64), random_proj(E, Im, Dm, 4, 64), random_proj(E, Dm, Im, 4, 64)]
    if args.huge_pages:
        hp = moequant.huge_pages(projs)
        print(f"# {hp / 2**20:.0f} MiB of expert weights moved into huge pages", flush=True)
    nbytes = k * sum((p[0].nbytes + p[1].nbytes + p[2].nbytes) / E for p in projs)
    codes = 3 * k * Im * Dm
    print(
        f"# stream: {E} experts of D {Dm}, I {Im}, 4-bit g64 ({E * nbytes / k / 2**20:.0f} MiB), top-{k};"
        f" {nbytes / 1e6:.1f} MB and {codes / 1e6:.1f} M codes per step",
        flush=True,
    )
    rng = np.random.default_rng(0)
    saved = moequant.get_num_threads()
    for xname, xdt in (("float32", mx.float32), ("bfloat16", mx.bfloat16)):
        rate = row_rate(4, xdt)
        x = mx.array(rng.standard_normal((1, 1, Dm)).astype(np.float32)).astype(xdt)

        def ours(x, idx, sc):
            return moequant.moe_swiglu(x, idx, sc, *projs)

        for threads in (1, 2):
            moequant.set_num_threads(threads)
            try:
                t, _ = time_steps(ours, x, E, args.steps, rng, warmup=3)
            finally:
                moequant.set_num_threads(saved)
            bound = codes / (rate * 1e9 * threads)
            print(
                f"stream x={xname:<8} {threads} thread{'s' if threads > 1 else ' '}: {t * 1e3:6.3f} ms/step,"
                f" {nbytes / t / 1e9:5.2f} GB/s = {100 * nbytes / t / 1e9 / bw:3.0f}% of read bw;"
                f" rows' bound {bound * 1e3:6.3f} ms ({rate:.2f} G codes/s per core): {t / bound:.2f}x",
                flush=True,
            )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--experts",
        type=int,
        default=64,
        help="routed experts of the benchmarked layer (default: %(default)s)",
    )
    ap.add_argument("--steps", type=int, default=12, help="timed steps of the fused op")
    ap.add_argument("--mlx-steps", type=int, default=3, help="timed steps of the mlx chain")
    ap.add_argument("--e2e", action="store_true", help="also the end-to-end decode tok/s")
    ap.add_argument(
        "--e2e-tokens", type=int, default=24, help="tokens decoded per end-to-end run (default: %(default)s)"
    )
    ap.add_argument(
        "--prefill-lengths",
        type=lambda v: [int(t) for t in v.split(",") if t],
        default=[256, 2048],
        help="e2e prefill lengths in tokens (default 256,2048; empty: none)",
    )
    ap.add_argument(
        "--prefill-dtypes",
        type=lambda v: v.split(","),
        default=["float32"],
        help="activation dtypes whose e2e prefill is timed (default float32: mlx-lm's "
        "2048-token prefill takes minutes per dtype)",
    )
    ap.add_argument("--e2e-only", action="store_true", help="skip the layer benchmark")
    ap.add_argument(
        "--prefill-op",
        action="store_true",
        help="only moe_prefill vs moe_swiglu on one e2e-shaped MoE layer over token counts",
    )
    ap.add_argument(
        "--stream",
        type=int,
        default=0,
        metavar="E",
        help="only moe_swiglu at the e2e model's expert shapes over E experts (e.g. 128: four layers' worth) "
        "streaming from memory, 1 and 2 threads, against the probe and the rows' cache-resident rate",
    )
    ap.add_argument("--quick", action="store_true", help="two recipes only")
    ap.add_argument(
        "--device",
        choices=["cpu", "gpu"],
        default="cpu",
        help="where both paths run (gpu: Metal, macOS only; the bandwidth probe stays a "
        "CPU numpy sum over the same unified memory)",
    )
    ap.add_argument(
        "--no-huge-pages",
        dest="huge_pages",
        action="store_false",
        help="leave the weights on the pages MLX allocated (4 KiB unless glibc was told otherwise)",
    )
    return ap


def main():
    args = build_parser().parse_args()

    if args.device == "gpu":
        if not moequant.metal_available():
            print(f"bench_moe.py: --device gpu: {moequant.metal_status()[1]}", file=sys.stderr)
            raise SystemExit(2)
        args.huge_pages = False  # a CPU page-table matter
    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    if args.prefill_op:
        return prefill_op_bench(args)
    print(
        f"# device {args.device}; {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs,"
        f" moequant threads {moequant.get_num_threads()}, kernel {moequant.moe_cpu_path()},"
        f" mlx {mx.__version__}",
        flush=True,
    )
    bw = read_bandwidth()
    bw4k = read_bandwidth(huge_pages=False)
    print(
        f"# read bandwidth (threaded numpy sum of 1 GiB, best of 5): {bw:.2f} GB/s on huge pages"
        f" (the reference below), {bw4k:.2f} GB/s on 4 KiB pages",
        flush=True,
    )
    if args.stream:
        return stream_bench(args, bw)
    top = bw
    if not args.e2e_only:
        metal_report()
        rows = layer_bench(args, bw)
        bw2 = read_bandwidth()
        print(f"# read bandwidth again after the layer runs: {bw2:.2f} GB/s", flush=True)
        # The probe varies between runs more than the kernel does: the conservative
        # figure is against the higher of the two.
        top = max(bw, bw2)
        print(f"# ours as a fraction of the higher probe ({top:.2f} GB/s):", flush=True)
        for r in rows:
            print(
                f"  {r['recipe']:>12} x={r['x']:<8} {r['gbs']:6.2f} GB/s = {100 * r['gbs'] / top:4.0f}%",
                flush=True,
            )
    if args.e2e or args.e2e_only:
        e2e_bench(args, top)


if __name__ == "__main__":
    main()
