"""Generate tiny Kimi-style checkpoints: INT4 compressed-tensors routed experts (packed
by our own packer, checked against compressed-tensors in tests/test_fixtures.py), bf16
everything else, a small BPE tokenizer, several shards and an HF index.

Flavours: ``kimi_k25`` (text model under text_config, ``language_model.`` prefix, vision
tower and projector tensors), ``kimi_k2`` and ``deepseek_v3`` (flat configs).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from .. import int4
from ..checkpoint.config import read_config
from ..checkpoint.layout import build_layout
from . import tokenizer

BF16_EPS = np.float32(2.0**-7)


def bf16_round(x: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest bfloat16 (ties to even), kept as float32."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    b = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return b.view(np.float32)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 values that are already bfloat16 -> their uint16 bit patterns."""
    return (np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) >> np.uint32(16)).astype(np.uint16)


def ct_quantize(w: np.ndarray, group_size: int):
    """Symmetric INT4 as compressed-tensors' minmax observer and compressor do it for a
    bf16 weight: scale = bf16(max(|min|, |max|) / 7.5) per group (min/max clamped to
    include 0, an all-zero group gets bf16's eps), q = clamp(rint(bf16(w / scale)), -8, 7).

    ``w`` holds bfloat16 values as float32. Returns (int32 words (N, K/8), float32
    scales that are exact bfloat16 values (N, K/group_size))."""
    g = np.asarray(w, dtype=np.float32).reshape(*w.shape[:-1], -1, group_size)
    amax = np.maximum(np.abs(np.minimum(g.min(-1), 0)), np.abs(np.maximum(g.max(-1), 0)))
    scale = bf16_round(amax / np.float32(7.5))
    scale = np.where(scale == 0, BF16_EPS, scale).astype(np.float32)
    q = np.clip(np.rint(bf16_round(g / scale[..., None])), -8, 7).astype(np.int8)
    return int4.pack(q.reshape(w.shape)), scale


def tiny_text_config(layers: int = 3, **overrides) -> dict:
    """A DeepSeek-V3 / Kimi text config with Kimi's structure at toy sizes. Every dim
    a group of 64 must divide is a multiple of 128."""
    c = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "kimi_k2",
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 128,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "q_lora_rank": 128,
        "kv_lora_rank": 128,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32,
        "v_head_dim": 64,
        "vocab_size": 384,
        "max_position_embeddings": 4096,
        "rope_theta": 50000.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "routed_scaling_factor": 2.827,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "rms_norm_eps": 1e-5,
        "num_nextn_predict_layers": 0,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    c.update(overrides)
    return c


def quantization_config(group_size: int = 32) -> dict:
    """The compressed-tensors block Kimi K2-Thinking / K2.5 ship (group size aside)."""
    return {
        "config_groups": {
            "group_0": {
                "input_activations": None,
                "output_activations": None,
                "targets": ["Linear"],
                "weights": {
                    "actorder": None,
                    "block_structure": None,
                    "dynamic": False,
                    "group_size": group_size,
                    "num_bits": 4,
                    "observer": "minmax",
                    "observer_kwargs": {},
                    "strategy": "group",
                    "symmetric": True,
                    "type": "int",
                },
            }
        },
        "format": "pack-quantized",
        "ignore": [
            "lm_head",
            "re:.*self_attn.*",
            "re:.*shared_experts.*",
            "re:.*mlp\\.(gate|up|gate_up|down)_proj.*",
        ],
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }


def full_config(flavour: str, text: dict, int4_group: Optional[int]) -> dict:
    text = copy.deepcopy(text)
    qc = quantization_config(int4_group) if int4_group else None
    if flavour == "kimi_k25":
        if qc:
            text["quantization_config"] = qc
        return {
            "architectures": ["KimiK25ForConditionalGeneration"],
            "model_type": "kimi_k25",
            "dtype": "bfloat16",
            "bos_token_id": text["bos_token_id"],
            "eos_token_id": text["eos_token_id"],
            "pad_token_id": 0,
            "tie_word_embeddings": False,
            "media_placeholder_token_id": MEDIA_PAD_ID,
            "text_config": text,
            "vision_config": dict(TINY_VISION_CONFIG),
        }
    text["model_type"] = flavour
    if qc:
        text["quantization_config"] = qc
    return text


# A tiny MoonViT (upstream Kimi-K2.5 vision_config keys; moequant.vision adds the keys
# mlx-vlm reads). Head size 32: the 2-D rotary embedding needs a multiple of 4.
TINY_VISION_CONFIG = {
    "vt_hidden_size": 64,
    "vt_num_hidden_layers": 2,
    "vt_num_attention_heads": 2,
    "vt_intermediate_size": 128,
    "patch_size": 14,
    "init_pos_emb_height": 8,
    "init_pos_emb_width": 8,
    "merge_kernel_size": [2, 2],
}
SPECIALS = ["<unk>", "<|bos|>", "<|eos|>", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>"]
# kimi_k25 only: the image placeholder mlx-vlm's processor expands (one per merged patch).
MEDIA_PAD = "<|media_pad|>"
MEDIA_PAD_ID = len(SPECIALS)

# Text content renders as before; list content (mlx-vlm's image messages) renders its
# text parts and one MEDIA_PAD per image.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|media_pad|>{% elif c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_assistant|>{% endif %}"
)


def write_tokenizer(dst: Path, vision: bool = False) -> int:
    """The shared test tokenizer with Kimi-like special tokens, plus the kind of side
    files a Kimi repo ships (copied by the converter). Returns its vocabulary size.
    ``vision``: also the image placeholder token and the processor's files."""
    specials = SPECIALS + ([MEDIA_PAD] if vision else [])
    n = tokenizer.write_tokenizer(
        dst, 320, specials=specials, eos="<|eos|>", bos="<|bos|>", model_max_length=4096
    )
    if vision:
        # The keys mlx-vlm's KimiK25Processor reads from preprocessor_config.json.
        (dst / "preprocessor_config.json").write_text(
            json.dumps(
                {
                    "media_proc_cfg": {
                        "patch_size": 14,
                        "in_patch_limit": 16384,
                        "merge_kernel_size": [2, 2],
                        "patch_limit_on_one_side": 512,
                        "image_mean": [0.5, 0.5, 0.5],
                        "image_std": [0.5, 0.5, 0.5],
                    }
                },
                indent=2,
            )
        )
        for f in ("kimi_k25_processor.py", "kimi_k25_vision_processing.py"):
            (dst / f).write_text("# Stands in for the repo's remote-code processor module.\n")
    (dst / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (dst / "tokenization_tiny.py").write_text(
        "# Stands in for a repo's remote-code tokenizer module; the converter copies it.\n"
    )
    (dst / "tiktoken.model").write_text("# stands in for Kimi's tiktoken vocabulary\n")
    (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    return n


def make_checkpoint(
    dst,
    flavour: str = "kimi_k25",
    *,
    int4_group: Optional[int] = 32,
    layers: int = 3,
    shards: int = 3,
    seed: int = 0,
    text_overrides: Optional[dict] = None,
    random_codes: bool = False,
    mtp_layer: bool = False,
) -> Path:
    """Write a tiny checkpoint to ``dst`` and return its path.

    int4_group: source group size of the INT4 routed experts, or None for plain bf16.
    random_codes: draw INT4 codes and scales directly (fast, for big benchmarks) instead
        of quantizing random bf16 weights with ct_quantize.
    mtp_layer: add a multi-token-prediction layer past num_hidden_layers (to be dropped).
    """
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    text = tiny_text_config(layers, **(text_overrides or {}))
    if flavour == "kimi_k2":
        # transformers does not know model_type kimi_k2: AutoTokenizer then parses the
        # config as a bare PreTrainedConfig, which fails on rope_scaling (real K2 repos
        # avoid this with remote code). The toy model does not need yarn.
        text.pop("rope_scaling")
    config = full_config(flavour, text, int4_group)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(dst, vision=flavour == "kimi_k25")

    cfg = read_config(dst)
    units, expect = build_layout(cfg)

    def bf16_normal(shape, std=0.02):
        return bf16_round(rng.standard_normal(shape, dtype=np.float32) * np.float32(std))

    def as_mx(name, shape, kind):
        if kind == "fp32":
            return mx.array(rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01))
        if name.endswith("norm.weight"):
            return mx.ones(shape, dtype=mx.bfloat16)
        return mx.array(bf16_bits(bf16_normal(shape))).view(mx.bfloat16)

    # Names in layout order, so each layer lands in one or two shards; tensors are made
    # shard by shard (a full-dimension fixture does not fit in memory at once).
    ordered = [n for unit in units for job in unit.jobs for n in job.sources]
    sizes = {n: _nbytes(expect[n]) for n in ordered}
    vision = {}
    if flavour == "kimi_k25":
        from ..vision import vision_tensors

        vision = vision_tensors(config["vision_config"], text["hidden_size"])

    def generate():
        for name in ordered:
            exp = expect[name]
            if name.endswith(".weight_packed"):
                base = name[: -len("weight_packed")]
                n, k = exp.shape[0], exp.shape[1] * 8
                if random_codes:
                    # Uniform random words are uniform codes over [-8, 7] in every nibble
                    # (and ~100x faster to make than packing drawn codes).
                    words = rng.integers(0, 2**32, (n, k // 8), dtype=np.uint32).view(np.int32)
                    scale = bf16_round(
                        (rng.random((n, k // int4_group), dtype=np.float32) + 0.1) * np.float32(0.004)
                    )
                else:
                    words, scale = ct_quantize(bf16_normal((n, k)), int4_group)
                yield name, mx.array(words)
                yield base + "weight_scale", mx.array(bf16_bits(scale)).view(mx.bfloat16)
                yield base + "weight_shape", mx.array(np.array([n, k], dtype=np.int32))
            elif not name.endswith((".weight_scale", ".weight_shape")):
                yield name, as_mx(name, exp.shape, exp.kind)
        # A real tiny MoonViT + projector, upstream names and layout (moequant.vision).
        for name, (shape, _) in vision.items():
            if "norm" in name and name.endswith(".weight"):
                yield name, mx.ones(shape, dtype=mx.bfloat16)
            else:
                yield name, mx.array(bf16_bits(bf16_normal(shape, 0.1))).view(mx.bfloat16)
        if mtp_layer:
            p = cfg.prefix + f"model.layers.{layers}."
            yield p + "eh_proj.weight", mx.zeros((256, 512), mx.bfloat16)
            yield p + "enorm.weight", mx.ones((256,), mx.bfloat16)

    if flavour == "kimi_k25":
        for name, (shape, _) in vision.items():
            sizes[name] = 2 * int(np.prod(shape))
    if mtp_layer:
        p = cfg.prefix + f"model.layers.{layers}."
        sizes[p + "eh_proj.weight"], sizes[p + "enorm.weight"] = 256 * 512 * 2, 256 * 2
    _write_shards(dst, sizes, generate(), shards)
    return dst


def _nbytes(exp) -> int:
    return int(np.prod(exp.shape)) * (4 if exp.kind in ("fp32", "packed", "shape") else 2)


def _write_shards(dst: Path, sizes: dict, tensors, shards: int) -> None:
    """sizes: name -> bytes, in order; tensors: (name, array) in the same order."""
    names = list(sizes)
    total = sum(sizes.values())
    per = total / shards
    groups, acc = [[]], 0
    for n in names:
        if acc >= per * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(n)
        acc += sizes[n]
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):06d}.safetensors"
        part = {}
        for n in group:
            name, arr = next(tensors)
            assert name == n and arr.nbytes == sizes[n], (name, n)
            part[name] = arr
        mx.save_safetensors(str(dst / fname), part, metadata={"format": "pt"})
        del part
        weight_map.update({n: fname for n in group})
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


_ST_DTYPE = {"float": ("BF16", 2), "fp32": ("F32", 4), "packed": ("I32", 4), "shape": ("I32", 4)}


def make_sparse_checkpoint(dst, config: dict, shards: int = 64) -> Path:
    """A full-size checkpoint whose tensor data are holes: real safetensors headers (names,
    dtypes, shapes, offsets) over sparse files. For planning and validating real model
    sizes (e.g. the 595 GB Kimi-K2.5) without the disk space; never read the data."""
    import struct

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    units, expect = build_layout(read_config(dst))
    names = [n for u in units for j in u.jobs for n in j.sources]
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        chunk = names[i * per : (i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:06d}.safetensors"
        header, off = {}, 0
        for n in chunk:
            dtype, size = _ST_DTYPE[expect[n].kind]
            nbytes = size * int(np.prod(expect[n].shape))
            header[n] = {"dtype": dtype, "shape": list(expect[n].shape), "data_offsets": [off, off + nbytes]}
            off += nbytes
            weight_map[n] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(dst / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + off)
        total += off
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return dst
