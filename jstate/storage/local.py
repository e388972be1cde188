"""Durable, atomic operations on the local file system (`_storage`'s local half), and the
tokens that tell a live writer's files from a dead one's.

Nothing here knows what a checkpoint looks like; that is `_commit`'s.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

# Other hosts' leftovers are removed only when they are this old: a live writer on another
# host cannot be asked whether it is alive.
STALE_AFTER = 24 * 3600.0
_HOST = socket.gethostname().replace("_", "-").replace(".", "-")[:32] or "host"  # no "_" or "." in tokens
# Tokens of this process's writes in flight: its other tokens are leftovers of its own
# interrupted or failed saves.
_active: set[str] = set()
_mine: set[str] = set()  # every token this process began, in flight or not
_active_lock = threading.Lock()


def token() -> str:
    """A name no other write, in any process on any host, uses: ``<time>_<pid>_<random>_<host>``."""
    return f"{int(time.time()):x}_{os.getpid()}_{secrets.token_hex(4)}_{_HOST}"


def begin(name: str) -> None:
    """Mark token `name` as a write in flight of this process, until `end`."""
    with _active_lock:
        _active.add(name)
        _mine.add(name)


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


def alive(name: str, now: float | None = None, *, shared: bool = False) -> bool:
    """Whether the writer of token `name` may still be writing.

    This process's tokens are alive while `writing`; another process on this host while it
    runs; another host's until `STALE_AFTER` seconds after the token was made. A name that is
    no token is alive: what jstate does not recognize, it never deletes.

    With `shared` (files on an object store, which processes of many machines write), only
    this process's own tokens are judged by its bookkeeping; every other writer's by age
    alone: a pid names a process on one machine, and host names can repeat across machines
    (containers), so a pid looked up here could be anyone's.
    """
    try:
        started, pid, _, host = name.split("_", 3)
        started, pid = int(started, 16), int(pid)
    except ValueError:
        return True
    if shared and name in _mine:  # (another machine's writer may have our pid and host name)
        with _active_lock:
            return name in _active
    if shared or host != _HOST:
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
