"""Checksums that make every corruption of a checkpoint an error, never wrong values.

Orbax stores no checksum of array data (a flipped byte restores silently wrong), so jstate
records, in its manifest:
  - a CRC32C of every saved shard of every array, verified after each restore;
  - the size and CRC32C of every file Orbax wrote; sizes are checked whenever a checkpoint is
    opened, and contents when an array digest fails, to name the damaged file. On an object
    store the data files' CRC32C is not taken (it would download every byte just written, and
    the array digests already cover them): their record holds `UNRECORDED`.
CRC32C is TensorFlow's checksum; the `crc32c` package computes it at several GB/s.
"""

from __future__ import annotations

import math
import mmap
import os
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import crc32c
import jax
import numpy as np

from ..core.errors import CorruptCheckpointError
from ..storage import deadlines as _limits
from ..storage import store as _storage

_PARALLEL_BYTES = 64 * 1024 * 1024
UNRECORDED = -1  # a file's CRC32C that was not taken


def checksum(data: np.ndarray | bytes | mmap.mmap) -> int:
    """The CRC32C of `data`: of an array's bytes in C order, whatever its strides.

    >>> checksum(b"jstate") == checksum(np.frombuffer(b"jstate", np.uint8))
    True
    """
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return crc32c.crc32c(data)


def _slice_key(index: tuple[slice, ...], shape: tuple[int, ...]) -> str:
    """``"0:16,0:32"``: the region of the global array a shard covers."""
    return ",".join(f"{s.start or 0}:{dim if s.stop is None else s.stop}" for s, dim in zip(index, shape))


def _parse_key(key: str) -> tuple[slice, ...]:
    if not key:
        return ()
    return tuple(slice(*map(int, part.split(":"))) for part in key.split(","))


def array_digests(array: jax.Array) -> dict[str, int]:
    """CRC32C of each distinct shard this process holds, keyed by the region it covers.

    >>> mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2])
    >>> sorted(array_digests(jax.device_put(np.zeros((4, 3), np.float32), jax.NamedSharding(mesh, jax.P("x")))))
    ['0:2,0:3', '2:4,0:3']
    """
    return {
        _slice_key(shard.index, array.shape): checksum(np.asarray(shard.data))
        for shard in array.addressable_shards
        if shard.replica_id == 0
    }


def whole_digest(array: np.ndarray) -> dict[str, int]:
    """`array_digests` of a host array: one region, all of it.

    >>> whole_digest(np.zeros((2, 3), np.float32))
    {'0:2,0:3': 2231102702}
    """
    return {_slice_key((slice(None),) * array.ndim, array.shape): checksum(array)}


def verify_arrays(
    arrays: dict[str, jax.Array], digests: dict[str, dict[str, int]], elsewhere: dict | None = None
) -> tuple[str, str] | None:
    """Check restored arrays against the checksums recorded at save; the first mismatch as
    ``(name, region)``, or None.

    A region that no process holds whole (a multi-process restore onto another mesh) is left to
    one process, chosen by the region: if that is this one, it is added to `elsewhere`
    (``{name: {region: crc}}``) for the caller to check on the host.

    A recorded region is checked where this process holds it whole: as one of its shards, or
    assembled on the host from the pieces of several (a restore onto another mesh). The pieces
    are copied with numpy, never sliced with JAX indexing, which explicit mesh axes refuse.
    Device-to-host copies start at once and checksums run in a thread pool (crc32c releases the
    GIL), so on accelerators the copies overlap the hashing.

    Args:
      arrays: the restored arrays, by name.
      digests: ``{name: {region: crc32c}}`` recorded at save.
      elsewhere: where to add the regions this process must check on the host (None: skip them).

    Returns:
      ``(name, region)`` of the first mismatch, or None when all match.

    >>> x = jnp.arange(6.0)
    >>> verify_arrays({"x": x}, {"x": array_digests(x)}), verify_arrays({"x": x}, {"x": {"0:6": 0}})
    (None, ('x', '0:6'))
    """
    jobs = []
    for name, array in arrays.items():
        recorded = digests.get(name, {})
        if not recorded:
            continue
        shards = {}  # one shard per distinct region: replicas hold the same bytes
        for shard in array.addressable_shards:
            shards.setdefault(_slice_key(shard.index, array.shape), shard)
        for key, expected in recorded.items():
            if key in shards:
                jobs.append((name, key, expected, [shards[key]], None, array.shape))
                continue
            region = _bounds(_parse_key(key), array.shape)
            pieces = [s for s in shards.values() if _overlap(region, _bounds(s.index, array.shape))]
            covered = sum(_size(_overlap(region, _bounds(s.index, array.shape))) for s in pieces)
            if covered == _size(region):
                jobs.append((name, key, expected, pieces, region, array.shape))
            elif elsewhere is not None and _owner(name, key, region, array) == jax.process_index():
                elsewhere.setdefault(name, {})[key] = expected
    if sum(s.data.nbytes for job in jobs for s in job[3]) >= _PARALLEL_BYTES:
        for job in jobs:
            for shard in job[3]:
                shard.data.copy_to_host_async()
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            matches = list(pool.map(_check, jobs))
    else:  # small: threads cost more than they save
        matches = [_check(job) for job in jobs]
    for (name, key, *_), ok in zip(jobs, matches):
        if not ok:
            return name, key
    return None


def _owner(name: str, key: str, region: Bounds, array: jax.Array) -> int | None:
    """The process that checks `region` on the host: None if some process holds it whole on its
    devices (it checks it there), else one chosen by name and region, the same in every process."""
    by_process: dict[int, set] = {}
    for device, index in array.sharding.devices_indices_map(array.shape).items():
        by_process.setdefault(device.process_index, set()).add(_bounds(index, array.shape))
    for pieces in by_process.values():
        if sum(_size(_overlap(region, b)) for b in pieces) == _size(region):
            return None
    return zlib.crc32(f"{name}:{key}".encode()) % jax.process_count()


def verify_host(arrays: dict[str, np.ndarray], digests: dict[str, dict[str, int]]) -> tuple[str, str] | None:
    """`verify_arrays` for whole arrays in host memory: every recorded region is checked.

    >>> x = np.arange(6.0)
    >>> verify_host({"x": x}, {"x": whole_digest(x)}), verify_host({"x": x}, {"x": {"2:4": 0}})
    (None, ('x', '2:4'))
    """
    for name, array in arrays.items():
        for key, expected in digests.get(name, {}).items():
            if checksum(array[_parse_key(key)]) != expected:
                return name, key
    return None


class Running:
    """Checks an array's recorded regions while its bytes arrive, in order, a block at a time
    (`feed`): each block is checksummed while it is still in the CPU's cache, which made a
    verified 1 GiB read 15% faster than reading first and checksumming after. Regions that are
    not one run of bytes in C order, or that were not fed whole, are checked by `finish`.

    >>> array = np.arange(12, dtype=np.int32).reshape(4, 3)
    >>> running = Running(array.shape, array.dtype.itemsize, {"0:2,0:3": checksum(array[:2]), "2:4,0:3": 0})
    >>> running.feed(0, memoryview(array.view(np.uint8).reshape(-1)))
    >>> running.finish(array)
    '2:4,0:3'
    """

    def __init__(self, shape: tuple[int, ...], itemsize: int, digests: dict[str, int]):
        self._digests = digests
        self._runs: dict[str, list[int]] = {}  # key -> [next byte, end byte, running CRC32C]
        strides = [math.prod(shape[i + 1 :]) * itemsize for i in range(len(shape))]
        for key in digests:
            region = _parse_key(key)
            lengths = [r.stop - r.start for r in region]
            # One run of bytes: after the first axis it spans more than one index of, it spans all.
            first = next((i for i, n in enumerate(lengths) if n != 1), len(lengths))
            if all(r.start == 0 and r.stop == n for r, n in zip(region[first + 1 :], shape[first + 1 :])):
                start = sum(r.start * stride for r, stride in zip(region, strides))
                self._runs[key] = [start, start + math.prod(lengths) * itemsize, 0]

    def feed(self, start: int, block: memoryview) -> None:
        """Take the array's bytes from byte `start` on (blocks must come in order); the class's
        example feeds one."""
        end = start + len(block)
        for run in self._runs.values():
            if run[0] < run[1] and start <= run[0] < end:
                stop = min(run[1], end)
                run[2] = crc32c.crc32c(block[run[0] - start : stop - start], run[2])
                run[0] = stop

    def finish(self, array: np.ndarray) -> str | None:
        """The key of the first region of `array` that does not match its digest, or None (the
        class's example finds one)."""
        for key, expected in self._digests.items():
            run = self._runs.get(key)
            found = run[2] if run is not None and run[0] == run[1] else checksum(array[_parse_key(key)])
            if found != expected:
                return key
        return None


Bounds = tuple[tuple[int, int], ...]


def _check(job) -> bool:
    _, _, expected, pieces, region, shape = job
    if region is None:
        return checksum(np.asarray(pieces[0].data)) == expected
    out = np.empty([stop - start for start, stop in region], pieces[0].data.dtype)
    for shard in pieces:
        bounds = _bounds(shard.index, shape)
        common = _overlap(region, bounds)
        out[tuple(slice(a - r0, b - r0) for (a, b), (r0, _) in zip(common, region))] = np.asarray(shard.data)[
            tuple(slice(a - s0, b - s0) for (a, b), (s0, _) in zip(common, bounds))
        ]
    return checksum(out) == expected


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> Bounds:
    return tuple((s.start or 0, dim if s.stop is None else s.stop) for s, dim in zip(index, shape))


def _overlap(a: Bounds, b: Bounds) -> Bounds | None:
    common = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(a, b))
    return common if all(lo < hi for lo, hi in common) or not common else None


def _size(bounds: Bounds | None) -> int:
    return 0 if bounds is None else math.prod(hi - lo for lo, hi in bounds)


def file_checksum(path: Path) -> int:
    """CRC32C of a file: mapped into memory locally, no copy into fresh memory (slow on these
    machines); downloaded from an object store.

    >>> _ = Path("f").write_bytes(b"jstate")
    >>> file_checksum(Path("f")) == checksum(b"jstate")
    True
    """
    with _storage.mapped(path) as data:
        return checksum(data)


def file_records(directory: Path, contents: Callable[[str], bool] = lambda rel: True) -> dict[str, list[int]]:
    """``{relative path: [size, crc32c]}`` for every file under `directory` (files in parallel);
    the CRC32C only of files whose relative path `contents` accepts (`UNRECORDED` for others).

    >>> Path("d/sub").mkdir(parents=True); _ = Path("d/sub/f").write_bytes(b"jstate")
    >>> file_records(Path("d")) == {"sub/f": [6, checksum(b"jstate")]}, file_records(Path("d"), lambda rel: False)
    (True, {'sub/f': [6, -1]})
    """
    found = _storage.files(directory)  # on GCS with the store's own CRC32C: nothing to read back
    wanted = [rel for rel, file in found.items() if file.crc32c is None and contents(rel)]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        crcs = dict(zip(wanted, pool.map(_limits.bounded(lambda rel: file_checksum(directory / rel)), wanted)))
    return {rel: [f.size, f.crc32c if f.crc32c is not None else crcs.get(rel, UNRECORDED)] for rel, f in found.items()}


def check_files(
    directory: Path,
    records: dict[str, list[int]],
    checkpoint: Path,
    contents: Iterable[str] = (),
    listed: dict[str, _storage.File] | None = None,
) -> None:
    """Every recorded file exists with its recorded size; those named in `contents` also with
    their recorded checksum. Raises CorruptCheckpointError naming the first damaged file.

    `listed` is `_storage.files(directory)` where the caller has it; it is listed here
    otherwise (on an object store one request, not one per file). A recorded file the listing
    lacks (locally: one reached through a symbolic link) is looked for by itself, through
    `safe_join`'s check."""
    contents = set(contents)
    if listed is None:
        listed = _storage.files(directory)
    for rel, (size, _) in records.items():
        path = directory / rel
        try:
            if rel in listed:
                actual = listed[rel].size
            else:
                path = _storage.safe_join(directory, rel, checkpoint)
                actual = _storage.size(path)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"Checkpoint {checkpoint} is incomplete: {path} is missing.") from None
        if actual != size:
            raise CorruptCheckpointError(
                f"Checkpoint {checkpoint} is damaged: {path} has {actual} bytes, {size} were written."
            )
    hashed = [(rel, directory / rel) for rel in records if rel in contents and records[rel][1] != UNRECORDED]
    try:  # where each is a request, in parallel: their latency adds up
        crcs = _storage.store_for(directory).map(lambda item: _crc(item[1], item[0], listed), hashed)
    except FileNotFoundError as e:  # deleted since its size was checked (a re-save retiring it)
        raise CorruptCheckpointError(f"Checkpoint {checkpoint} is incomplete: {e.filename or e} is missing.") from None
    for (rel, path), crc in zip(hashed, crcs):
        if crc != records[rel][1]:
            raise CorruptCheckpointError(f"Checkpoint {checkpoint} is damaged: {path} does not match its checksum.")


def damaged_files(directory: Path, records: dict[str, list[int]], checkpoint: Path) -> list[str]:
    """The recorded files whose contents no longer match (slow: reads them all)."""
    bad = []
    listed = _storage.files(directory)
    for rel, (size, crc) in records.items():
        path = _storage.safe_join(directory, rel, checkpoint)
        try:
            if rel not in listed and not _storage.is_file(path):
                bad.append(str(path))
            elif crc == UNRECORDED:
                if _storage.size(path) != size:
                    bad.append(str(path))
            elif _crc(path, rel, listed) != crc:
                bad.append(str(path))
        except FileNotFoundError:  # deleted while we looked (a re-save retiring it)
            bad.append(str(path))
    return bad


def _crc(path: Path, rel: str, listed: dict | None) -> int:
    """The CRC32C of file `path` (`rel` in its checkpoint): the store's, from `listed`
    (`_storage.files` of the directory), where it keeps one; else computed from the bytes."""
    crc = listed[rel].crc32c if listed is not None and rel in listed else None
    return file_checksum(path) if crc is None else crc
