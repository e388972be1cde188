"""Where checkpoints live: local paths, and ``gs://`` and ``s3://`` object stores, behind one
interface (`base.Store`). Every file operation of jstate above this package goes through here.

`as_path` turns what users write into a path; `store_for` picks the store of a path, once; each
function below is that store's method of the same name (`store_for(path).exists(path)`), so a
call site reads ``_storage.exists(path)`` and never asks which kind of store it is. What a store
can do (`renames`, `shared`, `round_trips`, `map`, `within`) is asked of `store_for(path)`.
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from ..core.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from .base import File, Store, by_child
from .local import LocalStore
from .local import open_regular as _local_open
from .local import too_large as too_large
from .remote import RemoteStore

__all__ = ["File", "Store", "as_path", "by_child", "safe_join", "store_for"]

SCHEMES = ("gs", "s3")  # object stores jstate reads and writes

UNSUPPORTED = (
    "{path}: jstate reads and writes local paths, gs://bucket/... (Google Cloud Storage) and "
    "s3://bucket/... (Amazon S3 and compatible stores), not {scheme}://. Mount it, or copy the "
    "checkpoint to one of those. Nothing was read or written."
)

_LOCAL = LocalStore()


@functools.cache
def _remote(scheme: str) -> RemoteStore:
    return RemoteStore(scheme)


def store_for(path: Any) -> Store:
    """The store that holds `path` (as `as_path` makes it): a `RemoteStore` for a ``gs://`` or
    ``s3://`` URL, the `LocalStore` for anything else.

    >>> type(store_for(as_path("ckpt"))).__name__, store_for(as_path("gs://bucket/ckpt")).round_trips
    ('LocalStore', True)
    """
    if isinstance(path, PurePath) and not isinstance(path, Path):  # an etils.epath.Path of a URL
        scheme = str(path).split("://", 1)[0]
        if scheme in SCHEMES:
            return _remote(scheme)
    return _LOCAL


def as_path(path: str | os.PathLike) -> Path:
    """A path as users write it: str or `os.PathLike`, relative or with ``~``, or a URL
    ``gs://bucket/prefix`` or ``s3://bucket/prefix``.

    Raises:
      CheckpointError: for a URL of another scheme, or without a bucket; `pathlib` would turn
        ``hdfs://host/ckpt`` into a local directory named ``hdfs:``.
      CheckpointNotFoundError: for an empty path.
      CheckpointError: for a path holding a NUL byte.

    >>> as_path("ckpt/model"), str(as_path("gs://bucket/ckpt/"))
    (PosixPath('ckpt/model'), 'gs://bucket/ckpt')
    >>> as_path("hdfs://cluster/ckpt")
    Traceback (most recent call last):
    jstate.core.errors.CheckpointError: hdfs://cluster/ckpt: jstate reads and writes local paths, ...
    """
    if store_for(path) is not _LOCAL:
        return path  # type: ignore[return-value]
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text:
        raise CheckpointNotFoundError("No checkpoint at '': the path is empty. Give a checkpoint or a directory.")
    if "\0" in text:  # (the OS would refuse it with a bare ValueError, at whichever call came first)
        raise CheckpointError(
            f"{text!r}: a path cannot hold a NUL byte ('\\0'); it is no file name on any file system or store. "
            "Check how the path was built (a C string, a fixed-width field). Nothing was read or written."
        )
    if "://" not in text:
        local = Path(text).expanduser()
        if local.parts and local.parts[0] in ("gs:", "s3:"):  # a URL that went through pathlib
            raise CheckpointError(
                f"{text}: this looks like a {local.parts[0]}// URL that lost a '/' (pathlib.Path turns "
                f"'{local.parts[0]}//bucket/x' into '{local.parts[0]}/bucket/x'). Pass the URL as a str. "
                "Nothing was read or written."
            )
        return local
    scheme, _, rest = text.partition("://")
    if scheme not in SCHEMES:
        raise CheckpointError(UNSUPPORTED.format(path=text, scheme=scheme))
    if not rest.split("/", 1)[0]:
        raise CheckpointError(f"{text}: a {scheme}:// path names a bucket first: {scheme}://BUCKET/PREFIX.")
    if any(part in (".", "..") for part in rest.rstrip("/").split("/")):
        # Object keys are literal: Orbax would normalize them and jstate would not, splitting
        # one checkpoint between two prefixes.
        raise CheckpointError(
            f"{text}: '.' and '..' are not directories on an object store; write the prefix without them. "
            "Nothing was read or written."
        )
    from etils import epath  # imported only for a URL: importing jstate stays cheap

    return epath.Path(f"{scheme}://{rest.rstrip('/')}")


def safe_join(directory: Path, rel: str, checkpoint: Path, resolve: bool = True) -> Path:
    """`directory / rel`, refusing paths that would leave `directory` (a crafted manifest).

    Symbolic links are followed only inside the checkpoint: `resolve` (the default) refuses a
    path whose real location is outside (`Store.inside`).

    Raises:
      CorruptCheckpointError: `rel` is absolute, holds ``..``, or leads outside `checkpoint`.

    >>> safe_join(Path("ckpt"), "arrays/x", Path("ckpt"))
    PosixPath('ckpt/arrays/x')
    >>> safe_join(Path("ckpt"), "../etc/passwd", Path("ckpt"))
    Traceback (most recent call last):
    jstate.core.errors.CorruptCheckpointError: Checkpoint ckpt: its manifest names the file '../etc/passwd', outside ...
    """
    path = directory / rel
    if rel.startswith("/") or ".." in rel.split("/") or (resolve and not store_for(path).inside(path, checkpoint)):
        raise CorruptCheckpointError(
            f"Checkpoint {checkpoint}: its manifest names the file {rel!r}, outside the checkpoint. "
            "It was not written by jstate; refusing to read it."
        )
    return path


# -- the stores' methods, dispatched once per call (see `base.Store` for what each does) -----------
def exists(path: Path) -> bool:
    return store_for(path).exists(path)


def is_dir(path: Path) -> bool:
    return store_for(path).is_dir(path)


def is_file(path: Path) -> bool:
    return store_for(path).is_file(path)


def is_symlink(path: Path) -> bool:
    return store_for(path).is_symlink(path)


def is_mount(path: Path) -> bool:
    return store_for(path).is_mount(path)


def listdir(path: Path) -> list[str]:
    return store_for(path).listdir(path)


def iterdir(path: Path) -> list[Path]:
    return [path / name for name in listdir(path)]


# Where a reader names no kind of file: no file jstate reads (a manifest of a million variables
# among them) comes near it, and what a hostile file can cost stays bounded.
LIMIT = 1 << 30


def read_bytes(path: Path, limit: int = LIMIT, what: str = "file") -> bytes:
    """`Store.read_bytes`: regular files only, at most `limit` bytes."""
    return store_for(path).read_bytes(path, limit, what)


def open_regular(path: Path, what: str = "file") -> contextlib.AbstractContextManager[tuple[int, os.stat_result]]:
    """A local regular file open for reading, with its stat (`local.open_regular`): for readers
    of formats that only local files hold (TensorFlow's)."""
    return _local_open(path, what)


def read_range(path: Path, start: int, length: int, what: str = "file") -> bytes | np.ndarray:
    return store_for(path).read_range(path, start, length, what)


def size(path: Path) -> int:
    return store_for(path).size(path)


def mtime(path: Path) -> float:
    return store_for(path).mtime(path)


def files(directory: Path, prefix: str = "") -> dict[str, File]:
    """`Store.files`.

    >>> _ = jstate.Saver().save(state, "ckpt/model", step=1)
    >>> sorted(files(Path("ckpt"), "model"))[-1]
    'model-1/jstate.json'
    """
    return store_for(directory).files(directory, prefix)


def mapped(path: Path) -> contextlib.AbstractContextManager[bytes | mmap.mmap]:
    return store_for(path).mapped(path)


def local_path(path: Path) -> Path | None:
    return store_for(path).local_path(path)


def atomic(path: Path) -> contextlib.AbstractContextManager[Path]:
    return store_for(path).atomic(path)


def write_bytes(path: Path, data: bytes) -> None:
    store_for(path).write_bytes(path, data)


def touch(path: Path) -> None:
    store_for(path).touch(path)


def create_marked(directory: Path, marker: str) -> None:
    store_for(directory).create_marked(directory, marker)


def makedirs(directory: Path) -> None:
    store_for(directory).makedirs(directory)


def sync_dir(directory: Path) -> None:
    store_for(directory).sync_dir(directory)


def sync_tree(directory: Path) -> None:
    store_for(directory).sync_tree(directory)


def check_name_lengths(path: Path, longest_extra: int = 0) -> None:
    store_for(path).check_name_lengths(path, longest_extra)


def rename(source: Path, target: Path) -> None:
    store_for(source).rename(source, target)


def link(source: Path, target: Path) -> None:
    store_for(source).link(source, target)


def unlink(path: Path) -> None:
    store_for(path).unlink(path)


def version(path: Path) -> str | None:
    return store_for(path).version(path)


def unlink_if(path: Path, version: str) -> bool:
    return store_for(path).unlink_if(path, version)


def remove(path: Path) -> None:
    store_for(path).remove(path)


def remove_empty_dir(directory: Path) -> None:
    store_for(directory).remove_empty_dir(directory)


def absolute(path: Path) -> Path:
    return store_for(path).absolute(path)


def is_bucket(path: Path) -> bool:
    return store_for(path).is_bucket(path)
