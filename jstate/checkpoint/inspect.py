"""``jstate inspect``: what TensorFlow's ``print_tensors_in_checkpoint_file`` prints."""

from __future__ import annotations

import os

import jax
import numpy as np

from ..core.table import human_bytes
from ..storage import store as _storage
from .directory import checkpoints
from .lookup import LOOKUP_TIMEOUT, list_checkpoints, lookup, open_checkpoint


def inspect_checkpoint(path: str | os.PathLike, *, values: bool = False, name: str | None = None) -> None:
    """Print a checkpoint's variables (name, shape, dtype, size), and their values on request.

    For a directory of checkpoints, print the list of them instead (or, with `values` or
    `name`, inspect its latest). Reads metadata only, unless `values` is set.

    Args:
      path: a checkpoint, or a directory of them.
      values: also print each variable's values.
      name: only this variable.

    Raises:
      CheckpointNotFoundError, CorruptCheckpointError, CheckpointError: as `jstate.open_checkpoint`.

    >>> inspect_checkpoint(jstate.Saver().save(state, "ckpt/model"), values=True, name="biases")
    tensor_name: biases  shape: (200,)  dtype: float32  size: 800 B
    [0. 0. 0. ... 0. 0. 0.]
    """
    path = _storage.as_path(path)
    found = lookup(path, LOOKUP_TIMEOUT, "jstate inspect", lambda: checkpoints(path) if _storage.is_dir(path) else [])
    if found and all(c.path != path for c in found) and not values and name is None:
        print(list_checkpoints(path))
        return
    ckpt = open_checkpoint(path)  # a directory with `values` or `name`: its latest checkpoint
    if name is not None and name in ckpt.values and name not in ckpt.entries:  # a JSON item of an Orbax step
        print(f"value_name: {name}\n{ckpt.values[name]!r}")
        return
    entries = ckpt.entries
    if name is not None:
        entries = {name: ckpt.entry(name)}
    if not values:
        table = ckpt.table()
        if name is not None:
            table.rows = [r for r in table.rows if r[0] == name]
        print(table)
        return
    for n, e in sorted(entries.items()):
        print(f"tensor_name: {n}  shape: {e.shape}  dtype: {e.dtype.name}  size: {human_bytes(e.nbytes)}")
        value = ckpt.read_host([n])[n]
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):  # NumPy cannot hold keys: show their data
            print(f"key data ({jax.random.key_impl(value)}):")
            value = jax.random.key_data(value)
        print(np.asarray(value))
    for n, value in sorted(ckpt.values.items()) if name is None else []:
        print(f"value_name: {n}\n{value!r}")
