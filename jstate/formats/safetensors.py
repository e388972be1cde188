"""Reading and writing ``.safetensors`` files (Hugging Face's flat format) with the `safetensors` package:
`SafetensorsCheckpoint` reads one, `save_safetensors` (``jstate.save_safetensors``) writes one.

A ``.safetensors`` file is a JSON header (name -> dtype, shape, byte range) followed by the raw
arrays. It holds no checksums: a damaged array is only caught when its header no longer adds up.
The `safetensors` package is an optional extra (``pip install jstate[safetensors]``), imported
only when such a file is read or written.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import jax

# safetensors' numpy reader makes bfloat16 arrays with ``np.dtype("bfloat16")``, a name numpy
# only knows once ml_dtypes is imported.
import ml_dtypes
import numpy as np

from ..core.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, not_in_checkpoint
from ..storage import store as _storage
from .base import Checkpoint, Entry, from_host

SUFFIX = ".safetensors"

# safetensors dtype -> numpy, for those its numpy reader can produce. (It writes the float8 types
# but cannot read them back into numpy: it looks them up as ``numpy.float8_*``.)
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

    Arrays of a dtype the safetensors package cannot read into numpy (its float8 types) are in
    `skipped`, with the reason.

    Args:
      path: the file, local or on an object store (downloaded to read it).

    Raises:
      CheckpointNotFoundError: `path` does not exist.
      CorruptCheckpointError: its header is truncated or garbled, or the file is shorter than
        the header says.
      CheckpointError: the `safetensors` package is not installed.

    >>> path = jstate.save_safetensors(state, "model.safetensors")
    >>> SafetensorsCheckpoint(Path(path)).entries["biases"].shape
    (200,)
    """

    writer = "safetensors"
    _noun = "array"

    def __init__(self, path: Path):
        path = _storage.as_path(path)
        header = _header(path)
        found = {
            name: Entry((name,), shape, _DTYPES[dtype]) for name, (dtype, shape) in header.items() if dtype in _DTYPES
        }
        skipped = {name: _why(dtype) for name, (dtype, _) in header.items() if dtype not in _DTYPES}
        super().__init__(path, found, created=_storage.mtime(path), skipped=skipped)

    def _read_host(self, names: list[str], verify: bool) -> dict[str, np.ndarray]:
        return read(self.path, names)

    def _read(self, wanted: dict[str, jax.ShapeDtypeStruct], verify: bool) -> dict[str, jax.Array]:
        host = read(self.path, list(wanted))
        return {name: from_host(host.pop(name), target) for name, target in wanted.items()}


def load(path: Path) -> SafetensorsCheckpoint | None:
    """`path` as a ``.safetensors`` file, None if it is not one (no such file, or another suffix).

    Raises:
      CorruptCheckpointError, CheckpointError: as `SafetensorsCheckpoint`.

    >>> print(load(Path("model.npz")))
    None
    """
    return SafetensorsCheckpoint(path) if path.suffix == SUFFIX and _storage.is_file(path) else None


def _why(dtype: str) -> str:
    """Why an array of safetensors dtype `dtype` is skipped."""
    return f"of dtype {dtype}, which the safetensors package cannot read into numpy"


def _header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (safetensors dtype, shape)}``, from the header only."""
    out = {}
    with _open(path) as f:
        for name in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict: it cannot be iterated)
            view = f.get_slice(name)
            out[name] = (view.get_dtype(), tuple(view.get_shape()))
    return out


def _package():
    """The `safetensors` package, imported on first use (an optional extra)."""
    try:
        import safetensors.numpy
    except ImportError as e:
        raise CheckpointError(
            "Reading or writing .safetensors files needs the `safetensors` package: "
            "`pip install 'jstate[safetensors]'`."
        ) from e
    return safetensors


@contextlib.contextmanager
def _open(path: Path) -> Iterator:
    """The file open for reading. safetensors reads local files only: one on an object store
    is downloaded to a temporary file first."""
    safetensors = _package()
    if not _storage.is_file(path):
        raise CheckpointNotFoundError(f"No safetensors file at {path}: it does not exist.")
    with _storage.local_copy(path) as local:
        try:
            handle = safetensors.safe_open(local, framework="numpy")
        except Exception as e:  # SafetensorError subclasses Exception only; its messages say what is wrong
            raise CorruptCheckpointError(
                f"Safetensors file {path} is damaged or truncated ({e}). Restore or re-export it."
            ) from e
        with handle as f:
            yield f


def read(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Read just the arrays `names` of the file (the others stay on disk, unread).

    Returns:
      ``{name: array}`` with the file's shape and dtype (bfloat16 as ``ml_dtypes.bfloat16``).

    Raises:
      CheckpointError: for a name the file lacks or holds in a dtype jstate cannot read.
      CorruptCheckpointError: for a damaged or truncated file.

    >>> read(Path(jstate.save_safetensors(state, "model.safetensors")), ["biases"])["biases"].shape
    (200,)
    """
    path = _storage.as_path(path)
    header = _header(path)
    missing = [n for n in names if n not in header]
    if missing:
        raise not_in_checkpoint(f"Safetensors file {path}", missing, header, "array")
    for name in names:
        if header[name][0] not in _DTYPES:
            raise CheckpointError(
                f"Safetensors file {path}: array '{name}' cannot be read: its dtype {header[name][0]} is one "
                "the safetensors package cannot read into numpy."
            )
    out = {}
    with _open(path) as f:
        for name in dict.fromkeys(names):
            try:
                out[name] = f.get_tensor(name)
            except Exception as e:
                raise CorruptCheckpointError(f"Safetensors file {path}: reading array '{name}' failed ({e}).") from e
    return {name: out[name] for name in names}


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
