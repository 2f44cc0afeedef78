"""`moequant convert`: stream an INT4 compressed-tensors (or bf16) Kimi / DeepSeek-V3
checkpoint into a mixed-bit MLX model that stock ``mlx_lm.load`` reads.

The work goes unit by unit (a decoder layer, then embeddings + head), module by module,
in pieces of a few experts or a block of rows (convert_pipeline: read, quantize and
write overlap on three threads, memory holds a few pieces whatever the model): routed
experts go through ``requantize_int4``, other weights through ``mx.quantize`` (CPU) of the
bf16 source, or both through the mse fit when the recipe asks for it; names and layout
follow mlx-lm's sanitize (experts stacked into ``switch_mlp``, ``kv_b_proj`` split into
``embed_q``/``unembed_out``). Each shard is written in place and renamed into place when
complete.

Nothing is lost: a journal in DST records finished units against the source's
fingerprint, the planned output and the fit, so a rerun resumes at the first unfinished
unit; the index and config.json are written last and atomically (mlx-lm needs
config.json). A lock on DST keeps a second conversion out while one runs; --overwrite
removes only the files the journal or moequant_recipe.json says moequant wrote.
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import hashlib
import json
import os
import shutil
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx

from . import __version__, _ext, vision
from .checkpoint import CheckpointError, Item, Job, Source, Unit
from .checkpoint.files import read_text
from .checkpoint.layout import all_items
from .convert_pipeline import Reader, ShardWriter, WriteError, piece_arrays, plan_pieces, read_sync
from .errors import UserError
from .layout import expert_bpw, fmt_bytes, output_tensors, summarize, tensor_bytes
from .ops import requantize_int4, set_num_threads
from .plan import add_recipe_arguments, format_table
from .progress import Progress
from .recipes import FITS, Decision, RecipeError, Resolution, load_recipe, parse_upgrade_layers, resolve

MAX_SHARD_BYTES = 5 * 10**9  # at most 5 GB (mlx-lm writes up to 5 GiB)
JOURNAL = ".moequant-journal.json"
LOCK = ".moequant-lock"
RECIPE_FILE = "moequant_recipe.json"
INDEX = "model.safetensors.index.json"


class DestinationError(UserError):
    """DST cannot be used as asked (exists, belongs to another conversion, ...)."""


class ConvertError(RuntimeError):
    """Writing the output failed (e.g. a full disk); the message names the file."""


# --------------------------------------------------------------------------- planning


@dataclass
class Shard:
    name: str
    unit: int
    tensors: List[str]
    nbytes: int


@dataclass
class OutputPlan:
    """Every output tensor, its shard, and the units in order."""

    shards: List[Shard]
    tensor_shard: Dict[str, int]
    unit_shards: Dict[int, List[int]]
    tensor_meta: Dict[str, Tuple[Tuple[int, ...], str]]
    item_tensors: Dict[str, List[str]]  # item path -> its output names, in output_tensors order

    def digest(self, res: Resolution) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([[s.name, s.tensors] for s in self.shards]).encode())
        h.update(json.dumps(sorted((k, list(v[0]), v[1]) for k, v in self.tensor_meta.items())).encode())
        h.update(json.dumps(res.applied(), sort_keys=True, default=str).encode())
        return h.hexdigest()


def plan_output(units: List[Unit], res: Resolution, prefix: str, max_shard: int) -> OutputPlan:
    """Greedy shards of at most ``max_shard`` bytes, never spanning two units (so a unit
    is the unit of resumption); a tensor larger than the limit gets a shard of its own."""
    groups: List[Tuple[int, List[str], int]] = []
    meta: Dict[str, Tuple[Tuple[int, ...], str]] = {}
    item_tensors: Dict[str, List[str]] = {}
    for u in units:
        start = len(groups)
        for job in u.jobs:
            for it in job.items:
                for suffix, shape, dtype in output_tensors(it, res.decisions[it.path]):
                    name = prefix + it.path + suffix
                    item_tensors.setdefault(it.path, []).append(name)
                    nb = tensor_bytes(shape, dtype)
                    meta[name] = (tuple(shape), dtype)
                    if len(groups) == start or groups[-1][2] + nb > max_shard:
                        groups.append((u.index, [], 0))
                    unit, names, size = groups[-1]
                    names.append(name)
                    groups[-1] = (unit, names, size + nb)
    n = len(groups)
    fmt = "model-{:05d}-of-{:05d}.safetensors" if n > 1 else "model.safetensors"
    shards = [Shard(fmt.format(i + 1, n), unit, names, size) for i, (unit, names, size) in enumerate(groups)]
    tensor_shard = {t: i for i, s in enumerate(shards) for t in s.tensors}
    unit_shards: Dict[int, List[int]] = {}
    for i, s in enumerate(shards):
        unit_shards.setdefault(s.unit, []).append(i)
    return OutputPlan(shards, tensor_shard, unit_shards, meta, item_tensors)


# --------------------------------------------------------------------------- reading


def read_job(src: Source, job: Job) -> List[mx.array]:
    """A whole job's input arrays, read synchronously (outside the pipeline)."""
    (piece,) = plan_pieces(src, None, job, piece_bytes=1 << 62)
    return read_sync(piece)


# --------------------------------------------------------------------------- computing


def _quantize(w: mx.array, d: Optional[Decision]) -> List[mx.array]:
    """A bf16 weight as the build stores it: bf16, or (codes, bf16 scales, bf16 biases)."""
    w = w.astype(mx.bfloat16)
    if d is None:
        return [w]
    if d.fit == "minmax":  # exactly mx.quantize, as every MLX build, on every core
        return list(_ext.quantize_minmax(w, bits=d.bits, group_size=d.group_size, stream=mx.cpu))
    from .ops import quantize

    return list(quantize(w, bits=d.bits, group_size=d.group_size, fit=d.fit, dtype=mx.bfloat16))


def _requantize(packed: mx.array, scales: mx.array, d: Decision, src_group_size: int) -> List[mx.array]:
    """INT4 experts as the build stores them (bf16 scales and biases)."""
    kw = {} if d.fit == "minmax" else {"fit": d.fit}
    return list(
        requantize_int4(
            packed,
            scales,
            bits=d.bits,
            group_size=d.group_size,
            src_group_size=src_group_size,
            dtype=mx.bfloat16,
            **kw,
        )
    )


def compute_job(src: Source, job: Job, inputs, res: Resolution) -> List[Tuple[Item, List[mx.array]]]:
    """Output arrays per item, in output_tensors() order."""
    dec = res.decisions
    if job.kind == "param":
        (it,) = job.items
        dtype = mx.float32 if it.dtype == "float32" else mx.bfloat16
        return [(it, [inputs[0].astype(dtype)])]
    if job.kind == "dense":
        (it,) = job.items
        return [(it, _quantize(inputs[0], dec[it.path]))]
    if job.kind == "kv_b":
        # mlx-lm's sanitize: (heads*(nope+v), kv_lora) -> embed_q (heads, kv_lora, nope)
        # and unembed_out (heads, v, kv_lora).
        q_it, o_it = job.items
        heads, _, nope = q_it.shape
        v = inputs[0].astype(mx.bfloat16).reshape(heads, -1, q_it.shape[1])
        wk = mx.contiguous(v[:, :nope, :].swapaxes(-1, -2))
        wv = mx.contiguous(v[:, nope:, :])
        return [(q_it, _quantize(wk, dec[q_it.path])), (o_it, _quantize(wv, dec[o_it.path]))]
    (it,) = job.items
    d = dec[it.path]
    if src.cfg.scheme is None:
        return [(it, _quantize(inputs[0], d))]
    # Evaluated views of the read buffer: requantize_int4 then reads them in place
    # (a lazy view would be copied whole first).
    packed, scales = inputs[0].view(mx.uint32), inputs[1]
    mx.eval(packed, scales)
    gs = src.cfg.scheme.group_size
    if d is not None and d.repack:
        s = scales.astype(mx.bfloat16)
        return [(it, [packed, s, -8 * s])]
    if d is None:
        w = mx.dequantize(
            packed, scales.astype(mx.float32), -8 * scales.astype(mx.float32), group_size=gs, bits=4
        )
        return [(it, [w.astype(mx.bfloat16)])]
    return [(it, _requantize(packed, scales, d, gs))]


AUTO_SAMPLE_EXPERTS = 16


def expert_sensitivity(src: Source, units: List[Unit]):
    """For 'auto' layer selection: relative squared error of a layer's routed-expert
    module at the quantization it would otherwise get, against the exact source weights,
    measured before any output is written on an evenly spaced sample of at most
    AUTO_SAMPLE_EXPERTS experts per layer: all 384 of Kimi's would re-read a third of the
    checkpoint, 16 re-read about 1.4% of it. The loss is an estimate from that sample.

    The error is the build's own: the decision's fit, bf16 scales and biases as stored,
    dequantized exactly in float32 (what `inspect --source` reports)."""
    jobs = {it.path: j for u in units for j in u.jobs for it in j.items}
    per = 3 if src.cfg.scheme else 1  # source tensors per expert

    def measure(items: List[Item], d: Decision) -> float:
        err = ref = 0.0
        for it in items:
            job = jobs[it.path]
            if job.kind != "experts":
                raise RecipeError(f"auto layer selection measures routed experts only, not {it.path}")
            E = it.shape[0]
            sample = range(0, E, max(1, -(-E // AUTO_SAMPLE_EXPERTS)))
            for b in range(0, len(sample), 8):
                chosen = sample[b : b + 8]
                sub = Job(
                    job.kind,
                    [Item(it.path, it.layer, it.component, it.kind, (len(chosen), *it.shape[1:]))],
                    [n for e in chosen for n in job.sources[e * per : (e + 1) * per]],
                )
                inputs = read_job(src, sub)
                if src.cfg.scheme:
                    packed, scales = inputs[0].view(mx.uint32), inputs[1]
                    gs = src.cfg.scheme.group_size
                    s = scales.astype(mx.float32)
                    # (u - 8) * s exactly: subtract in integers, one float rounding.
                    w = mx.dequantize(packed, mx.ones_like(s), mx.zeros_like(s), group_size=gs, bits=4)
                    w = (w - 8) * mx.repeat(s, gs, axis=-1)
                    wq, qs, qb = _requantize(packed, scales, d, gs)
                else:
                    w = inputs[0].astype(mx.float32)
                    wq, qs, qb = _quantize(inputs[0], d)
                w_hat = mx.dequantize(
                    wq, qs.astype(mx.float32), qb.astype(mx.float32), group_size=d.group_size, bits=d.bits
                )
                # Sums in float64: MLX's float32 sum of ~1e6 squares is off by ~1e-4.
                err += mx.sum(((w_hat - w) ** 2).astype(mx.float64), stream=mx.cpu).item()
                ref += mx.sum((w**2).astype(mx.float64), stream=mx.cpu).item()
        return err / max(ref, 1e-30)

    return measure


# --------------------------------------------------------------------------- output side


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".partial-{path.name}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        raise ConvertError(f"{path}: cannot write: {e.strerror or e}") from e


def write_shard(path: Path, tensors: Dict[str, mx.array]) -> int:
    """A small shard written whole (the -VLM build's vision tensors): under a temporary
    name (invisible to mlx-lm's model*.safetensors glob), then renamed into place."""
    tmp = path.with_name(f".partial-{path.name}")
    try:
        mx.save_safetensors(str(tmp), tensors, metadata={"format": "mlx"})
        os.replace(tmp, path)
        return path.stat().st_size
    except (OSError, RuntimeError, ValueError) as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise ConvertError(f"{path}: cannot write shard: {getattr(e, 'strerror', None) or e}") from e


def _plain_name(n) -> bool:
    """A file name directly inside DST (names read back from a marker are never paths)."""
    return isinstance(n, str) and n not in ("", ".", "..") and "/" not in n and "\\" not in n


def _read_marker(path: Path) -> dict:
    try:
        data = json.loads(read_text(path))
    except (json.JSONDecodeError, RecursionError, CheckpointError) as e:
        raise DestinationError(
            f"{path}: unreadable ({e}); cannot tell which files moequant wrote: remove the directory yourself"
        ) from None
    if not isinstance(data, dict):
        raise DestinationError(
            f"{path}: a JSON {type(data).__name__}, expected an object; cannot "
            "tell which files moequant wrote: remove the directory yourself"
        )
    return data


def owned_files(dst: Path) -> Optional[set]:
    """The names of the files moequant wrote into DST, from its markers: the journal of an
    unfinished conversion or moequant_recipe.json of a finished one (both list them).
    None when DST holds neither marker (not a directory moequant wrote)."""
    names = set()
    jpath, rpath = dst / JOURNAL, dst / RECIPE_FILE
    if not os.path.lexists(jpath) and not os.path.lexists(rpath):
        return None
    for path in (jpath, rpath):
        if not os.path.lexists(path):
            continue
        data = _read_marker(path)
        files = data.get("files")
        if isinstance(files, list):
            names |= {n for n in files if _plain_name(n)}
        elif path == jpath and isinstance(data.get("sizes"), dict):  # journals before 0.2
            names |= {n for n in data["sizes"] if _plain_name(n)}
        elif path == rpath and os.path.lexists(dst / INDEX):  # recipe files before 0.2
            try:
                wm = json.loads(read_text(dst / INDEX)).get("weight_map", {})
                names |= {n for n in wm.values() if _plain_name(n)}
            except (AttributeError, ValueError, RecursionError):
                pass
    names |= {JOURNAL, RECIPE_FILE, INDEX, "config.json"}
    return names | {f".partial-{n}" for n in names}


class DestinationLock:
    """An exclusive lock on DST for the whole conversion (flock on DST/.moequant-lock,
    which holds the owner's pid), so two converts never write one directory. The lock
    file is removed on release; a holder checks after locking that the file it locked is
    still the one at the path (another run may have removed it in between)."""

    def __init__(self, dst: Path):
        self.path, self.fd = dst / LOCK, None

    def __enter__(self):
        while True:
            try:
                fd = os.open(
                    self.path,
                    os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0),
                    0o644,
                )
            except OSError as e:
                raise DestinationError(
                    f"{self.path}: cannot create the lock file: {e.strerror or e}"
                ) from None
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise DestinationError(f"{self.path}: not a regular file; remove it")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                    raise DestinationError(
                        f"--mlx-path {self.path.parent} is locked by another moequant convert "
                        f"(process {pid}); wait for it to finish or choose another --mlx-path"
                    ) from None
                try:
                    same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc):
        try:
            os.unlink(self.path)  # still ours: we hold the lock on this inode
        except OSError:
            pass
        os.close(self.fd)
        return False


def check_destination(dst: Path, src: Path, overwrite: bool) -> str:
    """Read-only checks of --mlx-path before anything is created or locked. Returns
    'new', 'empty', 'resume' or 'overwrite'."""
    if os.path.islink(dst):
        if not dst.exists():
            raise DestinationError(f"--mlx-path {dst} is a dangling symbolic link (to {os.readlink(dst)})")
        if overwrite:
            raise DestinationError(
                f"--mlx-path {dst} is a symbolic link (to {os.readlink(dst)}); "
                "refusing to --overwrite through it: give the directory itself"
            )
    src_r, dst_r = src.resolve(), dst.resolve()
    if dst_r == src_r or src_r in dst_r.parents or dst_r in src_r.parents:
        raise DestinationError(f"--mlx-path {dst} must not contain or be inside --hf-path {src}")
    if not dst.exists():
        return "new"
    if not dst.is_dir():
        raise DestinationError(f"--mlx-path {dst} exists and is not a directory")
    try:
        entries = [n for n in os.listdir(dst) if n != LOCK]
    except OSError as e:
        raise DestinationError(f"--mlx-path {dst}: cannot list: {e.strerror or e}") from None
    if not entries:
        return "empty"
    owned = owned_files(dst)
    if overwrite:
        if owned is None:
            raise DestinationError(
                f"--mlx-path {dst} is a non-empty directory moequant did not write (no "
                f"{RECIPE_FILE} or {JOURNAL}); refusing to --overwrite it"
            )
        return "overwrite"
    if os.path.lexists(dst / JOURNAL):
        return "resume"
    raise DestinationError(f"--mlx-path {dst} already exists; use --overwrite to replace it")


def prepare_destination(
    dst: Path,
    src: Path,
    overwrite: bool,
    fingerprint: str,
    digest: str,
    planned: List[str],
    fits: Optional[List[str]] = None,
) -> dict:
    """Under the lock: check DST again, remove the files an earlier conversion wrote when
    overwriting (and only those), and return the journal to continue from (empty for a
    fresh start). ``planned``: the names this conversion will write."""
    state = check_destination(dst, src, overwrite)
    owned = owned_files(dst) if state in ("overwrite", "resume") else set()
    # A file this run would write that moequant did not write before is the user's.
    for n in planned:
        if os.path.lexists(dst / n) and n not in owned:
            raise DestinationError(
                f"{dst / n} exists and was not written by moequant; refusing to replace it"
            )
    journal = {}
    if state == "overwrite":
        left = [n for n in os.listdir(dst) if n not in owned and n != LOCK]
        stale = [n for n in left if n.endswith(".safetensors")]
        if stale:  # mlx-lm would load them with ours
            raise DestinationError(
                f"--mlx-path {dst} holds {stale[0]}, which moequant did not "
                "write; refusing to --overwrite next to it"
            )
        for n in sorted(owned):
            p = dst / n
            if os.path.islink(p) or p.is_file():
                try:
                    p.unlink()
                except OSError as e:
                    raise DestinationError(f"{p}: cannot remove: {e.strerror or e}") from None
    elif state == "resume":
        jpath = dst / JOURNAL
        journal = _read_marker(jpath)
        if not _journal_ok(journal):
            raise DestinationError(f"{jpath}: unreadable journal; rerun with --overwrite")
        if journal["fingerprint"] != fingerprint:
            raise DestinationError(
                f"{dst} holds an unfinished conversion of a different or "
                "changed source; rerun with --overwrite to start over"
            )
        if fits is not None and "fit" in journal and journal["fit"] != fits:
            # Shards of one fit must not be finished with another: the build would be
            # neither, and its recipe file would misstate one half.
            raise DestinationError(
                f"{dst} holds an unfinished conversion made with fit {'+'.join(journal['fit']) or 'none'}, "
                f"and this run asks for {'+'.join(fits) or 'none'}; rerun with the same --fit / "
                "recipe to resume, or with --overwrite to start over"
            )
        if journal["plan"] != digest:
            raise DestinationError(
                f"{dst} holds an unfinished conversion with a different "
                "recipe or options; rerun with --overwrite to start over"
            )
    return journal


def _journal_ok(j: dict) -> bool:
    return (
        isinstance(j.get("fingerprint"), str)
        and isinstance(j.get("plan"), str)
        and isinstance(j.get("done"), list)
        and all(type(u) is int for u in j["done"])
        and isinstance(j.get("sizes"), dict)
        and all(_plain_name(k) and type(v) is int for k, v in j["sizes"].items())
    )


def copy_side_files(files: List[Path], dst: Path) -> List[str]:
    """Tokenizer, chat template, remote-code and other small files (Source.side_files),
    as mlx-lm keeps them."""
    copied = []
    for p in files:
        try:
            shutil.copyfile(p, dst / p.name)
        except OSError as e:
            raise ConvertError(f"{dst / p.name}: cannot copy from {p}: {e.strerror or e}") from e
        copied.append(p.name)
    return copied


def output_config(src: Source, res: Resolution, items: List[Item]) -> dict:
    """The source config with the compressed-tensors block removed and mlx-lm's
    per-module quantization entries added (vision_config dropped with the tower)."""
    cfg = src.cfg
    config = copy.deepcopy(cfg.raw)
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    if cfg.prefix:
        config["text_config"].pop("quantization_config", None)
        config.pop("vision_config", None)
    weights: Dict[Tuple[int, int], int] = {}
    per_module = {}
    for it in items:
        d = res.decisions[it.path]
        if d is not None:
            per_module[cfg.prefix + it.path] = d.as_config()
            weights[(d.bits, d.group_size)] = weights.get((d.bits, d.group_size), 0) + it.params
    bits, group = max(weights, key=weights.get) if weights else (4, 64)
    quant = {"group_size": group, "bits": bits, "mode": "affine", **per_module}
    config["quantization"] = quant
    config["quantization_config"] = quant
    # A short record for `moequant inspect` (mlx-lm ignores unknown keys); the full
    # per-module record is moequant_recipe.json.
    config["moequant"] = {
        "version": __version__,
        "recipe": res.recipe.name,
        "source": f"compressed-tensors INT4 g{cfg.scheme.group_size}" if cfg.scheme else "bf16",
        "fit": res.fits(),
        "selected_layers": {
            f"rule {i} {res.recipe.rules[i]['match']}": layers for i, layers in res.selected.items()
        },
    }
    return dict(sorted(config.items()))


# --------------------------------------------------------------------------- progress


# Prior for the ETA before any mse piece has been timed: source bytes of the mse fit
# cost about this many times the bytes of the min-max fit (which runs at disk speed).
MSE_COST_PRIOR = 8.0


def progress_bar(totals: Dict[str, int], enabled: bool) -> Progress:
    """Source bytes per kind of work ('minmax', 'mse': see piece_kind), their rate and ETA."""
    return Progress(
        totals,
        enabled=enabled,
        fmt=fmt_bytes,
        costs={"mse": MSE_COST_PRIOR},
        rate=lambda done, el: f"{done / max(el, 1e-9) / 1e9:.2f} GB/s",
    )


def piece_kind(piece, res: Resolution) -> str:
    """'mse' when the piece is re-quantized with the mse fit, else 'minmax'."""
    ds = [res.decisions.get(it.path) for it in piece.job.items]
    return "mse" if any(d is not None and not d.repack and d.fit == "mse" for d in ds) else "minmax"


# --------------------------------------------------------------------------- pipeline


def _run_pipeline(
    src: Source,
    res: Resolution,
    out: OutputPlan,
    pieces,
    dst: Path,
    journal: dict,
    jpath: Path,
    bar: Progress,
) -> int:
    """Read, compute and write every piece (see convert_pipeline); a unit enters the
    journal once all its shards are on disk. Returns the source bytes read and where
    the main thread's time went (computing, waiting for the reader, for the writer)."""
    finished: set = set()

    def on_shard(si: int, size: int) -> None:  # writer thread
        shard = out.shards[si]
        journal["sizes"][shard.name] = size
        finished.add(si)
        if all(i in finished for i in out.unit_shards[shard.unit]):
            journal["done"].append(shard.unit)
            _atomic_write_text(jpath, json.dumps(journal))

    read_bytes, ok = 0, False
    stages = {"compute": 0.0, "wait_read": 0.0, "wait_write": 0.0}
    clock = time.perf_counter
    reader = Reader(pieces, max((p.nbytes for p in pieces), default=1))
    writer = ShardWriter(dst, out, on_shard)
    try:
        for n, piece in enumerate(pieces):
            t = clock()
            got, buf = reader.next()
            assert got is piece
            t1 = clock()
            stages["wait_read"] += t1 - t
            slices = []
            for it, arrays in compute_job(src, piece.sub_job(), piece_arrays(buf[0], piece), res):
                mx.eval(arrays)
                for name, arr in zip(out.item_tensors[it.path], arrays):
                    shape, dtype = out.tensor_meta[name]
                    want = shape if piece.whole else (piece.hi - piece.lo, *shape[1:])
                    if tuple(arr.shape) != want or arr.dtype != getattr(mx, dtype):
                        raise AssertionError(
                            f"{name}: produced {arr.shape} {arr.dtype}, planned {want} {dtype}"
                        )
                    row = 0 if piece.whole else tensor_bytes(shape[1:], dtype) * piece.lo
                    slices.append((name, row, arr))
            t2 = clock()
            stages["compute"] += t2 - t1
            # Where the computing goes, by job kind and fit (bench_convert prints it).
            key = f"compute {piece.job.kind} {piece_kind(piece, res)}"
            stages[key] = stages.get(key, 0.0) + (t2 - t1)
            writer.submit(slices, lambda buf=buf: reader.release(buf))
            stages["wait_write"] += clock() - t2
            del slices, buf
            read_bytes += piece.source_bytes
            last = n + 1 == len(pieces) or pieces[n + 1].unit is not piece.unit
            bar.update(
                piece.source_bytes,
                piece_kind(piece, res),
                f"units {len(journal['done'])}/{len(src.units)} ({piece.unit.name})",
                force=last,
            )
        t = clock()
        writer.close(ok=True)
        stages["wait_write"] += clock() - t
        ok = True
    except WriteError as e:
        raise ConvertError(str(e)) from e.__cause__
    finally:
        if not ok:
            writer.close(ok=False)
        reader.close()
    bar.update(0, "", f"units {len(journal['done'])}/{len(src.units)} (written)", force=True)
    bar.close()
    return read_bytes, stages


# --------------------------------------------------------------------------- driver


@dataclass
class ConvertResult:
    mlx_path: Path
    resolution: Resolution
    rows: list
    total_bytes: int
    total_params: int
    expert_bpw: float
    wall_seconds: float
    input_bytes: int  # read in this run
    units_converted: int
    units_skipped: int
    dry_run: bool = False
    shards: List[str] = field(default_factory=list)
    # Main thread's seconds computing / waiting for reads / waiting for writes.
    stages: Dict[str, float] = field(default_factory=dict)

    @property
    def bpw(self) -> float:
        return self.total_bytes * 8 / self.total_params

    def summary(self) -> str:
        gbps = self.input_bytes / self.wall_seconds / 1e9 if self.wall_seconds else 0.0
        extra = f"{self.total_bytes / 2**30:.2f} GiB; routed experts {self.expert_bpw:.3f} bpw"
        lines = [format_table(self.rows, extra)]
        if not self.dry_run:
            lines.append(
                f"{self.units_converted} units converted, {self.units_skipped} resumed from the "
                f"journal; wall {self.wall_seconds:.2f} s; input {self.input_bytes / 1e9:.3f} GB "
                f"at {gbps:.2f} GB/s; {len(self.shards)} shards in {self.mlx_path}"
            )
        return "\n".join(lines)


def convert(
    hf_path,
    mlx_path,
    recipe: str = "alis-3.6",
    *,
    upgrade_layers=None,
    dry_run: bool = False,
    overwrite: bool = False,
    threads: Optional[int] = None,
    progress: bool = True,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    fit: Optional[str] = None,
    keep_vision: Optional[bool] = None,
) -> ConvertResult:
    """Convert ``hf_path`` into ``mlx_path``; see the module docstring. ``fit`` overrides
    the recipe's fit of every re-quantized module (``minmax`` or ``mse``).

    Raises CheckpointError / RecipeError / DestinationError for bad input (before any
    output is written, except for damage found while reading tensors) and ConvertError
    when writing fails."""
    t0 = time.perf_counter()
    if threads:
        set_num_threads(threads)
    src = Source.open(hf_path)
    cfg, units = src.cfg, src.units
    items = all_items(units)
    upgrade = (
        parse_upgrade_layers(upgrade_layers)
        if isinstance(upgrade_layers, (str, type(None)))
        else upgrade_layers
    )
    spec = load_recipe(recipe)
    needs_auto = upgrade == "auto" or any(
        isinstance(r.get("layers"), dict) and r["layers"].get("select") == "auto" for r in spec.rules
    )
    res = resolve(
        spec,
        items,
        num_layers=cfg.num_layers,
        int4_group=cfg.scheme.group_size if cfg.scheme else None,
        upgrade_layers=upgrade,
        fit=fit,
        sensitivity=expert_sensitivity(src, units) if needs_auto and not dry_run else None,
    )
    out = plan_output(units, res, cfg.prefix, max_shard_bytes)
    planned_rows = summarize(items, res.decisions)
    vis = vision.plan_part(src, keep_vision, spec.spec)  # --keep-vision: the -VLM sibling
    planned_rows += [vis.row()] if vis else []
    total_bytes = sum(r.bytes for r in planned_rows)
    total_params = sum(r.params for r in planned_rows)
    side = src.side_files(skip=(JOURNAL, RECIPE_FILE, LOCK))
    if dry_run:
        return ConvertResult(
            Path(mlx_path),
            res,
            planned_rows,
            total_bytes,
            total_params,
            expert_bpw(planned_rows),
            time.perf_counter() - t0,
            0,
            0,
            0,
            True,
            [s.name for s in out.shards],
        )

    dst = Path(mlx_path)
    planned = sorted(
        {s.name for s in out.shards}
        | {p.name for p in side}
        | {INDEX, "config.json", RECIPE_FILE}
        | ({vision.VISION_SHARD} if vis else set())
    )
    check_destination(dst, src.path, overwrite)  # refuse before creating anything
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DestinationError(f"--mlx-path {dst}: cannot create: {e.strerror or e}") from None
    # One conversion per DST at a time: the lock covers every check and write in it.
    with DestinationLock(dst):
        journal, jpath = reconcile_journal(dst, src, res, out, planned, overwrite)
        done = set(journal["done"])
        todo = [u for u in units if u.index not in done]
        remaining = sum(out.shards[i].nbytes for u in todo for i in out.unit_shards.get(u.index, []))
        free = shutil.disk_usage(dst).free
        if remaining > free:
            raise ConvertError(
                f"{dst}: needs {remaining / 1e9:.2f} GB more but only {free / 1e9:.2f} GB is free"
            )

        pieces = [p for u in todo for j in u.jobs for p in plan_pieces(src, u, j)]
        totals: Dict[str, int] = {}
        for p in pieces:
            totals[piece_kind(p, res)] = totals.get(piece_kind(p, res), 0) + p.source_bytes
        bar = progress_bar(totals, progress)
        read_bytes, stages = _run_pipeline(src, res, out, pieces, dst, journal, jpath, bar)

        finalize_output(dst, src, res, out, items, side, planned, vis, total_bytes, total_params)
        jpath.unlink()
        return ConvertResult(
            dst,
            res,
            planned_rows,
            total_bytes,
            total_params,
            expert_bpw(planned_rows),
            time.perf_counter() - t0,
            read_bytes,
            len(todo),
            len(done),
            shards=[s.name for s in out.shards],
            stages=stages,
        )


def reconcile_journal(
    dst: Path, src: Source, res: Resolution, out: OutputPlan, planned: List[str], overwrite: bool
) -> Tuple[dict, Path]:
    """Check DST against an earlier attempt's journal (prepare_destination), keep the units
    whose shards are all on disk at their recorded sizes, and write the journal this run
    starts from; clear partial files and the completion markers (index, config.json).
    Returns (journal, its path)."""
    fingerprint, digest = src.fingerprint(), out.digest(res)
    journal = prepare_destination(dst, src.path, overwrite, fingerprint, digest, planned, res.fits())
    done = set()
    for u in journal.get("done", []):
        shard_ok = all(
            (dst / out.shards[i].name).exists()
            and (dst / out.shards[i].name).stat().st_size == journal["sizes"].get(out.shards[i].name)
            for i in out.unit_shards.get(u, [])
        )
        if shard_ok:
            done.add(u)
    journal = {
        "version": 1,
        "moequant": __version__,
        "source": str(src.path),
        "fingerprint": fingerprint,
        "plan": digest,
        "fit": res.fits(),
        "done": sorted(done),
        "sizes": {
            out.shards[i].name: journal["sizes"][out.shards[i].name]
            for u in done
            for i in out.unit_shards.get(u, [])
        },
        "files": sorted(set(planned) | set(journal.get("files") or []) - {JOURNAL}),
    }
    jpath = dst / JOURNAL
    _atomic_write_text(jpath, json.dumps(journal))
    for n in planned:
        (dst / f".partial-{n}").unlink(missing_ok=True)
    # An index or config from an earlier attempt must not make DST look complete.
    for name in ("config.json", INDEX):
        (dst / name).unlink(missing_ok=True)
    return journal, jpath


def finalize_output(
    dst: Path,
    src: Source,
    res: Resolution,
    out: OutputPlan,
    items: List[Item],
    side: List[Path],
    planned: List[str],
    vis,
    total_bytes: int,
    total_params: int,
) -> None:
    """Once every shard is on disk: the side files, the recipe record, the index and,
    last, config.json (what makes DST a model mlx-lm loads)."""
    cfg = src.cfg
    copy_side_files(side, dst)
    _atomic_write_text(
        dst / RECIPE_FILE,
        json.dumps(
            {
                "moequant": __version__,
                "source": str(src.path),
                "model_type": cfg.flavour,
                **res.applied(cfg.prefix),
                "files": planned,
            },
            indent=2,
            default=str,
        ),
    )
    weight_map = {t: out.shards[i].name for t, i in sorted(out.tensor_shard.items())}
    if vis:
        weight_map = dict(sorted({**weight_map, **vis.write(dst, write_shard)}.items()))
    _atomic_write_text(
        dst / INDEX,
        json.dumps(
            {
                "metadata": {"total_size": total_bytes, "total_parameters": total_params},
                "weight_map": weight_map,
            },
            indent=4,
        ),
    )
    config = output_config(src, res, items)
    config = vision.output_config(config, cfg.raw, vis.projector) if vis else config
    _atomic_write_text(dst / "config.json", json.dumps(config, indent=4))


# --------------------------------------------------------------------------- CLI


def add_arguments(p):
    p.add_argument("--hf-path", required=True, help="Source checkpoint directory (local).")
    p.add_argument("--mlx-path", default="mlx_model", help="Output directory (default mlx_model).")
    add_recipe_arguments(p)
    p.add_argument(
        "--fit",
        choices=FITS,
        default=None,
        help="How scales and biases are fitted, for every re-quantized module "
        "(overrides the recipe): minmax (MLX's rule) or mse (least squares: "
        "lower error at the same size, slower).",
    )
    p.add_argument("--dry-run", action="store_true", help="Validate and print the plan; write nothing.")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace an output directory moequant wrote, removing only the files it "
        "wrote (any other directory is refused).",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores).")
    p.add_argument("--quiet", action="store_true", help="No progress bar.")
    p.add_argument(
        "--keep-vision",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="kimi_k25: keep the vision tower and projector (bf16; the recipe field "
        "vision_projector may quantize the projector) for mlx-vlm, the "
        "language model byte-identical to the text build (default: the recipe's "
        "keep_vision, else off).",
    )


def run(args) -> int:
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be at least 1")
    try:
        result = convert(
            args.hf_path,
            args.mlx_path,
            args.recipe,
            upgrade_layers=args.upgrade_layers,
            dry_run=args.dry_run,
            overwrite=args.overwrite,
            threads=args.threads,
            progress=not args.quiet,
            fit=args.fit,
            keep_vision=args.keep_vision,
        )
    except ConvertError as e:
        print(f"moequant convert: error: {e}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(f"dry run: would write {len(result.shards)} shards to {args.mlx_path}")
    for line in result.resolution.selection_lines() + result.resolution.notes:
        print(line)
    print(result.summary())
    return 0
