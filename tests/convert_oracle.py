"""Independent oracles for converted models: recompute every output tensor from the
source files with plain MLX / numpy and compare bit for bit."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import mlx.core as mx

from int4_reference import dequantize_exact


def load_dir(path) -> dict:
    out = {}
    for f in sorted(glob.glob(str(Path(path) / "*.safetensors"))):
        out.update(mx.load(f))
    return out


def equal(a: mx.array, b: mx.array) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(mx.array_equal(a, b).item())


def quantized_bits(out: dict, path: str, k: int):
    """(bits, group_size) of a quantized output module, from its shapes; None if bf16."""
    if path + ".scales" not in out:
        return None
    return out[path + ".weight"].shape[-1] * 32 // k, k // out[path + ".scales"].shape[-1]


def check_conversion(src_dir, out_dir):
    """Compare every output tensor with its oracle. Returns {module path: (bits, group)
    or None} for the quantizable modules, to check the recipe with."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    cfg = json.loads((src_dir / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    prefix = "language_model." if cfg["model_type"] == "kimi_k25" else ""
    qc = text.get("quantization_config") or cfg.get("quantization_config")
    src_gs = qc["config_groups"]["group_0"]["weights"]["group_size"] if qc else None
    src = load_dir(src_dir)
    out = load_dir(out_dir)
    seen, bits_of = set(), {}

    def check_module(path, w_exact):
        """w_exact: the float weight the module must be the quantization of."""
        full = prefix + path
        k = w_exact.shape[-1]
        bg = quantized_bits(out, full, k)
        bits_of[path] = bg
        names = [full + ".weight"] + ([full + ".scales", full + ".biases"] if bg else [])
        seen.update(names)
        if bg is None:
            assert equal(out[full + ".weight"], w_exact.astype(mx.bfloat16)), full
            return
        wq, s, b = mx.quantize(w_exact, group_size=bg[1], bits=bg[0], stream=mx.cpu)
        for name, ref in zip(names, (wq, s.astype(mx.bfloat16), b.astype(mx.bfloat16))):
            assert equal(out[name], ref), f"{name} differs from mx.quantize of the source"

    nope, vdim = text["qk_nope_head_dim"], text["v_head_dim"]
    for l in range(text["num_hidden_layers"]):
        p = f"model.layers.{l}"
        for key in list(src):
            if not key.startswith(prefix + p + "."):
                continue
            rest = key[len(prefix) :]
            if ".experts." in rest:
                continue
            if rest.endswith("kv_b_proj.weight"):
                v = src[key].reshape(text["num_attention_heads"], nope + vdim, -1)
                check_module(f"{p}.self_attn.embed_q", mx.contiguous(v[:, :nope, :].swapaxes(-1, -2)))
                check_module(f"{p}.self_attn.unembed_out", mx.contiguous(v[:, nope:, :]))
            elif "norm" in rest or ".mlp.gate." in rest:
                assert equal(out[key], src[key]), key  # never quantized, dtype kept
                seen.add(key)
            else:
                check_module(rest[: -len(".weight")], src[key])
        if (
            f"{prefix}{p}.mlp.experts.0.down_proj.weight_packed" in src
            or f"{prefix}{p}.mlp.experts.0.down_proj.weight" in src
        ):
            E = text["n_routed_experts"]
            for proj in ("gate_proj", "up_proj", "down_proj"):
                base = [f"{prefix}{p}.mlp.experts.{e}.{proj}" for e in range(E)]
                path = f"{p}.mlp.switch_mlp.{proj}"
                if src_gs:
                    packed = mx.stack([src[b + ".weight_packed"] for b in base])
                    scales = mx.stack([src[b + ".weight_scale"] for b in base])
                    w = dequantize_exact(packed, scales, src_gs)
                    full = prefix + path
                    bg = quantized_bits(out, full, w.shape[-1])
                    if bg == (4, src_gs) and equal(out[full + ".weight"], packed.view(mx.uint32)):
                        # Lossless repack (int4-native): words as stored, bias -8 * scale.
                        assert equal(out[full + ".scales"], scales)
                        assert equal(out[full + ".biases"], -8 * scales)
                        bits_of[path] = ("repack", src_gs)
                        seen.update(full + s for s in (".weight", ".scales", ".biases"))
                        continue
                    check_module(path, w)
                else:
                    check_module(path, mx.stack([src[b + ".weight"] for b in base]))
    for path in ("model.embed_tokens", "lm_head"):
        check_module(path, src[prefix + path + ".weight"])
    assert equal(out[prefix + "model.norm.weight"], src[prefix + "model.norm.weight"])
    seen.add(prefix + "model.norm.weight")
    assert seen == set(out), f"unchecked output tensors: {sorted(set(out) - seen)[:5]}"
    return bits_of
