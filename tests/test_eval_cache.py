"""The eval reference cache under hostile conditions: two runs sharing it, a build killed
half-way, damaged or forged contents, and a reference whose weights changed in place."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moequant import evaluate as ev
from moequant.cli import main
from moequant.testing.tiny_mlx import make_tiny_model, quantize_tiny

SEQ, NS, K = 48, 4, 32
VOCAB = 512  # the tiny model's output vocabulary
WORKER = Path(__file__).with_name("eval_worker.py")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-models")
    ref = make_tiny_model(root / "ref", seed=0, scale=8.0)
    return {"ref": ref, "build": quantize_tiny(ref, root / "q3", 3)}


def kwargs(models, cache, **kw):
    return {
        "ref_dir": str(models["ref"]),
        "model_dir": str(models["build"]),
        "seq_len": SEQ,
        "num_samples": NS,
        "top_k": K,
        "cache_dir": None if cache is None else str(cache),
        "progress": False,
        **kw,
    }


def numbers(report):
    """The measured numbers of a report, as its JSON file holds them."""
    return json.loads(json.dumps(ev._json_safe({k: report[k] for k in ("kl", "flips", "perplexity")})))


@pytest.fixture(scope="module")
def truth(models, tmp_path_factory):
    """One clean run in the default (owned) location: its report, the cache's path relative
    to the cache root, and a pristine copy of that cache."""
    root = tmp_path_factory.mktemp("truth")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEQUANT_CACHE", str(root / "cacheroot"))
        report = ev.evaluate(**kwargs(models, None))
    path = Path(report["cache"]["path"])
    assert not report["cache"]["reused"] and report["kl"]["mean"] > 0
    pristine = root / "pristine"
    shutil.copytree(path, pristine)
    return {"report": report, "key": path.relative_to(root / "cacheroot"), "pristine": pristine}


# --------------------------------------------------------------------------- processes


def start(models, cache, tmp_path, name, gate=None):
    err = tmp_path / f"{name}.err"
    args = [sys.executable, str(WORKER), json.dumps(kwargs(models, cache, progress=True))]
    proc = subprocess.Popen(
        args + ([str(gate)] if gate else []), stdout=subprocess.PIPE, stderr=open(err, "w"), text=True
    )
    return proc, err


def wait_until(what, cond, procs, timeout=180):
    deadline = time.monotonic() + timeout
    while not cond():
        for p in procs:
            assert p.poll() is None, f"exited (rc {p.returncode}) before: {what}"
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.02)


def finish(proc, err):
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.read_text()
    return json.loads(out)


def test_two_concurrent_runs_share_one_cache_safely(models, truth, tmp_path, monkeypatch):
    """Item 1: the second run arrives while the first is half-way through building the
    shared default cache; it must wait, then reuse the published cache, and both must
    report the true numbers (the bug: the second truncated the first's mapped arrays)."""
    monkeypatch.setenv("MOEQUANT_CACHE", str(tmp_path / "root"))
    gate = tmp_path / "gate"
    a, a_err = start(models, None, tmp_path, "a", gate=gate)
    wait_until("run A half-way through the reference", lambda: "1/4" in a_err.read_text(), [a])
    b, b_err = start(models, None, tmp_path, "b")
    wait_until("run B waiting for A's build", lambda: "waiting for another run" in b_err.read_text(), [a, b])
    gate.touch()
    ra, rb = finish(a, a_err), finish(b, b_err)
    assert not ra["cache"]["reused"] and rb["cache"]["reused"]
    assert ra["cache"]["path"] == rb["cache"]["path"] == str(tmp_path / "root" / truth["key"])
    assert numbers(ra) == numbers(rb) == numbers(truth["report"])
    # The published cache, its lock and nothing else (no leftover scratch directories).
    eval_dir = tmp_path / "root" / "eval"
    name = truth["key"].name
    assert sorted(p.name for p in eval_dir.iterdir() if name in p.name) == [f".{name}.lock", name]


def test_killed_build_leaves_nothing_that_looks_complete(models, truth, tmp_path):
    cache = tmp_path / "c"
    a, a_err = start(models, cache, tmp_path, "a", gate=tmp_path / "never")
    wait_until("the build half-way", lambda: "1/4" in a_err.read_text(), [a])
    a.send_signal(signal.SIGKILL)
    a.wait()
    assert not cache.exists()  # the old code left a directory of partly written arrays here
    assert list(tmp_path.glob(".c.moequant-tmp-*"))  # the dead build's private directory
    r = ev.evaluate(**kwargs(models, cache))
    assert not r["cache"]["reused"] and numbers(r) == numbers(truth["report"])
    assert not list(tmp_path.glob(".c.moequant-*"))  # the dead build's leftovers are gone
    assert ev.evaluate(**kwargs(models, cache))["cache"]["reused"]


def test_interrupted_build_in_process_cleans_up(models, tmp_path):
    def loader(path, fused=False):
        model = ev.load_model(path, fused=fused)
        calls = []

        def interrupted(x):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return model(x)

        return interrupted

    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(**kwargs(models, tmp_path / "c"), loader=loader)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".c.lock"]


# --------------------------------------------------------------------------- untrusted contents


def _array_offset(path: Path) -> int:
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        return f.tell()


def _poke(cache: Path, field: str, index, value) -> None:
    """Overwrite one element of a cached array in place."""
    p = cache / f"{field}.npy"
    a = np.load(p, mmap_mode="r")
    flat = np.ravel_multi_index(index, a.shape)
    with open(p, "r+b") as f:
        f.seek(_array_offset(p) + flat * a.dtype.itemsize)
        f.write(np.array(value, a.dtype).tobytes())


def _forge(cache: Path, field: str) -> None:
    """Record the array's current bytes in meta.json, as a forger (or a buggy tool) would,
    so that only the checks of the values themselves can catch what was changed."""
    meta = json.loads((cache / "meta.json").read_text())
    data = (cache / f"{field}.npy").read_bytes()
    meta["arrays"][field].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (cache / "meta.json").write_text(json.dumps(meta))


def _edit_meta(cache: Path, fn) -> None:
    meta = json.loads((cache / "meta.json").read_text())
    fn(meta)
    (cache / "meta.json").write_text(json.dumps(meta))


def id_past_vocab(c):
    _poke(c, "topk_ids", (1, 5, 3), VOCAB)
    _forge(c, "topk_ids")


def huge_id(c):
    _poke(c, "topk_ids", (2, 0, 0), 2**31 - 1)
    _forge(c, "topk_ids")


def negative_id(c):
    _poke(c, "topk_ids", (0, 7, 1), -3)
    _forge(c, "topk_ids")


def truncated(c):
    p = c / "topk_logp.npy"
    os.truncate(p, p.stat().st_size - 100)
    _forge(c, "topk_logp")


def missing(c):
    (c / "tail_logp.npy").unlink()


def meta_disagrees(c):
    """meta.json consistent in itself, but it says 3 windows where the arrays hold 4."""

    def edit(m):
        m["num_windows"] = 3
        for e in m["arrays"].values():
            e["shape"][0] = 3

    _edit_meta(c, edit)


def checksum(c):
    """A tiny change of one value: still finite, sorted, summing to 1; only the checksum
    can tell."""
    a = np.load(c / "tail_logp.npy")
    _poke(c, "tail_logp", (1, 2), a[1, 2] * np.float32(1.0001))


def not_finite(c):
    _poke(c, "topk_logp", (3, 4, 0), np.nan)
    _forge(c, "topk_logp")


def mass_not_one(c):
    a = np.load(c / "topk_logp.npy")
    _poke(c, "topk_logp", (0, 0, 0), a[0, 0, 0] + 0.5)  # the largest, so still sorted
    _forge(c, "topk_logp")


def meta_not_json(c):
    (c / "meta.json").write_text('{"format": ')


def meta_wrong_type(c):
    _edit_meta(c, lambda m: m.update(top_k=str(m["top_k"])))


CORRUPTIONS = {  # name -> (corrupt, the file the error must name)
    "id_past_vocab": (id_past_vocab, "topk_ids.npy"),
    "huge_id": (huge_id, "topk_ids.npy"),
    "negative_id": (negative_id, "topk_ids.npy"),
    "truncated": (truncated, "topk_logp.npy"),
    "missing": (missing, "tail_logp.npy"),
    "meta_disagrees": (meta_disagrees, "topk_ids.npy"),
    "checksum": (checksum, "tail_logp.npy"),
    "not_finite": (not_finite, "topk_logp.npy"),
    "mass_not_one": (mass_not_one, "topk_logp.npy"),
    "meta_not_json": (meta_not_json, "meta.json"),
    "meta_wrong_type": (meta_wrong_type, "meta.json"),
}


@pytest.fixture
def no_model_loads(monkeypatch):
    import mlx_lm.utils

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(mlx_lm.utils, "load_model", refuse)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_bad_cache_at_a_user_location_is_refused(name, models, truth, tmp_path, capsys, no_model_loads):
    """Item 2: a user's --cache directory is never deleted: a bad one is refused, exit 2, in
    one line naming the file, before any model is loaded."""
    corrupt, culprit = CORRUPTIONS[name]
    cache = tmp_path / "c"
    shutil.copytree(truth["pristine"], cache)
    corrupt(cache)
    rc = main(
        [
            "eval",
            "--ref",
            str(models["ref"]),
            "--model",
            str(models["build"]),
            "--seq-len",
            str(SEQ),
            "--num-samples",
            str(NS),
            "--top-k-cache",
            str(K),
            "--cache",
            str(cache),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moequant eval: error: "), err
    assert str(cache / culprit) in lines[0]


# One of each kind of check (every kind is refused above; a rebuild costs two model runs).
@pytest.mark.parametrize(
    "name", ["id_past_vocab", "truncated", "missing", "meta_disagrees", "checksum", "meta_not_json"]
)
def test_bad_cache_at_the_default_location_is_rebuilt(name, models, truth, tmp_path, capfd, monkeypatch):
    corrupt, culprit = CORRUPTIONS[name]
    monkeypatch.setenv("MOEQUANT_CACHE", str(tmp_path / "root"))
    cache = tmp_path / "root" / truth["key"]
    shutil.copytree(truth["pristine"], cache)
    assert ev.evaluate(**kwargs(models, None))["cache"]["reused"]  # the copy is valid
    corrupt(cache)
    r = ev.evaluate(**kwargs(models, None))
    assert not r["cache"]["reused"] and numbers(r) == numbers(truth["report"])
    err = capfd.readouterr().err
    assert f"rebuilding the reference cache: {cache / culprit}" in err
    assert ev.evaluate(**kwargs(models, None))["cache"]["reused"]


def test_a_cache_checks_cleanly_and_records_checksums(truth):
    meta = json.loads((truth["pristine"] / "meta.json").read_text())
    for f in ev.ReferenceCache.FIELDS:
        data = (truth["pristine"] / f"{f}.npy").read_bytes()
        assert meta["arrays"][f]["sha256"] == hashlib.sha256(data).hexdigest()
        assert meta["arrays"][f]["bytes"] == len(data)
    got, arrays = ev.ReferenceCache(truth["pristine"]).open()
    assert got == meta and arrays["topk_ids"].shape == (NS, SEQ - 1, K)


# --------------------------------------------------------------------------- reference changes


def _middle_tensor(shard: Path):
    """(name, absolute offset, nbytes) of the largest tensor lying wholly outside the first
    and last MiB of the shard: the bytes the old fingerprint never read."""
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    size, mib = len(raw), 1 << 20
    best = None
    for name, t in header.items():
        if name == "__metadata__":
            continue
        b, e = (8 + n + o for o in t["data_offsets"])
        if b >= mib and e <= size - mib and t["dtype"] == "F32" and (best is None or e - b > best[2]):
            best = (name, b, e - b)
    assert best is not None and best[0].endswith("weight"), header.keys()
    return best


def _negate_in_place(shard: Path, offset: int, nbytes: int) -> None:
    """Flip the sign of every float32 in the range: same size, and its old mtime restored."""
    st = os.stat(shard)
    with open(shard, "r+b") as f:
        f.seek(offset)
        a = np.frombuffer(f.read(nbytes), np.float32)
        f.seek(offset)
        f.write((-a).tobytes())
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(shard).st_size == st.st_size


def test_a_changed_tensor_mid_shard_invalidates_the_cache(models, tmp_path, monkeypatch, capsys):
    """Item 3: the old fingerprint read the first and last MiB of each weight file only."""
    monkeypatch.setenv("MOEQUANT_CACHE", str(tmp_path / "root"))
    ref = Path(shutil.copytree(models["ref"], tmp_path / "ref"))
    mine = tmp_path / "mine"
    before = ev.evaluate(**kwargs(models, None, ref_dir=str(ref)))
    assert not ev.evaluate(**kwargs(models, mine, ref_dir=str(ref)))["cache"]["reused"]
    shard = ref / "model.safetensors"
    _, offset, nbytes = _middle_tensor(shard)
    _negate_in_place(shard, offset, nbytes)
    after = ev.evaluate(**kwargs(models, None, ref_dir=str(ref)))
    assert not after["cache"]["reused"]
    assert after["cache"]["path"] != before["cache"]["path"]
    assert after["kl"]["mean"] != before["kl"]["mean"]
    # The user's own cache made for the old bytes is refused, not reused.
    capsys.readouterr()
    rc = main(
        [
            "eval",
            "--ref",
            str(ref),
            "--model",
            str(models["build"]),
            "--seq-len",
            str(SEQ),
            "--num-samples",
            str(NS),
            "--top-k-cache",
            str(K),
            "--cache",
            str(mine),
            "--no-progress",
        ]
    )
    assert rc == 2 and "another reference model" in capsys.readouterr().err


def test_weight_hashes_are_memoized_and_never_stale(models, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEQUANT_CACHE", str(tmp_path / "root"))
    ref = Path(shutil.copytree(models["ref"], tmp_path / "ref"))
    hashed = []
    real = ev._file_sha256
    monkeypatch.setattr(ev, "_file_sha256", lambda p, progress=None: hashed.append(p) or real(p))
    shard = ref / "model.safetensors"
    # Files written just now are not memoized: a second write within the same timestamp
    # tick could go unnoticed.
    fp = ev.model_fingerprint(ref)
    assert ev.model_fingerprint(ref) == fp and hashed == [shard, shard]
    monkeypatch.setattr(ev, "MEMO_RACY_NS", 0)  # as if the files were old
    hashed.clear()
    assert ev.model_fingerprint(ref) == fp and hashed == [shard]
    assert ev.model_fingerprint(ref) == fp and hashed == [shard]  # memoized: not read again
    assert ev.hash_memo_path().is_file()
    _, offset, nbytes = _middle_tensor(shard)
    _negate_in_place(shard, offset, nbytes)  # same size, same mtime: the ctime still moves
    assert ev.model_fingerprint(ref) != fp and hashed == [shard, shard]
    # A memo that lies about a file is only trusted for the exact (size, mtime, ctime,
    # inode, device) it records; a garbled memo is ignored.
    ev.hash_memo_path().write_text("[1, 2")
    assert ev.model_fingerprint(ref) != fp and len(hashed) == 3


def test_a_failed_write_leaves_no_cache(models, tmp_path, capsys, monkeypatch):
    """A full disk while building: one-line error, exit 2, nothing left behind."""
    import errno

    real = ev._NpyWriter._put

    def put(self, b):
        if self.size > 4096:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, b)

    monkeypatch.setattr(ev._NpyWriter, "_put", put)
    rc = main(
        [
            "eval",
            "--ref",
            str(models["ref"]),
            "--model",
            str(models["build"]),
            "--seq-len",
            str(SEQ),
            "--num-samples",
            str(NS),
            "--top-k-cache",
            str(K),
            "--cache",
            str(tmp_path / "c"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "No space left on device" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".c.lock"]
