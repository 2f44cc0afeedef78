"""A source checkpoint directory: config, shard index, tensor headers, and validation of
all of it against the layout the config implies, before any tensor data is read."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Dict, List, Tuple

from .config import SourceConfig, read_config
from .errors import CheckpointError
from .files import check_regular, read_text, resolve_inside
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
    def __init__(self, path, cfg: SourceConfig, tensors: Dict[str, TensorInfo], headers: Dict[str, bytes]):
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
        tensors, headers = read_tensors(path)
        index = path / INDEX
        check_counts(cfg, tensors, index if os.path.lexists(index) else path)
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
                    f"config.json implies {list(exp.shape)}"
                )
            if info.dtype not in _KIND_DTYPES[exp.kind]:
                raise CheckpointError(
                    f"{info.file}: tensor {name} has dtype {info.dtype}; expected "
                    f"{' or '.join(_KIND_DTYPES[exp.kind])}"
                )
        for name, info in self.tensors.items():
            if name in self.expect or is_dropped(name, cfg):
                continue
            if name.endswith("weight_zero_point"):
                raise CheckpointError(
                    f"{info.file}: tensor {name} is a zero point: asymmetric INT4 is not supported"
                )
            if cfg.scheme is None and name.endswith("weight_packed"):
                raise CheckpointError(
                    f"{info.file}: tensor {name} is INT4-packed but config.json has no quantization_config"
                )
            if name.endswith(("weight_packed", "weight_scale", "weight_shape")):
                raise CheckpointError(
                    f"{info.file}: tensor {name} is INT4-packed; only routed experts may be"
                )
            raise CheckpointError(
                f"{info.file}: unexpected tensor {name}: not part of a {cfg.flavour} model "
                "with this config.json"
            )

    def unit_input_bytes(self, unit: Unit) -> int:
        return sum(self.tensors[s].nbytes for j in unit.jobs for s in j.sources)

    def fingerprint(self) -> str:
        """Identifies the source cheaply: config.json, and each shard's name, size and
        header (the header holds every tensor's name, dtype, shape and offsets)."""
        h = hashlib.sha256(read_text(self.path / "config.json").encode())
        for fname in sorted(self._headers):
            h.update(fname.encode())
            h.update(str((self.path / fname).stat().st_size).encode())
            h.update(hashlib.sha256(self._headers[fname]).digest())
        return h.hexdigest()

    def side_files(self, skip=()) -> List[Path]:
        """The small files mlx-lm keeps next to the weights (tokenizer, chat template,
        remote code): the regular files of the checkpoint that are not weights, config,
        index or hidden. Subdirectories are not copied; an entry resolving outside the
        checkpoint, a FIFO or a dangling symlink is refused, naming it."""
        out = []
        for p in sorted(self.path.iterdir()):
            if (
                p.name in ("config.json", INDEX, *skip)
                or p.name.endswith(".safetensors")
                or p.name.startswith(".")
            ):
                continue
            if os.path.isdir(p):
                continue
            resolve_inside(self.path, p.name, "file", self.path)
            check_regular(p, "side file")
            out.append(p)
        return out


def _missing_message(name: str, src: Source, where) -> str:
    cfg = src.cfg
    base = name.rsplit(".", 1)[0]
    if cfg.scheme is not None and base + ".weight" in src.tensors:
        return (
            f"{where}: config.json declares INT4 experts but tensor {base}.weight is "
            f"not packed (expected {name})"
        )
    if cfg.scheme is None and base + ".weight_packed" in src.tensors:
        return (
            f"{where}: tensor {base}.weight_packed is INT4-packed but config.json has no quantization_config"
        )
    return f"{where}: tensor {name} is missing from the checkpoint"


def read_tensors(path: Path) -> Tuple[Dict[str, TensorInfo], Dict[str, bytes]]:
    """Every tensor of the model directory ``path`` (name -> TensorInfo, from the
    validated headers: read_header) and each shard's raw header. With an index, only
    the shards and tensors it lists (each one checked to exist); without, every
    *.safetensors file. The one reader of a directory's headers (convert, plan, inspect)."""
    index = path / INDEX
    if os.path.lexists(index):
        index = resolve_inside(path, INDEX, "file", path)
        try:
            data = json.loads(read_text(index))
        except RecursionError:
            raise CheckpointError(f"{index}: cannot parse: nested too deeply") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{index}: cannot parse: {e}") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map is missing or not an object")
        for name, fname in weight_map.items():
            if not isinstance(fname, str):
                raise CheckpointError(f"{index}: weight_map entry {name!r} is {fname!r}, not a file name")
        files = sorted(set(weight_map.values()))
        for fname in files:  # every entry checked before any shard is opened
            resolve_inside(path, fname, "weight_map entry", index)
    else:
        weight_map = None
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no {INDEX} and no *.safetensors files")
    tensors: Dict[str, TensorInfo] = {}
    headers: Dict[str, bytes] = {}
    for fname in files:
        fpath = resolve_inside(path, fname, "shard", index if weight_map is not None else path)
        if not os.path.lexists(fpath):
            raise CheckpointError(f"{index}: lists {fname}, which does not exist")
        check_regular(fpath, "shard")
        infos, raw = read_header(fpath)
        headers[fname] = raw
        for name, info in infos.items():
            if weight_map is None or weight_map.get(name) == fname:
                tensors[name] = info
    if weight_map is not None:
        for name, fname in weight_map.items():
            if name not in tensors:
                raise CheckpointError(
                    f"{path / fname}: tensor {name} is listed in {INDEX} but missing from this file"
                )
    return tensors, headers


_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")


def check_counts(cfg: SourceConfig, tensors: Dict[str, TensorInfo], where) -> None:
    """The config's layer and expert counts against the tensors the shards hold, before
    a table is built from the config (a wrong count is then one clear error instead of
    one 'missing tensor' per absent layer or expert)."""
    layers, experts = set(), set()
    for name in tensors:
        m = _LAYER.search(name)
        if m:
            layers.add(int(m.group(1)))
            e = _EXPERT.search(name, m.end() - 1)
            if e:
                experts.add(int(e.group(1)))
    key = "text_config." if cfg.prefix else ""
    have = (max(layers) + 1) if layers else 0
    if cfg.num_layers > have:
        raise CheckpointError(
            f"{cfg.path / 'config.json'}: {key}num_hidden_layers is "
            f"{cfg.num_layers}, but the tensors in {where} hold {have} layers"
        )
    E = cfg.text.get("n_routed_experts")
    have = (max(experts) + 1) if experts else 0
    if E is not None and cfg.num_moe_layers and E > have:
        raise CheckpointError(
            f"{cfg.path / 'config.json'}: {key}n_routed_experts is {E}, "
            f"but the tensors in {where} hold {have} experts per layer"
        )
