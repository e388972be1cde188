"""File operations that checkpoints need, each durable and atomic where the file system allows,
and the tokens that tell a live writer's files from a dead one's.

Nothing here knows what a checkpoint looks like; that is `_commit`'s.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ._errors import CheckpointError, CheckpointNotFoundError

# Other hosts' leftovers are removed only when they are this old: a live writer on another
# host cannot be asked whether it is alive.
STALE_AFTER = 24 * 3600.0
_HOST = socket.gethostname().replace("_", "-").replace(".", "-")[:32] or "host"  # no "_" or "." in tokens
# Tokens of this process's writes in flight: its other tokens are leftovers of its own
# interrupted or failed saves.
_active: set[str] = set()
_active_lock = threading.Lock()


def token() -> str:
    """A name no other write, in any process on any host, uses: ``<time>_<pid>_<random>_<host>``."""
    return f"{int(time.time()):x}_{os.getpid()}_{secrets.token_hex(4)}_{_HOST}"


def user_path(path: str | os.PathLike) -> Path:
    """A path as users write it: str or `os.PathLike`, relative or with ``~``.

    Raises:
      CheckpointError: for a URL such as ``gs://bucket/ckpt``, which `pathlib` would turn into a
        local directory named ``gs:``.
    """
    text = os.fspath(path)
    if not text:
        raise CheckpointNotFoundError("No checkpoint at '': the path is empty. Give a checkpoint or a directory.")
    if isinstance(text, str) and "://" in text:
        raise CheckpointError(
            f"{text}: object storage ({text.split('://')[0]}://) is not supported yet; jstate reads and "
            "writes local (or network-mounted) paths. Nothing was written."
        )
    return Path(text).expanduser()


def begin(name: str) -> None:
    """Mark token `name` as a write in flight of this process, until `end`."""
    with _active_lock:
        _active.add(name)


def end(name: str) -> None:
    with _active_lock:
        _active.discard(name)


@contextlib.contextmanager
def writing(name: str) -> Iterator[None]:
    """Mark token `name` as a write in flight of this process while the block runs."""
    begin(name)
    try:
        yield
    finally:
        end(name)


def alive(name: str, now: float | None = None) -> bool:
    """Whether the writer of token `name` may still be writing.

    This process's tokens are alive while `writing`; another process on this host while it
    runs; another host's until `STALE_AFTER` seconds after the token was made. A name that is
    no token is alive: what jstate does not recognize, it never deletes.
    """
    try:
        started, pid, _, host = name.split("_", 3)
        started, pid = int(started, 16), int(pid)
    except ValueError:
        return True
    if host != _HOST:
        return (time.time() if now is None else now) - started < STALE_AFTER
    if pid == os.getpid():
        with _active_lock:
            return name in _active
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # a process we may not signal is alive
    return True


@contextlib.contextmanager
def atomic(path: Path) -> Iterator[Path]:
    """Write one file atomically: the block writes the path it is given; on success that file
    is flushed and renamed to `path` (replacing it), and the rename is flushed too. A failure
    or a kill leaves `path` as it was. Concurrent writers of one path each write their own
    temporary file; the last rename wins.

    >>> with atomic(Path("note.txt")) as tmp:
    ...     _ = tmp.write_text("hello")
    >>> Path("note.txt").read_text()
    'hello'
    """
    path = Path(path)
    name = token()
    tmp = path.parent / f".{path.name}.{name}.tmp"
    with writing(name):
        try:
            yield tmp
            sync_file(tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    sync_dir(path.parent)


def temporary_token(name: str) -> str | None:
    """The token in the name of an `atomic` temporary file, or None if `name` is not one."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    parts = name[:-4].rsplit(".", 1)
    return parts[1] if len(parts) == 2 else None


def makedirs(directory: Path) -> None:
    """Create `directory` and its missing parents, each flushed into its parent, so a power
    loss cannot lose a directory a checkpoint was committed into."""
    directory = Path(directory)
    missing = []
    while not directory.exists():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    for new in reversed(missing):
        try:
            new.mkdir()
        except FileExistsError:
            if not new.is_dir():
                raise
        sync_dir(new.parent)


def sync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(directory: Path) -> None:
    sync_file(directory)


def sync_tree(directory: Path) -> None:
    """fsync every file and directory under `directory`, so a power loss keeps what was saved."""
    for root, _, files in os.walk(directory):
        for name in files:
            sync_file(Path(root, name))
        sync_dir(Path(root))


def remove(path: Path) -> None:
    """Delete a file or a directory tree; what is already gone is no error."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_empty_dir(directory: Path) -> None:
    """Remove `directory` if it is empty: never what another writer has just put in it."""
    with contextlib.suppress(FileNotFoundError, OSError):
        os.rmdir(directory)
        sync_dir(Path(directory).parent)


def check_name_lengths(path: Path, longest_extra: int = 0) -> None:
    """Raise OSError(ENAMETOOLONG) before anything is written if a part of `path`, or its last
    part with `longest_extra` more characters (a temporary name), is longer than the file
    system allows."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for i, part in enumerate(path.parts):
        extra = longest_extra if i == len(path.parts) - 1 else 0
        if len(os.fsencode(part)) + extra > limit:
            raise OSError(
                errno.ENAMETOOLONG,
                f"{os.strerror(errno.ENAMETOOLONG)}: the name {part!r} has {len(os.fsencode(part))} bytes; "
                f"with jstate's temporary names ({extra} more) the file system allows {limit}",
                str(path),
            )
