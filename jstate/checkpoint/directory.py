"""The checkpoints of a directory: a path opened as a checkpoint of any format, the complete
checkpoints a directory (or a ``<prefix>-<step>`` prefix) holds in commit order, and the newest.

Locally every entry is opened; on an object store one listing finds jstate's checkpoints and
ranks them by the store's clock (`_candidates`). Writers beside the reader may commit and delete
(retention) while it looks: `latest` looks again rather than come back empty while a complete
checkpoint existed at every moment. The public lookups, with their timeouts, are `lookup`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable
from pathlib import Path

from ..core.errors import CheckpointError, StoreError
from ..formats import commit as _commit
from ..formats import native as _native
from ..formats import orbax as _orbax
from ..formats import orbax_steps as _orbax_steps
from ..formats import safetensors as _safetensors
from ..formats import tensorflow as _tensorflow
from ..formats.base import Checkpoint
from ..formats.manifest import FILE, Manifest
from ..storage import store as _storage

# Each format's ``load(path) -> Checkpoint | None``, asked in turn. jstate's own comes first:
# its arrays are an Orbax checkpoint, which the plain Orbax reader would also claim; a PyTree
# checkpoint before a CheckpointManager step (Flax's ``checkpoint_<step>`` is both).
_FORMATS = (_native.load, _orbax.load, _orbax_steps.load, _tensorflow.load, _safetensors.load)


def open_any(path: Path) -> Checkpoint | None:
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
    return _quietly(open_any, path)


def checkpoints(path: str | os.PathLike) -> list[Checkpoint]:
    """Complete checkpoints in directory `path`, or named ``<path>-<step>`` beside it, in the
    order they were committed (oldest first).

    >>> [c.step for c in checkpoints("ckpt")] == sorted(c.step for c in checkpoints("ckpt"))
    True
    """
    found = _accepted(_opened(_candidates(*scope(_storage.as_path(path)))))
    return [ckpt for _, ckpt in sorted(found, key=lambda item: (item[0], item[1].order))]


def scope(path: Path) -> tuple[Path, str | None]:
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


def _is_checkpoint(path: Path) -> bool:
    """Whether `path` is meant as one checkpoint (complete or not), not a directory of them."""
    try:
        return open_any(path) is not None
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


def latest(directory: Path, prefix: str | None) -> Checkpoint | None:
    """The most recently committed checkpoint in `directory` (named ``<prefix>-<step>`` if
    given). Writers beside us may delete the one we choose (retention) right after committing a
    newer one: then we look again, so a reader never comes back empty while a complete
    checkpoint existed at every moment."""
    chosen, empty = None, 0
    for attempt in range(RELIST):
        found = _newest(directory, prefix, stale=attempt < RELIST - 1)
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


RELIST = 10  # times `latest` (and `lookup.reading`) look again for a checkpoint that changed under them


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
