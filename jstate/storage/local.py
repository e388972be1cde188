"""The local file system as a `Store`, with the durable, atomic operations a commit needs:
every file written is flushed and renamed into place, every directory created or changed is
flushed into its parent, so a power loss keeps what a save reported saved.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
import shutil
import stat as _stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np

from ..core.errors import CheckpointError
from . import tokens as _tokens
from .base import File, Store

T = TypeVar("T")


class LocalStore(Store):
    """Files on this machine's file system (`pathlib.Path`)."""

    scheme = "file"
    renames = True
    shared = False  # (a network file system would say True)
    round_trips = False

    def exists(self, path: Path) -> bool:
        return looked_up(Path.exists, path)

    def is_dir(self, path: Path) -> bool:
        return looked_up(Path.is_dir, path)

    def is_file(self, path: Path) -> bool:
        return looked_up(Path.is_file, path)

    def is_symlink(self, path: Path) -> bool:
        return looked_up(Path.is_symlink, path)

    def is_mount(self, path: Path) -> bool:
        if path.is_symlink() or not path.is_dir():
            return False
        # `os.path.ismount` compares devices: a bind mount within one file system (how another
        # run's checkpoint is mounted into a container) has its parent's, so ask the kernel too.
        return os.path.ismount(path) or os.path.realpath(path) in mount_points()

    def listdir(self, path: Path) -> list[str]:
        try:
            return os.listdir(path)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def read_bytes(self, path: Path, limit: int, what: str) -> bytes:
        return read_bytes(path, limit, what)

    def read_range(self, path: Path, start: int, length: int, what: str) -> np.ndarray:
        with open_regular(path, what) as (fd, stat):
            # Uninitialized, and read straight into: a bytearray is zeroed first, every page of fresh
            # memory written twice (16 arrays of 16 MiB: ~0.6 s that way, 0.07-0.09 s this way).
            out = np.empty(max(0, min(length, stat.st_size - start)), np.uint8)
            got = 0
            while got < len(out):  # preadv reads at most ~2 GiB at a time
                n = os.preadv(fd, [out[got:]], start + got)
                if n == 0:  # cut short since its fstat
                    break
                got += n
            return out[:got]

    def size(self, path: Path) -> int:
        return looked_up(Path.stat, path).st_size

    def mtime(self, path: Path) -> float:
        return looked_up(Path.stat, path).st_mtime

    def files(self, directory: Path, prefix: str = "") -> dict[str, File]:
        return {rel: File(stat.st_size, None, stat.st_mtime) for rel, stat in walk(directory, prefix)}

    @contextlib.contextmanager
    def mapped(self, path: Path) -> Iterator[bytes | mmap.mmap]:
        # mmap: no copy into fresh memory (slow on these machines); mmap refuses an empty file.
        with open_regular(path, "file") as (fd, stat):
            if stat.st_size == 0:
                yield b""
                return
            with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as view:
                yield view

    def local_path(self, path: Path) -> Path | None:
        return path

    def atomic(self, path: Path) -> contextlib.AbstractContextManager[Path]:
        return atomic(path)

    def touch(self, path: Path) -> None:
        path.touch()

    def create_marked(self, directory: Path, marker: str) -> None:
        # The new directory is made beside `directory`, named as the marker (a dead writer's is
        # removed by whoever cleans leftovers by their token), and renamed into place: an empty
        # directory being created, never a checkpoint.
        makedirs(directory.parent)
        if not directory.is_dir():
            staging = directory.parent / marker
            staging.mkdir()
            (staging / marker).touch()
            try:
                os.rename(staging, directory)
            except OSError:  # another writer made `directory` meanwhile (with entries: no replace)
                self.remove(staging)
            sync_dir(directory.parent)
        (directory / marker).touch()

    def makedirs(self, directory: Path) -> None:
        makedirs(directory)

    def sync_dir(self, directory: Path) -> None:
        sync_dir(directory)

    def sync_tree(self, directory: Path) -> None:
        sync_tree(directory)

    def check_name_lengths(self, path: Path, longest_extra: int = 0) -> None:
        check_name_lengths(path, longest_extra)

    def rename(self, source: Path, target: Path) -> None:
        os.rename(source, target)

    def link(self, source: Path, target: Path) -> None:
        os.link(source, target)

    def unlink(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def remove(self, path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            if _holds_a_mount(path):  # rmtree would delete through it (it stops only at links)
                return
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def remove_empty_dir(self, directory: Path) -> None:
        with contextlib.suppress(FileNotFoundError, OSError):
            os.rmdir(directory)
            sync_dir(directory.parent)

    def absolute(self, path: Path) -> Path:
        return Path(os.path.abspath(path))

    def inside(self, path: Path, directory: Path) -> bool:
        return path.resolve().is_relative_to(Path(directory).resolve())


# -- mount points -----------------------------------------------------------------------------------
_MOUNTINFO = "/proc/self/mountinfo"


def mount_points() -> frozenset[str]:
    """The mount points this process sees (Linux: ``/proc/self/mountinfo``); elsewhere none, and
    `os.path.ismount` alone tells them. Read each time: mounts come and go while a job runs (a
    few kB, read only where something is about to be removed).

    >>> "/" in mount_points() or not os.path.exists("/proc/self/mountinfo")
    True
    """
    try:
        with open(_MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return frozenset()
    # The 5th field is the mount point, with space, tab, newline and backslash escaped in octal.
    points = (fields[4] for line in lines if len(fields := line.split(" ", 5)) > 4)
    return frozenset(_OCTAL.sub(_unescape, p) if "\\" in p else p for p in points)


_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(match: re.Match[str]) -> str:
    return chr(int(match.group(1), 8))


def _holds_a_mount(directory: Path) -> bool:
    """Whether `directory` (a real directory, not a link) is a mount point or has one below it."""
    if os.path.ismount(directory):
        return True
    root = os.path.realpath(directory)
    return any(m == root or m.startswith(root + os.sep) for m in mount_points())


# -- reading: regular files only, bounded ----------------------------------------------------------
_SPECIAL = {
    _stat.S_IFIFO: "a FIFO (named pipe), which would block a reader forever",
    _stat.S_IFCHR: "a character device (such as /dev/zero), which never ends",
    _stat.S_IFBLK: "a block device",
    _stat.S_IFSOCK: "a socket",
    _stat.S_IFDIR: "a directory",
}


class Unsearchable(CheckpointError, PermissionError):
    """A path whose status cannot be read: a directory on it denies this process search (x)
    permission. A CheckpointError naming the path, and still the `OSError` (`PermissionError`)
    that code catching the operating system's errors expects."""


def looked_up(check: Callable[[Path], T], path: Path) -> T:
    """``check(path)`` (`Path.exists`, `is_dir`, `is_file`, `is_symlink`, `stat`), with any
    error but "not there" an `Unsearchable` naming `path`.

    Python 3.11's pathlib answers False only for "not there" errors (ENOENT, ENOTDIR, ELOOP)
    and lets the rest through, so a directory without search permission raised a bare
    `PermissionError` from a mere existence check.

    Raises:
      FileNotFoundError, NotADirectoryError: from `Path.stat` only, for a path that is not there.
      Unsearchable: the status cannot be read (permissions, I/O), naming `path` and the fix.

    >>> looked_up(Path.is_dir, Path(".")), looked_up(Path.exists, Path("nothing/here"))
    (True, False)
    """
    try:
        return check(path)
    except (FileNotFoundError, NotADirectoryError):
        raise
    except OSError as e:
        denied = e.errno in (errno.EACCES, errno.EPERM)
        fix = (
            f"a directory on its path ({path.parent} or one above it) does not let this process search it. "
            "Give this process search (x) permission on it (`chmod u+x`)."
            if denied
            else "check the file system."
        )
        raise Unsearchable(f"{path}: cannot be looked up ({e.strerror or e}): {fix}") from None


def _special(path: Path, mode: int, what: str) -> CheckpointError:
    kind = _SPECIAL.get(_stat.S_IFMT(mode), f"no regular file (mode {_stat.filemode(mode)})")
    link = f" (a link to {os.path.realpath(path)})" if os.path.islink(path) else ""
    return CheckpointError(
        f"{path}: this {what} is {kind}{link}; jstate reads only regular files. Put the real file there, or remove "
        "it. Nothing was read."
    )


@contextlib.contextmanager
def open_regular(path: Path, what: str) -> Iterator[tuple[int, os.stat_result]]:
    """File `path` (a `what`, for messages) open for reading, with its `os.fstat`, if it is a
    regular file once links are followed.

    Special files are refused before they are opened (opening a device can have effects of its
    own) and again after (the file could be swapped in between): ``O_NONBLOCK`` makes that open
    return at once even for a FIFO with no writer, where a plain `open` would wait forever.

    Raises:
      FileNotFoundError, NotADirectoryError: `path` does not exist.
      CheckpointError: it is a FIFO, device, socket or directory, or cannot be opened
        (permissions, a loop of links), naming it and why.

    >>> _ = Path("f").write_bytes(b"abc"); os.mkfifo("pipe")
    >>> with open_regular(Path("f"), "manifest") as (fd, stat):
    ...     stat.st_size
    3
    >>> with open_regular(Path("pipe"), "manifest") as (fd, stat):
    ...     pass
    Traceback (most recent call last):
    jstate.core.errors.CheckpointError: pipe: this manifest is a FIFO (named pipe), which would block a reader forever; ...
    """
    try:
        mode = os.stat(path).st_mode
        if not _stat.S_ISREG(mode):
            raise _special(path, mode, what)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise
    except OSError as e:  # permissions, ELOOP, ENXIO (a socket swapped in)
        raise CheckpointError(
            f"{path}: this {what} cannot be read ({e.strerror or e}). Give this process read access to it, or "
            "remove it. Nothing was read."
        ) from None
    try:
        stat = os.fstat(fd)
        if not _stat.S_ISREG(stat.st_mode):
            raise _special(path, stat.st_mode, what)
        yield fd, stat
    finally:
        os.close(fd)


def too_large(path: Path, size: int, limit: int, what: str) -> CheckpointError:
    """The error for a `what` at `path` of `size` bytes, over the `limit` any of them takes."""
    return CheckpointError(
        f"{path}: this {what} holds {size:,} bytes or more, over the {limit:,} that any {what} takes; it is not one "
        "jstate can read (a damaged or foreign file). Replace it with the real one. Nothing was read."
    )


def read_bytes(path: Path, limit: int, what: str) -> bytes:
    """The contents of regular file `path`, a `what` of at most `limit` bytes (`Store.read_bytes`).

    >>> _ = Path("state").write_text("model_checkpoint_path: 'model.ckpt-20'")
    >>> read_bytes(Path("state"), 1 << 20, "state file")[:21]
    b'model_checkpoint_path'
    >>> read_bytes(Path("/dev/zero"), 1 << 20, "state file")
    Traceback (most recent call last):
    jstate.core.errors.CheckpointError: /dev/zero: this state file is a character device (such as /dev/zero), ...
    """
    with open_regular(path, what) as (fd, stat):
        if stat.st_size > limit:
            raise too_large(path, stat.st_size, limit, what)
        chunks, total = [], 0
        while total <= limit:  # up to one byte past `limit`: a file that grew since its fstat
            # The whole file in one read, as a rule (`join` then hands that one back, uncopied).
            chunk = os.read(fd, min(limit + 1 - total, max(stat.st_size + 1 - total, 1 << 16)))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise too_large(path, total, limit, what)
        return b"".join(chunks)


# The durable operations, module functions so that tests can watch every flush.
def walk(directory: Path, prefix: str = "") -> Iterator[tuple[str, os.stat_result]]:
    """``(relative path, stat)`` of each regular file under `directory` reached through no
    symbolic link (whose first part below `directory` starts with `prefix`), in one walk.

    >>> _ = Path("d/e").mkdir(parents=True), Path("d/e/f").write_text("abc")
    >>> [(rel, stat.st_size) for rel, stat in walk(Path("d"))]
    [('e/f', 3)]
    """
    pending = [("", os.fspath(directory))]
    while pending:
        below, folder = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if entry.is_symlink() or (not below and not entry.name.startswith(prefix)):
                continue
            if entry.is_dir():
                pending.append((f"{below}{entry.name}/", entry.path))
            elif entry.is_file():
                try:
                    yield below + entry.name, entry.stat()
                except OSError:  # deleted meanwhile (a re-save retiring it)
                    continue


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
    name = _tokens.token()
    tmp = path.parent / f".{path.name}.{name}.tmp"
    with _tokens.writing(name):
        try:
            yield tmp
            sync_file(tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    sync_dir(path.parent)


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
