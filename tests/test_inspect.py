"""`moequant inspect` against mlx-lm's own loader and bits-per-weight, and its expert error
against an independent mx.quantize computation."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

import moequant
from moequant import int4
from moequant.cli import main
from moequant.inspect_model import describe, expert_errors
from moequant.testing.tiny_mlx import TINY_DEEPSEEK_CONFIG, make_tiny_model, quantize_tiny
from moequant.testing.tiny_checkpoint import bf16_round, ct_quantize

E = TINY_DEEPSEEK_CONFIG["n_routed_experts"]
H = TINY_DEEPSEEK_CONFIG["hidden_size"]
I = TINY_DEEPSEEK_CONFIG["moe_intermediate_size"]
MOE_LAYERS = (1, 2)  # layer 0 is dense (first_k_dense_replace = 1)
SHAPES = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """An mlx-lm mixed_3_6 build: down_proj 6-bit on the last layer, 3-bit elsewhere."""
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.utils import load_model

    root = tmp_path_factory.mktemp("inspect")
    ref = make_tiny_model(root / "ref", seed=3)
    pred = mixed_quant_predicate_builder("mixed_3_6", load_model(ref)[0])
    return quantize_tiny(ref, root / "mixed", 3, quant_predicate=pred)


def test_composition_matches_mlx_lm(mixed):
    from mlx_lm.utils import compute_bits_per_weight, get_total_parameters, load_model

    d = describe(mixed)
    model = load_model(mixed)[0]
    assert d["total"]["params"] == get_total_parameters(model)
    assert d["total"]["bits_per_weight"] == pytest.approx(compute_bits_per_weight(model), rel=1e-12)
    # The loaded modules' own bits and group sizes are the oracle for each module.
    loaded = dict(model.named_modules())
    quantized = [m for m in d["modules"] if m["bits"] is not None]
    assert len(quantized) > 20
    for m in quantized:
        assert (loaded[m["path"]].bits, loaded[m["path"]].group_size) == (m["bits"], m["group_size"]), m["path"]
    assert d["layers"]["1"]["bits"]["down_proj"] == "3-bit"
    assert d["layers"]["2"]["bits"]["down_proj"] == "6-bit"
    assert d["layers"]["2"]["bits"]["gate_proj"] == "3-bit"
    assert d["components"]["router"]["dtypes"] == ["f32"]
    assert sum(c["bytes"] for c in d["components"].values()) == d["total"]["bytes"]
    assert sum(c["params"] for c in d["components"].values()) == d["total"]["params"]


def _int4_source(path, seed=0, prefix=""):
    """A compressed-tensors-style INT4 checkpoint of the tiny model's routed experts."""
    rng = np.random.default_rng(seed)
    tensors, exact = {}, {}
    for layer in MOE_LAYERS:
        for proj, shape in SHAPES.items():
            for e in range(E):
                words, scales = ct_quantize(bf16_round(rng.standard_normal(shape) * 0.02), 32)
                scales = mx.array(scales).astype(mx.bfloat16)
                k = f"{prefix}model.layers.{layer}.mlp.experts.{e}.{proj}"
                tensors[f"{k}.weight_packed"] = mx.array(words)
                tensors[f"{k}.weight_scale"] = scales
                tensors[f"{k}.weight_shape"] = mx.array(list(shape), dtype=mx.int32)
                exact[(layer, proj, e)] = (words, scales)
    path.mkdir(parents=True)
    mx.save_safetensors(str(path / "model.safetensors"), tensors)
    (path / "config.json").write_text(json.dumps({"model_type": "kimi_k2"}))
    return exact


def _converted(src_build, dst, exact, swap_experts=False):
    """``src_build`` with its routed experts replaced by requantize_int4 of the source, at
    the bits the build records for each tensor."""
    shutil.copytree(src_build, dst)
    weights = mx.load(str(dst / "model.safetensors"))
    d = {m["path"]: m for m in describe(dst)["modules"]}
    for layer in MOE_LAYERS:
        for proj in SHAPES:
            path = f"model.layers.{layer}.mlp.switch_mlp.{proj}"
            order = list(range(E))[::-1] if swap_experts else range(E)
            words = mx.array(np.stack([exact[(layer, proj, e)][0] for e in order]))
            scales = mx.stack([exact[(layer, proj, e)][1] for e in order])
            q = moequant.requantize_int4(words, scales, bits=d[path]["bits"], group_size=64)
            for name, a in zip(("weight", "scales", "biases"), q):
                assert weights[f"{path}.{name}"].shape == a.shape
                weights[f"{path}.{name}"] = a
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "mlx"})
    return dst


def _oracle(exact, layer, proj, e, bits):
    """The error by another route: mx.quantize of the exact weights (requantize_int4's
    contract), scales/biases rounded to bf16, dequantized."""
    words, scales = exact[(layer, proj, e)]
    w = mx.array(int4.dequantize(words, np.array(scales.astype(mx.float32)), 32))
    wq, s, b = mx.quantize(w, group_size=64, bits=bits, stream=mx.cpu)
    back = mx.dequantize(wq, s.astype(mx.bfloat16), b.astype(mx.bfloat16), group_size=64,
                         bits=bits, dtype=mx.float32)
    return float(mx.sqrt(mx.sum((back - w) ** 2) / mx.sum(w * w)).item())


def test_expert_error_against_int4_source(mixed, tmp_path):
    exact = _int4_source(tmp_path / "src")
    build = _converted(mixed, tmp_path / "build", exact)
    err = expert_errors(build, tmp_path / "src")
    rows = {(r["layer"], r["proj"]): r for r in err["per_layer_proj"]}
    assert set(rows) == {(l, p) for l in MOE_LAYERS for p in SHAPES}
    for (layer, proj), r in rows.items():
        want = [_oracle(exact, layer, proj, e, r["bits"]) for e in range(E)]
        np.testing.assert_allclose(r["per_expert"], want, rtol=1e-4)
    # 6-bit down_proj on layer 2 is far closer to the source than the 3-bit ones.
    assert rows[(2, "down_proj")]["bits"] == 6 and rows[(1, "down_proj")]["bits"] == 3
    assert rows[(2, "down_proj")]["max"] < 0.25 * rows[(1, "down_proj")]["mean"]
    assert err["per_layer"]["2"]["mean"] < err["per_layer"]["1"]["mean"]
    assert 0.05 < err["per_proj"]["gate_proj"]["mean"] < 0.5  # 3-bit g64 of INT4 weights

    # Experts stored in the wrong order are caught: unrelated weights, error ~ sqrt(2).
    bad = expert_errors(_converted(mixed, tmp_path / "swapped", exact, swap_experts=True),
                        tmp_path / "src")
    assert bad["per_proj"]["gate_proj"]["mean"] > 1.0


def test_kimi_k25_prefixed_source_and_cli(mixed, tmp_path, capsys):
    exact = _int4_source(tmp_path / "src", seed=1, prefix="language_model.")
    build = _converted(mixed, tmp_path / "build", exact)
    out = tmp_path / "inspect.json"
    assert main(["inspect", str(build), "--source", str(tmp_path / "src"), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "experts.down_proj" in text and "routed-expert error" in text
    report = json.loads(out.read_text())
    assert report["expert_error"]["per_layer_proj"][0]["experts"] == E
    assert report["total"]["bits_per_weight"] > 3


def test_inspect_bad_input_is_exit_2(mixed, tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    (tmp_path / "no_experts").mkdir()
    mx.save_safetensors(str(tmp_path / "no_experts" / "model.safetensors"),
                        {"model.norm.weight": mx.ones((4,))})
    assert main(["inspect", str(mixed), "--source", str(tmp_path / "no_experts")]) == 2
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.safetensors").write_bytes(b"\0" * 8)
    assert main(["inspect", str(mixed), "--source", str(tmp_path / "junk")]) == 2
    err = capsys.readouterr().err
    assert "missing: no such directory" in err and "no INT4 expert tensors" in err
    assert "junk/model.safetensors: not a safetensors file" in err


def test_bits_inferred_from_shapes_without_per_path_entries(mixed, tmp_path):
    # mlx-lm's loader infers bits from the tensor shapes when a module has no entry of its
    # own in config["quantization"]; inspect must agree.
    stripped = shutil.copytree(mixed, tmp_path / "stripped")
    cfg = json.loads((stripped / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        cfg[key] = {k: v for k, v in cfg[key].items() if k in ("bits", "group_size", "mode")}
    (stripped / "config.json").write_text(json.dumps(cfg))
    want = {m["path"]: (m["bits"], m["group_size"]) for m in describe(mixed)["modules"]}
    got = {m["path"]: (m["bits"], m["group_size"]) for m in describe(stripped)["modules"]}
    assert got == want and (6, 64) in got.values()
