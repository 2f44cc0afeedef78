"""Runs metal/requantize.metal kernels on the emulator and compares them with the CPU
op moequant.requantize_int4 (its bit-exact twin). Shared by the sweep, the mutation
tests and the bytes benchmark."""

from __future__ import annotations

import numpy as np

from . import MetalLibrary
from .dispatch import metal_plan, run_plan

MX_NAMES = ("float32", "float16", "bfloat16")


def _op(packed, scales, bits, g, sg, out):
    """moequant.requantize_int4's graph on the CPU stream (its host dispatch is what
    the emulator runs)."""
    import mlx.core as mx

    import moequant

    return moequant.requantize_int4(
        mx.array(packed),
        scales,
        bits=bits,
        group_size=g,
        src_group_size=sg,
        dtype=getattr(mx, out),
        stream=mx.cpu,
    )


def kernel_name(bits, g, sg, src, out):
    """The kernel the host dispatch picks for these parameters (asked of the host code
    itself on a one-row input, not spelled a second time here)."""
    import mlx.core as mx

    K = max(g, sg)
    packed = np.zeros((1, K // 8), np.uint32)
    scales = mx.ones((1, K // sg), getattr(mx, src))
    (launch,) = metal_plan(_op(packed, scales, bits, g, sg, out))["launches"]
    return launch["kernel"]


def make_inputs(rng, shape, sg, src_dtype):
    """Random codes and scales with awkward rows: a constant row (zero range), a row
    with negative scales and a row with a zero scale. bfloat16 scales as uint16."""
    import mlx.core as mx

    *rows, K = shape
    q = rng.integers(-8, 8, size=(*rows, K), dtype=np.int8)
    s = (rng.random((*rows, K // sg)) * 0.02 + 0.002).astype(np.float32)
    flat_q, flat_s = q.reshape(-1, K), s.reshape(-1, K // sg)
    if flat_q.shape[0] >= 3:
        flat_q[0] = 3
        flat_s[1] *= -1
        flat_s[2, 0] = 0.0
    u = (q.astype(np.int64) + 8).astype(np.uint32).reshape(*rows, K // 8, 8)
    packed = np.zeros(u.shape[:-1], np.uint32)
    for k in range(8):
        packed |= u[..., k] << np.uint32(4 * k)
    scales = mx.array(s).astype(
        {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}[src_dtype]
    )
    return packed, scales


def structured_inputs(src_dtype, K=128, sg=32):
    """Rows that stress the affine parameters: constant groups (zero range), codes at
    the extremes, zero, huge, tiny, negative and mixed scales, |min| > |max| edges;
    beyond half precision for float32 scales."""
    import mlx.core as mx

    rng = np.random.default_rng(1)
    n = K // sg
    ones = np.ones(n, np.float32)
    rows = [
        (np.full(K, 3), ones * 0.01),
        (np.full(K, -5), ones * 0.01),
        (np.zeros(K), ones * 0.02),
        (np.full(K, -8), ones * 0.03),
        (np.full(K, 7), ones * 0.03),
        (np.full(K, 7), ones * 1e4),
        (np.full(K, -3), ones * 3.0),
        (rng.integers(-8, 8, K), ones * 0.0),
        (rng.integers(-8, 8, K), ones * 1e4),
        (rng.integers(-8, 8, K), ones * 1e-6),
        (rng.integers(-8, 8, K), ones * -0.01),
        (rng.integers(-8, 8, K), np.resize(np.array([0.01, 0.0, 0.5, 1e-5], np.float32), n)),
        (np.tile([-8, 7], K // 2), ones * 0.02),
        (np.r_[np.full(K // 2, -8), np.full(K // 2, 7)], ones * 0.02),
    ]
    if src_dtype == "float32":
        rows += [
            (rng.integers(-8, 8, K), ones * 1e30),
            (rng.integers(-8, 8, K), ones * np.float32(0.0123456789)),
        ]
    q = np.stack([np.asarray(r, np.int64) for r, _ in rows])
    s = np.stack([np.asarray(x, np.float32) for _, x in rows])
    u = (q + 8).astype(np.uint32).reshape(len(rows), K // 8, 8)
    packed = np.zeros(u.shape[:-1], np.uint32)
    for k in range(8):
        packed |= u[..., k] << np.uint32(4 * k)
    return packed, mx.array(s).astype(getattr(mx, src_dtype))


def to_numpy(a):
    """An mx array as numpy; bfloat16 as its uint16 bits."""
    import mlx.core as mx

    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16))
    return np.array(a)


def cpu_reference(packed, scales, bits, g, sg, out_dtype):
    import mlx.core as mx

    import moequant

    dt = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}[out_dtype]
    wq, s, b = moequant.requantize_int4(
        mx.array(packed), scales, bits=bits, group_size=g, src_group_size=sg, dtype=dt, stream=mx.cpu
    )
    return to_numpy(wq), to_numpy(s), to_numpy(b)


def run_emulated(
    lib: MetalLibrary,
    packed,
    scales,
    bits,
    g,
    sg,
    src,
    out,
    *,
    schedule="forward",
    seed=0,
    count_unique=False,
):
    """requantize_int4's Metal path on the emulator: the op's graph is built on the CPU
    stream, the host dispatch (RequantizeInt4::encode, what eval_gpu runs on a Mac) is
    recorded and its launch run. Returns (wq, scales, biases, launch result), the
    device buffers (bfloat16 as uint16 bits)."""
    outs = _op(packed, scales, bits, g, sg, out)
    plan = metal_plan(outs)
    assert all(la["kernel"].endswith(f"_{src}_{out}") for la in plan["launches"])
    bufs, res = run_plan(plan, lambda name: lib, schedule=schedule, seed=seed, count_unique=count_unique)
    wq, so, bo = (bufs[i] for i in plan["results"])
    return wq, so, bo, (res[0] if res else None)


def check(lib, packed, scales, bits, g, sg, src, out, schedule, seed=0, ref=None):
    """Asserts bit-exact equality with the CPU op; returns the launch result."""
    ref = ref or cpu_reference(packed, scales, bits, g, sg, out)
    wq, so, bo, res = run_emulated(lib, packed, scales, bits, g, sg, src, out, schedule=schedule, seed=seed)
    name = kernel_name(bits, g, sg, src, out)
    for what, got, want in zip(("wq", "scales", "biases"), (wq, so, bo), ref):
        if not np.array_equal(got.view(np.uint8), want.view(np.uint8)):
            bad = np.argwhere(got.view(np.uint8) != want.view(np.uint8))
            raise AssertionError(
                f"{name} [{schedule}]: {what} differs from the CPU op at "
                f"{len(bad)} byte(s), first at {tuple(bad[0])}"
            )
    return res
