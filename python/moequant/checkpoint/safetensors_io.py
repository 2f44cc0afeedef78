"""Per-tensor access to safetensors files: headers are parsed once, tensors are read one
at a time with positioned reads straight into their destination buffer.

We read the container ourselves rather than through ``safe_open`` because numpy has no
bfloat16 (safetensors' numpy path rejects it and torch is not a dependency), because
expert tensors are read directly into a slot of a preallocated (E, N, K/8) stack, and
because a truncated file must be reported with the file and tensor names.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Tuple

import mlx.core as mx
import numpy as np

from .errors import CheckpointError
from .files import open_regular

# safetensors dtype -> storage dtype in numpy and in MLX (bf16 is carried as uint16 bits).
NP_STORAGE = {
    "BF16": np.uint16,
    "F16": np.float16,
    "F32": np.float32,
    "I32": np.int32,
    "U32": np.uint32,
    "I64": np.int64,
}
MX_STORAGE = {
    "BF16": mx.uint16,
    "F16": mx.float16,
    "F32": mx.float32,
    "I32": mx.int32,
    "U32": mx.uint32,
    "I64": mx.int64,
}

# Bits per element of every safetensors dtype (the reference parser's table).
DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
MAX_HEADER = 100_000_000  # the reference parser's limit


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    name: str
    dtype: str
    shape: Tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def _count(v) -> bool:
    return type(v) is int and v >= 0


def read_header(path: Path) -> Tuple[Dict[str, TensorInfo], bytes]:
    """Parse and validate a safetensors header by the reference parser's rules: a JSON
    object of {"dtype", "shape", "data_offsets"} entries (plus an optional string map
    ``__metadata__``); every size == dtype size x prod(shape); the tensors, sorted by
    offset, tile the data region exactly (no gap, no overlap, nothing past the end,
    nothing left over). Returns the tensors and the raw header bytes (used to
    fingerprint the file). Raises CheckpointError naming the file and tensor."""
    with open_regular(path) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors header")
            raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: corrupt safetensors header: nested too deeply") from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: corrupt safetensors header: a JSON {type(header).__name__}, expected an object"
        )
    base = 8 + n
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            if meta is not None and (
                not isinstance(meta, dict)  # null: no metadata (MLX writes it)
                or not all(isinstance(v, str) for v in meta.values())
            ):
                raise CheckpointError(
                    f"{path}: corrupt safetensors header: __metadata__ is not a map of strings"
                )
            continue
        bad = _entry_problem(meta)
        if bad:
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name}: {bad}")
        begin, end = meta["data_offsets"]
        shape = tuple(meta["shape"])
        if base + end > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name} ends at byte {base + end} but the file has {size} bytes"
            )
        bits = math.prod(shape) * DTYPE_BITS[meta["dtype"]]
        if bits % 8 or bits // 8 != end - begin:
            raise CheckpointError(
                f"{path}: corrupt header entry for tensor {name}: data_offsets [{begin}, {end}] "
                f"hold {end - begin} bytes, but {meta['dtype']} {list(shape)} needs {bits / 8:g}"
            )
        tensors[name] = TensorInfo(path, name, meta["dtype"], shape, base + begin, end - begin)
    spans = sorted(tensors.values(), key=lambda t: (t.start, t.start + t.nbytes))
    for prev, info in zip(spans, spans[1:]):  # overlaps first: the more telling error
        if info.start < prev.start + prev.nbytes:
            raise CheckpointError(
                f"{path}: corrupt header: tensor {info.name} (data_offsets "
                f"starting at {info.start - base}) overlaps tensor {prev.name}"
            )
    covered = 0
    for info in spans:
        if info.start - base != covered:
            raise CheckpointError(
                f"{path}: corrupt header: tensor {info.name} (data_offsets "
                f"starting at {info.start - base}) leaves bytes "
                f"{covered}..{info.start - base} of the data region unused"
            )
        covered += info.nbytes
    if base + covered != size:
        raise CheckpointError(
            f"{path}: corrupt safetensors file: the tensors cover {covered} "
            f"bytes of data but the file holds {size - base}"
        )
    return tensors, raw


def _entry_problem(meta) -> str:
    """Why a header entry is malformed ('' when it is not): strict types, as the
    reference parser's deserializer (offsets and dims are unsigned integers)."""
    if not isinstance(meta, dict):
        return f"a JSON {type(meta).__name__}, expected an object"
    if meta.get("dtype") not in DTYPE_BITS:
        return f"unknown dtype {meta.get('dtype')!r}"
    shape, offsets = meta.get("shape"), meta.get("data_offsets")
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        return f"shape {shape!r} is not a list of non-negative integers"
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_count(o) for o in offsets)
        or offsets[1] < offsets[0]
    ):
        return f"data_offsets {offsets!r} are not two non-negative integers [begin, end]"
    return ""


def _np_dtype(info: TensorInfo):
    if info.dtype not in NP_STORAGE:
        raise CheckpointError(f"{info.file}: tensor {info.name} has unsupported dtype {info.dtype}")
    return NP_STORAGE[info.dtype]


def read_into(info: TensorInfo, out: np.ndarray) -> None:
    """Read one tensor's bytes into ``out`` (C-contiguous, exactly info.nbytes bytes)."""
    view = memoryview(out.reshape(-1).view(np.uint8))
    if view.nbytes != info.nbytes:
        raise CheckpointError(
            f"{info.file}: tensor {info.name} holds {info.nbytes} bytes, "
            f"expected {view.nbytes} for shape {info.shape}"
        )
    try:
        with open_regular(info.file) as f:
            f.seek(info.start)
            done = 0
            while done < info.nbytes:
                got = f.readinto(view[done:])
                if not got:
                    raise CheckpointError(f"{info.file}: truncated while reading {info.name}")
                done += got
    except OSError as e:
        raise CheckpointError(f"{info.file}: cannot read tensor {info.name}: {e.strerror or e}") from e


def read_numpy(info: TensorInfo) -> np.ndarray:
    out = np.empty(info.shape, dtype=_np_dtype(info))
    read_into(info, out)
    return out


def read_mx(info: TensorInfo) -> mx.array:
    """One tensor as an MLX array of its own dtype (bf16 carried through as bits)."""
    a = mx.array(read_numpy(info))
    return a.view(mx.bfloat16) if info.dtype == "BF16" else a


def slice_info(info: TensorInfo, i: int) -> TensorInfo:
    """The i-th slice along the first axis (e.g. one expert of a stacked tensor)."""
    n = info.shape[0]
    if not 0 <= i < n:
        raise IndexError(f"{info.name}: slice {i} of {n}")
    per = info.nbytes // n
    return replace(
        info, name=f"{info.name}[{i}]", shape=info.shape[1:], start=info.start + i * per, nbytes=per
    )


def rows_info(info: TensorInfo, lo: int, hi: int) -> TensorInfo:
    """Slices lo..hi along the first axis, kept as one tensor (a block of rows)."""
    n = info.shape[0]
    if not 0 <= lo <= hi <= n:
        raise IndexError(f"{info.name}: rows {lo}:{hi} of {n}")
    per = info.nbytes // n if n else 0
    return replace(
        info,
        name=f"{info.name}[{lo}:{hi}]",
        shape=(hi - lo, *info.shape[1:]),
        start=info.start + lo * per,
        nbytes=(hi - lo) * per,
    )


# MLX dtype names (as in layout.output_tensors) -> safetensors dtype, and back.
ST_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "uint32": "U32", "int32": "I32"}
MLX_DTYPE = {v: k for k, v in ST_DTYPE.items()}


def shard_header(tensors, metadata=None) -> Tuple[bytes, Dict[str, int]]:
    """The header of a safetensors file holding ``tensors`` [(name, shape, MLX dtype name)]
    in that order, data tiled without gaps, and each tensor's absolute byte offset.
    The JSON is padded with spaces to a multiple of 8 bytes, so every tensor starts
    8-byte aligned (as the reference writer does)."""
    head: Dict[str, object] = {"__metadata__": dict(metadata or {})}
    sizes, off = [], 0
    for name, shape, dtype in tensors:
        nbytes = math.prod(shape) * DTYPE_BITS[ST_DTYPE[dtype]] // 8
        head[name] = {"dtype": ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [off, off + nbytes]}
        sizes.append((name, off))
        off += nbytes
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    base = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw, {name: base + o for name, o in sizes}


def pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of ``data`` (a C-contiguous buffer) at ``offset`` (os.pwrite may write
    less than asked, at most ~2 GiB per call on Linux)."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done : done + (1 << 30)], offset + done)
