"""Decode of a full-dimension Kimi layer pair (dense layer 0 + MoE layer 1 at Kimi's
dims: hidden 7168, 64 heads, MLA latent 512, dense MLP 18432, 384 experts of 2048 top-8)
against the roofline of its own bytes per token, moequant.patch on the CPU.

The model is a converted checkpoint (``moequant convert``), e.g. of the full-dims fixture
that ``bench_convert.py --full-dims`` generates (``make_checkpoint`` at Kimi's dims with
``random_codes=True``). With ``--convert-from SRC`` this script converts SRC into
``--model`` first (skipped when --model already holds a converted model).

    python bench/bench_kimi_pair.py --model DIR [--convert-from SRC] [--recipe alis-3.6]
                                    [--tokens 8] [--dtype bfloat16] [--parts]

Bytes per token are every parameter once, the routed experts for k of E, the embedding
for one row (bench_moe.bytes_per_token); the roofline time is that over the read
bandwidth probe (bench/bandwidth.py) measured in the same run, before and after (the
higher is used). Also printed: the weight codes per token by bit width, from which the
instruction-throughput bound of this host: the codes of each bit width over the decode
row kernel's rate for it (bench_linear.row_rate: one thread, cache-resident, fastest of 60
calls, the activation dtype of the run) times the threads, measured in the same run before
and after the decode steps (the higher rate is used, so the bound is a lower bound).

With --parts, more decode steps run with a barrier (mx.eval) around each part of each
layer (attention and its projections and norms, the dense MLP and its projections, the
router, the shared expert, the whole MoE block): the median ms of each part, inclusive of
the parts inside it. The barriers cost time of their own; the plain steps come first.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bandwidth import read_bandwidth  # noqa: E402
from bench_linear import row_rate  # noqa: E402
from bench_moe import bytes_per_token  # noqa: E402


def build_parser():
    ap = argparse.ArgumentParser(
        prog="bench_kimi_pair.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", required=True, help="converted model directory")
    ap.add_argument(
        "--convert-from",
        default=None,
        help="convert this checkpoint into --model first (if --model has no config.json)",
    )
    ap.add_argument("--recipe", default="alis-3.6", help="recipe of --convert-from (default alis-3.6)")
    ap.add_argument("--tokens", type=int, default=8, help="decode steps timed (default 8)")
    ap.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="activation dtype (default bfloat16: the model's own)",
    )
    ap.add_argument("--parts", action="store_true", help="also time each part of each layer (barriers)")
    return ap


def time_parts(model, step, tok, cache, tokens):
    """Median ms per part of each layer over `tokens` decode steps, a barrier (mx.eval of
    the inputs before, the output after) around every part (see the module docstring)."""
    times = collections.defaultdict(list)
    wrapped = []

    def ev(v):
        mx.eval(*[a for a in (v if isinstance(v, (tuple, list)) else (v,)) if isinstance(a, mx.array)])

    for path, m in model.named_modules():
        parts = path.split(".")
        if "layers" not in parts:
            continue
        name = ".".join(parts[parts.index("layers") :])
        depth = len(parts) - parts.index("layers") - 2
        if depth not in (1, 2) or parts[-1] == "switch_mlp" or parts[-1].startswith("rope"):
            continue
        cls = type(m)

        def call(self, *a, _cls=cls, _name=name, **k):
            ev(a)
            t = time.perf_counter()
            y = _cls.__call__(self, *a, **k)
            ev(y)
            times[_name].append(time.perf_counter() - t)
            return y

        m.__class__ = type(cls.__name__, (cls,), {"__call__": call})
        wrapped.append((m, cls))
    try:
        for _ in range(tokens):
            tok = step(tok, cache)
    finally:
        for m, cls in wrapped:
            m.__class__ = cls
    return {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}, tok


def router_times(model, dtype, calls=30):
    """The MoE router's product alone (the first MoEGate's ``x @ weight.T``, one token):
    median ms of MLX's matmul and of moequant's dense_linear (when this build has it)."""
    from moequant import ops

    gate = next((m for _, m in model.named_modules() if type(m).__name__.endswith("MoEGate")), None)
    if gate is None:
        return None
    w = gate["weight"]
    x = mx.random.normal((1, 1, w.shape[1]), key=mx.random.key(0)).astype(dtype)
    mx.eval(x, w)
    fns = {"mlx x @ w.T": lambda: x @ w.T}
    if hasattr(ops, "dense_linear"):
        fns["moequant dense_linear"] = lambda: ops.dense_linear(x, w)
    out = {}
    for name, f in fns.items():
        for _ in range(3):
            mx.eval(f())
        ts = []
        for _ in range(calls):
            t = time.perf_counter()
            mx.eval(f())
            ts.append(time.perf_counter() - t)
        out[name] = sorted(ts)[calls // 2] * 1e3
    return tuple(w.shape), w.dtype, w.nbytes, out


def greedy_steps(model, tokens, clock=time.perf_counter):
    """`tokens` greedy decode steps of `model` (one token each, mlx-lm's prompt cache)
    after an 8-token prompt and two warm-up steps. Returns the clock's reading before the
    first step and after each, and (step, tok, cache) to go on decoding; step(tok, cache)
    is one evaluated greedy step. bench/pool_trace.py decodes converted models with it."""
    from mlx_lm.models.cache import make_prompt_cache

    def step(tok, cache):
        y = model(tok, cache=cache)[:, -1:].argmax(-1)
        mx.eval(y)
        return y

    cache = make_prompt_cache(model)
    tok = step(mx.array([[1, 2, 3, 4, 5, 6, 7, 8]]), cache)
    for _ in range(2):  # warm-up
        tok = step(tok, cache)
    marks = [clock()]
    for _ in range(tokens):
        tok = step(tok, cache)
        marks.append(clock())
    return marks, (step, tok, cache)


def codes_per_token(model, cfg):
    """Quantized weight codes one decode step reads, by bit width (experts k of E)."""
    k, E = cfg["num_experts_per_tok"], cfg["n_routed_experts"]
    by_bits = collections.Counter()
    for path, m in model.named_modules():
        bits = getattr(m, "bits", None)
        w = m.get("weight") if hasattr(m, "get") else None
        if bits is None or w is None or w.dtype != mx.uint32:
            continue
        codes = w.size * 32 // bits
        if ".switch_mlp." in path + ".":
            codes = codes * k // E
        elif "embed_tokens" in path:
            codes //= w.shape[0]
        by_bits[bits] += codes
    return by_bits


def main(argv=None):
    args = build_parser().parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    import moequant
    from moequant.evaluate import load_model

    model_dir = Path(args.model)
    if not (model_dir / "config.json").exists():
        if not args.convert_from:
            sys.exit(f"bench_kimi_pair.py: {model_dir} has no config.json and no --convert-from was given")
        t = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "moequant",
                "convert",
                "--hf-path",
                args.convert_from,
                "--mlx-path",
                str(model_dir),
                "--recipe",
                args.recipe,
            ],
            check=True,
        )
        print(f"# converted {args.convert_from} ({args.recipe}) in {time.perf_counter() - t:.0f} s")

    mx.set_default_device(mx.cpu)
    bw0 = read_bandwidth()
    model = load_model(model_dir, fused=True)
    cfg = model.args.__dict__ if hasattr(model, "args") else {}
    text = getattr(model, "language_model", model)
    targs = getattr(text, "args", None)
    cfg = dict(vars(targs)) if targs is not None else cfg
    if args.dtype == "float32":
        model.set_dtype(mx.float32, lambda d: mx.issubdtype(d, mx.floating))
    nbytes = bytes_per_token(model, cfg)
    codes = codes_per_token(model, cfg)
    print(
        f"# {model_dir}: {cfg.get('num_hidden_layers')} layers, hidden {cfg.get('hidden_size')}, "
        f"{cfg.get('n_routed_experts')} experts top-{cfg.get('num_experts_per_tok')}; activations "
        f"{args.dtype}; moequant threads {moequant.get_num_threads()}, rows {moequant.moe_cpu_path()}"
    )
    print(
        f"# bytes per token {nbytes / 1e6:.1f} MB; codes per token "
        + ", ".join(f"{b}-bit {n / 1e6:.1f} M" for b, n in sorted(codes.items()))
    )

    act = mx.float32 if args.dtype == "float32" else mx.bfloat16
    rates0 = {b: row_rate(b, act) for b in sorted(codes)}

    marks, (step, tok, cache) = greedy_steps(model, args.tokens)
    ts = [b - a for a, b in zip(marks, marks[1:])]
    parts = time_parts(model, step, tok, cache, args.tokens)[0] if args.parts else None
    rates1 = {b: row_rate(b, act) for b in sorted(codes)}
    bw1 = read_bandwidth()
    bw = max(bw0, bw1)
    ts.sort()
    med = ts[len(ts) // 2]
    roof = nbytes / (bw * 1e9)
    print(f"# read bandwidth {bw0:.2f} GB/s before, {bw1:.2f} GB/s after")
    print(
        f"kimi pair decode ({args.dtype}): median {med * 1e3:.1f} ms/token (best {ts[0] * 1e3:.1f}), "
        f"{1 / med:.2f} tok/s; roofline {roof * 1e3:.1f} ms/token ({nbytes / 1e6:.1f} MB at {bw:.2f} GB/s): "
        f"{med / roof:.2f}x the roofline time ({100 * roof / med:.0f}% of it)"
    )
    threads = moequant.get_num_threads()
    rates = {b: max(rates0[b], rates1[b]) for b in codes}
    bound = sum(n / (rates[b] * 1e9 * threads) for b, n in codes.items())
    print(
        "# row-kernel rates (G codes/s per core, 1 thread, before / after the decode steps): "
        + ", ".join(f"{b}-bit {rates0[b]:.2f} / {rates1[b]:.2f}" for b in sorted(codes))
    )
    print(
        f"kimi pair instruction-throughput bound: {bound * 1e3:.1f} ms/token ("
        + " + ".join(f"{codes[b] / (rates[b] * 1e9 * threads) * 1e3:.1f}" for b in sorted(codes))
        + f" for {'/'.join(str(b) for b in sorted(codes))} bits on {threads} threads) = "
        f"{bound / roof:.2f}x the roofline time; decode runs at {med / bound:.2f}x the bound"
    )

    router = router_times(model, act)
    if router:
        shape, wdt, wbytes, times = router
        print(
            f"# router product alone ({shape[0]} x {shape[1]} {str(wdt).split('.')[-1]}, x {str(act).split('.')[-1]}, one token, median of 30): "
            + ", ".join(f"{n} {ms:.3f} ms ({wbytes / ms / 1e6:.1f} GB/s)" for n, ms in times.items())
        )
    if parts:
        print(f"# parts, median ms per decode step with a barrier around each ({args.tokens} steps):")
        for name, ms in parts.items():
            print(f"  {name:42s} {ms:7.2f}")


if __name__ == "__main__":
    main()
