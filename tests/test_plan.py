"""The planner and the recipe engine."""

import json
from pathlib import Path

import pytest

import moequant.testing
from moequant import cli
from moequant.checkpoint import all_items, build_layout, read_config
from moequant.convert import convert
from moequant.plan import make_plan
from moequant.recipes import RecipeError, load_recipe, resolve, spread

KIMI_K25 = Path(moequant.testing.__file__).parent / "configs" / "kimi_k25.json"


def test_kimi_k25_alis_matches_model_card():
    """The card: 465 GB (433 GiB) and 3.62 bits/weight, within 1%."""
    plan = make_plan(KIMI_K25, "alis-3.6")
    assert plan.bytes / 1e9 == pytest.approx(465, rel=0.01)
    assert plan.bytes / 2**30 == pytest.approx(433, rel=0.01)
    assert plan.bpw == pytest.approx(3.62, rel=0.01)
    assert plan.params / 1e9 == pytest.approx(1026.4, rel=0.001)
    assert plan.resolution.selected[2] == [2, 6, 10, 14, 17, 21, 25, 29, 32, 36, 40, 44, 47, 51, 55, 59]
    assert plan.component("routed gate/up").bpw == 3.5
    assert plan.component("router").kinds.get("bf16")


def test_kimi_k25_other_presets_match_documented_figures():
    # compressed-tensors.md section 4: 3-bit g64 everywhere 449.3 GB / 3.502 bpw; experts
    # kept at INT4 g32 as MLX 4-bit (5.0 bpw for them).
    u3 = make_plan(KIMI_K25, "uniform-3")
    assert u3.bytes / 1e9 == pytest.approx(449.3, abs=0.05) and u3.bpw == pytest.approx(3.502, abs=5e-4)
    native = make_plan(KIMI_K25, "int4-native")
    assert native.expert_bpw == 5.0


def test_plan_cli(capsys):
    assert cli.main(["plan", "--config", str(KIMI_K25), "--recipe", "alis-3.6"]) == 0
    out = capsys.readouterr().out
    assert "464.92 GB" in out and "3.624" in out and "routed down" in out
    assert cli.main(["plan", "--config", str(KIMI_K25), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total_bytes"] == make_plan(KIMI_K25, "alis-3.6").bytes
    assert cli.main(["plan", "--config", str(KIMI_K25), "--upgrade-layers", "1,60"]) == 0
    assert "layers [1, 60]" in capsys.readouterr().out
    assert cli.main(["plan", "--config", "/nonexistent"]) == 2


def test_plan_from_headers_equals_written_size(ckpt, tmp_path):
    src = ckpt("deepseek_v3", layers=4)
    plan = make_plan(src, "uniform-4")
    assert plan.input_bytes == sum(p.stat().st_size for p in src.glob("*.safetensors")) - sum(
        8 + int.from_bytes(p.read_bytes()[:8], "little") for p in src.glob("*.safetensors")
    )
    res = convert(src, tmp_path / "o", "uniform-4", progress=False)
    assert res.total_bytes == plan.bytes


def _items(layers=9):
    """The layout items of a tiny INT4 kimi_k2 config, without any tensor files."""
    import tempfile

    from moequant.testing.tiny_checkpoint import full_config, tiny_text_config

    d = Path(tempfile.mkdtemp())
    (d / "config.json").write_text(json.dumps(full_config("kimi_k2", tiny_text_config(layers), 32)))
    cfg = read_config(d)
    return cfg, all_items(build_layout(cfg)[0])


def test_spread_and_counts():
    assert spread(list(range(1, 61)), 16) == [2, 6, 10, 14, 17, 21, 25, 29, 32, 36, 40, 44, 47, 51, 55, 59]
    assert spread([1, 2], 1) == [2]
    cfg, items = _items(31)  # 30 MoE layers -> round(16/60*30) = 8
    res = resolve(load_recipe("alis-3.6"), items, num_layers=31, int4_group=32)
    assert len(res.selected[2]) == 8
    cfg, items = _items(3)  # 2 MoE layers -> at least 1
    res = resolve(load_recipe("alis-3.6"), items, num_layers=3, int4_group=32)
    assert len(res.selected[2]) == 1


def test_auto_selection_uses_sensitivity():
    cfg, items = _items(9)
    loss = {l: (10.0 if l in (3, 7) else 1.0) for l in range(9)}
    seen = []

    def sensitivity(its, decision):
        seen.append((its[0].path, decision.bits))
        return loss[its[0].layer]

    res = resolve(
        load_recipe("alis-3.6"),
        items,
        num_layers=9,
        int4_group=32,
        upgrade_layers="auto",
        sensitivity=sensitivity,
    )
    # round(16/60*8) = 2 layers, the two with the largest loss, measured at 3-bit.
    assert res.selected[2] == [3, 7]
    assert all(b == 3 and "down_proj" in p for p, b in seen) and len(seen) == 8
    assert res.decisions["model.layers.3.mlp.switch_mlp.down_proj"].bits == 4
    assert res.decisions["model.layers.4.mlp.switch_mlp.down_proj"].bits == 3


def test_auto_selection_end_to_end(ckpt, tmp_path, capsys):
    """auto measures on the real tensors and picks the worst layer, and convert says which
    layers it chose and the measured error of every candidate."""
    src = ckpt("kimi_k2", layers=5)
    res = convert(src, tmp_path / "o", "alis-3.6", upgrade_layers="auto", progress=False)
    decision, losses = res.resolution.auto_losses[2]
    assert (decision.bits, decision.group_size) == (3, 64) and sorted(losses) == [1, 2, 3, 4]
    assert res.resolution.selected[2] == [max(losses, key=losses.get)]
    assert all(v > 0 for v in losses.values())

    assert (
        cli.main(
            [
                "convert",
                "--hf-path",
                str(src),
                "--mlx-path",
                str(tmp_path / "c"),
                "--upgrade-layers",
                "auto",
                "--quiet",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("rule 2 "))
    chosen = res.resolution.selected[2][0]
    assert f"auto chose layers [{chosen}]" in line and "3-bit g64" in line
    for layer, loss in losses.items():  # every candidate's measured error, the chosen one marked
        assert f"{layer}: {loss:.4g}{' *' if layer == chosen else ''}" in line


def test_plan_auto_says_layers_are_chosen_during_conversion(capsys):
    """plan cannot measure: it must not name layers as if chosen (it said both 'layers
    [2, 6, ...]' and 'chosen during conversion')."""
    assert cli.main(["plan", "--config", str(KIMI_K25), "--upgrade-layers", "auto"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("rule 2 "))
    assert "16 layer(s) to be chosen by measured error during conversion" in line
    assert "layers [" not in out
    assert cli.main(["plan", "--config", str(KIMI_K25), "--upgrade-layers", "auto", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["auto_pending"] == [2]


def test_preset_names_one_convention(capsys):
    assert "mixed-3-6" in load_recipe("mixed-3-6").name
    assert load_recipe("mixed_3_6").spec == load_recipe("mixed-3-6").spec  # the old spelling
    assert load_recipe("mixed_3_6").name == "mixed-3-6"
    from moequant.recipes import PRESETS

    assert all("_" not in name for name in PRESETS)
    assert cli.main(["plan", "--config", str(KIMI_K25), "--recipe", "mixed-3-6"]) == 0
    assert "recipe mixed-3-6" in capsys.readouterr().out


ABSURD = {
    "n_routed_experts": ("n_routed_experts", 10**9),
    "num_hidden_layers": ("num_hidden_layers", 10**8),
    "experts x layers": ("n_routed_experts", 16384),  # each bound passes, the product does not
}


@pytest.mark.parametrize("case", ABSURD)
def test_absurd_config_refused_at_once(tmp_path, capsys, case):
    import time

    key, value = ABSURD[case]
    cfg = json.loads(KIMI_K25.read_text())
    cfg["text_config"][key] = value
    if case == "experts x layers":
        cfg["text_config"]["num_hidden_layers"] = 1000
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    cli.build_parser()  # import every command module first: time the refusal, not imports
    for argv in (
        ["plan", "--config", str(tmp_path / "config.json")],
        ["convert", "--hf-path", str(tmp_path), "--mlx-path", str(tmp_path / "o")],
    ):
        t0 = time.perf_counter()
        assert cli.main(argv) == 2
        assert time.perf_counter() - t0 < 1.0
        err = capsys.readouterr().err
        assert f"text_config.{key}" in err and "config.json" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "key,value,have",
    [("num_hidden_layers", 900, "hold 4 layers"), ("n_routed_experts", 9000, "hold 8 experts")],
)
def test_config_counts_checked_against_headers(ckpt, tmp_path, capsys, key, value, have):
    """With the shards present, a count the headers contradict is refused before the
    tables are built, naming the key (plan --hf-path and convert)."""
    import shutil
    import time

    src = tmp_path / "src"
    shutil.copytree(ckpt("deepseek_v3", layers=4), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg[key] = value
    (src / "config.json").write_text(json.dumps(cfg))
    cli.build_parser()  # import every command module first: time the refusal, not imports
    for argv in (
        ["plan", "--hf-path", str(src)],
        ["convert", "--hf-path", str(src), "--mlx-path", str(tmp_path / "o"), "--quiet"],
    ):
        t0 = time.perf_counter()
        assert cli.main(argv) == 2
        assert time.perf_counter() - t0 < 1.0
        err = capsys.readouterr().err
        assert f"config.json: {key} is {value}" in err and have in err, err
    assert not (tmp_path / "o").exists()


def test_recipe_file_and_rules(tmp_path):
    cfg, items = _items(3)
    f = tmp_path / "mine.json"
    f.write_text(
        json.dumps(
            {
                "rules": [
                    {"match": "re:.*switch_mlp\\.(gate|up)_proj", "layers": [2], "bits": 2, "group_size": 32},
                    {"match": "*.switch_mlp.*", "keep": True},
                    {"match": "*embed_tokens", "bits": 8, "group_size": 128},
                ]
            }
        )
    )
    res = resolve(load_recipe(str(f)), items, num_layers=3, int4_group=32)
    d = res.decisions
    assert d["model.layers.2.mlp.switch_mlp.up_proj"].bits == 2
    assert d["model.layers.1.mlp.switch_mlp.up_proj"].repack
    assert d["model.embed_tokens"].bits == 8 and d["lm_head"] is None
    assert d["model.layers.1.mlp.gate.weight"] is None  # router: never quantized
    for bad in (
        {"rules": []},
        {"rules": [{"match": "*", "bits": 4}]},
        {"rules": [{"match": "*", "keep": True, "bits": 4}]},
        {"rules": [{"match": "*", "bits": 4, "group_size": 64, "layers": {"select": "x"}}]},
        {"rules": [{"match": "re:(", "bits": 4, "group_size": 64}]},
    ):
        f.write_text(json.dumps(bad))
        with pytest.raises(RecipeError):
            load_recipe(str(f))


def test_auto_samples_experts(ckpt, tmp_path, monkeypatch):
    """With more experts than AUTO_SAMPLE_EXPERTS, auto reads an evenly spaced sample."""
    import moequant.convert as c

    src = ckpt("kimi_k2", layers=3, text_overrides={"n_routed_experts": 40})
    read = []
    real = c.read_job
    monkeypatch.setattr(c, "read_job", lambda s, job: read.append(len(job.sources)) or real(s, job))
    res = convert(src, tmp_path / "o", "alis-3.6", upgrade_layers="auto", progress=False)
    assert sum(read) == 2 * 14 * 3  # 2 MoE layers x experts 0, 3, ..., 39 x 3 tensors each
    assert len(res.resolution.selected[2]) == 1


def test_full_size_kimi_k25_headers(tmp_path, capsys):
    """The whole Kimi-K2.5 tensor inventory as real safetensors headers over sparse files
    (64 shards, 207k tensors, no data): the headers validate against the config, the
    input is the documented 594.2 GB of text weights, and convert --dry-run plans the
    card's build without writing anything."""
    from moequant.testing.tiny_checkpoint import make_sparse_checkpoint

    src = make_sparse_checkpoint(tmp_path / "k25", json.loads(KIMI_K25.read_text()))
    plan = make_plan(src, "alis-3.6")
    assert plan.input_bytes / 1e9 == pytest.approx(594.2, abs=0.05)
    assert plan.bytes == make_plan(KIMI_K25, "alis-3.6").bytes
    assert cli.main(["convert", "--hf-path", str(src), "--mlx-path", str(tmp_path / "out"), "--dry-run"]) == 0
    assert "464.92 GB" in capsys.readouterr().out and not (tmp_path / "out").exists()
