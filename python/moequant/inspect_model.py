"""`moequant inspect DIR`: what an MLX model directory is made of, and, with ``--source``,
how far each re-quantized routed-expert tensor is from the exact INT4 original.

Composition comes from config.json and the safetensors headers only (no weights are
read), so it is instant on a 465 GB model. (The module is not called ``inspect`` so it
never shadows the standard library's.)
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from .checkpoint.config import SOURCE_GROUP_SIZES
from .checkpoint.files import read_text
from .checkpoint.safetensors_io import TensorInfo, read_mx, slice_info
from .checkpoint.source import read_tensors
from .errors import UserError
from .quant_formats import BITS

SUFFIXES = ("weight", "scales", "biases", "bias", "global_scale", "e_score_correction_bias")
# compressed-tensors INT4 modules of a source checkpoint (routed experts)
INT4_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
PROJS = ("gate_proj", "up_proj", "down_proj")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_SOURCE_EXPERT = re.compile(
    r"^(?:language_model\.)?model\.layers\.(\d+)\.mlp\.experts\.(\d+)\."
    r"(gate_proj|up_proj|down_proj)\.weight_packed$"
)


def read_headers(model_dir: Path) -> Dict[str, TensorInfo]:
    """name -> TensorInfo for every tensor of the model directory (checkpoint.source)."""
    return read_tensors(model_dir)[0]


def component_of(path: str) -> str:
    """The model-card component of a module path (Kimi's ``language_model.`` prefix and
    the DeepSeek-V3 layout)."""
    p = path.removeprefix("language_model.")
    if not p.startswith("model.") and not p.startswith("lm_head"):
        return "other"
    if "norm" in p.rpartition(".")[2]:
        return "norms"
    if "embed_tokens" in p:
        return "embedding"
    if p.startswith("lm_head"):
        return "lm_head"
    if ".self_attn." in p:
        return "attention"
    m = re.search(r"\.mlp\.(?:switch_mlp|experts\.\d+)\.(\w+_proj)$", p)
    if m:
        return f"experts.{m.group(1)}"
    if ".mlp.shared_experts." in p:
        return "shared_experts"
    if p.endswith(".mlp.gate"):
        return "router"
    if re.search(r"\.mlp\.\w+_proj$", p):
        return "dense_mlp"
    return "other"


def _quant_params(path: str, w_cols: int, s_cols: int, q: dict) -> Tuple[int, int]:
    """(bits, group_size) of an affine-quantized module: a per-path config entry if there
    is one, otherwise the default group size and the bits that the shapes imply (the
    same inference mlx-lm's loader makes)."""
    entry = q.get(path)
    if isinstance(entry, dict) and entry.get("bits"):
        return int(entry["bits"]), int(entry.get("group_size") or q.get("group_size") or 64)
    gs = int(q.get("group_size") or 64)
    bits, rem = divmod(w_cols * 32, s_cols * gs)
    if rem == 0 and bits in BITS:
        return bits, gs
    bits = int(q.get("bits") or 4)
    return bits, (w_cols * 32 // bits) // s_cols


def describe(model_dir: Path) -> dict:
    """Per module, per component and per layer: bits, group size, params, bytes."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not os.path.lexists(cfg_path):
        raise UserError(f"{model_dir}: no config.json (not a model directory)")
    try:
        config = json.loads(read_text(cfg_path))
    except (json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{cfg_path}: cannot parse: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"{cfg_path}: not a JSON object")
    q = config.get("quantization") if isinstance(config.get("quantization"), dict) else {}
    tensors = read_headers(model_dir)
    groups: Dict[str, Dict[str, TensorInfo]] = defaultdict(dict)
    for name, t in tensors.items():
        mod, _, leaf = name.rpartition(".")
        if leaf not in SUFFIXES + INT4_SUFFIXES:  # a bare parameter: a module of its own
            mod, leaf = name, "weight"
        groups[mod][leaf] = t

    modules = []
    for path in sorted(groups):
        g = groups[path]
        nbytes = sum(t.nbytes for t in g.values())
        w = g.get("weight")
        if "weight_packed" in g:  # compressed-tensors INT4: 8 codes per int32 word
            bits, gs = 4, _int4_group_size(g)
            packed = g["weight_packed"].shape
            params = math.prod(packed[:-1]) * packed[-1] * 8
            dtype = "int4"
        elif "scales" in g and w is not None:
            bits, gs = _quant_params(path, w.shape[-1], g["scales"].shape[-1], q)
            params = math.prod(w.shape[:-1]) * (w.shape[-1] * 32 // bits)
            params += math.prod(g["bias"].shape) if "bias" in g else 0
            dtype = f"{bits}-bit"
        else:
            params = sum(math.prod(t.shape) for t in g.values())
            bits, gs = None, None
            dtype = (w or next(iter(g.values()))).dtype.lower()
        m = _LAYER.search(path)
        modules.append(
            {
                "path": path,
                "component": component_of(path),
                "layer": int(m.group(1)) if m else None,
                "bits": bits,
                "group_size": gs,
                "dtype": dtype,
                "params": params,
                "bytes": nbytes,
            }
        )

    def roll(key_fn):
        acc = {}
        for m in modules:
            k = key_fn(m)
            a = acc.setdefault(k, {"params": 0, "bytes": 0, "dtypes": set(), "group_sizes": set()})
            a["params"] += m["params"]
            a["bytes"] += m["bytes"]
            a["dtypes"].add(m["dtype"])
            if m["group_size"]:
                a["group_sizes"].add(m["group_size"])
        return {k: _finish(v) for k, v in acc.items()}

    components = roll(lambda m: m["component"])
    layers = roll(lambda m: m["layer"] if m["layer"] is not None else -1)
    layers.pop(-1, None)
    # Per layer, the bits of each routed-expert projection and of attention.
    layer_bits: Dict[int, Dict[str, str]] = defaultdict(dict)
    for m in modules:
        if m["layer"] is not None and (
            m["component"].startswith("experts.") or m["component"] == "attention"
        ):
            key = m["component"].removeprefix("experts.")
            prev = layer_bits[m["layer"]].get(key)
            layer_bits[m["layer"]][key] = _join(prev, m["dtype"])
    for i, bits in layer_bits.items():
        layers[i]["bits"] = bits
    total_p = sum(m["params"] for m in modules)
    total_b = sum(m["bytes"] for m in modules)
    return {
        "model": str(model_dir),
        "model_type": config.get("model_type"),
        "format": (
            "compressed-tensors INT4 source checkpoint"
            if any(m["dtype"] == "int4" for m in modules)
            else "MLX"
        ),
        "recipe": {k: v for k, v in config.items() if k.startswith("moequant")} or None,
        "quantization_defaults": {k: q[k] for k in ("bits", "group_size", "mode") if k in q},
        "total": {
            "params": total_p,
            "bytes": total_b,
            "bits_per_weight": total_b * 8 / total_p if total_p else math.nan,
        },
        "components": components,
        "layers": {str(k): layers[k] for k in sorted(layers)},
        "modules": modules,
    }


def _int4_group_size(g: Dict[str, TensorInfo]) -> int:
    """The group size of a compressed-tensors INT4 module, from its tensors' shapes."""
    packed, scale = g["weight_packed"], g.get("weight_scale")
    k = packed.shape[-1] * 8 if packed.shape else 0
    if (
        scale is None
        or not scale.shape
        or not scale.shape[-1]
        or k % scale.shape[-1]
        or k // scale.shape[-1] not in SOURCE_GROUP_SIZES
    ):
        got = None if scale is None else list(scale.shape)
        raise UserError(
            f"{packed.file}: tensor {packed.name} ({list(packed.shape)}) has "
            f"weight_scale {got}: not INT4 groups of {SOURCE_GROUP_SIZES}"
        )
    return k // scale.shape[-1]


def _join(prev: Optional[str], new: str) -> str:
    parts = sorted(set((prev.split("/") if prev else []) + [new]))
    return "/".join(parts)


def _finish(a: dict) -> dict:
    return {
        "params": a["params"],
        "bytes": a["bytes"],
        "bits_per_weight": a["bytes"] * 8 / a["params"] if a["params"] else math.nan,
        "dtypes": sorted(a["dtypes"]),
        "group_sizes": sorted(a["group_sizes"]),
    }


def _float32(a):
    import mlx.core as mx

    return a.astype(mx.float32)


def recorded_fits(model_dir: Path) -> Dict[str, str]:
    """module path -> the fit moequant_recipe.json says made it (empty for a build
    without one, or made before fits were recorded)."""
    path = Path(model_dir) / "moequant_recipe.json"
    if not path.is_file():
        return {}
    try:
        modules = json.loads(read_text(path)).get("modules")
    except (json.JSONDecodeError, RecursionError, AttributeError, UserError):
        return {}
    if not isinstance(modules, dict):
        return {}
    return {p: m["fit"] for p, m in modules.items() if isinstance(m, dict) and isinstance(m.get("fit"), str)}


def expert_errors(model_dir: Path, source_dir: Path, desc: Optional[dict] = None) -> dict:
    """Relative Frobenius error ||W_build - W_int4|| / ||W_int4|| of every re-quantized
    routed-expert tensor against the exact dequantization of its INT4 source, summarized
    per (layer, projection), per projection and per layer.

    The error is measured on what the build stores, so it is exact whichever fit made
    it; the fit recorded in moequant_recipe.json is reported next to it.

    Both sides are computed exactly in float32: the source as (u - 8) * scale, the build
    as q * scale + bias with its bf16 scales and biases widened first (dequantizing in
    bf16 would add ~0.4% of rounding), so a lossless repack measures exactly 0. Tensors
    are read one expert at a time through the checkpoint reader (offsets and truncation
    checked)."""
    import mlx.core as mx

    from . import int4

    source_dir, model_dir = Path(source_dir), Path(model_dir)
    if not source_dir.is_dir():
        raise UserError(f"--source {source_dir}: no such directory")
    src = read_headers(source_dir)
    dst = read_headers(model_dir)
    desc = desc or describe(model_dir)
    by_path = {m["path"]: m for m in desc["modules"]}
    fits = recorded_fits(model_dir)
    found: Dict[Tuple[str, int, str], List[int]] = defaultdict(list)
    for name in src:
        m = _SOURCE_EXPERT.match(name)
        if m:
            prefix = "language_model." if name.startswith("language_model.") else ""
            found[(prefix, int(m.group(1)), m.group(3))].append(int(m.group(2)))
    if not found:
        raise UserError(
            f"--source {source_dir}: no INT4 expert tensors "
            "(model.layers.N.mlp.experts.E.*_proj.weight_packed)"
        )

    def tensor(index, name, where):
        if name not in index:
            raise UserError(f"{where}: tensor {name} is missing")
        return index[name]

    per = []
    for (prefix, layer, proj), experts in sorted(
        found.items(), key=lambda x: (x[0][1], PROJS.index(x[0][2]))
    ):
        base = f"model.layers.{layer}.mlp.switch_mlp.{proj}"
        path = next((p for p in (prefix + base, base) if p in by_path), None)
        if path is None or by_path[path]["bits"] is None:
            raise UserError(f"{model_dir}: no quantized {base} for the source's layer {layer} experts")
        bits, gs = by_path[path]["bits"], by_path[path]["group_size"]
        wq, sc, bi = (tensor(dst, f"{path}.{s}", model_dir) for s in ("weight", "scales", "biases"))
        if sorted(experts) != list(range(wq.shape[0])):
            raise UserError(f"{model_dir}: {path} holds {wq.shape[0]} experts, the source {len(experts)}")
        errs = []
        for e in sorted(experts):
            s = f"{prefix}model.layers.{layer}.mlp.experts.{e}.{proj}"
            g = {leaf: tensor(src, f"{s}.{leaf}", source_dir) for leaf in ("weight_packed", "weight_scale")}
            src_gs = _int4_group_size(g)
            exact = int4.dequantize(
                np.array(read_mx(g["weight_packed"])), np.array(_float32(read_mx(g["weight_scale"]))), src_gs
            )
            got = np.array(
                mx.dequantize(
                    read_mx(slice_info(wq, e)),
                    _float32(read_mx(slice_info(sc, e))),
                    _float32(read_mx(slice_info(bi, e))),
                    group_size=gs,
                    bits=bits,
                )
            )
            if got.shape != exact.shape:
                raise UserError(f"{path}[{e}]: shape {got.shape} differs from the source's {exact.shape}")
            den = float(np.linalg.norm(exact.astype(np.float64)))
            errs.append(float(np.linalg.norm(got.astype(np.float64) - exact)) / den if den else 0.0)
        errs = np.array(errs)
        per.append(
            {
                "layer": layer,
                "proj": proj,
                "bits": bits,
                "group_size": gs,
                "source_group_size": src_gs,
                "fit": fits.get(path),
                "experts": len(errs),
                "mean": float(errs.mean()),
                "max": float(errs.max()),
                "per_expert": errs.tolist(),
            }
        )

    def summary(key):
        out = {}
        for k in sorted({r[key] for r in per}, key=lambda x: PROJS.index(x) if key == "proj" else x):
            rows = [r for r in per if r[key] == k]
            n = sum(r["experts"] for r in rows)
            out[str(k)] = {
                "mean": sum(r["mean"] * r["experts"] for r in rows) / n,
                "max": max(r["max"] for r in rows),
                "tensors": n,
            }
        return out

    return {
        "source": str(source_dir),
        "metric": "||W_build - W_int4||_F / ||W_int4||_F per expert tensor",
        "per_layer_proj": per,
        "per_proj": summary("proj"),
        "per_layer": summary("layer"),
    }


# --------------------------------------------------------------------------- output


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.3f} MB"


def format_report(d: dict, errors: Optional[dict] = None) -> str:
    t = d["total"]
    lines = [
        f"{d['model']} ({d['model_type']}, {d['format']}): {t['params']:,} params, {_gb(t['bytes'])}, "
        f"{t['bits_per_weight']:.3f} bits/weight"
    ]
    lines.append(f"recipe: {json.dumps(d['recipe']) if d['recipe'] else '(none recorded)'}")
    if d["quantization_defaults"]:
        lines.append(f"quantization defaults: {d['quantization_defaults']}")
    lines += ["", f"{'component':<20} {'bits':<18} {'group':<8} {'params':>15} {'bytes':>14} {'bpw':>7}"]
    for name, c in sorted(d["components"].items(), key=lambda x: -x[1]["bytes"]):
        lines.append(
            f"{name:<20} {'/'.join(c['dtypes']):<18} "
            f"{'/'.join(map(str, c['group_sizes'])) or '-':<8} {c['params']:>15,} "
            f"{_gb(c['bytes']):>14} {c['bits_per_weight']:>7.3f}"
        )
    lines += [
        "",
        f"{'layer':>5} {'gate':<8} {'up':<8} {'down':<8} {'attention':<10} "
        f"{'params':>15} {'bytes':>14} {'bpw':>7}",
    ]
    for i, l in d["layers"].items():
        b = l.get("bits", {})
        lines.append(
            f"{i:>5} {b.get('gate_proj', '-'):<8} {b.get('up_proj', '-'):<8} "
            f"{b.get('down_proj', '-'):<8} {b.get('attention', '-'):<10} "
            f"{l['params']:>15,} {_gb(l['bytes']):>14} {l['bits_per_weight']:>7.3f}"
        )
    if errors:
        fits = sorted({r["fit"] or "not recorded" for r in errors["per_layer_proj"]})
        lines += [
            "",
            f"routed-expert error vs INT4 source ({errors['source']}): {errors['metric']}",
            f"fit: {', '.join(fits)} (from moequant_recipe.json)",
            f"{'layer':>5} " + " ".join(f"{p:>26}" for p in PROJS),
        ]
        cell = {(r["layer"], r["proj"]): r for r in errors["per_layer_proj"]}
        for layer in errors["per_layer"]:
            row = []
            for p in PROJS:
                r = cell.get((int(layer), p))
                fit = {"mse": "mse ", "minmax": ""}.get(r["fit"], "") if r else ""
                row.append(f"{r['bits']}b {fit}{r['mean']:.4f} (max {r['max']:.4f})" if r else "-")
            lines.append(f"{layer:>5} " + " ".join(f"{c:>26}" for c in row))
        lines.append(
            "mean "
            + " ".join(
                f"{errors['per_proj'][p]['mean']:>22.4f}" if p in errors["per_proj"] else f"{'-':>26}"
                for p in PROJS
            )
        )
    return "\n".join(lines)


def add_arguments(p):
    p.add_argument("dir", help="An MLX model directory (converted by moequant or mlx-lm).")
    p.add_argument(
        "--source",
        default=None,
        help="The original compressed-tensors INT4 checkpoint: also report each "
        "re-quantized expert tensor's relative error against it.",
    )
    p.add_argument("--output", default=None, help="Write the full report as JSON here.")


def run(args) -> int:
    model_dir = Path(args.dir)
    if not model_dir.is_dir():
        raise UserError(f"{args.dir}: no such directory")
    d = describe(model_dir)
    errors = expert_errors(model_dir, Path(args.source), d) if args.source else None
    print(format_report(d, errors))
    if args.output:
        report = dict(d, expert_error=errors)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nreport written to {args.output}")
    return 0
