"""moequant.patch routes mlx-lm's quantized linear layers (and a tied quantized embedding
used as the output projection) to quantized_linear: greedy tokens equal mlx-lm's with
float32 activations, prefill (prompts longer than 4 tokens) and decode alike."""

from __future__ import annotations

import gc

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


def _pair_owners(model):
    return [
        (m, names)
        for _, m in model.named_modules()
        for names in (("q_a_proj", "kv_a_proj_with_mqa"), ("gate_proj", "up_proj"))
        if all(isinstance(getattr(m, n, None), nn.QuantizedLinear) for n in names)
    ]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_linear_pairs_one_call_same_bits(dtype, linear_calls):
    """Layers that share x run as one call on their concatenated rows: each output equal
    to its layer's own call (decode rows and a prefill's GEMM), the layers' arrays the
    same values, held once in memory."""
    model, _ = tiny_deepseek.build(seed=15, dtype=dtype)
    owners = _pair_owners(model)
    assert len(owners) == 6  # 3 MLA layers, the dense MLP, 2 shared experts
    before = {
        (id(m), n, k): mx.array(getattr(m, n)[k])
        for m, names in owners
        for n in names
        for k in mlx_lm_patch._ARRAYS
    }
    mx.eval(list(before.values()))
    gc.collect()
    moequant.patch_linear(model)
    mem = mx.get_active_memory()
    assert mlx_lm_patch.patch_linear_pairs(model) == 6
    gc.collect()
    # The concatenated arrays replace the layers' own (views of them, no second copy).
    pair_bytes = sum(v.nbytes for v in before.values())
    assert abs(mx.get_active_memory() - mem) < pair_bytes // 4
    moequant.patch(model)  # the rest of the patch; the pairs stay as they are
    for m, names in owners:
        assert mlx_lm_patch.pair_arrays(m, names) is not None
        for n in names:
            for k in mlx_lm_patch._ARRAYS:
                assert mx.array_equal(getattr(m, n)[k], before[id(m), n, k]).item()
        K = getattr(m, names[0])["weight"].shape[1] * 32 // getattr(m, names[0]).bits
        for rows in (1, 11):
            x = mx.random.normal((1, rows, K)).astype(dtype)
            linear_calls.clear()
            got = mlx_lm_patch.pair_linear(m, names, x)
            assert len(linear_calls) == 1
            for y, n in zip(got, names):
                want = getattr(m, n)(x)
                assert y.dtype == want.dtype and mx.array_equal(y, want).item()


def test_linear_pairs_tokens_replaced_weights_and_unpatch():
    model, _ = tiny_deepseek.build(seed=16)
    want = greedy(model)
    logits = model(PROMPT[None])
    moequant.patch(model)
    assert greedy(model) == want
    # A layer's arrays replaced after patching: its pair falls back to one call per layer.
    other, _ = tiny_deepseek.build(seed=17)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[0].mlp
    attn.kv_a_proj_with_mqa.update(other.model.layers[1].self_attn.kv_a_proj_with_mqa.parameters())
    mlp.up_proj.update(other.model.layers[0].mlp.up_proj.parameters())
    assert mlx_lm_patch.pair_arrays(attn, mlx_lm_patch._MLA_PAIR) is None
    assert mlx_lm_patch.pair_arrays(mlp, mlx_lm_patch._MLP_PAIR) is None
    x = mx.random.normal((1, 1, 128))
    for owner, names in ((attn, mlx_lm_patch._MLA_PAIR), (mlp, mlx_lm_patch._MLP_PAIR)):
        for y, n in zip(mlx_lm_patch.pair_linear(owner, names, x), names):
            assert mx.array_equal(y, getattr(owner, n)(x)).item()
    moequant.unpatch(model)
    model2, _ = tiny_deepseek.build(seed=16)
    moequant.patch(model2)
    moequant.unpatch(model2)
    # mlx-lm's own modules again, on the row views: mlx-lm's logits.
    from mlx_lm.models.deepseek_v3 import DeepseekV3MLP

    assert type(model2.model.layers[0].mlp) is DeepseekV3MLP
    assert "_moequant_pairs" not in model2.model.layers[1].self_attn.__dict__
    assert mx.array_equal(model2(PROMPT[None]), logits).item()
    assert greedy(model2) == want
