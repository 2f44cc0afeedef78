"""Recipes: ordered rules mapping module paths (and optionally layer sets) to a
quantization, resolved against a model layout.

A recipe is a JSON object ``{"description": ..., "rules": [rule, ...]}``. Each rule is

    {"match": PATTERN, ["layers": LAYERS,] "bits": B, "group_size": G[, "fit": FIT]}   or
    {"match": PATTERN, ["layers": LAYERS,] "keep": true}

PATTERN is a glob over the canonical module path (``*`` crosses dots), e.g.
``*.switch_mlp.down_proj``, or ``re:REGEX`` (full match). Paths are mlx-lm module paths
without kimi_k25's ``language_model.`` prefix. LAYERS restricts the rule to decoder
layers: a list of indices, or a selection among the layers the pattern matches:
``{"select": "spread" | "auto", "count": C, "per": P}`` (C of every P matched layers,
rounded, at least 1; without "per", C layers), or ``{"select": "mlx_mixed"}`` (mlx-lm's
mixed-recipe ``use_more_bits`` layers). ``spread`` spaces the layers evenly; ``auto``
takes the layers whose modules lose most at the quantization they would otherwise get.

FIT chooses how each group's scale and bias are found: ``minmax`` (the default; MLX's
``mx.quantize`` rule, what every published MLX build uses) or ``mse`` (a per-group
least-squares fit of the same storage format: the same file size, a lower weight error,
more compute; never worse than ``minmax`` group by group). ``--fit`` on the command line
overrides every rule's fit.

The first matching rule wins; an unmatched module stays unquantized. Only quantizable
modules (Linear, Embedding, MultiLinear, SwitchLinear) are considered: the router, norms
and biases are never quantized. ``keep`` leaves a bf16 module in bf16 and repacks INT4
experts losslessly (MLX 4-bit at the source group size). As in mlx-lm, a module whose
input dimension the group size does not divide stays unquantized.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from ..checkpoint.config import is_int as _is_int
from ..checkpoint.errors import CheckpointError
from ..checkpoint.files import read_text
from ..checkpoint.layout import Item
from ..errors import UserError
from ..quant_formats import BITS, GROUP_SIZES
from .presets import ALIASES, PRESETS

FITS = ("minmax", "mse")


class RecipeError(UserError):
    """A recipe file or option is invalid."""


@dataclass(frozen=True)
class Decision:
    bits: int
    group_size: int
    repack: bool = False  # INT4 experts kept as they are (no re-quantization)
    fit: str = "minmax"  # how scales and biases are chosen (FITS); moot for a repack

    def as_config(self) -> dict:
        """mlx-lm's per-module entry (the fit changes values, not the format)."""
        return {"group_size": self.group_size, "bits": self.bits, "mode": "affine"}

    def record(self) -> dict:
        """The per-module entry of moequant_recipe.json."""
        if self.repack:
            return self.as_config() | {"repacked_int4": True}
        return self.as_config() | {"fit": self.fit}


@dataclass
class Recipe:
    name: str
    spec: dict  # the declarative form, as loaded

    @property
    def rules(self) -> List[dict]:
        return self.spec["rules"]


@dataclass
class Resolution:
    """A recipe applied to a layout: one Decision (or None: unquantized) per item."""

    recipe: Recipe
    decisions: Dict[str, Optional[Decision]]
    selected: Dict[int, List[int]] = field(default_factory=dict)  # rule index -> layers
    notes: List[str] = field(default_factory=list)
    # 'auto' rules: rule index -> (the decision the layers were measured at, layer -> loss);
    # auto rules resolved without measurements (planning) are listed in auto_pending.
    auto_losses: Dict[int, tuple] = field(default_factory=dict)
    auto_pending: List[int] = field(default_factory=list)

    def selection_lines(self) -> List[str]:
        """One line per layer-restricted rule: the layers and how they were chosen."""
        lines = []
        for i, layers in self.selected.items():
            head = f"rule {i} ({self.recipe.rules[i]['match']})"
            if i in self.auto_losses:
                d, loss = self.auto_losses[i]
                ranked = ", ".join(
                    f"{l}: {loss[l]:.4g}{' *' if l in layers else ''}"
                    for l in sorted(loss, key=lambda l: (-loss[l], l))
                )
                lines.append(
                    f"{head}: auto chose layers {layers}, the {len(layers)} of "
                    f"{len(loss)} with the largest measured relative squared error "
                    f"at {d.bits}-bit g{d.group_size} fit {d.fit} (layer: error, * chosen): {ranked}"
                )
            elif i in self.auto_pending:
                lines.append(
                    f"{head}: {len(layers)} layer(s) to be chosen by measured error "
                    "during conversion (auto); sizes do not depend on which"
                )
            else:
                lines.append(f"{head}: layers {layers}")
        return lines

    def applied(self, prefix: str = "") -> dict:
        """The record written next to a converted model."""
        return {
            "recipe": self.recipe.name,
            "spec": self.recipe.spec,
            "selected_layers": {str(k): v for k, v in self.selected.items()},
            "auto_losses": {
                str(k): {str(l): v for l, v in loss.items()} for k, (_, loss) in self.auto_losses.items()
            },
            "notes": self.notes,
            "fit": self.fits(),
            "modules": {prefix + p: d.record() if d else "unquantized" for p, d in self.decisions.items()},
        }

    def fits(self) -> List[str]:
        """The fits of the re-quantized modules, sorted (empty when nothing is)."""
        return sorted({d.fit for d in self.decisions.values() if d is not None and not d.repack})


def load_recipe(name_or_path: str) -> Recipe:
    name_or_path = ALIASES.get(name_or_path, name_or_path)
    if name_or_path in PRESETS:
        return Recipe(name_or_path, validate_spec(PRESETS[name_or_path], name_or_path))
    path = Path(name_or_path)
    if not path.exists():
        raise RecipeError(
            f"unknown recipe {name_or_path!r}: not a preset ({', '.join(PRESETS)}) nor an existing file"
        )
    try:
        spec = json.loads(read_text(path))  # a regular file only: a FIFO must not block
    except (json.JSONDecodeError, RecursionError, CheckpointError) as e:
        raise RecipeError(f"{path}: cannot parse recipe: {e}") from None
    return Recipe(path.stem, validate_spec(spec, str(path)))


def validate_spec(spec, where: str) -> dict:
    if not isinstance(spec, dict) or not isinstance(spec.get("rules"), list) or not spec["rules"]:
        raise RecipeError(f"{where}: a recipe is an object with a non-empty 'rules' list")
    for i, r in enumerate(spec["rules"]):
        here = f"{where}: rule {i}"
        if not isinstance(r, dict) or not isinstance(r.get("match"), str):
            raise RecipeError(f"{here}: needs a 'match' pattern string")
        unknown = set(r) - {"match", "layers", "bits", "group_size", "keep", "fit"}
        if unknown:
            raise RecipeError(f"{here}: unknown keys {sorted(unknown)}")
        if r["match"].startswith("re:"):
            try:
                re.compile(r["match"][3:])
            except re.error as e:
                raise RecipeError(f"{here}: bad regex: {e}") from e
        if r.get("keep"):
            if "bits" in r or "group_size" in r or "fit" in r:
                raise RecipeError(f"{here}: 'keep' excludes bits, group_size and fit")
        else:
            _check_format(r, here, ' (or use "keep": true)')
        if "layers" in r:
            _check_layers(r["layers"], here)
    vp = spec.get("vision_projector")  # --keep-vision builds: quantize the projector's linears
    if vp is not None:
        here = f"{where}: vision_projector"
        if not isinstance(vp, dict):
            raise RecipeError(f'{here}: an object {{"bits", "group_size"[, "fit"]}}')
        unknown = set(vp) - {"bits", "group_size", "fit"}
        if unknown:
            raise RecipeError(f"{here}: unknown keys {sorted(unknown)}")
        _check_format(vp, here)
    return spec


def _check_format(r: dict, here: str, hint: str = "") -> None:
    """bits, group_size and the optional fit of a rule or of vision_projector."""
    if not _is_int(r.get("bits")) or r["bits"] not in BITS:
        raise RecipeError(f"{here}: bits must be one of {BITS}{hint}")
    if not _is_int(r.get("group_size")) or r["group_size"] not in GROUP_SIZES:
        raise RecipeError(f"{here}: group_size must be one of {GROUP_SIZES}")
    if "fit" in r and r["fit"] not in FITS:
        raise RecipeError(f"{here}: fit must be one of {FITS}")


def _check_layers(layers, here):
    if isinstance(layers, list):
        if not all(_is_int(x) and x >= 0 for x in layers):
            raise RecipeError(f"{here}: layers must be non-negative integers")
        return
    if not isinstance(layers, dict) or layers.get("select") not in ("spread", "auto", "mlx_mixed"):
        raise RecipeError(f'{here}: layers must be a list or {{"select": "spread"|"auto"|"mlx_mixed", ...}}')
    if layers["select"] != "mlx_mixed":
        if not _is_int(layers.get("count")) or layers["count"] < 1:
            raise RecipeError(f"{here}: a {layers['select']} selection needs a positive 'count'")
        if "per" in layers and (not _is_int(layers["per"]) or layers["per"] < 1):
            raise RecipeError(f"{here}: 'per' must be a positive integer")


def parse_upgrade_layers(value: Optional[str]):
    """--upgrade-layers: 'spread', 'auto' or a comma-separated list of layer indices."""
    if value is None or value in ("spread", "auto"):
        return value
    try:
        layers = sorted({int(x) for x in value.split(",") if x.strip()})
    except ValueError:
        raise RecipeError(
            f"--upgrade-layers {value!r}: expected spread, auto or a list like 3,10,17"
        ) from None
    if not layers or layers[0] < 0:
        raise RecipeError(f"--upgrade-layers {value!r}: expected non-negative layer indices")
    return layers


def _matches(pattern: str, path: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], path) is not None
    return fnmatch.fnmatchcase(path, pattern)


def _mlx_mixed_layers(num_layers: int) -> set:
    L = num_layers
    return {i for i in range(L) if i < L // 8 or i >= 7 * L // 8 or (i - L // 8) % 3 == 2}


def _count(sel: dict, n: int) -> int:
    if "per" in sel:
        return max(1, min(n, math.floor(sel["count"] * n / sel["per"] + 0.5)))
    return min(n, sel["count"])


def spread(candidates: Sequence[int], k: int) -> List[int]:
    """k of the sorted candidates, evenly spaced (the centre of each of k equal bins)."""
    n = len(candidates)
    return [candidates[math.floor((i + 0.5) * n / k)] for i in range(k)]


Sensitivity = Callable[[List[Item], Decision], float]


def resolve(
    recipe: Recipe,
    items: Sequence[Item],
    *,
    num_layers: int,
    int4_group: Optional[int],
    upgrade_layers=None,
    sensitivity: Optional[Sensitivity] = None,
    fit: Optional[str] = None,
) -> Resolution:
    """Apply the recipe to the layout's items.

    int4_group: the source group size when routed experts are INT4 (None for bf16).
    upgrade_layers: overrides every spread/auto selection ('spread', 'auto' or a list).
    fit: overrides every rule's fit (--fit); the layers of an 'auto' rule are ranked by
    the error of the fit they would otherwise get.
    sensitivity(items_of_one_layer, decision) -> loss, used by 'auto' selections; without
    it (e.g. when planning) 'auto' falls back to the spread layers, which give the same size.
    """
    rules = recipe.rules
    quantizable = [it for it in items if it.quantizable]
    res = Resolution(recipe, {})

    def decide(it: Item, rule_layers: Dict[int, set], start: int = 0):
        for i in range(start, len(rules)):
            r = rules[i]
            if not _matches(r["match"], it.path):
                continue
            if "layers" in r and (it.layer is None or it.layer not in rule_layers.get(i, ())):
                continue
            return i
        return None

    def decision_of(it: Item, i: Optional[int]) -> Optional[Decision]:
        if i is None:
            return None
        r = rules[i]
        if r.get("keep"):
            if it.kind == "switch" and int4_group:
                return Decision(4, int4_group, repack=True)
            return None
        if it.shape[-1] % r["group_size"]:
            res.notes.append(
                f"{it.path}: input dim {it.shape[-1]} is not a multiple of "
                f"group size {r['group_size']}; left unquantized"
            )
            return None
        return Decision(r["bits"], r["group_size"], fit=fit or r.get("fit", "minmax"))

    if fit is not None and fit not in FITS:
        raise RecipeError(f"--fit {fit!r}: expected one of {', '.join(FITS)}")

    # Layer sets, rule by rule; a selection sees only the layers its pattern matches.
    rule_layers: Dict[int, set] = {}
    for i, r in enumerate(rules):
        if "layers" not in r:
            continue
        spec = r["layers"]
        matched = [it for it in quantizable if it.layer is not None and _matches(r["match"], it.path)]
        candidates = sorted({it.layer for it in matched})
        if isinstance(spec, list) or (
            upgrade_layers is not None
            and isinstance(upgrade_layers, list)
            and spec.get("select") in ("spread", "auto")
        ):
            chosen = spec if isinstance(spec, list) else upgrade_layers
            bad = sorted(set(chosen) - set(candidates))
            if bad:
                raise RecipeError(
                    f"rule {i} ({r['match']}): layers {bad} have no matching module "
                    f"(candidates: {candidates})"
                )
            layers = sorted(chosen)
        elif spec["select"] == "mlx_mixed":
            layers = sorted(_mlx_mixed_layers(num_layers) & set(candidates))
        else:
            mode = upgrade_layers if upgrade_layers in ("spread", "auto") else spec["select"]
            k = _count(spec, len(candidates)) if candidates else 0
            if mode == "auto" and sensitivity is not None and candidates:
                # Score each layer at what it would get without this rule.
                loss, measured_at = {}, None
                for layer in candidates:
                    its = [it for it in matched if it.layer == layer]
                    fallback = decision_of(its[0], decide(its[0], rule_layers, i + 1))
                    loss[layer] = sensitivity(its, fallback) if fallback else 0.0
                    measured_at = measured_at or fallback
                layers = sorted(sorted(candidates, key=lambda l: (-loss[l], l))[:k])
                if measured_at:
                    res.auto_losses[i] = (measured_at, loss)
            else:
                layers = spread(candidates, k) if k else []
                if mode == "auto" and candidates:
                    res.auto_pending.append(i)
        rule_layers[i] = set(layers)
        res.selected[i] = layers

    for it in items:
        res.decisions[it.path] = decision_of(it, decide(it, rule_layers)) if it.quantizable else None
    return res


__all__ = [
    "Recipe",
    "RecipeError",
    "Decision",
    "Resolution",
    "PRESETS",
    "FITS",
    "load_recipe",
    "resolve",
    "parse_upgrade_layers",
    "spread",
]
