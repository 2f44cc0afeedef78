"""moequant.patch routes the DeepSeek-V3 family's MoE router product (MoEGate's
``x @ weight.T``) to dense_linear on the CPU: the same gates bit for bit as mlx-lm's
gate, hence the same selected experts, scores and greedy tokens; mlx-lm's compiled
group_expert_select still picks the experts; unpatch / linear=False keep mlx-lm's."""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

import moequant
from moequant import mlx_lm_patch
from moequant.testing import tiny_deepseek

PROMPT = mx.array(list(range(40, 52)))  # 12 tokens
linux_only = pytest.mark.skipif(sys.platform == "darwin", reason="the router patch is off on macOS")


def greedy(model, n=12):
    return [int(t) for t, _ in generate_step(PROMPT, model, max_tokens=n)]


def forced_top1(model, tokens, n_prompt):
    """The top-1 token after the prompt and after each following token of ``tokens``,
    decoded one token at a time from a KV cache as generate_step does."""
    cache = make_prompt_cache(model)
    out = [model(tokens[None, :n_prompt], cache=cache)[0, -1]]
    for i in range(n_prompt, tokens.size - 1):
        out.append(model(tokens[None, i : i + 1], cache=cache)[0, -1])
    return [int(t) for t in mx.argmax(mx.stack(out), axis=-1).tolist()]


def gates(model):
    return [m for _, m in model.named_modules() if type(m).__name__.endswith("MoEGate")]


@pytest.fixture
def router_calls(monkeypatch):
    calls = []
    real = mlx_lm_patch.dense_linear

    def counting(x, w, **k):
        calls.append((x.shape, x.dtype, w.dtype))
        return real(x, w, **k)

    monkeypatch.setattr(mlx_lm_patch, "dense_linear", counting)
    return calls


@linux_only
@pytest.mark.parametrize("config", [tiny_deepseek.TINY_CONFIG, tiny_deepseek.TINY_V32_CONFIG])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_gate_bits_equal_mlx_lm(config, dtype, router_calls):
    model, _ = tiny_deepseek.build(config, seed=21, dtype=dtype)
    g = gates(model)[0]
    base = type(g)
    x = (mx.random.normal((2, 5, config["hidden_size"]), key=mx.random.key(3))).astype(dtype)
    want_inds, want_scores = g(x)
    assert mlx_lm_patch.patch_gates(model) == len(gates(model)) == 2
    assert type(g) is not base and type(g)._moequant_base is base
    inds, scores = g(x)
    assert router_calls and router_calls[-1][0] == x.shape
    assert np.array_equal(np.array(inds), np.array(want_inds))
    assert np.array_equal(np.array(scores), np.array(want_scores))
    # The gate product itself, against a float64 reference.
    y = np.array(mlx_lm_patch.dense_linear(x, g.weight).astype(mx.float32), dtype=np.float64)
    xf = np.array(x.astype(mx.float32), dtype=np.float64)
    wf = np.array(g.weight.astype(mx.float32), dtype=np.float64)
    tol = 2.0**-8 if dtype == mx.bfloat16 else 1e-5
    assert np.all(np.abs(y - xf @ wf.T) <= tol * (np.abs(xf) @ np.abs(wf).T))


@linux_only
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_greedy_tokens_and_unpatch(dtype, router_calls):
    model, _ = tiny_deepseek.build(seed=22, dtype=dtype)
    want = greedy(model)
    if dtype == mx.float32:
        assert moequant.patch(model) == 2
        assert greedy(model) == want
    else:
        # In bfloat16 both forwards round every op to bf16, each its own way, so mlx-lm's
        # tokens are no oracle. The oracle is the same weights in float32: along mlx-lm's
        # tokens, the patched model's top-1 must match it at least as often as mlx-lm's.
        seq = mx.array(PROMPT.tolist() + want)
        ref, _ = tiny_deepseek.build(seed=22, dtype=dtype)
        tiny_deepseek.cast_like_convert(ref, mx.float32)
        exact = forced_top1(ref, seq, PROMPT.size)
        theirs = forced_top1(model, seq, PROMPT.size)
        assert moequant.patch(model) == 2
        ours = forced_top1(model, seq, PROMPT.size)
        agree = [sum(a == b for a, b in zip(exact, t)) for t in (theirs, ours)]
        assert agree[1] >= max(agree[0], 0.75 * len(exact)), agree
        greedy(model)  # the patched decode steps, for the router-call check below
    # The prompt's prefill and the one-token steps both ran the router kernel.
    rows = {s[-2] for s, _, _ in router_calls}
    assert 11 in rows and 1 in rows
    moequant.unpatch(model)
    assert all(type(g).__name__ == "MoEGate" for g in gates(model))
    router_calls.clear()
    assert greedy(model, 3) == want[:3] and not router_calls
    moequant.patch(model, linear=False)
    assert greedy(model, 3) == want[:3] and not router_calls


def test_other_devices_and_dtypes_keep_mlx_lm(router_calls, monkeypatch):
    model, _ = tiny_deepseek.build(seed=23)
    g = gates(model)[0]
    mlx_lm_patch.patch_gates(model)
    x = mx.random.normal((1, 3, 128), key=mx.random.key(4))
    monkeypatch.setattr(mlx_lm_patch.sys, "platform", "darwin")
    g(x)
    assert not router_calls
    monkeypatch.undo()
    g.weight = (g.weight * 100).astype(mx.int32)  # not a float weight: mlx-lm's own product
    got = g(x)
    want = type(g)._moequant_base.__call__(g, x)
    assert not router_calls
    assert all(np.array_equal(np.array(a), np.array(b)) for a, b in zip(got, want))
