"""Reading and writing ``.safetensors`` files (Hugging Face's flat format): `SafetensorsCheckpoint`
reads one, `save_safetensors` (``jstate.save_safetensors``) writes one with the `safetensors` package.

A ``.safetensors`` file is an 8-byte length, a JSON header (name -> dtype, shape, byte range),
then the raw arrays. It holds no checksums: a damaged array is only caught when its header no
longer adds up. Reading is jstate's own (`_header`: ranged reads, so a file on an object store
is never downloaded whole); writing needs the `safetensors` package, an optional extra
(``pip install jstate[safetensors]``) imported only then.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from ..core.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, not_in_checkpoint
from ..core.untrusted import parse_json
from ..storage import store as _storage
from .base import Checkpoint, Entry, from_host

SUFFIX = ".safetensors"

# safetensors dtype -> numpy, for those jstate reads and writes (the float8 types, which the
# safetensors package writes but cannot read back into numpy, are left out).
_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "C64": np.dtype(np.complex64),
}
_SAVED = set(_DTYPES.values())


class SafetensorsCheckpoint(Checkpoint):
    """A ``.safetensors`` file: entries named as in its header, no checksums.

    Opening it reads its header alone (two ranged reads on an object store); reading arrays
    reads just their bytes (one ranged read each): a file on ``gs://`` or ``s3://`` is never
    downloaded whole. Arrays of a dtype jstate does not read (the float8 types) are in
    `skipped`, with the reason.

    Args:
      path: the file, local or on an object store.

    Raises:
      CheckpointNotFoundError: `path` does not exist.
      CorruptCheckpointError: its header is truncated or garbled, or the file is shorter than
        the header says.
      CheckpointError: it is no regular file (a FIFO, a device), or its header is over 100 MB.

    >>> path = jstate.save_safetensors(state, "model.safetensors")
    >>> SafetensorsCheckpoint(Path(path)).entries["biases"].shape
    (200,)
    """

    writer = "safetensors"
    _noun = "array"

    def __init__(self, path: Path):
        path = _storage.as_path(path)
        self.header = _header(path)
        found = {
            name: Entry((name,), t.shape, _DTYPES[t.dtype]) for name, t in self.header.items() if t.dtype in _DTYPES
        }
        skipped = {name: _why(t.dtype) for name, t in self.header.items() if t.dtype not in _DTYPES}
        super().__init__(path, found, created=_storage.mtime(path), skipped=skipped)

    def _read_host(self, names: list[str], verify: bool) -> dict[str, np.ndarray]:
        return _read(self.path, self.header, names)

    def _read(self, wanted: dict[str, jax.ShapeDtypeStruct], verify: bool) -> dict[str, jax.Array]:
        host = _read(self.path, self.header, list(wanted))
        return {name: from_host(host.pop(name), target) for name, target in wanted.items()}


def load(path: Path) -> SafetensorsCheckpoint | None:
    """`path` as a ``.safetensors`` file, None if it is not one (no such file, or another suffix).

    Raises:
      CorruptCheckpointError, CheckpointError: as `SafetensorsCheckpoint`.

    >>> print(load(Path("model.npz")))
    None
    """
    if path.suffix != SUFFIX or (_storage.local_path(path) is not None and _storage.is_dir(path)):
        return None  # (a directory so named may hold checkpoints)
    try:
        return SafetensorsCheckpoint(path)
    except CheckpointNotFoundError:
        return None


def _why(dtype: str) -> str:
    """Why an array of safetensors dtype `dtype` is skipped."""
    return f"of dtype {dtype}, which jstate does not read from safetensors files"


@dataclass(frozen=True)
class _Tensor:
    """One array of a safetensors header: where its bytes lie in the file."""

    dtype: str  # safetensors' name
    shape: tuple[int, ...]
    start: int  # its bytes in the file, `end` excluded
    end: int


# The first read of a file on an object store: its length and, for most files, its whole header.
_FIRST_READ = 64 * 1024
# safetensors' own limit on a header (its `MAX_HEADER_SIZE`): a larger one is refused unread.
HEADER_LIMIT = 100_000_000


def _header(path: Path) -> dict[str, _Tensor]:
    """The arrays of a file, from its header alone: ``{name: _Tensor}``.

    Read here, not by the safetensors package, whose `safe_open` opens local files only (a file
    on an object store would be downloaded whole, for every call) and reads the header without
    a bound on what precedes it. Checked as the package checks it: valid JSON, each array's
    byte range the size its shape and dtype take, inside the file.
    """
    try:
        first = _storage.read_range(path, 0, _FIRST_READ, "safetensors file")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise CheckpointNotFoundError(f"No safetensors file at {path}: it does not exist.") from None
    if len(first) < 8:
        raise _damaged(path, f"it holds {len(first)} bytes, fewer than the 8 of its header's length")
    length = int.from_bytes(first[:8], "little")
    if length > HEADER_LIMIT:
        raise CheckpointError(
            f"Safetensors file {path}: its header is said to hold {length:,} bytes, over the {HEADER_LIMIT:,} "
            "a safetensors header may hold; it is no safetensors file jstate reads. Nothing was read."
        )
    data = bytes(first[8 : 8 + length])
    if len(data) < length and len(first) == _FIRST_READ:  # a larger header: the rest, in one more read
        data += bytes(_storage.read_range(path, _FIRST_READ, 8 + length - _FIRST_READ, "safetensors file"))
    if len(data) < length:
        raise _damaged(path, f"its header is cut short ({len(data)} of {length} bytes)")
    try:
        raw = parse_json(data)
        if not isinstance(raw, dict):
            raise ValueError("the header is no JSON object")
        tensors = {name: _tensor(name, value, 8 + length) for name, value in raw.items() if name != "__metadata__"}
    except (ValueError, TypeError, KeyError) as e:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        raise _damaged(path, f"its header is garbled: {e}") from None
    if len(first) < _FIRST_READ:  # the whole file was read: its size is known for free
        short = [n for n, t in tensors.items() if t.end > len(first)]
        if short:
            raise _damaged(
                path, f"array '{short[0]}' needs bytes up to {tensors[short[0]].end}, the file has {len(first)}"
            )
    elif _storage.local_path(path) is not None:  # locally, a size costs no request
        size = _storage.size(path)
        short = [n for n, t in tensors.items() if t.end > size]
        if short:
            raise _damaged(path, f"array '{short[0]}' needs bytes up to {tensors[short[0]].end}, the file has {size}")
    return tensors


def _tensor(name: str, value: dict, base: int) -> _Tensor:
    """Header entry `value` of array `name` as a `_Tensor` (ValueError if it is not one)."""
    dtype, shape, (start, end) = value["dtype"], tuple(value["shape"]), value["data_offsets"]
    numbers = (*shape, start, end)
    if not isinstance(dtype, str) or not all(type(d) is int and d >= 0 for d in numbers):  # (no bools)
        raise ValueError(f"array {name!r} has dtype {dtype!r}, shape {shape!r} and offsets {[start, end]!r}")
    if dtype in _DTYPES and end - start != math.prod(shape) * _DTYPES[dtype].itemsize:
        raise ValueError(f"array {name!r} of shape {shape} and dtype {dtype} is recorded as {end - start} bytes")
    if end < start:
        raise ValueError(f"array {name!r} ends (byte {end}) before it starts ({start})")
    return _Tensor(dtype, shape, base + start, base + end)


def _damaged(path: Path, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"Safetensors file {path} is damaged or truncated ({why}). Restore or re-export it.")


def read(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Read just the arrays `names` of the file (the others stay unread): its header, then one
    ranged read per array.

    Returns:
      ``{name: array}`` with the file's shape and dtype (bfloat16 as ``ml_dtypes.bfloat16``).

    Raises:
      CheckpointError: for a name the file lacks or holds in a dtype jstate cannot read.
      CorruptCheckpointError: for a damaged or truncated file.

    >>> read(Path(jstate.save_safetensors(state, "model.safetensors")), ["biases"])["biases"].shape
    (200,)
    """
    path = _storage.as_path(path)
    return _read(path, _header(path), names)


def _read(path: Path, header: dict[str, _Tensor], names: list[str]) -> dict[str, np.ndarray]:
    """The arrays `names` of the file whose header is `header`."""
    missing = [n for n in names if n not in header]
    if missing:
        raise not_in_checkpoint(f"Safetensors file {path}", missing, header, "array")
    for name in names:
        if header[name].dtype not in _DTYPES:
            raise CheckpointError(
                f"Safetensors file {path}: array '{name}' cannot be read: its dtype {header[name].dtype} is not one "
                "jstate reads from safetensors files."
            )

    def one(name: str) -> np.ndarray:
        t = header[name]
        data = _storage.read_range(path, t.start, t.end - t.start, "safetensors file")
        if len(data) != t.end - t.start:
            raise _damaged(
                path, f"array '{name}' needs bytes {t.start}-{t.end}, the file ends at {t.start + len(data)}"
            )
        array = np.frombuffer(data, _DTYPES[t.dtype].newbyteorder("<")).reshape(t.shape)
        # A writable array in this machine's byte order: bytes from a store are read-only.
        return array if array.flags.writeable and array.dtype.isnative else array.astype(_DTYPES[t.dtype])

    wanted = list(dict.fromkeys(names))
    out = dict(zip(wanted, _storage.store_for(path).map(one, wanted)))
    return {name: out[name] for name in names}


def _package():
    """The `safetensors` package, imported on first use (an optional extra)."""
    try:
        import safetensors.numpy
    except ImportError as e:
        raise CheckpointError(
            "Writing .safetensors files needs the `safetensors` package: `pip install 'jstate[safetensors]'`."
        ) from e
    return safetensors


def save_safetensors(state: Mapping[str, jax.Array], path: str | os.PathLike) -> str:
    """Export the State's initialized variables, under their names, to one ``.safetensors`` file.

    The file is written under a temporary name beside `path`, flushed to disk, and renamed into
    place: `path` is either the old file or the complete new one, never half written. Variables
    are gathered to the host first, so the whole State must fit in host memory. Needs
    ``pip install jstate[safetensors]``. Read it back with ``Saver().restore(path, target)`` or
    `jstate.load_variable`.

    Args:
      state: the variables to write, under their own names (a State, or any mapping of names to
        arrays); a State's uninitialized ones are left out.
      path: the file to write (replaced if it exists), local or ``gs://``/``s3://``.

    Returns:
      The path written.

    Raises:
      CheckpointError: for a variable whose dtype safetensors cannot hold (or jstate cannot
        read back), naming it; or without the `safetensors` package.

    >>> jstate.save_safetensors(state, "model.safetensors")
    'model.safetensors'
    """
    path = _storage.as_path(path)
    arrays = {}
    for name, value in state.items():
        dtype = getattr(value, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            raise CheckpointError(
                f"Cannot export variable '{name}' to {path}: it holds PRNG keys ({dtype}), which a safetensors file "
                f"cannot hold. Export its key data instead (`state.assign` a `jax.random.key_data` of it under a "
                "State of its own), or leave it out (`jstate.State({n: v for n, v in state.items() if ...})`); a "
                "jstate checkpoint (`Saver.save`) keeps keys as keys."
            )
        array = np.asarray(value, order="C")  # (np.ascontiguousarray would make scalars 1-d)
        if array.dtype not in _SAVED:
            raise CheckpointError(
                f"Cannot export variable '{name}' to {path}: its dtype {array.dtype.name} is not one safetensors "
                f"files hold and jstate reads back ({', '.join(sorted(d.name for d in _SAVED))}). Cast it first."
            )
        arrays[name] = array
    safetensors = _package()
    _storage.makedirs(path.parent)
    with _storage.atomic(path) as tmp:
        safetensors.numpy.save_file(arrays, tmp, metadata={"writer": "jstate"})
    return str(path)
