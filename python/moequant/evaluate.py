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
fingerprints of the reference, the tokenizer and the token windows and is reused only
when all three match.
"""

from __future__ import annotations

import gc
import glob
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

CACHE_FORMAT = "moequant-eval-reference-cache"
CACHE_VERSION = 1
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


def _user_error(msg: str) -> Exception:
    from .cli import UserError

    return UserError(msg)


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
        raise _user_error(f"{where}: 'messages' must be a list of {{role, content}} objects")
    if getattr(tokenizer, "chat_template", None) is None:
        raise _user_error(f"{where}: chat messages need a chat template, the tokenizer has none")
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
        raise _user_error(f"--data {data}: no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        docs = [(str(p), lambda p=p: _read_text(p) or "") for p in files]
        if not docs:
            raise _user_error(f"--data {data}: the directory holds no files")
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
                    raise _user_error(f"{where}: not valid JSON ({e.msg})") from None
                if isinstance(obj, dict) and "messages" in obj:
                    text = _render_chat(tokenizer, obj["messages"], where)
                elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
                    text = obj["text"]
                else:
                    raise _user_error(f"{where}: expected an object with 'messages' or 'text'")
                docs.append((where, lambda t=text: t))
        return docs
    text = _read_text(path)
    if text is None:
        raise _user_error(f"--data {data}: not a UTF-8 text file")
    return [(str(path), lambda: text)]


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
        raise _user_error(f"--seq-len {seq_len}: must be at least 2")
    if num_samples < 1:
        raise _user_error(f"--num-samples {num_samples}: must be at least 1")
    order = np.random.default_rng(seed).permutation(len(docs))
    need = seq_len * num_samples
    tokens: List[int] = []
    for i in order:
        text = docs[i][1]()
        if text:
            tokens.extend(tokenizer.encode(text, add_special_tokens=False))
        if len(tokens) >= need:
            break
    n = min(num_samples, len(tokens) // seq_len)
    if n == 0:
        raise _user_error(
            f"--seq-len {seq_len} is larger than {data_name} ({len(tokens)} tokens)"
        )
    return np.asarray(tokens[: n * seq_len], dtype=np.int32).reshape(n, seq_len)


# --------------------------------------------------------------------------- fingerprints


def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()


def model_fingerprint(model_dir: Path, edge_bytes: int = 1 << 20) -> str:
    """config.json, plus each weight file's name, size and first/last ``edge_bytes``:
    cheap on a 600 GB checkpoint, yet it changes when the weights do."""
    parts = [(model_dir / "config.json").read_bytes()]
    for f in sorted(glob.glob(str(model_dir / "*.safetensors"))):
        size = os.path.getsize(f)
        with open(f, "rb") as fh:
            head = fh.read(edge_bytes)
            fh.seek(max(0, size - edge_bytes))
            tail = fh.read(edge_bytes)
        parts += [os.path.basename(f).encode(), str(size).encode(), head, tail]
    return _sha(*parts)


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return _sha(json.dumps(vocab, ensure_ascii=False).encode())


def windows_fingerprint(windows: np.ndarray) -> str:
    return _sha(str(windows.shape).encode(), np.ascontiguousarray(windows, np.int32).tobytes())


# --------------------------------------------------------------------------- per-position math


def log_probs(model, window: mx.array) -> mx.array:
    """(T,) tokens -> (T-1, V) float32 log-probabilities of tokens 1..T-1."""
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


# --------------------------------------------------------------------------- progress


class Progress:
    """A one-line text progress bar on stderr."""

    def __init__(self, total: int, label: str, enabled: bool = True, stream=None):
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = stream or sys.stderr
        self.done, self.t0 = 0, time.perf_counter()
        self._draw()

    def _draw(self):
        if not self.enabled:
            return
        width = 30
        filled = int(width * self.done / max(1, self.total))
        el = time.perf_counter() - self.t0
        eta = el / self.done * (self.total - self.done) if self.done else 0.0
        self.stream.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
            f"{self.done}/{self.total} {el:.0f}s eta {eta:.0f}s"
        )
        self.stream.flush()

    def update(self, n: int = 1):
        self.done += n
        self._draw()

    def close(self):
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


# --------------------------------------------------------------------------- passes


class ReferenceCache:
    """The reference's per-position top-k on disk: meta.json plus one .npy per field
    (memory-mapped, so a 1 GB cache is never read whole). meta.json is written last;
    a directory without it is an unfinished run and is rebuilt."""

    FIELDS = ("topk_ids", "topk_logp", "tail_logp", "target_logp")

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def meta_path(self) -> Path:
        return self.path / "meta.json"

    def exists(self) -> bool:
        return self.meta_path.exists()

    def meta(self) -> dict:
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise _user_error(f"{self.meta_path}: unreadable reference cache ({e})") from None
        if meta.get("format") != CACHE_FORMAT or meta.get("version") != CACHE_VERSION:
            raise _user_error(f"{self.meta_path}: not a moequant eval cache of version {CACHE_VERSION}")
        return meta

    def check(self, reference: str, tokenizer: str, windows: str, top_k: Optional[int]) -> dict:
        """The cache's metadata if it was made for this reference, tokenizer and data."""
        meta = self.meta()
        for key, want, what in (
            ("reference", reference, "another reference model (its config or weights differ)"),
            ("tokenizer", tokenizer, "a reference with another tokenizer"),
            ("windows", windows, "other data (the token windows differ: --data, --seq-len, "
             "--num-samples or --seed)"),
        ):
            if meta[key] != want:
                raise _user_error(f"{self.meta_path}: this cache was made for {what}")
        if top_k is not None and meta["top_k"] != top_k:
            raise _user_error(
                f"{self.meta_path}: the cache holds top-{meta['top_k']}, not --top-k-cache {top_k}"
            )
        return meta

    def load(self) -> Dict[str, np.ndarray]:
        return {f: np.load(self.path / f"{f}.npy", mmap_mode="r") for f in self.FIELDS}

    def write(self, model, windows: np.ndarray, k: Optional[int], meta: dict,
              progress: Progress) -> None:
        """Run the reference over ``windows`` and store its top-k (k=None: the default,
        capped at the vocabulary size)."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.meta_path.exists():
            self.meta_path.unlink()
        n, t = windows.shape[0], windows.shape[1] - 1
        out = None
        for i in range(n):
            w = mx.array(windows[i])
            lp = log_probs(model, w)
            if out is None:  # the vocabulary size is known only now
                vocab = lp.shape[-1]
                if k is not None and k > vocab:
                    raise _user_error(f"--top-k-cache {k} is larger than the vocabulary ({vocab})")
                k = k or min(DEFAULT_TOP_K, vocab)
                shapes = {"topk_ids": (n, t, k), "topk_logp": (n, t, k)}
                out = {
                    f: np.lib.format.open_memmap(
                        self.path / f"{f}.npy", mode="w+", shape=shapes.get(f, (n, t)),
                        dtype=np.int32 if f == "topk_ids" else np.float32,
                    )
                    for f in self.FIELDS
                }
            stats = reference_stats(lp, w[1:], k)
            mx.eval(stats)
            for f in self.FIELDS:
                out[f][i] = np.array(stats[f])
            progress.update()
        for a in out.values():
            a.flush()
        del out
        meta = dict(meta, format=CACHE_FORMAT, version=CACHE_VERSION, top_k=k, vocab_size=vocab,
                    seq_len=int(windows.shape[1]), num_windows=int(n))
        self.meta_path.write_text(json.dumps(meta, indent=2))


def compare_against_cache(model, cache: ReferenceCache, windows: np.ndarray, progress: Progress):
    """Run the build over the cached windows; per-position arrays (see ``summarize``)."""
    ref = cache.load()
    vocab = cache.meta()["vocab_size"]
    rows = []
    for i in range(windows.shape[0]):
        w = mx.array(windows[i])
        lp = log_probs(model, w)
        if lp.shape[-1] != vocab:
            raise _user_error(
                f"the build's vocabulary ({lp.shape[-1]}) differs from the reference's ({vocab})"
            )
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


def load_model(path: Path, fused: bool = False):
    """The mlx-lm model at ``path`` (weights evaluated), optionally with moequant's fused
    MoE path patched in (``moequant.patch``: on the CPU, every MoE call of a window runs
    the batched ``moe_prefill``)."""
    from mlx_lm.utils import load_model as mlx_load_model

    model, _ = mlx_load_model(Path(path))
    if fused:
        import moequant

        patch = getattr(moequant, "patch", None)
        if patch is None:
            raise _user_error("--fused: this moequant build has no fused MoE path (moequant.patch)")
        # MoE blocks only: the linear-layer patch accumulates in float32 where MLX's CPU
        # kernel rounds bf16 builds' sums to bf16, which moves the report by more than
        # rounding noise on bf16 builds (tiny presets: KL 0.6 SE with both models
        # patched, 0.005 SE with the MoE blocks alone; test_eval_presets).
        patch(model, linear=False)
    return model


def _check_model_dir(path: str, arg: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise _user_error(f"{arg} {path}: no such directory")
    if not (p / "config.json").is_file():
        raise _user_error(f"{arg} {path}: no config.json (not an MLX model directory)")
    if not glob.glob(str(p / "*.safetensors")):
        raise _user_error(f"{arg} {path}: no .safetensors weight files")
    return p


def _load_tokenizer(path: Path, arg: str, trust_remote_code: bool = False):
    from mlx_lm.utils import load_tokenizer

    try:
        return load_tokenizer(path, {"trust_remote_code": True} if trust_remote_code else None)
    except Exception as e:  # transformers raises many types for a missing/broken tokenizer
        raise _user_error(f"{arg} {path}: cannot load its tokenizer ({e})") from None


def default_cache_dir(ref_fp: str, windows_fp: str, top_k: Optional[int]) -> Path:
    root = Path(os.environ.get("MOEQUANT_CACHE", Path.home() / ".cache" / "moequant"))
    key = _sha(ref_fp.encode(), windows_fp.encode(), str(top_k or DEFAULT_TOP_K).encode())
    return root / "eval" / key[:24]


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
) -> dict:
    """The whole evaluation; returns the JSON report. The reference is loaded, run and
    released before the build is loaded (``loader`` is injectable for tests). ``fused``
    runs both models with ``moequant.patch`` (the same numbers within float32 noise,
    much faster on the CPU); a reused cache keeps the reference's pass as it was made."""
    ref_path = _check_model_dir(ref_dir, "--ref")
    build_path = _check_model_dir(model_dir, "--model")
    ref_tok = _load_tokenizer(ref_path, "--ref", trust_remote_code)
    tok_fp = tokenizer_fingerprint(ref_tok)
    if tokenizer_fingerprint(_load_tokenizer(build_path, "--model", trust_remote_code)) != tok_fp:
        raise _user_error(
            f"--model {model_dir}: its tokenizer differs from the reference's ({ref_dir}); "
            "KL is only defined over the same vocabulary"
        )
    docs = load_documents(data, ref_tok)
    data_name = f"--data {data}" if data else "the default corpus"
    windows = make_windows(docs, ref_tok, seq_len, num_samples, seed, data_name)
    del ref_tok
    ref_fp, win_fp = model_fingerprint(ref_path), windows_fingerprint(windows)
    cache = ReferenceCache(Path(cache_dir) if cache_dir else default_cache_dir(ref_fp, win_fp, top_k))

    t0 = time.perf_counter()
    reused = cache.exists()
    if reused:
        meta = cache.check(ref_fp, tok_fp, win_fp, top_k)
    else:
        if top_k is not None and top_k < 2:
            raise _user_error(f"--top-k-cache {top_k}: must be at least 2")
        _run_reference(ref_path, cache, windows, top_k, loader, fused,
                       {"reference": ref_fp, "tokenizer": tok_fp, "windows": win_fp,
                        "fused": fused}, progress)
        meta = cache.meta()
    t_ref = time.perf_counter() - t0

    t0 = time.perf_counter()
    per_pos = _run_build(build_path, cache, windows, loader, fused, progress)
    t_build = time.perf_counter() - t0

    report = summarize(per_pos, near_tie)
    return {
        "moequant_eval": CACHE_VERSION,
        "reference": str(ref_path),
        "model": str(build_path),
        "fused": fused,
        "data": {"source": data or "python-stdlib (default corpus)", "seed": seed,
                 "seq_len": int(windows.shape[1]), "windows": int(windows.shape[0]),
                 "requested_windows": num_samples},
        "cache": {"path": str(cache.path), "reused": reused, "top_k": meta["top_k"],
                  "vocab_size": meta["vocab_size"]},
        "definitions": {"kl": KL_DEFINITION, "flip": FLIP_DEFINITION,
                        "near_tie": near_tie_definition(near_tie), "near_tie_threshold": near_tie,
                        "standard_error": SE_DEFINITION},
        **report,
        "seconds": {"reference": t_ref, "build": t_build},
    }


def _run_reference(path, cache, windows, k, loader, fused, meta, show):
    # Locals die with this frame, so the reference is released when it returns.
    model = loader(path, fused=fused)
    bar = Progress(windows.shape[0], "reference", show)
    try:
        cache.write(model, windows, k, meta, bar)
    finally:
        bar.close()
        del model
        gc.collect()
        mx.clear_cache()


def _run_build(path, cache, windows, loader, fused, show):
    model = loader(path, fused=fused)
    bar = Progress(windows.shape[0], "build    ", show)
    try:
        return compare_against_cache(model, cache, windows, bar)
    finally:
        bar.close()
        del model
        gc.collect()
        mx.clear_cache()


# --------------------------------------------------------------------------- report


def format_report(r: dict) -> str:
    kl, fl, pp = r["kl"], r["flips"], r["perplexity"]
    rows = [
        ("positions", f"{r['positions']} ({r['windows']} windows x {r['data']['seq_len'] - 1})"
                      + (f", the data holds only {r['windows']} of the "
                         f"{r['data']['requested_windows']} requested windows"
                         if r["windows"] < r["data"]["requested_windows"] else "")),
        ("KL(ref||build) mean", f"{kl['mean']:.4f} ± {kl['se']:.4f} nats "
                                f"(± {kl['se_windows']:.4f} over windows)"),
        ("KL median", f"{kl['median']:.4f}"),
        ("KL mean on flipped", f"{kl['mean_flipped']:.4f}"),
        ("KL mean on unflipped", f"{kl['mean_unflipped']:.4f}"),
        ("top-1 flip rate", f"{100 * fl['rate']:.2f}% ({fl['count']}/{fl['positions']})"),
        ("at flips: ref p(ref pick)", f"{fl['ref_p_ref_pick']:.3f}"),
        ("at flips: build p(build pick)", f"{fl['build_p_build_pick']:.3f}"),
        ("at flips: near-ties", f"{fl['near_ties']} ({100 * fl['near_tie_share']:.1f}%)"
         if fl["count"] else "-"),
        ("perplexity reference", f"{pp['reference']['ppl']:.4f} ± {pp['reference']['se']:.4f}"),
        ("perplexity build", f"{pp['build']['ppl']:.4f} ± {pp['build']['se']:.4f}"),
    ]
    width = max(len(a) for a, _ in rows)
    lines = [f"reference: {r['reference']}", f"build:     {r['model']}",
             f"data:      {r['data']['source']} (seed {r['data']['seed']}), "
             f"top-{r['cache']['top_k']} cache{' (reused)' if r['cache']['reused'] else ''}", ""]
    lines += [f"{a:<{width}}  {b}" for a, b in rows]
    lines += ["", f"near-tie: {r['definitions']['near_tie']}",
              "KL uses the reference's top-k plus one tail bucket (a lower bound; exact at k = vocab);",
              "± is the SE over positions. Perplexity alone hides drift: read it with the KL and flips."]
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
    p.add_argument("--data", default=None,
                   help="A text file, a directory of text files, or a .jsonl of chat "
                        "{'messages': [...]} (or {'text': ...}) lines. Default: the Python "
                        "standard library's sources (offline).")
    p.add_argument("--seq-len", type=int, default=2048, help="Tokens per window (default 2048).")
    p.add_argument("--num-samples", type=int, default=50, help="Windows (default 50).")
    p.add_argument("--seed", type=int, default=0, help="Document shuffle seed (default 0).")
    p.add_argument("--top-k-cache", type=int, default=None,
                   help=f"Reference top-k kept per position (default {DEFAULT_TOP_K}, "
                        "or what a reused cache holds). The cache takes 8 bytes per entry: "
                        "50 x 2048 positions x 1024 is about 0.84 GB.")
    p.add_argument("--cache", default=None,
                   help="Reference cache directory (default: ~/.cache/moequant/eval/<hash>, "
                        "or $MOEQUANT_CACHE/eval/<hash>); reused when it matches.")
    p.add_argument("--near-tie", type=float, default=DEFAULT_NEAR_TIE,
                   help=f"Near-tie threshold in probability (default {DEFAULT_NEAR_TIE}).")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fused", dest="fused", action="store_true", default=True,
                   help="Run the reference and the build with moequant's fused paths "
                        "(moequant.patch; the default).")
    g.add_argument("--no-fused", dest="fused", action="store_false",
                   help="Run both with mlx-lm's own paths (slow on a CPU). "
                        "MOEQUANT_FUSED=0 does the same.")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="Allow the tokenizers' custom code (Kimi's tiktoken tokenizer needs it).")
    p.add_argument("--output", default=None, help="Write the full report as JSON here.")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")


def run(args) -> int:
    from .mlx_lm_patch import env_enabled

    report = evaluate(
        args.ref, args.model, data=args.data, seq_len=args.seq_len,
        num_samples=args.num_samples, seed=args.seed, top_k=args.top_k_cache,
        cache_dir=args.cache, near_tie=args.near_tie,
        fused=args.fused and env_enabled(),
        trust_remote_code=args.trust_remote_code, progress=not args.no_progress,
    )
    print(format_report(report))
    if args.output:
        Path(args.output).write_text(json.dumps(_json_safe(report), indent=2) + "\n")
        print(f"\nreport written to {args.output}")
    return 0
