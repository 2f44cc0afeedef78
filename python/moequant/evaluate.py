"""`moequant eval`: how far a build's next-token distributions are from its reference.

Method (as in the model card): on ``num_samples`` windows of ``seq_len`` tokens, every
position t < seq_len - 1 predicts token t + 1. Per position we compare the reference's
distribution P and the build's Q:

* KL(P || Q), from a top-k cache of P (see ``KL_DEFINITION``);
* a top-1 flip: the build gives some token strictly more probability than the reference's
  own pick (ties do not count as flips);
* at flips: P(reference pick), Q(build pick), P(build pick), and near-ties;
* the negative log-likelihood of the actual next token under each model, for perplexity.

The reference runs first and its top-k log-probabilities are cached on disk; then the
build runs against the cache, so only one model is ever loaded. A cache records
fingerprints of the reference (all bytes of its weights), the tokenizer and the token
windows and is reused only when all three match. Caches are published atomically, shared
safely between concurrent runs and validated on every load (see ``ReferenceCache``).
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import glob
import hashlib
import io
import json
import logging
import math
import os
import secrets
import shutil
import stat
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .errors import UserError
from .progress import Progress
from .quant_formats import KV_CACHE_BITS

CACHE_FORMAT = "moequant-eval-reference-cache"
CACHE_VERSION = 2  # 2: meta.json records each array's shape, dtype, size and sha256
DEFAULT_TOP_K = 1024
DEFAULT_NEAR_TIE = 0.1

KL_DEFINITION = (
    "KL(ref||build) per position = sum over the reference's top-k tokens of "
    "p_ref*(log p_ref - log p_build) + p_ref_tail*(log p_ref_tail - log p_build_tail), "
    "where the tail is everything outside the reference's top-k taken as one bucket "
    "(p_build_tail = the build's mass outside the reference's top-k). By the log-sum "
    "inequality this is a lower bound of the full KL, exact when top_k = vocab size."
)
FLIP_DEFINITION = (
    "a position flips when the build gives some token strictly more probability than the "
    "reference's top-1 token (exact ties are not flips)"
)
SE_DEFINITION = (
    "se = sample standard deviation / sqrt(n) over positions (positions inside a window "
    "are correlated, so this understates the uncertainty); se_windows = the same over "
    "per-window means. Perplexity se by the delta method: ppl * se(mean NLL)."
)


def near_tie_definition(threshold: float) -> str:
    return (
        f"a flip is a near-tie when the reference's probability of the build's pick is "
        f"within {threshold} of the reference's probability of its own pick; a build pick "
        f"outside the reference's top-k counts as not a near-tie"
    )


# --------------------------------------------------------------------------- data


def default_corpus() -> List[Path]:
    """The offline default: the Python standard library's own top-level .py sources."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.glob("*.py") if p.is_file())


def _read_text(path: Path) -> Optional[str]:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _render_chat(tokenizer, messages, where: str) -> str:
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages
    ):
        raise UserError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError(f"{where}: chat messages need a chat template, the tokenizer has none")
    return tokenizer.apply_chat_template(messages, tokenize=False)


def load_documents(data: Optional[str], tokenizer) -> List[Tuple[str, Callable[[], str]]]:
    """(name, text thunk) per document of ``data``: a text file, a directory of text files
    (recursively, sorted), a .jsonl of {"messages": [...]} (rendered with the tokenizer's
    chat template) or {"text": ...} lines, or None for the built-in default corpus.
    Texts are read lazily so only the documents a run needs get tokenized."""
    if data is None:
        return [(str(p), lambda p=p: _read_text(p) or "") for p in default_corpus()]
    path = Path(data)
    if not path.exists():
        raise UserError(f"--data {data}: no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        docs = [(str(p), lambda p=p: _read_text(p) or "") for p in files]
        if not docs:
            raise UserError(f"--data {data}: the directory holds no files")
        return docs
    if path.suffix == ".jsonl":
        docs = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{where}: not valid JSON ({e.msg})") from None
                if isinstance(obj, dict) and "messages" in obj:
                    text = _render_chat(tokenizer, obj["messages"], where)
                elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
                    text = obj["text"]
                else:
                    raise UserError(f"{where}: expected an object with 'messages' or 'text'")
                docs.append((where, lambda t=text: t))
        return docs
    text = _read_text(path)
    if text is None:
        raise UserError(f"--data {data}: not a UTF-8 text file")
    return [(str(path), lambda: text)]


class _DropLengthWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TOO_LONG_WARNING)


TOO_LONG_WARNING = "Token indices sequence length is longer than the specified maximum"


@contextlib.contextmanager
def _quiet_length_warning():
    """Documents are tokenized whole and cut into windows on purpose, so transformers'
    warning that a document exceeds the model's maximum length is noise: drop that one
    message of that one logger while we tokenize, nothing else."""
    log = logging.getLogger("transformers.tokenization_utils_base")
    f = _DropLengthWarning()
    log.addFilter(f)
    try:
        yield
    finally:
        log.removeFilter(f)


def make_windows(
    docs: Sequence[Tuple[str, Callable[[], str]]],
    tokenizer,
    seq_len: int,
    num_samples: int,
    seed: int,
    data_name: str = "the data",
) -> np.ndarray:
    """Shuffle the documents with ``seed``, tokenize them in that order and concatenate
    until there are ``num_samples * seq_len`` tokens; cut into (n, seq_len) int32 windows.
    Fewer windows come back when the data is too short for ``num_samples``."""
    if seq_len < 2:
        raise UserError(f"--seq-len {seq_len}: must be at least 2")
    if num_samples < 1:
        raise UserError(f"--num-samples {num_samples}: must be at least 1")
    order = np.random.default_rng(seed).permutation(len(docs))
    need = seq_len * num_samples
    tokens: List[int] = []
    with _quiet_length_warning():
        for i in order:
            text = docs[i][1]()
            if text:
                tokens.extend(tokenizer.encode(text, add_special_tokens=False))
            if len(tokens) >= need:
                break
    n = min(num_samples, len(tokens) // seq_len)
    if n == 0:
        raise UserError(f"--seq-len {seq_len} is larger than {data_name} ({len(tokens)} tokens)")
    return np.asarray(tokens[: n * seq_len], dtype=np.int32).reshape(n, seq_len)


# --------------------------------------------------------------------------- fingerprints

HASH_CHUNK = 16 << 20
# A memoized file hash is trusted only for files whose mtime and ctime are this much older
# than the hash: a write within the same timestamp tick (coarse on some filesystems) could
# otherwise leave (size, mtime, ctime, inode) unchanged. Such files are simply rehashed.
MEMO_RACY_NS = 2_000_000_000


def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()


def cache_root() -> Path:
    """Where moequant keeps its caches: $MOEQUANT_CACHE, else ~/.cache/moequant."""
    return Path(os.environ.get("MOEQUANT_CACHE") or Path.home() / ".cache" / "moequant")


def hash_memo_path() -> Path:
    return cache_root() / "eval" / "weight-hashes.json"


def _file_sha256(path: Path, progress: Optional["Progress"] = None) -> str:
    h = hashlib.sha256()
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])  # hashlib releases the GIL on big buffers: files hash in parallel
            if progress is not None:
                progress.update(n)
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> list:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


@contextlib.contextmanager
def _flock(path: Path, exclusive: bool, waiting: Optional[str] = None):
    """fcntl.flock on ``path`` (created if missing) for the block; the kernel drops it if
    the process dies, so a killed run never leaves a stale lock. ``waiting``: printed when
    the lock is busy."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if not exclusive:  # a read-only location: published caches are immutable, read them
            yield
            return
        raise UserError(f"cannot create the lock file {path}: {e.strerror or e}") from None
    try:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_memo(path: Path) -> dict:
    """The memo of weight-file hashes; anything malformed in it is ignored."""
    try:
        memo = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(memo, dict):
        return {}
    return {
        k: v
        for k, v in memo.items()
        if isinstance(v, list)
        and len(v) == 6
        and all(type(x) is int for x in v[:5])
        and isinstance(v[5], str)
    }


def weight_files(model_dir: Path) -> List[Path]:
    """The files mlx-lm loads weights from (its own glob)."""
    return sorted(Path(f) for f in glob.glob(str(model_dir / "*.safetensors")))


def model_fingerprint(model_dir: Path, progress: bool = False) -> str:
    """config.json plus every weight file's name, size and sha256 of all of its bytes, so
    any change of any byte invalidates a cache. Hashes are memoized (hash_memo_path) by
    the file's (size, mtime, ctime, inode, device), so only new or changed files are read:
    on a 600 GB reference the first run reads it once, later runs read none of it."""
    files = weight_files(model_dir)
    memo_path = hash_memo_path()
    memo = _read_memo(memo_path)
    stats = {f: os.stat(f) for f in files}
    digests: Dict[Path, str] = {}
    todo = []
    for f in files:
        e = memo.get(os.path.realpath(f))
        if e is not None and e[:5] == _stat_key(stats[f]):
            digests[f] = e[5]
        else:
            todo.append(f)
    if todo:
        total = sum(stats[f].st_size for f in todo)
        bar = Progress(
            total,
            "hashing reference weights",
            progress and total >= (1 << 30),
            fmt=lambda n: f"{n / 1e9:.1f} GB",
        )
        start = time.time_ns()
        try:
            with ThreadPoolExecutor(max(1, min(len(todo), os.cpu_count() or 1, 8))) as pool:
                for f, d in zip(todo, pool.map(lambda f: _file_sha256(f, bar), todo)):
                    digests[f] = d
        finally:
            bar.close()
        fresh = {}
        for f in todo:
            st = os.stat(f)
            # Not memoized: a file changed while being hashed, or too recently to be sure
            # that a later write would change its timestamps (see MEMO_RACY_NS).
            if (
                _stat_key(st) == _stat_key(stats[f])
                and max(st.st_mtime_ns, st.st_ctime_ns) < start - MEMO_RACY_NS
            ):
                fresh[os.path.realpath(f)] = _stat_key(st) + [digests[f]]
        if fresh:
            _update_memo(memo_path, fresh)
    parts = [(model_dir / "config.json").read_bytes()]
    for f in files:
        parts += [f.name.encode(), str(stats[f].st_size).encode(), digests[f].encode()]
    return _sha(*parts)


def _update_memo(path: Path, fresh: dict) -> None:
    """Merge ``fresh`` into the memo (entries of files that no longer exist are dropped);
    best effort: a memo that cannot be written only costs a rehash next time."""
    try:
        with _flock(path.with_name(path.name + ".lock"), exclusive=True):
            memo = {k: v for k, v in _read_memo(path).items() if os.path.exists(k)}
            memo.update(fresh)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo, indent=0))
            os.replace(tmp, path)
    except OSError:
        pass


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return _sha(json.dumps(vocab, ensure_ascii=False).encode())


def windows_fingerprint(windows: np.ndarray) -> str:
    return _sha(str(windows.shape).encode(), np.ascontiguousarray(windows, np.int32).tobytes())


# --------------------------------------------------------------------------- per-position math


def log_probs(model, window: mx.array, kv: Optional[dict] = None) -> mx.array:
    """(T,) tokens -> (T-1, V) float32 log-probabilities of tokens 1..T-1; with ``kv``
    (kv_cache.logits_with_cache's keywords) through a quantized latent KV cache."""
    if kv:
        from .kv_cache import logits_with_cache

        logits = logits_with_cache(model, window[None, :-1], **kv)[0].astype(mx.float32)
    else:
        logits = model(window[None, :-1])[0].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _logsumexp_outside(lp: mx.array, ids: mx.array) -> mx.array:
    """log of the mass outside ``ids`` (-inf when ids cover the vocabulary); computed as a
    logsumexp of the rest, not log(1 - sum), which cancels when the tail is tiny."""
    masked = mx.put_along_axis(lp, ids, mx.array(-math.inf, dtype=lp.dtype), axis=-1)
    return mx.logsumexp(masked, axis=-1)


def reference_stats(lp: mx.array, targets: mx.array, k: int) -> Dict[str, mx.array]:
    """What the cache keeps per position: the top-k ids and log-probs (descending), the
    log of the remaining mass, and the log-prob of the actual next token."""
    idx = mx.argpartition(-lp, kth=k - 1, axis=-1)[..., :k]
    vals = mx.take_along_axis(lp, idx, axis=-1)
    order = mx.argsort(-vals, axis=-1)
    ids = mx.take_along_axis(idx, order, axis=-1).astype(mx.int32)
    return {
        "topk_ids": ids,
        "topk_logp": mx.take_along_axis(vals, order, axis=-1),
        "tail_logp": _logsumexp_outside(lp, ids),
        "target_logp": mx.take_along_axis(lp, targets[:, None], axis=-1)[:, 0],
    }


def compare_position(ref: Dict[str, mx.array], lp_b: mx.array, targets: mx.array):
    """Per-position numbers for one window from the reference's cached stats and the
    build's full log-probs (T, V). Returns a dict of numpy arrays."""
    ids, lr = ref["topk_ids"], ref["topk_logp"]
    lb = mx.take_along_axis(lp_b, ids, axis=-1)
    head = mx.sum(mx.exp(lr) * (lr - lb), axis=-1)
    tail_r = ref["tail_logp"]
    tail_b = _logsumexp_outside(lp_b, ids)
    has_tail = tail_r > -math.inf
    # 0 * log 0 = 0: no tail term when the top-k covers the whole vocabulary.
    tail = mx.where(has_tail, mx.exp(tail_r) * (tail_r - mx.where(has_tail, tail_b, 0.0)), 0.0)
    build_pick = mx.argmax(lp_b, axis=-1).astype(mx.int32)
    build_max = mx.max(lp_b, axis=-1)
    # The reference's log-prob of the build's pick, when that token is in its top-k.
    hit = ids == build_pick[:, None]
    in_topk = mx.any(hit, axis=-1)
    lr_build_pick = mx.max(mx.where(hit, lr, -math.inf), axis=-1)
    out = {
        "kl": head + tail,
        "flip": lb[:, 0] < build_max,
        "ref_p_ref_pick": mx.exp(lr[:, 0]),
        "build_p_build_pick": mx.exp(build_max),
        "build_p_ref_pick": mx.exp(lb[:, 0]),
        "ref_p_build_pick": mx.where(in_topk, mx.exp(lr_build_pick), math.nan),
        "ref_nll": -ref["target_logp"],
        "build_nll": -mx.take_along_axis(lp_b, targets[:, None], axis=-1)[:, 0],
    }
    mx.eval(out)
    return {k: np.array(v) for k, v in out.items()}


# --------------------------------------------------------------------------- summary


def _mean_se(x: np.ndarray, window: np.ndarray) -> Dict[str, float]:
    x = np.asarray(x, np.float64)
    n = x.size
    se = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    wins = np.unique(window)
    wmeans = np.array([x[window == w].mean() for w in wins])
    se_w = float(wmeans.std(ddof=1) / math.sqrt(wmeans.size)) if wmeans.size > 1 else math.nan
    return {"mean": float(x.mean()), "se": se, "se_windows": se_w}


def _mean_or_nan(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    return float(x.mean()) if x.size else math.nan


def _ppl(nll: np.ndarray, window: np.ndarray) -> Dict[str, float]:
    m = _mean_se(nll, window)
    ppl = math.exp(m["mean"])
    return {
        "ppl": ppl,
        "se": ppl * m["se"],
        "se_windows": ppl * m["se_windows"],
        "mean_nll": m["mean"],
    }


def summarize(per_pos: Dict[str, np.ndarray], near_tie: float = DEFAULT_NEAR_TIE) -> dict:
    """Every reported number, from the per-position arrays (plus ``window``: the window
    index of each position)."""
    kl = np.asarray(per_pos["kl"], np.float64)
    win = np.asarray(per_pos["window"])
    flip = np.asarray(per_pos["flip"], bool)
    n, nf = kl.size, int(flip.sum())
    gap = per_pos["ref_p_ref_pick"][flip] - per_pos["ref_p_build_pick"][flip]
    near = np.nan_to_num(gap, nan=np.inf) < near_tie  # unknown (outside top-k): not a tie
    known = ~np.isnan(per_pos["ref_p_build_pick"][flip])
    return {
        "positions": n,
        "windows": int(np.unique(win).size),
        "kl": {
            **_mean_se(kl, win),
            "median": float(np.median(kl)),
            "max": float(kl.max()),
            "mean_flipped": _mean_or_nan(kl[flip]),
            "mean_unflipped": _mean_or_nan(kl[~flip]),
        },
        "flips": {
            "count": nf,
            "positions": n,
            "rate": nf / n,
            "ref_p_ref_pick": _mean_or_nan(per_pos["ref_p_ref_pick"][flip]),
            "build_p_build_pick": _mean_or_nan(per_pos["build_p_build_pick"][flip]),
            "build_p_ref_pick": _mean_or_nan(per_pos["build_p_ref_pick"][flip]),
            "ref_p_build_pick": _mean_or_nan(per_pos["ref_p_build_pick"][flip][known]),
            "ref_p_build_pick_known": int(known.sum()),
            "near_ties": int(near.sum()),
            "near_tie_share": float(near.mean()) if nf else math.nan,
        },
        "perplexity": {
            "reference": _ppl(per_pos["ref_nll"], win),
            "build": _ppl(per_pos["build_nll"], win),
        },
    }


def _concat(rows: List[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    out = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    out["window"] = np.concatenate([np.full(r["kl"].size, i) for i, r in enumerate(rows)])
    return out


# --------------------------------------------------------------------------- passes


class CacheInvalid(Exception):
    """A reference cache that fails validation; the message starts with the file at fault."""


def _is_int(x) -> bool:
    return type(x) is int  # bool is not an int here


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _NpyWriter:
    """One .npy written front to back with plain writes (no memory map: a full disk is an
    OSError, not a SIGBUS), its sha256 computed on the way."""

    def __init__(self, path: Path, shape: tuple, dtype: np.dtype):
        self.path, self.shape, self.dtype = path, tuple(int(d) for d in shape), np.dtype(dtype)
        self.hash, self.size = hashlib.sha256(), 0
        self.file = open(path, "xb")
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header,
            {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape},
        )
        self._put(header.getvalue())

    def _put(self, b) -> None:
        self.file.write(b)
        self.hash.update(b)
        self.size += len(b)

    def append(self, a: np.ndarray) -> None:
        assert a.dtype == self.dtype and a.shape == self.shape[1:], (a.dtype, a.shape)
        self._put(np.ascontiguousarray(a).tobytes())

    def finish(self) -> dict:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return {
            "shape": list(self.shape),
            "dtype": self.dtype.str,
            "bytes": self.size,
            "sha256": self.hash.hexdigest(),
        }


class ReferenceCache:
    """The reference's per-position top-k on disk: meta.json plus one .npy per field,
    memory-mapped when used.

    A cache is built in a private directory next to ``path`` and published by renaming it
    to ``path`` once complete, so a directory at ``path`` is always whole and is never
    written again (other runs may have its files mapped). A lock file next to it
    (``.NAME.lock``) serializes builders: a run that finds a build in progress waits for
    it and reuses its result. Nothing in a cache is trusted: ``open`` checks meta.json,
    the array headers, sizes, sha256 checksums (recorded in meta.json at build time),
    token-id ranges, finiteness and that each position's probabilities sum to 1.
    ``owned``: the location is moequant's own (the default under cache_root()), so a bad or
    stale cache there is replaced; a user-given directory is never deleted, only refused."""

    FIELDS = ("topk_ids", "topk_logp", "tail_logp", "target_logp")
    DTYPES = {
        "topk_ids": np.dtype("<i4"),
        "topk_logp": np.dtype("<f4"),
        "tail_logp": np.dtype("<f4"),
        "target_logp": np.dtype("<f4"),
    }
    META_MAX_BYTES = 1 << 20
    SCRATCH = "moequant-"  # .NAME.moequant-{tmp,trash}-PID-RANDOM: builds and discards

    def __init__(self, path: Path, owned: bool = False):
        self.path = Path(path)
        self.owned = owned
        self._opened: Optional[Tuple[dict, Dict[str, np.ndarray]]] = None

    @property
    def meta_path(self) -> Path:
        return self.path / "meta.json"

    @property
    def lock_path(self) -> Path:
        return self.path.parent / f".{self.path.name}.lock"

    def exists(self) -> bool:
        return self.meta_path.exists()

    def locked(self, exclusive: bool):
        return _flock(
            self.lock_path,
            exclusive,
            waiting=(
                f"moequant eval: waiting for another run that is building or checking the "
                f"reference cache {self.path}"
            ),
        )

    def _scratch(self, kind: str) -> Path:
        return self.path.parent / (
            f".{self.path.name}.{self.SCRATCH}{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        )

    # ------------------------------------------------------------------ reading

    def _regular(self, p: Path) -> os.stat_result:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            raise CacheInvalid(f"{p}: missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise CacheInvalid(f"{p}: not a regular file")
        return st

    def _read_meta(self) -> dict:
        p = self.meta_path
        if self._regular(p).st_size > self.META_MAX_BYTES:
            raise CacheInvalid(f"{p}: larger than {self.META_MAX_BYTES} bytes")
        try:
            meta = json.loads(p.read_bytes())
        except (OSError, ValueError) as e:
            raise CacheInvalid(f"{p}: unreadable ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
            raise CacheInvalid(f"{p}: not a moequant eval cache")
        if meta.get("version") != CACHE_VERSION:
            raise CacheInvalid(
                f"{p}: cache version {meta.get('version')!r}, this moequant reads version {CACHE_VERSION}"
            )
        for key, low in (("num_windows", 1), ("seq_len", 2), ("top_k", 1), ("vocab_size", 1)):
            if not _is_int(meta.get(key)) or meta[key] < low:
                raise CacheInvalid(f"{p}: '{key}' must be an integer >= {low}, not {meta.get(key)!r}")
        if meta["top_k"] > meta["vocab_size"]:
            raise CacheInvalid(f"{p}: top_k {meta['top_k']} exceeds vocab_size {meta['vocab_size']}")
        arrays = meta.get("arrays")
        if not isinstance(arrays, dict) or set(arrays) != set(self.FIELDS):
            raise CacheInvalid(f"{p}: 'arrays' must describe exactly {', '.join(self.FIELDS)}")
        n, t, k = meta["num_windows"], meta["seq_len"] - 1, meta["top_k"]
        for f in self.FIELDS:
            e = arrays[f]
            want = {"shape": [n, t, k] if f.startswith("topk") else [n, t], "dtype": self.DTYPES[f].str}
            if (
                not isinstance(e, dict)
                or any(e.get(x) != v for x, v in want.items())
                or not _is_int(e.get("bytes"))
                or not isinstance(e.get("sha256"), str)
            ):
                raise CacheInvalid(
                    f"{p}: arrays.{f} disagrees with num_windows/seq_len/top_k "
                    f"(want shape {want['shape']} dtype {want['dtype']}, bytes, sha256)"
                )
        return meta

    def _open_array(self, f: str, entry: dict) -> np.ndarray:
        p = self.path / f"{f}.npy"
        st = self._regular(p)
        try:
            with open(p, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                read = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = read(fh)
                offset = fh.tell()
        except (ValueError, OSError, SyntaxError) as e:
            raise CacheInvalid(f"{p}: not a valid .npy file ({e})") from None
        if list(shape) != entry["shape"] or dtype != self.DTYPES[f] or fortran:
            raise CacheInvalid(
                f"{p}: holds {dtype} {list(shape)}, meta.json says {entry['dtype']} {entry['shape']}"
            )
        want = offset + math.prod(shape) * dtype.itemsize
        if st.st_size != want or st.st_size != entry["bytes"]:
            raise CacheInvalid(f"{p}: {st.st_size} bytes, expected {want} (truncated or extended)")
        if _file_sha256(p) != entry["sha256"]:
            raise CacheInvalid(f"{p}: checksum mismatch (its bytes changed after the cache was built)")
        return np.load(p, mmap_mode="r")

    def _check_values(self, a: Dict[str, np.ndarray], meta: dict) -> None:
        """What the comparison relies on, window by window (bounded memory)."""
        vocab, k = meta["vocab_size"], meta["top_k"]
        for i in range(meta["num_windows"]):
            ids, lp = a["topk_ids"][i], a["topk_logp"][i]
            tail, target = a["tail_logp"][i], a["target_logp"][i]
            bad = (ids < 0) | (ids >= vocab)
            if bad.any():
                t, j = np.argwhere(bad)[0]
                raise CacheInvalid(
                    f"{self.path / 'topk_ids.npy'}: token id {ids[t, j]} (window "
                    f"{i}, position {t}) is outside the vocabulary [0, {vocab})"
                )
            problem = None
            if not np.isfinite(lp).all():
                problem = "topk_logp.npy", "a log-probability that is not finite"
            elif (np.diff(lp, axis=-1) > 0).any():
                problem = "topk_logp.npy", "top-k log-probabilities not in descending order"
            elif not np.isfinite(target).all():
                problem = "target_logp.npy", "a log-probability that is not finite"
            elif k < vocab and not np.isfinite(tail).all():
                problem = "tail_logp.npy", "a tail log-mass that is not finite"
            elif k == vocab and not (tail == -np.inf).all():
                problem = "tail_logp.npy", "a tail mass although top-k covers the vocabulary"
            else:
                lp64 = lp.astype(np.float64)
                head = lp64[:, 0] + np.log(np.exp(lp64 - lp64[:, :1]).sum(-1))
                if (np.abs(np.logaddexp(head, tail.astype(np.float64))) > 1e-3).any():
                    problem = "topk_logp.npy", "top-k and tail probabilities that do not sum to 1"
            if problem:
                raise CacheInvalid(f"{self.path / problem[0]}: {problem[1]} (window {i})")

    def open(self) -> Tuple[dict, Dict[str, np.ndarray]]:
        """Validate the published cache and map its arrays; raises CacheInvalid."""
        meta = self._read_meta()
        arrays = {f: self._open_array(f, meta["arrays"][f]) for f in self.FIELDS}
        self._check_values(arrays, meta)
        self._opened = meta, arrays
        return self._opened

    def meta(self) -> dict:
        return (self._opened or self.open())[0]

    def load(self) -> Dict[str, np.ndarray]:
        return (self._opened or self.open())[1]

    @staticmethod
    def mismatch(meta: dict, want: dict, top_k: Optional[int]) -> Optional[str]:
        """Why the cache does not fit this run (None: it does)."""
        for key, what in (
            ("reference", "another reference model (its config or weights differ)"),
            ("tokenizer", "a reference with another tokenizer"),
            ("windows", "other data (the token windows differ: --data, --seq-len, --num-samples or --seed)"),
            ("seq_len", "another --seq-len"),
            ("num_windows", "another number of windows"),
        ):
            if meta.get(key) != want[key]:
                return f"this cache was made for {what}"
        if top_k is not None and meta["top_k"] != top_k:
            return f"the cache holds top-{meta['top_k']}, not --top-k-cache {top_k}"
        return None

    def probe(self, want: dict, top_k: Optional[int]):
        """(meta, arrays) of a valid matching cache; None when there is none; or, at an
        owned location, the reason the one there must be replaced. At a user's location a
        bad or foreign directory is refused (exit 2)."""
        if not os.path.lexists(self.path):
            return None
        if self.path.is_dir() and not self.path.is_symlink() and not any(self.path.iterdir()):
            return None  # an empty directory: the rename of a finished build replaces it
        if not self.meta_path.exists():
            reason = "no meta.json (not a complete moequant eval cache)"
            if self.owned:
                return reason
            raise UserError(f"--cache {self.path}: {reason}; give a new or empty directory")
        try:
            meta, arrays = self.open()
        except CacheInvalid as e:
            if self.owned:
                return str(e)
            raise UserError(
                f"{e}: the reference cache is damaged (remove {self.path} to rebuild it)"
            ) from None
        why = self.mismatch(meta, want, top_k)
        if why is None:
            return meta, arrays
        self._opened = None
        if self.owned:
            return why
        raise UserError(f"{self.meta_path}: {why}")

    # ------------------------------------------------------------------ writing (exclusive lock held)

    def remove_stale(self) -> None:
        """Scratch directories of builds or discards that died (the caller holds the
        exclusive lock, so no live run owns one). Only directories holding nothing but
        cache files are removed."""
        names = {f"{f}.npy" for f in self.FIELDS} | {"meta.json"}
        for d in self.path.parent.glob(f".{glob.escape(self.path.name)}.{self.SCRATCH}*"):
            try:
                if d.is_dir() and not d.is_symlink() and {c.name for c in d.iterdir()} <= names:
                    shutil.rmtree(d)
            except OSError:
                pass

    def discard(self) -> None:
        """Move an owned bad cache aside and delete it. Runs that mapped its files keep
        their (unlinked) data: the files are never written, only removed."""
        assert self.owned
        trash = self._scratch("trash")
        os.rename(self.path, trash)
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink()

    def write(self, model, windows: np.ndarray, k: Optional[int], meta: dict, progress: Progress) -> None:
        """Run the reference over ``windows`` and store its top-k (k=None: the default,
        capped at the vocabulary size) in a private directory, published at ``path`` by a
        rename once complete. The caller holds the exclusive lock (``locked(True)``)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._scratch("tmp")
        tmp.mkdir()
        writers: Dict[str, _NpyWriter] = {}
        try:
            n, t = windows.shape[0], windows.shape[1] - 1
            for i in range(n):
                w = mx.array(windows[i])
                lp = log_probs(model, w)
                if not writers:  # the vocabulary size is known only now
                    vocab = lp.shape[-1]
                    if k is not None and k > vocab:
                        raise UserError(f"--top-k-cache {k} is larger than the vocabulary ({vocab})")
                    k = k or min(DEFAULT_TOP_K, vocab)
                    writers = {
                        f: _NpyWriter(
                            tmp / f"{f}.npy", (n, t, k) if f.startswith("topk") else (n, t), self.DTYPES[f]
                        )
                        for f in self.FIELDS
                    }
                stats = reference_stats(lp, w[1:], k)
                mx.eval(stats)
                for f in self.FIELDS:
                    writers[f].append(np.array(stats[f]))
                progress.update()
            arrays = {f: wr.finish() for f, wr in writers.items()}
            meta = dict(
                meta,
                format=CACHE_FORMAT,
                version=CACHE_VERSION,
                top_k=k,
                vocab_size=vocab,
                seq_len=int(windows.shape[1]),
                num_windows=int(n),
                arrays=arrays,
            )
            with open(tmp / "meta.json", "x") as fh:
                fh.write(json.dumps(meta, indent=2))
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(tmp)
            os.rename(tmp, self.path)  # the publication: atomic, and only of a whole cache
            _fsync_dir(self.path.parent)
        except BaseException as e:
            for wr in writers.values():
                wr.file.close()
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                raise UserError(f"cannot write the reference cache {self.path}: {e.strerror or e}") from None
            raise


def compare_against_cache(
    model, cache: ReferenceCache, windows: np.ndarray, progress: Progress, kv: Optional[dict] = None
):
    """Run the build over the cached windows; per-position arrays (see ``summarize``)."""
    ref = cache.load()
    vocab = cache.meta()["vocab_size"]
    rows = []
    for i in range(windows.shape[0]):
        w = mx.array(windows[i])
        lp = log_probs(model, w, kv)
        if lp.shape[-1] != vocab:
            raise UserError(f"the build's vocabulary ({lp.shape[-1]}) differs from the reference's ({vocab})")
        r = {f: mx.array(np.asarray(ref[f][i])) for f in ReferenceCache.FIELDS}
        rows.append(compare_position(r, lp, w[1:]))
        progress.update()
    return _concat(rows)


def compare_side_by_side(ref_model, build_model, windows: np.ndarray, k: int):
    """Both models in memory at once, no cache: the oracle for the cached path in tests."""
    rows = []
    for i in range(windows.shape[0]):
        w = mx.array(windows[i])
        r = reference_stats(log_probs(ref_model, w), w[1:], k)
        rows.append(compare_position(r, log_probs(build_model, w), w[1:]))
    return _concat(rows)


# --------------------------------------------------------------------------- orchestration


def load_model(path: Path, fused: bool = False, group=None):
    """The mlx-lm model at ``path`` (weights evaluated), optionally with moequant's fused
    paths patched in (``moequant.patch``: on the CPU, the MoE blocks of a window run the
    batched ``moe_prefill``, the quantized linear layers ``quantized_linear`` and the MLA
    attention float32 ``mla_attention``). With a distributed ``group`` of more than one
    rank the model is pipeline-loaded: this rank holds its share of the layers (mlx-lm's
    ``sharded_load``)."""
    if group is not None and group.size() > 1:
        from mlx_lm.utils import sharded_load

        try:
            model, _ = sharded_load(str(path), pipeline_group=group)
        except (ValueError, OSError) as e:
            raise UserError(
                f"{path}: cannot pipeline-load the model across {group.size()} ranks: {e}"
            ) from None
    else:
        from mlx_lm.utils import load_model as mlx_load_model

        model, _ = mlx_load_model(Path(path))
    if fused:
        import moequant

        patch = getattr(moequant, "patch", None)
        if patch is None:
            raise UserError("--fused: this moequant build has no fused MoE path (moequant.patch)")
        # Everything, as `moequant generate` runs a model. These paths accumulate in
        # float32 where MLX's CPU kernels round bf16 builds' intermediate sums to bf16, so
        # a bf16 report moves by bf16 rounding noise: on the tiny presets both it and
        # mlx-lm's bf16 paths stay within 0.5 SE of the float32-activation report
        # (test_eval_presets); float32 builds agree to float32 noise (test_eval_models).
        # And MLX's CPU kernels make a 2048-token window ~30x slower.
        patch(model)
    return model


def _check_model_dir(path: str, arg: str) -> Tuple[Path, dict]:
    """The model directory and its parsed config.json, or a user error naming ``arg``."""
    from .mlx_lm_cli import check_model_dir

    return Path(path), check_model_dir(path, arg)


def _config_int(config: dict, key: str) -> Optional[int]:
    """A positive integer of the model config (top level, or text_config for Kimi-K2.5)."""
    for c in (config, config.get("text_config")):
        if isinstance(c, dict) and _is_int(c.get(key)) and c[key] > 0:
            return c[key]
    return None


def _check_writable(path: Path, arg: str, given) -> None:
    """``path`` may not exist yet: its nearest existing ancestor must be a writable directory."""
    q = path
    while not os.path.lexists(q) and q != q.parent:
        q = q.parent
    if not q.is_dir():
        raise UserError(f"{arg} {given}: {q} is not a directory")
    if not os.access(q, os.W_OK | os.X_OK):
        raise UserError(f"{arg} {given}: {q} is not writable")


def validate_arguments(
    ref_dir,
    model_dir,
    data=None,
    seq_len=2048,
    num_samples=50,
    seed=0,
    top_k=None,
    cache_dir=None,
    near_tie=DEFAULT_NEAR_TIE,
    output=None,
):
    """Every argument of ``evaluate`` (and --output), checked before anything heavy runs:
    a user error naming the argument. Returns (reference dir, its config, build dir)."""

    def integer(name, value, low):
        if not _is_int(value) or value < low:
            raise UserError(f"{name} {value!r}: must be an integer >= {low}")

    integer("--seq-len", seq_len, 2)
    integer("--num-samples", num_samples, 1)
    integer("--seed", seed, 0)
    if top_k is not None:
        integer("--top-k-cache", top_k, 2)
    if isinstance(near_tie, bool) or not isinstance(near_tie, (int, float)) or not 0 <= near_tie <= 1:
        raise UserError(f"--near-tie {near_tie!r}: must be a probability in [0, 1]")
    ref_path, ref_cfg = _check_model_dir(ref_dir, "--ref")
    build_path, _ = _check_model_dir(model_dir, "--model")
    vocab = _config_int(ref_cfg, "vocab_size")
    if top_k is not None and vocab is not None and top_k > vocab:
        raise UserError(
            f"--top-k-cache {top_k} is larger than the reference's vocabulary "
            f"({vocab}, {ref_path / 'config.json'})"
        )
    max_pos = _config_int(ref_cfg, "max_position_embeddings")
    if max_pos is not None and seq_len > max_pos:
        raise UserError(
            f"--seq-len {seq_len} is longer than the reference's "
            f"max_position_embeddings ({max_pos}, {ref_path / 'config.json'})"
        )
    if data is not None and not (os.path.isfile(data) or os.path.isdir(data)):
        raise UserError(
            f"--data {data}: no such file or directory"
            if not os.path.lexists(data)
            else f"--data {data}: not a regular file or a directory"
        )
    if cache_dir is not None:
        if os.path.lexists(cache_dir) and not os.path.isdir(cache_dir):
            raise UserError(f"--cache {cache_dir}: exists and is not a directory")
        if not os.path.isdir(cache_dir):  # an existing cache may be read from a read-only place
            _check_writable(Path(cache_dir).resolve(), "--cache", cache_dir)
    else:
        _check_writable(cache_root(), "cache directory ($MOEQUANT_CACHE or ~/.cache/moequant)", cache_root())
    if output is not None:
        check_output(output)
    return ref_path, ref_cfg, build_path


def check_output(output: str) -> None:
    if os.path.isdir(output):
        raise UserError(f"--output {output}: is a directory")
    parent = Path(output).parent
    if not parent.is_dir():
        raise UserError(f"--output {output}: the directory {parent} does not exist")
    _check_writable(parent, "--output", output)


def _load_tokenizer(path: Path, arg: str, trust_remote_code: bool = False):
    from mlx_lm.utils import load_tokenizer

    try:
        return load_tokenizer(path, {"trust_remote_code": True} if trust_remote_code else None)
    except Exception as e:  # transformers raises many types for a missing/broken tokenizer
        raise UserError(f"{arg} {path}: cannot load its tokenizer ({e})") from None


def default_cache_dir(ref_fp: str, windows_fp: str, top_k: Optional[int]) -> Path:
    key = _sha(ref_fp.encode(), windows_fp.encode(), str(top_k or DEFAULT_TOP_K).encode())
    return cache_root() / "eval" / key[:24]


def cache_bytes(num_windows: int, seq_len: int, k: int) -> int:
    """Disk size of a reference cache (8 bytes per top-k entry, 8 per position), headers aside."""
    return num_windows * (seq_len - 1) * (8 * k + 8)


def open_or_build(
    cache: ReferenceCache, want: dict, top_k: Optional[int], build: Callable[[], None]
) -> Tuple[dict, bool]:
    """The validated cache for this run, and whether it was reused. Readers take the lock
    shared; a builder takes it exclusively, so a run that arrives during a build waits,
    then reuses what was published."""
    with cache.locked(exclusive=False):
        found = cache.probe(want, top_k)
    if isinstance(found, tuple):
        return found[0], True
    with cache.locked(exclusive=True):
        cache.remove_stale()
        found = cache.probe(want, top_k)  # another run may have published it meanwhile
        if isinstance(found, tuple):
            return found[0], True
        if found is not None:
            print(f"moequant eval: rebuilding the reference cache: {found}", file=sys.stderr)
            cache.discard()
        build()
        return cache.open()[0], False


def evaluate(
    ref_dir: str,
    model_dir: str,
    data: Optional[str] = None,
    seq_len: int = 2048,
    num_samples: int = 50,
    seed: int = 0,
    top_k: Optional[int] = None,
    cache_dir: Optional[str] = None,
    near_tie: float = DEFAULT_NEAR_TIE,
    fused: bool = True,
    trust_remote_code: bool = False,
    progress: bool = True,
    loader: Callable = load_model,
    group=None,
    kv: Optional[dict] = None,
) -> Optional[dict]:
    """The whole evaluation; returns the JSON report. The reference is loaded, run and
    released before the build is loaded (``loader`` is injectable for tests). ``fused``
    runs both models with ``moequant.patch`` (the same numbers within float32 noise,
    much faster on the CPU); a reused cache keeps the reference's pass as it was made.

    Under ``mlx.launch`` (an MLX distributed group of more than one process) each model
    is pipeline-loaded across the ranks, rank 0 alone holds the reference cache and
    computes the report (the others return None), see ``_evaluate_distributed``."""
    from . import distributed

    group = group if group is not None else distributed.world()
    if group.size() > 1:
        return _evaluate_distributed(
            group,
            ref_dir,
            model_dir,
            data,
            seq_len,
            num_samples,
            seed,
            top_k,
            cache_dir,
            near_tie,
            fused,
            trust_remote_code,
            progress,
            loader,
            kv,
        )
    p = _prepare(
        ref_dir, model_dir, data, seq_len, num_samples, seed, top_k, cache_dir, near_tie, trust_remote_code
    )
    windows = p["windows"]
    ref_fp = model_fingerprint(p["ref_path"], progress)
    cache = _open_cache(p, ref_fp, cache_dir, top_k)
    ids = {"reference": ref_fp, "tokenizer": p["tok_fp"], "windows": p["win_fp"]}
    want = dict(ids, seq_len=int(windows.shape[1]), num_windows=int(windows.shape[0]))

    t0 = time.perf_counter()
    meta, reused = open_or_build(
        cache,
        want,
        top_k,
        lambda: _run_reference(
            p["ref_path"],
            cache,
            windows,
            top_k,
            p["k_planned"],
            loader,
            fused,
            dict(ids, fused=fused),
            progress,
        ),
    )
    t_ref = time.perf_counter() - t0

    t0 = time.perf_counter()
    per_pos = _run_build(p["build_path"], cache, windows, loader, fused, progress, kv)
    t_build = time.perf_counter() - t0
    return _report(
        p, per_pos, cache, meta, reused, fused, data, seed, num_samples, near_tie, t_ref, t_build, kv
    )


def _prepare(
    ref_dir, model_dir, data, seq_len, num_samples, seed, top_k, cache_dir, near_tie, trust_remote_code
) -> dict:
    """Arguments checked, tokenizers compared, token windows made: everything before a
    model is loaded."""
    ref_path, ref_cfg, build_path = validate_arguments(
        ref_dir, model_dir, data, seq_len, num_samples, seed, top_k, cache_dir, near_tie
    )
    ref_tok = _load_tokenizer(ref_path, "--ref", trust_remote_code)
    tok_fp = tokenizer_fingerprint(ref_tok)
    if tokenizer_fingerprint(_load_tokenizer(build_path, "--model", trust_remote_code)) != tok_fp:
        raise UserError(
            f"--model {model_dir}: its tokenizer differs from the reference's ({ref_dir}); "
            "KL is only defined over the same vocabulary"
        )
    docs = load_documents(data, ref_tok)
    data_name = f"--data {data}" if data else "the default corpus"
    windows = make_windows(docs, ref_tok, seq_len, num_samples, seed, data_name)
    k_planned = top_k or min(DEFAULT_TOP_K, _config_int(ref_cfg, "vocab_size") or DEFAULT_TOP_K)
    return {
        "ref_path": ref_path,
        "build_path": build_path,
        "tok_fp": tok_fp,
        "windows": windows,
        "win_fp": windows_fingerprint(windows),
        "k_planned": k_planned,
    }


def _open_cache(p: dict, ref_fp: str, cache_dir, top_k) -> "ReferenceCache":
    owned = cache_dir is None
    return ReferenceCache(
        Path(cache_dir).resolve() if cache_dir else default_cache_dir(ref_fp, p["win_fp"], top_k), owned=owned
    )


def _report(
    p, per_pos, cache, meta, reused, fused, data, seed, num_samples, near_tie, t_ref, t_build, kv=None
) -> dict:
    windows = p["windows"]
    report = summarize(per_pos, near_tie)
    return {
        "moequant_eval": CACHE_VERSION,
        "reference": str(p["ref_path"]),
        "model": str(p["build_path"]),
        "fused": fused,
        "kv_cache": kv,
        "data": {
            "source": data or "python-stdlib (default corpus)",
            "seed": seed,
            "seq_len": int(windows.shape[1]),
            "windows": int(windows.shape[0]),
            "requested_windows": num_samples,
        },
        "cache": {
            "path": str(cache.path),
            "reused": reused,
            "top_k": meta["top_k"],
            "vocab_size": meta["vocab_size"],
        },
        "definitions": {
            "kl": KL_DEFINITION,
            "flip": FLIP_DEFINITION,
            "near_tie": near_tie_definition(near_tie),
            "near_tie_threshold": near_tie,
            "standard_error": SE_DEFINITION,
        },
        **report,
        "seconds": {"reference": t_ref, "build": t_build},
    }


def _evaluate_distributed(
    group,
    ref_dir,
    model_dir,
    data,
    seq_len,
    num_samples,
    seed,
    top_k,
    cache_dir,
    near_tie,
    fused,
    trust_remote_code,
    progress,
    loader,
    kv=None,
):
    """``evaluate`` across the ranks of ``group``. Every rank checks its own arguments,
    files and data, and all ranks must agree on them (``distributed.agree``: the models'
    config and weight index, the tokenizer, the windows, the options) before anything is
    loaded. Each model is pipeline-loaded across the ranks (one model in memory at a
    time on every rank); every forward pass ends with the logits on every rank (mlx-lm's
    pipeline gathers them), rank 0 writes the reference cache (once, under its lock) and
    compares the build against it, the others only run their layers."""
    from . import distributed

    what = "moequant eval"
    leader = group.rank() == 0
    p, error = None, None
    try:
        p = _prepare(
            ref_dir,
            model_dir,
            data,
            seq_len,
            num_samples,
            seed,
            top_k,
            cache_dir if leader else None,
            near_tie,
            trust_remote_code,
        )
        facts = {
            "reference model (config.json and weight index)": distributed.model_identity(p["ref_path"]),
            "build model (config.json and weight index)": distributed.model_identity(p["build_path"]),
            "tokenizer": p["tok_fp"],
            "token windows (--data, --seq-len, --num-samples, --seed)": p["win_fp"],
            "--top-k-cache": top_k,
            "--near-tie": near_tie,
            "--fused": fused,
            "--kv-bits and its options": kv,
        }
    except UserError as e:
        facts, error = {}, e
    distributed.agree(group, facts, error, what)
    windows = p["windows"]
    show = progress and leader
    state: dict = {}

    def decide():
        # Rank 0: is there a reusable reference cache? If not, take the build lock and
        # keep it until the cache is published.
        ref_fp = model_fingerprint(p["ref_path"], show)
        cache = state["cache"] = _open_cache(p, ref_fp, cache_dir, top_k)
        ids = {"reference": ref_fp, "tokenizer": p["tok_fp"], "windows": p["win_fp"]}
        state["want"] = dict(ids, seq_len=int(windows.shape[1]), num_windows=int(windows.shape[0]))
        state["meta"] = dict(ids, fused=fused)
        with cache.locked(exclusive=False):
            if isinstance(cache.probe(state["want"], top_k), tuple):
                return "reuse"
        stack = state["lock"] = contextlib.ExitStack()
        stack.enter_context(cache.locked(exclusive=True))
        cache.remove_stale()
        found = cache.probe(state["want"], top_k)
        if isinstance(found, tuple):
            return "reuse"
        if found is not None:
            print(f"moequant eval: rebuilding the reference cache: {found}", file=sys.stderr)
            cache.discard()
        _check_cache_space(cache, windows, p["k_planned"])
        return "build"

    splits = {}
    t0 = time.perf_counter()
    try:
        action = distributed.lead(group, decide, what)
        if action == "build":
            model = loader(p["ref_path"], fused=fused, group=group)
            splits["reference"] = distributed.gather(group, distributed.layer_split(model))
            bar = Progress(windows.shape[0], "reference", show, every=0)
            try:
                if leader:
                    state["cache"].write(model, windows, top_k, state["meta"], bar)
                else:
                    _follow(model, windows)
            finally:
                bar.close()
                del model
                gc.collect()
                mx.clear_cache()
    finally:
        if "lock" in state:
            state["lock"].close()
    reused = action == "reuse"
    meta = state["cache"].open()[0] if leader else None
    t_ref = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = loader(p["build_path"], fused=fused, group=group)
    splits["build"] = distributed.gather(group, distributed.layer_split(model))
    bar = Progress(windows.shape[0], "build    ", show, every=0)
    try:
        per_pos = (
            compare_against_cache(model, state["cache"], windows, bar, kv)
            if leader
            else _follow(model, windows, kv)
        )
    finally:
        bar.close()
        del model
        gc.collect()
        mx.clear_cache()
    t_build = time.perf_counter() - t0
    if not leader:
        return None
    r = _report(
        p, per_pos, state["cache"], meta, reused, fused, data, seed, num_samples, near_tie, t_ref, t_build, kv
    )
    r["distributed"] = {
        "ranks": group.size(),
        "mode": "pipeline",
        "layers_per_rank": splits,
        "layers_note": "[start, end) of the decoder layers each rank held "
        "(rank order); absent for a reused reference cache",
    }
    return r


def _follow(model, windows: np.ndarray, kv: Optional[dict] = None) -> None:
    """A non-zero rank's share of a pass: the same forward passes as rank 0, in the
    same order (each one's collectives pair with rank 0's)."""
    for i in range(windows.shape[0]):
        mx.eval(log_probs(model, mx.array(windows[i]), kv))


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _check_cache_space(cache, windows, k_planned) -> None:
    """Refuse a cache that cannot fit before the (possibly huge) reference is loaded."""
    need = cache_bytes(windows.shape[0], windows.shape[1], k_planned)
    where = cache.path.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = None
    if free is not None and need > free:
        raise UserError(
            f"the reference cache needs {_size(need)}, {where} has "
            f"{_size(free)} free (lower --num-samples, --seq-len or "
            "--top-k-cache, or give --cache elsewhere)"
        )


def _run_reference(path, cache, windows, k, k_planned, loader, fused, meta, show):
    _check_cache_space(cache, windows, k_planned)
    # Locals die with this frame, so the reference is released when it returns.
    model = loader(path, fused=fused)
    bar = Progress(windows.shape[0], "reference", show, every=0)
    try:
        cache.write(model, windows, k, meta, bar)
    finally:
        bar.close()
        del model
        gc.collect()
        mx.clear_cache()


def _run_build(path, cache, windows, loader, fused, show, kv=None):
    model = loader(path, fused=fused)
    bar = Progress(windows.shape[0], "build    ", show, every=0)
    try:
        return compare_against_cache(model, cache, windows, bar, kv)
    finally:
        bar.close()
        del model
        gc.collect()
        mx.clear_cache()


# --------------------------------------------------------------------------- report


def format_report(r: dict) -> str:
    kl, fl, pp = r["kl"], r["flips"], r["perplexity"]
    rows = [
        (
            "positions",
            f"{r['positions']} ({r['windows']} windows x {r['data']['seq_len'] - 1})"
            + (
                f", the data holds only {r['windows']} of the "
                f"{r['data']['requested_windows']} requested windows"
                if r["windows"] < r["data"]["requested_windows"]
                else ""
            ),
        ),
        (
            "KL(ref||build) mean",
            f"{kl['mean']:.4f} ± {kl['se']:.4f} nats (± {kl['se_windows']:.4f} over windows)",
        ),
        ("KL median", f"{kl['median']:.4f}"),
        ("KL mean on flipped", f"{kl['mean_flipped']:.4f}"),
        ("KL mean on unflipped", f"{kl['mean_unflipped']:.4f}"),
        ("top-1 flip rate", f"{100 * fl['rate']:.2f}% ({fl['count']}/{fl['positions']})"),
        ("at flips: ref p(ref pick)", f"{fl['ref_p_ref_pick']:.3f}"),
        ("at flips: build p(build pick)", f"{fl['build_p_build_pick']:.3f}"),
        (
            "at flips: near-ties",
            f"{fl['near_ties']} ({100 * fl['near_tie_share']:.1f}%)" if fl["count"] else "-",
        ),
        ("perplexity reference", f"{pp['reference']['ppl']:.4f} ± {pp['reference']['se']:.4f}"),
        ("perplexity build", f"{pp['build']['ppl']:.4f} ± {pp['build']['se']:.4f}"),
    ]
    width = max(len(a) for a, _ in rows)
    lines = [
        f"reference: {r['reference']}",
        f"build:     {r['model']}",
        f"data:      {r['data']['source']} (seed {r['data']['seed']}), "
        f"top-{r['cache']['top_k']} cache{' (reused)' if r['cache']['reused'] else ''}",
        "",
    ]
    if r.get("kv_cache"):
        kv = r["kv_cache"]
        lines.insert(
            -1,
            f"build KV:  {kv['bits']}-bit g{kv['group_size']} latent cache after "
            f"{kv['quantized_kv_start']} tokens, {kv['prefill_step_size']} tokens per call",
        )
    lines += [f"{a:<{width}}  {b}" for a, b in rows]
    lines += [
        "",
        f"near-tie: {r['definitions']['near_tie']}",
        "KL uses the reference's top-k plus one tail bucket (a lower bound; exact at k = vocab);",
        "± is the SE over positions. Perplexity alone hides drift: read it with the KL and flips.",
    ]
    return "\n".join(lines)


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# --------------------------------------------------------------------------- CLI


def add_arguments(p):
    p.add_argument("--ref", required=True, help="The reference MLX model directory.")
    p.add_argument("--model", required=True, help="The build to evaluate (MLX model directory).")
    p.add_argument(
        "--data",
        default=None,
        help="A text file, a directory of text files, or a .jsonl of chat "
        "{'messages': [...]} (or {'text': ...}) lines. Default: the Python "
        "standard library's sources (offline).",
    )
    p.add_argument("--seq-len", type=int, default=2048, help="Tokens per window (default 2048).")
    p.add_argument("--num-samples", type=int, default=50, help="Windows (default 50).")
    p.add_argument("--seed", type=int, default=0, help="Document shuffle seed (default 0).")
    p.add_argument(
        "--top-k-cache",
        type=int,
        default=None,
        help=f"Reference top-k kept per position (default {DEFAULT_TOP_K}, "
        "or what a reused cache holds). The cache takes 8 bytes per entry: "
        "50 x 2048 positions x 1024 is about 0.84 GB.",
    )
    p.add_argument(
        "--cache",
        default=None,
        help="Reference cache directory (default: $MOEQUANT_CACHE/eval/<hash>, "
        "~/.cache/moequant/eval/<hash> when unset); reused when it matches, "
        "refused when damaged. Its lock file (.NAME.lock) and, while building, "
        "a scratch directory go beside it.",
    )
    p.add_argument(
        "--near-tie",
        type=float,
        default=DEFAULT_NEAR_TIE,
        help=f"Near-tie threshold in probability (default {DEFAULT_NEAR_TIE}).",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--fused",
        dest="fused",
        action="store_true",
        default=True,
        help="Run the reference and the build with moequant's fused paths (moequant.patch; the default).",
    )
    g.add_argument(
        "--no-fused",
        dest="fused",
        action="store_false",
        help="Run both with mlx-lm's own paths (slow on a CPU). MOEQUANT_FUSED=0 does the same.",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="Allow the tokenizers' custom code (Kimi's tiktoken tokenizer needs it).",
    )
    k = p.add_argument_group(
        "KV cache of the build's pass (mlx-lm's flags; the reference runs without a cache)"
    )
    k.add_argument(
        "--kv-bits",
        type=int,
        default=None,
        choices=list(KV_CACHE_BITS),
        help="Run the build through a 4/8-bit MLA latent KV cache, prefilled in steps "
        "of --prefill-step-size tokens. With --ref equal to --model this measures "
        "what the quantized cache costs against the 16-bit one.",
    )
    k.add_argument("--kv-group-size", type=int, default=64, help="KV cache group size (default 64).")
    k.add_argument(
        "--quantized-kv-start",
        type=int,
        default=0,
        help="Tokens cached in 16 bits before the cache is quantized (default 0).",
    )
    k.add_argument(
        "--prefill-step-size",
        type=int,
        default=256,
        help="Tokens per model call with --kv-bits (default 256).",
    )
    p.add_argument("--output", default=None, help="Write the full report as JSON here.")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")


def run(args) -> int:
    if args.output is not None:
        check_output(args.output)
    from .mlx_lm_patch import env_enabled

    kv = None
    if args.kv_bits is not None:
        from .kv_cache import check_kv_args
        from .mlx_lm_cli import _read_config

        check_kv_args(args, _read_config(args.model))
        if args.prefill_step_size < 1:
            raise UserError(f"--prefill-step-size must be >= 1; got {args.prefill_step_size}")
        kv = dict(
            bits=args.kv_bits,
            group_size=args.kv_group_size,
            quantized_kv_start=args.quantized_kv_start,
            prefill_step_size=args.prefill_step_size,
        )
    report = evaluate(
        args.ref,
        args.model,
        data=args.data,
        seq_len=args.seq_len,
        num_samples=args.num_samples,
        seed=args.seed,
        top_k=args.top_k_cache,
        cache_dir=args.cache,
        near_tie=args.near_tie,
        fused=args.fused and env_enabled(),
        trust_remote_code=args.trust_remote_code,
        progress=not args.no_progress,
        kv=kv,
    )
    if report is None:  # a non-zero rank of a distributed run: rank 0 reports
        return 0
    print(format_report(report))
    if args.output:
        out = Path(args.output)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_json_safe(report), indent=2) + "\n")
        os.replace(tmp, out)  # never a half-written report
        print(f"\nreport written to {args.output}")
    return 0
