"""`moequant plan`: what a recipe does to a model, from config.json (and, when the
checkpoint is there, its validated safetensors headers) without reading tensor data.
The sizes come from `layout` (the same definition convert writes by)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from .checkpoint import Item, Source, SourceConfig, read_config
from .checkpoint.layout import all_items, build_layout
from .layout import ComponentRow, expert_bpw, fmt_bytes, summarize
from .recipes import PRESETS, Resolution, load_recipe, parse_upgrade_layers, resolve


@dataclass
class Plan:
    cfg: SourceConfig
    resolution: Resolution
    items: List[Item]
    rows: List[ComponentRow]
    input_bytes: Optional[int]  # from the headers, when the checkpoint was read

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.rows)

    @property
    def bpw(self) -> float:
        return self.bytes * 8 / self.params

    def component(self, name: str) -> ComponentRow:
        return next(r for r in self.rows if r.name == name)

    @property
    def expert_bpw(self) -> float:
        return expert_bpw(self.rows)

    def to_json(self) -> dict:
        return {
            "model_type": self.cfg.flavour,
            "recipe": self.resolution.recipe.name,
            "selected_layers": self.resolution.selected,
            "auto_pending": self.resolution.auto_pending,
            "auto_losses": {i: loss for i, (_, loss) in self.resolution.auto_losses.items()},
            "components": [
                {
                    "name": r.name,
                    "params": r.params,
                    "bytes": r.bytes,
                    "bits_per_weight": r.bpw,
                    "bits": r.kinds,
                }
                for r in self.rows
            ],
            "total_params": self.params,
            "total_bytes": self.bytes,
            "bits_per_weight": self.bpw,
            "expert_bits_per_weight": self.expert_bpw,
            "input_bytes": self.input_bytes,
        }


def make_plan(src, recipe: str, upgrade_layers=None, sensitivity=None) -> Plan:
    """src: a checkpoint directory (its headers are validated when it has safetensors
    files) or a config.json path."""
    src = Path(src)
    source = None
    if src.is_dir() and (any(src.glob("*.safetensors")) or (src / "model.safetensors.index.json").exists()):
        source = Source.open(src)
        cfg, units = source.cfg, source.units
    else:
        cfg = read_config(src)
        units, _ = build_layout(cfg)
    items = all_items(units)
    res = resolve(
        load_recipe(recipe),
        items,
        num_layers=cfg.num_layers,
        int4_group=cfg.scheme.group_size if cfg.scheme else None,
        upgrade_layers=parse_upgrade_layers(upgrade_layers)
        if isinstance(upgrade_layers, (str, type(None)))
        else upgrade_layers,
        sensitivity=sensitivity,
    )
    input_bytes = sum(source.unit_input_bytes(u) for u in units) if source else None
    return Plan(cfg, res, items, summarize(items, res.decisions), input_bytes)


def _fmt_params(n: int) -> str:
    for div, suf in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suf}"
    return str(n)


def _share(x: float) -> str:
    return "<1%" if x < 0.005 else f"{x:.0%}"


def format_table(rows: List[ComponentRow], extra_total: str = "") -> str:
    lines = [f"{'component':<16} {'params':>9} {'size':>11} {'bpw':>6}  bits"]
    for r in rows:
        kinds = ", ".join(
            f"{k} ({_share(v / r.params)})" if len(r.kinds) > 1 else k
            for k, v in sorted(r.kinds.items(), key=lambda kv: -kv[1])
        )
        lines.append(
            f"{r.name:<16} {_fmt_params(r.params):>9} {fmt_bytes(r.bytes):>11} {r.bpw:>6.3f}  {kinds}"
        )
    params = sum(r.params for r in rows)
    size = sum(r.bytes for r in rows)
    lines.append(
        f"{'total':<16} {_fmt_params(params):>9} {fmt_bytes(size):>11} "
        f"{size * 8 / params:>6.3f}  {extra_total}"
    )
    return "\n".join(lines)


def format_plan(plan: Plan) -> str:
    res = plan.resolution
    head = [
        f"model_type {plan.cfg.flavour}, {plan.cfg.num_layers} layers, source "
        + (f"INT4 g{plan.cfg.scheme.group_size} experts" if plan.cfg.scheme else "bf16")
        + f"; recipe {res.recipe.name}"
    ]
    head += res.selection_lines() + res.notes
    total = (
        f"{fmt_bytes(plan.bytes)} ({plan.bytes / 2**30:.2f} GiB); routed experts {plan.expert_bpw:.3f} bpw"
    )
    if plan.input_bytes:
        total += f"; input {fmt_bytes(plan.input_bytes)}"
    return "\n".join(head + [format_table(plan.rows, total)])


# --------------------------------------------------------------------------- KV cache

KV_CONTEXTS = (32768, 131072)  # 32K and 128K, then the model's maximum context


def kv_cache_table(text: dict, group_size: int = 64) -> Optional[dict]:
    """Bytes of the MLA latent KV cache (all layers, one sequence) at 32K, 128K and the
    model's max context: fp16/bf16, the int8 codes alone (the model card's "int8"
    column), and moequant's 8-bit and 4-bit caches with their scales and biases
    (kv_cache.bytes_per_token). None for a config without MLA."""
    from .kv_cache import bytes_per_token, mla_dims

    dims = mla_dims(text)
    if dims is None:
        return None
    r, dr = dims
    layers = text["num_hidden_layers"]
    contexts = list(KV_CONTEXTS)
    mx_ctx = text.get("max_position_embeddings")
    if isinstance(mx_ctx, int) and mx_ctx > 0 and mx_ctx not in contexts:
        contexts.append(mx_ctx)
    per_tok = {"fp16": bytes_per_token(r, dr), "int8 codes": bytes_per_token(r, dr, dtype_bytes=1)}
    for bits in (8, 4):
        if r % group_size == 0 and dr % group_size == 0:
            per_tok[f"{bits}-bit g{group_size}"] = bytes_per_token(r, dr, bits, group_size)
    out = {
        "kv_lora_rank": r,
        "qk_rope_head_dim": dr,
        "layers": layers,
        "max_context": mx_ctx,
        "bytes_per_token_layer": per_tok,
        "rows": [{"context": n, **{k: n * v * layers for k, v in per_tok.items()}} for n in contexts],
    }
    if isinstance(text.get("index_head_dim"), int):
        # deepseek_v32's indexer keeps its own 16-bit keys (and mlx-lm a zeros array of
        # the same size as their values) next to every column: kv_cache.MLACacheList.
        out["indexer_bytes_per_token_layer"] = 2 * bytes_per_token(text["index_head_dim"], 0)
    return out


def format_kv_table(kv: dict) -> str:
    cols = list(kv["bytes_per_token_layer"])
    lines = [
        f"KV cache (MLA latent {kv['kv_lora_rank']} + rope {kv['qk_rope_head_dim']} values "
        f"per token and layer, {kv['layers']} layers; one sequence)",
        f"{'context':<16}" + "".join(f"{c:>14}" for c in cols),
    ]
    for row in kv["rows"]:
        n = row["context"]
        name = f"{n // 1024}K" + (" (max)" if n == kv["max_context"] else "")
        lines.append(f"{name:<16}" + "".join(f"{row[c] / 1e9:>11.1f} GB" for c in cols))
    lines.append(
        "per token, all layers: "
        + ", ".join(f"{c} {v * kv['layers'] / 1e3:.1f} KB" for c, v in kv["bytes_per_token_layer"].items())
    )
    lines.append(
        "int8 codes: the codes alone (the model card's int8 column); 8-bit/4-bit: "
        "moequant generate --kv-bits, with their bf16 scales and biases."
    )
    ix = kv.get("indexer_bytes_per_token_layer")
    if ix:
        lines.append(
            f"plus the sparse-attention indexer's cache (16-bit keys and mlx-lm's same-size zero values, not quantized): "
            f"{ix * kv['layers'] / 1e3:.1f} KB per token, "
            + ", ".join(
                f"{row['context'] // 1024}K {row['context'] * ix * kv['layers'] / 1e9:.1f} GB"
                for row in kv["rows"]
            )
        )
    return "\n".join(lines)


def add_recipe_arguments(p):
    """--recipe and --upgrade-layers, the same for plan and convert."""
    p.add_argument(
        "--recipe", default="alis-3.6", help=f"Preset ({', '.join(PRESETS)}) or a recipe JSON file."
    )
    p.add_argument(
        "--upgrade-layers",
        default=None,
        help="Override the recipe's layer selection: spread, auto or a list like 3,10,17.",
    )


def add_arguments(p):
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--hf-path", help="Source checkpoint directory (headers are validated).")
    g.add_argument("--config", help="A config.json (or its directory): plan from the config alone.")
    add_recipe_arguments(p)
    p.add_argument("--json", action="store_true", help="Print the plan as JSON.")
    p.add_argument(
        "--keep-vision",
        action="store_true",
        help="kimi_k25: also size the vision tower and projector kept by "
        "`convert --keep-vision` (bf16, or the recipe's vision_projector), as their own row.",
    )


def run(args) -> int:
    plan = make_plan(args.hf_path or args.config, args.recipe, args.upgrade_layers)
    kv = kv_cache_table(plan.cfg.text)
    text_bytes, extra = plan.bytes, []
    if args.keep_vision:  # the -VLM sibling: the text build plus the vision row
        from . import vision

        row = vision.config_row(plan.cfg, plan.resolution.recipe.spec)
        plan.rows.append(row)
        extra = vision.plan_lines(text_bytes, row)
    if args.json:
        out = dict(plan.to_json(), kv_cache=kv)
        if args.keep_vision:
            out["text_build_bytes"] = text_bytes
        print(json.dumps(out, indent=2))
    else:
        print("\n".join([format_plan(plan)] + extra) + (f"\n\n{format_kv_table(kv)}" if kv else ""))
    return 0
