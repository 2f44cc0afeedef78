"""The shard writer's streaming writeback (convert_pipeline.WRITEBACK_BYTES): starting
each slice's writeback as it is written, waiting for the oldest and dropping its pages
is only a hint to the kernel; the shards are byte for byte those of a run without it."""

import sys

import pytest

import moequant.convert_pipeline as pipeline
from moequant.convert import convert
from moequant.testing import make_checkpoint


def shards(path):
    return {p.name: p.read_bytes() for p in sorted(path.glob("*.safetensors"))}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_writeback_window_does_not_change_the_bytes(tmp_path, monkeypatch):
    assert pipeline._SFR is not None  # the path under test runs
    src = make_checkpoint(tmp_path / "src", "kimi_k2", layers=2, shards=2, seed=4)
    monkeypatch.setattr(pipeline, "_SFR", None)  # the kernel schedules writeback alone
    convert(src, tmp_path / "plain", "alis-3.6", progress=False)
    monkeypatch.undo()
    monkeypatch.setattr(pipeline, "WRITEBACK_BYTES", 1)  # wait for every slice
    convert(src, tmp_path / "streamed", "alis-3.6", progress=False)
    a, b = shards(tmp_path / "plain"), shards(tmp_path / "streamed")
    assert a.keys() == b.keys() and len(a) > 1
    assert all(a[k] == b[k] for k in a)
