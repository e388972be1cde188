"""``jstate inspect``: what TensorFlow's ``print_tensors_in_checkpoint_file`` prints."""

from __future__ import annotations

import os

import numpy as np

from ._checkpoint import checkpoints, open_checkpoint
from ._files import user_path
from ._table import Table, human_bytes


def inspect_checkpoint(path: str | os.PathLike, *, values: bool = False, name: str | None = None) -> None:
    """Print a checkpoint's variables (name, shape, dtype, size), and their values on request.

    For a directory of step checkpoints, print the steps instead. Reads metadata only, unless
    `values` is set.
    """
    path = user_path(path)
    found = checkpoints(path) if path.is_dir() else []
    if found and all(c.path != path for c in found):
        rows = [(str(c.path), c.step, len(c.entries), c.writer) for c in found]
        print(Table(("checkpoint", "step", "variables", "written by"), rows, f"{path}: {len(rows)} checkpoints"))
        return
    ckpt = open_checkpoint(path)
    entries = ckpt.entries
    if name is not None:
        entries = {name: ckpt.entry(name)}
    if not values:
        table = ckpt.table()
        table.rows = [r for r in table.rows if r[0] in entries]
        print(table)
        return
    for n, e in sorted(entries.items()):
        print(f"tensor_name: {n}  shape: {e.shape}  dtype: {e.dtype.name}  size: {human_bytes(e.nbytes)}")
        print(np.asarray(ckpt.read_host([n])[n]))
