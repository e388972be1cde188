"""Everything jstate asks of Orbax: write a flat dict of arrays, read some of them back, and
read the metadata of checkpoints that jstate did not write. The only module importing Orbax."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath  # Orbax's path type

from ._names import key_name
from ._placement import or_default
from ._spec import Entry

METADATA_FILE = "_METADATA"  # what marks a directory as an Orbax PyTree checkpoint
# Smaller OCDBT data files write in parallel; Orbax's 2 GiB default puts everything in one file.
_TARGET_FILE_SIZE = 256 * 1024 * 1024


class Writer:
    """Writes flat ``{name: array}`` dicts as Orbax PyTree checkpoints, possibly in the background.

    `save` returns once the arrays are copied off the device (Orbax's async contract), so the
    caller may donate or overwrite them right after.
    """

    def __init__(self, compression: bool, timeout: float):
        handler = ocp.PyTreeCheckpointHandler(use_compression=compression)
        self._checkpointer = ocp.AsyncCheckpointer(handler, timeout_secs=int(timeout))

    def save(self, directory: Path, arrays: Mapping[str, jax.Array]) -> None:
        self._checkpointer.save(
            epath.Path(directory),
            args=ocp.args.PyTreeSave(dict(arrays), ocdbt_target_data_file_size=_TARGET_FILE_SIZE),
        )

    def wait(self) -> None:
        self._checkpointer.wait_until_finished()

    def close(self) -> None:
        self._checkpointer.close()


def barrier(name: str, timeout: float, stage: str) -> None:
    """Wait until every JAX process reaches barrier `name`/`stage` (no-op with one process).

    Orbax's barrier runs on JAX's distributed client, so it is safe in a background save.
    """
    if jax.process_count() > 1:
        ocp.multihost.get_barrier_sync_fn()(key=f"{name}:{stage}", timeout_ms=int(timeout * 1000))


def entries(directory: Path) -> dict[str, Entry]:
    """The arrays of an Orbax PyTree checkpoint by name (tree paths joined by "/"), from its
    metadata only. Leaves that are not arrays (strings, Python objects) are left out."""
    tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(directory)).tree
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
        if shape is None or dtype is None:
            continue
        keypath = tuple(key_name(k) for k in path)
        out["/".join(keypath)] = Entry(keypath, tuple(shape), np.dtype(dtype))
    return out


def read(directory: Path, wanted: Mapping[str, tuple[Entry, jax.ShapeDtypeStruct]]) -> dict[str, jax.Array]:
    """Read just the `wanted` arrays, each straight onto the sharding of its target struct
    (cast to the struct's dtype). Orbax's partial restore leaves the other arrays unread."""
    item: dict = {}
    args: dict = {}
    for entry, target in wanted.values():
        sharding = or_default(target.sharding)
        _put(item, entry.keypath, jax.ShapeDtypeStruct(target.shape, target.dtype, sharding=sharding))
        _put(
            args, entry.keypath, ocp.ArrayRestoreArgs(sharding=sharding, global_shape=target.shape, dtype=target.dtype)
        )
    restored = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
        epath.Path(directory), args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True)
    )
    return {name: _get(restored, entry.keypath) for name, (entry, _) in wanted.items()}


def _put(tree: dict, keypath: tuple[str, ...], value: Any) -> None:
    for k in keypath[:-1]:
        tree = tree.setdefault(k, {})
    tree[keypath[-1]] = value


def _get(tree: Any, keypath: tuple[str, ...]) -> Any:
    for k in keypath:
        tree = tree[k] if isinstance(tree, Mapping) else tree[int(k)]
    return tree
