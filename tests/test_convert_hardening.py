"""Hostile and careless input to `moequant convert` (issue 12): --overwrite only ever
removes what moequant wrote, every file read stays inside the checkpoint, safetensors
offsets follow the reference parser's rules, one conversion per destination at a time,
and malformed files are one-line errors with exit code 2, never a traceback or a hang."""

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moequant import cli
from moequant.checkpoint import CheckpointError
from moequant.checkpoint.safetensors_io import read_header
from test_convert_errors import run, src  # noqa: F401  (src: a private copy of a tiny kimi_k25)

INDEX = "model.safetensors.index.json"


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def shard_bytes(path):
    return {p.name: p.read_bytes() for p in sorted(path.glob("model*.safetensors"))}


def index_of(src):
    return json.loads((src / INDEX).read_text())


def set_index(src, data):
    (src / INDEX).write_text(json.dumps(data))


def point_shard(src, old, new):
    """Make every index entry of shard ``old`` name ``new`` instead."""
    data = index_of(src)
    data["weight_map"] = {k: (new if v == old else v) for k, v in data["weight_map"].items()}
    set_index(src, data)


# --------------------------------------------------------------------------- item 4


def test_overwrite_refuses_a_directory_moequant_did_not_write(src, tmp_path, capsys):
    """A config.json is no proof that moequant wrote a directory: nothing is deleted."""
    dst = tmp_path / "project"
    (dst / "data").mkdir(parents=True)
    (dst / "config.json").write_text("{}")
    (dst / "notes.md").write_text("my notes")
    (dst / "data" / "results.csv").write_text("a,b\n1,2\n")
    assert run(src, dst, "--overwrite") == 2
    assert "moequant did not write" in one_line_error(capsys)
    assert (dst / "notes.md").read_text() == "my notes"
    assert (dst / "data" / "results.csv").read_text() == "a,b\n1,2\n"
    assert (dst / "config.json").read_text() == "{}"


def test_overwrite_removes_only_moequant_files(src, tmp_path, capsys):
    dst = tmp_path / "out"
    assert run(src, dst, "--recipe", "uniform-3") == 0
    (dst / "data").mkdir()
    (dst / "notes.md").write_text("my notes")
    (dst / "data" / "results.csv").write_text("a,b\n1,2\n")
    assert run(src, dst, "--recipe", "uniform-4", "--overwrite") == 0
    assert (dst / "notes.md").read_text() == "my notes"
    assert (dst / "data" / "results.csv").read_text() == "a,b\n1,2\n"
    ref = tmp_path / "ref"
    assert run(src, ref, "--recipe", "uniform-4") == 0
    assert shard_bytes(dst) == shard_bytes(ref)
    recipe = json.loads((dst / "moequant_recipe.json").read_text())
    assert recipe["recipe"] == "uniform-4" and "notes.md" not in recipe["files"]
    assert set(os.listdir(dst)) == set(recipe["files"]) | {"notes.md", "data"}


def test_overwrite_never_follows_names_out_of_the_directory(src, tmp_path):
    """The file list in a marker is data from disk: a name like ../x is never removed."""
    dst = tmp_path / "out"
    assert run(src, dst) == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    recipe = json.loads((dst / "moequant_recipe.json").read_text())
    recipe["files"] += ["../victim.txt", str(victim)]
    (dst / "moequant_recipe.json").write_text(json.dumps(recipe))
    assert run(src, dst, "--overwrite") == 0
    assert victim.read_text() == "keep"


def test_user_file_with_an_output_name_is_not_replaced(src, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    assert run(src, dst) == 0  # an empty directory is fine
    os.unlink(dst / "tokenizer_config.json")
    (dst / "tokenizer_config.json").write_text("mine")
    recipe = json.loads((dst / "moequant_recipe.json").read_text())
    recipe["files"].remove("tokenizer_config.json")
    (dst / "moequant_recipe.json").write_text(json.dumps(recipe))
    assert run(src, dst, "--overwrite") == 2
    assert "tokenizer_config.json exists and was not written by moequant" in one_line_error(capsys)
    assert (dst / "tokenizer_config.json").read_text() == "mine"


# --------------------------------------------------------------------------- item 5


def test_weight_map_entry_outside_the_checkpoint(src, tmp_path, capsys):
    shard = sorted(src.glob("model-*.safetensors"))[1].name
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(src / shard, elsewhere / "x.safetensors")
    for entry in ("../elsewhere/x.safetensors", str(elsewhere / "x.safetensors"), "/etc/passwd"):
        point_shard(src, shard, entry)
        assert run(src, tmp_path / "out") == 2
        err = one_line_error(capsys)
        assert repr(entry) in err and INDEX in err, err
        assert not (tmp_path / "out").exists()
        shard_entry = entry
        point_shard(src, shard_entry, shard)


def test_symlinked_shard_pointing_outside(src, tmp_path, capsys):
    shard = sorted(src.glob("model-*.safetensors"))[0]
    outside = tmp_path / "outside.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    assert run(src, tmp_path / "out") == 2
    err = one_line_error(capsys)
    assert shard.name in err and "outside the checkpoint" in err


def test_side_file_symlink_outside_is_refused(src, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy")
    (src / "notes.txt").symlink_to(secret)
    assert run(src, tmp_path / "out") == 2
    err = one_line_error(capsys)
    assert "'notes.txt'" in err and "outside the checkpoint" in err
    assert not (tmp_path / "out").exists()


def test_fifo_shard_does_not_block(src, tmp_path):
    """A FIFO in place of a shard: refused at once (a plain open() would wait forever)."""
    shard = sorted(src.glob("model-*.safetensors"))[2]
    shard.unlink()
    os.mkfifo(shard)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moequant",
            "convert",
            "--hf-path",
            str(src),
            "--mlx-path",
            str(tmp_path / "out"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert shard.name in proc.stderr and "FIFO" in proc.stderr


def _hf_cache(src, hub, repo="models--org--tiny"):
    """src laid out as a Hugging Face cache snapshot: the files in blobs/, the snapshot
    made of relative symlinks to them."""
    import hashlib

    blobs, snap = hub / repo / "blobs", hub / repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in sorted(src.iterdir()):
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        shutil.copy(p, blobs / digest)
        (snap / p.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    return snap


def test_hugging_face_cache_snapshot_converts(src, tmp_path):
    snap = _hf_cache(src, tmp_path / "hub")
    assert run(snap, tmp_path / "from_cache") == 0
    assert run(src, tmp_path / "plain") == 0
    assert shard_bytes(tmp_path / "from_cache") == shard_bytes(tmp_path / "plain")
    copied = tmp_path / "from_cache" / "tokenizer_config.json"
    assert copied.is_file() and not copied.is_symlink()
    assert copied.read_bytes() == (src / "tokenizer_config.json").read_bytes()


def test_hugging_face_cache_link_into_another_repo_is_refused(src, tmp_path, capsys):
    snap = _hf_cache(src, tmp_path / "hub")
    other = tmp_path / "hub" / "models--someone--else" / "blobs"
    other.mkdir(parents=True)
    (other / "abc").write_text("{}")
    (snap / "generation_config.json").unlink()
    (snap / "generation_config.json").symlink_to(Path("../../../models--someone--else/blobs/abc"))
    assert run(snap, tmp_path / "out") == 2
    assert "'generation_config.json'" in one_line_error(capsys)


# --------------------------------------------------------------------------- item 6


def _st_file(path, header: dict, data: bytes, raw_header: bytes = None):
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _f32(shape, begin, end):
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


OFFSET_CASES = {
    "valid": ({"a": _f32([2], 0, 8), "b": _f32([1], 8, 12)}, 12, True),
    "negative begin": ({"a": _f32([2], -4, 4), "b": _f32([1], 4, 8)}, 8, False),
    "overlap": ({"a": _f32([2], 0, 8), "b": _f32([2], 4, 12)}, 12, False),
    "same bytes twice": ({"a": _f32([2], 0, 8), "b": _f32([2], 0, 8)}, 8, False),
    "gap": ({"a": _f32([1], 0, 4), "b": _f32([1], 8, 12)}, 12, False),
    "trailing bytes": ({"a": _f32([2], 0, 8)}, 12, False),
    "size not dtype x shape": ({"a": _f32([3], 0, 8)}, 8, False),
    "end before begin": ({"a": _f32([0], 8, 4)}, 8, False),
    "past the end": ({"a": _f32([4], 0, 16)}, 8, False),
    "float offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}, 8, False),
    "float shape": ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, 8, False),
    "bool shape": ({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, 8, False),
    "unknown dtype": ({"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, 8, False),
    "null metadata": ({"__metadata__": None, "a": _f32([2], 0, 8)}, 8, True),
    "metadata not strings": ({"__metadata__": {"n": 1}, "a": _f32([2], 0, 8)}, 8, False),
}


@pytest.mark.parametrize("case", OFFSET_CASES)
def test_offsets_follow_the_reference_parser(tmp_path, case):
    """Our header reader accepts exactly what the safetensors package accepts."""
    safetensors = pytest.importorskip("safetensors")
    header, size, valid = OFFSET_CASES[case]
    path = _st_file(tmp_path / "t.safetensors", header, bytes(size))
    try:
        with safetensors.safe_open(str(path), framework="numpy"):
            pass
        reference_ok = True
    except Exception:
        reference_ok = False
    assert reference_ok == valid
    if valid:
        tensors, _ = read_header(path)
        assert sorted(tensors) == sorted(k for k in header if k != "__metadata__")
    else:
        with pytest.raises(CheckpointError, match="t.safetensors"):
            read_header(path)


def _rewrite_header(shard, fn):
    """Rewrite a real shard's header in place (the data region unchanged)."""
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    new = fn(header)
    new = new if isinstance(new, bytes) else json.dumps(new).encode()
    shard.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def test_offsets_into_another_tensor_refused_end_to_end(src, tmp_path, capsys):
    shard = sorted(src.glob("model-*.safetensors"))[1]

    def alias(header):
        packed = sorted(k for k in header if k.endswith("up_proj.weight_packed"))
        a, b = packed[0], packed[1]
        assert header[a]["shape"] == header[b]["shape"]
        header[b]["data_offsets"] = header[a]["data_offsets"]  # b reads a's bytes
        return header

    _rewrite_header(shard, alias)
    assert run(src, tmp_path / "out") == 2
    err = one_line_error(capsys)
    assert shard.name in err and "overlaps" in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- item 7


SLOW_CONVERT = textwrap.dedent("""
    import sys, time
    import moequant.convert as c
    import moequant.convert_pipeline as p
    real = p.finish_shard
    def slow(fd, tmp, path):
        print("writing", flush=True)
        time.sleep(0.5)
        return real(fd, tmp, path)
    p.finish_shard = slow
    c.convert(sys.argv[1], sys.argv[2], "alis-3.6", progress=False, max_shard_bytes=300_000)
""")


def test_concurrent_convert_into_one_destination(src, tmp_path, capsys):
    dst = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_CONVERT, str(src), str(dst)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert child.stdout.readline().strip() == "writing", child.stderr.read()
        assert run(src, dst) == 2
        err = one_line_error(capsys)
        assert f"locked by another moequant convert (process {child.pid})" in err
        assert run(src, dst, "--overwrite") == 2  # not even --overwrite gets in
        assert f"process {child.pid}" in one_line_error(capsys)
        assert child.wait(timeout=300) == 0, child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    # The first run finished undisturbed and left no lock behind.
    from moequant.convert import convert

    convert(src, tmp_path / "ref", "alis-3.6", progress=False, max_shard_bytes=300_000)
    assert shard_bytes(dst) == shard_bytes(tmp_path / "ref")
    assert not (dst / ".moequant-lock").exists()
    assert (dst / "config.json").exists() and not (dst / ".moequant-journal.json").exists()


def test_kill_9_then_resume_is_byte_identical(src, tmp_path):
    """SIGKILL mid-run (the lock file and the journal stay behind, no process holds the
    lock): the rerun resumes and the result equals an uninterrupted conversion."""
    import signal

    from moequant.convert import convert

    dst = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_CONVERT, str(src), str(dst)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        for _ in range(3):  # two shards written, the third being written
            assert child.stdout.readline().strip() == "writing", child.stderr.read()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert (dst / ".moequant-lock").exists() and (dst / ".moequant-journal.json").exists()
    assert not (dst / "config.json").exists()
    again = convert(src, dst, "alis-3.6", progress=False, max_shard_bytes=300_000)
    assert again.units_skipped >= 1
    convert(src, tmp_path / "ref", "alis-3.6", progress=False, max_shard_bytes=300_000)
    assert shard_bytes(dst) == shard_bytes(tmp_path / "ref")
    assert (dst / "config.json").read_text() == (tmp_path / "ref" / "config.json").read_text()
    assert not (dst / ".moequant-lock").exists()


def test_lock_left_by_a_killed_run_does_not_block(src, tmp_path):
    """kill -9 leaves the lock file, but no process holds it: the next run proceeds."""
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / ".moequant-lock").write_text("999999\n")
    assert run(src, dst) == 0
    assert not (dst / ".moequant-lock").exists()


# --------------------------------------------------------------------------- item 10


HEADER_CASES = {
    "JSON list": lambda h: b"[1, 2, 3]",
    "JSON string": lambda h: b'"a header"',
    "100k-deep nesting": lambda h: b"[" * 100_000 + b"]" * 100_000,
    "float offsets": lambda h: {
        k: (dict(v, data_offsets=[float(x) for x in v["data_offsets"]]) if k != "__metadata__" else v)
        for k, v in h.items()
    },
    "float shape": lambda h: {
        k: (dict(v, shape=[float(x) for x in v["shape"]]) if k != "__metadata__" else v) for k, v in h.items()
    },
}


@pytest.mark.parametrize("case", HEADER_CASES)
def test_malformed_header_is_exit_2(src, tmp_path, capsys, case):
    shard = sorted(src.glob("model-*.safetensors"))[0]
    _rewrite_header(shard, HEADER_CASES[case])
    assert run(src, tmp_path / "out") == 2
    assert shard.name in one_line_error(capsys)


@pytest.mark.parametrize("value", [7, ["model-00001-of-000003.safetensors"], None])
def test_weight_map_value_not_a_file_name(src, tmp_path, capsys, value):
    data = index_of(src)
    name = next(iter(data["weight_map"]))
    data["weight_map"][name] = value
    set_index(src, data)
    assert run(src, tmp_path / "out") == 2
    err = one_line_error(capsys)
    assert INDEX in err and name in err


def _text(c):
    return c["text_config"]


def _group(c):
    return _text(c)["quantization_config"]["config_groups"]["group_0"]


CONFIG_CASES = {
    "moe_layer_freq 0": (lambda c: _text(c).update(moe_layer_freq=0), "moe_layer_freq"),
    "first_k_dense_replace string": (
        lambda c: _text(c).update(first_k_dense_replace="1"),
        "first_k_dense_replace",
    ),
    "first_k_dense_replace null": (
        lambda c: _text(c).update(first_k_dense_replace=None),
        "first_k_dense_replace",
    ),
    "quantization_config string": (
        lambda c: _text(c).update(quantization_config="int4"),
        "quantization_config",
    ),
    "quantization_config list": (lambda c: _text(c).update(quantization_config=[]), "quantization_config"),
    "config_groups entry string": (
        lambda c: _text(c)["quantization_config"]["config_groups"].update(group_0="int4"),
        "config_groups.group_0",
    ),
    "config_groups entry list": (
        lambda c: _text(c)["quantization_config"]["config_groups"].update(group_0=[1]),
        "config_groups.group_0",
    ),
    "group_size 32.0": (lambda c: _group(c)["weights"].update(group_size=32.0), "group_size"),
    "num_bits 4.0": (lambda c: _group(c)["weights"].update(num_bits=4.0), "4.0-bit"),
    "bool for an int": (lambda c: _text(c).update(num_experts_per_tok=True), "num_experts_per_tok"),
    "float layers": (lambda c: _text(c).update(num_hidden_layers=3.0), "num_hidden_layers"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_malformed_config_is_exit_2(src, tmp_path, capsys, case):
    fn, key = CONFIG_CASES[case]
    cfg = json.loads((src / "config.json").read_text())
    fn(cfg)
    (src / "config.json").write_text(json.dumps(cfg))
    for argv in (
        ["convert", "--hf-path", str(src), "--mlx-path", str(tmp_path / "out"), "--quiet"],
        ["plan", "--hf-path", str(src)],
        ["plan", "--config", str(src / "config.json")],
    ):
        assert cli.main(argv) == 2, argv
        err = one_line_error(capsys)
        assert "config.json" in err and key in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["config.json", INDEX, "recipe.json"])
def test_deeply_nested_json_is_exit_2(src, tmp_path, capsys, name):
    path = (tmp_path if name == "recipe.json" else src) / name
    path.write_text("[" * 100_000 + "]" * 100_000)
    assert run(src, tmp_path / "out", "--recipe", str(tmp_path / "recipe.json")) == 2
    assert f"{path}: cannot parse" in one_line_error(capsys)


def test_journal_that_is_a_json_list(src, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / ".moequant-journal.json").write_text("[]")
    assert run(src, dst) == 2
    assert ".moequant-journal.json" in one_line_error(capsys)
    assert run(src, dst, "--overwrite") == 2
    assert "JSON list" in one_line_error(capsys)
    assert (dst / ".moequant-journal.json").read_text() == "[]"


def test_overwrite_on_a_symlinked_output_directory(src, tmp_path, capsys):
    real = tmp_path / "real"
    assert run(src, real) == 0
    (real / "notes.md").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(real)
    assert run(src, link, "--overwrite") == 2
    assert "symbolic link" in one_line_error(capsys)
    assert (real / "notes.md").exists() and (real / "config.json").exists()


def test_dangling_symlink_output_path(src, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    assert run(src, link) == 2
    assert "dangling symbolic link" in one_line_error(capsys)
    assert not (tmp_path / "nowhere").exists()
