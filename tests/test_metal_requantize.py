"""metal/requantize.metal on the Metal emulator: every host-named kernel against the
CPU op (bit-exact), under two thread schedules; mutated copies must fail; on macOS
the real GPU path is compared as well."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from metal_emulator import REPO_ROOT, MetalEmulatorError, MetalLibrary
from metal_emulator import requantize_check as rq

BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)
DTYPES = ("float32", "float16", "bfloat16")
# (rows..., K): one threadgroup; batch dims; several threadgroups with a ragged tail.
SHAPES = ((3, 256), (2, 2, 384), (37, 512))
SCHEDULE_PAIRS = (("forward", "reverse"), ("forward", "random"))


@pytest.fixture(scope="module")
def lib():
    return MetalLibrary(REPO_ROOT / "metal" / "requantize.metal")


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(1234)
    return {
        (shape, sg, src): rq.make_inputs(rng, shape, sg, src)
        for shape in SHAPES
        for sg in GROUPS
        for src in DTYPES
    }


def test_all_instantiations_present(lib):
    want = {
        rq.kernel_name(b, g, sg, s, o)
        for b in BITS
        for g in GROUPS
        for sg in GROUPS
        for s in DTYPES
        for o in DTYPES
    }
    assert set(lib.kernels) == want


@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_kernel_matches_cpu_op(lib, inputs, bits, g):
    """All 27 kernels of (bits, g) x 3 shapes, each under two schedules."""
    n = 0
    for sg in GROUPS:
        for src in DTYPES:
            for out in DTYPES:
                for k, shape in enumerate(SHAPES):
                    packed, scales = inputs[(shape, sg, src)]
                    ref = rq.cpu_reference(packed, scales, bits, g, sg, out)
                    for schedule in SCHEDULE_PAIRS[(k + n) % 2]:
                        rq.check(lib, packed, scales, bits, g, sg, src, out, schedule, seed=n, ref=ref)
                n += 1


@pytest.mark.parametrize("src", DTYPES)
def test_structured_groups(lib, src):
    """Edge-case rows (zero range, extreme codes, zero/huge/tiny/negative scales) for
    every bits x group size x output dtype, under two schedules."""
    packed, scales = rq.structured_inputs(src)
    for bits in BITS:
        for g in GROUPS:
            for k, out in enumerate(DTYPES):
                ref = rq.cpu_reference(packed, scales, bits, g, 32, out)
                for schedule in SCHEDULE_PAIRS[k % 2]:
                    rq.check(lib, packed, scales, bits, g, 32, src, out, schedule, ref=ref)


def test_small_and_kimi_shapes(lib):
    """One-group and odd rows, and stacked experts with Kimi's K (gate/up 7168, down 2048)."""
    rng = np.random.default_rng(8)
    for shape, g in (((1, 32), 32), ((13, 96), 32), ((2, 64, 7168), 64), ((2, 224, 2048), 64)):
        packed, scales = rq.make_inputs(rng, shape, 32, "bfloat16")
        for bits in (3, 4, 6) if shape[-1] > 1000 else BITS:
            ref = rq.cpu_reference(packed, scales, bits, g, 32, "bfloat16")
            for schedule in ("reverse", "random"):
                rq.check(lib, packed, scales, bits, g, 32, "bfloat16", "bfloat16", schedule, ref=ref)


def test_matches_mx_quantize_oracle(lib):
    """Ties the emulated kernel to the oracle of tests/int4_reference.py directly."""
    from int4_reference import oracle

    packed, scales = rq.make_inputs(np.random.default_rng(5), (6, 512), 32, "float16")
    want = oracle(mx.array(packed.view(np.int32)), scales, bits=4, group_size=64, src_group_size=32)
    wq, s, b, _ = rq.run_emulated(lib, packed, scales, 4, 64, 32, "float16", "float16", schedule="random")
    np.testing.assert_array_equal(wq, np.array(want[0]))
    np.testing.assert_array_equal(s, np.array(want[1]))
    np.testing.assert_array_equal(b, np.array(want[2]))


def test_bytes_moved(lib):
    """Each input byte is read twice (range pass, code pass; the second hits the cache
    on a GPU), each output byte written once, and nothing outside the tensors."""
    packed, scales = rq.make_inputs(np.random.default_rng(0), (37, 512), 32, "float32")
    *_, res = rq.run_emulated(lib, packed, scales, 4, 64, 32, "float32", "float16", count_unique=True)
    out_bytes = packed.nbytes * 4 // 4 + 2 * 2 * (37 * 512 // 64)
    assert res.unique_bytes_read == packed.nbytes + scales.nbytes
    assert res.unique_bytes_written == res.bytes_written == out_bytes
    # Every input byte is read once: the words and scales are kept in registers.
    assert res.per_buffer[0][0] == packed.nbytes
    assert res.bytes_read == res.unique_bytes_read


# ---- mutations: broken copies of the real kernel must be caught -----------------------
MUTATIONS = {
    "nibble-mask": (
        "requantize.h",
        "(words[i] >> (4 * k)) & 0xFu) - MQ_INT4_OFFSET) * s;\n      wmin",
        "(words[i] >> (4 * k)) & 0x7u) - MQ_INT4_OFFSET) * s;\n      wmin",
    ),
    "code-shift": ("requantize.h", "<< (8 * k);", "<< (8 * k + 1);"),
    "flush-shift": ("requantize.h", "acc >>= 32;", "acc >>= 31;"),
    "src-scale-index": ("requantize.h", "(ulong(g) * G) / SG;", "(ulong(g) * G) / SG + 1;"),
    "scale-per-word": ("requantize.h", "sc[i / WORDS_PER_SCALE];\n    ulong", "sc[0];\n    ulong"),
    "group-offset": ("requantize.h", "ulong(g) * (G * BITS / 32);", "ulong(g) * (G * BITS / 32) + 1;"),
    "no-tail-guard": ("requantize.h", "if (gid >= n_groups) {\n    return;\n  }", ""),
    "pack-merge": (
        "quant_math.h",
        "(x & 0xFF00FF00FF00FF00ull) >> (8 - B)",
        "(x & 0xFF00FF00FF00FF00ull) >> (9 - B)",
    ),
}
# Configurations the mutated copy is compiled for (only these, to keep builds short).
MUTATION_CONFIGS = (
    (4, 64, 32, "float32", "float32"),
    (3, 32, 64, "bfloat16", "float16"),
    (6, 128, 128, "float16", "bfloat16"),
)


def mutated_metal_dir(tmp_path: Path, file: str, old: str, new: str) -> Path:
    d = tmp_path / "metal"
    shutil.copytree(REPO_ROOT / "metal", d)
    text = (d / file).read_text()
    assert old in text, f"mutation target not found in {file}: {old!r}"
    (d / file).write_text(text.replace(old, new))
    return d


def run_suite_on(lib, inputs_):
    for bits, g, sg, src, out in MUTATION_CONFIGS:
        packed, scales = inputs_[(sg, src)]
        ref = rq.cpu_reference(packed, scales, bits, g, sg, out)
        for schedule in ("forward", "reverse", "random"):
            rq.check(lib, packed, scales, bits, g, sg, src, out, schedule, ref=ref)


@pytest.fixture(scope="module")
def mutation_inputs():
    rng = np.random.default_rng(99)
    return {(sg, src): rq.make_inputs(rng, (37, 512), sg, src) for _, _, sg, src, _ in MUTATION_CONFIGS}


def _only():
    return [rq.kernel_name(*c) for c in MUTATION_CONFIGS]


def test_unmutated_copy_passes(tmp_path, mutation_inputs):
    """The control: the copying and the reduced build do not break the kernel."""
    d = mutated_metal_dir(tmp_path, "requantize.h", "#pragma once", "#pragma once")
    run_suite_on(MetalLibrary(d / "requantize.metal", only=_only(), cache=tmp_path), mutation_inputs)


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_mutation_is_caught(tmp_path, mutation_inputs, mutation):
    d = mutated_metal_dir(tmp_path, *MUTATIONS[mutation])
    lib = MetalLibrary(d / "requantize.metal", only=_only(), cache=tmp_path)
    with pytest.raises((AssertionError, MetalEmulatorError)) as e:
        run_suite_on(lib, mutation_inputs)
    if mutation in ("no-tail-guard", "group-offset"):
        assert "out-of-bounds" in str(e.value)


# ---- the real Metal path --------------------------------------------------------------
ON_METAL = sys.platform == "darwin" and mx.metal.is_available()


@pytest.mark.skipif(
    not ON_METAL, reason="needs macOS with a Metal GPU; on Linux the kernels run only on the emulator"
)
@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_gpu_matches_cpu_op_and_emulator(lib, inputs, bits, g):
    """The real Metal path (stream=mx.gpu) for the same kernels and shapes as the
    emulator sweep: bit-exact against the CPU op, and so against the emulator."""
    import moequant

    for sg in GROUPS:
        for src in DTYPES:
            for out in DTYPES:
                dt = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}[out]
                for shape in SHAPES:
                    packed, scales = inputs[(shape, sg, src)]
                    gpu = moequant.requantize_int4(
                        mx.array(packed),
                        scales,
                        bits=bits,
                        group_size=g,
                        src_group_size=sg,
                        dtype=dt,
                        stream=mx.gpu,
                    )
                    cpu = rq.cpu_reference(packed, scales, bits, g, sg, out)
                    emu = rq.run_emulated(lib, packed, scales, bits, g, sg, src, out)
                    for a, b, c in zip(gpu, cpu, emu):
                        np.testing.assert_array_equal(rq.to_numpy(a), b)
                        np.testing.assert_array_equal(c, b)


# ---- inexact division on the GPU -------------------------------------------------------
# Metal promises a correctly rounded x / y only without fast math (<= 2.5 ulp with it);
# quant_math.h's mq_div_rn corrects any quotient within a few ulps to the IEEE one. In
# the emulator's inexact-division mode every divide() is off by up to 3 ulps.
DIV_CONFIGS = (
    (2, 64, 32, "bfloat16", "bfloat16"),
    (3, 64, 32, "bfloat16", "bfloat16"),
    (4, 32, 128, "float32", "float16"),
    (5, 128, 32, "float16", "float32"),
    (6, 64, 64, "bfloat16", "bfloat16"),
    (8, 128, 128, "float32", "bfloat16"),
)


def _div_suite(lib, configs=DIV_CONFIGS):
    rng = np.random.default_rng(31)
    for bits, g, sg, src, out in configs:
        cases = [rq.make_inputs(rng, (37, 512), sg, src)]
        if sg == 32:
            cases.append(rq.structured_inputs(src))
        for packed, scales in cases:
            rq.check(lib, packed, scales, bits, g, sg, src, out, "forward")


def test_exact_codes_with_inexact_division(tmp_path):
    lib = MetalLibrary(
        REPO_ROOT / "metal" / "requantize.metal",
        div_ulps=3,
        cache=tmp_path,
        only=[rq.kernel_name(*c) for c in DIV_CONFIGS],
    )
    _div_suite(lib)


def test_inexact_division_mode_has_teeth(tmp_path):
    """The control: without the correction the same inexact divides change codes."""
    d = mutated_metal_dir(
        tmp_path,
        "quant_math.h",
        "#define MQ_DIV(a, b) mq_div_rn((a), (b))",
        "#define MQ_DIV(a, b) metal::precise::divide((a), (b))",
    )
    lib = MetalLibrary(
        d / "requantize.metal", div_ulps=3, cache=tmp_path, only=[rq.kernel_name(*c) for c in DIV_CONFIGS]
    )
    with pytest.raises(AssertionError, match="differs from the CPU op"):
        _div_suite(lib)


def test_div_rn_is_ieee_division_under_inexact_divide(tmp_path):
    """mq_div_rn itself, with every divide() off by up to 3 ulps: bit-equal to IEEE
    float32 division (numpy) over quotients spanning 2^-60..2^60, both signs, exact
    quotients and the operand magnitudes requantization meets."""
    rng = np.random.default_rng(17)
    n = 1 << 15
    a = (rng.standard_normal(n) * 2.0 ** rng.integers(-30, 30, n)).astype(np.float32)
    b = (rng.standard_normal(n) * 2.0 ** rng.integers(-30, 30, n)).astype(np.float32)
    a[:64] = np.arange(64, dtype=np.float32) * 3  # exact quotients
    b[:64] = 3.0
    a[64:128] = rng.integers(-255, 256, 64).astype(np.float32) * np.float32(0.0123)
    b[64:128] = np.float32(0.0123)  # code-like quotients near integers
    b[b == 0] = 1.0
    out = np.empty_like(a)
    lib = MetalLibrary(
        REPO_ROOT / "tests" / "metal_emulator" / "kernels" / "div_check.metal",
        include_dirs=[REPO_ROOT / "metal"],
        div_ulps=3,
        cache=tmp_path,
    )
    lib.run(
        "div_rn",
        buffers={0: a, 1: b, 2: out, 3: np.uint32(n)},
        grid=(n // 256, 1, 1),
        threadgroup=(256, 1, 1),
    )
    want = a / b
    bad = np.flatnonzero(out.view(np.uint32) != want.view(np.uint32))
    assert bad.size == 0, (bad.size, a[bad[:3]], b[bad[:3]], out[bad[:3]], want[bad[:3]])
