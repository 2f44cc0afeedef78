"""moequant.patch on a tiny DeepSeek-V3 model: greedy decoding gives mlx-lm's tokens."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step, stream_generate
from mlx_lm.models.cache import make_prompt_cache

import moequant
from moequant import mlx_lm_patch, ops
from moequant.testing import tiny_deepseek

PROMPT = mx.array(list(range(40, 52)))  # 12 tokens: 11 x 4 pairs, too few for moe_prefill
LONG_PROMPT = mx.array([(7 * i) % 300 + 10 for i in range(70)])  # 69 x 4 pairs: moe_prefill


def greedy(model, n=24, prompt=PROMPT, **kw):
    return [int(t) for t, _ in generate_step(prompt, model, max_tokens=n, **kw)]


def _count(monkeypatch, name):
    calls = []
    real = getattr(mlx_lm_patch, name)

    def counting(x, *a, **k):
        calls.append(x.shape)
        return real(x, *a, **k)

    monkeypatch.setattr(mlx_lm_patch, name, counting)
    return calls


@pytest.fixture
def fused_calls(monkeypatch):
    return _count(monkeypatch, "moe_swiglu")


@pytest.fixture
def prefill_calls(monkeypatch):
    return _count(monkeypatch, "moe_prefill")


@pytest.mark.parametrize("expert_bits", [None, (3, 3, 4)])
def test_greedy_tokens_match_mlx_lm(expert_bits, fused_calls, prefill_calls):
    model, _ = tiny_deepseek.build(seed=1, expert_bits=expert_bits)
    want = greedy(model)
    assert moequant.patch(model) == 2  # layers 1 and 2 are MoE, layer 0 is dense
    got = greedy(model)
    assert got == want
    # Every step ran the fused GEMV in both MoE layers: the 11-token prefill (too few
    # pairs per expert for moe_prefill), the last prompt token, then each generated
    # token (mlx-lm runs one step ahead).
    assert sorted(s[-2] for s in fused_calls) == [1] * (2 * 25) + [11] * 2
    assert prefill_calls == []
    moequant.unpatch(model)
    assert greedy(model, 4) == want[:4]


@pytest.mark.parametrize("expert_bits", [None, (3, 3, 4)])
def test_greedy_long_prompt_through_moe_prefill(expert_bits, fused_calls, prefill_calls):
    """A 70-token prompt: the prefill runs moe_prefill in both MoE layers, then the
    decode steps the GEMV; greedy tokens are mlx-lm's (float32 activations)."""
    model, _ = tiny_deepseek.build(seed=5, expert_bits=expert_bits)
    want = greedy(model, 16, LONG_PROMPT)
    moequant.patch(model)
    assert greedy(model, 16, LONG_PROMPT) == want
    assert [s[-2] for s in prefill_calls] == [69, 69]
    assert len(fused_calls) == 2 * 17 and all(s[-2] == 1 for s in fused_calls)


def test_patched_block_many_tokens_matches_mlx_lm():
    """A patched MoE block on 5 to 256 tokens equals mlx-lm's block (float32 noise),
    whichever of the two ops the call takes."""
    model, _ = tiny_deepseek.build(seed=6, expert_bits=(3, 3, 4))
    block = model.model.layers[1].mlp
    for n in (5, 17, 64, 256):
        x = mx.random.normal((1, n, 128), key=mx.random.key(n))
        want = block(x)
        moequant.patch(model)
        got = block(x)
        moequant.unpatch(model)
        err = mx.abs(got - want).max() / mx.abs(want).max()
        assert err.item() < 1e-5, (n, err.item())


def test_prompt_cache_and_stream_generate(tmp_path, fused_calls):
    """Through mlx_lm.load and stream_generate with a reused prompt cache."""
    from mlx_lm import load

    model, cfg = tiny_deepseek.build(seed=2)
    path = tiny_deepseek.save(model, cfg, tmp_path / "m")
    model, tok = load(str(path))

    def two_turns():
        cache = make_prompt_cache(model)
        out = []
        for prompt in ("hello there", " and again"):
            out.append(
                [r.token for r in stream_generate(model, tok, prompt, max_tokens=12, prompt_cache=cache)]
            )
        return out

    want = two_turns()
    moequant.patch(model)
    assert two_turns() == want
    assert len(fused_calls) > 0


def test_compiled_block_matches(fused_calls):
    """A patched MoE block inside mx.compile (its gate is itself mx.compile'd)."""
    model, _ = tiny_deepseek.build(seed=3)
    moequant.patch(model)
    block = model.model.layers[1].mlp
    x = mx.random.normal((1, 1, 128))
    eager = block(x)
    compiled = mx.compile(block)
    assert mx.allclose(compiled(x), eager, rtol=1e-5, atol=1e-6).item()
    assert mx.allclose(compiled(x + 1), block(x + 1), rtol=1e-5, atol=1e-6).item()
    assert len(fused_calls) >= 3


def test_prefill_threshold_and_unsupported_layouts(fused_calls, prefill_calls):
    model, _ = tiny_deepseek.build(seed=4)
    moequant.patch(model, max_tokens=128)  # the GEMV up to 128 tokens
    greedy(model, 2, LONG_PROMPT)
    assert fused_calls[0][-2] == 69  # generate_step prefills all but the last token
    assert prefill_calls == []

    # Unquantized experts keep mlx-lm's path.
    from mlx_lm.models import deepseek_v3

    plain = deepseek_v3.Model(deepseek_v3.ModelArgs.from_dict(tiny_deepseek.TINY_CONFIG))
    assert moequant.patch(plain) == 0


def test_projections_checked_once_and_again_after_an_update(monkeypatch):
    """The patched block checks its projections once, not on every call; replacing an
    expert array (model.update) makes it check, and use, the new ones."""
    model, _ = tiny_deepseek.build(seed=7, expert_bits=(3, 3, 4))
    block = model.model.layers[1].mlp
    moequant.patch(model)
    checks = []
    real = ops.as_projection

    def counting(p, name="projection"):
        if not isinstance(p, tuple):  # a module's layout checked (a tuple is only unpacked)
            checks.append(name)
        return real(p, name)

    monkeypatch.setattr(mlx_lm_patch, "as_projection", counting)
    monkeypatch.setattr(ops, "as_projection", counting)
    x = mx.random.normal((1, 1, 128), key=mx.random.key(0))
    first = block(x)
    for _ in range(3):
        assert mx.array_equal(block(x), first).item()
    assert checks == []  # patch() checked them; no call re-checks

    sm = block.switch_mlp
    sm.down_proj.update({"scales": sm.down_proj.scales * 2})
    got = block(x)
    assert checks == ["gate_proj", "up_proj", "down_proj"]
    moequant.unpatch(model)
    want = block(x)
    assert (mx.abs(got - want).max() / mx.abs(want).max()).item() < 1e-5
    assert not mx.allclose(got, first).item()


def test_env_switch(monkeypatch):
    monkeypatch.setenv("MOEQUANT_FUSED", "0")
    assert not mlx_lm_patch.env_enabled()
    monkeypatch.setenv("MOEQUANT_FUSED", "1")
    assert mlx_lm_patch.env_enabled()
