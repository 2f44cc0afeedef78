"""The streaming core of `moequant convert`: source bytes -> pieces -> output shards.

A job (one output module, see checkpoint.layout) is cut into pieces along the first
axis of its outputs: a few experts of a routed-expert stack, a block of rows of a
matrix; small jobs (norms, the router, kv_b_proj) are one piece. Three threads overlap:

* the reader fills a piece's source tensors into one of a few preallocated buffers,
  with the next pieces' byte ranges already queued at the disk (POSIX_FADV_WILLNEED),
  and drops them from the page cache once read (each byte is read once),
* the main thread computes the piece (requantize_int4 / quantize, MLX's own threads),
* the writer puts each output slice at its final byte offset in its shard: the shard's
  safetensors header is known from the plan, so a shard is written in place, fsynced
  and renamed into place when its last byte is written; each slice's writeback starts
  as soon as it is written (Linux: sync_file_range), with at most WRITEBACK_BYTES in
  flight.

Why pieces and a fixed buffer pool: allocating a whole (384, 2048, 7168) stack per job
faulted in fresh pages for every job (millions of minor faults, most of the conversion's
time in the kernel) and held several GB. Here the input buffers are allocated once and
reused, and each piece's outputs stay small enough for the C allocator to recycle them;
memory holds a few pieces whatever the model.
"""

from __future__ import annotations

import collections
import os
import queue
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from .checkpoint import CheckpointError, Job, Source, Unit
from .checkpoint.safetensors_io import (
    MX_STORAGE,
    NP_STORAGE,
    TensorInfo,
    pwrite_all,
    read_into,
    read_numpy,
    rows_info,
    shard_header,
)

# Source bytes per piece. Small enough that a piece's outputs (at most a few tens of MB)
# stay under glibc's largest mmap threshold (32 MiB), so freed output buffers are reused
# instead of being unmapped and faulted in again; large enough that per-piece overhead
# (a graph, a few syscalls) is negligible next to the work.
PIECE_BYTES = 32 << 20
# Pieces queued at the writer before the main thread waits for it: room for the disk's
# write bursts (it serves queued reads first), so computing does not stop at each one.
WRITE_QUEUE = 4
# Pieces whose source bytes the reader asks the kernel to fetch ahead of reading them.
PREFETCH_PIECES = 3
# Input buffers: those being read or prefetched, one being computed, and those whose
# outputs wait at the writer (an output may alias its input: a repack, a bf16 copy).
POOL_BUFFERS = PREFETCH_PIECES + WRITE_QUEUE + 2
ALIGN = 64
# Output bytes whose writeback may be in flight before the writer waits for the oldest
# range: writeback starts as each slice is written (sync_file_range) instead of when the
# kernel's dirty thresholds are crossed, so the disk writes while the conversion reads
# and computes and each shard's closing fsync finds little left. The window is large
# (the oldest range is long done when it is waited for): a small one made the writer
# wait for the disk, which serves reads first, at every slice.
WRITEBACK_BYTES = 1 << 30


def _sync_file_range():
    """libc's sync_file_range (Linux), or None: without it the kernel schedules writeback."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn
    except (OSError, AttributeError):
        return None


_SFR = _sync_file_range()
_SFR_WRITE, _SFR_WAIT = 2, 1 | 2 | 4  # start writeback; wait before, write, wait after


@dataclass
class Piece:
    """Slices lo..hi along the first axis of every output of ``job`` (whole: the job's
    full outputs, first axis not sliced)."""

    unit: Unit
    job: Job
    lo: int
    hi: int
    whole: bool
    reads: List[Tuple[TensorInfo, int]]  # (source bytes, byte offset in the buffer)
    inputs: List[Tuple[int, Tuple[int, ...], str]]  # (byte offset, shape, safetensors dtype)
    checks: List[Tuple[TensorInfo, List[int]]]  # INT4 weight_shape tensors and their value
    nbytes: int
    source_bytes: int
    prefetched: bool = False

    def sub_job(self) -> Job:
        """The job restricted to this piece (items' first dimension hi - lo)."""
        if self.whole:
            return self.job
        return Job(
            self.job.kind,
            [replace(it, shape=(self.hi - self.lo, *it.shape[1:])) for it in self.job.items],
            self.job.sources,
        )


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _uniform(src: Source, names: List[str]) -> str:
    first = src.tensors[names[0]]
    for n in names:
        if src.tensors[n].dtype != first.dtype:
            raise CheckpointError(
                f"{src.tensors[n].file}: tensor {n} has dtype "
                f"{src.tensors[n].dtype}, but {names[0]} has {first.dtype}"
            )
    if first.dtype not in MX_STORAGE:
        raise CheckpointError(f"{first.file}: tensor {first.name} has unsupported dtype {first.dtype}")
    return first.dtype


def plan_pieces(src: Source, unit: Unit, job: Job, piece_bytes: Optional[int] = None) -> List[Piece]:
    T = src.tensors
    piece_bytes = piece_bytes or PIECE_BYTES
    if job.kind == "experts":
        # Experts lo..hi of each source group stacked into one input array per group.
        groups = [job.sources] if src.cfg.scheme is None else [job.sources[0::3], job.sources[1::3]]
        dtypes = [_uniform(src, g) for g in groups]
        shapes = [T[g[0]].shape for g in groups]
        per_expert = sum(T[g[0]].nbytes for g in groups)
        E = len(groups[0])
        step = max(1, min(E, piece_bytes // max(per_expert, 1)))
        n, k = job.items[0].shape[1:]
        pieces = []
        for lo in range(0, E, step):
            hi = min(E, lo + step)
            reads, inputs, off = [], [], 0
            for g, dt, shape in zip(groups, dtypes, shapes):
                per = T[g[0]].nbytes
                reads += [(T[g[e]], off + (e - lo) * per) for e in range(lo, hi)]
                inputs.append((off, (hi - lo, *shape), dt))
                off = _align(off + (hi - lo) * per)
            reads.sort(key=lambda r: (str(r[0].file), r[0].start))  # ascending in each file
            checks = [(T[name], [n, k]) for name in job.sources[2::3][lo:hi]] if src.cfg.scheme else []
            pieces.append(
                Piece(unit, job, lo, hi, False, reads, inputs, checks, off, sum(i.nbytes for i, _ in reads))
            )
        return pieces
    (name,) = job.sources
    info = T[name]
    dt = _uniform(src, [name])
    if job.kind != "dense" or len(info.shape) != 2 or info.shape[0] == 0:
        return [
            Piece(
                unit,
                job,
                0,
                info.shape[0] if info.shape else 0,
                True,
                [(info, 0)],
                [(0, info.shape, dt)],
                [],
                _align(info.nbytes),
                info.nbytes,
            )
        ]
    N = info.shape[0]
    step = max(1, min(N, piece_bytes // max(info.nbytes // N, 1)))
    pieces = []
    for lo in range(0, N, step):
        hi = min(N, lo + step)
        part = rows_info(info, lo, hi)
        pieces.append(
            Piece(
                unit,
                job,
                lo,
                hi,
                False,
                [(part, 0)],
                [(0, part.shape, dt)],
                [],
                _align(part.nbytes),
                part.nbytes,
            )
        )
    return pieces


def new_buffer(nbytes: int) -> Tuple[mx.array, np.ndarray]:
    """An MLX byte buffer (allocated on the calling thread: MLX streams are per thread)
    and a writable numpy view of the same memory for the reader."""
    buf = mx.zeros((max(nbytes, 1),), mx.uint8)
    mx.eval(buf)
    return buf, np.asarray(memoryview(buf))


def read_piece(piece: Piece, view: np.ndarray) -> None:
    """Fill ``view`` with the piece's source bytes (file reads release the GIL); check
    INT4 experts' weight_shape values against the config."""
    for info, expect in piece.checks:
        value = read_numpy(info).tolist()
        if value != expect:
            raise CheckpointError(
                f"{info.file}: tensor {info.name} says shape {value}, but config.json implies {expect}"
            )
    for info, off in piece.reads:
        read_into(info, view[off : off + info.nbytes])


def piece_arrays(buf: mx.array, piece: Piece) -> List[mx.array]:
    """The piece's input arrays: views into ``buf`` (no copy), evaluated, so that the ops
    that take evaluated row-contiguous inputs as they are read them in place."""
    out = []
    for off, shape, dt in piece.inputs:
        nbytes = int(np.prod(shape)) * np.dtype(NP_STORAGE[dt]).itemsize
        a = buf[off : off + nbytes].view(MX_STORAGE[dt]).reshape(shape)
        out.append(a.view(mx.bfloat16) if dt == "BF16" else a)
    mx.eval(out)
    return out


def prefetch_piece(piece: Piece) -> None:
    """Ask the kernel to start reading a coming piece's source bytes (POSIX_FADV_WILLNEED
    queues the whole ranges at once), so the disk works on it while the reader copies
    the current piece; a hint: errors surface when the piece is read."""
    if not piece.prefetched:
        piece.prefetched = True
        _advise(piece, "POSIX_FADV_WILLNEED")


def forget_piece(piece: Piece) -> None:
    """Drop a read piece's source pages from the page cache (POSIX_FADV_DONTNEED; only
    pages wholly inside its ranges): each source byte is read once, so caching it only
    makes the kernel reclaim gigabytes later, on the cores the conversion computes on."""
    _advise(piece, "POSIX_FADV_DONTNEED")


def _advise(piece: Piece, advice: str) -> None:
    if not hasattr(os, "posix_fadvise"):
        return
    by_file: Dict[Path, List[TensorInfo]] = {}
    for info, _ in piece.reads:
        by_file.setdefault(info.file, []).append(info)
    for path, infos in by_file.items():
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            for info in infos:
                os.posix_fadvise(fd, info.start, info.nbytes, getattr(os, advice))
        except OSError:
            pass
        finally:
            os.close(fd)


def read_sync(piece: Piece) -> List[mx.array]:
    """Read a piece into a buffer of its own (outside the pipeline, e.g. sampling)."""
    buf, view = new_buffer(piece.nbytes)
    read_piece(piece, view)
    return piece_arrays(buf, piece)


# --------------------------------------------------------------------------- threads


class _Stop(Exception):
    pass


class Reader:
    """Reads pieces in order into free pool buffers, on a background thread."""

    def __init__(self, pieces: List[Piece], nbytes: int, count: Optional[int] = None):
        self.pieces = pieces
        count = count or POOL_BUFFERS
        self.free: "queue.Queue" = queue.Queue()
        for _ in range(min(count, max(len(pieces), 1))):
            self.free.put(new_buffer(nbytes))
        self.ready: "queue.Queue" = queue.Queue()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="moequant-read", daemon=True)
        self.thread.start()

    def _take_free(self):
        while not self.stop.is_set():
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                pass
        raise _Stop

    def _run(self):
        try:
            for i, piece in enumerate(self.pieces):
                for ahead in self.pieces[i + 1 : i + 1 + PREFETCH_PIECES]:
                    prefetch_piece(ahead)
                buf = self._take_free()
                read_piece(piece, buf[1])
                forget_piece(piece)
                self.ready.put((piece, buf))
        except _Stop:
            pass
        except BaseException as e:  # handed to the main thread
            self.ready.put(e)

    def next(self):
        item = self.ready.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def release(self, buf) -> None:
        self.free.put(buf)

    def close(self):
        self.stop.set()
        self.thread.join()


@dataclass
class _OpenShard:
    tmp: Path
    fd: int
    offsets: Dict[str, int]
    remaining: int
    size: int


class ShardWriter:
    """Writes output slices at their final offsets in their shards, on a background
    thread. A shard is created (as .partial-NAME, invisible to mlx-lm's glob) with its
    header on its first write, and fsynced and renamed into place once every byte is in;
    ``on_shard(index, size)`` is then called (on the writer thread) to record it."""

    def __init__(self, dst: Path, out, on_shard: Callable[[int, int], None], depth: Optional[int] = None):
        self.dst, self.out, self.on_shard = dst, out, on_shard
        self.open: Dict[int, _OpenShard] = {}
        self.todo: "queue.Queue" = queue.Queue(maxsize=depth or WRITE_QUEUE)
        self.error: Optional[BaseException] = None
        self.inflight: "collections.deque" = collections.deque()  # (shard, offset, bytes)
        self.inflight_bytes = 0
        self.thread = threading.Thread(target=self._run, name="moequant-write", daemon=True)
        self.thread.start()

    def submit(self, slices, done: Optional[Callable[[], None]] = None) -> None:
        """slices: [(tensor name, byte offset in the tensor, evaluated array)]; ``done``
        runs once they are written (to recycle the input buffer they may alias)."""
        while True:
            self._check()
            try:
                self.todo.put((slices, done), timeout=0.1)
                return
            except queue.Full:
                pass

    def _check(self):
        if self.error is not None:
            raise self.error
        if not self.thread.is_alive():
            raise RuntimeError("the shard writer stopped")

    def _run(self):
        while True:
            task = self.todo.get()
            if task is None:
                return
            if self.error is not None:
                continue  # drain after a failure
            slices, done = task
            try:
                for name, off, arr in slices:
                    self._write(name, off, arr)
                if done:
                    done()
            except BaseException as e:
                self.error = e

    def _shard(self, si: int) -> _OpenShard:
        sh = self.open.get(si)
        if sh is None:
            shard = self.out.shards[si]
            tmp = self.dst / f".partial-{shard.name}"
            header, offsets = shard_header(
                [(t, *self.out.tensor_meta[t]) for t in shard.tensors], {"format": "mlx"}
            )
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
            sh = self.open[si] = _OpenShard(tmp, fd, offsets, shard.nbytes, len(header) + shard.nbytes)
            pwrite_all(fd, header, 0)
        return sh

    def _write(self, name: str, off: int, arr: mx.array) -> None:
        si = self.out.tensor_shard[name]
        path = self.dst / self.out.shards[si].name
        try:
            sh = self._shard(si)
            pwrite_all(sh.fd, memoryview(arr), sh.offsets[name] + off)
            self._writeback(sh, sh.offsets[name] + off, arr.nbytes)
            sh.remaining -= arr.nbytes
            if sh.remaining == 0:
                del self.open[si]
                self._forget(sh)
                finish_shard(sh.fd, sh.tmp, path)
                self.on_shard(si, sh.size)
        except OSError as e:
            raise WriteError(f"{path}: cannot write shard: {e.strerror or e}") from e

    def _writeback(self, sh: _OpenShard, off: int, n: int) -> None:
        """Start the range's writeback; past WRITEBACK_BYTES in flight, wait for the oldest
        range and drop its clean pages from the page cache (a hint: errors surface at
        the shard's fsync)."""
        if _SFR is None or n == 0:
            return
        _SFR(sh.fd, off, n, _SFR_WRITE)
        self.inflight.append((sh, off, n))
        self.inflight_bytes += n
        while self.inflight_bytes > WRITEBACK_BYTES:
            old, o, m = self.inflight.popleft()
            self.inflight_bytes -= m
            if _SFR(old.fd, o, m, _SFR_WAIT) == 0:
                os.posix_fadvise(old.fd, o, m, os.POSIX_FADV_DONTNEED)

    def _forget(self, sh: _OpenShard) -> None:
        """Drop a shard's ranges before its descriptor is closed."""
        keep = [r for r in self.inflight if r[0] is not sh]
        self.inflight = collections.deque(keep)
        self.inflight_bytes = sum(r[2] for r in keep)

    def close(self, ok: bool) -> None:
        """Wait for the queued writes (ok) or drop them; then remove any shard left
        unfinished, so nothing half-written looks complete."""
        if ok:
            while self.thread.is_alive():
                self._check()
                try:
                    self.todo.put(None, timeout=0.1)
                    break
                except queue.Full:
                    pass
        else:
            self.error = self.error or _Stop()
            while True:  # unblock and stop the thread
                try:
                    self.todo.put_nowait(None)
                    break
                except queue.Full:
                    try:
                        self.todo.get_nowait()
                    except queue.Empty:
                        pass
        self.thread.join()
        self.inflight.clear()
        for sh in self.open.values():
            os.close(sh.fd)
            try:
                sh.tmp.unlink()
            except OSError:
                pass
        self.open.clear()
        if ok and self.error is not None:
            raise self.error


class WriteError(RuntimeError):
    """An output shard could not be written (the message names it)."""


def finish_shard(fd: int, tmp: Path, path: Path) -> None:
    """Make a fully written shard durable and visible: fsync, close, rename (the tests
    interrupt a conversion here)."""
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):  # written and durable: not worth page cache
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
