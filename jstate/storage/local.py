"""The local file system as a `Store`, with the durable, atomic operations a commit needs:
every file written is flushed and renamed into place, every directory created or changed is
flushed into its parent, so a power loss keeps what a save reported saved.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from . import tokens as _tokens
from .base import File, Store


class LocalStore(Store):
    """Files on this machine's file system (`pathlib.Path`)."""

    scheme = "file"
    renames = True
    shared = False  # (a network file system would say True)
    round_trips = False

    def exists(self, path: Path) -> bool:
        return path.exists()

    def is_dir(self, path: Path) -> bool:
        return path.is_dir()

    def is_file(self, path: Path) -> bool:
        return path.is_file()

    def is_symlink(self, path: Path) -> bool:
        return path.is_symlink()

    def listdir(self, path: Path) -> list[str]:
        try:
            return os.listdir(path)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def read_bytes(self, path: Path) -> bytes:
        return path.read_bytes()

    def size(self, path: Path) -> int:
        return path.stat().st_size

    def mtime(self, path: Path) -> float:
        return path.stat().st_mtime

    def files(self, directory: Path, prefix: str = "") -> dict[str, File]:
        return {rel: File(stat.st_size, None, stat.st_mtime) for rel, stat in walk(directory, prefix)}

    @contextlib.contextmanager
    def mapped(self, path: Path) -> Iterator[bytes | mmap.mmap]:
        # mmap: no copy into fresh memory (slow on these machines); mmap refuses an empty file.
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                yield b""
                return
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
                yield view

    @contextlib.contextmanager
    def local_copy(self, path: Path) -> Iterator[Path]:
        yield path

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
