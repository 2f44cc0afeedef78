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
from moequant.testing.tiny_checkpoint import bf16_round, ct_quantize
from moequant.testing.tiny_mlx import TINY_DEEPSEEK_CONFIG, make_tiny_model, quantize_tiny

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
        assert (loaded[m["path"]].bits, loaded[m["path"]].group_size) == (m["bits"], m["group_size"]), m[
            "path"
        ]
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
    contract), scales/biases rounded to bf16, dequantized in float32, norms in float64."""
    words, scales = exact[(layer, proj, e)]
    w = mx.array(int4.dequantize(words, np.array(scales.astype(mx.float32)), 32))
    wq, s, b = mx.quantize(w, group_size=64, bits=bits, stream=mx.cpu)
    back = mx.dequantize(
        wq,
        s.astype(mx.bfloat16).astype(mx.float32),
        b.astype(mx.bfloat16).astype(mx.float32),
        group_size=64,
        bits=bits,
    )
    back, w = np.array(back).astype(np.float64), np.array(w).astype(np.float64)
    return float(np.linalg.norm(back - w) / np.linalg.norm(w))


def test_expert_error_against_int4_source(mixed, tmp_path):
    exact = _int4_source(tmp_path / "src")
    build = _converted(mixed, tmp_path / "build", exact)
    err = expert_errors(build, tmp_path / "src")
    rows = {(r["layer"], r["proj"]): r for r in err["per_layer_proj"]}
    assert set(rows) == {(l, p) for l in MOE_LAYERS for p in SHAPES}
    for (layer, proj), r in rows.items():
        want = [_oracle(exact, layer, proj, e, r["bits"]) for e in range(E)]
        np.testing.assert_allclose(r["per_expert"], want, rtol=1e-9)
    # 6-bit down_proj on layer 2 is far closer to the source than the 3-bit ones.
    assert rows[(2, "down_proj")]["bits"] == 6 and rows[(1, "down_proj")]["bits"] == 3
    assert rows[(2, "down_proj")]["max"] < 0.25 * rows[(1, "down_proj")]["mean"]
    assert err["per_layer"]["2"]["mean"] < err["per_layer"]["1"]["mean"]
    assert 0.05 < err["per_proj"]["gate_proj"]["mean"] < 0.5  # 3-bit g64 of INT4 weights

    # Experts stored in the wrong order are caught: unrelated weights, error ~ sqrt(2).
    bad = expert_errors(_converted(mixed, tmp_path / "swapped", exact, swap_experts=True), tmp_path / "src")
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
    mx.save_safetensors(
        str(tmp_path / "no_experts" / "model.safetensors"), {"model.norm.weight": mx.ones((4,))}
    )
    assert main(["inspect", str(mixed), "--source", str(tmp_path / "no_experts")]) == 2
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.safetensors").write_bytes(b"\0" * 8)
    assert main(["inspect", str(mixed), "--source", str(tmp_path / "junk")]) == 2
    err = capsys.readouterr().err
    assert "missing: no such directory" in err and "no INT4 expert tensors" in err
    assert "junk/model.safetensors: corrupt safetensors header" in err


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


# --------------------------------------------------------------------------- issue 12


def _source_oracle(src, layer, proj, e, bits, gs, prefix=""):
    """The error by another route, from the source read by mx.load: mx.quantize of the
    exact weights (requantize_int4's contract), bf16 scales/biases, dequantized."""
    tensors = {}
    for f in src.glob("*.safetensors"):
        tensors.update(mx.load(str(f)))
    k = f"{prefix}model.layers.{layer}.mlp.experts.{e}.{proj}"
    words = np.array(tensors[k + ".weight_packed"])
    scales = np.array(tensors[k + ".weight_scale"].astype(mx.float32))
    src_gs = words.shape[-1] * 8 // scales.shape[-1]
    w = mx.array(int4.dequantize(words, scales, src_gs))
    wq, s, b = mx.quantize(w, group_size=gs, bits=bits, stream=mx.cpu)
    back = mx.dequantize(
        wq,
        s.astype(mx.bfloat16).astype(mx.float32),
        b.astype(mx.bfloat16).astype(mx.float32),
        group_size=gs,
        bits=bits,
    )
    back, w = np.array(back).astype(np.float64), np.array(w).astype(np.float64)
    return float(np.linalg.norm(back - w) / np.linalg.norm(w))


@pytest.mark.parametrize("group", [32, 64, 128])
def test_source_group_sizes_and_lossless_native_is_exactly_zero(ckpt, tmp_path, group):
    """inspect --source handles every source group size convert accepts; the lossless
    int4-native build measures exactly 0 (no rounding through bf16 anywhere)."""
    from moequant.convert import convert

    src = ckpt("kimi_k2", layers=2, int4_group=group)
    convert(src, tmp_path / "native", "int4-native", progress=False)
    native = expert_errors(tmp_path / "native", src)
    assert native["per_layer_proj"] and all(r["source_group_size"] == group for r in native["per_layer_proj"])
    assert all(e == 0.0 for r in native["per_layer_proj"] for e in r["per_expert"])
    assert all(r["group_size"] == group and r["bits"] == 4 for r in native["per_layer_proj"])

    convert(src, tmp_path / "alis", "alis-3.6", progress=False)
    err = expert_errors(tmp_path / "alis", src)
    for r in err["per_layer_proj"]:
        want = [_source_oracle(src, r["layer"], r["proj"], e, r["bits"], 64) for e in range(r["experts"])]
        np.testing.assert_allclose(r["per_expert"], want, rtol=1e-9)
        assert min(r["per_expert"]) > 0.01


def test_truncated_build_shard_is_exit_2(ckpt, tmp_path, capsys):
    from moequant.convert import convert

    src = ckpt("kimi_k2", layers=2)
    build = tmp_path / "build"
    convert(src, build, "uniform-4", progress=False)
    shard = max(build.glob("model*.safetensors"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 64)
    assert main(["inspect", str(build)]) == 2
    err = capsys.readouterr().err
    assert shard.name in err and "truncated" in err and "Traceback" not in err


def _true_params(src):
    """The checkpoint's parameter count read by mx.load: an INT4 tensor counts the
    weights its weight_shape says it holds, its scales and shape are not parameters."""
    tensors = {}
    for f in src.glob("*.safetensors"):
        tensors.update(mx.load(str(f)))
    n = 0
    for name, a in tensors.items():
        if name.endswith(".weight_packed"):
            n += int(np.prod(np.array(tensors[name[: -len("packed")] + "shape"])))
        elif not name.endswith((".weight_scale", ".weight_shape")):
            n += a.size
    return n


@pytest.mark.parametrize("flavour,group", [("kimi_k25", 32), ("kimi_k2", 64)])
def test_inspect_describes_a_source_checkpoint(ckpt, capsys, flavour, group):
    src = ckpt(flavour, layers=3, int4_group=group)
    d = describe(src)
    assert d["total"]["params"] == _true_params(src)
    assert d["format"].startswith("compressed-tensors INT4")
    cfg = json.loads((src / "config.json").read_text())
    t = cfg.get("text_config", cfg)
    E, I, Hd = t["n_routed_experts"], t["moe_intermediate_size"], t["hidden_size"]
    for proj in ("gate_proj", "up_proj", "down_proj"):
        c = d["components"][f"experts.{proj}"]
        assert c["dtypes"] == ["int4"] and c["group_sizes"] == [group]
        assert c["params"] == 2 * E * I * Hd  # 2 MoE layers
        # 4 bits per weight plus a bf16 scale per group, plus the tiny weight_shape tensors
        assert 4 + 16 / group < c["bits_per_weight"] < 4 + 16 / group + 0.01
    assert "other" not in d["components"] or flavour == "kimi_k25"  # the vision tower
    assert main(["inspect", str(src)]) == 0
    out = capsys.readouterr().out
    assert f"{d['total']['params']:,} params" in out and "int4" in out
