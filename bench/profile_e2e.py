"""Where the time of bench_moe's e2e model goes: a decode step split by module (MoE
blocks, dense MLP, the attention's projections and core, norms, lm_head, the rest), and
one prefill forward of N tokens. Times are the process's CPU time (all its threads) as
well as wall time: on a shared machine the CPU time is the steadier of the two, and on a
quiet one wall ~ CPU / threads for the threaded parts. The per-module split evaluates
each module's output before and after it (barriers): their sum exceeds the plain step.

    python bench/profile_e2e.py [--dtype bfloat16] [--tokens 16] [--prefill 2048] [--no-fused]
                                [--wall] [--stub-kernels] [--glue] [--ops] [--calls]

--ops attributes a decode step's wall time per op (each quantized linear layer by its
name in the layer, MLA's per-head up-projections, the routed experts, the router's
product, the attention core; a barrier around each, times exclusive of nested ops) and
sets each quantized op against the time its codes take at the row kernels' rate
measured in the same run (bench_linear's 2048 x 2048 one-thread rate, times the
threads) and against the same call repeated back to back (16 calls in one evaluation); the rest of the step is
the time outside these ops (Python, MLX's small ops, graph evaluation, barriers).

--calls times each moequant primitive alone at the e2e model's decode shapes (one token,
4-bit g64 weights of random codes, x of --dtype): one call per evaluation, 16 calls in one
evaluation ("again") on 2 threads and on 1, against its codes at the row kernels' rate
and against a trivial MLX node (x + 1); "fixed" is again minus the codes' time: the cost
per call that does not scale with the weights (the CPU stream's node, the x preparation,
the pool's wake, allocations, the output's conversion).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moe import E2E_CONFIG  # noqa: E402


def build_parser():
    ap = argparse.ArgumentParser(
        prog="profile_e2e.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="activation dtype of the model (default bfloat16)",
    )
    ap.add_argument("--tokens", type=int, default=16, help="decode steps timed (default 16)")
    ap.add_argument(
        "--prefill", type=int, default=0, help="also time one forward of this many tokens (default 0: none)"
    )
    ap.add_argument("--no-fused", action="store_true", help="mlx-lm's own paths (no moequant.patch)")
    ap.add_argument(
        "--stub-kernels",
        action="store_true",
        help="also time the decode loop with quantized_linear and moe_swiglu replaced by "
        "trivial stand-ins of the same output shape: what the token costs besides its "
        "quantized kernels (graph building, MLX's small ops, attention core, router, norms)",
    )
    ap.add_argument(
        "--glue",
        action="store_true",
        help="also split a decode step into the Python time building its graph (by module, "
        "no evaluation inside) and the evaluation, synchronous and pipelined as mlx-lm's "
        "generate_step runs it (async_eval), and time the CPU stream's cost per graph node "
        "(a chain of reshapes; a chain of rms_norm primitives)",
    )
    ap.add_argument(
        "--ops",
        action="store_true",
        help="also split a decode step by op against the row kernels' rate (see above)",
    )
    ap.add_argument(
        "--calls",
        action="store_true",
        help="time each primitive alone at the decode shapes (see above); the model is not decoded",
    )
    ap.add_argument(
        "--wall",
        action="store_true",
        help="split the step by wall time instead of CPU time (on a quiet machine: "
        "the pool's spinning workers add CPU time to whatever runs next)",
    )
    return ap


class Clock:
    def __init__(self):
        self.w, self.c = time.perf_counter(), time.process_time()

    def read(self):
        return time.perf_counter() - self.w, time.process_time() - self.c


def graph_nodes(y) -> collections.Counter:
    """The primitives of the graph that evaluating y runs, by name (MLX's DOT export)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "graph.dot")
        mx.export_to_dot(path, y)
        text = Path(path).read_text()
    return collections.Counter(re.findall(r'label ="(\w+)", shape=rectangle', text))


def glue_split(model, cache, tok, n):
    """Python graph-building time of a decode step by module, its evaluation (synchronous
    and pipelined), and the per-node cost of the CPU stream (module docstring: --glue)."""
    build = collections.defaultdict(float)
    saved = []

    def wrap(obj, attr, name):
        m = getattr(obj, attr)
        fn = type(m).__call__.__get__(m)

        def call(*a, **k):
            t = time.perf_counter()
            y = fn(*a, **k)
            build[name] += time.perf_counter() - t
            return y

        saved.append((obj, attr, m))
        object.__setattr__(obj, attr, type("Timed", (), {"__call__": staticmethod(call)})())

    for layer in model.model.layers:
        wrap(layer, "self_attn", "attention (projections, norms, rope, cache, core)")
        wrap(layer, "mlp", "MoE block" if hasattr(layer.mlp, "switch_mlp") else "dense MLP")
        wrap(layer, "input_layernorm", "norms")
        wrap(layer, "post_attention_layernorm", "norms")
    wrap(model, "lm_head", "lm_head")
    wrap(model.model, "embed_tokens", "embedding")
    t_build = t_eval = 0.0
    for _ in range(n):
        t = time.perf_counter()
        y = model(tok, cache=cache)[:, -1:].argmax(-1)
        t_build += time.perf_counter() - t
        t = time.perf_counter()
        mx.eval(y)
        t_eval += time.perf_counter() - t
        tok = y
    for obj, attr, m in saved:
        object.__setattr__(obj, attr, m)
    print(
        f"glue: building the graph {t_build / n * 1e3:.2f} ms/token (Python, no evaluation), "
        f"evaluating it {t_eval / n * 1e3:.2f} ms/token (synchronous); building by module (ms/token):"
    )
    for k, v in sorted(build.items(), key=lambda kv: -kv[1]):
        print(f"  {k:52s} {v / n * 1e3:6.3f}")
    print(
        f"  {'rest (model call, residual adds, head slice, argmax)':52s} {(t_build - sum(build.values())) / n * 1e3:6.3f}"
    )
    # Pipelined as mlx-lm's generate_step: the next step's graph is built while this one
    # evaluates (async_eval), then the token is read.
    t = time.perf_counter()
    y = model(tok, cache=cache)[:, -1:].argmax(-1)
    mx.async_eval(y)
    for _ in range(n):
        nxt = model(y, cache=cache)[:, -1:].argmax(-1)
        mx.async_eval(nxt)
        y.item()
        y = nxt
    y.item()
    print(
        f"glue: pipelined (async_eval, as generate_step) {(time.perf_counter() - t) / (n + 1) * 1e3:.2f} ms/token"
    )
    # The CPU stream's cost per node: K nodes that move no data (reshapes), and K
    # rms_norm primitives on one 2048-wide row (moequant's when patched), built and
    # evaluated; per node, from the difference of two chain lengths.
    x = mx.zeros((1, 2048), dtype=mx.float32)
    w = mx.ones((2048,), dtype=mx.float32)
    mx.eval(x, w)
    norm = model.model.layers[0].input_layernorm

    def chain(k, kind):
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            y = x
            for i in range(k):
                y = (
                    (y.reshape(2048, 1) if i % 2 == 0 else y.reshape(1, 2048))
                    if kind == "reshape"
                    else norm(y)
                )
            mx.eval(y)
            best = min(best, time.perf_counter() - t)
        return best

    for kind in ("reshape", "rms_norm"):
        us = (chain(300, kind) - chain(20, kind)) / 280 * 1e6
        print(f"glue: one {kind} node built and evaluated: {us:.1f} us")
    return tok


def ops_split(model, tok, cache, n, dtype):
    """Per op of a decode step: wall ms per token in the model (barriers around each
    op, exclusive of nested ones), codes per token, the same call repeated (warm
    caches), and the codes' time at the row kernels' rate (module docstring: --ops)."""
    import moequant
    from bench_linear import row_rate
    from moequant import mla_attention, mlx_lm_patch

    rec = collections.defaultdict(lambda: [0.0, 0, 0])  # seconds, calls, codes
    calls = {}  # one call per op name, to repeat on warm caches
    stack = [0.0]  # nested ops' time, subtracted from their parent's

    def timed(name, fn, codes):
        def call(*a, **k):
            key = name(*a) if callable(name) else name
            mx.eval(*[v for v in a if isinstance(v, mx.array)])
            stack.append(0.0)
            t = time.perf_counter()
            y = fn(*a, **k)
            mx.eval(y)
            dt = time.perf_counter() - t
            inner = stack.pop()
            stack[-1] += dt
            r = rec[key]
            r[0] += dt - inner
            r[1] += 1
            r[2] += codes(*a, **k)
            calls.setdefault(key, (fn, a, k))
            return y

        return call

    def qcodes(m):
        return lambda x, *_, **__: m["weight"].shape[0] * m["weight"].shape[1] * 32 // m.bits

    def short(path):
        name = re.sub(r"^model\.layers\.\d+\.", "", path)
        return "dense " + name if name.startswith("mlp.") and not name.startswith("mlp.shared") else name

    # Layers that patch fused into pairs are timed as one op (mlx_lm_patch._pair_outputs).
    fused = {
        (id(m), n)
        for _, m in model.named_modules()
        for names in getattr(m, "_moequant_pairs", {})
        for n in names
    }

    saved = []
    for path, m in model.named_modules():
        if not isinstance(m, nn.QuantizedLinear):
            continue
        parent = model
        *up, attr = path.split(".")
        for p in up:
            parent = parent[int(p)] if p.isdigit() else getattr(parent, p)
        if (id(parent), attr) in fused:
            continue
        name = short(path)
        saved.append((parent, attr, m))
        fn = type(m).__call__.__get__(m)
        object.__setattr__(
            parent, attr, type("Timed", (), {"__call__": staticmethod(timed(name, fn, qcodes(m)))})()
        )

    def multi_codes(x, w, s, b, *, bits, group_size):
        return w.shape[0] * w.shape[1] * w.shape[2] * 32 // bits * (x.size // (x.shape[-1] * w.shape[0]))

    def moe_codes(x, inds, scores, *projs, **_):
        return inds.size * sum(p[0].shape[1] * p[0].shape[2] * 32 // p[3] for p in projs)

    def core_codes(*a, embed_q, unembed_out, bits, group_size, **_):
        return sum(w.size * 32 // b for (w, _, _), b in zip((embed_q, unembed_out), bits)) * a[0].shape[0]

    def fused_name(arrays, x):
        return f"fused pair {x.shape[-1]}->{'+'.join(map(str, pair_sizes(arrays)))}"

    def pair_sizes(arrays):
        w, splits = arrays[0], list(arrays[5])
        return [b - a for a, b in zip([0] + splits, splits + [w.shape[0]])]

    def fused_codes(arrays, x):
        return arrays[0].shape[0] * arrays[0].shape[1] * 32 // arrays[3]

    funcs = [
        # Every fused pair (MLA's q_a + kv_a, the MLPs' gate + up) runs _pair_outputs.
        (mlx_lm_patch, "_pair_outputs", fused_name, fused_codes),
        (mla_attention, "quantized_multi_linear", "attention embed_q / unembed_out", multi_codes),
        (mlx_lm_patch, "moe_swiglu", "routed experts (moe_swiglu)", moe_codes),
        (mlx_lm_patch, "dense_linear", "router product (dense_linear)", lambda *a, **k: 0),
        (mla_attention, "attend", "attention core (attend)", lambda *a, **k: 0),
        # Builds with mla_decode_core: a decode step's whole core, up-projections included.
        (mla_attention, "mla_decode_core", "attention decode core (mla_decode_core)", core_codes),
    ]
    for mod, attr, name, codes in funcs:
        f = getattr(mod, attr, None)
        if f is None:  # a build without the pairs
            continue
        saved.append((mod, attr, f))
        setattr(mod, attr, timed(name, f, codes))
    try:
        clk = Clock()
        for _ in range(n):
            tok = model(tok, cache=cache)[:, -1:].argmax(-1)
            mx.eval(tok)
        wall, _ = clk.read()
    finally:
        for obj, attr, f in saved:
            if isinstance(obj, type(mla_attention)):
                setattr(obj, attr, f)
            else:
                object.__setattr__(obj, attr, f)

    threads = moequant.get_num_threads()
    rate = row_rate(4, dtype) * 1e9 * threads  # codes per second, all threads
    # The same call repeated: 16 independent calls evaluated at once (no wait between
    # them, as in the model's graph), the fastest of 5 rounds; warm caches where the
    # op's weights fit in them.
    warm = {}
    for name, (fn, a, k) in calls.items():
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            mx.eval([fn(*a, **k) for _ in range(16)])
            best = min(best, (time.perf_counter() - t) / 16)
        warm[name] = best
    print(
        f"ops: a decode step with a barrier around each op: {wall / n * 1e3:.2f} ms/token; row kernels "
        f"{rate / threads / 1e9:.2f} G codes/s per core (4-bit, x {dtype}), {threads} threads"
    )
    print(
        f"  {'op (calls per token)':44s} {'model ms':>8s} {'again ms':>8s} {'rate ms':>8s} "
        f"{'model/rate':>10s} {'M codes':>8s}"
    )
    tot = [0.0, 0.0, 0.0]
    for name, (sec, cnt, codes) in sorted(rec.items(), key=lambda kv: -kv[1][0]):
        per = cnt / n
        rt = codes / n / rate
        wm = warm[name] * per
        tot[0] += sec / n
        tot[1] += wm
        tot[2] += rt
        ratio = f"{sec / n / rt:10.2f}" if rt else f"{'':10s}"
        print(
            f"  {name + f' ({per:g})':44s} {sec / n * 1e3:8.3f} {wm * 1e3:8.3f} {rt * 1e3:8.3f} {ratio} "
            f"{codes / n / 1e6:8.2f}"
        )
    print(f"  {'all ops':44s} {tot[0] * 1e3:8.3f} {tot[1] * 1e3:8.3f} {tot[2] * 1e3:8.3f}")
    print(f"  {'outside the ops (Python, small MLX ops, barriers)':44s} {(wall / n - tot[0]) * 1e3:8.3f}")
    return tok


def calls_split(dtype):
    """Each primitive alone at the e2e model's decode shapes (module docstring: --calls)."""
    import statistics

    import numpy as np

    import moequant
    from bench_linear import make_weight, row_rate
    from moequant import ops

    cfg = E2E_CONFIG
    D, I, heads = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_attention_heads"]
    nope, rope_d, vd = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    kv, ql = cfg["kv_lora_rank"], cfg["q_lora_rank"]
    rng = np.random.default_rng(0)

    def act(*shape):
        a = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)
        mx.eval(a)
        return a

    def one(f, reps=100):
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            mx.eval(f())
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    def again(f, n=16, rounds=10):
        best = float("inf")
        for _ in range(rounds):
            t = time.perf_counter()
            mx.eval([f() for _ in range(n)])
            best = min(best, (time.perf_counter() - t) / n)
        return best

    def linear(K, N):
        w, s, b = make_weight(N, K, 4, False)
        x = act(1, 1, K)
        return (lambda: moequant.quantized_linear(x, w, s, b, bits=4, group_size=64)), N * K

    def multi(K, N):
        w, s, b = make_weight(heads * N, K, 4, False)
        w, s, b = (a.reshape(heads, N, -1) for a in (w, s, b))
        x = act(1, heads, 1, K)
        return (lambda: moequant.quantized_multi_linear(x, w, s, b, bits=4, group_size=64)), heads * N * K

    def experts():
        E, k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
        projs = []
        for n, kk in ((I, D), (I, D), (D, I)):
            w, s, b = make_weight(E * n, kk, 4, False)
            projs.append(tuple(a.reshape(E, n, -1) for a in (w, s, b)) + (4, 64))
        x = act(1, 1, D)
        inds = mx.array(rng.permutation(E)[:k].reshape(1, 1, k).astype(np.uint32))
        sc = mx.softmax(act(1, 1, k).astype(mx.float32), axis=-1)
        mx.eval(inds, sc)
        return (lambda: moequant.moe_swiglu(x, inds, sc, *projs)), k * 3 * I * D

    def norm(n):
        x, w = act(1, 1, n), act(n)
        return (lambda: ops.rms_norm(x, w, 1e-6)), 0

    def router():
        x, w = act(1, D), act(cfg["n_routed_experts"], D)
        return (lambda: ops.dense_linear(x, w)), 0

    x1 = act(1, 1, D)
    cases = [
        ("trivial MLX node (x + 1)", lambda: ((lambda: x1 + 1), 0)),
        (f"q_a+kv_a {D}->{ql}+{kv + rope_d}", lambda: linear(D, ql + kv + rope_d)),
        (f"q_b_proj {ql}->{heads * (nope + rope_d)}", lambda: linear(ql, heads * (nope + rope_d))),
        (f"o_proj {heads * vd}->{D}", lambda: linear(heads * vd, D)),
        (f"shared gate+up {D}->{2 * I}", lambda: linear(D, 2 * I)),
        (f"shared down {I}->{D}", lambda: linear(I, D)),
        (
            f"dense gate+up {D}->{2 * cfg['intermediate_size']}",
            lambda: linear(D, 2 * cfg["intermediate_size"]),
        ),
        (f"dense down {cfg['intermediate_size']}->{D}", lambda: linear(cfg["intermediate_size"], D)),
        (f"lm_head {D}->{cfg['vocab_size']}", lambda: linear(D, cfg["vocab_size"])),
        (f"embed_q {heads}x {nope}->{kv}", lambda: multi(nope, kv)),
        (f"unembed_out {heads}x {kv}->{vd}", lambda: multi(kv, vd)),
        ("moe_swiglu 1 token top-8", experts),
        (f"router dense_linear {D}->{cfg['n_routed_experts']}", router),
        (f"rms_norm {D}", lambda: norm(D)),
        (f"rms_norm {ql}", lambda: norm(ql)),
        (f"rms_norm {kv}", lambda: norm(kv)),
    ]
    threads = moequant.get_num_threads()
    rate = row_rate(4, dtype) * 1e9  # codes per second, one thread
    print(
        f"calls: each primitive alone, x {dtype}, 4-bit g64, one token; row kernels {rate / 1e9:.2f} G codes/s "
        f"per core; us per call"
    )
    print(
        f"  {'call':34s} {'one':>7s} {'again':>7s} {'rate':>7s} {'fixed':>7s} {'again1t':>7s} {'rate1t':>7s} "
        f"{'fixed1t':>7s} {'M codes':>7s}"
    )
    for name, make in cases:
        f, codes = make()
        f()
        o, a = one(f), again(f)
        moequant.set_num_threads(1)
        try:
            f()
            a1 = again(f)
        finally:
            moequant.set_num_threads(threads)
        r, r1 = codes / rate / threads, codes / rate
        print(
            f"  {name:34s} {o * 1e6:7.1f} {a * 1e6:7.1f} {r * 1e6:7.1f} {(a - r) * 1e6:7.1f} {a1 * 1e6:7.1f} "
            f"{r1 * 1e6:7.1f} {(a1 - r1) * 1e6:7.1f} {codes / 1e6:7.2f}"
        )


def main(argv=None):
    args = build_parser().parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # partial results survive an interrupted run
    from mlx_lm.models.cache import make_prompt_cache

    import moequant
    from moequant.testing import tiny_deepseek

    dtype = getattr(mx, args.dtype)
    if args.calls:
        calls_split(dtype)
        return
    model, _ = tiny_deepseek.build(E2E_CONFIG, seed=0, bits=4, group_size=64, dtype=dtype)
    if not args.no_fused:
        moequant.patch(model)
    who = "mlx-lm" if args.no_fused else "moequant.patch"
    print(f"# e2e model ({args.dtype}, 4-bit g64), {who}; moequant threads {moequant.get_num_threads()}")

    if args.prefill:
        x = mx.array([[1 + i % (E2E_CONFIG["vocab_size"] - 1) for i in range(args.prefill)]])
        mx.eval(model(x[:, :32], cache=make_prompt_cache(model)))  # warm-up
        clk = Clock()
        mx.eval(model(x, cache=make_prompt_cache(model)))
        w, c = clk.read()
        print(f"prefill {args.prefill} tokens: wall {w:.2f} s ({args.prefill / w:.1f} tok/s), cpu {c:.2f} s")

    def decode(n, cache, tok):
        for _ in range(n):
            tok = model(tok, cache=cache)[:, -1:].argmax(-1)
            mx.eval(tok)
        return tok

    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([list(range(1, 17))]), cache=cache))
    tok = decode(3, cache, mx.array([[16]]))
    n = args.tokens
    clk = Clock()
    tok = decode(n, cache, tok)
    w, c = clk.read()
    print(f"decode: wall {w / n * 1e3:.1f} ms/token ({n / w:.1f} tok/s), cpu {c / n * 1e3:.1f} ms/token")

    if args.stub_kernels and not args.no_fused:
        from moequant import mlx_lm_patch

        real = mlx_lm_patch.quantized_linear, mlx_lm_patch.moe_swiglu
        mlx_lm_patch.quantized_linear = lambda x, w, *a, **k: mx.broadcast_to(
            x[..., :1], x.shape[:-1] + (w.shape[0],)
        )
        mlx_lm_patch.moe_swiglu = lambda x, *a: x
        clk = Clock()
        tok = decode(n, cache, tok)
        w, c = clk.read()
        mlx_lm_patch.quantized_linear, mlx_lm_patch.moe_swiglu = real
        print(f"decode, kernels stubbed: wall {w / n * 1e3:.1f} ms/token, cpu {c / n * 1e3:.1f} ms/token")

    if args.glue:
        glue_split(model, cache, tok, n)

    if args.ops and not args.no_fused:
        tok = ops_split(model, tok, cache, n, dtype)

    # MLX primitives per decode step: each costs the CPU stream ~8 us even when it moves
    # no data (a reshape, a broadcast), so their count is part of the step's fixed cost.
    nodes = graph_nodes(model(tok, cache=cache)[:, -1:].argmax(-1))
    print(
        f"graph nodes per decode step: {sum(nodes.values())} ({', '.join(f'{k} {v}' for k, v in nodes.most_common(8))}, ...)"
    )
    mx.eval([c.state for c in cache])

    acc = collections.defaultdict(float)
    now = time.perf_counter if args.wall else time.process_time
    what = "wall" if args.wall else "cpu"

    def timed_call(name, fn):
        def call(*a, **k):
            mx.eval(*[v for v in a if isinstance(v, mx.array)])
            t = now()
            y = fn(*a, **k)
            mx.eval(y)
            acc[name] += now() - t
            return y

        return call

    def wrap(obj, attr, name):
        m = getattr(obj, attr)
        proxy = type("Timed", (), {"__call__": staticmethod(timed_call(name, type(m).__call__.__get__(m)))})
        object.__setattr__(obj, attr, proxy())

    for layer in model.model.layers:
        # A fused pair (one call, mla_attention.pair_linear) is timed as one, below.
        pairs = layer.self_attn.__dict__.get("_moequant_pairs", {})
        for p in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"):
            if not any(p in names for names in pairs):
                wrap(layer.self_attn, p, "attention " + p)
        wrap(layer, "mlp", "MoE block" if hasattr(layer.mlp, "switch_mlp") else "dense MLP")
        wrap(layer, "input_layernorm", "norms")
        wrap(layer, "post_attention_layernorm", "norms")
    wrap(model, "lm_head", "lm_head")
    if not args.no_fused:
        from moequant import mla_attention

        mla_attention.attend = timed_call("attention core (mla_attention.attend)", mla_attention.attend)
        if hasattr(mla_attention, "mla_decode_core"):
            mla_attention.mla_decode_core = timed_call(
                "attention decode core (mla_decode_core)", mla_attention.mla_decode_core
            )
        if hasattr(mla_attention, "pair_linear"):
            mla_attention.pair_linear = timed_call(
                "attention q_a_proj+kv_a_proj_with_mqa", mla_attention.pair_linear
            )
    clk = Clock()
    decode(n, cache, tok)
    w, c = clk.read()
    c = w if args.wall else c
    print(f"with barriers: {what} {c / n * 1e3:.1f} ms/token, of which ({what} ms/token):")
    for k, v in sorted(acc.items(), key=lambda kv: -kv[1]):
        print(f"  {k:40s} {v / n * 1e3:7.2f}  {100 * v / c:4.0f}%")
    rest = c - sum(acc.values())
    print(f"  {'rest (embedding, rope, cache, glue)':40s} {rest / n * 1e3:7.2f}  {100 * rest / c:4.0f}%")


if __name__ == "__main__":
    main()
