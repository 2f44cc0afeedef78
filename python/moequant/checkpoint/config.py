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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..quant_formats import GROUP_SIZES
from .errors import CheckpointError
from .files import read_text, resolve_inside

FLAT_TYPES = ("kimi_k2", "deepseek_v3")
NESTED_TYPES = ("kimi_k25",)

# Fields of the DeepSeek-V3 text config the layout is computed from.
REQUIRED_INT = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "intermediate_size",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
)
MOE_INT = ("n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")
SOURCE_GROUP_SIZES = GROUP_SIZES  # requantize_int4's src_group_size: the kernels' group sizes

# Bounds checked before any table is built from the config, so an absurd value is
# refused at once instead of filling memory: ~10x Kimi-K2 (61 layers, 384 experts,
# 7168 hidden, 163840 vocab) and beyond any released MoE.
MAX_LAYERS = 1024
MAX_EXPERTS = 16384
MAX_EXPERT_SLOTS = 1 << 18  # MoE layers x routed experts: ~2.4M expected source tensors
MAX_DIM = 1 << 24


def is_int(v) -> bool:
    """Strictly an integer: JSON 32.0 is a float and true is a bool, neither is an int."""
    return type(v) is int


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
            and layer >= (t.get("first_k_dense_replace") or 0)
            and layer % (t.get("moe_layer_freq") or 1) == 0
        )

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(l) for l in range(self.num_layers))


def _fail(path, msg):
    raise CheckpointError(f"{path}: {msg}")


def parse_scheme(qc: dict, where: str, path) -> Int4Scheme:
    """Accept exactly INT4 symmetric group pack-quantized weights; refuse the rest."""
    if not isinstance(qc, dict):
        _fail(path, f"{where} is a {type(qc).__name__}, expected an object")
    method = qc.get("quant_method")
    if method != "compressed-tensors":
        _fail(
            path,
            f"{where}.quant_method is {method!r}; only compressed-tensors INT4 "
            "(format pack-quantized) or plain bf16 checkpoints are supported",
        )
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
        here = f"{where}.config_groups.{gname}"
        if not isinstance(g, dict):
            _fail(path, f"{here} is a {type(g).__name__}, expected an object")
        w = g.get("weights")
        if not isinstance(w, dict):
            _fail(path, f"{here}.weights is missing")
        if not is_int(w.get("num_bits")) or w["num_bits"] != 4 or w.get("type", "int") != "int":
            _fail(
                path,
                f"{here}.weights is {w.get('num_bits')}-bit {w.get('type')!r}; only 4-bit int is supported",
            )
        if w.get("symmetric") is not True:
            _fail(path, f"{here}.weights is asymmetric (zero points); only symmetric INT4 is supported")
        if w.get("strategy") != "group":
            _fail(path, f"{here}.weights.strategy is {w.get('strategy')!r}, expected 'group'")
        if not is_int(w.get("group_size")) or w["group_size"] not in SOURCE_GROUP_SIZES:
            _fail(
                path,
                f"{here}.weights.group_size is {w.get('group_size')!r}; "
                f"supported: {', '.join(map(str, SOURCE_GROUP_SIZES))}",
            )
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
        if not os.path.lexists(path):
            raise CheckpointError(f"{path}: not found (is {src} a model directory?)")
        path = resolve_inside(src, "config.json", "file", src)
    try:
        raw = json.loads(read_text(path))
    except RecursionError:
        raise CheckpointError(f"{path}: cannot parse: nested too deeply") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: cannot parse: {e}") from None
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
        _fail(
            path,
            f"model_type {mt!r} is not supported; expected one of {', '.join(NESTED_TYPES + FLAT_TYPES)}",
        )

    _check_sizes(text, path, "text_config." if prefix else "")
    if text.get("tie_word_embeddings") or raw.get("tie_word_embeddings"):
        _fail(path, "tie_word_embeddings is set; DeepSeek-V3 models in mlx-lm need a separate lm_head")

    top, nested = raw.get("quantization_config"), None
    if prefix:
        nested = text.get("quantization_config")
    if top is not None and nested is not None and top != nested:
        _fail(path, "quantization_config differs between the top level and text_config")
    qc = top if top is not None else nested
    where = "quantization_config" if top is not None else "text_config.quantization_config"
    if qc is not None and not isinstance(qc, dict):
        _fail(path, f"{where} is a {type(qc).__name__}, expected an object")
    if raw.get("quantization") is not None:
        _fail(path, "already has an MLX 'quantization' block: this is an MLX model, not a source checkpoint")
    scheme = parse_scheme(qc, where, path) if qc is not None else None
    return SourceConfig(Path(src), raw, mt, text, prefix, scheme)


def _check_sizes(text: dict, path, where: str) -> None:
    """Strict types and bounds of the fields the layout is computed from, before any
    table is built from them."""

    def integer(k, lo, hi, optional=False, nullable=False):
        v = text.get(k)
        if (k not in text and optional) or (v is None and nullable):
            return
        if not is_int(v) or not lo <= v <= hi:
            what = "missing, not" if k not in text else f"{json.dumps(v)}, not"
            _fail(path, f"{where}{k} is {what} an integer in [{lo}, {hi}]")

    for k in REQUIRED_INT:
        integer(k, 1, MAX_LAYERS if k == "num_hidden_layers" else MAX_DIM)
    integer("q_lora_rank", 1, MAX_DIM, optional=True, nullable=True)
    for k in ("attention_bias", "tie_word_embeddings"):
        if text.get(k) is not None and not isinstance(text[k], bool):
            _fail(path, f"{where}{k} is {text[k]!r}, expected true or false")
    if text.get("n_routed_experts") is None:
        return
    integer("n_routed_experts", 1, MAX_EXPERTS)
    integer("moe_intermediate_size", 1, MAX_DIM)
    integer("num_experts_per_tok", 1, text["n_routed_experts"])
    integer("n_shared_experts", 0, MAX_EXPERTS, optional=True, nullable=True)
    # A missing first_k_dense_replace / moe_layer_freq means 0 / 1; null is an error.
    integer("first_k_dense_replace", 0, MAX_LAYERS, optional=True)
    integer("moe_layer_freq", 1, MAX_LAYERS, optional=True)
    L, E = text["num_hidden_layers"], text["n_routed_experts"]
    first, freq = text.get("first_k_dense_replace") or 0, text.get("moe_layer_freq") or 1
    moe_layers = sum(1 for l in range(first, L) if l % freq == 0)
    if moe_layers * E > MAX_EXPERT_SLOTS:
        _fail(
            path,
            f"{where}n_routed_experts ({E}) x {moe_layers} MoE layers "
            f"({where}num_hidden_layers {L}) is more than {MAX_EXPERT_SLOTS} "
            "expert slots; refusing an implausible config",
        )
