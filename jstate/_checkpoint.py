"""Finding checkpoints: `open_checkpoint`, `latest_checkpoint`, `list_variables`,
`load_variable`. What a format holds and how it is read is its reader's (`_reader.Checkpoint`);
this module only finds a checkpoint and asks each format whether it is one of its own."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from . import _native, _orbax, _safetensors, _storage, _tensorflow
from ._display import checkpoints_table
from ._errors import CheckpointError, CheckpointNotFoundError, closest
from ._reader import Checkpoint
from ._table import Table

# Each format's ``load(path) -> Checkpoint | None``, asked in turn. jstate's own comes first:
# its arrays are an Orbax checkpoint, which the plain Orbax reader would also claim.
T = TypeVar("T")
_FORMATS = (_native.load, _orbax.load, _tensorflow.load, _safetensors.load)


def _open(path: Path) -> Checkpoint | None:
    """`path` as a checkpoint of any format, None if it is none (CorruptCheckpointError if damaged)."""
    for load in _FORMATS:
        found = load(path)
        if found is not None:
            return found
    return None


def _open_quietly(path: Path) -> Checkpoint | None:
    try:
        return _open(path)
    except (CheckpointError, OSError):
        return None  # damaged or half-written: not a checkpoint to list


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The checkpoint at `path`, read from its metadata only.

    Valid forms of `path`:

      ckpt/model-1000              a jstate checkpoint
      ckpt/flax_params             an Orbax PyTree checkpoint (plain Orbax, Flax)
      ckpt/1000                    an Orbax CheckpointManager step with one item
      old/model.ckpt-20            a TensorFlow checkpoint prefix (or its .index file)
      model.safetensors            a safetensors file (needs `jstate[safetensors]`)
      ckpt/                        a directory of any of these: its latest complete one
      ckpt/model                   a prefix: the latest of ckpt/model-<step>
      gs://bucket/ckpt/model-1000  any of these on Google Cloud Storage, or s3://bucket/... on S3

    Raises:
      CheckpointNotFoundError: nothing readable at `path`.
      CorruptCheckpointError: a checkpoint that is incomplete or damaged.

    >>> jstate.open_checkpoint(jstate.Saver().save(state, "ckpt/model", step=5)).step
    5
    """
    if path is None:
        raise CheckpointNotFoundError(
            "No checkpoint: the path is None (`jstate.latest_checkpoint` returns None for a directory "
            "that holds no checkpoint yet). Check for None before restoring, e.g. to start from scratch."
        )
    path = _storage.as_path(path)
    found = _open(path)
    if found is not None:
        return found
    if _storage.is_dir(path):
        found = _latest(path)
        if found is not None:
            return found
        raise CheckpointNotFoundError(
            f"{path} is a directory but holds no complete checkpoint (of any format jstate reads: jstate, "
            "Orbax, TensorFlow or safetensors) in it or in its subdirectories."
        )
    found = _latest(path)  # a prefix: `ckpt/model` for ckpt/model-1000, as latest_checkpoint takes it
    if found is not None:
        return found
    near = closest(path.name, _storage.listdir(path.parent))
    raise CheckpointNotFoundError(f"No checkpoint at {path}: it does not exist.{near}")


def checkpoints(path: str | os.PathLike) -> list[Checkpoint]:
    """Complete checkpoints in directory `path`, or named ``<path>-<step>`` beside it, in the
    order they were committed (oldest first).

    >>> [c.step for c in checkpoints("ckpt")] == sorted(c.step for c in checkpoints("ckpt"))
    True
    """
    path = _storage.as_path(path)
    if _storage.is_dir(path) and not _is_checkpoint(path):
        parent, prefix = path, None
    else:
        parent, prefix = path.parent, path.name
    found: dict[Path, Checkpoint] = {}
    for entry in _storage.iterdir(parent):
        if entry.name.startswith(".") or (prefix is not None and not entry.name.startswith(prefix)):
            continue
        ckpt = _open_quietly(entry)
        if ckpt is None or ckpt.path in found:  # (a TensorFlow checkpoint is found by each of its files)
            continue
        if prefix is not None and ckpt.path.name != prefix and step_of(ckpt.path.name, prefix) is None:
            continue
        found[ckpt.path] = ckpt
    return sorted(found.values(), key=lambda c: c.created)


def step_of(name: str, prefix: str) -> int | None:
    """The step in a checkpoint name ``<prefix>-<step>``, or None.

    >>> step_of("model-1000", "model"), step_of("model-2-7", "model")
    (1000, None)
    """
    m = re.fullmatch(re.escape(prefix) + r"-(\d+)", name)
    return int(m.group(1)) if m else None


def list_checkpoints(path: str | os.PathLike) -> Table:
    """The complete checkpoints in directory `path` (or saved with prefix `path`), oldest
    first, as a table: path, step, commit time, data size, variables and writer (TF's
    ``tf.train.get_checkpoint_state``). Its rows are tuples; ``[r[0] for r in table]`` are the paths.

    >>> for step in (1, 2):
    ...     _ = jstate.Saver().save(state, "ckpt/model", step=step)
    >>> [(row[0], row[1]) for row in jstate.list_checkpoints("ckpt")]
    [('ckpt/model-1', 1), ('ckpt/model-2', 2)]
    """
    return checkpoints_table(path, checkpoints(path))


def _is_checkpoint(path: Path) -> bool:
    """Whether `path` is meant as one checkpoint (complete or not), not a directory of them."""
    try:
        return _open(path) is not None
    except (CheckpointError, OSError):
        return True  # one, but damaged


def _latest(path: Path) -> Checkpoint | None:
    """The most recently committed checkpoint. Writers beside us may delete the one we choose
    (retention) right after committing a newer one: then we look again, so a reader never
    comes back empty while a complete checkpoint existed at every moment."""
    chosen, empty = None, 0
    for _ in range(_RELIST):
        found = checkpoints(path)
        if not found:
            # A listing misses what is committed while it runs, and may find that what it did see
            # was deleted meanwhile (a writer keeping one): two empty listings in a row mean none.
            empty += 1
            if empty == 2:
                return None
            continue
        empty = 0
        chosen = found[-1]
        if _storage.is_dir(path):
            named = type(chosen).latest_in(path)  # a format's own bookkeeping (TF's state file) decides
            if named is not None:
                chosen = _open_quietly(named) or chosen
        if not chosen.changed():
            return chosen
    return chosen


_RELIST = 10


def reading(path: str | os.PathLike, read: Callable[[Checkpoint], T]) -> T:
    """`read(open_checkpoint(path))`, again with the checkpoint `path` names now if the one
    read was re-saved or deleted meanwhile (by retention, or another writer)."""
    for attempt in range(_RELIST):
        ckpt = open_checkpoint(path)
        try:
            return read(ckpt)
        except CheckpointError:
            if attempt == _RELIST - 1 or not ckpt.changed():
                raise
    raise AssertionError("unreachable")


def latest_checkpoint(path: str | os.PathLike) -> str | None:
    """The newest complete checkpoint in directory `path` (or saved with prefix `path`), or None.

    Incomplete or damaged checkpoints are skipped, so the result is always restorable.

    >>> _ = jstate.Saver().save(state, "ckpt/model", step=2000)
    >>> jstate.latest_checkpoint("ckpt")
    'ckpt/model-2000'
    """
    found = _latest(_storage.as_path(path))
    return None if found is None else str(found.path)


def list_variables(path: str | os.PathLike) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """``[(name, shape, dtype)]`` of a checkpoint, sorted by name, from its metadata only.

    >>> jstate.list_variables(jstate.Saver(["biases"]).save(state, "ckpt/biases"))
    [('biases', (200,), dtype('float32'))]
    """
    ckpt = open_checkpoint(path)
    return [(n, e.shape, e.dtype) for n, e in sorted(ckpt.entries.items())]


def load_variable(path: str | os.PathLike, name: str, *, verify: bool = True) -> np.ndarray:
    """One variable of a checkpoint, reading only that array, as a NumPy array in the dtype it
    was stored in (TensorFlow's ``tf.train.load_variable``; a PRNG key comes back as a JAX key).

    With `verify` (the default), it is checked against the checksum recorded at save.

    >>> jstate.load_variable(jstate.Saver().save(state, "ckpt/model"), "biases").shape
    (200,)
    """

    return reading(path, lambda ckpt: ckpt.read_host([name], verify=verify)[name])
