"""Runs metal/requantize_fit.metal kernels on the emulator as RequantizeFit::eval_gpu
dispatches them (csrc/requantize/requantize_mse.cpp), for the bit-exact comparison with
the CPU op and for the bytes/operations figures of bench/bench_requant.py."""

from __future__ import annotations

import numpy as np

from . import MetalLibrary
from .requantize_check import NP_DTYPES, to_numpy

TG = 64  # threads per threadgroup, as RequantizeFit::eval_gpu dispatches


def run_int4(lib: MetalLibrary, packed, scales_np, importance, bits, g, sg, src, out, *,
             schedule="forward", seed=0, count_unique=False):
    K = packed.shape[-1] * 8
    rows = packed.size // packed.shape[-1]
    gpr = K // g
    n = rows * gpr
    wq = np.zeros((*packed.shape[:-1], K * bits // 32), np.uint32)
    so = np.zeros((*packed.shape[:-1], gpr), NP_DTYPES[out])
    bo = np.zeros_like(so)
    h = np.ones(K, np.float32) if importance is None else np.asarray(importance, np.float32)
    res = lib.run(
        f"requantize_fit_int4_{src}_{out}",
        buffers={0: np.ascontiguousarray(packed).view(np.uint32),
                 1: np.ascontiguousarray(scales_np), 2: h, 3: wq, 4: so, 5: bo,
                 6: np.uint32(n), 7: np.uint32(gpr), 8: np.uint32(bits), 9: np.uint32(g),
                 10: np.uint32(sg)},
        grid=((n + TG - 1) // TG, 1, 1), threadgroup=(TG, 1, 1),
        schedule=schedule, seed=seed, count_unique=count_unique)
    return wq, so, bo, res


def run_float(lib: MetalLibrary, w_np, importance, bits, g, src, out, *, schedule="forward",
              seed=0):
    K = w_np.shape[-1]
    rows = w_np.size // K
    gpr = K // g
    n = rows * gpr
    wq = np.zeros((*w_np.shape[:-1], K * bits // 32), np.uint32)
    so = np.zeros((*w_np.shape[:-1], gpr), NP_DTYPES[out])
    bo = np.zeros_like(so)
    h = np.ones(K, np.float32) if importance is None else np.asarray(importance, np.float32)
    res = lib.run(
        f"quantize_fit_{src}_{out}",
        buffers={0: np.ascontiguousarray(w_np), 1: h, 3: wq, 4: so, 5: bo,
                 6: np.uint32(n), 7: np.uint32(gpr), 8: np.uint32(bits), 9: np.uint32(g)},
        grid=((n + TG - 1) // TG, 1, 1), threadgroup=(TG, 1, 1),
        schedule=schedule, seed=seed)
    return wq, so, bo, res


def assert_equal(name, got, want):
    for what, a, b in zip(("wq", "scales", "biases"), got, want):
        a8, b8 = np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(to_numpy(b)).view(np.uint8)
        if not np.array_equal(a8, b8):
            bad = np.argwhere(a8 != b8)
            raise AssertionError(f"{name}: {what} differs from the CPU op at {len(bad)} "
                                 f"byte(s), first at {tuple(bad[0])}")
