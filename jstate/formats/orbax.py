"""Everything jstate asks of Orbax, and the reader of plain Orbax checkpoints.

The only module that imports Orbax, and only when a checkpoint is written or read: a program
that just initializes a model never pays Orbax's import time. What jstate asks of it: write a
flat dict of arrays, read some of them back onto given shardings, read a checkpoint's metadata,
and a barrier between processes.

Orbax writes ``gs://`` itself. For ``s3://``, Orbax 0.12.8 needs help, given by `orbax_s3`:
jstate never lets it fall back to writing a local directory named ``s3:``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import numpy as np

from ..core.errors import CorruptCheckpointError
from ..core.tree import path_name
from ..model.placement import or_default
from ..storage import store as _storage
from . import orbax_s3 as _s3
from .base import Checkpoint, Entry

METADATA_FILE = "_METADATA"  # what marks a directory as an Orbax PyTree checkpoint
STEP_METADATA = "_CHECKPOINT_METADATA"  # what a CheckpointManager writes in each step directory
TMP = ".orbax-checkpoint-tmp"  # Orbax's suffix for a directory it has not finished writing
_AGGREGATE = "checkpoint"  # PyTreeCheckpointHandler's msgpack tree file (Flax's older checkpoints)
# Smaller OCDBT data files write in parallel; Orbax's 2 GiB default puts everything in one file.
_TARGET_FILE_SIZE = 256 * 1024 * 1024


@functools.cache
def _ocp() -> ModuleType:
    import orbax.checkpoint as ocp  # ~0.3 s: imported on first use, not with jstate

    return ocp


def check_store(directory: Path) -> None:
    """Raise CheckpointError if Orbax cannot write `directory`'s store (``s3://`` on an Orbax
    that `orbax_s3` cannot adapt): called before a save writes anything."""
    _s3.adapt(directory)


def _path(directory: Path) -> Any:
    """Orbax's path type for `directory`; Orbax refuses relative paths."""
    from etils import epath

    check_store(directory)
    return epath.Path(str(_storage.absolute(directory)))


def _atomicity(directory: Path) -> Any:
    """How Orbax commits its own directory: into a temporary directory it renames, where a rename
    is atomic (`Store.renames`); elsewhere (object stores, where renaming a directory is a copy)
    with a commit file written last, what Orbax chooses for gs:// by itself. jstate's manifest is
    the commit that counts either way.
    """
    ocp = _ocp()
    if _storage.store_for(directory).renames:
        return None
    return ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE)


class Writer:
    """Writes flat ``{name: array}`` dicts as Orbax PyTree checkpoints, possibly in the background.

    `save` returns once the arrays are copied off the device (Orbax's async contract), so the
    caller may donate or overwrite them right after.
    """

    def __init__(self, compression: bool, timeout: float):
        self._compression, self._timeout = compression, timeout
        self._checkpointers: dict[bool, Any] = {}  # by whether the store renames (`_atomicity`)

    def _checkpointer(self, directory: Path) -> Any:
        renames = _storage.store_for(directory).renames
        if renames not in self._checkpointers:
            ocp = _ocp()
            handler = ocp.PyTreeCheckpointHandler(use_compression=self._compression)
            # Directories are created before `save` returns: created asynchronously, a failure leaves
            # Orbax's write thread waiting `timeout` seconds for a signal that never comes.
            options = ocp.options.AsyncOptions(timeout_secs=int(self._timeout), create_directories_asynchronously=False)
            self._checkpointers[renames] = ocp.AsyncCheckpointer(
                handler, async_options=options, atomicity_options=_atomicity(directory)
            )
        return self._checkpointers[renames]

    def save(self, directory: Path, arrays: Mapping[str, jax.Array]) -> None:
        path = _path(directory)
        self._checkpointer(directory).save(
            path, args=_ocp().args.PyTreeSave(dict(arrays), ocdbt_target_data_file_size=_TARGET_FILE_SIZE)
        )

    def wait(self) -> None:
        for checkpointer in self._checkpointers.values():
            checkpointer.wait_until_finished()

    def close(self) -> None:
        for checkpointer in self._checkpointers.values():
            checkpointer.close()


def barrier(name: str, timeout: float, stage: str) -> None:
    """Wait until every JAX process reaches barrier `name`/`stage` (no-op with one process).

    Orbax's barrier runs on JAX's distributed client, so it is safe in a background save.
    """
    if jax.process_count() > 1:
        _ocp().multihost.get_barrier_sync_fn()(key=f"{name}:{stage}", timeout_ms=int(timeout * 1000))


def share(key: str, make: Callable[[], str], timeout: float) -> str:
    """`make()` on process 0, and the same string on every other JAX process (through JAX's
    distributed key-value store, as Orbax does)."""
    if jax.process_count() == 1:
        return make()
    client = _ocp().multihost.get_jax_distributed_client()
    if jax.process_index() == 0:
        value = make()
        client.key_value_set(key, value)
        return value
    return client.blocking_key_value_get(key, int(timeout * 1000))


def is_checkpoint(directory: Path, listed: dict[str, _storage.File] | None = None) -> bool:
    """Whether `directory` is an Orbax PyTree checkpoint (complete as far as Orbax can tell);
    `listed`, where given, is `_storage.files(directory)`."""
    return METADATA_FILE in listed if listed is not None else _storage.is_file(directory / METADATA_FILE)


def is_data_file(rel: str) -> bool:
    """Whether a file of an Orbax checkpoint (path relative to it) holds array data, as opposed
    to metadata: OCDBT keeps data files in ``d/`` directories."""
    return "d" in rel.split("/")[:-1]


def metadata(directory: Path) -> Any:
    """The tree of an Orbax PyTree checkpoint (nested dicts and lists, as saved), with array
    metadata (shape, dtype) as leaves."""
    return _ocp().PyTreeCheckpointHandler().metadata(_path(directory)).tree


def entries(tree: Any) -> dict[str, Entry]:
    """The arrays of a checkpoint's metadata `tree` by name (tree paths joined by "/"). Leaves
    that are not arrays (strings, Python objects) are left out."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
        if shape is None or dtype is None:
            continue
        keypath = tuple(path_name((k,)) for k in path)
        out[path_name(path)] = Entry(keypath, tuple(shape), np.dtype(dtype))
    return out


def read(
    directory: Path, wanted: Mapping[str, tuple[Entry, jax.ShapeDtypeStruct]], tree: Any = None
) -> dict[str, jax.Array]:
    """Read just the `wanted` arrays, each straight onto the sharding of its target struct
    (cast to the struct's dtype); the others are left unread.

    Args:
      directory: the Orbax checkpoint.
      wanted: ``{name: (entry, target struct)}``.
      tree: the checkpoint's metadata tree, for trees with lists or tuples (optax states); without
        it, the checkpoint must be a tree of dicts (what jstate writes).
    """
    ocp = _ocp()

    def struct(target: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(target.shape, target.dtype, sharding=or_default(target.sharding))

    def restore_args(target: jax.ShapeDtypeStruct) -> Any:
        sharding = or_default(target.sharding)
        return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=target.shape, dtype=target.dtype)

    if tree is None:  # a dict tree: partial restore of just these keys
        item: dict = {}
        args: dict = {}
        for entry, target in wanted.values():
            _put(item, entry.keypath, struct(target))
            _put(args, entry.keypath, restore_args(target))
        restore = ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True)
    else:  # any tree: every leaf not wanted is a placeholder, which Orbax skips
        by_path = {entry.keypath: target for entry, target in wanted.values()}

        def template(make):
            return jax.tree_util.tree_map_with_path(
                lambda path, _: (
                    ocp.PLACEHOLDER if (t := by_path.get(tuple(path_name((k,)) for k in path))) is None else make(t)
                ),
                tree,
            )

        restore = ocp.args.PyTreeRestore(item=template(struct), restore_args=template(restore_args))
    restored = ocp.Checkpointer(_reader(tree)).restore(_path(directory), args=restore)
    out = {name: _get(restored, entry.keypath) for name, (entry, _) in wanted.items()}
    for name, value in out.items():
        if not isinstance(value, jax.Array):  # partial restore hands back the template of a key it lacks
            raise CorruptCheckpointError(f"Orbax checkpoint {directory} does not hold '{name}'.")
    return out


def read_host(directory: Path, wanted: Mapping[str, Entry], tree: Any = None) -> dict[str, np.ndarray]:
    """Read just the `wanted` arrays into host memory as NumPy arrays in their stored dtype
    (64-bit values stay 64-bit whatever JAX's x64 setting). `tree` as in `read`."""
    ocp = _ocp()
    numpy_args = ocp.RestoreArgs(restore_type=np.ndarray)
    if tree is None:
        item: dict = {}
        args: dict = {}
        for entry in wanted.values():
            _put(item, entry.keypath, np.empty(0))
            _put(args, entry.keypath, numpy_args)
        restore = ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True)
    else:
        paths = {entry.keypath for entry in wanted.values()}

        def template(value):
            return jax.tree_util.tree_map_with_path(
                lambda path, _: value if tuple(path_name((k,)) for k in path) in paths else ocp.PLACEHOLDER, tree
            )

        restore = ocp.args.PyTreeRestore(item=template(np.empty(0)), restore_args=template(numpy_args))
    restored = ocp.Checkpointer(_reader(tree)).restore(_path(directory), args=restore)
    out = {name: _get(restored, entry.keypath) for name, entry in wanted.items()}
    for name, value in out.items():
        # Orbax checks neither against its metadata: a caller's dtype that Orbax does not hold
        # would hand back other bytes than the name promises (a damaged jstate manifest).
        if not isinstance(value, np.ndarray) or (value.shape, value.dtype) != (wanted[name].shape, wanted[name].dtype):
            found = f"shape {value.shape} and dtype {value.dtype}" if isinstance(value, np.ndarray) else "nothing"
            raise CorruptCheckpointError(
                f"Orbax checkpoint {directory} does not hold '{name}' as expected: shape {wanted[name].shape} and "
                f"dtype {wanted[name].dtype} were expected, {found} was read."
            )
    return out


def _reader(tree: Any) -> Any:
    """Orbax's handler reading a checkpoint of metadata `tree`. `PyTreeCheckpointHandler` reads a
    file named "checkpoint" as the tree of Flax's msgpack checkpoints; an array stored under that
    top-level key without OCDBT (the one array of Orbax's ``ArraySave``) is a directory of that
    name, which it would fail to read as one: there it is told of no such file."""
    if isinstance(tree, Mapping) and _AGGREGATE in tree:
        return _ocp().PyTreeCheckpointHandler(aggregate_filename=f"{_AGGREGATE}.none")
    return _ocp().PyTreeCheckpointHandler()


def _put(tree: dict, keypath: tuple[str, ...], value: Any) -> None:
    for k in keypath[:-1]:
        tree = tree.setdefault(k, {})
    tree[keypath[-1]] = value


def _get(tree: Any, keypath: tuple[str, ...]) -> Any:
    for k in keypath:
        tree = tree[k] if isinstance(tree, Mapping) else tree[int(k)]
    return tree


# -- plain Orbax checkpoints ------------------------------------------------------------------
class OrbaxCheckpoint(Checkpoint):
    """A PyTree checkpoint that plain Orbax (or Flax) wrote: entries named by tree path."""

    writer = "orbax"

    def __init__(self, path: Path, arrays: Path):
        _check_metadata_files(arrays)
        try:
            self.tree = metadata(arrays)
            found = entries(self.tree)
        except Exception as e:  # Orbax raises bare Exceptions and KeyErrors for damaged metadata.
            raise CorruptCheckpointError(
                f"Checkpoint {arrays}: Orbax cannot read its metadata ({type(e).__name__})."
            ) from e
        super().__init__(path, found, step=step_of(path.name), created=_storage.mtime(arrays / METADATA_FILE))
        self.arrays = arrays

    def _read(self, wanted: dict[str, jax.ShapeDtypeStruct], verify: bool) -> dict[str, jax.Array]:
        return read(self.arrays, {n: (self.entries[n], t) for n, t in wanted.items()}, self.tree)

    def _read_host(self, names: list[str], verify: bool) -> dict[str, np.ndarray]:
        return read_host(self.arrays, {n: self.entries[n] for n in names}, self.tree)


# The most a metadata file of Orbax's may hold: a `.zarray` is a few hundred bytes; `_METADATA`
# grows with the tree (hence `_storage.LIMIT`).
_ZARRAY_LIMIT = 1 << 20


def _check_metadata_files(directory: Path) -> None:
    """Refuse, before Orbax and tensorstore open them (which they do with plain blocking reads
    of any size), metadata files of `directory` that are no regular file (a FIFO would hang
    the reader, a link to /dev/zero would fill memory) or too large: a CheckpointError naming
    the file. An object store holds nothing but regular objects: nothing to check there."""
    if _storage.local_path(directory) is None:
        return
    files = [(directory / METADATA_FILE, _storage.LIMIT, "Orbax metadata file")]
    files += [(directory / STEP_METADATA, _ZARRAY_LIMIT, "Orbax metadata file")]
    # Without OCDBT each array is a zarr directory with its `.zarray` (a stat each; Orbax reads them all).
    files += [
        (directory / name / ".zarray", _ZARRAY_LIMIT, "zarr metadata file") for name in _storage.listdir(directory)
    ]
    for file, limit, what in files:
        try:
            with _storage.open_regular(file, what) as (_, stat):
                if stat.st_size > limit:
                    raise _storage.too_large(file, stat.st_size, limit, what)
        except (FileNotFoundError, NotADirectoryError):
            continue


def step_of(name: str) -> int | None:
    """The step in a checkpoint's name as Orbax names steps (``400``, ``ckpt_400``,
    ``ckpt_000400``, Flax's ``checkpoint_400``), or None (a temporary one's included).

    >>> step_of("400"), step_of("ckpt_000400"), step_of("checkpoint_7"), step_of("400.orbax-checkpoint-tmp-17")
    (400, 400, 7, None)
    """
    if TMP in name:
        return None
    # Orbax's rule (`ocp.path.step.step_from_checkpoint_name`), without importing Orbax to list a
    # directory, and without its acceptance of temporary names.
    m = re.fullmatch(r"(\d+)|.+_(\d+)", name)
    return None if m is None else int(m.group(1) or m.group(2))


def load(path: Path) -> OrbaxCheckpoint | None:
    """`path` as a plain Orbax PyTree checkpoint (plain Orbax, Flax's ``save_checkpoint``), None if
    it is none (CheckpointManager steps holding items are `orbax_steps`').

    >>> load(Path(jstate.Saver().save(state, "ckpt/model"))) is None  # jstate's: its arrays are inside
    True
    """
    return OrbaxCheckpoint(path, path) if is_checkpoint(path) and TMP not in path.name else None
