"""Executes moequant's Metal host dispatch on the emulator.

`moequant._ext._metal_dispatch_plan(arrays)` runs the `encode()` host code of every
moequant primitive behind `arrays` (the same code eval_gpu runs on a Mac) on a
recording encoder: kernel names, the arrays and constants bound at each buffer index,
grids and threadgroup shapes. `run_plan` executes those launches in order on the CPU
emulator of MSL, with device buffers made from the recorded inputs (evaluated on the
CPU) and fresh, NaN-poisoned buffers for the primitives' outputs, so one launch's output
feeds the next as on the GPU. The numbers (geometry, indices, names) come only from
the host code: a wrong one there fails the comparison with the CPU oracle.

    plan = metal_plan([y])                       # y built on stream=mx.cpu
    out, launches = run_plan(plan, lib_for)      # lib_for(kernel name) -> MetalLibrary
    y_gpu = result(plan, out, 0, y)              # an mx.array shaped like y
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from . import LaunchResult, MetalEmulatorError, MetalLibrary

NP_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": np.uint16,
    "uint32": np.uint32,
    "int32": np.int32,
    "uint8": np.uint8,
}


def metal_plan(arrays) -> dict:
    """The recorded Metal dispatch of the moequant primitives behind `arrays`."""
    import moequant

    return moequant._ext._metal_dispatch_plan(list(arrays))


def to_host(a) -> np.ndarray:
    """An evaluated mx array as a C-contiguous device buffer (bfloat16 as uint16 bits)."""
    import mlx.core as mx

    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.array(a))


def _scalar(raw: bytes) -> np.generic:
    """set_bytes data as a numpy scalar of the same bytes (bound as a constant)."""
    by_size = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
    dt = by_size.get(len(raw), np.dtype(f"V{len(raw)}"))
    return np.frombuffer(raw, dt)[0]


def run_plan(
    plan: dict, lib_for: Callable[[str], MetalLibrary], *, schedule="forward", seed=0, count_unique=False
) -> tuple[dict, list[LaunchResult]]:
    """Runs every launch of `plan`; returns ({array id: device buffer}, launch results)."""
    bufs: dict[int, np.ndarray] = {}
    values, outputs = plan["values"], plan["outputs"]

    def array_buffer(aid: int) -> np.ndarray:
        if aid not in bufs:
            if aid in values:
                bufs[aid] = to_host(values[aid])
            elif aid in outputs:
                shape, dtype = outputs[aid]
                if dtype not in NP_DTYPES:
                    raise MetalEmulatorError(f"no device dtype for {dtype}")
                b = np.empty(shape, NP_DTYPES[dtype])
                b.view(np.uint8)[...] = 0xFF  # NaN for floats: unwritten outputs show
                bufs[aid] = b
            else:
                raise MetalEmulatorError(f"the plan binds array {aid}, which it does not describe")
        return bufs[aid]

    results = []
    for launch in plan["launches"]:
        bound = {}
        for index, (kind, what) in launch["buffers"].items():
            if kind == "array":
                bound[index] = array_buffer(what)
            else:  # set_bytes: a `constant T&` of exactly these bytes
                bound[index] = _scalar(what)
        name = launch["kernel"]
        results.append(
            lib_for(name).run(
                name,
                buffers=bound,
                grid=launch["grid"],
                threadgroup=launch["threadgroup"],
                schedule=schedule,
                seed=seed,
                count_unique=count_unique,
            )
        )
    return bufs, results


def result(plan: dict, bufs: dict, i: int, like=None):
    """The emulated value of the plan's i-th requested array, as an mx array (shaped
    like `like` when given: the op's result may be a reshape of the primitive's)."""
    import mlx.core as mx

    aid = plan["results"][i]
    if aid is None:
        raise MetalEmulatorError("that array is not computed by a moequant primitive")
    shape, dtype = plan["outputs"][aid]
    a = mx.array(bufs[aid]) if aid in bufs else None
    if a is None:
        raise MetalEmulatorError("no launch wrote that array")
    if dtype == "bfloat16":
        a = a.view(mx.bfloat16)
    return a.reshape(like.shape) if like is not None else a
