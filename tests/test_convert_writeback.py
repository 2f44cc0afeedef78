"""The shard writer's streaming writeback (convert_pipeline.WRITEBACK_BYTES) and the
reader's page-cache hints (WILLNEED ahead, DONTNEED once read): starting each slice's
writeback as it is written, waiting for the oldest and dropping pages are only hints to
the kernel; the shards are byte for byte those of a run without any of them."""

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
    with monkeypatch.context() as m:  # the kernel schedules writeback alone, no hints
        m.setattr(pipeline, "_SFR", None)
        m.setattr(pipeline, "_advise", lambda piece, advice: None)
        convert(src, tmp_path / "plain", "alis-3.6", progress=False)
    convert(src, tmp_path / "default", "alis-3.6", progress=False)
    with monkeypatch.context() as m:  # wait for every slice, one piece queued at a time
        m.setattr(pipeline, "WRITEBACK_BYTES", 1)
        m.setattr(pipeline, "WRITE_QUEUE", 1)
        m.setattr(pipeline, "PREFETCH_PIECES", 0)
        m.setattr(pipeline, "POOL_BUFFERS", 1)
        convert(src, tmp_path / "streamed", "alis-3.6", progress=False)
    a = shards(tmp_path / "plain")
    assert len(a) > 1
    for other in ("default", "streamed"):
        b = shards(tmp_path / other)
        assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), other


def test_split_min_max_quantize_does_not_change_the_bytes(tmp_path, monkeypatch):
    # A min-max quantize split into row parts on several CPU streams, each part written
    # at its own offset, gives the shards of the unsplit quantize.
    import moequant.convert as cv

    src = make_checkpoint(tmp_path / "src", "kimi_k25", layers=2, shards=2, seed=5)
    with monkeypatch.context() as m:
        m.setattr(cv, "SPLIT_MIN_WEIGHTS", 1 << 62)
        convert(src, tmp_path / "whole", "alis-3.6", progress=False)
    parts, real = [], cv._quantize_parts
    with monkeypatch.context() as m:
        m.setattr(cv, "SPLIT_MIN_WEIGHTS", 1)
        m.setattr(cv, "get_num_threads", lambda: 3)
        m.setattr(pipeline, "PIECE_BYTES", 4096)  # many row pieces, several parts each
        m.setattr(cv, "_quantize_parts", lambda w, d: parts.append(len(real(w, d))) or real(w, d))
        convert(src, tmp_path / "split", "alis-3.6", progress=False)
    assert max(parts) == 3  # the path under test ran
    a, b = shards(tmp_path / "whole"), shards(tmp_path / "split")
    assert len(a) > 1 and a.keys() == b.keys() and all(a[k] == b[k] for k in a)
