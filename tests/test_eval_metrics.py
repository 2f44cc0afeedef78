"""Known-answer tests of every number `moequant eval` reports, on hand-made logits.

Fake models return fixed logits per window; the oracle recomputes each metric directly in
float64 numpy from full softmaxes, following the definitions the report states."""

import math

import mlx.core as mx
import numpy as np
import pytest

from moequant.evaluate import (
    Progress,
    ReferenceCache,
    compare_against_cache,
    compare_side_by_side,
    summarize,
)

V, SEQ, N = 11, 9, 4


class FakeModel:
    """Returns logits[i] (SEQ-1, V) for the i-th window, found by its tokens."""

    def __init__(self, windows, logits):
        self.table = {tuple(w[:-1].tolist()): l for w, l in zip(windows, logits)}

    def __call__(self, x):
        return mx.array(self.table[tuple(np.array(x[0]).tolist())][None])


def make_case(seed=0, noise=1.5):
    rng = np.random.default_rng(seed)
    windows = rng.integers(0, V, size=(N, SEQ)).astype(np.int32)
    ref = (rng.standard_normal((N, SEQ - 1, V)) * 2.0).astype(np.float32)
    build = (ref + rng.standard_normal(ref.shape) * noise).astype(np.float32)
    # A near-tie the build flips: the reference's top two 0.02 apart, the build swaps them.
    ref[0, 0] = np.log(np.array([0.40, 0.38] + [0.22 / (V - 2)] * (V - 2)))
    build[0, 0] = np.log(np.array([0.38, 0.40] + [0.22 / (V - 2)] * (V - 2)))
    # An exact tie kept by the build: not a flip.
    ref[1, 0] = 0.0
    ref[1, 0, 3] = ref[1, 0, 5] = 4.0
    build[1, 0] = ref[1, 0]
    return windows, ref, build


def oracle(windows, ref_logits, build_logits, k, near_tie=0.1):
    """Every reported number, straight from the definitions, in float64."""

    def logsoftmax(z):
        z = z.astype(np.float64)
        return (
            z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
        )

    lp, lq = logsoftmax(ref_logits), logsoftmax(build_logits)
    rows = {k_: [] for k_ in ("kl", "flip", "rp", "bp", "brp", "rbp", "near", "rnll", "bnll", "win")}
    for i in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            p, q = np.exp(lp[i, t]), np.exp(lq[i, t])
            top = np.argsort(-lp[i, t], kind="stable")[:k]
            rest = np.setdiff1d(np.arange(V), top)
            kl = np.sum(p[top] * (lp[i, t, top] - lq[i, t, top]))
            if rest.size:
                pt, qt = p[rest].sum(), q[rest].sum()
                kl += pt * (math.log(pt) - math.log(qt))
            ref_pick, build_pick = top[0], int(np.argmax(q))
            flip = q[ref_pick] < q.max()
            rows["kl"].append(kl)
            rows["flip"].append(flip)
            rows["rp"].append(p[ref_pick])
            rows["bp"].append(q[build_pick])
            rows["brp"].append(q[ref_pick])
            rows["rbp"].append(p[build_pick] if build_pick in top else np.nan)
            rows["near"].append(flip and build_pick in top and p[ref_pick] - p[build_pick] < near_tie)
            target = windows[i, t + 1]
            rows["rnll"].append(-lp[i, t, target])
            rows["bnll"].append(-lq[i, t, target])
            rows["win"].append(i)
    r = {k_: np.array(v) for k_, v in rows.items()}
    n, f = r["kl"].size, r["flip"]

    def mse(x):
        wm = np.array([x[r["win"] == w].mean() for w in range(lp.shape[0])])
        return x.mean(), x.std(ddof=1) / math.sqrt(n), wm.std(ddof=1) / math.sqrt(wm.size)

    out = {
        "kl": mse(r["kl"]),
        "median": np.median(r["kl"]),
        "flips": int(f.sum()),
        "kl_flipped": r["kl"][f].mean(),
        "kl_unflipped": r["kl"][~f].mean(),
        "rp": r["rp"][f].mean(),
        "bp": r["bp"][f].mean(),
        "brp": r["brp"][f].mean(),
        "rbp": np.nanmean(r["rbp"][f]),
        "rbp_known": int((~np.isnan(r["rbp"][f])).sum()),
        "max": r["kl"].max(),
        "near": int(r["near"].sum()),
        "n": n,
    }
    for name in ("rnll", "bnll"):
        m, se, se_w = mse(r[name])
        out[name] = (math.exp(m), math.exp(m) * se, math.exp(m) * se_w)
    return out


def run_cached(tmp_path, windows, ref_logits, build_logits, k):
    cache = ReferenceCache(tmp_path / "cache")
    off = Progress(0, "", enabled=False)
    cache.write(FakeModel(windows, ref_logits), windows, k, {}, off)
    return compare_against_cache(FakeModel(windows, build_logits), cache, windows, off)


@pytest.mark.parametrize("k", [V, 3])
def test_every_number_matches_numpy(tmp_path, k):
    windows, ref, build = make_case()
    got = summarize(run_cached(tmp_path, windows, ref, build, k))
    want = oracle(windows, ref, build, k)
    close = lambda a, b: pytest.approx(b, rel=2e-5, abs=2e-6) == a  # noqa: E731

    assert got["positions"] == want["n"] == N * (SEQ - 1)
    assert close(got["kl"]["mean"], want["kl"][0])
    assert close(got["kl"]["se"], want["kl"][1])
    assert close(got["kl"]["se_windows"], want["kl"][2])
    assert close(got["kl"]["median"], want["median"])
    assert close(got["kl"]["max"], want["max"])
    assert close(got["kl"]["mean_flipped"], want["kl_flipped"])
    assert close(got["kl"]["mean_unflipped"], want["kl_unflipped"])
    assert got["flips"]["count"] == want["flips"] and 0 < want["flips"] < want["n"]
    assert close(got["flips"]["rate"], want["flips"] / want["n"])
    assert close(got["flips"]["ref_p_ref_pick"], want["rp"])
    assert close(got["flips"]["build_p_build_pick"], want["bp"])
    assert close(got["flips"]["build_p_ref_pick"], want["brp"])
    assert close(got["flips"]["ref_p_build_pick"], want["rbp"])
    assert got["flips"]["ref_p_build_pick_known"] == want["rbp_known"]
    assert got["flips"]["near_ties"] == want["near"] >= 1
    assert close(got["flips"]["near_tie_share"], want["near"] / want["flips"])
    for key, name in (("reference", "rnll"), ("build", "bnll")):
        ppl = got["perplexity"][key]
        assert close(ppl["ppl"], want[name][0])
        assert close(ppl["se"], want[name][1])
        assert close(ppl["se_windows"], want[name][2])


def test_topk_kl_is_a_lower_bound_exact_at_full_vocab(tmp_path):
    windows, ref, build = make_case(seed=1)
    kls = [run_cached(tmp_path / str(k), windows, ref, build, k)["kl"] for k in (2, 5, V)]
    full = oracle(windows, ref, build, V)["kl"][0]
    assert np.all(kls[0] <= kls[1] + 1e-6) and np.all(kls[1] <= kls[2] + 1e-6)
    assert kls[0].mean() < kls[2].mean()
    assert kls[2].mean() == pytest.approx(full, rel=1e-5)


def test_self_comparison_gives_zero_kl_and_no_flips(tmp_path):
    windows, ref, _ = make_case()
    got = summarize(run_cached(tmp_path, windows, ref, ref, 4))
    assert abs(got["kl"]["mean"]) < 1e-6 and got["kl"]["max"] < 1e-5
    assert got["flips"]["count"] == 0  # including the exact tie at window 1, position 0
    assert got["perplexity"]["reference"]["ppl"] == pytest.approx(got["perplexity"]["build"]["ppl"])


def test_cached_equals_side_by_side(tmp_path):
    windows, ref, build = make_case(seed=2)
    cached = run_cached(tmp_path, windows, ref, build, 5)
    direct = compare_side_by_side(FakeModel(windows, ref), FakeModel(windows, build), windows, 5)
    assert cached.keys() == direct.keys()
    for key in cached:
        np.testing.assert_array_equal(cached[key], direct[key], err_msg=key)
