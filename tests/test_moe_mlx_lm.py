"""moequant.patch on a tiny DeepSeek-V3 model: greedy decoding gives mlx-lm's tokens."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step, stream_generate
from mlx_lm.models.cache import make_prompt_cache

import moequant
from moequant import mlx_lm_patch
from moequant.testing import tiny_deepseek

PROMPT = mx.array(list(range(40, 52)))  # 12 tokens: prefill stays on mlx-lm's path


def greedy(model, n=24, prompt=PROMPT, **kw):
    return [int(t) for t, _ in generate_step(prompt, model, max_tokens=n, **kw)]


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    real = mlx_lm_patch.moe_swiglu

    def counting(x, *a, **k):
        calls.append(x.shape)
        return real(x, *a, **k)

    monkeypatch.setattr(mlx_lm_patch, "moe_swiglu", counting)
    return calls


@pytest.mark.parametrize("expert_bits", [None, (3, 3, 4)])
def test_greedy_tokens_match_mlx_lm(expert_bits, fused_calls):
    model, _ = tiny_deepseek.build(seed=1, expert_bits=expert_bits)
    want = greedy(model)
    assert moequant.patch(model) == 2  # layers 1 and 2 are MoE, layer 0 is dense
    got = greedy(model)
    assert got == want
    # Every one-token step (the last prompt token, then each generated token; mlx-lm
    # runs one step ahead) ran the fused op in both MoE layers; the prefill did not.
    assert len(fused_calls) == 2 * 25
    assert all(s[-2] == 1 for s in fused_calls)
    moequant.unpatch(model)
    assert greedy(model, 4) == want[:4]


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
            out.append([r.token for r in stream_generate(model, tok, prompt, max_tokens=12, prompt_cache=cache)])
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


def test_prefill_threshold_and_unsupported_layouts(fused_calls):
    model, _ = tiny_deepseek.build(seed=4)
    moequant.patch(model, max_tokens=64)  # now the 12-token prefill is fused too
    greedy(model, 2)
    assert fused_calls[0][-2] == 11  # generate_step prefills all but the last token

    # Unquantized experts keep mlx-lm's path.
    from mlx_lm.models import deepseek_v3

    plain = deepseek_v3.Model(deepseek_v3.ModelArgs.from_dict(tiny_deepseek.TINY_CONFIG))
    assert moequant.patch(plain) == 0


def test_env_switch(monkeypatch):
    monkeypatch.setenv("MOEQUANT_FUSED", "0")
    assert not mlx_lm_patch.env_enabled()
    monkeypatch.setenv("MOEQUANT_FUSED", "1")
    assert mlx_lm_patch.env_enabled()
