"""Source config.json flavours and the INT4 compressed-tensors scheme they declare.

Flavours:
  kimi_k25     text model under ``text_config``, tensors prefixed ``language_model.``,
               ``quantization_config`` nested in ``text_config`` (perhaps also copied
               to the top level), vision tower and projector present (dropped).
  kimi_k2 / deepseek_v3   a flat DeepSeek-V3 config, ``quantization_config`` at the top.
A config without ``quantization_config`` is a plain bf16 checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import CheckpointError

FLAT_TYPES = ("kimi_k2", "deepseek_v3")
NESTED_TYPES = ("kimi_k25",)

# Fields of the DeepSeek-V3 text config the layout is computed from.
REQUIRED_INT = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
    "intermediate_size", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "v_head_dim",
)
MOE_INT = ("n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")
SOURCE_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class Int4Scheme:
    """Routed experts stored as compressed-tensors pack-quantized INT4, symmetric."""

    group_size: int


@dataclass
class SourceConfig:
    path: Path
    raw: dict  # the whole config.json
    flavour: str  # kimi_k25, kimi_k2 or deepseek_v3
    text: dict  # the DeepSeek-V3 text config (raw itself for flat flavours)
    prefix: str  # tensor-name prefix of the language model
    scheme: Optional[Int4Scheme]  # None: a plain bf16 checkpoint

    @property
    def num_layers(self) -> int:
        return self.text["num_hidden_layers"]

    def is_moe_layer(self, layer: int) -> bool:
        t = self.text
        return (
            t.get("n_routed_experts") is not None
            and layer >= t.get("first_k_dense_replace", 0)
            and layer % t.get("moe_layer_freq", 1) == 0
        )


def _fail(path, msg):
    raise CheckpointError(f"{path}: {msg}")


def parse_scheme(qc: dict, where: str, path) -> Int4Scheme:
    """Accept exactly INT4 symmetric group pack-quantized weights; refuse the rest."""
    method = qc.get("quant_method")
    if method != "compressed-tensors":
        _fail(path, f"{where}.quant_method is {method!r}; only compressed-tensors INT4 "
                    "(format pack-quantized) or plain bf16 checkpoints are supported")
    fmt = qc.get("format")
    if fmt != "pack-quantized":
        kind = " (FP8)" if fmt == "float-quantized" else ""
        _fail(path, f"{where}.format is {fmt!r}{kind}; only 'pack-quantized' INT4 is supported")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        _fail(path, f"{where}.quantization_status is {status!r}, expected 'compressed'")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        _fail(path, f"{where}.config_groups is missing or empty")
    schemes = set()
    for gname, g in groups.items():
        w = (g or {}).get("weights")
        here = f"{where}.config_groups.{gname}"
        if not isinstance(w, dict):
            _fail(path, f"{here}.weights is missing")
        if w.get("num_bits") != 4 or w.get("type", "int") != "int":
            _fail(path, f"{here}.weights is {w.get('num_bits')}-bit {w.get('type')!r}; "
                        "only 4-bit int is supported")
        if w.get("symmetric") is not True:
            _fail(path, f"{here}.weights is asymmetric (zero points); only symmetric "
                        "INT4 is supported")
        if w.get("strategy") != "group":
            _fail(path, f"{here}.weights.strategy is {w.get('strategy')!r}, expected 'group'")
        if w.get("group_size") not in SOURCE_GROUP_SIZES:
            _fail(path, f"{here}.weights.group_size is {w.get('group_size')!r}; "
                        f"supported: {', '.join(map(str, SOURCE_GROUP_SIZES))}")
        if w.get("dynamic"):
            _fail(path, f"{here}.weights.dynamic is set; only static weights are supported")
        for act in ("input_activations", "output_activations"):
            if g.get(act) is not None:
                _fail(path, f"{here}.{act} is set; activation quantization is not supported")
        schemes.add(Int4Scheme(w["group_size"]))
    if len(schemes) != 1:
        _fail(path, f"{where}.config_groups disagree on the group size")
    return schemes.pop()


def read_config(src: Path) -> SourceConfig:
    """Read ``src/config.json`` (``src`` may also be the config file itself)."""
    src = Path(src)
    if src.is_file():
        src, path = src.parent, src
    else:
        path = src / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (is {src} a model directory?)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot parse: {e}") from e
    if not isinstance(raw, dict):
        _fail(path, "not a JSON object")
    mt = raw.get("model_type")
    if mt in NESTED_TYPES:
        text = raw.get("text_config")
        if not isinstance(text, dict):
            _fail(path, f"model_type {mt} needs a text_config object")
        prefix = "language_model."
    elif mt in FLAT_TYPES:
        text, prefix = raw, ""
    else:
        _fail(path, f"model_type {mt!r} is not supported; expected one of "
                    f"{', '.join(NESTED_TYPES + FLAT_TYPES)}")

    for k in REQUIRED_INT:
        if not isinstance(text.get(k), int) or text[k] <= 0:
            _fail(path, f"{'text_config.' if prefix else ''}{k} is missing or not a positive integer")
    if text.get("n_routed_experts") is not None:
        for k in MOE_INT:
            if not isinstance(text.get(k), int) or text[k] <= 0:
                _fail(path, f"{'text_config.' if prefix else ''}{k} is missing or not a positive integer")
    if text.get("q_lora_rank") is not None and not isinstance(text["q_lora_rank"], int):
        _fail(path, "q_lora_rank must be an integer or null")
    if text.get("tie_word_embeddings") or raw.get("tie_word_embeddings"):
        _fail(path, "tie_word_embeddings is set; DeepSeek-V3 models in mlx-lm need a separate lm_head")

    top, nested = raw.get("quantization_config"), None
    if prefix:
        nested = text.get("quantization_config")
    if top is not None and nested is not None and top != nested:
        _fail(path, "quantization_config differs between the top level and text_config")
    qc = top if top is not None else nested
    where = "quantization_config" if top is not None else "text_config.quantization_config"
    if raw.get("quantization") is not None:
        _fail(path, "already has an MLX 'quantization' block: this is an MLX model, not a source checkpoint")
    scheme = parse_scheme(qc, where, path) if qc is not None else None
    return SourceConfig(Path(src), raw, mt, text, prefix, scheme)
