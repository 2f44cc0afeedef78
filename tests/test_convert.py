"""End-to-end conversion of tiny Kimi-style checkpoints, checked against independent
oracles and loaded by stock mlx-lm (no moequant import needed by the loader)."""

import json
import subprocess
import sys

import mlx.core as mx
import pytest

from convert_oracle import check_conversion, load_dir
from moequant import cli
from moequant.convert import convert

PRESETS = ["alis-3.6", "int4-native", "uniform-3", "uniform-4", "mixed-3-6"]


def greedy_generate(path, n=6):
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    model, tok = mlx_lm.load(str(path))
    text = mlx_lm.generate(model, tok, "The quick brown fox", max_tokens=n, sampler=make_sampler(temp=0.0))
    return model, tok, text


def moe_layers(n_layers):
    return list(range(1, n_layers))  # first_k_dense_replace = 1


@pytest.mark.parametrize("flavour", ["kimi_k25", "kimi_k2", "deepseek_v3"])
def test_alis_bit_exact_and_loadable(ckpt, tmp_path, flavour):
    src = ckpt(flavour, layers=5)
    res = convert(src, tmp_path / "out", "alis-3.6", progress=False)
    bits = check_conversion(src, tmp_path / "out")
    # The recipe: routed gate/up 3/64; down 4/64 on round(16/60 * 4) = 1 spread layer.
    down4 = [l for l in moe_layers(5) if bits[f"model.layers.{l}.mlp.switch_mlp.down_proj"] == (4, 64)]
    assert down4 == [3]  # the centre of 4 candidate layers, as spread() picks
    for l in moe_layers(5):
        assert bits[f"model.layers.{l}.mlp.switch_mlp.gate_proj"] == (3, 64)
        assert bits[f"model.layers.{l}.mlp.switch_mlp.up_proj"] == (3, 64)
        if l not in down4:
            assert bits[f"model.layers.{l}.mlp.switch_mlp.down_proj"] == (3, 64)
    others = {p: b for p, b in bits.items() if "switch_mlp" not in p}
    assert others and all(b == (6, 64) for b in others.values()), others
    assert {p.split(".")[-1] for p in others} >= {
        "q_a_proj",
        "q_b_proj",
        "kv_a_proj_with_mqa",
        "embed_q",
        "unembed_out",
        "o_proj",
        "embed_tokens",
        "lm_head",
        "down_proj",
    }
    # Routed-expert bits/weight from the written tensors: 3.5 and 4.5, not mlx-lm's 5.0.
    out = load_dir(tmp_path / "out")
    prefix = "language_model." if flavour == "kimi_k25" else ""
    for l in moe_layers(5):
        for proj in ("gate_proj", "down_proj"):
            p = f"{prefix}model.layers.{l}.mlp.switch_mlp.{proj}"
            nbytes = sum(out[p + s].nbytes for s in (".weight", ".scales", ".biases"))
            E, N, K = (
                out[p + ".scales"].shape[0],
                out[p + ".scales"].shape[1],
                128 if proj == "down_proj" else 256,
            )
            bpw = nbytes * 8 / (E * N * K)
            assert bpw == (4.5 if (proj == "down_proj" and l in down4) else 3.5)
    assert res.expert_bpw == pytest.approx((3.5 * 11 + 4.5) / 12)
    _, _, text = greedy_generate(tmp_path / "out")
    assert isinstance(text, str)


@pytest.mark.parametrize("recipe", PRESETS)
def test_every_preset_loads_and_generates(ckpt, tmp_path, recipe):
    src = ckpt("kimi_k25", layers=3)
    convert(src, tmp_path / "out", recipe, progress=False)
    bits = check_conversion(src, tmp_path / "out")
    if recipe == "int4-native":
        assert all(b == ("repack", 32) for p, b in bits.items() if "switch_mlp" in p)
    if recipe == "uniform-4":
        assert set(bits.values()) == {(4, 64)}
    model, tok, text = greedy_generate(tmp_path / "out")
    # The loader built quantized layers with the recipe's bits (not inferred defaults).
    sw = model.language_model.model.layers[1].mlp.switch_mlp.down_proj
    assert type(sw).__name__ == "QuantizedSwitchLinear"


def test_mixed_3_6_matches_mlx_lm_predicate(ckpt, tmp_path):
    """Our mixed-3-6 preset gives every module mlx-lm's mixed_3_6 bits (for the routed
    experts too, which mlx-lm itself would skip on an INT4 source)."""
    import mlx_lm.utils as mu
    from mlx_lm.convert import mixed_quant_predicate_builder

    src = ckpt("deepseek_v3", layers=9, int4_group=None, text_overrides={"n_routed_experts": 4})
    convert(src, tmp_path / "out", "mixed-3-6", progress=False)
    model, _ = mu.load_model(src, lazy=True)
    pred = mixed_quant_predicate_builder("mixed_3_6", model, 64)
    q = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    n = 0
    for path, module in model.named_modules():
        if hasattr(module, "to_quantized") and path:
            assert q[path]["bits"] == pred(path, module)["bits"], path
            n += 1
    assert n > 40


@pytest.mark.parametrize("group", [64, 128])
def test_source_group_sizes(ckpt, tmp_path, group):
    src = ckpt("kimi_k2", layers=2, int4_group=group)
    convert(src, tmp_path / "out", "alis-3.6", progress=False)
    check_conversion(src, tmp_path / "out")
    convert(src, tmp_path / "native", "int4-native", progress=False)
    bits = check_conversion(src, tmp_path / "native")
    assert bits["model.layers.1.mlp.switch_mlp.up_proj"] == ("repack", group)
    greedy_generate(tmp_path / "native", 2)


def test_bf16_source(ckpt, tmp_path):
    src = ckpt("kimi_k25", layers=3, int4_group=None)
    convert(src, tmp_path / "out", "alis-3.6", progress=False)
    bits = check_conversion(src, tmp_path / "out")
    assert bits["model.layers.1.mlp.switch_mlp.up_proj"] == (3, 64)
    greedy_generate(tmp_path / "out", 2)


def test_output_files_config_and_plan_agree(ckpt, tmp_path):
    src = ckpt("kimi_k25", layers=4)
    out = tmp_path / "out"
    res = convert(src, out, "alis-3.6", progress=False, max_shard_bytes=400_000)
    names = sorted(p.name for p in out.iterdir())
    for f in (
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "tiktoken.model",
        "tokenization_tiny.py",
        "generation_config.json",
        "moequant_recipe.json",
    ):
        assert f in names
    assert not any(n.startswith(".") for n in names), names  # no journal or partial files left
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) > 4 and all(n.startswith("model-") for n in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    weights = load_dir(out)
    assert set(index["weight_map"]) == set(weights)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in weights.values()) == res.total_bytes
    for name, f in index["weight_map"].items():
        assert name in mx.load(str(out / f))
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg["text_config"] and "vision_config" not in cfg
    assert cfg["quantization"] == cfg["quantization_config"]
    q = cfg["quantization"]
    assert q["language_model.model.layers.1.mlp.switch_mlp.gate_proj"] == {
        "group_size": 64,
        "bits": 3,
        "mode": "affine",
    }
    assert q["language_model.lm_head"]["bits"] == 6
    assert not any(".mlp.gate" == k[-9:] for k in q)  # the router is never quantized
    assert not any(k.startswith(("vision_tower", "mm_projector")) for k in weights)
    from moequant.plan import make_plan

    assert make_plan(src, "alis-3.6").bytes == res.total_bytes


def test_small_pieces_give_the_same_files(ckpt, tmp_path, monkeypatch):
    """Experts and matrix rows cut into many small pieces (a few experts, a few rows,
    several per shard, the buffer pool recycled many times) give exactly the files of
    whole-job pieces, and they match the oracle."""
    from moequant import convert_pipeline

    src = ckpt("kimi_k25", layers=3)
    convert(src, tmp_path / "whole", "alis-3.6", progress=False)
    monkeypatch.setattr(convert_pipeline, "PIECE_BYTES", 40_000)
    import moequant.convert as c

    pieces, real = [], convert_pipeline.plan_pieces

    def recorded(*a, **k):
        got = real(*a, **k)
        pieces.extend(got)
        return got

    monkeypatch.setattr(c, "plan_pieces", recorded)
    convert(src, tmp_path / "small", "alis-3.6", progress=False)
    experts = [p for p in pieces if p.job.kind == "experts"]
    rows = [p for p in pieces if p.job.kind == "dense" and not p.whole]
    assert len(experts) > 3 * len({id(p.job) for p in experts}) and len(rows) > 20
    assert any(0 < p.lo for p in rows)
    check_conversion(src, tmp_path / "small")
    for f in sorted((tmp_path / "whole").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "small" / f.name).read_bytes(), f.name


def test_dry_run_writes_nothing(ckpt, tmp_path, capsys):
    src = ckpt("kimi_k25", layers=3)
    rc = cli.main(["convert", "--hf-path", str(src), "--mlx-path", str(tmp_path / "out"), "--dry-run"])
    assert rc == 0 and not (tmp_path / "out").exists()
    text = capsys.readouterr().out
    assert "routed gate/up" in text and "dry run" in text


def test_cli_subprocess_convert_and_load_without_moequant(ckpt, tmp_path):
    """The CLI end to end, and a loader process that never imports moequant."""
    src = ckpt("kimi_k25", layers=3)
    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "moequant",
            "convert",
            "--hf-path",
            str(src),
            "--mlx-path",
            str(out),
            "--recipe",
            "alis-3.6",
            "--threads",
            "2",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "units 4/4" in r.stderr and "total" in r.stdout and "GB/s" in r.stdout
    code = (
        "import sys, mlx_lm; from mlx_lm.sample_utils import make_sampler; "
        f"m, t = mlx_lm.load({str(out)!r}); "
        "print(len(mlx_lm.generate(m, t, 'The quick', max_tokens=3, sampler=make_sampler(temp=0.0))) >= 0); "
        "assert 'moequant' not in sys.modules"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "True" in r.stdout, r.stderr


def test_inspect_agrees_with_convert(ckpt, tmp_path):
    """moequant inspect (headers + config only) sees what the converter says it wrote."""
    from moequant.inspect_model import describe

    src = ckpt("kimi_k25", layers=3)
    res = convert(src, tmp_path / "out", "alis-3.6", progress=False)
    d = describe(tmp_path / "out")
    assert d["total"]["bytes"] == res.total_bytes and d["total"]["params"] == res.total_params
    assert d["recipe"]["moequant"]["recipe"] == "alis-3.6"


@pytest.mark.parametrize(
    "recipe,mlx_args", [("mixed-3-6", {"quant_predicate": "mixed_3_6"}), ("uniform-4", {"q_bits": 4})]
)
def test_bf16_source_equals_mlx_lm_convert(ckpt, tmp_path, recipe, mlx_args):
    """On a plain bf16 checkpoint mlx-lm's own convert quantizes everything itself, so its
    output is a second oracle: every tensor must be identical, name, dtype and bytes."""
    from mlx_lm.convert import convert as mlx_convert

    src = ckpt("deepseek_v3", layers=9, int4_group=None)
    convert(src, tmp_path / "ours", recipe, progress=False)
    mlx_convert(str(src), str(tmp_path / "ref"), quantize=True, q_group_size=64, **mlx_args)
    ours, ref = load_dir(tmp_path / "ours"), load_dir(tmp_path / "ref")
    assert set(ours) == set(ref)
    bad = [
        k for k in ref if not (ours[k].dtype == ref[k].dtype and bool(mx.array_equal(ours[k], ref[k]).item()))
    ]
    assert not bad, bad[:5]
