"""metal/requantize_fit.metal on the Metal emulator: every kernel against the CPU op
(bit-exact) for every bits x group size x source group size, importance, structured
rows, two schedules; a mutated copy must fail."""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest

import moequant
from int4_reference import MX_DTYPES, pack_int4
from metal_emulator import REPO_ROOT, MetalLibrary
from metal_emulator import requantize_check as rq
from metal_emulator import requantize_fit_check as fc
from moequant.testing import fit_reference as fr

DTYPES = ("float32", "float16", "bfloat16")


@pytest.fixture(scope="module")
def lib():
    return MetalLibrary(REPO_ROOT / "metal" / "requantize_fit.metal")


def test_all_instantiations_present(lib):
    want = {f"{k}_{s}_{o}" for k in ("requantize_fit_int4", "quantize_fit") for s in DTYPES for o in DTYPES}
    assert set(lib.kernels) == want


def cpu_int4(packed, scales, h, bits, g, sg, out):
    return moequant.requantize_int4(
        mx.array(packed),
        scales,
        bits=bits,
        group_size=g,
        src_group_size=sg,
        dtype=MX_DTYPES[out],
        fit="mse",
        importance=None if h is None else mx.array(h),
        stream=mx.cpu,
    )


@pytest.mark.parametrize("src", DTYPES)
def test_int4_kernels_match_cpu(lib, src):
    rng = np.random.default_rng(len(src))
    n = 0
    for bits in (2, 3, 4, 5, 6, 8):
        for g in (32, 64, 128):
            sg = (32, 64, 128)[n % 3]
            out = DTYPES[n % 3]
            q, s = fr.kimi_like_int4(rng, 3, 256, codes=("flat", "gaussian", "laplace")[n % 3], sg=sg)
            packed = pack_int4(q)
            scales = mx.array(s).astype(MX_DTYPES[src])
            h = rng.random(256).astype(np.float32) if n % 4 == 0 else None
            want = cpu_int4(packed, scales, h, bits, g, sg, out)
            got = fc.run_int4(
                lib,
                packed,
                rq.to_numpy(scales),
                h,
                bits,
                g,
                sg,
                src,
                out,
                schedule=("forward", "random")[n % 2],
                seed=n,
            )
            fc.assert_equal(f"int4 b{bits} g{g} sg{sg} {src}->{out}", got[:3], want)
            n += 1


def test_int4_structured_rows(lib):
    packed, scales = rq.structured_inputs("float32")
    for bits in (3, 4, 8):
        for out in DTYPES:
            want = cpu_int4(packed, scales, None, bits, 64, 32, out)
            got = fc.run_int4(
                lib, packed, rq.to_numpy(scales), None, bits, 64, 32, "float32", out, schedule="reverse"
            )
            fc.assert_equal(f"structured b{bits} {out}", got[:3], want)


@pytest.mark.parametrize("src", DTYPES)
def test_float_kernels_match_cpu(lib, src):
    rng = np.random.default_rng(3)
    w = mx.array((rng.standard_normal((3, 256)) * 0.02).astype(np.float32)).astype(MX_DTYPES[src])
    for k, (bits, g) in enumerate(((3, 64), (4, 128), (2, 32), (6, 64))):
        out = DTYPES[k % 3]
        h = rng.random(256).astype(np.float32) if k % 2 else None
        want = moequant.quantize(
            w, bits=bits, group_size=g, dtype=MX_DTYPES[out], importance=h, stream=mx.cpu
        )
        got = fc.run_float(lib, rq.to_numpy(w), h, bits, g, src, out)
        fc.assert_equal(f"float b{bits} g{g} {src}->{out}", got[:3], want)


def test_mutation_is_caught(tmp_path):
    """A copy whose candidate grid step is 0.07 instead of 0.08 must disagree."""
    for f in ("requantize_fit.metal", "requantize_fit.h", "requantize_fit_launch.h", "quant_math.h"):
        shutil.copy(REPO_ROOT / "metal" / f, tmp_path / f)
    h = tmp_path / "requantize_fit.h"
    text = h.read_text()
    assert "#define MQ_FIT_GRID_STEP 0.08f" in text
    h.write_text(text.replace("#define MQ_FIT_GRID_STEP 0.08f", "#define MQ_FIT_GRID_STEP 0.07f"))
    bad = MetalLibrary(tmp_path / "requantize_fit.metal", only=["requantize_fit_int4_bfloat16_bfloat16"])
    rng = np.random.default_rng(0)
    q, s = fr.kimi_like_int4(rng, 8, 512)
    packed = pack_int4(q)
    scales = mx.array(s).astype(mx.bfloat16)
    want = cpu_int4(packed, scales, None, 3, 64, 32, "bfloat16")
    got = fc.run_int4(bad, packed, rq.to_numpy(scales), None, 3, 64, 32, "bfloat16", "bfloat16")
    with pytest.raises(AssertionError):
        fc.assert_equal("mutant", got[:3], want)
