"""requantize_int4 against its oracle: mx.quantize (CPU) of the exact float32
dequantization, bit for bit, plus the compressed-tensors packing rules."""

import itertools

import mlx.core as mx
import numpy as np
import pytest

import moequant
from int4_reference import MX_DTYPES, oracle, pack_int4, random_int4, unpack_int4

BITS = [2, 3, 4, 5, 6, 8]
GROUPS = [32, 64, 128]
SCALE_DTYPES = ["float32", "float16", "bfloat16"]


def assert_same(ours, ref):
    """Zero mismatching words, scales or biases (bit patterns, so -0/NaN count)."""
    for name, a, b in zip(("wq", "scales", "biases"), ours, ref):
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{name}: shape {a.shape} != {b.shape}"
        view = {mx.float32: mx.uint32, mx.float16: mx.uint16, mx.bfloat16: mx.uint16}
        a_bits = np.array(a.view(view.get(a.dtype, a.dtype)))
        b_bits = np.array(b.view(view.get(b.dtype, b.dtype)))
        bad = int((a_bits != b_bits).sum())
        assert bad == 0, f"{name}: {bad} of {a_bits.size} differ"


def check(packed, scales, **kw):
    ours = moequant.requantize_int4(packed, scales, **kw)
    assert_same(ours, oracle(packed, scales, **kw))
    return ours


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_sweep_bits_groups_dtypes(bits, group_size, scale_dtype):
    rng = np.random.default_rng(bits * 1000 + group_size)
    packed, scales = random_int4(rng, (17,), 512, 32, scale_dtype)
    check(packed, scales, bits=bits, group_size=group_size, src_group_size=32)


@pytest.mark.parametrize("src_group_size", GROUPS)
@pytest.mark.parametrize("group_size", GROUPS)
def test_source_group_sizes(group_size, src_group_size):
    rng = np.random.default_rng(7)
    packed, scales = random_int4(rng, (9,), 384, src_group_size, "bfloat16")
    for bits in (3, 4, 6):
        check(packed, scales, bits=bits, group_size=group_size, src_group_size=src_group_size)


@pytest.mark.parametrize("out_dtype", SCALE_DTYPES)
def test_output_dtype_rounds_float32_params(out_dtype):
    rng = np.random.default_rng(3)
    packed, scales = random_int4(rng, (33,), 256, 32, "float32")
    wq, s, b = check(packed, scales, bits=3, group_size=64, dtype=MX_DTYPES[out_dtype])
    assert s.dtype == MX_DTYPES[out_dtype] and b.dtype == MX_DTYPES[out_dtype]


def test_stacked_experts_kimi_shapes():
    # A few Kimi experts: gate/up (E, 2048, 7168) and down (E, 7168, 2048) layouts.
    rng = np.random.default_rng(11)
    for rows, K in ((256, 7168), (7168 // 8, 2048)):
        packed, scales = random_int4(rng, (3, rows), K, 32, "bfloat16")
        for bits in (3, 4, 6):
            wq, s, b = check(packed, scales, bits=bits, group_size=64)
            assert wq.shape == (3, rows, K * bits // 32)
            assert s.shape == (3, rows, K // 64)


def test_odd_rows_and_one_group_rows():
    rng = np.random.default_rng(5)
    for rows, K, g in ((1, 32, 32), (3, 64, 64), (7, 128, 128), (13, 96, 32)):
        packed, scales = random_int4(rng, (rows,), K, 32, "bfloat16")
        for bits in BITS:
            check(packed, scales, bits=bits, group_size=g)


def _from_codes(q, s, src_group_size=32, scale_dtype="float32"):
    return mx.array(pack_int4(q)), mx.array(np.asarray(s, np.float32)).astype(MX_DTYPES[scale_dtype])


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_structured_groups(scale_dtype):
    """Constant groups, all -8, all +7, zero scales, huge and tiny scales, sign flips."""
    K = 128
    rows_q, rows_s = [], []
    rng = np.random.default_rng(1)

    def add(q_row, s_row):
        rows_q.append(np.asarray(q_row, np.int8))
        rows_s.append(np.asarray(s_row, np.float32))

    ones = np.ones(K // 32, np.float32)
    add(np.full(K, 3), ones * 0.01)  # constant positive
    add(np.full(K, -5), ones * 0.01)  # constant negative
    add(np.zeros(K), ones * 0.02)  # all zero
    add(np.full(K, -8), ones * 0.03)  # all -8
    add(np.full(K, 7), ones * 0.03)  # all +7
    add(np.full(K, 7), ones * 1e4)  # constant, edge / eps = 7e11: rint of a huge value
    add(np.full(K, -3), ones * 3.0)  # constant, edge / eps = 9e7, just over 2^23 * 10
    add(rng.integers(-8, 8, K), ones * 0.0)  # zero scales
    add(rng.integers(-8, 8, K), ones * 1e4)  # huge (f16 max is 65504)
    add(rng.integers(-8, 8, K), ones * 1e-6)  # tiny: range below eps
    add(rng.integers(-8, 8, K), ones * -0.01)  # negative scales
    add(rng.integers(-8, 8, K), np.array([0.01, 0.0, 0.5, 1e-5], np.float32))  # mixed
    add(np.tile([-8, 7], K // 2), ones * 0.02)  # extremes only
    add(np.r_[np.full(K // 2, -8), np.full(K // 2, 7)], ones * 0.02)  # |min| > |max| edge
    q = np.stack(rows_q)
    s = np.stack(rows_s)
    if scale_dtype == "float32":
        # Beyond float16/bfloat16 precision: products that are inexact in float32.
        q = np.concatenate([q, rng.integers(-8, 8, (2, K)).astype(np.int8)])
        s = np.concatenate([s, [ones * 1e30, ones * np.float32(0.0123456789)]])
    packed, scales = _from_codes(q, s, scale_dtype=scale_dtype)
    for bits in BITS:
        for g in GROUPS:
            check(packed, scales, bits=bits, group_size=g)


def test_non_contiguous_inputs():
    rng = np.random.default_rng(9)
    packed, scales = random_int4(rng, (16, 4), 256, 32, "bfloat16")
    # Transposed leading axes and a strided slice: both non-contiguous views.
    p_t, s_t = mx.swapaxes(packed, 0, 1), mx.swapaxes(scales, 0, 1)
    check(p_t, s_t, bits=3, group_size=64)
    check(packed[::2], scales[::2], bits=6, group_size=32)
    # uint32 words are accepted as they are.
    check(packed.view(mx.uint32), scales, bits=4, group_size=128)


def test_evaluated_views_into_a_larger_buffer_are_read_in_place():
    # convert hands requantize_int4 evaluated views into its read buffers; mx.contiguous
    # copied every such view whole (a buffer larger than the view), a second copy of
    # each piece in fresh pages. The output must not change, and no input copy is made.
    rng = np.random.default_rng(12)
    packed, scales = random_int4(rng, (512,), 1024, 32, "bfloat16")
    big_p = mx.concatenate([packed, packed[:64]]).view(mx.uint32)
    big_s = mx.concatenate([scales, scales[:256]])
    p, s = big_p[:512], big_s[:512]
    mx.eval(p, s)
    ref = oracle(packed, scales, bits=2, group_size=64)
    mx.eval(ref)
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    ours = moequant.requantize_int4(p, s, bits=2, group_size=64)
    mx.eval(ours)
    grown = mx.get_peak_memory() - base
    out_bytes = sum(a.nbytes for a in ours)
    assert grown < out_bytes + p.nbytes // 2, f"{grown} bytes allocated for {out_bytes} of output"
    assert_same(ours, ref)


def test_packing_known_answers():
    # compressed-tensors rules: u = q + 8, element i of a word at bits 4i.
    assert pack_int4(np.arange(-8, 0))[0] == 0x76543210
    assert pack_int4(np.arange(0, 8)).view(np.uint32)[0] == 0xFEDCBA98
    assert pack_int4(np.array([-4, -4, -1, -2, 3, 2, -1, -7]))[0] == 0x17AB6744
    q = np.random.default_rng(0).integers(-8, 8, (4, 64)).astype(np.int8)
    assert np.array_equal(unpack_int4(pack_int4(q)), q)
    # The package's own packer agrees with this reference.
    assert np.array_equal(moequant.int4.pack(q), pack_int4(q))
    assert np.array_equal(moequant.int4.unpack(pack_int4(q)), q)


def test_output_words_known_answer():
    """Hand-computed MLX words: a group of 32 codes 0..7 repeating at 3-bit, from an
    INT4 group q = u - 8 for u = 0..7 with scale 1, lies exactly on the grid."""
    u = np.tile(np.arange(8), 4)  # 32 values 0..7
    q = (u - 8).astype(np.int8)
    packed, scales = _from_codes(q[None, :], np.ones((1, 1)))
    wq, s, b = moequant.requantize_int4(packed, scales, bits=3, group_size=32)
    # w = u - 8 in [-8, -1]: |min| > |max| so scale = 7/7 = 1 -> q0 = rint(-8/1) = -8,
    # scale = -8/-8 = 1, bias = -8: codes are exactly u.
    assert float(s[0, 0]) == 1.0 and float(b[0, 0]) == -8.0
    stream = 0
    for i, c in enumerate(u):
        stream |= int(c) << (3 * i)
    want = [(stream >> (32 * j)) & 0xFFFFFFFF for j in range(3)]
    assert np.array(wq)[0].tolist() == want
    # Codes 0..7 at bits 0,3,...,21 of word 0: 0o76543210 = 0xFAC688.
    assert want[0] & 0xFFFFFF == 0xFAC688


def test_randomized_shapes():
    rng = np.random.default_rng(2024)
    for _ in range(25):
        ndim_lead = int(rng.integers(1, 4))
        lead = tuple(int(x) for x in rng.integers(1, 5, ndim_lead))
        g = int(rng.choice(GROUPS))
        sg = int(rng.choice(GROUPS))
        K = int(np.lcm(g, sg) * rng.integers(1, 4))
        bits = int(rng.choice(BITS))
        sd = str(rng.choice(SCALE_DTYPES))
        packed, scales = random_int4(rng, lead, K, sg, sd, scale=float(10 ** rng.uniform(-4, 1)))
        check(packed, scales, bits=bits, group_size=g, src_group_size=sg)


def test_threads_do_not_change_results():
    rng = np.random.default_rng(4)
    packed, scales = random_int4(rng, (300,), 1024, 32, "bfloat16")
    moequant.set_num_threads(0)
    old = moequant.get_num_threads()
    try:
        moequant.set_num_threads(1)
        one = moequant.requantize_int4(packed, scales, bits=3)
        mx.eval(one)
        moequant.set_num_threads(4)
        assert moequant.get_num_threads() == 4
        four = moequant.requantize_int4(packed, scales, bits=3)
        assert_same(four, one)
    finally:
        moequant.set_num_threads(0)
    assert moequant.get_num_threads() == old


def test_inside_compile_and_lazy_graph():
    rng = np.random.default_rng(6)
    packed, scales = random_int4(rng, (8,), 256, 32, "bfloat16")
    f = mx.compile(lambda p, s: moequant.requantize_int4(p, s, bits=4, group_size=64))
    assert_same(f(packed, scales), oracle(packed, scales, bits=4, group_size=64, src_group_size=32))


# --- bad input: a ValueError naming the argument, raised when the op is built --------


def _ok():
    rng = np.random.default_rng(0)
    return random_int4(rng, (4,), 256, 32, "bfloat16")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=7), "bits"),
        (dict(bits=1), "bits"),
        (dict(bits=3, group_size=16), "group_size"),
        (dict(bits=3, group_size=256), "group_size"),
        (dict(bits=3, src_group_size=48), "src_group_size"),
        (dict(bits=3, dtype=mx.int32), "dtype"),
    ],
)
def test_bad_arguments(kwargs, match):
    packed, scales = _ok()
    with pytest.raises(ValueError, match=match):
        moequant.requantize_int4(packed, scales, **kwargs)


def test_bad_inputs():
    packed, scales = _ok()
    with pytest.raises(ValueError, match="packed must be int32 or uint32"):
        moequant.requantize_int4(packed.astype(mx.float32), scales, bits=3)
    with pytest.raises(ValueError, match="packed must be int32 or uint32"):
        moequant.requantize_int4(packed.astype(mx.int16), scales, bits=3)
    with pytest.raises(ValueError, match="scales must be float32, float16 or bfloat16"):
        moequant.requantize_int4(packed, scales.astype(mx.int32), bits=3)
    with pytest.raises(ValueError, match="scales must have shape"):
        moequant.requantize_int4(packed, scales[:, :-1], bits=3)
    with pytest.raises(ValueError, match="scales must have shape"):
        moequant.requantize_int4(packed, scales[:2], bits=3)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        moequant.requantize_int4(packed[0], scales[0], bits=3)
    # K = 8 * 20 = 160: divisible by 32 but not by 64.
    p = mx.zeros((2, 20), mx.int32)
    with pytest.raises(ValueError, match="not divisible by group_size"):
        moequant.requantize_int4(p, mx.ones((2, 5), mx.bfloat16), bits=3, group_size=64)
    with pytest.raises(ValueError, match="not divisible by src_group_size"):
        moequant.requantize_int4(p, mx.ones((2, 2), mx.bfloat16), bits=3, src_group_size=64)
    with pytest.raises(ValueError, match="empty last axis"):
        moequant.requantize_int4(mx.zeros((2, 0), mx.int32), mx.zeros((2, 0)), bits=3)
    with pytest.raises(TypeError):
        moequant.requantize_int4(np.zeros((2, 8), np.int32), scales, bits=3)


def test_rows_longer_than_an_int_refused_at_build():
    # K = 8 * 2^28 = 2^31 does not fit the kernels' int K; nothing is evaluated (lazy zeros).
    packed = mx.zeros((1, 2**28), mx.uint32)
    scales = mx.zeros((1, 2**31 // 32), mx.bfloat16)
    with pytest.raises(ValueError, match="rows of 2147483648 weights are too long"):
        moequant.requantize_int4(packed, scales, bits=4)


@pytest.mark.skipif(moequant.has_metal, reason="only meaningful on builds without Metal")
def test_gpu_stream_without_metal_is_a_clear_error():
    packed, scales = _ok()
    with pytest.raises((RuntimeError, ValueError)):
        mx.eval(moequant.requantize_int4(packed, scales, bits=3, stream=mx.gpu))


@pytest.mark.skipif(not moequant.has_metal, reason="needs a macOS build with Metal and an Apple GPU")
@pytest.mark.parametrize("bits, group_size", list(itertools.product(BITS, GROUPS)))
def test_gpu_matches_cpu(bits, group_size):
    rng = np.random.default_rng(bits + group_size)
    packed, scales = random_int4(rng, (3, 64), 1024, 32, "bfloat16")
    gpu = moequant.requantize_int4(packed, scales, bits=bits, group_size=group_size, stream=mx.gpu)
    cpu = moequant.requantize_int4(packed, scales, bits=bits, group_size=group_size, stream=mx.cpu)
    assert_same(gpu, cpu)


# ---- quantize_minmax: mx.quantize of float weights, bit for bit, on every core


def _minmax_oracle(w, bits, group_size):
    return mx.quantize(w, group_size=group_size, bits=bits, stream=mx.cpu)


def _special_rows(rng, K):
    """Groups MLX's rule treats specially: constant, zero (both signs), one huge or tiny
    value, NaN and infinities among finite weights, all NaN, ties at the edges."""
    rows = [
        np.full(K, 0.25),
        np.zeros(K),
        -np.zeros(K),
        np.where(np.arange(K) % 2, 0.0, -0.0),
        rng.normal(size=K) * 1e-30,
        rng.normal(size=K) * 1e30,
        np.where(np.arange(K) % 7 == 0, np.nan, rng.normal(size=K)),
        np.where(np.arange(K) % 5 == 0, np.inf, rng.normal(size=K)),
        np.where(np.arange(K) % 9 == 0, -np.inf, rng.normal(size=K)),
        np.full(K, np.nan),
        np.tile([-1.0, 1.0], K // 2),
        np.tile([-1.0, 0.5], K // 2),
        rng.integers(-8, 8, size=K) * 0.0625,
    ]
    return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_quantize_minmax_is_mx_quantize(bits, group_size, dtype):
    rng = np.random.default_rng(bits * 100 + group_size)
    K = 256
    w = np.concatenate(
        [rng.normal(size=(37, K)) * rng.lognormal(size=(37, 1)), _special_rows(rng, K)]
    ).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        w = mx.array(w).astype(MX_DTYPES[dtype])
    assert_same(
        moequant._ext.quantize_minmax(w, bits=bits, group_size=group_size, stream=mx.cpu),
        _minmax_oracle(w, bits, group_size),
    )


def test_quantize_minmax_threads_views_and_shapes():
    rng = np.random.default_rng(21)
    w = mx.array(rng.normal(size=(3, 300, 512)).astype(np.float32)).astype(mx.bfloat16)
    ref = _minmax_oracle(w, 6, 64)
    try:
        for n in (1, 2, 3):
            moequant.set_num_threads(n)
            assert_same(moequant._ext.quantize_minmax(w, bits=6, group_size=64, stream=mx.cpu), ref)
    finally:
        moequant.set_num_threads(0)
    # A transposed (non-contiguous) input and an evaluated view into a larger buffer,
    # read in place.
    wt = mx.swapaxes(w, 0, 1)
    assert_same(
        moequant._ext.quantize_minmax(wt, bits=3, group_size=32, stream=mx.cpu), _minmax_oracle(wt, 3, 32)
    )
    big = w.reshape(-1, 512)
    view = big[:800]
    mx.eval(view)
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    ours = moequant._ext.quantize_minmax(view, bits=4, group_size=128, stream=mx.cpu)
    mx.eval(ours)
    assert mx.get_peak_memory() - base < sum(a.nbytes for a in ours) + view.nbytes // 2
    assert_same(ours, _minmax_oracle(view, 4, 128))


def test_quantize_minmax_bad_arguments():
    w = mx.zeros((4, 64), mx.bfloat16)
    with pytest.raises(ValueError, match="bits"):
        moequant._ext.quantize_minmax(w, bits=7, group_size=64, stream=mx.cpu)
    with pytest.raises(ValueError, match="divisible by group_size"):
        moequant._ext.quantize_minmax(w[:, :48], bits=4, group_size=32, stream=mx.cpu)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        moequant._ext.quantize_minmax(mx.zeros((4, 64), mx.int32), bits=4, stream=mx.cpu)
    with pytest.raises((RuntimeError, ValueError)):  # CPU streams only
        mx.eval(moequant._ext.quantize_minmax(w, bits=4, stream=mx.gpu))
