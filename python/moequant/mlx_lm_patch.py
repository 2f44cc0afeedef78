"""Route mlx-lm MoE blocks through moequant's fused expert ops.

``patch(model)`` changes the class of every supported MoE block in place to a
subclass whose ``__call__`` uses, when its experts use a supported layout: the fused
``moe_swiglu`` GEMV for few tokens (a decode step; CPU or Metal), and on the CPU the
batched ``moe_prefill`` for more (prefill, evaluation); otherwise (unsupported
layouts, many tokens on a GPU, a device without a kernel) mlx-lm's own ``__call__``. Parameters,
module tree, sharding and pipelining attributes are untouched, so the patch composes
with ``load``/``sharded_load``/``pipeline_load`` (apply it after loading), prompt
caches, ``generate``/``stream_generate`` and ``mx.compile``.

It also routes mlx-lm's quantized linear layers (``nn.QuantizedLinear``: attention,
shared experts, dense MLPs, a quantized lm_head; and ``nn.QuantizedEmbedding.as_linear``,
a tied quantized embedding used as the output projection) to ``quantized_linear`` on
the CPU, at any token count (``patch(model, linear=False)`` keeps mlx-lm's).

Supported blocks: the DeepSeek-V3 family (``deepseek_v3``, and ``kimi_k2``/``kimi_k25``
which use it), plus ``deepseek_v32`` and ``glm4_moe`` whose MoE block has the same form:
``y = sum_j scores_j * switch_mlp(x)_j + shared_experts(x)``, with optional
tensor-parallel ``sharding_group``; and mlx-vlm's copy of the DeepSeek-V3 block (the
language model of its ``kimi_k25``, the -VLM sibling), once mlx-vlm is imported.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn

from .ops import as_projection, has_metal, moe_prefill, moe_swiglu, quantized_linear

# Decode steps are one token per sequence; a few more (small batches, speculative
# verification) still read each selected expert's weights about once per token.
DEFAULT_MAX_TOKENS = 4

# On the CPU, calls with more tokens go to moe_prefill once its experts get this many
# (token, slot) pairs each on average (a GEMM's rows; fewer, and the GEMV that reads
# an expert once per pair is as fast): measured crossover in bench/RESULTS.md.
PREFILL_MIN_PAIRS = 8

# (module, class) of the MoE blocks whose __call__ the fused path reproduces.
_BLOCKS = (
    ("mlx_lm.models.deepseek_v3", "DeepseekV3MoE"),
    ("mlx_lm.models.deepseek_v32", "DeepseekV32MoE"),
    ("mlx_lm.models.glm4_moe", "MoE"),
)

# mlx-vlm's own copy of the DeepSeek-V3 block (its kimi_k25 language model: the -VLM
# sibling), same form as mlx-lm's, on mlx-vlm's own switch layers. Looked up only once
# mlx_vlm is imported (a model it loaded), so text-only use never imports it.
_VLM_BLOCKS = (("mlx_vlm.models.deepseek_v3.language", "DeepseekV3MoE"),)
_VLM_SWITCH = "mlx_vlm.models.switch_layers"

_SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
_SUPPORTED_GROUPS = (32, 64, 128)

_fused_classes: Dict[type, type] = {}


def import_classes(specs) -> tuple:
    """The classes named by (module, class) pairs that this mlx-lm has."""
    out = []
    for mod, name in specs:
        try:
            out.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            continue
    return tuple(out)


def _block_classes():
    # mlx-vlm's copy of the DeepSeek-V3 block only once mlx-vlm is in use (importing it
    # here would pull its heavy dependencies into every patch).
    return import_classes(_BLOCKS + (_VLM_BLOCKS if "mlx_vlm" in sys.modules else ()))


def env_enabled(default: bool = True) -> bool:
    """The CLI switch: MOEQUANT_FUSED=0 turns the fused path off."""
    v = os.environ.get("MOEQUANT_FUSED")
    if v is None:
        return default
    return v.strip().lower() not in ("0", "false", "no", "off", "")


def _switch_classes(name: str) -> tuple:
    """mlx-lm's switch-layer class ``name``, and mlx-vlm's when it is imported."""
    from mlx_lm.models import switch_layers

    out = [getattr(switch_layers, name)]
    if "mlx_vlm" in sys.modules:
        try:
            out.append(getattr(importlib.import_module(_VLM_SWITCH), name))
        except (ImportError, AttributeError):
            pass
    return tuple(out)


def _proj_supported(p) -> bool:
    if not isinstance(p, _switch_classes("QuantizedSwitchLinear")):
        return False
    try:
        # The op's own layout checks (affine, biases, no global scale or output bias).
        *_, bits, group_size = as_projection(p)
    except ValueError:
        return False
    return bits in _SUPPORTED_BITS and group_size in _SUPPORTED_GROUPS


def layout_supported(block) -> bool:
    """Whether the block's routed experts can run on the fused op."""
    sm = getattr(block, "switch_mlp", None)
    if sm is None or not isinstance(getattr(sm, "activation", None), _switch_classes("SwiGLU")):
        return False
    return all(_proj_supported(getattr(sm, n, None)) for n in ("gate_proj", "up_proj", "down_proj"))


class _FusedMoE:
    """Mixed in before the original block class; see the module docstring."""

    _moequant_max_tokens = DEFAULT_MAX_TOKENS

    def __call__(self, x):
        n_tokens = x.size // x.shape[-1]
        on_cpu = mx.default_device() == mx.cpu
        if (
            not self._moequant_layout_ok
            or not (on_cpu or has_metal)
            or (n_tokens > self._moequant_max_tokens and not on_cpu)
        ):
            return super().__call__(x)
        group = getattr(self, "sharding_group", None)
        if group is not None:
            from mlx.nn.layers.distributed import sum_gradients

            x = sum_gradients(group)(x)
        inds, scores = self.gate(x)
        sm = self.switch_mlp
        op = moe_swiglu
        if n_tokens > self._moequant_max_tokens:
            k, experts = inds.shape[-1], sm.gate_proj.weight.shape[0]
            if n_tokens * k >= PREFILL_MIN_PAIRS * experts:
                op = moe_prefill
        y = op(x, inds, scores, sm.gate_proj, sm.up_proj, sm.down_proj)
        if getattr(self, "shared_experts", None) is not None:
            y = y + self.shared_experts(x)
        if group is not None:
            y = mx.distributed.all_sum(y, group=group)
        return y


def _fused_class(cls: type) -> type:
    if cls not in _fused_classes:
        _fused_classes[cls] = type(f"Fused{cls.__name__}", (_FusedMoE, cls), {"_moequant_base": cls})
    return _fused_classes[cls]


def patch(
    model: nn.Module,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    linear: bool = True,
    attention: Optional[bool] = None,
) -> int:
    """Patch the supported MoE blocks of ``model`` in place; returns how many blocks
    will use the fused ops (blocks with an unsupported expert layout keep mlx-lm's
    path). Calls of up to ``max_tokens`` tokens run the decode GEMV (CPU and Metal);
    longer ones the batched ``moe_prefill`` on the CPU and mlx-lm's path on a GPU.
    Apply after loading/sharding; calling it again updates ``max_tokens``.
    With ``linear`` (the default) the quantized linear layers are patched too
    (``patch_linear``), and with ``attention`` (default: as ``linear``) the MLA attention
    layers (``mla_attention.patch_attention``: float32 attention on the CPU)."""
    if linear:
        patch_linear(model)
    if linear if attention is None else attention:
        from .mla_attention import patch_attention

        patch_attention(model)
    classes = _block_classes()
    n = 0
    for _, m in model.named_modules():
        base = getattr(type(m), "_moequant_base", type(m))
        if base not in classes:
            continue
        m.__class__ = _fused_class(base)
        # Instance attributes that are not arrays stay out of the parameter tree.
        object.__setattr__(m, "_moequant_max_tokens", int(max_tokens))
        ok = layout_supported(m)
        object.__setattr__(m, "_moequant_layout_ok", ok)
        n += int(ok)
    # Last, so it wraps any other swap of the attention classes: MLA layers read a
    # quantized latent cache (kv_bits) with moequant's attention (kv_cache.py).
    from .kv_cache import patch_kv_cache

    patch_kv_cache(model)
    return n


def unpatch(model: nn.Module) -> int:
    """Undo ``patch``; returns how many blocks were restored."""
    from .kv_cache import unpatch_kv_cache

    unpatch_kv_cache(model)
    n = 0
    for _, m in model.named_modules():
        base = getattr(type(m), "_moequant_base", None)
        if base is not None:
            m.__class__ = base
            # The MLA patch's dense float32 up-projections (mla_attention).
            m.__dict__.pop("_moequant_dense", None)
            n += 1
    return n


# --------------------------------------------------------------------------- linear layers
# Kept apart from the MoE blocks above: CPU-stream quantized linear layers at any token
# count. Same mechanism (a subclass swapped in, ``_moequant_base`` naming the original,
# which ``unpatch`` restores); on other devices mlx-lm's own call runs.

_fused_linear_classes: Dict[type, type] = {}


def _linear_layout_ok(m) -> bool:
    """Affine, with biases, a 2-D packed weight, bits and group size the kernel runs."""
    try:
        return (
            getattr(m, "mode", "affine") == "affine"
            and m.bits in _SUPPORTED_BITS
            and m.group_size in _SUPPORTED_GROUPS
            and m.get("biases") is not None
            and m["weight"].ndim == 2
            and m["weight"].dtype == mx.uint32
        )
    except (AttributeError, KeyError):
        return False


def _quantized_linear(m, x):
    """mx.quantized_matmul(x, m.weight, ..., transpose=True) on moequant's kernel, in
    the dtype mx.quantized_matmul returns (x promoted with the scales' dtype)."""
    st = m["scales"].dtype
    # Type promotion of two float dtypes: equal ones stay, any other pair gives float32.
    dt = x.dtype if x.dtype == st else mx.float32
    if x.dtype != dt:
        x = x.astype(dt)
    return quantized_linear(
        x, m["weight"], m["scales"], m["biases"], bits=m.bits, group_size=m.group_size
    )


class _FusedQuantizedLinear:
    """Mixed in before nn.QuantizedLinear."""

    def __call__(self, x):
        if not self._moequant_layout_ok or mx.default_device() != mx.cpu:
            return super().__call__(x)
        y = _quantized_linear(self, x)
        if "bias" in self:
            y = y + self["bias"]
        return y


class _FusedQuantizedEmbedding:
    """Mixed in before nn.QuantizedEmbedding: as_linear (tied output projection)."""

    def as_linear(self, x):
        if not self._moequant_layout_ok or mx.default_device() != mx.cpu:
            return super().as_linear(x)
        return _quantized_linear(self, x)


def _linear_bases():
    return {nn.QuantizedLinear: _FusedQuantizedLinear, nn.QuantizedEmbedding: _FusedQuantizedEmbedding}


def patch_linear(model: nn.Module) -> int:
    """Route the quantized linear layers of ``model`` (``nn.QuantizedLinear``, and
    ``nn.QuantizedEmbedding.as_linear``) to ``quantized_linear`` on the CPU, in place;
    returns how many layers will use it (the others keep mlx-lm's call). ``unpatch``
    undoes it."""
    bases = _linear_bases()
    n = 0
    for _, m in model.named_modules():
        base = getattr(type(m), "_moequant_base", type(m))
        mixin = bases.get(base)
        if mixin is None:
            continue
        if base not in _fused_linear_classes:
            _fused_linear_classes[base] = type(
                f"Fused{base.__name__}", (mixin, base), {"_moequant_base": base}
            )
        m.__class__ = _fused_linear_classes[base]
        ok = _linear_layout_ok(m)
        object.__setattr__(m, "_moequant_layout_ok", ok)
        n += int(ok)
    return n

