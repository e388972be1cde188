"""Finding checkpoints: `open_checkpoint`, `latest_checkpoint`, `list_checkpoints`,
`list_variables`, `load_variable`, each bounded by a timeout on an object store, and `reading`,
which opens again a checkpoint that changed while it was read. Which checkpoints a directory holds
and which is the newest is `directory`'s; what a format holds and how it is read is its reader's
(`formats.base.Checkpoint`)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..core.errors import CheckpointError, CheckpointNotFoundError, closest
from ..core.table import Table, human_bytes
from ..formats.base import Checkpoint
from ..storage import deadlines as _limits
from ..storage import store as _storage
from .directory import RELIST, checkpoints, latest, open_any, scope

T = TypeVar("T")


# Seconds a lookup on an object store may take by default, retries included.
LOOKUP_TIMEOUT = 120.0


def lookup(path: str | os.PathLike | None, timeout: float | None, what: str, fn: Callable[[], T]) -> T:
    """``fn()``, a call that only reads, given `timeout` seconds in all when `path` is on an
    object store (`Store.within`: its storage client alone would retry for minutes). Local paths are read at once, in this thread.

    Args:
      path: where `fn` reads (None: nowhere remote).
      timeout: seconds for all of `fn` on an object store (None: no limit).
      what: the call, named in a timeout's message.
      fn: the reads.

    Raises:
      StoreTimeoutError: `fn` took longer than `timeout` on an object store.
      ArgumentError: `timeout` is no number > 0 or None (named as `what`'s).

    >>> lookup("ckpt", 5.0, "list_checkpoints", lambda: "read at once, locally")
    'read at once, locally'
    """
    # Checked for local paths too: the same call may get a URL tomorrow.
    limit = _limits.seconds(timeout, f"{what}(timeout=...)")
    where = None if path is None else _storage.as_path(path)
    if where is None:
        return fn()
    return _storage.store_for(where).within(limit, fn, f"{what}({str(where)!r})")


def open_checkpoint(path: str | os.PathLike, *, timeout: float | None = LOOKUP_TIMEOUT) -> Checkpoint:
    """The checkpoint at `path`, read from its metadata only.

    Valid forms of `path`::

      ckpt/model-1000              a jstate checkpoint
      ckpt/flax_params             an Orbax PyTree checkpoint (plain Orbax, Flax)
      ckpt/1000                    an Orbax CheckpointManager step (also ckpt/step_1000, ...): its
                                   items as one checkpoint, named "<item>/<name>" when it has several
      old/model.ckpt-20            a TensorFlow checkpoint prefix (or its .index file)
      model.safetensors            a safetensors file
      ckpt/                        a directory of any of these: its latest complete one
      ckpt/model                   a prefix: the latest of ckpt/model-<step>
      gs://bucket/ckpt/model-1000  any of these on Google Cloud Storage, or s3://bucket/... on S3

    `timeout` is the seconds that opening a checkpoint on an object store may take (None: as
    long as the storage client retries, which can be many minutes). Reads from the checkpoint
    returned are not bounded by it.

    Raises:
      CheckpointNotFoundError: nothing readable at `path`.
      CorruptCheckpointError: a checkpoint that is incomplete or damaged.
      StoreError: the object store cannot be reached (`StoreTimeoutError`: it did not answer
        within `timeout`). Both are CheckpointErrors.

    >>> jstate.open_checkpoint(jstate.Saver().save(state, "ckpt/model", step=5)).step
    5
    """
    return _open_within(path, timeout, "open_checkpoint")


def _open_within(path: str | os.PathLike | None, timeout: float | None, what: str) -> Checkpoint:
    """`open_checkpoint`, its error naming `what` if it times out."""
    if path is None:
        raise CheckpointNotFoundError(
            "No checkpoint: the path is None (`jstate.latest_checkpoint` returns None for a directory "
            "that holds no checkpoint yet). Check for None before restoring, e.g. to start from scratch."
        )
    path = _storage.as_path(path)
    return lookup(path, timeout, what, lambda: _find(path))


def _find(path: Path) -> Checkpoint:
    found = open_any(path)
    if found is not None:
        return found
    if _storage.is_dir(path):
        found = latest(path, None)
        if found is not None:
            return found
        raise CheckpointNotFoundError(
            f"{path} is a directory but holds no complete checkpoint (of any format jstate reads: jstate, "
            "Orbax, TensorFlow or safetensors) in it or in its subdirectories."
        )
    found = latest(path.parent, path.name)  # a prefix: `ckpt/model` for ckpt/model-1000, as latest_checkpoint takes it
    if found is not None:
        return found
    near = closest(path.name, _storage.listdir(path.parent))
    raise CheckpointNotFoundError(f"No checkpoint at {path}: it does not exist.{near}")


def list_checkpoints(path: str | os.PathLike, *, timeout: float | None = LOOKUP_TIMEOUT) -> Table:
    """The complete checkpoints in directory `path` (or saved with prefix `path`), oldest
    first, as a table: path, step, commit time, data size, variables and writer (TF's
    ``tf.train.get_checkpoint_state``). Its rows are tuples; ``[r[0] for r in table]`` are the paths.

    On an object store, "oldest first" is by the store's clock (the time it wrote each
    manifest), and the call takes at most `timeout` seconds (None: as long as the storage
    client retries).

    >>> for step in (1, 2):
    ...     _ = jstate.Saver().save(state, "ckpt/model", step=step)
    >>> [(row[0], row[1]) for row in jstate.list_checkpoints("ckpt")]
    [('ckpt/model-1', 1), ('ckpt/model-2', 2)]
    """
    return lookup(path, timeout, "list_checkpoints", lambda: checkpoints_table(path, checkpoints(path)))


def reading(
    path: str | os.PathLike, read: Callable[[Checkpoint], T], timeout: float | None = None, what: str = "open"
) -> T:
    """`read(open_checkpoint(path))`, again with the checkpoint `path` names now if the one
    read was re-saved or deleted meanwhile (by retention, or another writer). Each opening
    takes at most `timeout` seconds on an object store (a timeout names `what`); the reading
    is not bounded by it.

    Raises:
      CheckpointError: as `open_checkpoint`, or what `read` raised for a checkpoint that did
        not change meanwhile.

    >>> path = jstate.Saver().save(state, "ckpt/model")
    >>> reading(path, lambda ckpt: ckpt.read_host(["biases"])["biases"].shape)
    (200,)
    """
    for attempt in range(RELIST):
        ckpt = _open_within(path, timeout, what)
        try:
            return read(ckpt)
        except CheckpointError:
            if attempt == RELIST - 1 or not ckpt._changed():
                raise
    raise AssertionError("unreachable")


def latest_checkpoint(path: str | os.PathLike, *, timeout: float | None = LOOKUP_TIMEOUT) -> str | None:
    """The newest complete checkpoint in directory `path` (or saved with prefix `path`), or None.

    Incomplete or damaged checkpoints are skipped, so the result is always restorable. On an
    object store, "newest" is by the store's clock (the time it wrote each manifest), and the
    call takes at most `timeout` seconds (None: as long as the storage client retries).

    Raises:
      StoreError: the object store cannot be reached (`StoreTimeoutError`: it did not answer
        within `timeout`); never None for a store that did not say.

    >>> _ = jstate.Saver().save(state, "ckpt/model", step=2000)
    >>> jstate.latest_checkpoint("ckpt")
    'ckpt/model-2000'
    """
    path = _storage.as_path(path)
    found = lookup(path, timeout, "latest_checkpoint", lambda: latest(*scope(path)))
    return None if found is None else str(found.path)


def list_variables(
    path: str | os.PathLike, *, timeout: float | None = LOOKUP_TIMEOUT
) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """``[(name, shape, dtype)]`` of a checkpoint, sorted by name, from its metadata only
    (within `timeout` seconds on an object store, as `open_checkpoint`).

    >>> jstate.list_variables(jstate.Saver(["biases"]).save(state, "ckpt/biases"))
    [('biases', (200,), dtype('float32'))]
    """
    ckpt = _open_within(path, timeout, "list_variables")
    return [(n, e.shape, e.dtype) for n, e in sorted(ckpt.entries.items())]


def load_variable(
    path: str | os.PathLike, name: str, *, verify: bool = True, timeout: float | None = LOOKUP_TIMEOUT
) -> np.ndarray | Any:
    """One variable of a checkpoint, reading only that array, as a NumPy array in the dtype it
    was stored in (TensorFlow's ``tf.train.load_variable``; a PRNG key comes back as a JAX key).
    A JSON item of an Orbax CheckpointManager step (`Checkpoint.values`) comes back as the Python
    value Orbax's ``JsonRestore`` returns.

    With `verify` (the default), it is checked against the checksum recorded at save. On an
    object store the whole call, reading included, takes at most `timeout` seconds (None: as
    long as the storage clients retry): raise it for a variable of many gigabytes.

    >>> jstate.load_variable(jstate.Saver().save(state, "ckpt/model"), "biases").shape
    (200,)
    """
    return lookup(
        path, timeout, "load_variable", lambda: reading(path, functools.partial(_value, name=name, verify=verify))
    )


def _value(ckpt: Checkpoint, name: str, verify: bool) -> Any:
    if name in ckpt.values and name not in ckpt.entries:
        return ckpt.values[name]
    return ckpt.read_host([name], verify=verify)[name]


def checkpoints_table(directory: object, found: Iterable[Checkpoint]) -> Table:
    """Checkpoints, oldest first, as a `Table`: path, step, when committed, data size,
    variables, writer (titled with `directory`).

    >>> _ = jstate.Saver().save(state, "ckpt/model", step=1)
    >>> print(checkpoints_table("ckpt", checkpoints("ckpt")).title)
    ckpt: 1 checkpoints
    """
    import datetime

    rows = [
        (
            str(c.path),
            "-" if c.step is None else c.step,
            datetime.datetime.fromtimestamp(c.created).isoformat(sep=" ", timespec="seconds") if c.created else "-",
            human_bytes(sum(e.nbytes for e in c.entries.values())),
            len(c.entries),
            c.writer,
        )
        for c in found
    ]
    return Table(
        ("checkpoint", "step", "committed", "size", "variables", "written by"),
        rows,
        f"{directory}: {len(rows)} checkpoints",
    )
