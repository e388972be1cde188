"""Where checkpoints live: local paths, and ``gs://`` and ``s3://`` object stores, behind one
small interface. Every file operation of jstate above this module goes through it.

A path is a `pathlib.Path` (local) or, for a URL, an `etils.epath.Path`, used only as a pure
path (``/``, ``name``, ``parent``, ``with_name``, ``str``): its own I/O methods go through
fsspec clients that cache directory listings, and a listing cached before another process
committed a checkpoint would hide it. The I/O here uses clients without that cache.

What the two kinds of storage offer, and all the commit rule (`_commit`) relies on:

  operation              local file system                 object store (gs://, s3://)
  atomic write (`atomic`) temporary file, fsync, rename     one PUT: the object appears whole
  directories            created and fsynced (`makedirs`)  none: a prefix exists while an object does
  durability             fsync of files and directories     an object is durable once written
  listing, size, delete  os                                fsspec (gcsfs, s3fs), no listing cache

Nothing spanning several objects is atomic on an object store, and a rename is a copy and a
delete: the commit rule renames no directory, and writes the manifest last, as one object.
Each request costs a round trip, so what is judged over many files uses one listing (`files`).
How long a request may wait is `_limits`'s.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePath
from typing import Any, NamedTuple

from ..core.errors import CheckpointError, CheckpointNotFoundError, StoreError, StoreTimeoutError
from . import deadlines as _limits
from . import local as _files

SCHEMES = ("gs", "s3")  # object stores jstate reads and writes

UNSUPPORTED = (
    "{path}: jstate reads and writes local paths, gs://bucket/... (Google Cloud Storage) and "
    "s3://bucket/... (Amazon S3 and compatible stores), not {scheme}://. Mount it, or copy the "
    "checkpoint to one of those. Nothing was read or written."
)


def as_path(path: str | os.PathLike) -> Path:
    """A path as users write it: str or `os.PathLike`, relative or with ``~``, or a URL
    ``gs://bucket/prefix`` or ``s3://bucket/prefix``.

    Raises:
      CheckpointError: for a URL of another scheme, or without a bucket; `pathlib` would turn
        ``hdfs://host/ckpt`` into a local directory named ``hdfs:``.
      CheckpointNotFoundError: for an empty path.

    >>> as_path("ckpt/model"), str(as_path("gs://bucket/ckpt/"))
    (PosixPath('ckpt/model'), 'gs://bucket/ckpt')
    >>> as_path("hdfs://cluster/ckpt")
    Traceback (most recent call last):
    jstate.core.errors.CheckpointError: hdfs://cluster/ckpt: jstate reads and writes local paths, ...
    """
    if is_remote(path):
        return path  # type: ignore[return-value]
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text:
        raise CheckpointNotFoundError("No checkpoint at '': the path is empty. Give a checkpoint or a directory.")
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


def is_bucket(path: Path) -> bool:
    """Whether `path` is a whole bucket (``gs://bucket``), with no prefix in it."""
    return is_remote(path) and "/" not in str(path).split("://", 1)[1]


def is_remote(path: Any) -> bool:
    """Whether `path` (as `as_path` makes it) is on an object store."""
    return isinstance(path, PurePath) and not isinstance(path, Path) and str(path).split("://")[0] in SCHEMES


def scheme(path: Path) -> str:
    """``"gs"``, ``"s3"``, or ``"file"``."""
    return str(path).split("://")[0] if is_remote(path) else "file"


# -- object-store clients ------------------------------------------------------------------------
def _call(method: Any, key: str, *args: Any, **kwargs: Any) -> Any:
    """``method(key, *args, **kwargs)`` of an fsspec client, within the limits of `_limits`.

    Raises:
      StoreTimeoutError: the request ran past its limit, or none was left to start it.
      StoreError: the store cannot be reached.
    """
    seconds, allowed = _limits.left()
    where = str(key)
    if seconds is not None and seconds <= 0:
        raise StoreTimeoutError(_limits.TIMED_OUT.format(where=where, seconds=allowed))
    import fsspec.exceptions

    try:
        if seconds is None:
            return method(key, *args, **kwargs)
        return method(key, *args, timeout=seconds, **kwargs)
    except fsspec.exceptions.FSTimeoutError:
        raise StoreTimeoutError(_limits.TIMED_OUT.format(where=where, seconds=allowed)) from None
    except Exception as e:
        if not _failed(e):
            raise
        detail = (str(e).splitlines() or [""])[0][:200]
        raise StoreError(
            f"{key}: the object store did not answer ({type(e).__name__}: {detail}), so nothing is known "
            "of what is there. Check the endpoint (AWS_ENDPOINT_URL, STORAGE_EMULATOR_HOST), the network "
            "and the credentials, then try again."
        ) from e


# What a store answers about an object, as opposed to failing to answer.
_ANSWERS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)
_CLIENTS = ("aiohttp", "botocore", "aiobotocore", "gcsfs", "s3fs", "requests", "urllib3")


def _failed(error: Exception) -> bool:
    """Whether a client's exception says the store failed to answer: unreachable, a connection
    cut, a response cut short, a server error after the client's retries. The clients raise
    their own types for these (aiohttp's, botocore's, gcsfs's `HttpError`, s3fs's `OSError`),
    never only `ConnectionError`; an answer (no such object) is not a failure."""
    if isinstance(error, _ANSWERS):
        return False
    return isinstance(error, OSError) or type(error).__module__.split(".")[0] in _CLIENTS


def _fs(path: Path) -> tuple[Any, str]:
    """The fsspec filesystem for a remote `path`, and the path's key there (``bucket/a/b``)."""
    import fsspec

    name, _, key = str(path).partition("://")
    # No listing cache: a listing cached before another process committed would hide its
    # checkpoint. (fsspec keeps one client per set of arguments: this is not Orbax's.)
    return fsspec.filesystem(name, use_listings_cache=False), key


# -- reading -------------------------------------------------------------------------------------
def exists(path: Path) -> bool:
    if not is_remote(path):
        return path.exists()
    fs, key = _fs(path)
    return _call(fs.exists, key)


def is_dir(path: Path) -> bool:
    """A local directory (following links), or a prefix some object lies under."""
    if not is_remote(path):
        return path.is_dir()
    fs, key = _fs(path)
    return _call(fs.isdir, key)


def is_file(path: Path) -> bool:
    if not is_remote(path):
        return path.is_file()
    fs, key = _fs(path)
    return _call(fs.isfile, key)


def is_symlink(path: Path) -> bool:
    return not is_remote(path) and path.is_symlink()


def listdir(path: Path) -> list[str]:
    """The names in directory `path`; [] where there is none."""
    if not is_remote(path):
        try:
            return os.listdir(path)
        except (FileNotFoundError, NotADirectoryError):
            return []
    fs, key = _fs(path)
    try:
        found = _call(fs.ls, key, detail=False)
    except FileNotFoundError:
        return []
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in found if p.rstrip("/") != key}
    return sorted(n for n in names if n)


def iterdir(path: Path) -> list[Path]:
    return [path / name for name in listdir(path)]


def read_bytes(path: Path) -> bytes:
    """The contents of file `path`. Raises FileNotFoundError (or another OSError)."""
    if not is_remote(path):
        return path.read_bytes()
    fs, key = _fs(path)
    if scheme(path) == "s3":  # s3fs would ask for the size first (to split a large read): a request more
        return _call(fs.cat_file, key, max_concurrency=1)
    return _call(fs.cat_file, key)


def size(path: Path) -> int:
    """The size of file `path` in bytes. Raises FileNotFoundError."""
    if not is_remote(path):
        return path.stat().st_size
    fs, key = _fs(path)
    return int(_call(fs.info, key)["size"])


def mtime(path: Path) -> float:
    """When file `path` was last written (seconds since the epoch; 0 where the store does not say)."""
    if not is_remote(path):
        return path.stat().st_mtime
    fs, key = _fs(path)
    return _mtime(_call(fs.info, key))


class File(NamedTuple):
    """A file as a listing (`files`) tells it."""

    size: int
    crc32c: int | None  # the store's own CRC32C, where it keeps one (GCS does); else None
    mtime: float  # when it was written, by the store's clock (seconds since the epoch; 0: unknown)


def files(directory: Path, prefix: str = "") -> dict[str, File]:
    """Every file under `directory` (whose first part below it starts with `prefix`), by path
    relative to it, in one listing on an object store (a request per file would add up).

    >>> _ = jstate.Saver().save(state, "ckpt/model", step=1)
    >>> sorted(files(Path("ckpt"), "model"))[-1]
    'model-1/jstate.json'
    """
    if not is_remote(directory):
        out = {}
        for root, _, names in os.walk(directory):
            for file in (Path(root, n) for n in names):
                rel = file.relative_to(directory).as_posix()
                if rel.startswith(prefix):
                    stat = file.stat()
                    out[rel] = File(stat.st_size, None, stat.st_mtime)
        return out
    fs, key = _fs(directory)
    try:
        found = _call(fs.find, key, prefix=prefix, detail=True)
    except FileNotFoundError:
        return {}
    return {
        name[len(key) + 1 :]: File(int(info["size"]), _crc32c(info.get("crc32c")), _mtime(info))
        for name, info in found.items()
        if name.startswith(key + "/")
    }


def by_child(listed: dict[str, File]) -> dict[str, dict[str, File]]:
    """A listing (`files`) grouped by first part: ``{child: {path below it: file}}``, where the
    path ``""`` is the child itself, a file.

    >>> by_child({"a/x": File(1, None, 0), "a/y/z": File(2, None, 0), "b": File(3, None, 0)})
    {'a': {'x': File(size=1, crc32c=None, mtime=0), 'y/z': File(size=2, crc32c=None, mtime=0)}, 'b': {'': File(size=3, crc32c=None, mtime=0)}}
    """
    out: dict[str, dict[str, File]] = {}
    for rel, file in listed.items():
        child, _, below = rel.partition("/")
        out.setdefault(child, {})[below] = file
    return out


def _mtime(info: dict) -> float:
    """When the store wrote an object: GCS's ``timeCreated`` (gcsfs's ``ctime``; its ``updated``
    changes with any metadata, a label or a storage-class move), S3's ``LastModified``."""
    stamp = info.get("ctime") or info.get("LastModified") or info.get("mtime")
    return stamp.timestamp() if hasattr(stamp, "timestamp") else 0.0


def _crc32c(encoded: str | None) -> int | None:
    """GCS's ``crc32c`` of an object: base64 of the big-endian CRC32C."""
    return None if not encoded else int.from_bytes(base64.b64decode(encoded), "big")


@contextlib.contextmanager
def local_copy(path: Path) -> Iterator[Path]:
    """`path` as a local file for a library that reads only those: itself, or a temporary download."""
    if not is_remote(path):
        yield path
        return
    fs, key = _fs(path)
    with tempfile.TemporaryDirectory(prefix="jstate-") as tmp:
        local = Path(tmp, path.name)
        _call(fs.get_file, key, str(local))
        yield local


# -- writing -------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic(path: Path) -> Iterator[Path]:
    """Write file `path` atomically: the block writes the local file it is given; on success it
    becomes `path` whole (replacing it), and a failure or a kill leaves `path` as it was.

    Locally: a temporary file beside `path`, flushed and renamed (`_files.atomic`). On an object
    store: a local temporary file, then one upload, which the store makes visible whole or not at all.
    """
    if not is_remote(path):
        with _files.atomic(path) as tmp:
            yield tmp
        return
    fs, key = _fs(path)
    with tempfile.TemporaryDirectory(prefix="jstate-") as tmp:
        local = Path(tmp, path.name)
        yield local
        _call(fs.put_file, str(local), key)


def write_bytes(path: Path, data: bytes) -> None:
    """Write file `path` atomically (see `atomic`)."""
    with atomic(path) as tmp:
        tmp.write_bytes(data)


def touch(path: Path) -> None:
    """Create an empty file (a marker); not flushed."""
    if not is_remote(path):
        path.touch()
        return
    fs, key = _fs(path)
    _call(fs.pipe_file, key, b"")


def makedirs(directory: Path) -> None:
    """Create `directory` and its parents durably; on an object store there is nothing to create."""
    if not is_remote(directory):
        _files.makedirs(directory)


def sync_dir(directory: Path) -> None:
    """Flush a directory's entries to disk (local only: objects are durable once written)."""
    if not is_remote(directory):
        _files.sync_dir(directory)


def sync_tree(directory: Path) -> None:
    """Flush every file and directory under `directory` (local only)."""
    if not is_remote(directory):
        _files.sync_tree(directory)


def check_name_lengths(path: Path, longest_extra: int = 0) -> None:
    """Raise OSError(ENAMETOOLONG) before anything is written if a name is too long for the local
    file system (object keys are limited only as a whole, to 1,024 bytes)."""
    if not is_remote(path):
        _files.check_name_lengths(path, longest_extra)


def unlink(path: Path) -> None:
    """Delete file `path`; one already gone is no error."""
    if not is_remote(path):
        path.unlink(missing_ok=True)
        return
    fs, key = _fs(path)
    with contextlib.suppress(FileNotFoundError):
        _call(fs.rm_file, key)


def remove(path: Path) -> None:
    """Delete a file or a directory tree; what is already gone is no error."""
    if not is_remote(path):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        return
    fs, key = _fs(path)
    with contextlib.suppress(FileNotFoundError):
        if _call(fs.isfile, key):
            _call(fs.rm_file, key)
            return
    with contextlib.suppress(FileNotFoundError):
        keys = list(_call(fs.find, key))
        # Listed under `key + "/"` only: ``ckpt/model-1`` must not take ``ckpt/model-10`` with it.
        doomed = [k for k in keys if k.startswith(key + "/")]
        if doomed:
            _call(fs.rm, doomed)


def remove_empty_dir(directory: Path) -> None:
    """Remove `directory` if it is empty: never what another writer has just put in it. (An
    empty prefix of an object store does not exist: nothing to do there.)"""
    if is_remote(directory):
        return
    with contextlib.suppress(FileNotFoundError, OSError):
        os.rmdir(directory)
        _files.sync_dir(directory.parent)
