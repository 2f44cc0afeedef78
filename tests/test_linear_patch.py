"""moequant.patch routes mlx-lm's quantized linear layers (and a tied quantized embedding
used as the output projection) to quantized_linear: greedy tokens equal mlx-lm's with
float32 activations, prefill (prompts longer than 4 tokens) and decode alike."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_map
from mlx_lm.generate import generate_step

import moequant
from moequant import mlx_lm_patch
from moequant.testing import tiny_deepseek

PROMPT = mx.array(list(range(40, 52)))  # 12 tokens


def greedy(model, n=16, prompt=PROMPT):
    return [int(t) for t, _ in generate_step(prompt, model, max_tokens=n)]


@pytest.fixture
def linear_calls(monkeypatch):
    calls = []
    real = mlx_lm_patch.quantized_linear

    def counting(x, *a, **k):
        calls.append(x.shape)
        return real(x, *a, **k)

    monkeypatch.setattr(mlx_lm_patch, "quantized_linear", counting)
    return calls


@pytest.mark.parametrize("bits,group_size", [(4, 64), (6, 32), (3, 128)])
def test_greedy_tokens_match_mlx_lm(bits, group_size, linear_calls):
    model, _ = tiny_deepseek.build(seed=11, bits=bits, group_size=group_size)
    want = greedy(model)
    n_linear = sum(
        isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()
    )
    assert moequant.patch_linear(model) == n_linear > 10
    assert greedy(model) == want
    # The 11-token prefill and the one-token steps both ran the kernel.
    rows = {s[-2] for s in linear_calls}
    assert 11 in rows and 1 in rows
    assert moequant.unpatch(model) == n_linear
    linear_calls.clear()
    assert greedy(model, 4) == want[:4] and not linear_calls


def test_patch_includes_linears_and_moe(linear_calls):
    model, _ = tiny_deepseek.build(seed=12)
    want = greedy(model)
    assert moequant.patch(model) == 2
    assert greedy(model) == want
    assert linear_calls
    linear_calls.clear()
    model2, _ = tiny_deepseek.build(seed=12)
    moequant.patch(model2, linear=False)
    assert greedy(model2) == want and not linear_calls


def _tied_llama(seed):
    from mlx_lm.models import llama

    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=128,
        num_hidden_layers=2,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=320,
        tie_word_embeddings=True,
    )
    mx.random.seed(seed)
    model = llama.Model(args)
    model.update(
        tree_map(lambda p: mx.random.normal(p.shape) * 0.08 if p.ndim > 1 else p, model.parameters())
    )
    nn.quantize(model, group_size=64, bits=6)
    mx.eval(model.parameters())
    return model


def test_tied_quantized_embedding(linear_calls):
    model = _tied_llama(13)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    want = greedy(model)
    moequant.patch(model)
    assert greedy(model) == want
    # The output projection (vocab 320 columns) ran through as_linear.
    head = [s for s in linear_calls if s[-1] == 128]
    assert head
    logits = model(PROMPT[None])
    moequant.unpatch(model)
    assert mx.allclose(logits, model(PROMPT[None]), rtol=1e-4, atol=1e-4).item()


def test_unsupported_layouts_keep_mlx_path(linear_calls):
    lin = nn.QuantizedLinear(128, 16, bias=True, group_size=64, bits=4)
    lin.update({"bias": mx.random.normal((16,))})
    mx.eval(lin.parameters())
    x = mx.random.normal((3, 128))
    want = lin(x)
    m = nn.Sequential(lin)
    assert moequant.patch_linear(m) == 1
    assert mx.allclose(lin(x), want, rtol=1e-5, atol=1e-5).item()  # output bias added
    assert linear_calls == [(3, 128)]
    mx4 = nn.QuantizedLinear(128, 16, bias=False, group_size=32, bits=4, mode="mxfp4")
    assert moequant.patch_linear(nn.Sequential(mx4)) == 0
    y = mx4(x)
    assert y.shape == (3, 16) and len(linear_calls) == 1


def test_bf16_input_follows_mlx_dtype(linear_calls):
    lin = nn.QuantizedLinear(128, 16, bias=False, group_size=64, bits=4)  # float32 scales
    moequant.patch_linear(nn.Sequential(lin))
    x = mx.random.normal((2, 128)).astype(mx.bfloat16)
    y = lin(x)
    ref = mx.quantized_matmul(x, lin.weight, lin.scales, lin.biases, transpose=True, group_size=64, bits=4)
    assert y.dtype == ref.dtype == mx.float32
    assert mx.allclose(y, ref, rtol=1e-4, atol=1e-4).item()


@pytest.mark.parametrize(
    "no_fused,env,patched", [(False, None, True), (True, None, False), (False, "0", False)]
)
def test_cli_switches(no_fused, env, patched, monkeypatch):
    """The CLIs' loaders (moequant generate/serve): --no-fused and MOEQUANT_FUSED=0 leave
    the linear layers on mlx-lm's path too."""
    import argparse

    from moequant import mlx_lm_cli

    if env is not None:
        monkeypatch.setenv("MOEQUANT_FUSED", env)
    model, _ = tiny_deepseek.build(seed=14)
    args = argparse.Namespace(no_fused=no_fused, fused_max_tokens=4, huge_pages=False)
    out = mlx_lm_cli._patching(lambda: (model, None), args)()
    assert out[0] is model
    assert (type(model.lm_head) is not nn.QuantizedLinear) == patched
    assert isinstance(model.lm_head, nn.QuantizedLinear)
