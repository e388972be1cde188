"""Orbax ``CheckpointManager`` steps, read as they are: one checkpoint per step, whatever its items.

A manager writes each step into a directory of its own, named by Orbax's `NameFormat`
(``400``, ``ckpt_400``, ``ckpt_000400`` with ``step_prefix`` and ``step_format_fixed_length``),
first under a temporary name (``400.orbax-checkpoint-tmp-<time>``) that it renames when the step
is complete, or, on object stores, with a ``commit_success.txt`` written last. Inside, one
directory per item (``params/``, ``opt_state/``, ``metadata/``; ``default/`` for a manager of
one unnamed item) and ``_CHECKPOINT_METADATA``, which names each item's handler::

  400/
    _CHECKPOINT_METADATA   {"item_handlers": {"params": "...StandardCheckpointHandler", ...}, ...}
    params/                a PyTree checkpoint (``_METADATA``, OCDBT files)
    opt_state/             a PyTree checkpoint
    metadata/metadata      a JSON item (``JsonSave``): one JSON file

A step of several items is one checkpoint whose variables are ``<item>/<name>``
(``opt_state/0/mu/dense/kernel``) and whose JSON items are `Checkpoint.values`; a step of one
item reads as that item (``mgr.restore(step)`` returns it alone too). Items jstate cannot read
are in `Checkpoint.skipped`, with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from ..core.errors import CheckpointNotFoundError, CorruptCheckpointError
from ..core.untrusted import parse_json
from ..storage import store as _storage
from . import orbax as _orbax
from .base import Checkpoint, Entry

STEP_METADATA = _orbax.STEP_METADATA
_COMMIT_FILE = "commit_success.txt"  # Orbax's commit marker where it does not rename (object stores)
# Handlers whose items are trees of arrays, and those whose items are one JSON file (by class name:
# `_CHECKPOINT_METADATA` records each handler's module path, which moves between Orbax releases).
# An `ArraySave` item is a PyTree checkpoint of its one array, named "checkpoint" (as a
# `Checkpointer(ArrayCheckpointHandler)` writes it alone, which `orbax.load` reads too).
_TREE_HANDLERS = {"StandardCheckpointHandler", "PyTreeCheckpointHandler", "ArrayCheckpointHandler"}
_JSON_HANDLERS = {"JsonCheckpointHandler"}


class StepCheckpoint(Checkpoint):
    """One step of an Orbax ``CheckpointManager``: its items read as one checkpoint.

    Args:
      path: the step directory.
      items: its item directories, by item name.
      handlers: each item's Orbax handler (a class name), where ``_CHECKPOINT_METADATA`` says.
      created: when Orbax committed the step (seconds since the epoch).

    Attributes:
      items: each tree item's own `OrbaxCheckpoint`, by item name.
      values: each JSON item's value, by item name (``{"metadata": {"step": 400}}``).

    >>> import os, orbax.checkpoint as ocp
    >>> with ocp.CheckpointManager(os.path.abspath("mgr"), item_names=("params", "metadata")) as mgr:
    ...     _ = mgr.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave({"w": np.ones(2)}),
    ...                                             metadata=ocp.args.JsonSave({"lr": 0.1})))
    >>> ckpt = jstate.open_checkpoint("mgr/1")
    >>> list(ckpt.entries), ckpt.values, ckpt.step
    (['params/w'], {'metadata': {'lr': 0.1}}, 1)
    """

    writer = "orbax"

    def __init__(self, path: Path, items: dict[str, Path], handlers: dict[str, str], created: float):
        prefixed = len(items) > 1  # one item reads as itself, as `mgr.restore(step)` returns it
        self.items: dict[str, _orbax.OrbaxCheckpoint] = {}
        self._source: dict[str, tuple[str, str]] = {}  # name here -> (item, name in the item)
        entries: dict[str, Entry] = {}
        values: dict[str, Any] = {}
        skipped: dict[str, str] = {}
        for item, where in sorted(items.items()):
            kind = _kind(where, handlers.get(item))
            if kind == "tree":
                self.items[item] = ckpt = _orbax.OrbaxCheckpoint(where, where)
                for inner, e in ckpt.entries.items():
                    name = f"{item}/{inner}" if prefixed else inner
                    entries[name] = Entry((item, *e.keypath), e.shape, e.dtype)
                    self._source[name] = (item, inner)
            elif kind == "json":
                values[item] = _json(where)
            else:
                skipped[item] = kind
        super().__init__(path, entries, step=_orbax.step_of(path.name), created=created, skipped=skipped)
        self.values = values

    def _by_item(self, names: list[str]) -> dict[str, dict[str, str]]:
        """``{item: {name in the item: name here}}`` for `names`."""
        out: dict[str, dict[str, str]] = {}
        for name in names:
            item, inner = self._source[name]
            out.setdefault(item, {})[inner] = name
        return out

    def _read(self, wanted: dict[str, jax.ShapeDtypeStruct], verify: bool) -> dict[str, jax.Array]:
        out = {}
        for item, names in self._by_item(list(wanted)).items():
            read = self.items[item]._read({inner: wanted[name] for inner, name in names.items()}, verify)
            out |= {names[inner]: array for inner, array in read.items()}
        return out

    def _read_host(self, names: list[str], verify: bool) -> dict[str, np.ndarray]:
        out = {}
        for item, by_inner in self._by_item(names).items():
            read = self.items[item]._read_host(list(by_inner), verify)
            out |= {by_inner[inner]: array for inner, array in read.items()}
        return out


def _kind(item: Path, handler: str | None) -> str:
    """What `item` is: "tree" or "json" where jstate reads it, else why it does not (for
    `skipped`). Without a handler recorded, an item is what its files say it is."""
    if handler in _TREE_HANDLERS or (handler is None and _orbax.is_checkpoint(item)):
        return "tree"
    if handler in _JSON_HANDLERS or (handler is None and len(_files(item)) == 1):
        return "json"
    if handler is not None:
        return f"an item of Orbax's {handler}, which jstate does not read"
    return "not an item of a handler jstate reads (a PyTree, StandardSave or JsonSave item)"


def _files(item: Path) -> list[str]:
    return [n for n in _storage.listdir(item) if n != _COMMIT_FILE and not n.startswith(".")]


def _json(item: Path) -> Any:
    """A JSON item's value. Read here rather than by Orbax's `JsonCheckpointHandler` (which does
    the same: one file, `json.loads`) so that it goes through jstate's stores and deadlines."""
    files = _files(item)
    try:
        if len(files) != 1:
            raise ValueError(f"{len(files)} files where a JSON item holds one")
        return parse_json(_storage.read_bytes(item / files[0], _storage.LIMIT, "Orbax JSON item"))
    except ValueError as e:  # json.JSONDecodeError is one, and parse_json's own
        raise CorruptCheckpointError(f"Orbax JSON item {item} cannot be read ({e}).") from e


def _step_metadata(path: Path) -> dict[str, Any]:
    """The step's ``_CHECKPOINT_METADATA`` (Orbax's `StepMetadata`, as JSON), {} if damaged."""
    try:
        found = parse_json(_storage.read_bytes(path / STEP_METADATA, 1 << 20, "Orbax step metadata"))
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def load(path: Path) -> StepCheckpoint | None:
    """`path` as a CheckpointManager step (one not itself a PyTree checkpoint: `orbax.load` reads
    those), None if it is none.

    A step is a directory holding ``_CHECKPOINT_METADATA``, or one named by its step alone
    (``400``, what Orbax wrote before that file) holding a PyTree item. Any other directory
    holding Orbax checkpoints is a directory of checkpoints.

    Raises:
      CheckpointNotFoundError: `path` is a step Orbax has not finished writing.
      CorruptCheckpointError: an item is damaged (a JSON item that does not parse, a tree item
        whose metadata Orbax cannot read).

    >>> print(load(Path(jstate.Saver().save(state, "ckpt/model"))))  # a jstate checkpoint: not a step
    None
    """
    if not _storage.is_dir(path):
        return None
    names = set(_storage.listdir(path))
    step_file = STEP_METADATA in names
    if not step_file and not path.name.isdigit():  # decided from the listing: a directory of many is no step
        return None
    items = {
        n: path / n
        for n in sorted(names - {STEP_METADATA, _COMMIT_FILE})
        if not n.startswith(".") and _storage.is_dir(path / n)
    }
    if not step_file and not any(_orbax.is_checkpoint(p) for p in items.values()):
        return None
    if _orbax.TMP in path.name or (not _storage.store_for(path).renames and _COMMIT_FILE not in names):
        # Where the store renames, Orbax writes under a temporary name; elsewhere it writes the
        # commit file last (`ocp.path.step.is_path_finalized`'s rule).
        raise CheckpointNotFoundError(f"{path} is an Orbax step whose save has not finished (or was interrupted).")
    if not items:
        raise CorruptCheckpointError(f"Orbax step {path} holds no items.")
    metadata = _step_metadata(path) if step_file else {}
    handlers = metadata.get("item_handlers")
    if isinstance(handlers, str):  # the directory is one item itself (a PyTree checkpoint), not a step of items
        return None
    handlers = {k: str(v).rsplit(".", 1)[-1] for k, v in handlers.items()} if isinstance(handlers, dict) else {}
    stamp = metadata.get("commit_timestamp_nsecs")
    created = stamp / 1e9 if isinstance(stamp, int) else _storage.mtime(path / STEP_METADATA if step_file else path)
    return StepCheckpoint(path, items, handlers, created)
