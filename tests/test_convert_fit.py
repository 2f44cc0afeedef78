"""The recipe's `fit` field and `convert --fit`: validation, what the written recipe
records, that both fits give files of identical size, that a resume never mixes fits,
and that the ETA accounts for the slower fit."""

import json

import pytest

from moequant import cli
from moequant import convert as convert_mod
from moequant import convert_pipeline
from moequant.convert import Progress, convert
from moequant.plan import make_plan
from moequant.recipes import PRESETS, RecipeError, load_recipe


def run(*args):
    return cli.main(["convert", *map(str, args), "--quiet"])


@pytest.mark.parametrize("rule,message", [
    ({"match": "*", "bits": 3, "group_size": 64, "fit": "lsq"}, "fit must be one of"),
    ({"match": "*", "bits": 3, "group_size": 64, "fit": 1}, "fit must be one of"),
    ({"match": "*", "keep": True, "fit": "mse"}, "'keep' excludes bits, group_size and fit"),
])
def test_bad_fit_in_a_recipe_is_refused(tmp_path, rule, message):
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"rules": [rule]}))
    with pytest.raises(RecipeError, match=message):
        load_recipe(str(f))


def test_bad_fit_flag_is_exit_2(ckpt, tmp_path, capsys):
    src = ckpt("kimi_k2", layers=2)
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", "--hf-path", str(src), "--mlx-path", str(tmp_path / "o"), "--fit", "lsq"])
    assert e.value.code == 2 and "--fit" in capsys.readouterr().err
    with pytest.raises(RecipeError, match="--fit 'lsq'"):
        convert(src, tmp_path / "o", "alis-3.6", fit="lsq", progress=False)
    assert not (tmp_path / "o").exists()


def test_mse_preset_has_alis_allocation_and_identical_size(ckpt):
    """alis-3.6-mse: alis-3.6's bits, groups and layers, fit mse on every re-quantized
    module, and exactly the same bytes."""
    assert [dict(r, fit="mse") for r in PRESETS["alis-3.6"]["rules"]] == PRESETS["alis-3.6-mse"]["rules"]
    src = ckpt("kimi_k25", layers=5)
    a, b = make_plan(src, "alis-3.6"), make_plan(src, "alis-3.6-mse")
    assert a.bytes == b.bytes
    for path, d in a.resolution.decisions.items():
        e = b.resolution.decisions[path]
        assert (d is None) == (e is None)
        if d is not None:
            assert (d.bits, d.group_size, d.fit, e.fit) == (e.bits, e.group_size, "minmax", "mse")


def test_recipe_file_records_the_fit_and_fit_flag_overrides(ckpt, tmp_path):
    """--fit minmax turns alis-3.6-mse back into alis-3.6: the same shards byte for byte,
    and the recipe file and config say minmax."""
    src = ckpt("kimi_k25", layers=3)
    convert(src, tmp_path / "a", "alis-3.6", progress=False)
    convert(src, tmp_path / "b", "alis-3.6-mse", fit="minmax", progress=False)
    for out in ("a", "b"):
        rec = json.loads((tmp_path / out / "moequant_recipe.json").read_text())
        assert rec["fit"] == ["minmax"]
        quantized = [m for m in rec["modules"].values() if m != "unquantized"]
        assert quantized and all(m["fit"] == "minmax" for m in quantized)
        cfg = json.loads((tmp_path / out / "config.json").read_text())
        assert cfg["moequant"]["fit"] == ["minmax"]
    shards = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in (tmp_path / "b").glob("*.safetensors"))
    for name in shards:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_int4_native_records_no_fit(ckpt):
    """A lossless repack has no fit to record."""
    src = ckpt("kimi_k2", layers=2)
    res = make_plan(src, "int4-native")
    experts = [d for p, d in res.resolution.decisions.items() if "switch_mlp" in p]
    assert experts and all(d.repack for d in experts)
    assert all("fit" not in d.record() and d.record()["repacked_int4"] for d in experts)


def test_resume_refuses_to_mix_fits(ckpt, tmp_path, monkeypatch, capsys):
    """An unfinished minmax conversion is not finished with the mse fit (nor the other
    way round): exit 2 naming both fits, and nothing in DST is touched."""
    src = ckpt("kimi_k25", layers=5)
    dst = tmp_path / "out"
    real, calls = convert_pipeline.finish_shard, []

    def flaky(fd, tmp, path):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(path)
        return real(fd, tmp, path)

    monkeypatch.setattr(convert_pipeline, "finish_shard", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert(src, dst, "alis-3.6", progress=False, max_shard_bytes=300_000)
    monkeypatch.undo()
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    journal = json.loads(before[convert_mod.JOURNAL])
    assert journal["fit"] == ["minmax"] and journal["done"]
    args = ["--hf-path", src, "--mlx-path", dst]
    assert run(*args, "--fit", "mse") == 2
    err = capsys.readouterr().err
    assert "made with fit minmax" in err and "asks for mse" in err
    assert run(*args, "--recipe", "alis-3.6-mse") == 2
    assert "made with fit minmax" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    again = convert(src, dst, "alis-3.6", progress=False, max_shard_bytes=300_000)
    assert again.units_skipped == len(journal["done"])  # the same fit resumes


def test_eta_counts_mse_bytes_at_their_own_rate(monkeypatch):
    """Minmax bytes measured at 1 GB/s; before any mse piece is timed, mse bytes are
    assumed MSE_COST_PRIOR times slower; once timed, their measured rate is used."""
    now = [0.0]
    monkeypatch.setattr(convert_mod.time, "perf_counter", lambda: now[0])
    bar = Progress({"minmax": 10**9, "mse": 10**9}, 2, enabled=False)
    now[0] = 0.5
    bar.update("minmax", 5 * 10**8, 0, "layer 0", False)
    prior = convert_mod.MSE_COST_PRIOR
    assert bar.eta() == pytest.approx(0.5 + prior * 1.0)
    now[0] = 1.0
    bar.update("minmax", 5 * 10**8, 1, "layer 0", True)
    now[0] = 3.0  # mse at 0.125 GB/s
    bar.update("mse", 25 * 10**7, 1, "layer 1", False)
    assert bar.eta() == pytest.approx(75 * 10**7 / 0.125e9)
