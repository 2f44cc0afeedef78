"""Which files of a checkpoint may be read, and opening them safely.

Every file read resolves inside the checkpoint directory, with one exception: a
snapshot in a Hugging Face cache (``.../models--org--name/snapshots/REV``) holds
symlinks into its own repository's ``blobs`` directory, so targets there are allowed
too. Only regular files are opened, without blocking (a FIFO would hang a plain open)."""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath
from typing import Tuple

from .errors import CheckpointError


def allowed_roots(root: Path) -> Tuple[str, ...]:
    """Real directories a checkpoint's files may resolve into."""
    real = os.path.realpath(root)
    snapshots = os.path.dirname(real)
    repo = os.path.dirname(snapshots)
    roots = [real]
    if os.path.basename(snapshots) == "snapshots" and os.path.basename(repo).startswith("models--"):
        roots.append(os.path.join(repo, "blobs"))
    return tuple(roots)


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def resolve_inside(root: Path, rel, what: str, where) -> Path:
    """``root / rel`` for a name taken from the checkpoint itself (an index entry, a
    directory listing), refused unless it is a plain relative path that resolves inside
    the checkpoint (or its Hugging Face cache repository's blobs)."""
    if not isinstance(rel, str) or not rel:
        raise CheckpointError(f"{where}: {what} {rel!r} is not a file name")
    parts = PurePosixPath(rel).parts
    if rel.startswith(("/", "\\")) or os.path.isabs(rel) or ".." in parts or "\\" in rel:
        raise CheckpointError(f"{where}: {what} {rel!r} is not a relative path inside the checkpoint")
    path = Path(root) / rel
    real = os.path.realpath(path)
    if not any(_within(real, r) for r in allowed_roots(root)):
        raise CheckpointError(f"{where}: {what} {rel!r} resolves to {real}, outside the checkpoint {root}")
    return path


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path: Path, what: str = "") -> os.stat_result:
    """stat (following symlinks) and refuse anything but a regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        dangling = os.path.islink(path)
        raise CheckpointError(
            f"{path}: {what + ' ' if what else ''}{'is a dangling symlink' if dangling else 'does not exist'}"
        ) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(
            f"{path}: cannot read{' ' + what if what else ''}: it is {_kind(st.st_mode)}, not a regular file"
        )
    return st


def open_regular(path: Path):
    """Open a regular file for binary reading (unbuffered). O_NONBLOCK makes opening a
    FIFO return at once; fstat then refuses it, so nothing ever blocks."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if isinstance(e, FileNotFoundError) and os.path.islink(path):
            raise CheckpointError(f"{path}: is a dangling symlink") from None
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: cannot read: it is {_kind(st.st_mode)}, not a regular file")
    return os.fdopen(fd, "rb", buffering=0)


def read_text(path: Path) -> str:
    with open_regular(path) as f:
        data = f.readall()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text: {e}") from None
