"""Interrupt and resume: the journal lets a rerun continue at the first unfinished unit,
and the result is byte-identical to an uninterrupted conversion."""

import json
import shutil

import pytest

from moequant import cli, convert_pipeline
from moequant import convert as convert_mod
from moequant.convert import convert

SHARD = 300_000  # small shards: several per unit


def shard_bytes(path):
    return {p.name: p.read_bytes() for p in sorted(path.glob("model*.safetensors"))}


def interrupt_after(monkeypatch, n):
    """Interrupt the conversion when its (n+1)-th shard is about to be put in place."""
    real = convert_pipeline.finish_shard
    calls = []

    def flaky(fd, tmp, path):
        if len(calls) == n:
            raise KeyboardInterrupt
        calls.append(path)
        return real(fd, tmp, path)

    monkeypatch.setattr(convert_pipeline, "finish_shard", flaky)
    return calls


@pytest.fixture
def src(ckpt, tmp_path):
    d = tmp_path / "src"
    shutil.copytree(ckpt("kimi_k25", layers=5), d)
    return d


def test_interrupt_then_resume_is_identical(src, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    full = convert(src, ref, "alis-3.6", progress=False, max_shard_bytes=SHARD)
    assert full.units_converted == 6

    dst = tmp_path / "out"
    interrupt_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        convert(src, dst, "alis-3.6", progress=False, max_shard_bytes=SHARD)
    monkeypatch.undo()
    journal = json.loads((dst / convert_mod.JOURNAL).read_text())
    assert 1 <= len(journal["done"]) < 6
    # Half-finished: no config or index, so mlx-lm cannot mistake it for a model.
    assert not (dst / "config.json").exists() and not (dst / "model.safetensors.index.json").exists()
    with pytest.raises(Exception):
        import mlx_lm

        mlx_lm.load(str(dst))

    again = convert(src, dst, "alis-3.6", progress=False, max_shard_bytes=SHARD)
    assert again.units_skipped == len(journal["done"])
    assert again.units_converted == 6 - len(journal["done"])
    assert again.input_bytes < full.input_bytes
    assert shard_bytes(dst) == shard_bytes(ref)
    assert (dst / "config.json").read_text() == (ref / "config.json").read_text()
    assert not (dst / convert_mod.JOURNAL).exists()


def test_resume_refuses_changed_source_or_recipe(src, tmp_path, monkeypatch, capsys):
    dst = tmp_path / "out"
    interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        convert(src, dst, "alis-3.6", progress=False)
    monkeypatch.undo()
    args = ["convert", "--hf-path", str(src), "--mlx-path", str(dst), "--quiet"]
    assert cli.main(args + ["--recipe", "uniform-3"]) == 2
    assert "different recipe" in capsys.readouterr().err
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["rms_norm_eps"] = 1e-6
    (src / "config.json").write_text(json.dumps(cfg))
    assert cli.main(args) == 2
    assert "different or changed source" in capsys.readouterr().err
    assert cli.main(args + ["--overwrite"]) == 0
    assert (dst / "config.json").exists()


def test_lost_shard_of_done_unit_is_redone(src, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    interrupt_after(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        convert(src, dst, "alis-3.6", progress=False, max_shard_bytes=SHARD)
    monkeypatch.undo()
    done = json.loads((dst / convert_mod.JOURNAL).read_text())["done"]
    first = sorted(dst.glob("model-*.safetensors"))[0]
    first.unlink()  # the journal's record no longer matches the disk
    again = convert(src, dst, "alis-3.6", progress=False, max_shard_bytes=SHARD)
    assert again.units_skipped == len(done) - 1
    assert first.exists()
