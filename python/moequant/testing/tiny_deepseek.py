"""A small random DeepSeek-V3-shaped model (MLA attention, sigmoid group routing,
shared expert, stacked quantized experts), built and optionally saved as an mlx-lm
model directory with a tiny byte-level tokenizer. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .tokenizer import write_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)

TINY_CONFIG = dict(
    model_type="deepseek_v3",
    vocab_size=320,
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=16,
    routed_scaling_factor=2.5,
    kv_lora_rank=64,
    q_lora_rank=64,
    qk_rope_head_dim=16,
    v_head_dim=32,
    qk_nope_head_dim=32,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=4,
    first_k_dense_replace=1,
    max_position_embeddings=1024,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


# deepseek_v32: the same MLA and MoE plus the indexer of DeepSeek sparse attention
# (index_topk positions per query once the cache holds more; small here so that short
# prompts exercise it). Cache dims that group sizes divide (latent 128, rope 64).
TINY_V32_CONFIG = dict(
    TINY_CONFIG,
    model_type="deepseek_v32",
    kv_lora_rank=128,
    qk_rope_head_dim=64,
    index_head_dim=64,
    index_n_heads=2,
    index_topk=8,
)


def build(
    config: Optional[dict] = None,
    *,
    seed: int = 0,
    bits: int = 4,
    group_size: int = 64,
    expert_bits: Optional[tuple] = None,
    dtype=mx.float32,
):
    """Returns (model, config). Weights are random with a scale that gives peaked
    logits; every floating parameter is in ``dtype`` as ``mlx_lm.convert --dtype``
    leaves it (``cast_like_convert``); every Linear/SwitchLinear is quantized to
    (bits, group_size), and the routed experts' gate/up/down to ``expert_bits`` when
    given."""
    import importlib

    cfg = dict(TINY_CONFIG if config is None else config)
    arch = importlib.import_module(f"mlx_lm.models.{cfg['model_type']}")
    mx.random.seed(seed)
    model = arch.Model(arch.ModelArgs.from_dict(cfg))
    # Larger weights than the default init make the next-token choice decisive.
    model.update(
        tree_map(
            lambda p: (
                (mx.random.normal(p.shape) * (0.08 if p.ndim > 1 else 0.02)).astype(dtype)
                if p.ndim > 1
                else p
            ),
            model.parameters(),
        )
    )
    cast_like_convert(model, dtype)

    def predicate(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        if module.weight.shape[-1] % group_size:
            return False
        if expert_bits and "switch_mlp" in path:
            b = expert_bits[("gate_proj", "up_proj", "down_proj").index(path.split(".")[-1])]
            return {"bits": b, "group_size": group_size}
        return {"bits": bits, "group_size": group_size}

    quantization = {"group_size": group_size, "bits": bits, "mode": "affine"}

    def record(path, module):
        r = predicate(path, module)
        if isinstance(r, dict):
            quantization[path] = r
        return r

    nn.quantize(model, class_predicate=record)
    mx.eval(model.parameters())
    cfg["quantization"] = quantization
    return model, cfg


def cast_like_convert(model, dtype):
    """Cast the model's floating parameters to ``dtype`` as ``mlx_lm.convert --dtype``
    does: all but those the model's ``cast_predicate`` keeps (DeepSeek-V3's
    e_score_correction_bias). Norm weights left in float32 would turn a bfloat16
    model's activations into float32 after its first norm."""
    keep = getattr(model, "cast_predicate", lambda _: True)
    cast = [
        (k, v.astype(dtype))
        for k, v in tree_flatten(model.parameters())
        if keep(k) and mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype
    ]
    if cast:
        model.update(tree_unflatten(cast))


def save(model, config: dict, path) -> Path:
    """Write an mlx-lm model directory (weights, config, index, tokenizer)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
        "weight_map": {k: "model.safetensors" for k in sorted(weights)},
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg = dict(config)
    cfg["quantization_config"] = cfg.get("quantization")
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    write_tokenizer(path, config["vocab_size"], chat_template=CHAT_TEMPLATE)
    return path
