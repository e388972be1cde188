"""Reading arrays of a local Orbax checkpoint straight from its data files, with one copy.

Why by hand: Orbax reads an array by zero-filling a fresh buffer (``np.zeros``) into which
tensorstore copies chunks it has first read into buffers of its own, so every byte crosses fresh
memory three times. A 1 GiB restore took 3x as long as numpy reading the same bytes
(``benchmarks/bench_checkpoint.py --only big``), and tensorstore offers no read into a caller's
buffer. It does say where each chunk lies (``ts.ocdbt.dump``, its public API for the OCDBT
format), and a chunk that zarr stores without compression or filters is the array's bytes in C
order. Such arrays are read here with one ``preadv`` per chunk into their destination, which is
64-byte aligned so that `jax.device_put` on the CPU adopts it without another copy.

Nothing else of either format is interpreted. An array stored any other way (compressed, big-
endian, with a chunk missing, in a B+tree of more than one node, on an object store) is simply
not `locate`\\ d, and its caller reads it through Orbax, which reports any damage. What it
reads it checks as tensorstore would (a bool byte other than 0 or 1 is damage), and the
checksums recorded at save check the rest.

>>> import jax.numpy as jnp, jstate
>>> saved = jstate.Saver(pack=False).save(state, "ckpt")
>>> ckpt = jstate.open_checkpoint(saved)
>>> located = locate(ckpt.arrays)
>>> located["weights"].shape, located["weights"].dtype
((784, 200), dtype('float32'))
>>> bool((located["weights"].read() == state["weights"]).all())
True
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from ..core.errors import CorruptCheckpointError, Damaged
from ..core.shaped import Shaped
from ..core.untrusted import parse_json
from ..storage import store as _storage

_ALIGNMENT = 64  # bytes: what XLA's CPU client needs to adopt a host buffer without copying it
_BLOCK = 2 * 1024 * 1024  # bytes read at a time when each block is fed on: fits in a core's cache


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Where one stored chunk's bytes lie: `length` bytes of `file` from `offset` on, or
    `inline` in the B+tree node itself (OCDBT keeps values of up to 1 KiB there)."""

    file: Path | None
    offset: int
    length: int
    inline: bytes | None = None

    def read_into(self, *parts: tuple[memoryview, int]) -> None:
        """Fill each ``(buffer, start)`` of `parts` with this chunk's bytes from byte `start` on.

        Raises:
          Damaged: the file ends before the bytes asked for.

        >>> out = bytearray(3)
        >>> Chunk(None, 0, 5, inline=b"abcde").read_into((memoryview(out), 1))
        >>> bytes(out)
        b'bcd'
        """
        if self.inline is not None:
            for out, start in parts:
                out[:] = self.inline[start : start + len(out)]
            return
        with _storage.open_regular(self.file, "OCDBT data file") as (fd, _):  # a FIFO would block a plain open
            for out, start in parts:
                done, offset = 0, self.offset + start
                while done < len(out):  # preadv reads at most ~2 GiB at a time, and less at the end of a file
                    n = os.preadv(fd, [out[done:]], offset + done)
                    if n == 0:
                        raise Damaged(
                            f"{self.file} ends before byte {offset + len(out)}, where the checkpoint's index places "
                            f"a chunk ({self.length} bytes from {self.offset}): it was truncated after the save"
                        )
                    done += n


@dataclasses.dataclass(frozen=True)
class Located(Shaped):
    """A stored array whose chunks can be read straight into host memory (`locate` finds them;
    the module's example reads one)."""

    name: str  # Orbax's name for it
    shape: tuple[int, ...]
    dtype: np.dtype
    chunk_shape: tuple[int, ...]
    chunks: Mapping[tuple[int, ...], Chunk]  # by position in the grid of chunks

    def read(self, feed: Callable[[int, memoryview], None] | None = None) -> np.ndarray:
        """The whole array, in a new 64-byte-aligned buffer.

        Args:
          feed: called with (byte offset, bytes) for consecutive blocks of the array's bytes as
            they are read, where its chunks span whole rows (`integrity.Running` checksums
            them while they are in the cache); not called otherwise.

        Returns:
          The array, in its stored shape and dtype.

        Raises:
          Damaged: a data file ends before a chunk does, or a bool holds a byte other than 0 or 1.

        >>> located = locate(jstate.open_checkpoint(jstate.Saver(pack=False).save(state, "ckpt")).arrays)
        >>> fed = []
        >>> located["biases"].read(lambda at, block: fed.append((at, len(block)))).shape, fed
        ((200,), [(0, 800)])
        """
        out = _aligned(self.shape, self.dtype)
        # Chunks spanning whole rows are contiguous runs of `out`: read in place. Others (split
        # along a later axis) are read whole, then copied into their region.
        rows = self.chunk_shape[1:] == self.shape[1:]
        flat = out.reshape(-1).view(np.uint8)
        row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        for index, chunk in self.chunks.items():
            region = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, self.chunk_shape, self.shape))
            if rows:
                start = region[0].start * row_bytes if region else 0
                n = math.prod(r.stop - r.start for r in region) * self.dtype.itemsize
                step = _BLOCK if feed else max(n, 1)
                for at in range(0, n, step):
                    block = memoryview(flat[start + at : start + min(at + step, n)])
                    chunk.read_into((block, at))
                    if feed:
                        feed(start + at, block)
            else:
                whole = np.empty(self.chunk_shape, self.dtype)
                chunk.read_into((memoryview(whole.reshape(-1).view(np.uint8)), 0))
                out[region] = whole[tuple(slice(0, r.stop - r.start) for r in region)]
        return self._checked(out)

    def read_slices(self, slices: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Elements ``[start, stop)`` of a 1-D array held in one chunk (a packed array), for each
        ``(start, stop)`` of `slices`, each in a new buffer.

        Raises:
          ValueError: the array is not 1-D in one chunk, or a slice does not fit in it.
          Damaged: as `read`.

        >>> located = locate(jstate.open_checkpoint(jstate.Saver(pack=False).save(state, "ckpt")).arrays)
        >>> [a.shape for a in located["biases"].read_slices([(0, 2), (10, 15)])]
        [(2,), (5,)]
        """
        if len(self.shape) != 1 or len(self.chunks) != 1:
            raise ValueError(f"{self.name} is not a 1-D array in one chunk: read it whole")
        if not all(0 <= start <= stop <= self.shape[0] for start, stop in slices):
            raise ValueError(f"{self.name} has {self.shape[0]} elements; slices {list(slices)} do not all fit")
        out = [_aligned((stop - start,), self.dtype) for start, stop in slices]
        (chunk,) = self.chunks.values()
        chunk.read_into(
            *((memoryview(a.view(np.uint8)), start * self.dtype.itemsize) for a, (start, _) in zip(out, slices))
        )
        return [self._checked(a) for a in out]

    def _checked(self, array: np.ndarray) -> np.ndarray:
        """`array`, refused if it is bool with a byte other than 0 or 1 (as tensorstore refuses
        it): NumPy would take any other byte for True, and a flipped bit would go unnoticed
        without checksums."""
        if self.dtype == np.bool_ and (bad := np.flatnonzero(array.view(np.uint8) > 1)).size:
            raise Damaged(f"{self.name} holds {bad.size} byte(s) that are no bool, the first at element {bad[0]}")
        return array


def locate(directory: Path) -> dict[str, Located]:
    """The arrays of the local Orbax checkpoint `directory` that `Located.read` can read, by
    Orbax's name for each (its tree path joined by "."); empty if there are none.

    The result is remembered for the directory's OCDBT manifest as it is now, and shared: do
    not change it. The module's example reads one.

    >>> locate(Path("no-such-checkpoint"))
    {}
    """
    directory = _storage.local_path(directory)  # (tensorstore's file driver: local files only)
    if directory is None:
        return {}
    try:
        found = os.stat(directory / "manifest.ocdbt")
    except OSError:
        return {}
    return _locate(os.fspath(directory), (found.st_ino, found.st_size, found.st_mtime_ns))


@functools.lru_cache(maxsize=16)
def _locate(directory: str, version: tuple[int, int, int]) -> dict[str, Located]:
    """`locate`, remembered while the database's manifest file stays the same (`version`):
    OCDBT never rewrites a data file, and jstate never rewrites a committed checkpoint."""
    try:
        import tensorstore as ts  # comes with Orbax

        base = ts.KvStore.open({"driver": "file", "path": f"{directory}/"}).result()
        latest = ts.ocdbt.dump(base).result()["versions"][-1]
        if latest["root_height"] != 0 or "location" not in latest["root"]:
            return {}
        node = ts.ocdbt.dump(base, latest["root"]["location"]).result()
    except Exception:  # anything tensorstore cannot dump is read through Orbax, which says what is wrong
        return {}
    metadata: dict[str, bytes | None] = {}
    values: dict[str, dict[str, dict]] = {}
    for entry in node.get("entries", ()):
        array, _, part = entry["key"].decode(errors="replace").rpartition("/")
        if part == ".zarray":  # inline in what Orbax writes (up to 1 KiB), else a value of its own
            metadata[array] = entry.get("inline_value") or _value(base, entry.get("indirect_value"))
        else:
            values.setdefault(array, {})[part] = entry
    out = {}
    files: dict[str, Path | None] = {}  # data files by id, each checked once
    for name, zarray in metadata.items():
        located = _located(Path(directory), name, zarray, values.get(name, {}), files)
        if located is not None:
            out[name] = located
    return out


def _value(base: Any, location: str | None) -> bytes | None:
    """The value stored at `location` in the database over `base`, None if it cannot be read."""
    import tensorstore as ts

    try:
        return ts.ocdbt.dump(base, location).result() if location else None
    except Exception:
        return None


def _located(
    directory: Path, name: str, zarray: bytes | None, entries: dict[str, dict], files: dict[str, Path | None]
) -> Located | None:
    """An array from its zarr metadata and its chunks' B+tree entries; None where anything is
    other than an uncompressed zarr v2 array in native byte order with every chunk present."""
    try:
        meta = parse_json(zarray or b"")
        shape, chunk_shape = tuple(int(n) for n in meta["shape"]), tuple(int(n) for n in meta["chunks"])
        dtype = jnp.dtype(meta["dtype"])
        plain = (meta["zarr_format"], meta["compressor"], meta["filters"], meta["order"]) == (2, None, None, "C")
    except Exception:
        return None
    if not plain or not dtype.isnative or len(shape) != len(chunk_shape) or min(chunk_shape, default=1) < 1:
        return None
    separator = meta.get("dimension_separator", ".")
    chunk_bytes = math.prod(chunk_shape) * dtype.itemsize
    chunks = {}
    for index in itertools.product(*(range(-(-s // c)) for s, c in zip(shape, chunk_shape))):
        chunk = _chunk(directory, entries.get(separator.join(map(str, index)) or "0"), chunk_bytes, files)
        if chunk is None:
            return None
        chunks[index] = chunk
    return Located(name, shape, dtype, chunk_shape, chunks)


def _chunk(directory: Path, entry: dict[str, Any] | None, length: int, files: dict[str, Path | None]) -> Chunk | None:
    """A chunk from its B+tree entry: inline, or ``value:<base>:<file>:<offset>:<length>``."""
    if entry is None:
        return None
    if "inline_value" in entry:
        inline = entry["inline_value"]
        return Chunk(None, 0, length, inline) if len(inline) == length else None
    try:
        kind, rest = entry["indirect_value"].split(":", 1)
        file_id, offset, size = rest.rsplit(":", 2)
        if kind != "value" or int(size) != length or int(offset) < 0:
            return None
    except (KeyError, ValueError):
        return None
    if file_id not in files:
        base, _, relative = file_id.partition(":")
        try:  # a hostile index cannot point outside the checkpoint
            files[file_id] = _storage.safe_join(directory, base + relative, directory)
        except CorruptCheckpointError:
            files[file_id] = None
    file = files[file_id]
    return None if file is None else Chunk(file, int(offset), length)


def _aligned(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialized array whose data starts on a `_ALIGNMENT`-byte boundary."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % _ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)
