"""A source checkpoint directory: config, shard index, tensor headers, and validation of
all of it against the layout the config implies, before any tensor data is read."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict

from .config import SourceConfig, read_config
from .errors import CheckpointError
from .layout import Unit, build_layout, is_dropped
from .safetensors_io import TensorInfo, read_header

INDEX = "model.safetensors.index.json"
_KIND_DTYPES = {
    "float": ("BF16", "F16", "F32"),
    "fp32": ("F32", "BF16", "F16"),
    "packed": ("I32", "U32"),
    "shape": ("I32", "I64"),
}


class Source:
    def __init__(self, path, cfg: SourceConfig, tensors: Dict[str, TensorInfo],
                 headers: Dict[str, bytes]):
        self.path = Path(path)
        self.cfg = cfg
        self.tensors = tensors
        self._headers = headers
        self.units, self.expect = build_layout(cfg)

    @classmethod
    def open(cls, path) -> "Source":
        """Read config.json, the index and every shard header, and validate them."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a directory")
        cfg = read_config(path)
        tensors, headers = _read_tensors(path)
        src = cls(path, cfg, tensors, headers)
        src.validate()
        return src

    def validate(self) -> None:
        cfg, index = self.cfg, self.path / INDEX
        where = index if index.exists() else self.path
        for name, exp in self.expect.items():
            info = self.tensors.get(name)
            if info is None:
                raise CheckpointError(_missing_message(name, self, where))
            if info.shape != exp.shape:
                raise CheckpointError(
                    f"{info.file}: tensor {name} has shape {list(info.shape)}, but "
                    f"config.json implies {list(exp.shape)}")
            if info.dtype not in _KIND_DTYPES[exp.kind]:
                raise CheckpointError(
                    f"{info.file}: tensor {name} has dtype {info.dtype}; expected "
                    f"{' or '.join(_KIND_DTYPES[exp.kind])}")
        for name, info in self.tensors.items():
            if name in self.expect or is_dropped(name, cfg):
                continue
            if name.endswith("weight_zero_point"):
                raise CheckpointError(f"{info.file}: tensor {name} is a zero point: "
                                      "asymmetric INT4 is not supported")
            if cfg.scheme is None and name.endswith("weight_packed"):
                raise CheckpointError(
                    f"{info.file}: tensor {name} is INT4-packed but config.json has no "
                    "quantization_config")
            if name.endswith(("weight_packed", "weight_scale", "weight_shape")):
                raise CheckpointError(
                    f"{info.file}: tensor {name} is INT4-packed; only routed experts may be")
            raise CheckpointError(
                f"{info.file}: unexpected tensor {name}: not part of a {cfg.flavour} model "
                "with this config.json")

    def unit_input_bytes(self, unit: Unit) -> int:
        return sum(self.tensors[s].nbytes for j in unit.jobs for s in j.sources)

    def fingerprint(self) -> str:
        """Identifies the source cheaply: config.json, and each shard's name, size and
        header (the header holds every tensor's name, dtype, shape and offsets)."""
        h = hashlib.sha256((self.path / "config.json").read_bytes())
        for fname in sorted(self._headers):
            h.update(fname.encode())
            h.update(str((self.path / fname).stat().st_size).encode())
            h.update(hashlib.sha256(self._headers[fname]).digest())
        return h.hexdigest()


def _missing_message(name: str, src: Source, where) -> str:
    cfg = src.cfg
    base = name.rsplit(".", 1)[0]
    if cfg.scheme is not None and base + ".weight" in src.tensors:
        return (f"{where}: config.json declares INT4 experts but tensor {base}.weight is "
                f"not packed (expected {name})")
    if cfg.scheme is None and base + ".weight_packed" in src.tensors:
        return (f"{where}: tensor {base}.weight_packed is INT4-packed but config.json has "
                "no quantization_config")
    return f"{where}: tensor {name} is missing from the checkpoint"


def _read_tensors(path: Path):
    index = path / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: cannot parse: {e}") from e
        files = sorted(set(weight_map.values()))
    else:
        weight_map = None
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no {INDEX} and no *.safetensors files")
    tensors: Dict[str, TensorInfo] = {}
    headers: Dict[str, bytes] = {}
    for fname in files:
        fpath = path / fname
        if not fpath.exists():
            raise CheckpointError(f"{index}: lists {fname}, which does not exist")
        infos, raw = read_header(fpath)
        headers[fname] = raw
        for name, info in infos.items():
            if weight_map is None or weight_map.get(name) == fname:
                tensors[name] = info
    if weight_map is not None:
        for name, fname in weight_map.items():
            if name not in tensors:
                raise CheckpointError(f"{path / fname}: tensor {name} is listed in {INDEX} "
                                      "but missing from this file")
    return tensors, headers
