"""Runs across machines (``mlx.launch``, or any MLX distributed group): the few
collective steps moequant's commands need on top of mlx-lm's pipeline and tensor
loading.

Every rank runs the same command. Ranks must agree on what they run (the same model,
the same data, the same arguments); when they do not, each rank must say so and exit
non-zero instead of waiting forever in a collective that the others never join. So each
command starts with ``agree``: every rank contributes the fingerprints of its inputs
and any error it met while checking them, every rank receives all of them, and every
rank raises the same ``UserError`` (exit 2) naming the first disagreement.

Decisions only rank 0 can take (is the reference cache reusable? did its checks pass?)
go through ``lead``: rank 0 runs a function, every rank receives its result or its
error. A rank that dies mid-run is not recoverable here: ``mlx.launch`` terminates the
others when one rank exits with an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import mlx.core as mx

from .errors import UserError, reported

# Every exchange is one all_gather of a fixed-size buffer (all ranks must pass the same
# shape): JSON of the rank's facts, padded with zeros. Long error texts are cut.
_BLOCK = 16384
_MAX_ERROR = 2000


def world():
    """The distributed group this process belongs to (size 1 when not launched)."""
    return mx.distributed.init()


def describe(group) -> str:
    return f"rank {group.rank()} of {group.size()}"


def _gather(group, payload: Dict[str, Any]) -> List[Dict[str, Any]]:
    raw = json.dumps(payload, sort_keys=True).encode()
    if len(raw) > _BLOCK:
        raise ValueError(f"distributed exchange of {len(raw)} bytes exceeds {_BLOCK}")
    buf = mx.array(list(raw) + [0] * (_BLOCK - len(raw)), dtype=mx.uint8)
    out = mx.distributed.all_gather(buf[None], group=group, stream=mx.cpu)
    mx.eval(out)
    rows = []
    for r in range(group.size()):
        b = bytes(memoryview(out[r]).tobytes()).rstrip(b"\0")
        rows.append(json.loads(b.decode()))
    return rows


def barrier(group) -> None:
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))


def agree(
    group, facts: Dict[str, Any], error: Optional[BaseException] = None, what: str = "moequant"
) -> None:
    """Every rank checks that all ranks hold the same ``facts`` (a JSON-able dict) and
    that none met an ``error``; otherwise every rank raises one UserError describing the
    first problem. A no-op in a single process (the caller raises its own error)."""
    if group.size() == 1:
        if error is not None:
            raise error
        return
    msg = None if error is None else (str(error) or type(error).__name__)[:_MAX_ERROR]
    rows = _gather(group, {"facts": facts, "error": msg})
    problem = None
    for r, row in enumerate(rows):
        if row["error"] is not None:
            problem = f"rank {r} of {group.size()}: {row['error']}"
            break
    if problem is None:
        for key in sorted(set().union(*(row["facts"].keys() for row in rows))):
            values = [row["facts"].get(key) for row in rows]
            if any(v != values[0] for v in values):
                shown = "; ".join(f"rank {r}: {_short(v)}" for r, v in enumerate(values))
                problem = (
                    f"the ranks disagree on {key} ({shown}); every rank must run "
                    "the same command on the same files"
                )
                break
    if problem is not None:
        # Let every rank print before any exits: mlx.launch terminates the others as
        # soon as one rank exits non-zero.
        print(f"{what} ({describe(group)}): error: {problem}", file=sys.stderr, flush=True)
        barrier(group)
        raise reported(problem)


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 80 else s[:77] + "..."


def lead(group, fn: Callable[[], Any], what: str = "moequant") -> Any:
    """``fn()`` run on rank 0 only; its (JSON-able) result on every rank, or its
    UserError raised on every rank."""
    if group.size() == 1:
        return fn()
    result, error = None, None
    if group.rank() == 0:
        try:
            result = fn()
        except UserError as e:
            error = e
    rows = _gather(
        group,
        {
            "result": result if group.rank() == 0 else None,
            "error": None if error is None else str(error)[:_MAX_ERROR],
        },
    )
    if rows[0]["error"] is not None:
        text = str(error) if error is not None else f"rank 0: {rows[0]['error']}"
        print(f"{what} ({describe(group)}): error: {text}", file=sys.stderr, flush=True)
        barrier(group)  # every rank has spoken before any exits
        raise reported(text)
    return rows[0]["result"]


def gather(group, value: Any) -> List[Any]:
    """Every rank's JSON-able ``value``, in rank order, on every rank."""
    if group.size() == 1:
        return [value]
    return [row["v"] for row in _gather(group, {"v": value})]


def model_identity(path: Path) -> str:
    """A cheap fingerprint of a model directory that every rank can compute, whatever
    shards it holds: its config.json and its weight index (every tensor name, the file
    that holds it, and the total size). Two different builds differ here."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        p = Path(path) / name
        h.update(name.encode() + b"\0")
        h.update(p.read_bytes() if p.is_file() else b"<missing>")
    return h.hexdigest()


def layer_split(model) -> Optional[List[int]]:
    """[start, end) of the decoder layers this rank holds in a pipelined model, or None
    when the model is not pipelined."""
    inner = getattr(model, "model", None)
    size = getattr(inner, "pipeline_size", 1)
    if inner is None or size <= 1:
        return None
    end = inner.end_idx if inner.end_idx is not None else len(inner.layers)
    return [int(inner.start_idx), int(end)]


@contextmanager
def quiet_unless_leader(group):
    """Rank 0 keeps stdout; the other ranks' normal output goes nowhere (errors still
    reach stderr), so a launched command prints one answer, not one per rank."""
    if group.size() == 1 or group.rank() == 0:
        yield
        return
    saved = sys.stdout
    with open(os.devnull, "w") as null:
        sys.stdout = null
        try:
            yield
        finally:
            sys.stdout = saved
