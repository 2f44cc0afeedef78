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

from . import quant_formats
from .ops import (
    as_projection,
    dense_linear,
    has_metal,
    moe_prefill,
    moe_swiglu,
    quantized_embedding,
    quantized_linear,
    rms_norm,
    rope,
)

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


def _checked(p, name: str):
    """(weight, scales, biases, bits, group_size) of a projection the fused op runs, else None."""
    if not isinstance(p, _switch_classes("QuantizedSwitchLinear")):
        return None
    try:
        # The op's own layout checks (affine, biases, no global scale or output bias).
        proj = as_projection(p, name)
    except ValueError:
        return None
    return proj if quant_formats.supported(*proj[3:]) else None


_PROJS = ("gate_proj", "up_proj", "down_proj")


def _projections(block):
    sm = getattr(block, "switch_mlp", None)
    if sm is None or not isinstance(getattr(sm, "activation", None), _switch_classes("SwiGLU")):
        return None
    projs = tuple(_checked(getattr(sm, n, None), n) for n in _PROJS)
    return None if None in projs else projs


def layout_supported(block) -> bool:
    """Whether the block's routed experts can run on the fused op."""
    return _projections(block) is not None


def _proj_arrays(block) -> tuple:
    sm = getattr(block, "switch_mlp", None)
    return tuple(
        getattr(getattr(sm, n, None), a, None) for n in _PROJS for a in ("weight", "scales", "biases")
    )


def checked_projections(block):
    """The block's (gate, up, down) as checked (weight, scales, biases, bits, group_size)
    tuples, or None when its layout is unsupported. Checked once and cached on the
    block; checked again only when one of its arrays was replaced (model.update,
    load_weights), which an identity test per array detects."""
    arrays = _proj_arrays(block)
    cached = getattr(block, "_moequant_projs", None)
    if cached is not None and all(a is b for a, b in zip(cached[0], arrays)):
        return cached[1]
    projs = _projections(block)
    object.__setattr__(block, "_moequant_projs", (arrays, projs))
    return projs


class _FusedMoE:
    """Mixed in before the original block class; see the module docstring."""

    _moequant_max_tokens = DEFAULT_MAX_TOKENS

    def __call__(self, x):
        n_tokens = x.size // x.shape[-1]
        on_cpu = mx.default_device() == mx.cpu
        projs = checked_projections(self)
        if (
            projs is None
            or not (on_cpu or has_metal)
            or (n_tokens > self._moequant_max_tokens and not on_cpu)
        ):
            return super().__call__(x)
        group = getattr(self, "sharding_group", None)
        if group is not None:
            from mlx.nn.layers.distributed import sum_gradients

            x = sum_gradients(group)(x)
        inds, scores = self.gate(x)
        op = moe_swiglu
        if n_tokens > self._moequant_max_tokens:
            k, experts = inds.shape[-1], projs[0][0].shape[0]
            if n_tokens * k >= PREFILL_MIN_PAIRS * experts:
                op = moe_prefill
        y = op(x, inds, scores, *projs)
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
    (``patch_linear``, and ``patch_linear_pairs``: layers that share their input run as
    one call), the RMSNorm and RoPE layers (``patch_norm_rope``) and the MoE
    routers (``patch_gates``), and with ``attention`` (default: as ``linear``) the MLA attention
    layers (``mla_attention.patch_attention``: float32 attention on the CPU)."""
    if linear:
        patch_linear(model)
        patch_norm_rope(model)
        patch_gates(model)
    if linear if attention is None else attention:
        from .mla_attention import patch_attention

        patch_attention(model)
    if linear:
        patch_linear_pairs(model)
    classes = _block_classes()
    n = 0
    for _, m in model.named_modules():
        base = getattr(type(m), "_moequant_base", type(m))
        if base not in classes:
            continue
        m.__class__ = _fused_class(base)
        # Instance attributes that are not arrays stay out of the parameter tree.
        object.__setattr__(m, "_moequant_max_tokens", int(max_tokens))
        object.__setattr__(m, "_moequant_projs", None)  # check afresh
        n += int(checked_projections(m) is not None)
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
            # The fused pairs' concatenated arrays (the layers keep their views of them).
            m.__dict__.pop("_moequant_pairs", None)
            m.__dict__.pop("_moequant_projs", None)
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
            and quant_formats.supported(m.bits, m.group_size)
            and m.get("biases") is not None
            and m["weight"].ndim == 2
            and m["weight"].dtype == mx.uint32
        )
    except (AttributeError, KeyError):
        return False


def _linear_call(x, w, scales, biases, bits, group_size):
    """mx.quantized_matmul(x, w, ..., transpose=True) on moequant's kernel, in the dtype
    mx.quantized_matmul returns (x promoted with the scales' dtype)."""
    # Type promotion of two float dtypes: equal ones stay, any other pair gives float32.
    dt = x.dtype if x.dtype == scales.dtype else mx.float32
    if x.dtype != dt:
        x = x.astype(dt)
    return quantized_linear(x, w, scales, biases, bits=bits, group_size=group_size)


def _quantized_linear(m, x):
    """A quantized linear layer ``m``'s product (see ``_linear_call``)."""
    return _linear_call(x, m["weight"], m["scales"], m["biases"], m.bits, m.group_size)


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
    """Mixed in before nn.QuantizedEmbedding: the lookup (one primitive, mx.dequantize's
    bits) and as_linear (tied output projection)."""

    def __call__(self, x):
        if (
            not self._moequant_layout_ok
            or mx.default_device() != mx.cpu
            or x.dtype not in (mx.int32, mx.int64, mx.uint32)
        ):
            return super().__call__(x)
        return quantized_embedding(
            x, self["weight"], self["scales"], self["biases"], bits=self.bits, group_size=self.group_size
        )

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
    n = 0
    for m in _swap_classes(model, _linear_bases(), _fused_linear_classes):
        ok = _linear_layout_ok(m)
        object.__setattr__(m, "_moequant_layout_ok", ok)
        n += int(ok)
    return n


def _swap_classes(model: nn.Module, bases: dict, made: Dict[type, type]) -> list:
    """Swap the class of every module of ``model`` whose (original) class is a key of
    ``bases`` for ``Fused<Base>(mixin, base)`` (made once, kept in ``made``), with
    ``_moequant_base`` naming the original for ``unpatch``; returns those modules."""
    out = []
    for _, m in model.named_modules():
        base = getattr(type(m), "_moequant_base", type(m))
        mixin = bases.get(base)
        if mixin is None:
            continue
        if base not in made:
            made[base] = type(f"Fused{base.__name__}", (mixin, base), {"_moequant_base": base})
        m.__class__ = made[base]
        out.append(m)
    return out


# --------------------------------------------------------------------------- norms, rope
# MLX 0.32 has no CPU kernel for mx.fast.rms_norm / mx.fast.rope: on the CPU stream each
# call builds a fallback graph (12 and ~36 primitives, ~8 us each at decode). moequant's
# rms_norm / rope primitives compute the same bits in one primitive each (ops.py); other
# devices keep mlx-lm's call (MLX's own kernels).

_norm_rope_classes: Dict[type, type] = {}


class _FusedRMSNorm:
    """Mixed in before nn.RMSNorm."""

    def __call__(self, x):
        if mx.default_device() != mx.cpu:
            return super().__call__(x)
        return rms_norm(x, self["weight"], self.eps)


class _FusedRoPE:
    """Mixed in before nn.RoPE."""

    def __call__(self, x, offset=0):
        if mx.default_device() != mx.cpu:
            return super().__call__(x, offset)
        return rope(
            x, self.dims, traditional=self.traditional, base=self.base, scale=self.scale, offset=offset
        )


class _FusedYarnRoPE:
    """Mixed in before mlx-lm's YarnRoPE (DeepSeek-V3 / Kimi with rope_scaling): the same
    input scaling (mlx-lm's own op), then the rope on moequant's primitive."""

    def __call__(self, x, offset=0, scale=1.0, inverse=False):
        if mx.default_device() != mx.cpu or inverse:
            return super().__call__(x, offset, scale, inverse)
        if self.mscale != 1.0:
            x = x.at[..., : self.dims].multiply(self.mscale)
        return rope(
            x,
            self.dims,
            traditional=self.traditional,
            base=None,
            scale=scale,
            offset=offset,
            freqs=self._freqs,
        )


def _norm_rope_bases():
    bases = {nn.RMSNorm: _FusedRMSNorm, nn.RoPE: _FusedRoPE}
    for cls in import_classes((("mlx_lm.models.rope_utils", "YarnRoPE"),)):
        bases[cls] = _FusedYarnRoPE
    return bases


def patch_norm_rope(model: nn.Module) -> int:
    """Route the ``nn.RMSNorm``, ``nn.RoPE`` and mlx-lm ``YarnRoPE`` layers of ``model``
    to moequant's ``rms_norm`` / ``rope`` on the CPU (same bits as mx.fast's), in place;
    returns how many layers were swapped. ``unpatch`` undoes it."""
    return len(_swap_classes(model, _norm_rope_bases(), _norm_rope_classes))


# --------------------------------------------------------------------------- MoE routers
# The DeepSeek-V3 family's MoEGate: ``group_expert_select(x @ self.weight.T, ...)``, the
# weight (experts, hidden) in the checkpoint's float dtype, not quantized. MLX's CPU
# matmul runs that product on one thread (Kimi: 384 x 7168 bf16, ~3.5 ms per MoE layer
# and token); ``dense_linear`` gives the same bits on the pool's threads, and the expert
# selection stays the module's own compiled ``group_expert_select`` (its argpartition
# sets the experts' slot order, which moe_swiglu's sum follows). Other devices, and hosts
# where MLX's CPU matmul is not the sequential one dense_linear reproduces (macOS, which
# uses Accelerate), keep mlx-lm's call.

_GATES = (
    ("mlx_lm.models.deepseek_v3", "MoEGate"),
    ("mlx_lm.models.deepseek_v32", "MoEGate"),
    ("mlx_lm.models.glm4_moe", "MoEGate"),
)
_VLM_GATES = (("mlx_vlm.models.deepseek_v3.language", "MoEGate"),)

_gate_classes: Dict[type, type] = {}

_FLOATS = (mx.float32, mx.float16, mx.bfloat16)


class _FusedMoEGate:
    """Mixed in before a MoEGate class of ``_GATES``."""

    def __call__(self, x):
        w = self["weight"]
        if (
            mx.default_device() != mx.cpu
            or sys.platform == "darwin"
            or w.ndim != 2
            or w.dtype not in _FLOATS
            or x.dtype not in _FLOATS
        ):
            return super().__call__(x)
        select = sys.modules[self._moequant_base.__module__].group_expert_select
        return select(
            dense_linear(x, w),
            self.e_score_correction_bias,
            self.top_k,
            self.n_group,
            self.topk_group,
            self.routed_scaling_factor,
            self.norm_topk_prob,
        )


def patch_gates(model: nn.Module) -> int:
    """Route the MoE routers' product of ``model`` (the MoEGate of mlx-lm's
    deepseek_v3 / deepseek_v32 / glm4_moe, and mlx-vlm's deepseek_v3 once imported) to
    ``dense_linear`` on the CPU, in place; returns how many were swapped. ``unpatch``
    undoes it."""
    specs = _GATES + (_VLM_GATES if "mlx_vlm" in sys.modules else ())
    bases = {cls: _FusedMoEGate for cls in import_classes(specs)}
    return len(_swap_classes(model, bases, _gate_classes))


# --------------------------------------------------------------------------- linear pairs
# Quantized linear layers that read the same x (MLA's q_a_proj and kv_a_proj_with_mqa; an
# MLP's gate_proj and up_proj) run as one quantized_linear call on their rows
# concatenated along the output axis: one job and one preparation of x instead of two
# (a decode step's small layers pay a fixed cost per call, bench/RESULTS.md issue 15
# session 7; the output's Split is a view node in place of the second call's node). Rows are independent, so each output is bit-identical to its own
# layer's call. Made once at patch time: the concatenated weight, scales and biases, and
# each layer's arrays rebound as row views of them (one copy in memory, the parameter
# tree keeps its names and shapes; ``unpatch`` leaves the views, a working module).
# A layer whose arrays were replaced after patching (load_weights, update) makes the pair
# fall back to one call per layer.

# (module, class) of the MLPs ``down_proj(swiglu(gate_proj(x), up_proj(x)))`` with the
# module's own ``swiglu``.
_MLPS = (
    ("mlx_lm.models.deepseek_v3", "DeepseekV3MLP"),
    ("mlx_lm.models.deepseek_v32", "DeepseekV32MLP"),
    ("mlx_lm.models.glm4_moe", "MLP"),
)
_MLA_PAIR = ("q_a_proj", "kv_a_proj_with_mqa")
_MLP_PAIR = ("gate_proj", "up_proj")

_mlp_classes: Dict[type, type] = {}

_ARRAYS = ("weight", "scales", "biases")


def _pairable(layers) -> bool:
    """Patched quantized linear layers (affine, no bias) of one input size, bits, group
    size and array dtypes."""
    if not all(isinstance(m, _FusedQuantizedLinear) and m._moequant_layout_ok for m in layers):
        return False
    if any("bias" in m for m in layers):
        return False
    a = layers[0]
    return all(
        m.bits == a.bits
        and m.group_size == a.group_size
        and m["weight"].shape[1] == a["weight"].shape[1]
        and all(m[k].dtype == a[k].dtype for k in _ARRAYS)
        for m in layers
    )


def fuse_pair(owner, names) -> bool:
    """Concatenate the rows of ``owner``'s linear layers ``names`` (see above); returns
    whether the pair is fused (now or already)."""
    layers = [getattr(owner, n, None) for n in names]
    if pair_arrays(owner, names) is not None:
        return True
    if not _pairable(layers):
        return False
    cat = [mx.concatenate([m[k] for m in layers], axis=0) for k in _ARRAYS]
    mx.eval(cat)
    rows = [m["weight"].shape[0] for m in layers]
    views = []
    r0 = 0
    for m, r in zip(layers, rows):
        vs = [c[r0 : r0 + r] for c in cat]
        mx.eval(vs)  # views sharing the concatenated arrays' memory
        for k, v in zip(_ARRAYS, vs):
            m[k] = v
        views.append(vs)
        r0 += r
    splits = [sum(rows[: i + 1]) for i in range(len(rows) - 1)]
    pairs = owner.__dict__.setdefault("_moequant_pairs", {})
    pairs[tuple(names)] = (views, (*cat, layers[0].bits, layers[0].group_size, splits))
    return True


def pair_arrays(owner, names):
    """(w, scales, biases, bits, group_size, splits) of a fused pair whose layers still
    hold their views, else None."""
    got = owner.__dict__.get("_moequant_pairs", {}).get(tuple(names))
    if got is None:
        return None
    views, arrays = got
    for n, vs in zip(names, views):
        m = getattr(owner, n, None)
        if not isinstance(m, nn.Module) or not all(m.get(k) is v for k, v in zip(_ARRAYS, vs)):
            return None
    return arrays


def _cpu_pair_arrays(owner, names):
    """``pair_arrays`` when the call runs on the CPU (the only device the pairs serve)."""
    return pair_arrays(owner, names) if mx.default_device() == mx.cpu else None


def _pair_outputs(arrays, x):
    """The fused pair's outputs on x: one call, split into the layers' outputs."""
    w, s, b, bits, gs, splits = arrays
    return mx.split(_linear_call(x, w, s, b, bits, gs), splits, axis=-1)


def pair_linear(owner, names, x):
    """The outputs of ``owner``'s linear layers ``names`` on x, from one call when the
    pair is fused and the call runs on the CPU, else from one call per layer."""
    arrays = _cpu_pair_arrays(owner, names)
    if arrays is None:
        return [getattr(owner, n)(x) for n in names]
    return _pair_outputs(arrays, x)


class _FusedMLP:
    """Mixed in before an MLP class of ``_MLPS``: gate_proj and up_proj in one call."""

    def __call__(self, x):
        arrays = _cpu_pair_arrays(self, _MLP_PAIR)
        if arrays is None:
            return super().__call__(x)
        g, u = _pair_outputs(arrays, x)
        return self.down_proj(sys.modules[self._moequant_base.__module__].swiglu(g, u))


def patch_linear_pairs(model: nn.Module) -> int:
    """Fuse the quantized linear layers of ``model`` that share their input (see above):
    MLA's q_a_proj with kv_a_proj_with_mqa (used by ``mla_attention``), the DeepSeek-V3
    family's MLP gate_proj with up_proj (the MLP class swapped in place). Call after
    ``patch_linear``; returns how many pairs are fused. ``unpatch`` undoes the class
    swaps (the layers keep their row views)."""
    from .mla_attention import _ATTENTION

    n = 0
    mlps = {cls: _FusedMLP for cls in import_classes(_MLPS)}
    for m in _swap_classes(model, mlps, _mlp_classes):
        n += int(fuse_pair(m, _MLP_PAIR))
    attns = import_classes(_ATTENTION)
    for _, m in model.named_modules():
        if getattr(type(m), "_moequant_base", type(m)) in attns and getattr(m, "q_lora_rank", None):
            n += int(fuse_pair(m, _MLA_PAIR))
    return n
