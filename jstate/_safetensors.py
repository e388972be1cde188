"""Reading and writing ``.safetensors`` files (Hugging Face's flat format) with the `safetensors` package.

A ``.safetensors`` file is a JSON header (name -> dtype, shape, byte range) followed by the raw
arrays. It holds no checksums: a damaged array is only caught when its header no longer adds up.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

# safetensors' numpy reader makes bfloat16 arrays with ``np.dtype("bfloat16")``, a name numpy
# only knows once ml_dtypes is imported.
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from . import _files
from ._errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, closest, shorten
from ._spec import Entry

if TYPE_CHECKING:
    from ._state import State

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


def find(path: Path) -> Path | None:
    """`path` if it is a ``.safetensors`` file, else None."""
    path = Path(path)
    return path if path.suffix == SUFFIX and path.is_file() else None


def entries(path: Path) -> dict[str, Entry]:
    """Every array of the file that jstate can read, by name, from its header only.

    Raises:
      CheckpointNotFoundError: if `path` does not exist.
      CorruptCheckpointError: if its header is truncated or garbled, or the file is shorter
        than the header says.
    """
    return {
        name: Entry((name,), shape, _DTYPES[dtype])
        for name, (dtype, shape) in _header(Path(path)).items()
        if dtype in _DTYPES
    }


def skipped(path: Path) -> dict[str, str]:
    """The arrays of the file that jstate cannot read, by name, each with the reason."""
    return {
        name: f"of dtype {dtype}, which the safetensors package cannot read into numpy"
        for name, (dtype, _) in _header(Path(path)).items()
        if dtype not in _DTYPES
    }


def _header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (safetensors dtype, shape)}``, from the header only."""
    out = {}
    with _open(path) as f:
        for name in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict: it cannot be iterated)
            view = f.get_slice(name)
            out[name] = (view.get_dtype(), tuple(view.get_shape()))
    return out


def _open(path: Path):
    if not path.is_file():
        raise CheckpointNotFoundError(f"No safetensors file at {path}: it does not exist.")
    try:
        return safetensors.safe_open(path, framework="numpy")
    except Exception as e:  # SafetensorError subclasses Exception only; its messages say what is wrong
        raise CorruptCheckpointError(
            f"Safetensors file {path} is damaged or truncated ({e}). Restore or re-export it."
        ) from e


def read(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Read just the arrays `names` of the file (the others stay on disk, unread).

    Returns:
      ``{name: array}`` with the file's shape and dtype (bfloat16 as ``ml_dtypes.bfloat16``).

    Raises:
      CheckpointError: for a name the file lacks or holds in a dtype jstate cannot read.
      CorruptCheckpointError: for a damaged or truncated file.
    """
    path = Path(path)
    header = _header(path)
    missing = [n for n in names if n not in header]
    if missing:
        raise CheckpointError(
            f"Safetensors file {path} holds no array {shorten(missing)}.{closest(missing[0], header)} "
            "`jstate.list_variables(path)` lists them."
        )
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


def save(state: State, path: str | os.PathLike) -> Path:
    """Export the initialized variables of `state` to one ``.safetensors`` file at `path`.

    The file is written under a temporary name beside `path`, flushed to disk, and renamed into
    place: `path` is either the old file or the complete new one, never half written. Variables
    are gathered to the host first, so the whole State must fit in host memory.

    Args:
      state: the variables to write, under their own names; uninitialized ones are left out.
      path: the file to write (replaced if it exists).

    Returns:
      The path written.

    Raises:
      CheckpointError: for a variable whose dtype safetensors cannot hold (or jstate cannot
        read back), naming it.

    >>> _safetensors.save(state, "model.safetensors")
    PosixPath('model.safetensors')
    """
    path = Path(path)
    arrays = {}
    for name, value in state.items():
        array = np.asarray(value, order="C")  # (np.ascontiguousarray would make scalars 1-d)
        if array.dtype not in _SAVED:
            raise CheckpointError(
                f"Cannot export variable '{name}' to {path}: its dtype {array.dtype.name} is not one safetensors "
                f"files hold and jstate reads back ({', '.join(sorted(d.name for d in _SAVED))}). Cast it first."
            )
        arrays[name] = array
    tmp = _files.temporary(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        safetensors.numpy.save_file(arrays, tmp, metadata={"writer": "jstate"})
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _files.sync_dir(path.parent)
    return path
