"""The host side of the Metal dispatch has teeth: the recorded dispatch plan of each op
(moe_swiglu's two launches, requantize_int4, the mse fit), which the emulator runs
against the CPU op, must stop matching once the host's part of it is wrong: two buffer
indices swapped, a grid one threadgroup smaller, a wrong kernel-name field (another
kernel that exists, or one that does not). Each mutation is applied to the plan the
real host code recorded (moequant._ext._metal_dispatch_plan); the unmutated plan is the
control."""

from __future__ import annotations

import copy

import mlx.core as mx
import numpy as np
import pytest

import moequant
from moe_reference import make_proj

metal_emulator = pytest.importorskip(
    "metal_emulator", reason="the metal_emulator test package (tests/metal_emulator) is not importable"
)
from metal_emulator import REPO_ROOT, MetalEmulatorError, MetalLibrary  # noqa: E402
from metal_emulator import requantize_check as rq  # noqa: E402
from metal_emulator.dispatch import metal_plan, run_plan  # noqa: E402

_LIBS: dict = {}


def lib_for(metal_file):
    def get(name):
        key = (metal_file, name)
        if key not in _LIBS:
            _LIBS[key] = MetalLibrary(REPO_ROOT / "metal" / metal_file, only=[name])
        return _LIBS[key]

    return get


def moe_case():
    rng = np.random.default_rng(5)
    E, D, I, k, T = 4, 256, 64, 2, 3
    g, u, d = (make_proj(rng, E, r, c, 4, 64, "float32") for r, c in ((I, D), (I, D), (D, I)))
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32))
    idx = mx.array(np.array([[0, 1], [2, 3], [1, 2]], np.int32))
    sc = mx.array(rng.random((T, k)).astype(np.float32))
    return [moequant.moe_swiglu(x, idx, sc, g, u, d, stream=mx.cpu)]


def requantize_case():
    packed, scales = rq.make_inputs(np.random.default_rng(6), (37, 512), 32, "float32")
    return list(
        moequant.requantize_int4(
            mx.array(packed), scales, bits=4, group_size=64, src_group_size=32, stream=mx.cpu
        )
    )


def fit_case():
    packed, scales = rq.make_inputs(np.random.default_rng(7), (37, 512), 32, "bfloat16")
    return list(
        moequant.requantize_int4(
            mx.array(packed), scales, bits=3, group_size=64, src_group_size=32, fit="mse", stream=mx.cpu
        )
    )


CASES = {
    "moe_swiglu": (moe_case, "moe_swiglu.metal"),
    "requantize_int4": (requantize_case, "requantize.metal"),
    "requantize_fit": (fit_case, "requantize_fit.metal"),
}


def _signature(plan, aid):
    if aid in plan["values"]:
        v = plan["values"][aid]
        return tuple(v.shape), str(v.dtype).split(".")[-1]
    shape, dtype = plan["outputs"][aid]
    return tuple(shape), dtype


def mutations(plan):
    """(description, mutated plan) for every host-side mutation of every launch."""
    out = []
    for li, la in enumerate(plan["launches"]):
        arrays = [(i, aid) for i, (kind, aid) in sorted(la["buffers"].items()) if kind == "array"]
        pairs = [(arrays[0][0], arrays[1][0])]  # the first two buffers
        same = [
            (i, j)
            for n, (i, a) in enumerate(arrays)
            for j, b in arrays[n + 1 :]
            if a != b and _signature(plan, a) == _signature(plan, b)
        ]
        pairs += same[:1]  # and two of one shape and dtype: only the values can tell
        for i, j in pairs:
            m = copy.deepcopy(plan)
            b = m["launches"][li]["buffers"]
            b[i], b[j] = b[j], b[i]
            out.append((f"launch {li} ({la['kernel']}): buffers {i} and {j} swapped", m))
        m = copy.deepcopy(plan)
        grid = list(la["grid"])
        dim = 0 if grid[0] > 1 else 1
        grid[dim] -= 1
        m["launches"][li]["grid"] = tuple(grid)
        out.append((f"launch {li} ({la['kernel']}): grid {la['grid']} -> {tuple(grid)}", m))
        *head, last = la["kernel"].split("_")
        for wrong in (_other(last), _missing(last)):
            m = copy.deepcopy(plan)
            m["launches"][li]["kernel"] = "_".join([*head, wrong])
            out.append((f"launch {li}: kernel-name field {last} -> {wrong}", m))
    return out


def _other(field):
    """Another value of a kernel-name field that has a kernel (a different one)."""
    return {"float32": "float16", "float16": "float32", "bfloat16": "float32"}.get(
        field, f"b{3 if field != 'b3' else 4}"
    )


def _missing(field):
    """A value no kernel has."""
    return "float64" if field.startswith(("float", "bfloat")) else "b7"


def emulate(plan, metal_file):
    bufs, _ = run_plan(plan, lib_for(metal_file), schedule="random")
    return [bufs.get(aid) for aid in plan["results"]]


def matches(got, want) -> bool:
    for g, w in zip(got, want):
        if g is None or g.view(np.uint8).shape != w.view(np.uint8).shape:
            return False
        if w.dtype == np.float32 and w.ndim == 2 and g.dtype == np.float32:  # moe_swiglu's y
            if not (np.isfinite(g).all() and np.abs(g - w).max() <= 2e-6 * np.abs(w).max()):
                return False
        elif not np.array_equal(g.view(np.uint8), w.view(np.uint8)):
            return False
    return True


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    build, metal_file = CASES[request.param]
    outs = build()
    plan = metal_plan(outs)
    want = [rq.to_numpy(o) for o in outs]
    assert matches(emulate(plan, metal_file), want), "the unmutated plan must match"
    return plan, metal_file, want


def test_every_host_mutation_is_caught(case):
    plan, metal_file, want = case
    muts = mutations(plan)
    assert len(muts) >= 5 * len(plan["launches"])
    missed = []
    for what, m in muts:
        try:
            ok = matches(emulate(m, metal_file), want)
        except (MetalEmulatorError, KeyError):  # out-of-bounds access, unbound buffer, no such kernel
            ok = False
        if ok:
            missed.append(what)
    assert not missed, f"host mutations the emulated result did not notice: {missed}"
