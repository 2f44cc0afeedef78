"""Per-tensor access to safetensors files: headers are parsed once, tensors are read one
at a time with positioned reads straight into their destination buffer.

We read the container ourselves rather than through ``safe_open`` because numpy has no
bfloat16 (safetensors' numpy path rejects it and torch is not a dependency), because
expert tensors are read directly into a slot of a preallocated (E, N, K/8) stack, and
because a truncated file must be reported with the file and tensor names.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

import mlx.core as mx
import numpy as np

from .errors import CheckpointError

# safetensors dtype -> storage dtype in numpy and in MLX (bf16 is carried as uint16 bits).
NP_STORAGE = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "I32": np.int32,
              "U32": np.uint32, "I64": np.int64}
MX_STORAGE = {"BF16": mx.uint16, "F16": mx.float16, "F32": mx.float32, "I32": mx.int32,
              "U32": mx.uint32, "I64": mx.int64}

_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    name: str
    dtype: str
    shape: Tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> Tuple[Dict[str, TensorInfo], bytes]:
    """Parse a safetensors header. Returns the tensors and the raw header bytes (used to
    fingerprint the file). Raises CheckpointError for unreadable, malformed or truncated
    files."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors header")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from e
    tensors = {}
    base = 8 + n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = meta["data_offsets"]
            info = TensorInfo(path, name, meta["dtype"], tuple(meta["shape"]), base + begin,
                              end - begin)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name}") from e
        if base + end > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name} ends at byte {base + end} "
                f"but the file has {size} bytes"
            )
        tensors[name] = info
    return tensors, raw


def _np_dtype(info: TensorInfo):
    if info.dtype not in NP_STORAGE:
        raise CheckpointError(
            f"{info.file}: tensor {info.name} has unsupported dtype {info.dtype}"
        )
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
        with open(info.file, "rb", buffering=0) as f:
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
