"""The -VLM sibling of a Kimi-K2.5 build: the MoonViT vision tower and its projector kept
next to the converted language model, in the layout mlx-vlm's ``kimi_k25`` model loads.

The language-model tensors are the text build's, byte for byte (same recipe, same
names: mlx-vlm's ``kimi_k25`` keeps the ``language_model.`` prefix, and its quantization
lookup accepts the text build's per-module keys as they are). This module adds:

* the vision tensors, copied in their source dtype (bf16) into one more shard, renamed
  and laid out as mlx-vlm's sanitize leaves them (``encoder.`` dropped, ``wqkv``/``wo``
  under ``attn.``, the patch-embedding convolution in MLX's (O, H, W, I) order);
  a recipe's ``vision_projector`` field ({"bits", "group_size", "fit"}) quantizes the
  projector's two linears instead (the tower itself always stays in its source dtype);
* ``vision_config`` with mlx-vlm's keys (``depth``, ``embed_dim``, ...) filled in from
  the upstream ``vt_*`` keys, which mlx-vlm does not read;
* nothing else: processor / preprocessor configs and remote-code files are side files,
  copied by ``convert`` for every build.

The tensor table (``vision_tensors``) is the one definition of the tower's names and
shapes: the tiny checkpoint generator writes it, ``convert`` checks the source against it
and ``plan`` sizes it; tests/test_vlm.py checks it against mlx-vlm's own module tree.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .checkpoint import CheckpointError, Source
from .errors import UserError

VLM_INSTALL = 'pip install "moequant[vlm]" (mlx-vlm 0.7.10)'
VISION_SHARD = "model-vision.safetensors"
# Top-level tensor-name prefixes of the vision side of a kimi_k25 checkpoint.
VISION_PREFIXES = ("vision_tower.", "mm_projector.")
# The projector's linears (mlx-vlm module paths): what a recipe's vision_projector quantizes.
PROJECTOR_LINEARS = ("mm_projector.proj.0", "mm_projector.proj.2")

# Upstream vision_config key -> mlx-vlm's VisionConfig key (mlx_vlm/models/kimi_k25/config.py).
_VT_KEYS = {
    "vt_hidden_size": ("embed_dim", "hidden_size"),
    "vt_num_hidden_layers": ("depth",),
    "vt_num_attention_heads": ("num_heads",),
    "vt_intermediate_size": ("intermediate_size",),
}
# mlx-vlm's defaults, which are Kimi-K2.5's MoonViT (used when neither key is present).
_DEFAULTS = {
    "embed_dim": 1152,
    "hidden_size": 1152,
    "depth": 27,
    "num_heads": 16,
    "intermediate_size": 4304,
    "patch_size": 14,
    "num_channels": 3,
    "init_pos_emb_height": 64,
    "init_pos_emb_width": 64,
    "merge_kernel_size": [2, 2],
}


class VisionError(UserError):
    """--keep-vision cannot be honoured for this source (names the tensor or key)."""


def has_mlx_vlm() -> bool:
    try:
        import mlx_vlm  # noqa: F401
    except ImportError:
        return False
    return True


def require_mlx_vlm(what: str = "this") -> None:
    if not has_mlx_vlm():
        raise UserError(f"{what} needs mlx-vlm, which is not installed: {VLM_INSTALL}")


def is_vision_build(model_dir) -> bool:
    """A build written by ``convert --keep-vision`` (its config keeps the vision side)."""
    import json

    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(cfg, dict)
        and bool(cfg.get("vision_config"))
        and bool((cfg.get("moequant") or {}).get("keep_vision"))
    )


def mlx_vlm_vision_config(vc: dict) -> dict:
    """The source vision_config with mlx-vlm's keys added (never overriding one that is
    there). Raises VisionError for a shape mlx-vlm's MoonViT cannot express."""
    out = dict(vc)
    for up, keys in _VT_KEYS.items():
        if up in vc:
            for k in keys:
                out.setdefault(k, vc[up])
    for k, v in _DEFAULTS.items():
        out.setdefault(k, v)
    mks = out["merge_kernel_size"]
    out["merge_kernel_size"] = [mks, mks] if isinstance(mks, int) else list(mks)
    out.setdefault("spatial_merge_size", out["merge_kernel_size"][0])
    out.setdefault("model_type", "moonvit")
    for k in (
        "embed_dim",
        "depth",
        "num_heads",
        "intermediate_size",
        "patch_size",
        "init_pos_emb_height",
        "init_pos_emb_width",
        "num_channels",
    ):
        if type(out[k]) is not int or out[k] < 1:
            raise VisionError(f"vision_config.{k} must be a positive integer, got {out[k]!r}")
    if out["init_pos_emb_height"] != out["init_pos_emb_width"]:
        # mlx-vlm's PatchEmbed builds a square (height x height) position table.
        raise VisionError(
            "vision_config: init_pos_emb_height != init_pos_emb_width is not "
            "supported by mlx-vlm's kimi_k25 (square position table)"
        )
    head = out["embed_dim"] // out["num_heads"]
    if out["embed_dim"] % out["num_heads"] or head % 4:
        raise VisionError(
            "vision_config: the head size (embed_dim / num_heads) must be a "
            "multiple of 4 (MoonViT's 2-D rotary embedding)"
        )
    return out


def vision_tensors(vision_config: dict, text_hidden: int) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """Upstream name -> (shape, mlx-vlm name) of every vision-tower and projector tensor.

    Upstream: the MoonViT encoder's blocks and final norm sit under ``encoder.``, ``wqkv``
    and ``wo`` directly in a block, the convolution in PyTorch's (O, I, H, W) order;
    mlx-vlm's names and (O, H, W, I) order are what its sanitize makes of them."""
    v = mlx_vlm_vision_config(vision_config)
    e, i, p, c = v["embed_dim"], v["intermediate_size"], v["patch_size"], v["num_channels"]
    n = v["init_pos_emb_height"]
    merged = v["hidden_size"] * v["merge_kernel_size"][0] * v["merge_kernel_size"][1]
    t: Dict[str, Tuple[Tuple[int, ...], str]] = {}

    def add(up: str, shape, mlx: Optional[str] = None):
        t[up] = (tuple(shape), mlx or up)

    add("vision_tower.patch_embed.proj.weight", (e, c, p, p))
    add("vision_tower.patch_embed.proj.bias", (e,))
    add("vision_tower.patch_embed.pos_emb.weight", (n, n, e))
    for b in range(v["depth"]):
        up, ml = f"vision_tower.encoder.blocks.{b}.", f"vision_tower.blocks.{b}."
        for norm in ("norm0", "norm1"):
            for s in ("weight", "bias"):
                add(up + f"{norm}.{s}", (e,), ml + f"{norm}.{s}")
        add(up + "wqkv.weight", (3 * e, e), ml + "attn.wqkv.weight")
        add(up + "wqkv.bias", (3 * e,), ml + "attn.wqkv.bias")
        add(up + "wo.weight", (e, e), ml + "attn.wo.weight")
        add(up + "wo.bias", (e,), ml + "attn.wo.bias")
        add(up + "mlp.fc0.weight", (i, e), ml + "mlp.fc0.weight")
        add(up + "mlp.fc0.bias", (i,), ml + "mlp.fc0.bias")
        add(up + "mlp.fc1.weight", (e, i), ml + "mlp.fc1.weight")
        add(up + "mlp.fc1.bias", (e,), ml + "mlp.fc1.bias")
    for s in ("weight", "bias"):
        add(
            f"vision_tower.encoder.final_layernorm.{s}",
            (v["hidden_size"],),
            f"vision_tower.final_layernorm.{s}",
        )
        add(f"mm_projector.pre_norm.{s}", (v["hidden_size"],))
    add("mm_projector.proj.0.weight", (merged, merged))
    add("mm_projector.proj.0.bias", (merged,))
    add("mm_projector.proj.2.weight", (text_hidden, merged))
    add("mm_projector.proj.2.bias", (text_hidden,))
    return t


def keep_vision_requested(flag: Optional[bool], recipe_spec: dict) -> bool:
    """--keep-vision, else the recipe's ``keep_vision`` field (a boolean)."""
    if flag is not None:
        return bool(flag)
    v = recipe_spec.get("keep_vision", False)
    if not isinstance(v, bool):
        raise UserError(f"recipe field keep_vision must be true or false, got {v!r}")
    return v


def projector_decision(recipe_spec: dict):
    """The recipe's ``vision_projector`` field (checked by recipes.validate_spec) as a
    Decision, or None: the projector stays in its source dtype."""
    from .recipes import Decision

    vp = recipe_spec.get("vision_projector")
    if vp is None:
        return None
    return Decision(vp["bits"], vp["group_size"], fit=vp.get("fit", "minmax"))


def _projector_item(mlx_name: str, shape, dtype: str):
    """The Item of one projector linear (``mlx_name`` its weight), or None for any other
    vision tensor: the one place that says which vision tensors a recipe may quantize."""
    from .checkpoint.layout import Item

    path = mlx_name[: -len(".weight")]
    if path not in PROJECTOR_LINEARS or not mlx_name.endswith(".weight"):
        return None
    return Item(path, None, "vision tower", "linear", tuple(shape), dtype)


# A vision tensor kept in its source dtype: plan's description of it.
_FLOAT_KIND = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


def vision_layout(expect, dtypes: Dict[str, str], projector):
    """Per upstream vision tensor: (params, description, [(mlx-vlm name, shape, dtype)]) of
    what the vision shard holds for it. ``dtypes`` maps upstream names to "bfloat16" /
    "float16" / "float32". The projector's linears quantized by the recipe follow
    layout.output_tensors, like every language-model module."""
    from .layout import describe, output_tensors

    out = []
    for name, (shape, mlx_name) in expect.items():
        item = _projector_item(mlx_name, shape, dtypes[name])
        if item is None or projector is None:
            out.append((math.prod(shape), _FLOAT_KIND[dtypes[name]], [(mlx_name, shape, dtypes[name])]))
        else:
            out.append(
                (
                    item.params,
                    describe(projector, item),
                    [(item.path + sfx, s, t) for sfx, s, t in output_tensors(item, projector)],
                )
            )
    return out


def layout_row(layout):
    """plan's row for the vision side from ``vision_layout``."""
    from .layout import ComponentRow, tensor_bytes

    row = ComponentRow("vision tower", 0, 0, {})
    for params, kind, tensors in layout:
        row.params += params
        row.kinds[kind] = row.kinds.get(kind, 0) + params
        row.bytes += sum(tensor_bytes(s, t) for _, s, t in tensors)
    return row


def check_projector(expect, projector, where) -> None:
    """Refuse a vision_projector group size that does not divide a linear's input size."""
    if projector is None:
        return
    for name, (shape, mlx_name) in expect.items():
        if _projector_item(mlx_name, shape, "bfloat16") is not None and shape[-1] % projector.group_size:
            raise VisionError(
                f"{where}: recipe field vision_projector: group_size "
                f"{projector.group_size} does not divide the input size {shape[-1]} "
                f"of {name}"
            )


def check_source(src: Source) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """The vision tensors of ``src``, checked against its config: every expected tensor
    present with its shape, in bf16 (or f16/f32), nothing unexpected."""
    cfg = src.cfg
    if not cfg.prefix or not isinstance(cfg.raw.get("vision_config"), dict):
        raise VisionError(
            f"{src.path}: --keep-vision needs a kimi_k25 checkpoint with a "
            f"vision_config (this one is {cfg.flavour})"
        )
    expect = vision_tensors(cfg.raw["vision_config"], cfg.text["hidden_size"])
    present = {n for n in src.tensors if n.startswith(VISION_PREFIXES)}
    for name, (shape, _) in expect.items():
        info = src.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{src.path}: vision tensor {name} is missing from the checkpoint")
        if tuple(info.shape) != shape:
            raise CheckpointError(
                f"{info.file}: tensor {name} has shape {list(info.shape)}, but "
                f"vision_config implies {list(shape)}"
            )
        if info.dtype not in ("BF16", "F16", "F32"):
            raise CheckpointError(
                f"{info.file}: vision tensor {name} has dtype {info.dtype}; "
                "expected a float type (the tower is not quantized upstream)"
            )
    extra = sorted(present - set(expect))
    if extra:
        raise CheckpointError(
            f"{src.tensors[extra[0]].file}: unexpected vision tensor {extra[0]}: "
            "not part of mlx-vlm's kimi_k25 MoonViT with this vision_config"
        )
    return expect


def read_vision(src: Source, expect, projector=None) -> Dict[str, "object"]:
    """mlx-vlm name -> mx.array: the source dtype, the conv weight in MLX order, and the
    projector's linears quantized (``ops.quantize``, bf16 scales) when ``projector``."""
    import mlx.core as mx

    from . import ops
    from .checkpoint.safetensors_io import read_mx

    out = {}
    for name, (shape, mlx_name) in expect.items():
        arr = read_mx(src.tensors[name])
        if name.endswith("patch_embed.proj.weight"):
            arr = mx.contiguous(arr.transpose(0, 2, 3, 1))
        item = _projector_item(mlx_name, shape, "bfloat16")
        if item is not None and projector is not None:
            wq, scales, biases = ops.quantize(
                arr,
                bits=projector.bits,
                group_size=projector.group_size,
                fit=projector.fit,
                dtype=mx.bfloat16,
            )
            out.update(
                {f"{item.path}.weight": wq, f"{item.path}.scales": scales, f"{item.path}.biases": biases}
            )
        else:
            out[mlx_name] = arr
    return out


def output_config(config: dict, raw: dict, projector=None) -> dict:
    """Add the vision side back to the text build's config (``config``, from convert):
    mlx-vlm's vision_config and, for a quantized projector, its per-module entries."""
    config = dict(config)
    config["vision_config"] = mlx_vlm_vision_config(raw["vision_config"])
    record = {"keep_vision": True}
    if projector is not None:
        entries = {p: projector.as_config() for p in PROJECTOR_LINEARS}
        for key in ("quantization", "quantization_config"):
            if isinstance(config.get(key), dict):
                config[key] = dict(sorted({**config[key], **entries}.items()))
        record["vision_projector"] = projector.record()
    config["moequant"] = {**config.get("moequant", {}), **record}
    return dict(sorted(config.items()))


class VisionPart:
    """The vision side of one --keep-vision conversion: what to check, copy and report."""

    def __init__(self, src: Source, projector=None):
        self.src = src
        self.projector = projector
        self.expect = check_source(src)
        check_projector(self.expect, projector, src.path)
        from .checkpoint.safetensors_io import MLX_DTYPE

        self.layout = vision_layout(
            self.expect, {n: MLX_DTYPE[src.tensors[n].dtype] for n in self.expect}, projector
        )

    def row(self):
        return layout_row(self.layout)

    def write(self, dst: Path, write_shard) -> Dict[str, str]:
        """Write the vision shard with ``write_shard`` (convert's atomic writer); returns
        its weight-map entries."""
        tensors = read_vision(self.src, self.expect, self.projector)
        write_shard(dst / VISION_SHARD, tensors)
        return {m: VISION_SHARD for m in sorted(tensors)}


def plan_part(src: Source, flag: Optional[bool], recipe_spec: dict) -> Optional[VisionPart]:
    """convert's hook: None for a text build, else the checked vision side."""
    if not keep_vision_requested(flag, recipe_spec):
        return None
    return VisionPart(src, projector_decision(recipe_spec))


def config_row(cfg, recipe_spec: Optional[dict] = None):
    """plan --keep-vision from a config alone: the vision row (the tower in bf16, the
    projector as the recipe's vision_projector says)."""
    if not cfg.prefix or not isinstance(cfg.raw.get("vision_config"), dict):
        raise VisionError(
            f"{cfg.path}: --keep-vision needs a kimi_k25 config with a "
            f"vision_config (this one is {cfg.flavour})"
        )
    expect = vision_tensors(cfg.raw["vision_config"], cfg.text["hidden_size"])
    projector = projector_decision(recipe_spec or {})
    check_projector(expect, projector, cfg.path)
    return layout_row(vision_layout(expect, {n: "bfloat16" for n in expect}, projector))


def plan_lines(text_bytes: int, row) -> List[str]:
    from .layout import fmt_bytes

    return [
        f"-VLM sibling (--keep-vision): text build {fmt_bytes(text_bytes)} + vision tower and "
        f"projector {fmt_bytes(row.bytes)} ({row.bytes / 2**30:.2f} GiB) = "
        f"{fmt_bytes(text_bytes + row.bytes)}; load it with mlx-vlm ({VLM_INSTALL})"
    ]


# --------------------------------------------------------------------------- generate --image


def load_vlm(model_dir, fused: bool = True, max_tokens: Optional[int] = None):
    """mlx_vlm.load of a -VLM build, patched with the fused MoE path unless ``fused`` is
    False. Returns (model, processor, blocks patched)."""
    require_mlx_vlm(f"loading {model_dir} with images")
    import mlx_vlm

    from . import mlx_lm_patch

    model, processor = mlx_vlm.load(str(model_dir))
    n = 0
    if fused:
        n = mlx_lm_patch.patch(model, max_tokens=max_tokens or mlx_lm_patch.DEFAULT_MAX_TOKENS)
    return model, processor, n


def image_prompt(model, processor, prompt: str, n_images: int) -> str:
    """The prompt in the model's chat format with ``n_images`` image placeholders."""
    from mlx_vlm.prompt_utils import apply_chat_template

    return apply_chat_template(processor, model.config, prompt, num_images=n_images)


def run_generate_image(args) -> int:
    """`moequant generate --image PATH ...`: mlx-vlm's generate with the fused path.
    Uses --model, --prompt, --max-tokens, --temp, --top-p and --seed."""
    import sys

    import mlx.core as mx

    from . import mlx_lm_patch

    for img in args.image:
        if not Path(img).is_file():
            raise UserError(f"--image {img}: no such file")
    fused = not args.no_fused and mlx_lm_patch.env_enabled()
    try:
        model, processor, n = load_vlm(args.model, fused, args.fused_max_tokens)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"--model {args.model}: cannot load with mlx-vlm: {type(e).__name__}: {e}") from e
    print(f"[moequant] fused MoE path: {f'{n} MoE blocks' if fused else 'off'}", file=sys.stderr, flush=True)
    if getattr(args, "seed", None) is not None:
        mx.random.seed(args.seed)
    from mlx_vlm import generate

    prompt = args.prompt if args.prompt not in (None, "-") else sys.stdin.read()
    text = image_prompt(model, processor, prompt, len(args.image))
    generate(
        model,
        processor,
        text,
        image=list(args.image),
        max_tokens=args.max_tokens,
        temperature=args.temp,
        top_p=args.top_p,
        verbose=True,
    )
    return 0
