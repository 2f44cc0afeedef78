"""Tiny DeepSeek-V3-shaped MLX models in mlx-lm's on-disk format, for tests and demos.

``make_tiny_model`` writes a float model with random weights and a small byte-level BPE
tokenizer that ``mlx_lm.load`` accepts; ``quantize_tiny`` writes an mlx-lm quantized copy
of it (``mlx_lm.utils.quantize_model``), so builds at several bit widths can be compared
against the float original without downloading anything.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Callable, Optional, Union

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from . import tokenizer

# Small, but with every part of the Kimi/DeepSeek-V3 layout: MLA attention, a dense first
# layer, routed + shared experts (SwitchGLU), a router; all matrix inner dims divisible by 64
# so mlx-lm quantizes every linear layer.
TINY_DEEPSEEK_CONFIG = {
    "model_type": "deepseek_v3",
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "n_shared_experts": 1,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "routed_scaling_factor": 1.0,
    "kv_lora_rank": 64,
    "q_lora_rank": 64,
    "qk_rope_head_dim": 32,
    "v_head_dim": 64,
    "qk_nope_head_dim": 64,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "n_group": 1,
    "topk_group": 1,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 1,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_tokenizer(path: Union[str, Path], vocab_size: int = 384) -> int:
    """The shared test tokenizer (testing/tokenizer.py) with this module's chat template."""
    return tokenizer.write_tokenizer(path, vocab_size, chat_template=CHAT_TEMPLATE)


def _save(path: Path, model, config: dict, tokenizer_src: Optional[Path]) -> None:
    from mlx_lm.utils import save_config, save_model

    save_model(path, model)
    save_config(dict(config), config_path=path / "config.json")
    if tokenizer_src is None:
        write_tokenizer(path)
    else:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (path / name).write_bytes((tokenizer_src / name).read_bytes())


def make_tiny_model(
    path: Union[str, Path], seed: int = 0, config: Optional[dict] = None, scale: float = 1.0
) -> Path:
    """Write a float32 tiny DeepSeek-V3 model with random weights to ``path``.

    ``scale`` multiplies the output head so tests can make the distributions peakier
    (random init gives near-uniform next-token distributions)."""
    from mlx_lm.models import deepseek_v3

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(TINY_DEEPSEEK_CONFIG, **(config or {}))
    mx.random.seed(seed)
    model = deepseek_v3.Model(deepseek_v3.ModelArgs.from_dict(cfg))
    # The router starts at zeros in mlx-lm (every expert tied); give it random weights so
    # routing is input dependent, as in a trained model.
    params = dict(tree_flatten(model.parameters()))
    updates = []
    for k, v in params.items():
        if k.endswith("mlp.gate.weight"):
            updates.append((k, mx.random.normal(v.shape) * 0.5))
        elif k == "lm_head.weight":
            updates.append((k, v * scale))
    model.load_weights(updates, strict=False)
    model.update(tree_map(lambda a: a.astype(mx.float32), model.parameters()))
    mx.eval(model.parameters())
    _save(path, model, cfg, None)
    return path


def quantize_tiny(
    src: Union[str, Path],
    dst: Union[str, Path],
    bits: int,
    group_size: int = 64,
    quant_predicate: Optional[Callable] = None,
) -> Path:
    """Quantize the model at ``src`` with mlx-lm's own ``quantize_model`` and save it to
    ``dst`` (what ``mlx_lm.convert -q`` would write)."""
    from mlx_lm.utils import load_model, quantize_model

    src, dst = Path(src), Path(dst)
    model, config = load_model(src)
    with contextlib.redirect_stdout(io.StringIO()):  # quantize_model prints its bpw
        model, config = quantize_model(model, config, group_size, bits, quant_predicate=quant_predicate)
    dst.mkdir(parents=True, exist_ok=True)
    _save(dst, model, config, src)
    return dst
