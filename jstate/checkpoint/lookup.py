"""Finding checkpoints: `open_checkpoint`, `latest_checkpoint`, `list_variables`,
`load_variable`. What a format holds and how it is read is its reader's (`formats.base.Checkpoint`);
this module only finds a checkpoint and asks each format whether it is one of its own."""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..core.errors import CheckpointError, CheckpointNotFoundError, StoreError, closest
from ..core.table import Table, human_bytes
from ..formats import commit as _commit
from ..formats import native as _native
from ..formats import orbax as _orbax
from ..formats import orbax_steps as _orbax_steps
from ..formats import safetensors as _safetensors
from ..formats import tensorflow as _tensorflow
from ..formats.base import Checkpoint
from ..formats.manifest import FILE, Manifest
from ..storage import deadlines as _limits
from ..storage import store as _storage

# Each format's ``load(path) -> Checkpoint | None``, asked in turn. jstate's own comes first:
# its arrays are an Orbax checkpoint, which the plain Orbax reader would also claim; a PyTree
# checkpoint before a CheckpointManager step (Flax's ``checkpoint_<step>`` is both).
T = TypeVar("T")
_FORMATS = (_native.load, _orbax.load, _orbax_steps.load, _tensorflow.load, _safetensors.load)


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


def _open(path: Path) -> Checkpoint | None:
    """`path` as a checkpoint of any format, None if it is none (CorruptCheckpointError if damaged)."""
    for load in _FORMATS:
        found = load(path)
        if found is not None:
            return found
    return None


def _quietly(open_: Callable[..., Checkpoint | None], *args: object) -> Checkpoint | None:
    """``open_(*args)``, None for a checkpoint that is damaged or half-written: not one to list.
    A store that did not answer is raised: not knowing is no "not a checkpoint"."""
    try:
        return open_(*args)
    except StoreError:
        raise
    except (CheckpointError, OSError):
        return None


def _open_quietly(path: Path) -> Checkpoint | None:
    return _quietly(_open, path)


def open_checkpoint(path: str | os.PathLike, *, timeout: float | None = LOOKUP_TIMEOUT) -> Checkpoint:
    """The checkpoint at `path`, read from its metadata only.

    Valid forms of `path`:

      ckpt/model-1000              a jstate checkpoint
      ckpt/flax_params             an Orbax PyTree checkpoint (plain Orbax, Flax)
      ckpt/1000                    an Orbax CheckpointManager step (also ckpt/step_1000, ...): its
                                   items as one checkpoint, named "<item>/<name>" when it has several
      old/model.ckpt-20            a TensorFlow checkpoint prefix (or its .index file)
      model.safetensors            a safetensors file (needs `jstate[safetensors]`)
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
    found = _open(path)
    if found is not None:
        return found
    if _storage.is_dir(path):
        found = _latest(path, None)
        if found is not None:
            return found
        raise CheckpointNotFoundError(
            f"{path} is a directory but holds no complete checkpoint (of any format jstate reads: jstate, "
            "Orbax, TensorFlow or safetensors) in it or in its subdirectories."
        )
    found = _latest(path.parent, path.name)  # a prefix: `ckpt/model` for ckpt/model-1000, as latest_checkpoint takes it
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
    found = _accepted(_opened(_candidates(*_scope(_storage.as_path(path)))))
    return [ckpt for _, ckpt in sorted(found, key=lambda item: (item[0], item[1].order))]


def _scope(path: Path) -> tuple[Path, str | None]:
    """Where the checkpoints `path` means are: (directory `path`, None), or (its parent, the
    prefix of names ``<path.name>-<step>``)."""
    if _storage.is_dir(path) and not _is_checkpoint(path):
        return path, None
    return path.parent, path.name


@dataclasses.dataclass(frozen=True)
class _Candidate:
    """An entry of a directory that may be a checkpoint, found by listing the directory."""

    path: Path
    prefix: str | None  # of the checkpoint names wanted
    rank: float  # its commit order (`Checkpoint.order`; for those listed on an object store: by the store's clock)
    open: Callable[[], Checkpoint | None]  # None: not a complete checkpoint


def _candidates(directory: Path, prefix: str | None) -> list[_Candidate]:
    """What in `directory` (named ``<prefix>...`` if given) may be a checkpoint.

    Locally, every entry is opened. Where each request is a round trip (`Store.round_trips`: an
    object store), one listing of everything under `directory` finds jstate's checkpoints (a
    directory holding a manifest), ranked by the time the store wrote their manifests, and
    their files, checked against it when one is opened: then opening one costs one request, its
    manifest, where asking for each file would cost a few per checkpoint. Entries the listing
    shows to hold only a save's leftovers are skipped, and anything else is opened as it is
    locally.
    """
    if not _storage.store_for(directory).round_trips:
        found = []
        for entry in _storage.iterdir(directory):
            if entry.name.startswith(".") or (prefix is not None and not entry.name.startswith(prefix)):
                continue
            ckpt = _open_quietly(entry)
            if ckpt is not None:
                found.append(_Candidate(entry, prefix, ckpt.order, lambda c=ckpt: c))
        return found
    found = []
    for name, listed in _storage.by_child(_storage.files(directory, prefix or "")).items():
        entry = directory / name
        if name.startswith("."):
            continue
        if FILE in listed:  # a jstate checkpoint, committed when it was listed
            if _named(name, prefix):
                found.append(
                    _Candidate(
                        entry,
                        prefix,
                        listed[FILE].mtime,
                        functools.partial(_quietly, _native.load_listed, entry, listed),
                    )
                )
        elif "" in listed or not _commit.only_ours(below.split("/", 1)[0] for below in listed):
            ckpt = _open_quietly(entry)  # another format (plain Orbax, safetensors), or something else
            if ckpt is not None:
                found.append(_Candidate(entry, prefix, ckpt.order, lambda c=ckpt: c))
    return found


def _opened(candidates: list[_Candidate]) -> list[tuple[float, Checkpoint]]:
    """The candidates that are complete checkpoints, opened, with their ranks. On an object store
    each opening is a request: they overlap, in a few threads."""
    opened = _storage.store_for(candidates[0].path).map(lambda c: c.open(), candidates) if candidates else []
    return [
        (c.rank, ckpt) for c, ckpt in zip(candidates, opened) if ckpt is not None and _named(ckpt.path.name, c.prefix)
    ]


def _named(name: str, prefix: str | None) -> bool:
    """Whether `name` is one of the checkpoint names ``<prefix>-<step>`` (or `prefix` itself)."""
    return prefix is None or name == prefix or step_of(name, prefix) is not None


def _accepted(found: list[tuple[float, Checkpoint]]) -> list[tuple[float, Checkpoint]]:
    """Each checkpoint once (a TensorFlow checkpoint is found by each of its files)."""
    seen: dict[Path, tuple[float, Checkpoint]] = {}
    for rank, ckpt in found:
        seen.setdefault(ckpt.path, (rank, ckpt))
    return list(seen.values())


def step_of(name: str, prefix: str) -> int | None:
    """The step in a checkpoint name ``<prefix>-<step>`` (or Orbax's ``<prefix>_<step>``, what
    `Saver(layout="orbax")` writes), or None.

    >>> step_of("model-1000", "model"), step_of("model_1000", "model"), step_of("model-2-7", "model")
    (1000, 1000, None)
    """
    m = re.fullmatch(re.escape(prefix) + r"[-_](\d+)", name)
    return int(m.group(1)) if m else None


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


def _is_checkpoint(path: Path) -> bool:
    """Whether `path` is meant as one checkpoint (complete or not), not a directory of them."""
    try:
        return _open(path) is not None
    except StoreError:
        raise
    except (CheckpointError, OSError):
        return True  # one, but damaged


_STALE = object()  # `_newest`: the listing is out of date


def _newest(directory: Path, prefix: str | None, stale: bool = True) -> Checkpoint | None | object:
    """The most recently committed complete checkpoint in `directory` (named ``<prefix>-<step>``
    if given), opening candidates newest first: on an object store, only those tied for the
    newest manifest are read, unless none of them is complete. If those were all deleted since
    the listing (retention, after a newer commit), `_STALE` (with `stale`): an older one
    would pass for the latest."""
    candidates = _candidates(directory, prefix)
    for rank in sorted({c.rank for c in candidates}, reverse=True):
        tied = [c for c in candidates if c.rank == rank]
        found = _opened(tied)
        opened = {ckpt.path for _, ckpt in found}
        # Locally every candidate was opened while listing. On an object store, one that did not
        # open may have been deleted since (a request each, only then): the listing is stale.
        failed = [c for c in tied if c.path not in opened]
        listed = _storage.store_for(directory).round_trips  # (`_candidates` took one listing)
        if stale and failed and listed and not all(_storage.exists(c.path / FILE) for c in failed):
            return _STALE
        if found:  # ties (one store-clock second) go by the writers' own times
            return sorted((ckpt for _, ckpt in found), key=lambda c: (c.created, c.order))[-1]
    return None


def _latest(directory: Path, prefix: str | None) -> Checkpoint | None:
    """The most recently committed checkpoint in `directory` (named ``<prefix>-<step>`` if
    given). Writers beside us may delete the one we choose (retention) right after committing a
    newer one: then we look again, so a reader never comes back empty while a complete
    checkpoint existed at every moment."""
    chosen, empty = None, 0
    for attempt in range(_RELIST):
        found = _newest(directory, prefix, stale=attempt < _RELIST - 1)
        if found is _STALE:
            continue
        if found is None:
            # A listing misses what is committed while it runs, and may find that what it did see
            # was deleted meanwhile (a writer keeping one): two empty listings in a row mean none.
            empty += 1
            if empty == 2:
                return None
            continue
        empty = 0
        chosen = found
        if prefix is None:
            named = type(chosen)._latest_in(directory)  # a format's own bookkeeping (TF's state file) decides
            if named is not None:
                chosen = _open_quietly(named) or chosen
        if not chosen._changed():
            return chosen
    return chosen


_RELIST = 10


def newest_order(directory: Path) -> float:
    """The commit order (`Checkpoint.order`) of the newest checkpoint in local `directory`
    (0 if none): a save committed there is ordered after it (`Manifest.order`).

    Each save asks it, so jstate's checkpoints are judged by their manifests' order alone
    (`Manifest.read_order`), without opening them: one whose files are incomplete only orders
    the save after it, which is harmless. Other entries are opened as lookups open them.

    >>> newest_order(Path("ckpt")) < newest_order(Path(jstate.Saver().save(state, "ckpt/model")).parent)
    True
    """
    newest = 0.0
    for entry in _storage.iterdir(directory):
        if entry.name.startswith("."):
            continue
        order = Manifest.read_order(entry)
        if order is not None:
            newest = max(newest, order)
            continue
        ckpt = _open_quietly(entry)
        if ckpt is not None:
            newest = max(newest, ckpt.order)
    return newest


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
    for attempt in range(_RELIST):
        ckpt = _open_within(path, timeout, what)
        try:
            return read(ckpt)
        except CheckpointError:
            if attempt == _RELIST - 1 or not ckpt._changed():
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
    found = lookup(path, timeout, "latest_checkpoint", lambda: _latest(*_scope(path)))
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
