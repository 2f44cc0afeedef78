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


def test_min_max_modules_are_those_of_mx_quantize(tmp_path, monkeypatch):
    # convert quantizes bf16 modules with quantize_minmax (every core); with MLX's own
    # mx.quantize instead, the shards are the same bytes.
    import mlx.core as mx

    import moequant.convert as cv

    src = make_checkpoint(tmp_path / "src", "kimi_k25", layers=2, shards=2, seed=5)
    calls = []
    real = cv._ext.quantize_minmax
    monkeypatch.setattr(cv._ext, "quantize_minmax", lambda *a, **k: calls.append(1) or real(*a, **k))
    convert(src, tmp_path / "ours", "alis-3.6", progress=False)
    assert calls  # the path under test ran
    monkeypatch.setattr(
        cv._ext,
        "quantize_minmax",
        lambda w, bits, group_size, stream: mx.quantize(w, group_size=group_size, bits=bits, stream=stream),
    )
    convert(src, tmp_path / "mlx", "alis-3.6", progress=False)
    a, b = shards(tmp_path / "ours"), shards(tmp_path / "mlx")
    assert len(a) > 1 and a.keys() == b.keys() and all(a[k] == b[k] for k in a)
