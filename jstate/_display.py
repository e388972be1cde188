"""How States, placements and checkpoints show themselves: `Table`s, printed as text and
rendered as HTML in Jupyter. Values are never printed, only names, shapes, dtypes and sizes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from ._placement import describe, device_bytes
from ._spec import VariableSpec
from ._table import Table, human_bytes

if TYPE_CHECKING:
    from ._reader import Checkpoint
    from ._state import State

MAX_ROWS = 60


def state_table(state: State) -> Table:
    """A State as a `Table`: name, shape, dtype, sharding, bytes, initialized.

    >>> print(state_table(jstate.State({"w": jnp.zeros(3)})))
    State: 1 variables, 1 initialized, 12 B
    name  shape  dtype    sharding  bytes  initialized
    ----  -----  -------  --------  -----  -----------
    w     (3,)   float32  default   12 B   yes
    """
    specs = state.specs
    rows = [
        (n, s.shape, s.dtype.name, describe(s.sharding), human_bytes(s.nbytes), n in state) for n, s in specs.items()
    ]
    total = sum(s.nbytes for s in specs.values())
    title = f"State: {len(rows)} variables, {len(state)} initialized, {human_bytes(total)}"
    if len(rows) > MAX_ROWS:
        title += f" (first {MAX_ROWS} shown)"
        rows = rows[:MAX_ROWS]
    return Table(("name", "shape", "dtype", "sharding", "bytes", "initialized"), rows, title)


def placement_table(specs: Iterable[VariableSpec]) -> Table:
    """Where each variable lives: name, shape, dtype, sharding, bytes per device, and what placed it."""
    rows = [
        (
            s.name,
            s.shape,
            s.dtype.name,
            describe(s.sharding),
            human_bytes(device_bytes(s.nbytes, s.shape, s.sharding)),
            s.placement.source,
        )
        for s in specs
    ]
    return Table(("name", "shape", "dtype", "sharding", "bytes/device", "source"), rows)


def checkpoint_table(ckpt: Checkpoint) -> Table:
    """What a checkpoint holds: name, shape, dtype and size; skipped entries with the reason."""
    entries: Mapping = ckpt.entries
    rows = [(n, e.shape, e.dtype.name, human_bytes(e.nbytes)) for n, e in sorted(entries.items())]
    rows += [(n, "-", "-", f"skipped: {why}") for n, why in sorted(ckpt.skipped.items())]
    total = sum(e.nbytes for e in entries.values())
    step = f", step {ckpt.step}" if ckpt.step is not None else ""
    title = f"Checkpoint {ckpt.path}{step} ({ckpt.writer}): {len(entries)} variables, {human_bytes(total)}"
    return Table(("name", "shape", "dtype", "size"), rows, title)


def checkpoints_table(directory: object, found: Iterable[Checkpoint]) -> Table:
    """Checkpoints, oldest first: path, step, when committed, data size, variables, writer."""
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
