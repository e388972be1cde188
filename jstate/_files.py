"""Checkpoint directories on disk: the commit protocol, listing, and deletion.

A checkpoint is written into a hidden temporary directory next to its final path, flushed to
disk, and committed by one ``rename``: a directory at a checkpoint's final name is complete.
Old checkpoints are renamed to a hidden name before they are deleted, so a process killed
mid-deletion never leaves a half-deleted checkpoint under a listed name.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

_TMP = ".jstate-tmp"
_DELETING = ".jstate-deleting"
_REPLACED = ".jstate-replaced"


def temporary(final: Path) -> Path:
    """The hidden name `final` is written under before it is published."""
    return final.parent / f".{final.name}{_TMP}"


@contextlib.contextmanager
def atomic(path: Path) -> Iterator[Path]:
    """Write one file atomically: the block writes the path it is given; on success that file
    is flushed and renamed to `path` (replacing it), and the rename is flushed too. A failure
    or a kill leaves `path` as it was.

    >>> with atomic(Path("note.txt")) as tmp:
    ...     _ = tmp.write_text("hello")
    >>> Path("note.txt").read_text()
    'hello'
    """
    path = Path(path)
    tmp = temporary(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_dir(path.parent)


def sync_tree(directory: Path) -> None:
    """fsync every file and directory under `directory`, so a power loss keeps what was saved."""
    for root, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        sync_dir(Path(root))


def sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, final: Path) -> None:
    """Publish `tmp` as `final`, replacing an older jstate checkpoint of that name.

    Replacing takes two renames (old out of sight, new in place). A process killed between
    them leaves the old checkpoint under a hidden ``.replaced`` name, which `clean_stale` (the
    next save to that directory) puts back: no kill loses both.
    """
    sync_tree(tmp)
    old = None
    if final.exists():
        old = final.parent / f".{final.name}{_REPLACED}"
        _remove(old)
        os.rename(final, old)
    os.rename(tmp, final)
    sync_dir(final.parent)
    if old is not None:
        _remove(old)


def delete(path: Path) -> None:
    """Delete a checkpoint: first out of sight (one rename), then its files."""
    hidden = path.parent / f".{path.name}{_DELETING}"
    _remove(hidden)
    os.rename(path, hidden)
    sync_dir(path.parent)
    _remove(hidden)


def clean_stale(directory: Path) -> None:
    """Remove what killed saves and deletions left behind in `directory`."""
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if not entry.name.startswith("."):
            continue
        if entry.name.endswith(_REPLACED):
            original = directory / entry.name[1 : -len(_REPLACED)]
            if not original.exists():  # killed between the two renames of `commit`: put it back
                os.rename(entry, original)
                continue
        if entry.name.endswith((_TMP, _DELETING, _REPLACED)):
            _remove(entry)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def step_of(name: str, prefix: str) -> int | None:
    """The step in a checkpoint name ``<prefix>-<step>``, or None."""
    m = re.fullmatch(re.escape(prefix) + r"-(\d+)", name)
    return int(m.group(1)) if m else None
