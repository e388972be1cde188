"""Object stores (``gs://``, ``s3://``) as a `Store`, through the fsspec clients (gcsfs, s3fs).

A path here is an `etils.epath.Path`, used only as a pure path (``/``, ``name``, ``parent``,
``with_name``, ``str``): its own I/O methods go through fsspec clients that cache directory
listings, and a listing cached before another process committed a checkpoint would hide it.
The clients here have no listing cache. Each request costs a round trip, so what is judged
over many files uses one listing (`files`). How long a request may wait is `deadlines`'.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import mmap
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ..core.errors import StoreError, StoreTimeoutError
from . import deadlines as _limits
from . import local as _local
from .base import File, Store

T = TypeVar("T")
U = TypeVar("U")


class RemoteStore(Store):
    """The objects of one object store, ``gs`` or ``s3`` (its `scheme`)."""

    renames = False
    shared = True
    round_trips = True

    def __init__(self, scheme: str):
        self.scheme = scheme
        self._version, self._delete_if = _VERSIONS[scheme]

    def exists(self, path: Path) -> bool:
        fs, key = _fs(path)
        return _call(fs.exists, key)

    def is_dir(self, path: Path) -> bool:
        fs, key = _fs(path)
        return _call(fs.isdir, key)

    def is_file(self, path: Path) -> bool:
        fs, key = _fs(path)
        return _call(fs.isfile, key)

    def listdir(self, path: Path) -> list[str]:
        fs, key = _fs(path)
        try:
            found = _call(fs.ls, key, detail=False)
        except FileNotFoundError:
            return []
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in found if p.rstrip("/") != key}
        return sorted(n for n in names if n)

    def read_bytes(self, path: Path, limit: int, what: str) -> bytes:
        # One ranged request for a byte past `limit` (an object is always a regular file): an
        # object too large for its kind is never downloaded whole. (A ranged read also keeps
        # s3fs from asking for the size first, to split a large read: a request more.)
        data = _ranged(path, 0, limit + 1)
        if len(data) > limit:
            raise _local.too_large(path, len(data), limit, what)
        return data

    def read_range(self, path: Path, start: int, length: int, what: str) -> bytes:
        return _ranged(path, start, start + length) if length else b""

    def size(self, path: Path) -> int:
        fs, key = _fs(path)
        return int(_call(fs.info, key)["size"])

    def mtime(self, path: Path) -> float:
        fs, key = _fs(path)
        return _mtime(_call(fs.info, key))

    def files(self, directory: Path, prefix: str = "") -> dict[str, File]:
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

    @contextlib.contextmanager
    def mapped(self, path: Path) -> Iterator[bytes | mmap.mmap]:
        fs, key = _fs(path)
        yield _call(fs.cat_file, key, **({"max_concurrency": 1} if self.scheme == "s3" else {}))

    @contextlib.contextmanager
    def atomic(self, path: Path) -> Iterator[Path]:
        # A local temporary file, then one upload, which the store makes visible whole or not at all.
        fs, key = _fs(path)
        with tempfile.TemporaryDirectory(prefix="jstate-") as tmp:
            local = Path(tmp, path.name)
            yield local
            _call(fs.put_file, str(local), key)

    def touch(self, path: Path) -> None:
        fs, key = _fs(path)
        _call(fs.pipe_file, key, b"")

    def create_marked(self, directory: Path, marker: str) -> None:
        self.touch(directory / marker)  # the marker creates the prefix: one object

    # What a file system needs and an object store does not: a prefix exists while an object
    # lies under it, an object is durable once written, and keys are limited only as a whole
    # (1,024 bytes).
    def makedirs(self, directory: Path) -> None:
        pass

    def sync_dir(self, directory: Path) -> None:
        pass

    def sync_tree(self, directory: Path) -> None:
        pass

    def check_name_lengths(self, path: Path, longest_extra: int = 0) -> None:
        pass

    def remove_empty_dir(self, directory: Path) -> None:
        pass

    def unlink(self, path: Path) -> None:
        fs, key = _fs(path)
        with contextlib.suppress(FileNotFoundError):
            _call(fs.rm_file, key)

    def version(self, path: Path) -> str | None:
        fs, key = _fs(path)
        try:
            return self._version(_call(fs.info, key))
        except FileNotFoundError:
            return None

    def unlink_if(self, path: Path, version: str) -> bool:
        fs, key = _fs(path)
        try:
            _call(self._delete_if, key, fs, version)
        except (FileNotFoundError, _Changed):
            return False
        return True

    def remove(self, path: Path) -> None:
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

    def is_bucket(self, path: Path) -> bool:
        return "/" not in str(path).split("://", 1)[1]

    def within(self, seconds: float | None, fn: Callable[[], T], where: str) -> T:
        return _limits.within(seconds, fn, where)  # the storage clients alone would retry for minutes

    def map(self, fn: Callable[[U], T], items: Iterable[U]) -> list[T]:
        items = list(items)
        if len(items) < 2:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(8, len(items))) as pool:
            return list(pool.map(_limits.bounded(fn), items))


def _call(method: Any, key: str, *args: Any, **kwargs: Any) -> Any:
    """``method(key, *args, **kwargs)`` of an fsspec client, within the limits of `deadlines`.

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


def _ranged(path: Path, start: int, end: int) -> bytes:
    """Bytes `start` to `end` of object `path`, in one request; fewer where it ends sooner, and
    none where it ends before `start` (which GCS and S3 answer with 416, "range not satisfiable":
    an empty object's first bytes among them)."""
    fs, key = _fs(path)
    try:
        return _call(fs.cat_file, key, start=start, end=end)
    except StoreError as e:
        cause = e.__cause__
        if getattr(cause, "code", None) == 416 or "range is not satisfiable" in str(cause).lower():
            return b""
        raise


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


class _Changed(Exception):
    """A conditional request's precondition failed: the object is no longer the version given."""


# The two stores' versions of an object and their conditional deletes, through each client's own
# request call (neither fsspec client passes a precondition to its `rm_file`).
def _gcs_delete_if(key: str, fs: Any, generation: str, **timeout: Any) -> None:
    bucket, _, name = key.partition("/")
    try:
        fs.call("DELETE", "b/{}/o/{}", bucket, name, ifGenerationMatch=generation, **timeout)
    except FileExistsError:  # gcsfs's answer to 412 Precondition Failed
        raise _Changed from None


def _s3_delete_if(key: str, fs: Any, etag: str, **timeout: Any) -> None:
    bucket, _, name = key.partition("/")
    try:
        fs.call_s3("delete_object", Bucket=bucket, Key=name, IfMatch=etag, **timeout)
    except OSError as e:  # s3fs turns 412 Precondition Failed into EINVAL, the response kept as its cause
        code = getattr(e.__cause__, "response", {}).get("Error", {}).get("Code")
        if e.errno == errno.EINVAL and code in ("PreconditionFailed", "412"):
            raise _Changed from None
        raise


_VERSIONS = {
    "gs": (lambda info: str(info["generation"]), _gcs_delete_if),
    "s3": (lambda info: str(info["ETag"]), _s3_delete_if),
}


def _mtime(info: dict) -> float:
    """When the store wrote an object: GCS's ``timeCreated`` (gcsfs's ``ctime``; its ``updated``
    changes with any metadata, a label or a storage-class move), S3's ``LastModified``."""
    stamp = info.get("ctime") or info.get("LastModified") or info.get("mtime")
    return stamp.timestamp() if hasattr(stamp, "timestamp") else 0.0


def _crc32c(encoded: str | None) -> int | None:
    """GCS's ``crc32c`` of an object: base64 of the big-endian CRC32C."""
    return None if not encoded else int.from_bytes(base64.b64decode(encoded), "big")
