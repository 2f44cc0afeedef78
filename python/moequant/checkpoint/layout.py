"""The tensors of a DeepSeek-V3-style model (Kimi K2 / K2.5), as mlx-lm lays them out,
and the source tensors each one is made from. Computed from the config alone, so the
planner and the converter agree on names, shapes and sizes.

Paths are canonical: mlx-lm module paths (or parameter names) without the
``language_model.`` prefix of kimi_k25, e.g. ``model.layers.3.mlp.switch_mlp.down_proj``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Tuple

from .config import SourceConfig

COMPONENTS = (
    "routed gate/up",
    "routed down",
    "attention",
    "shared experts",
    "dense MLP",
    "embeddings",
    "lm_head",
    "router",
    "norms & biases",
)


@dataclass(frozen=True)
class Item:
    """One output module (quantizable) or parameter (not quantizable)."""

    path: str
    layer: Optional[int]
    component: str
    kind: str  # linear | embedding | multilinear | switch | param
    shape: Tuple[int, ...]  # unquantized weight shape in mlx-lm's layout
    dtype: str = "bfloat16"  # dtype when left unquantized

    @property
    def quantizable(self) -> bool:
        return self.kind != "param"

    @property
    def params(self) -> int:
        return math.prod(self.shape)


@dataclass
class Job:
    """Items made together from the same source tensors.

    kind: ``param`` (copy), ``dense`` (one Linear/Embedding weight), ``kv_b`` (kv_b_proj
    split into embed_q and unembed_out, as mlx-lm's sanitize does) or ``experts``
    (per-expert tensors stacked into switch_mlp)."""

    kind: str
    items: List[Item]
    sources: List[str] = field(default_factory=list)


@dataclass
class Unit:
    """A unit of conversion and resumption: one decoder layer, or the embeddings+head."""

    index: int
    name: str
    jobs: List[Job]


class Expect(NamedTuple):  # a tuple: built 200k times for Kimi
    """What a source tensor must look like."""

    shape: Tuple[int, ...]
    kind: str  # float | packed | shape (a compressed-tensors weight_shape) | fp32


def build_layout(cfg: SourceConfig) -> Tuple[List[Unit], Dict[str, Expect]]:
    """Units in conversion order and the expected source tensors (full names)."""
    t, p = cfg.text, cfg.prefix
    H = t["hidden_size"]
    heads = t["num_attention_heads"]
    nope, rope, vdim = t["qk_nope_head_dim"], t["qk_rope_head_dim"], t["v_head_dim"]
    kv_lora, q_lora = t["kv_lora_rank"], t.get("q_lora_rank")
    bias = bool(t.get("attention_bias", False))
    expect: Dict[str, Expect] = {}
    units: List[Unit] = []

    def src(name, shape, kind="float"):
        full = p + name
        expect[full] = Expect(tuple(shape), kind)
        return full

    def norm(path, dim, layer):
        return Job("param", [Item(path, layer, "norms & biases", "param", (dim,))], [src(path, (dim,))])

    def linear(path, out_dim, in_dim, layer, comp, kind="linear"):
        jobs = [
            Job(
                "dense",
                [Item(path, layer, comp, kind, (out_dim, in_dim))],
                [src(path + ".weight", (out_dim, in_dim))],
            )
        ]
        return jobs

    def linear_b(path, out_dim, in_dim, layer):
        jobs = linear(path, out_dim, in_dim, layer, "attention")
        if bias:
            jobs.append(
                Job(
                    "param",
                    [Item(path + ".bias", layer, "norms & biases", "param", (out_dim,))],
                    [src(path + ".bias", (out_dim,))],
                )
            )
        return jobs

    for l in range(cfg.num_layers):
        a = f"model.layers.{l}.self_attn"
        jobs = [norm(f"model.layers.{l}.input_layernorm.weight", H, l)]
        if q_lora is None:
            jobs += linear_b(f"{a}.q_proj", heads * (nope + rope), H, l)
        else:
            jobs += linear_b(f"{a}.q_a_proj", q_lora, H, l)
            jobs.append(norm(f"{a}.q_a_layernorm.weight", q_lora, l))
            jobs += linear_b(f"{a}.q_b_proj", heads * (nope + rope), q_lora, l)
        jobs += linear_b(f"{a}.kv_a_proj_with_mqa", kv_lora + rope, H, l)
        jobs.append(norm(f"{a}.kv_a_layernorm.weight", kv_lora, l))
        jobs.append(
            Job(
                "kv_b",
                [
                    Item(f"{a}.embed_q", l, "attention", "multilinear", (heads, kv_lora, nope)),
                    Item(f"{a}.unembed_out", l, "attention", "multilinear", (heads, vdim, kv_lora)),
                ],
                [src(f"{a}.kv_b_proj.weight", (heads * (nope + vdim), kv_lora))],
            )
        )
        jobs += linear_b(f"{a}.o_proj", H, heads * vdim, l)
        jobs.append(norm(f"model.layers.{l}.post_attention_layernorm.weight", H, l))
        m = f"model.layers.{l}.mlp"
        if cfg.is_moe_layer(l):
            E, I = t["n_routed_experts"], t["moe_intermediate_size"]
            jobs.append(
                Job(
                    "param",
                    [Item(f"{m}.gate.weight", l, "router", "param", (E, H))],
                    [src(f"{m}.gate.weight", (E, H))],
                )
            )
            jobs.append(
                Job(
                    "param",
                    [Item(f"{m}.gate.e_score_correction_bias", l, "router", "param", (E,), "float32")],
                    [src(f"{m}.gate.e_score_correction_bias", (E,), "fp32")],
                )
            )
            for proj, (n, k) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                comp = "routed down" if proj == "down_proj" else "routed gate/up"
                sources = []
                for e in range(E):
                    base = f"{m}.experts.{e}.{proj}"
                    if cfg.scheme is None:
                        sources.append(src(base + ".weight", (n, k)))
                    else:
                        gs = cfg.scheme.group_size
                        sources += [
                            src(base + ".weight_packed", (n, k // 8), "packed"),
                            src(base + ".weight_scale", (n, k // gs)),
                            src(base + ".weight_shape", (2,), "shape"),
                        ]
                jobs.append(
                    Job("experts", [Item(f"{m}.switch_mlp.{proj}", l, comp, "switch", (E, n, k))], sources)
                )
            if t.get("n_shared_experts"):
                si = I * t["n_shared_experts"]
                for proj, (n, k) in (("gate_proj", (si, H)), ("up_proj", (si, H)), ("down_proj", (H, si))):
                    jobs += linear(f"{m}.shared_experts.{proj}", n, k, l, "shared experts")
        else:
            DI = t["intermediate_size"]
            for proj, (n, k) in (("gate_proj", (DI, H)), ("up_proj", (DI, H)), ("down_proj", (H, DI))):
                jobs += linear(f"{m}.{proj}", n, k, l, "dense MLP")
        units.append(Unit(l, f"layer {l}", jobs))

    V = t["vocab_size"]
    head = linear("model.embed_tokens", V, H, None, "embeddings", "embedding")
    head.append(norm("model.norm.weight", H, None))
    head += linear("lm_head", V, H, None, "lm_head")
    units.append(Unit(cfg.num_layers, "embeddings & head", head))
    return units, expect


def all_items(units: List[Unit]) -> List[Item]:
    return [it for u in units for j in u.jobs for it in j.items]


def is_dropped(name: str, cfg: SourceConfig) -> bool:
    """Source tensors mlx-lm's sanitize discards: the vision side of kimi_k25, layers past
    num_hidden_layers (multi-token prediction) and precomputed rotary frequencies."""
    if cfg.prefix and not name.startswith(cfg.prefix):
        return name.split(".")[0] in ("vision_tower", "vision_model", "mm_projector", "multi_modal_projector")
    rest = name[len(cfg.prefix) :]
    if "rotary_emb.inv_freq" in rest:
        return True
    parts = rest.split(".")
    return (
        len(parts) > 2
        and parts[0] == "model"
        and parts[1] == "layers"
        and parts[2].isdigit()
        and int(parts[2]) >= cfg.num_layers
    )
