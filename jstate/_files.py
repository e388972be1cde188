"""Checkpoint directories on disk: the commit protocol, listing, and deletion.

A checkpoint is written into a hidden temporary directory next to its final path, flushed to
disk, and committed by one ``rename``: a directory at a checkpoint's final name is complete.
Old checkpoints are renamed to a hidden name before they are deleted, so a process killed
mid-deletion never leaves a half-deleted checkpoint under a listed name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from ._errors import CheckpointError, CorruptCheckpointError
from ._integrity import checksum

MANIFEST = "jstate.json"
ARRAYS = "arrays"
FORMAT = "jstate.checkpoint"
_TMP = ".jstate-tmp"
_DELETING = ".jstate-deleting"
_REPLACED = ".jstate-replaced"


def temporary(final: Path) -> Path:
    return final.parent / f".{final.name}{_TMP}"


# The manifest is one JSON object whose first member is the CRC32C of the bytes after it, so it
# is checked without re-serializing it: {"checksum":"1a2b3c4d", ...rest}.
_HEAD = b'{"checksum":"'
_HEAD_LEN = len(_HEAD) + 8 + 2  # the hex digits, then '",'


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest with a checksum of its own content, and flush it to disk."""
    rest = json.dumps({k: v for k, v in manifest.items() if k != "checksum"}, separators=(",", ":"))
    rest = rest[1:].encode()  # without its "{"
    with open(directory / MANIFEST, "wb") as f:
        f.write(_HEAD + b"%08x" % checksum(rest) + b'",' + rest)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a jstate checkpoint, None if `directory` has none."""
    path = directory / MANIFEST
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CorruptCheckpointError(f"Checkpoint {directory}: cannot read {path.name} ({e.strerror}).") from e
    try:
        if not text.startswith(_HEAD) or int(text[len(_HEAD) : _HEAD_LEN - 2], 16) != checksum(text[_HEAD_LEN:]):
            raise ValueError("checksum mismatch")
        manifest = json.loads(text)
        if manifest.get("format") != FORMAT or not isinstance(manifest.get("variables"), dict):
            raise ValueError("not a jstate manifest")
    except (ValueError, AttributeError, TypeError) as e:
        raise CorruptCheckpointError(
            f"Checkpoint {directory}: its manifest {path} is damaged ({type(e).__name__}). "
            "Restore an earlier checkpoint."
        ) from e
    return manifest


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


def check_replaceable(final: Path) -> None:
    """Refuse to save over anything at `final` but a jstate checkpoint (never delete user files)."""
    if final.exists() and not (final / MANIFEST).is_file():
        raise CheckpointError(
            f"Cannot save to {final}: it exists and is not a jstate checkpoint, and saving would replace it. "
            f"Save under a prefix inside it instead, e.g. `saver.save(state, '{final}/model', step=...)`."
        )


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
