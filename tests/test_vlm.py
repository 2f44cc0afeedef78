"""The -VLM sibling (convert --keep-vision): a Kimi-K2.5 build mlx-vlm loads as kimi_k25,
its language model byte-identical to the text build, its MoE blocks patched."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import moequant
from moequant import vision
from moequant.cli import main
from moequant.convert import convert
from moequant.errors import UserError
from moequant.plan import fmt_bytes

CONFIGS = Path(moequant.__file__).parent / "testing" / "configs"
needs_vlm = pytest.mark.skipif(not vision.has_mlx_vlm(), reason="mlx-vlm not installed (moequant[vlm])")


@pytest.fixture(scope="module")
def builds(tmp_path_factory, request):
    """The tiny kimi_k25 checkpoint, its text build and its -VLM build (same recipe)."""
    ckpt = request.getfixturevalue("ckpt")
    src = ckpt("kimi_k25")
    root = tmp_path_factory.mktemp("vlm")
    text = convert(src, root / "text", "alis-3.6", progress=False).mlx_path
    vlm = convert(src, root / "vlm", "alis-3.6", progress=False, keep_vision=True).mlx_path
    return src, text, vlm


def png(path: Path, seed: int, size=(56, 42)) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return str(path)


def same_bits(a: mx.array, b: mx.array) -> bool:
    """Same dtype, shape and bytes (bf16 compared as its 16-bit words)."""

    def words(x):
        return np.array(x.view(mx.uint16) if x.dtype == mx.bfloat16 else x)

    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(words(a), words(b))


def index(d: Path) -> dict:
    return json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]


def test_language_model_bytes_equal_the_text_build(builds):
    src, text, vlm = builds
    tmap, vmap = index(text), index(vlm)
    extra = set(vmap) - set(tmap)
    assert set(tmap) <= set(vmap)
    assert extra and all(n.startswith(vision.VISION_PREFIXES) for n in extra)
    assert not any(n.startswith(vision.VISION_PREFIXES) for n in tmap)
    # Every language-model tensor: same name, same shard, same bytes (whole shard files).
    assert {vmap[n] for n in tmap} == set(tmap.values())
    for shard in set(tmap.values()):
        assert (text / shard).read_bytes() == (vlm / shard).read_bytes(), shard
    assert set(vmap[n] for n in extra) == {vision.VISION_SHARD}
    tcfg, vcfg = (json.loads((d / "config.json").read_text()) for d in (text, vlm))
    assert tcfg["quantization"] == vcfg["quantization"]
    assert tcfg["text_config"] == vcfg["text_config"]
    assert "vision_config" not in tcfg and vcfg["vision_config"]["depth"] == 2
    # Processor configuration and remote code are copied.
    for f in (
        "preprocessor_config.json",
        "kimi_k25_processor.py",
        "kimi_k25_vision_processing.py",
        "tokenizer.json",
        "chat_template.jinja",
    ):
        assert (vlm / f).read_bytes() == (src / f).read_bytes(), f


def test_vision_tensors_copied_exactly(builds):
    """Vision tensors are the source's bf16 values (conv weight in MLX order)."""
    src, _, vlm = builds
    out = mx.load(str(vlm / vision.VISION_SHARD))
    srcw = {}
    for f in src.glob("*.safetensors"):
        srcw.update(mx.load(str(f)))
    cfg = json.loads((src / "config.json").read_text())
    table = vision.vision_tensors(cfg["vision_config"], cfg["text_config"]["hidden_size"])
    assert set(out) == {m for _, m in table.values()}
    for up, (shape, m) in table.items():
        want = srcw[up]
        if up.endswith("patch_embed.proj.weight"):
            want = want.transpose(0, 2, 3, 1)
        assert out[m].dtype == mx.bfloat16 and tuple(srcw[up].shape) == shape
        assert same_bits(out[m], want), m


@needs_vlm
def test_vision_table_is_mlx_vlm_module_tree(builds):
    """vision_tensors' mlx-vlm names and shapes are exactly the parameters of mlx-vlm's
    kimi_k25 vision tower and projector built from the same config."""
    from mlx.utils import tree_flatten
    from mlx_vlm.models import kimi_k25

    _, _, vlm = builds
    cfg = json.loads((vlm / "config.json").read_text())
    mc = kimi_k25.ModelConfig.from_dict(cfg)
    mc.text_config = kimi_k25.TextConfig.from_dict(cfg["text_config"])
    mc.vision_config = kimi_k25.VisionConfig.from_dict(cfg["vision_config"])
    model = kimi_k25.Model(mc)
    tree = {
        k: tuple(v.shape) for k, v in tree_flatten(model.parameters()) if k.startswith(vision.VISION_PREFIXES)
    }
    table = vision.vision_tensors(cfg["vision_config"], cfg["text_config"]["hidden_size"])
    mine = {m: (s[0], s[2], s[3], s[1]) if len(s) == 4 else s for s, m in table.values()}
    assert mine == tree
    # and mlx-vlm's sanitize maps the upstream names onto them
    up = {n: mx.zeros(s) for n, (s, _) in table.items()}
    san = kimi_k25.VisionModel(mc.vision_config).sanitize(model.sanitize(up))
    assert {k: tuple(v.shape) for k, v in san.items()} == tree


def _float32(model):
    from mlx.utils import tree_map

    model.update(
        tree_map(
            lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a, model.parameters()
        )
    )


def _greedy_image(model, processor, image, n=6):
    from mlx_vlm import stream_generate

    prompt = vision.image_prompt(model, processor, "Describe the picture.", 1)
    *_, last = stream_generate(model, processor, prompt, image=[image], max_tokens=n, temperature=0.0)
    return last.token_ids  # every generated token (the final result carries them all)


@needs_vlm
def test_loads_in_mlx_vlm_and_generates_from_an_image(builds, tmp_path):
    _, _, vlm = builds
    model, processor, n = vision.load_vlm(vlm, fused=False)
    assert n == 0 and type(model).__module__.startswith("mlx_vlm.models.kimi_k25")
    img = png(tmp_path / "a.png", 1)
    from PIL import Image

    inputs = processor(images=[Image.open(img)], text=[vision.image_prompt(model, processor, "What?", 1)])
    ids = inputs["input_ids"]
    n_img = int((ids == vision_pad_id(vlm)).sum().item())
    # 56 x 42 pixels -> padded to 56 x 56 -> 4 x 4 patches -> 4 merged image tokens
    assert n_img == 4 and tuple(inputs["image_grid_hws"].tolist()[0]) == (4, 4)
    toks = _greedy_image(model, processor, img)
    assert len(toks) == 6  # the tiny tokenizer's eos never wins on random weights

    # The image reaches the language model: another image changes the next-token logits.
    def logits(path):
        x = processor(images=[Image.open(path)], text=[vision.image_prompt(model, processor, "What?", 1)])
        out = model(x["input_ids"], x["pixel_values"], image_grid_hws=x["image_grid_hws"])
        return np.array(out.logits[0, -1].astype(mx.float32))

    a, b = logits(img), logits(png(tmp_path / "b.png", 2))
    assert np.abs(a - b).max() > 1e-3


def vision_pad_id(d: Path) -> int:
    return json.loads((d / "config.json").read_text())["media_placeholder_token_id"]


@needs_vlm
def test_fused_and_unfused_greedy_tokens_equal_for_an_image_prompt(builds, tmp_path, monkeypatch):
    from moequant import mlx_lm_patch

    _, _, vlm = builds
    img = png(tmp_path / "c.png", 3)
    model, processor, _ = vision.load_vlm(vlm, fused=False)
    _float32(model)
    want = _greedy_image(model, processor, img, 8)
    calls = []
    real = mlx_lm_patch.moe_swiglu
    monkeypatch.setattr(
        mlx_lm_patch, "moe_swiglu", lambda x, *a, **k: calls.append(x.shape) or real(x, *a, **k)
    )
    assert moequant.patch(model) == 2  # layers 1 and 2 are MoE, layer 0 is dense
    got = _greedy_image(model, processor, img, 8)
    assert calls, "the fused op never ran"
    assert got == want


def test_plan_keep_vision_reports_the_vision_row(capsys):
    cfgp = CONFIGS / "kimi_k25.json"
    assert main(["plan", "--config", str(cfgp)]) == 0
    text_out = capsys.readouterr().out
    assert main(["plan", "--config", str(cfgp), "--keep-vision"]) == 0
    out = capsys.readouterr().out
    assert "vision tower" not in text_out and "vision tower" in out
    # MoonViT at Kimi-K2.5's size (mlx-vlm's kimi_k25 defaults: 27 blocks, width 1152,
    # MLP 4304, 64 x 64 position table, 2 x 2 merge) and the projector to 7168, in bf16.
    e, i, p, blocks, t = 1152, 4304, 14, 27, 7168
    per_block = 4 * e + (3 * e * e + 3 * e) + (e * e + e) + (i * e + i) + (e * i + e)
    params = (
        e * 3 * p * p
        + e
        + 64 * 64 * e
        + blocks * per_block
        + 2 * e
        + 2 * e
        + (4 * e) ** 2
        + 4 * e
        + t * 4 * e
        + t
    )
    assert main(["plan", "--config", str(cfgp), "--keep-vision", "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    row = next(c for c in js["components"] if c["name"] == "vision tower")
    assert row["params"] == params and row["bytes"] == 2 * params
    assert 0.85e9 < row["bytes"] < 0.95e9  # the model card's "+0.9 GB of vision tensors"
    assert js["total_bytes"] == js["text_build_bytes"] + row["bytes"]
    line = next(l for l in out.splitlines() if l.startswith("-VLM sibling"))
    assert (
        f"text build {fmt_bytes(js['text_build_bytes'])} + vision tower and projector "
        f"{fmt_bytes(row['bytes'])}"
        in line
        and "464.92 GB" in line
    )  # the model card's 465 GB


def test_keep_vision_needs_a_vision_checkpoint(ckpt, tmp_path, capsys):
    src = ckpt("deepseek_v3")
    assert (
        main(
            ["convert", "--hf-path", str(src), "--mlx-path", str(tmp_path / "o"), "--keep-vision", "--quiet"]
        )
        == 2
    )
    assert "--keep-vision needs a kimi_k25 checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["plan", "--config", str(src), "--keep-vision"]) == 2


def test_missing_or_extra_vision_tensor_is_named(ckpt, tmp_path, capsys):
    import shutil

    src = ckpt("kimi_k25")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    idx = json.loads((bad / "model.safetensors.index.json").read_text())
    name = "vision_tower.encoder.blocks.1.mlp.fc0.weight"
    shard = idx["weight_map"].pop(name)
    tensors = mx.load(str(bad / shard))
    tensors.pop(name)
    tensors["vision_tower.encoder.blocks.2.mlp.fc0.weight"] = mx.zeros((4,), mx.bfloat16)
    idx["weight_map"]["vision_tower.encoder.blocks.2.mlp.fc0.weight"] = shard
    mx.save_safetensors(str(bad / shard), tensors)
    (bad / "model.safetensors.index.json").write_text(json.dumps(idx))
    assert (
        main(
            [
                "convert",
                "--hf-path",
                str(bad),
                "--mlx-path",
                str(tmp_path / "o"),
                "--keep-vision",
                "--dry-run",
            ]
        )
        == 2
    )
    assert f"vision tensor {name} is missing" in capsys.readouterr().err
    # without --keep-vision the text build ignores the vision side, as before
    assert main(["convert", "--hf-path", str(bad), "--mlx-path", str(tmp_path / "o"), "--dry-run"]) == 0


def test_recipe_field_keep_vision(ckpt, tmp_path):
    from moequant.recipes import PRESETS

    src = ckpt("kimi_k25")
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({**PRESETS["alis-3.6"], "keep_vision": True}))
    r = convert(src, tmp_path / "o", str(recipe), dry_run=True, progress=False)
    assert any(row.name == "vision tower" for row in r.rows)
    r = convert(src, tmp_path / "o", str(recipe), dry_run=True, progress=False, keep_vision=False)
    assert not any(row.name == "vision tower" for row in r.rows)
    recipe.write_text(json.dumps({**PRESETS["alis-3.6"], "keep_vision": "yes"}))
    with pytest.raises(UserError, match="keep_vision must be true or false"):
        convert(src, tmp_path / "o", str(recipe), dry_run=True, progress=False)


def test_without_mlx_vlm_loading_says_what_to_install(builds, monkeypatch, tmp_path):
    """--keep-vision converted without mlx-vlm (the builds fixture does not need it);
    generate --image then names the extra to install."""
    _, _, vlm = builds
    monkeypatch.setitem(sys.modules, "mlx_vlm", None)  # import mlx_vlm -> ImportError
    assert not vision.has_mlx_vlm()
    with pytest.raises(UserError, match=r'pip install "moequant\[vlm\]"'):
        vision.load_vlm(vlm)
    img = tmp_path / "d.png"
    img.write_bytes(b"not read: the missing extra is reported first")
    with pytest.raises(UserError, match=r"moequant\[vlm\]"):
        main_raises(["generate", "--model", str(vlm), "--image", str(img), "--prompt", "hi"])


def main_raises(argv):
    """Run the CLI's parse + run without its exit-code mapping (to see the error)."""
    import argparse

    from moequant import generate_cli

    p = argparse.ArgumentParser()
    generate_cli.add_arguments(p)
    return generate_cli.run(p.parse_args(argv[1:]))


@needs_vlm
def test_generate_image_cli(builds, tmp_path):
    _, _, vlm = builds
    img = png(tmp_path / "e.png", 5)
    common = [
        sys.executable,
        "-m",
        "moequant",
        "generate",
        "--model",
        str(vlm),
        "--image",
        img,
        "--prompt",
        "Describe it.",
        "--max-tokens",
        "5",
        "--temp",
        "0",
    ]
    r = subprocess.run(common, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "[moequant] fused MoE path: 2 MoE blocks" in r.stderr
    r2 = subprocess.run(
        common[:3]
        + ["generate", "--model", str(vlm), "--image", str(tmp_path / "nope.png"), "--prompt", "x"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r2.returncode == 2 and "--image" in r2.stderr and "nope.png" in r2.stderr


def test_vlm_build_still_loads_in_mlx_lm_as_the_text_model(builds):
    """mlx-lm's kimi_k25 drops the vision side: the -VLM build runs there as the text
    build does (same logits, bit for bit)."""
    from mlx_lm import load

    _, text, vlm = builds
    ids = mx.array([[10, 40, 77, 123, 9]])
    outs = []
    for d in (text, vlm):
        model, _ = load(str(d))
        outs.append(np.array(model(ids).astype(mx.float32)))
    assert np.array_equal(outs[0], outs[1])


# ---------------------------------------------------------------- quantized projector

PROJ = {"bits": 8, "group_size": 32}


@pytest.fixture(scope="module")
def qproj_build(builds, tmp_path_factory):
    """The -VLM build again, with the recipe's vision_projector quantizing the projector."""
    from moequant.recipes import PRESETS

    src, _, _ = builds
    root = tmp_path_factory.mktemp("vlm_qproj")
    recipe = root / "alis-3.6-qproj.json"
    recipe.write_text(json.dumps({**PRESETS["alis-3.6"], "keep_vision": True, "vision_projector": PROJ}))
    dry = convert(src, root / "out", str(recipe), progress=False, dry_run=True)
    return convert(src, root / "out", str(recipe), progress=False).mlx_path, dry


def test_quantized_projector_is_mx_quantize_of_the_source(builds, qproj_build):
    """The projector's linears are mx.quantize of the source bf16 weights, bit for bit (the
    min-max fit); every other vision tensor and every language-model shard is unchanged."""
    src, _, vlm = builds
    out, dry = qproj_build
    got, plain = mx.load(str(out / vision.VISION_SHARD)), mx.load(str(vlm / vision.VISION_SHARD))
    srcw = {}
    for f in src.glob("*.safetensors"):
        srcw.update(mx.load(str(f)))
    for p in vision.PROJECTOR_LINEARS:
        wq, s, b = mx.quantize(srcw[p + ".weight"], group_size=PROJ["group_size"], bits=PROJ["bits"])
        assert got[p + ".weight"].dtype == mx.uint32 and s.dtype == mx.bfloat16
        for suffix, want in ((".weight", wq), (".scales", s), (".biases", b)):
            assert same_bits(got[p + suffix], want), p + suffix
        assert same_bits(got[p + ".bias"], plain[p + ".bias"])
    others = set(plain) - {p + ".weight" for p in vision.PROJECTOR_LINEARS}
    assert set(got) == others | {
        p + sfx for p in vision.PROJECTOR_LINEARS for sfx in (".weight", ".scales", ".biases")
    }
    for n in others:
        assert same_bits(got[n], plain[n]), n
    for shard in set(index(vlm).values()) - {vision.VISION_SHARD}:
        assert (out / shard).read_bytes() == (vlm / shard).read_bytes(), shard
    # config: mlx-vlm's per-module entries; the record says what was done
    cfg = json.loads((out / "config.json").read_text())
    for p in vision.PROJECTOR_LINEARS:
        assert cfg["quantization"][p] == {**PROJ, "mode": "affine"}
    assert cfg["moequant"]["vision_projector"] == {**PROJ, "mode": "affine", "fit": "minmax"}
    # the planned row (dry run) is what was written
    row = next(r for r in dry.rows if r.name == "vision tower")
    assert row.bytes == sum(a.nbytes for a in got.values())
    assert row.kinds.get("8-bit g32") == sum(
        math.prod(srcw[p + ".weight"].shape) for p in vision.PROJECTOR_LINEARS
    )


@needs_vlm
def test_quantized_projector_loads_in_mlx_vlm_and_generates(qproj_build, tmp_path):
    import mlx.nn as nn

    out, _ = qproj_build
    model, processor, n = vision.load_vlm(out, fused=True)
    for i in (0, 2):
        lin = model.mm_projector.proj[i]
        assert isinstance(lin, nn.QuantizedLinear), type(lin)
        assert (lin.bits, lin.group_size) == (PROJ["bits"], PROJ["group_size"])
    assert not isinstance(model.vision_tower.blocks[0].attn.wqkv, nn.QuantizedLinear)
    assert n == 2
    assert len(_greedy_image(model, processor, png(tmp_path / "q.png", 4))) == 6


def test_vision_projector_recipe_field_is_checked(ckpt, tmp_path, capsys):
    from moequant.recipes import PRESETS

    src = ckpt("kimi_k25")
    recipe = tmp_path / "r.json"
    for field, msg in (
        ({"bits": 7, "group_size": 64}, "vision_projector: bits must be one of"),
        ({"bits": 8, "group_size": 48}, "vision_projector: group_size must be one of"),
        ({"bits": 8, "group_size": 64, "fit": "best"}, "vision_projector: fit must be one of"),
        ({"bits": 8, "group_size": 64, "scale": 1}, r"vision_projector: unknown keys \['scale'\]"),
        ("8bit", "vision_projector: an object"),
    ):
        recipe.write_text(json.dumps({**PRESETS["alis-3.6"], "keep_vision": True, "vision_projector": field}))
        assert (
            main(
                ["convert", "--hf-path", str(src), "--mlx-path", str(tmp_path / "o"), "--recipe", str(recipe)]
            )
            == 2
        )
        err = capsys.readouterr().err
        assert str(recipe) in err and len(__import__("re").findall(msg, err)) == 1, (field, err)
        assert not (tmp_path / "o").exists()


def test_plan_sizes_a_quantized_projector(tmp_path, capsys):
    """plan --keep-vision with a recipe's vision_projector: the bf16 tower plus the two
    linears at 8 bits g64 (codes, and bf16 scale and bias per group), by formula; a group
    size that does not divide the projector's input is refused naming the tensor."""
    from moequant.recipes import PRESETS

    cfgp = CONFIGS / "kimi_k25.json"
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({**PRESETS["alis-3.6"], "vision_projector": {"bits": 8, "group_size": 64}}))
    assert main(["plan", "--config", str(cfgp), "--keep-vision", "--json"]) == 0
    bf16 = next(c for c in json.loads(capsys.readouterr().out)["components"] if c["name"] == "vision tower")
    assert main(["plan", "--config", str(cfgp), "--keep-vision", "--json", "--recipe", str(recipe)]) == 0
    q = next(c for c in json.loads(capsys.readouterr().out)["components"] if c["name"] == "vision tower")
    lin = (4 * 1152) ** 2 + 7168 * 4 * 1152  # proj.0 and proj.2 weights
    assert q["params"] == bf16["params"]
    assert q["bytes"] == bf16["bytes"] - 2 * lin + lin + 2 * 2 * lin // 64
    cfg = json.loads(cfgp.read_text())
    cfg["vision_config"] = {**cfg["vision_config"], "vt_hidden_size": 40, "vt_num_attention_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert (
        main(["plan", "--config", str(tmp_path / "config.json"), "--keep-vision", "--recipe", str(recipe)])
        == 2
    )
    err = capsys.readouterr().err
    assert "group_size 64 does not divide the input size 160 of mm_projector.proj.0.weight" in err, err
