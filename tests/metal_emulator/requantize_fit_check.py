"""Runs metal/requantize_fit.metal kernels on the emulator through the host dispatch
(RequantizeFit::encode in csrc/requantize/requantize_mse.cpp, recorded by
moequant._ext._metal_dispatch_plan), for the bit-exact comparison with the CPU op and
for the bytes/operations figures of bench/bench_requant.py."""

from __future__ import annotations

import numpy as np

from . import MetalLibrary
from .dispatch import metal_plan, run_plan
from .requantize_check import to_numpy


def _mx_dtype(name):
    import mlx.core as mx

    return {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}[name]


def _plan_run(lib, outs, schedule, seed, count_unique):
    """Record the host dispatch of the op behind ``outs`` (RequantizeFit::encode, what
    eval_gpu runs on a Mac: kernel name, buffer indices, constants, grid) and run it."""
    plan = metal_plan(outs)
    bufs, res = run_plan(plan, lambda name: lib, schedule=schedule, seed=seed, count_unique=count_unique)
    wq, so, bo = (bufs[i] for i in plan["results"])
    return wq, so, bo, (res[0] if res else None)


def run_int4(
    lib: MetalLibrary,
    packed,
    scales_np,
    importance,
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
    """requantize_int4(fit="mse")'s Metal path on the emulator; device buffers
    (bfloat16 as uint16 bits) and the launch result."""
    import mlx.core as mx

    import moequant

    scales = mx.array(np.ascontiguousarray(scales_np))
    if src == "bfloat16":
        scales = scales.view(mx.bfloat16)
    outs = moequant.requantize_int4(
        mx.array(np.ascontiguousarray(packed).view(np.uint32)),
        scales,
        bits=bits,
        group_size=g,
        src_group_size=sg,
        dtype=_mx_dtype(out),
        fit="mse",
        importance=None if importance is None else mx.array(np.asarray(importance, np.float32)),
        stream=mx.cpu,
    )
    return _plan_run(lib, outs, schedule, seed, count_unique)


def run_float(lib: MetalLibrary, w_np, importance, bits, g, src, out, *, schedule="forward", seed=0):
    """moequant.quantize(fit="mse")'s Metal path on the emulator."""
    import mlx.core as mx

    import moequant

    w = mx.array(np.ascontiguousarray(w_np))
    if src == "bfloat16":
        w = w.view(mx.bfloat16)
    outs = moequant.quantize(
        w,
        bits=bits,
        group_size=g,
        fit="mse",
        dtype=_mx_dtype(out),
        importance=None if importance is None else mx.array(np.asarray(importance, np.float32)),
        stream=mx.cpu,
    )
    return _plan_run(lib, outs, schedule, seed, False)


def assert_equal(name, got, want):
    for what, a, b in zip(("wq", "scales", "biases"), got, want):
        a8, b8 = np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(to_numpy(b)).view(np.uint8)
        if not np.array_equal(a8, b8):
            bad = np.argwhere(a8 != b8)
            raise AssertionError(
                f"{name}: {what} differs from the CPU op at {len(bad)} byte(s), first at {tuple(bad[0])}"
            )
