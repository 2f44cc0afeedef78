"""numpy reference of the error-optimal affine fit (``fit="mse"``).

This file defines the arithmetic of the fit: every step is an IEEE float32 operation
(no fused multiply-add, true division, rint = round half to even) in a fixed order, so
the C++ kernels (scalar, AVX2, every thread count) and the Metal kernel reproduce it bit
for bit. numpy float32 ops are single roundings, so this code *is* the arithmetic,
vectorized over groups. float64 is used only by the oracles (``sq_error``).

A group is a list of slots (value v_j, weight c_j, present p_j): for a float input one
slot per weight (c = 1 or its importance); for an INT4 input one slot per
(source block of 32, nibble u) in that order, v = (u - 8) * scale, c = the number of
weights with that nibble (or the sum of their importances), p = c's count > 0. The
objective is sum_j c_j (v_j - w_hat_j)^2 for w_hat exactly what ``mx.dequantize``
computes on the CPU from the stored values: round_T(round_T(q * scale) + bias).
Every sum runs over the *weighted* slots (c > 0) in slot order: the others add nothing
(or a NaN from an absent nibble whose value overflowed), so kernels compact them away.

Steps (``fit_groups``):
 1. min-max: MLX's own parameters and codes (``mx.quantize``), its error E_mm.
 2. t = (v - min) * (1 / R) in [0, 1]. Candidate ranges lo = a, hi = 1 - b for a, b on
    a 4 x 4 grid whose window depends on the bits (``grid(bits)``); codes q = clamp(rint((t - lo) * (1 / s))), s = (hi - lo) / n;
    the 2x2 least squares for (scale, bias) given q and its error in closed form.
 3. Lloyd from the ``STARTS`` best candidates (stable order): re-assign codes
    with the fitted (scale, bias), re-solve, until the code statistics stop changing or
    ``LLOYD_CAP`` rounds; the best error seen wins (ties: earlier start).
 4. Back to weight units, rounded to the output dtype T (s0, b0); with s1, b1 the T
    values next to them on the other side of the exact scale and bias (below when
    exact), the 4 pairs (s0, b0), (s0, b1), (s1, b0), (s1, b1) (the 3 x 3 neighbours
    of s0, b0 gained 0.1-0.5 % more error reduction for 2.25x the cost), codes
    re-assigned for each, the exact
    reconstruction error of each (summed in 8 interleaved partial sums over the
    weighted slots, the i-th weighted slot into sum i % 8, combined as
    ((0+1)+(2+3))+((4+5)+(6+7))).
 5. The fit replaces min-max only if its error is below E_mm - E_mm * 2^-12: float32
    sums of non-negative terms are within ~n * 2^-23 relative of the exact sum, so the
    chosen group is never worse than ``mx.quantize`` in exact arithmetic either.
"""

from __future__ import annotations

import numpy as np

f32 = np.float32

GRID = 4  # candidates per axis
# a, b = (i - 2) * 0.08 for i in first(bits) + 0..3; negative widens. The best candidate
# of the former 6 x 6 grid (i in 0..5) lies in i = 2..5 at 2 bits, 1..4 at 3 bits and
# 0..3 from 4 bits on (wider ranges line up with the source's code grid), so this window
# of 16 candidates gives the same error as the 36 (bench_requant.py --error-table).
GRID_STEP = f32(0.08)
GRID_OFFSET = 2
STARTS = 4
# A third Lloyd round lowered the error ratio by 0.0001-0.0018 at 3-4 bits, up to 0.017 at
# 5-6 bits (bench/RESULTS.md, issue 13 session 5).
LLOYD_CAP = 2
PAIRS = 4  # step 4: (scale, bias) pairs with exact errors, 2 x 2
ACCEPT = f32(2.0**-12)
EPS = f32(1e-7)

DTYPES = ("float32", "float16", "bfloat16")


def grid_first(bits):
    """First grid index of the window at this bit width."""
    return 2 if bits <= 2 else 1 if bits == 3 else 0


def grid(bits):
    """Candidate (a, b) pairs, a-major, as float32: a = float32(i - 2) * 0.08f for
    i = grid_first(bits) + 0..GRID-1."""
    ax = (np.arange(GRID, dtype=f32) + f32(grid_first(bits)) - f32(GRID_OFFSET)) * GRID_STEP
    a = np.repeat(ax, GRID)
    b = np.tile(ax, GRID)
    return a, b


# --- rounding to the output dtype -------------------------------------------------


def round_t(x, dtype):
    """float32 -> nearest T (ties to even) -> float32."""
    x = np.asarray(x, f32)
    if dtype == "float32":
        return x
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(f32)
    b = x.view(np.uint32)
    r = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    nan = np.isnan(x)
    r = np.where(nan, (b | np.uint32(0x00400000)) & np.uint32(0xFFFF0000), r)
    return r.astype(np.uint32).view(f32)


def step_t(x, d, dtype):
    """The T value next to x (already a T value) towards +inf (d = 1) or -inf (d = -1)."""
    x = np.asarray(x, f32)
    if d == 0:
        return x
    if dtype == "float32":
        bits, one, sign, ut = x.view(np.uint32).astype(np.int64), 1, 0x80000000, np.uint32
    elif dtype == "float16":
        bits, one, sign, ut = x.astype(np.float16).view(np.uint16).astype(np.int64), 1, 0x8000, np.uint16
    else:
        bits, one, sign, ut = (x.view(np.uint32) >> 16).astype(np.int64), 1, 0x8000, np.uint16
    zero = (bits & ~sign) == 0
    away = (x > 0) == (d > 0)  # moving away from zero: magnitude + 1
    nb = np.where(zero, np.where(d > 0, one, sign | one), np.where(away, bits + 1, bits - 1))
    nb = nb.astype(ut)
    if dtype == "float32":
        return nb.view(f32)
    if dtype == "float16":
        return nb.view(np.float16).astype(f32)
    return (nb.astype(np.uint32) << np.uint32(16)).view(f32)


# --- MLX's min-max rule ------------------------------------------------------------


def affine_params(wmin, wmax, n_bins):
    """mq_affine_params (metal/quant_math.h), vectorized."""
    with np.errstate(all="ignore"):
        neg = np.abs(wmin) > np.abs(wmax)
        s = (wmax - wmin) / f32(n_bins)
        s = np.where(s < EPS, EPS, s).astype(f32)
        s = np.where(neg, s, -s).astype(f32)
        edge = np.where(neg, wmin, wmax).astype(f32)
        q0 = np.rint(edge / s).astype(f32)
        nz = q0 != 0
        scale = np.where(nz, edge / np.where(nz, q0, f32(1)), s).astype(f32)
        bias = np.where(nz, edge, f32(0)).astype(f32)
    return scale, bias


def clamp_codes(x, n_bins):
    """clamp(x, 0, n) as `x < 0 ? 0 : x`, then `x > n ? n : x` (NaN -> NaN)."""
    x = np.where(x < 0, f32(0), x)
    return np.where(x > f32(n_bins), f32(n_bins), x).astype(f32)


def reconstruct(q, s, b, dtype):
    return round_t(round_t(q * s[..., None], dtype) + b[..., None], dtype)


def striped_error(v, c, q, s, b, dtype):
    """sum_j c_j (v_j - w_hat_j)^2 over the weighted slots (c > 0), the i-th of them
    into partial sum i % 8, in the fixed order of step 4 (float32); (N, n) slots."""
    with np.errstate(all="ignore"):
        d = reconstruct(q, s, b, dtype)
        r = (v - d).astype(f32)
        t = (c * (r * r)).astype(f32)
    N, n = v.shape
    keep = c > 0
    lane = np.cumsum(keep, axis=1) - 1  # index among the weighted slots
    acc = np.zeros((N, 8), f32)
    rows = np.arange(N)
    for j in range(n):
        k = lane[:, j] % 8
        acc[rows, k] = np.where(keep[:, j], acc[rows, k] + t[:, j], acc[rows, k])
    return ((acc[..., 0] + acc[..., 1]) + (acc[..., 2] + acc[..., 3])) + (
        (acc[..., 4] + acc[..., 5]) + (acc[..., 6] + acc[..., 7])
    )


# --- the fit -------------------------------------------------------------------------


def _stats(t, c, ct, q, w):
    """S1 = sum c q, S2 = sum (c q) q, S3 = sum (c t) q, sequential over the weighted
    slots (w)."""
    S1 = np.zeros(q.shape[:-1], f32)
    S2 = np.zeros(q.shape[:-1], f32)
    S3 = np.zeros(q.shape[:-1], f32)
    for j in range(q.shape[-1]):
        qj = q[..., j]
        cq = c[..., j] * qj
        wj = w[..., j]
        S1 = np.where(wj, S1 + cq, S1)
        S2 = np.where(wj, S2 + cq * qj, S2)
        S3 = np.where(wj, S3 + ct[..., j] * qj, S3)
    return S1, S2, S3


def _solve(S0, T1, T2, S1, S2, S3):
    """Least squares t ~ sigma * q + beta and its error T2 - sigma S3 - beta T1.
    Invalid (det <= 0 or sigma <= 0, NaN included): error +inf."""
    with np.errstate(all="ignore"):
        det = S2 * S0 - S1 * S1
        sig = (S3 * S0 - S1 * T1) / det
        beta = (S2 * T1 - S1 * S3) / det
        err = (T2 - sig * S3) - beta * T1
        ok = (det > 0) & (sig > 0)
    return sig.astype(f32), beta.astype(f32), np.where(ok, err, f32(np.inf)).astype(f32), ok


def fit_groups(v, c, present, bits, dtype):
    """Fit a batch of groups. v, c: (N, n) float32 slots; present: (N, n) bool.

    Returns (q (N, n) float32 codes, scale (N,), bias (N,) as float32 values of T,
    E_mm, E_chosen (float32, the error of step 4 / min-max), used_fit (N,) bool)."""
    v = np.asarray(v, f32)
    c = np.asarray(c, f32)
    n_bins = f32((1 << bits) - 1)
    N, n = v.shape

    # MLX's loop: w < mn ? w : mn, mx < w ? w : mx (NaN never taken).
    wmin = np.full(N, np.inf, f32)
    wmax = np.full(N, -np.inf, f32)
    for j in range(n):
        vj = np.where(present[:, j], v[:, j], np.nan)
        wmin = np.where(vj < wmin, vj, wmin)
        wmax = np.where(wmax < vj, vj, wmax)
    s_mm, b_mm = affine_params(wmin, wmax, n_bins)
    with np.errstate(all="ignore"):
        q_mm = clamp_codes(np.rint((v - b_mm[:, None]) / s_mm[:, None]), n_bins)
    sT_mm, bT_mm = round_t(s_mm, dtype), round_t(b_mm, dtype)
    e_mm = striped_error(v, c, q_mm, sT_mm, bT_mm, dtype)

    with np.errstate(all="ignore"):
        R = (wmax - wmin).astype(f32)
        finite = np.all(np.isfinite(np.where(present, v, 0)) & np.isfinite(c), axis=1)
        ok = finite & np.isfinite(R) & (R > 0)
        invR = (f32(1) / np.where(ok, R, f32(1))).astype(f32)
        t = ((v - wmin[:, None]) * invR[:, None]).astype(f32)
        # Slots without weight (t = c = 0 for them) take no part in the sums below: the
        # sums are over the weighted slots in slot order.
        wt = ok[:, None] & (c > 0)
        t = np.where(wt, t, f32(0))
        cw = np.where(wt, c, f32(0))
        ct = (cw * t).astype(f32)
        S0 = np.zeros(N, f32)
        T1 = np.zeros(N, f32)
        T2 = np.zeros(N, f32)
        for j in range(n):
            S0 = S0 + cw[:, j]
            T1 = T1 + ct[:, j]
            T2 = T2 + ct[:, j] * t[:, j]

    # Step 2: the candidate grid, (N, NC).
    a, b = grid(bits)
    s_c = (((f32(1) - a) - b) / n_bins).astype(f32)
    inv_c = (f32(1) / s_c).astype(f32)
    q = clamp_codes(np.rint((t[:, None, :] - a[None, :, None]) * inv_c[None, :, None]), n_bins)
    S1, S2, S3 = _stats(t[:, None, :], cw[:, None, :], ct[:, None, :], q, wt[:, None, :])
    bc = lambda x: x[:, None]  # noqa: E731
    sig, beta, err, _ = _solve(bc(S0), bc(T1), bc(T2), S1, S2, S3)

    # Step 3: Lloyd from the best STARTS candidates (stable order), in lanes.
    order = np.argsort(err, axis=1, kind="stable")[:, :STARTS]
    take = lambda x: np.take_along_axis(x, order, axis=1)  # noqa: E731
    sig, beta, err = take(sig), take(beta), take(err)
    P1, P2, P3 = take(S1), take(S2), take(S3)
    best_e, best_s, best_b = err.copy(), sig.copy(), beta.copy()
    active = np.isfinite(err)
    for _ in range(LLOYD_CAP):
        with np.errstate(all="ignore"):
            inv = (f32(1) / sig).astype(f32)
            ql = clamp_codes(np.rint((t[:, None, :] - beta[..., None]) * inv[..., None]), n_bins)
        N1, N2, N3 = _stats(t[:, None, :], cw[:, None, :], ct[:, None, :], ql, wt[:, None, :])
        s2, b2, e2, valid = _solve(bc(S0), bc(T1), bc(T2), N1, N2, N3)
        active = active & valid
        better = active & (e2 < best_e)
        best_e = np.where(better, e2, best_e)
        best_s = np.where(better, s2, best_s)
        best_b = np.where(better, b2, best_b)
        same = (N1 == P1) & (N2 == P2) & (N3 == P3)
        active = active & ~same
        sig = np.where(active, s2, sig)
        beta = np.where(active, b2, beta)
        P1, P2, P3 = N1, N2, N3
    # Best over starts, rank order, strict <.
    e_t = best_e[:, 0].copy()
    s_t = best_s[:, 0].copy()
    b_t = best_b[:, 0].copy()
    for k in range(1, STARTS):
        better = best_e[:, k] < e_t
        e_t = np.where(better, best_e[:, k], e_t)
        s_t = np.where(better, best_s[:, k], s_t)
        b_t = np.where(better, best_b[:, k], b_t)
    ok = ok & np.isfinite(e_t)

    # Step 4: weight units, rounded to T, the 2 x 2 T values around (scale, bias).
    with np.errstate(all="ignore"):
        scale = (s_t * R).astype(f32)
        bias = (wmin + b_t * R).astype(f32)
    s0, b0 = round_t(scale, dtype), round_t(bias, dtype)
    e_best = np.full(N, np.inf, f32)
    s_best = sT_mm.copy()
    b_best = bT_mm.copy()
    q_best = q_mm.copy()
    # The other T value on the far side of the exact one (below it when it is exact).
    with np.errstate(invalid="ignore"):
        s1 = np.where(scale > s0, step_t(s0, 1, dtype), step_t(s0, -1, dtype))
        b1 = np.where(bias > b0, step_t(b0, 1, dtype), step_t(b0, -1, dtype))
    for sT in (s0, s1):
        for bT in (b0, b1):
            with np.errstate(all="ignore"):
                good = ok & np.isfinite(sT) & (sT != 0) & np.isfinite(bT)
                inv = (f32(1) / np.where(good, sT, f32(1))).astype(f32)
                qq = clamp_codes(np.rint((v - bT[:, None]) * inv[:, None]), n_bins)
                qq = np.where(good[:, None], qq, f32(0))
            e = striped_error(v, c, qq, sT, bT, dtype)
            better = good & (e < e_best)
            e_best = np.where(better, e, e_best)
            s_best = np.where(better, sT, s_best)
            b_best = np.where(better, bT, b_best)
            q_best = np.where(better[:, None], qq, q_best)

    # Step 5: never worse than min-max.
    with np.errstate(all="ignore"):
        thr = (e_mm - e_mm * ACCEPT).astype(f32)
    use = e_best < thr
    q_out = np.where(use[:, None], q_best, q_mm)
    q_out = np.where(np.isnan(q_out), f32(0), q_out)  # non-finite groups: code 0
    return (
        q_out,
        np.where(use, s_best, sT_mm),
        np.where(use, b_best, bT_mm),
        e_mm,
        np.where(use, e_best, e_mm),
        use,
    )


# --- inputs -> slots ----------------------------------------------------------------


def float_slots(w, group_size, importance=None):
    """Float weights (rows, K) -> slots (rows * K/g, g)."""
    w = np.asarray(w, f32)
    rows, K = w.reshape(-1, w.shape[-1]).shape
    v = w.reshape(-1, group_size)
    if importance is None:
        c = np.ones_like(v)
    else:
        c = np.broadcast_to(
            np.asarray(importance, f32).reshape(-1, group_size), (rows, K // group_size, group_size)
        ).reshape(-1, group_size)
    return v, np.ascontiguousarray(c), np.ones(v.shape, bool)


def int4_slots(codes, scales, group_size, src_group_size, importance=None):
    """INT4 codes (rows, K) in [-8, 7] and float32 scales (rows, K/sg) -> slots
    (rows * K/g, 16 * g/32): block of 32 weights b, nibble u -> slot 16 b + u."""
    codes = np.asarray(codes).reshape(-1, np.shape(codes)[-1])
    rows, K = codes.shape
    s = np.repeat(np.asarray(scales, f32).reshape(rows, -1), src_group_size // 32, axis=1)
    nb = K // 32
    u = (codes.astype(np.int64) + 8).reshape(rows, nb, 32)
    if importance is None:
        h = np.ones((rows, nb, 32), f32)
    else:
        h = np.broadcast_to(np.asarray(importance, f32).reshape(nb, 32), (rows, nb, 32))
    cnt = np.zeros((rows, nb, 16), np.int64)
    c = np.zeros((rows, nb, 16), f32)
    for k in range(32):  # channel order: the float sums of importances are sequential
        onehot = u[:, :, k, None] == np.arange(16)
        cnt += onehot
        c = np.where(onehot, (c + h[:, :, k, None]).astype(f32), c)
    with np.errstate(invalid="ignore", over="ignore"):  # 0 * inf, or an overflow, for a huge scale
        v = ((np.arange(16, dtype=f32) - f32(8))[None, None, :] * s[:, :, None]).astype(f32)
    per = group_size // 32 * 16
    return (v.reshape(-1, per), c.reshape(-1, per), (cnt > 0).reshape(-1, per))


def codes_for_weights(q_slots, codes, group_size):
    """INT4 slot codes (rows*K/g, 16*g/32) -> per-weight codes (rows, K)."""
    codes = np.asarray(codes).reshape(-1, np.shape(codes)[-1])
    rows, K = codes.shape
    qs = q_slots.reshape(rows, K // 32, 16)
    u = (codes.astype(np.int64) + 8).reshape(rows, K // 32, 32)
    return np.take_along_axis(qs, u, axis=2).reshape(rows, K)


def sq_error(w, q, scale, bias, group_size, dtype, importance=None):
    """Oracle: float64 sum_k h_k (w_k - w_hat_k)^2 per group, with w_hat computed exactly
    as mx.dequantize does (in T); (rows, K/g)."""
    w = np.asarray(w, np.float64)
    rows, K = w.shape
    qg = np.asarray(q, f32).reshape(rows, K // group_size, group_size)
    d = reconstruct(
        qg, np.asarray(scale, f32).reshape(rows, -1), np.asarray(bias, f32).reshape(rows, -1), dtype
    ).astype(np.float64)
    r = w.reshape(rows, K // group_size, group_size) - d
    h = 1.0 if importance is None else np.asarray(importance, np.float64).reshape(-1, group_size)
    return (h * r * r).sum(-1)


# --- test data ----------------------------------------------------------------------


def kimi_like_int4(rng, rows, K, *, codes="gaussian", spread=10.0, sg=32, base=0.004):
    """INT4 data shaped like Kimi's experts: per-``sg`` scales log-normal with
    ``spread`` = the ratio of the 95th to the 5th percentile (sigma = ln(spread) /
    3.29), rounded to bf16; codes "flat" (uniform on [-8, 7]), "gaussian" (N(0, 2.5)
    rounded, clipped) or "laplace" (scale 1.8). Returns (codes int8 (rows, K),
    float32 bf16-valued scales (rows, K/sg))."""
    from .tiny_checkpoint import bf16_round

    sigma = np.log(spread) / 3.29
    s = bf16_round((base * np.exp(rng.standard_normal((rows, K // sg)) * sigma)).astype(f32))
    if codes == "flat":
        q = rng.integers(-8, 8, (rows, K))
    elif codes == "gaussian":
        q = np.rint(rng.standard_normal((rows, K)) * 2.5)
    elif codes == "laplace":
        q = np.rint(rng.laplace(0.0, 1.8, (rows, K)))
    else:
        raise ValueError(f"codes must be flat, gaussian or laplace, got {codes!r}")
    return np.clip(q, -8, 7).astype(np.int8), s


def ct_gaussian_int4(rng, rows, K, *, spread=10.0, std=0.02):
    """compressed-tensors INT4 of bf16 Gaussian weights (``tiny_checkpoint.ct_quantize``,
    g32) whose per-32 standard deviation is log-normal with ``spread`` (95th / 5th
    percentile). Returns (codes int8 (rows, K), float32 bf16-valued scales)."""
    from .. import int4
    from . import tiny_checkpoint as tc

    sigma = np.log(spread) / 3.29
    m = np.exp(rng.standard_normal((rows, K // 32)) * sigma).astype(f32)
    w = tc.bf16_round(
        (rng.standard_normal((rows, K)).astype(f32) * np.repeat(m, 32, axis=1) * f32(std)).astype(f32)
    )
    words, scale = tc.ct_quantize(w, 32)
    return int4.unpack(words), scale


# --- whole tensors -------------------------------------------------------------------


def pack_codes(q, bits):
    """Codes (rows, K) -> MLX's little-endian bitstream as uint32 (rows, K*bits/32)."""
    q = np.asarray(q).astype(np.uint64)
    rows, K = q.shape
    bitsarr = ((q[..., None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    by = np.packbits(bitsarr.reshape(rows, K * bits), axis=1, bitorder="little")
    return np.ascontiguousarray(by).view(np.uint32)


def fit_int4(codes, scales, bits, group_size, src_group_size, dtype, importance=None):
    """INT4 tensor (codes (rows, K), float32 scales (rows, K/sg)) -> (wq uint32, scale,
    bias float32 values of T (rows, K/g), used_fit)."""
    codes = np.asarray(codes).reshape(-1, np.shape(codes)[-1])
    rows, K = codes.shape
    v, c, p = int4_slots(codes, scales, group_size, src_group_size, importance)
    qs, s, b, _, _, use = fit_groups(v, c, p, bits, dtype)
    q = codes_for_weights(qs, codes, group_size)
    return (
        pack_codes(q.astype(np.int64), bits),
        s.reshape(rows, -1),
        b.reshape(rows, -1),
        use.reshape(rows, -1),
    )


def fit_float(w, bits, group_size, dtype, importance=None):
    """Float32 weights (rows, K) -> (wq uint32, scale, bias float32 values of T, used_fit)."""
    w = np.asarray(w, f32)
    rows, K = w.shape
    v, c, p = float_slots(w, group_size, importance)
    q, s, b, _, _, use = fit_groups(v, c, p, bits, dtype)
    return (
        pack_codes(q.reshape(rows, K).astype(np.int64), bits),
        s.reshape(rows, -1),
        b.reshape(rows, -1),
        use.reshape(rows, -1),
    )
