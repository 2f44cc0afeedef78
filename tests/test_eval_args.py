"""`moequant eval` arguments: every one checked before any model is loaded (exit 2, one
line naming it), and no transformers warning about long documents (we window them)."""

import numpy as np
import pytest

from moequant import evaluate as ev
from moequant.cli import main
from moequant.testing.tiny_mlx import make_tiny_model
from moequant.testing.tokenizer import write_tokenizer


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("args") / "ref", seed=0)


@pytest.fixture
def no_model_loads(monkeypatch):
    import mlx_lm.utils

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(mlx_lm.utils, "load_model", refuse)


def _cases(tmp):
    a_file = tmp / "file.txt"
    a_file.write_text("x")
    foreign = tmp / "foreign"
    foreign.mkdir()
    (foreign / "notes.md").write_text("mine")
    bad_cfg = tmp / "badcfg"
    bad_cfg.mkdir()
    (bad_cfg / "config.json").write_text("{not json")
    (bad_cfg / "model.safetensors").write_bytes(b"")
    return [  # (extra argv, what the one-line error must say)
        (["--top-k-cache", "100000"], "--top-k-cache 100000 is larger than the reference's vocabulary (512"),
        (["--top-k-cache", "1"], "--top-k-cache 1: must be an integer >= 2"),
        (["--top-k-cache", "-5"], "--top-k-cache -5: must be"),
        (["--seq-len", "1"], "--seq-len 1: must be an integer >= 2"),
        (["--seq-len", "-3"], "--seq-len -3: must be"),
        (
            ["--seq-len", "5000"],
            "--seq-len 5000 is longer than the reference's max_position_embeddings (1024",
        ),
        (["--num-samples", "0"], "--num-samples 0: must be an integer >= 1"),
        (["--num-samples", "-2"], "--num-samples -2: must be"),
        (["--seed", "-1"], "--seed -1: must be an integer >= 0"),
        (["--near-tie", "-0.1"], "--near-tie -0.1: must be a probability"),
        (["--near-tie", "nan"], "--near-tie nan: must be a probability"),
        (["--near-tie", "2"], "--near-tie 2.0: must be a probability"),
        (["--data", str(tmp / "nope.txt")], f"--data {tmp / 'nope.txt'}: no such file"),
        (["--cache", str(a_file)], f"--cache {a_file}: exists and is not a directory"),
        (["--cache", str(foreign)], f"--cache {foreign}: no meta.json"),
        (["--output", str(tmp / "nodir" / "r.json")], "--output"),
        (["--output", str(tmp)], f"--output {tmp}: is a directory"),
        (["--ref", str(tmp / "nope")], f"--ref {tmp / 'nope'}: no such directory"),
        (["--model", str(tmp / "nope")], f"--model {tmp / 'nope'}: no such directory"),
        (["--ref", str(bad_cfg)], f"--ref {bad_cfg / 'config.json'}: not a readable JSON file"),
    ]


def test_every_argument_is_checked_before_a_model_loads(ref, tmp_path, capsys, no_model_loads):
    for extra, says in _cases(tmp_path):
        argv = [
            "eval",
            "--ref",
            str(ref),
            "--model",
            str(ref),
            "--seq-len",
            "32",
            "--num-samples",
            "2",
            "--no-progress",
            *extra,
        ]
        assert main(argv) == 2, extra
        out = capsys.readouterr()
        lines = out.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("moequant eval: error: "), (extra, out.err)
        assert says in lines[0], (extra, lines[0])
        assert out.out == "", extra
    # The foreign directory given as --cache is left alone.
    assert [p.name for p in (tmp_path / "foreign").iterdir()] == ["notes.md"]


def test_long_documents_do_not_warn(tmp_path, caplog):
    """Documents are tokenized whole and windowed on purpose; transformers' warning that
    one exceeds model_max_length is noise and must not be shown."""
    from mlx_lm.utils import load_tokenizer

    write_tokenizer(tmp_path, model_max_length=16)
    text = "def fibonacci(n):\n    return n\n" * 40
    tok = load_tokenizer(tmp_path)
    caplog.set_level("WARNING")
    w = ev.make_windows([("doc", lambda: text)], tok, 32, 3, seed=0)
    assert "Token indices sequence length" not in caplog.text
    ids = load_tokenizer(tmp_path).encode(text, add_special_tokens=False)
    np.testing.assert_array_equal(w.ravel(), ids[: w.size])
    # The same call outside eval's windowing does warn: the test above can fail.
    assert "Token indices sequence length is longer" in caplog.text


def test_a_cache_that_cannot_fit_is_refused_before_the_reference_loads(
    ref, tmp_path, capsys, no_model_loads, monkeypatch
):
    import shutil

    from moequant import evaluate

    monkeypatch.setattr(
        evaluate.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 10**5, 10**5)
    )
    rc = main(
        [
            "eval",
            "--ref",
            str(ref),
            "--model",
            str(ref),
            "--seq-len",
            "32",
            "--num-samples",
            "2",
            "--no-progress",
            "--cache",
            str(tmp_path / "c"),
        ]
    )
    err = capsys.readouterr().err
    need = 2 * 31 * (8 * 512 + 8)  # windows x predicted positions x (k = vocab 512)
    assert rc == 2 and f"the reference cache needs {need / 1e6:.2f} MB" in err, err
    assert "0.10 MB free" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".c.lock"]
