"""The storage interface: what jstate asks of a place that holds files, one class per kind of
store (fsspec's `AbstractFileSystem` is the model). `store.store_for` picks one per path, once;
callers use its module functions (`store.exists(path)`), or `store_for(path)` for what the
store can do.

What the two kinds of storage offer, and all the commit rule (`formats.commit`) relies on:

  operation              local file system (`LocalStore`)   object store (`RemoteStore`)
  atomic write (`atomic`) temporary file, fsync, rename     one PUT: the object appears whole
  directories            created and fsynced (`makedirs`)  none: a prefix exists while an object does
  durability             fsync of files and directories     an object is durable once written
  listing, size, delete  os                                fsspec (gcsfs, s3fs), no listing cache

Nothing spanning several objects is atomic on an object store, and a rename is a copy and a
delete: the commit rule renames no directory, and writes the manifest last, as one object.

Callers never ask which kind a store is. Where an algorithm depends on the store, it asks for
the property it relies on, each an attribute of the store:

  renames      a rename is atomic (a manifest can be taken in one step; Orbax can commit a
               directory by renaming it); where not, a file is deleted only while it is still
               the version that was read (`version`, `unlink_if`)
  shared       processes of many machines write it: a writer's token is judged by its age
               (`tokens.alive`), since a pid or a host name could be anyone's
  round_trips  each request is a network round trip: what is judged over many files is judged
               from one listing (`files`), requests overlap (`map`), and a call that only
               reads is bounded by a deadline (`within`); reading back what was just written
               costs a download
"""

from __future__ import annotations

import abc
import contextlib
import mmap
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np

T = TypeVar("T")
U = TypeVar("U")


class File(NamedTuple):
    """A file as a listing (`Store.files`) tells it."""

    size: int
    crc32c: int | None  # the store's own CRC32C, where it keeps one (GCS does); else None
    mtime: float  # when it was written, by the store's clock (seconds since the epoch; 0: unknown)


def by_child(listed: dict[str, File]) -> dict[str, dict[str, File]]:
    """A listing (`Store.files`) grouped by first part: ``{child: {path below it: file}}``, where
    the path ``""`` is the child itself, a file.

    >>> by_child({"a/x": File(1, None, 0), "a/y/z": File(2, None, 0), "b": File(3, None, 0)})
    {'a': {'x': File(size=1, crc32c=None, mtime=0), 'y/z': File(size=2, crc32c=None, mtime=0)}, 'b': {'': File(size=3, crc32c=None, mtime=0)}}
    """
    out: dict[str, dict[str, File]] = {}
    for rel, file in listed.items():
        child, _, below = rel.partition("/")
        out.setdefault(child, {})[below] = file
    return out


class Store(abc.ABC):
    """Files on one kind of storage. A path is a `pathlib.Path` locally, an `etils.epath.Path`
    (used only as a pure path) on an object store; `store.as_path` makes both.

    Every method takes a path of this store. Missing files: reading raises FileNotFoundError
    (`read_bytes`, `size`, `mtime`); asking answers False or empty (`exists`, `listdir`,
    `files`); deleting is no error (`unlink`, `remove`).

    >>> from jstate.storage.store import as_path, store_for
    >>> path = as_path("notes/a.txt")
    >>> store = store_for(path)
    >>> store.makedirs(path.parent); store.write_bytes(path, b"hello")
    >>> store.read_bytes(path, 100, "note"), store.files(path.parent), store.renames
    (b'hello', {'a.txt': File(size=5, crc32c=None, mtime=...)}, True)
    """

    scheme: str  # how its URLs begin: "gs", "s3"; "file" for local paths
    renames: bool  # see the module docstring
    shared: bool
    round_trips: bool

    # -- reading ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def exists(self, path: Path) -> bool: ...

    @abc.abstractmethod
    def is_dir(self, path: Path) -> bool:
        """A local directory (following links), or a prefix some object lies under."""

    @abc.abstractmethod
    def is_file(self, path: Path) -> bool: ...

    def is_symlink(self, path: Path) -> bool:
        return False  # (only a local file system has links)

    def is_mount(self, path: Path) -> bool:
        """Whether `path` is a mount point: another file system, or another directory bind-mounted
        there. Like a link, what it holds is not the directory's it lies in."""
        return False  # (only a local file system has mount points)

    @abc.abstractmethod
    def listdir(self, path: Path) -> list[str]:
        """The names in directory `path`; [] where there is none."""

    @abc.abstractmethod
    def read_bytes(self, path: Path, limit: int, what: str) -> bytes:
        """The contents of file `path`, a `what` ("manifest", "state file") of at most `limit`
        bytes: a special file (a FIFO, a device, a directory) is never opened, and a larger one
        never read (see `local.open_regular`).

        Raises:
          FileNotFoundError: `path` does not exist.
          CheckpointError: it is no regular file, holds more than `limit` bytes, or cannot be
            read (permissions), naming it and why.
        """

    @abc.abstractmethod
    def read_range(self, path: Path, start: int, length: int, what: str) -> bytes | np.ndarray:
        """Bytes ``start`` to ``start + length`` of file `path` (fewer where it ends sooner): one
        ranged request on an object store; locally read straight into a fresh, writable uint8
        array. Raises as `read_bytes`."""

    @abc.abstractmethod
    def size(self, path: Path) -> int:
        """The size of file `path` in bytes."""

    @abc.abstractmethod
    def mtime(self, path: Path) -> float:
        """When file `path` was last written (seconds since the epoch; 0 where the store does not say)."""

    @abc.abstractmethod
    def files(self, directory: Path, prefix: str = "") -> dict[str, File]:
        """Every file under `directory` (whose first part below it starts with `prefix`), by
        path relative to it, in one listing on an object store (a request per file would add
        up). Locally, the regular files reached through no symbolic link: those are inside
        `directory` (others need `store.safe_join`'s check)."""

    @abc.abstractmethod
    def mapped(self, path: Path) -> contextlib.AbstractContextManager[bytes | mmap.mmap]:
        """The contents of file `path` as a buffer: mapped into memory locally (no copy), downloaded from a store."""

    def local_path(self, path: Path) -> Path | None:
        """`path` itself where libraries that open only local files can open it, else None."""
        return None

    # -- writing ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def atomic(self, path: Path) -> contextlib.AbstractContextManager[Path]:
        """Write file `path` atomically: the block writes the local file it is given; on success it
        becomes `path` whole (replacing it), and a failure or a kill leaves `path` as it was."""

    def write_bytes(self, path: Path, data: bytes) -> None:
        """Write file `path` atomically (see `atomic`)."""
        with self.atomic(path) as tmp:
            tmp.write_bytes(data)

    @abc.abstractmethod
    def touch(self, path: Path) -> None:
        """Create an empty file (a marker); not flushed."""

    @abc.abstractmethod
    def create_marked(self, directory: Path, marker: str) -> None:
        """Create `directory` (and its parents) holding the empty file `marker`: a write killed at
        any moment leaves nothing or the directory with its marker, never an empty directory
        that nothing would remove. An existing `directory` just gets the marker."""

    @abc.abstractmethod
    def makedirs(self, directory: Path) -> None:
        """Create `directory` and its parents durably."""

    @abc.abstractmethod
    def sync_dir(self, directory: Path) -> None:
        """Flush a directory's entries, so a power loss keeps them."""

    @abc.abstractmethod
    def sync_tree(self, directory: Path) -> None:
        """Flush every file and directory under `directory`."""

    @abc.abstractmethod
    def check_name_lengths(self, path: Path, longest_extra: int = 0) -> None:
        """Raise OSError(ENAMETOOLONG) before anything is written if a part of `path`, or its
        last part with `longest_extra` more characters (a temporary name), is too long for the store."""

    def rename(self, source: Path, target: Path) -> None:
        """Rename `source` to `target` atomically; only where `renames`."""
        raise NotImplementedError(f"{type(self).__name__} renames nothing atomically.")

    def link(self, source: Path, target: Path) -> None:
        """Make `target` a hard link to `source`, failing with FileExistsError if it exists; only where `renames`."""
        raise NotImplementedError(f"{type(self).__name__} has no links.")

    def version(self, path: Path) -> str | None:
        """An identifier of the current contents of file `path` (GCS's generation, S3's ETag), which
        any write changes; None if it does not exist. Only where not `renames`."""
        raise NotImplementedError(f"{type(self).__name__} keeps no versions of files.")

    def unlink_if(self, path: Path, version: str) -> bool:
        """Delete file `path` only if its contents are still `version`, in one request the store
        checks (a precondition); False if they changed or it is gone. Only where not `renames`.
        A store that ignores the precondition deletes it whatever its version."""
        raise NotImplementedError(f"{type(self).__name__} keeps no versions of files.")

    @abc.abstractmethod
    def unlink(self, path: Path) -> None:
        """Delete file `path`; one already gone is no error."""

    @abc.abstractmethod
    def remove(self, path: Path) -> None:
        """Delete a file or a directory tree; what is already gone is no error. A tree that is or
        holds a mount point (`is_mount`) is left as it is: its files are another directory's."""

    @abc.abstractmethod
    def remove_empty_dir(self, directory: Path) -> None:
        """Remove `directory` if it is empty: never what another writer has just put in it."""

    # -- paths -----------------------------------------------------------------------------------
    def absolute(self, path: Path) -> Path:
        """`path` as a library that refuses relative paths takes it (Orbax)."""
        return path

    def is_bucket(self, path: Path) -> bool:
        """Whether `path` is a whole bucket (``gs://bucket``), with no prefix in it."""
        return False

    def inside(self, path: Path, directory: Path) -> bool:
        """Whether `path`, which names a place under `directory`, really is there once symbolic
        links are followed (an object store has no links)."""
        return True

    # -- calls -----------------------------------------------------------------------------------
    def within(self, seconds: float | None, fn: Callable[[], T], where: str) -> T:
        """``fn()``, a call that only reads this store, given `seconds` in all where the store
        may not answer (see `round_trips`); `where` names it in the error."""
        return fn()

    def map(self, fn: Callable[[U], T], items: Iterable[U]) -> list[T]:
        """``[fn(item) for item in items]``, overlapping requests where each is a round trip."""
        return [fn(item) for item in items]
