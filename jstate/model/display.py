"""How States and placements show themselves: `Table`s, printed as text and
rendered as HTML in Jupyter. Values are never printed, only names, shapes, dtypes and sizes."""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping

from ..core.table import Table, human_bytes
from .devices import describe, device_bytes
from .spec import VariableSpec

MAX_ROWS = 60


def state_table(specs: Mapping[str, VariableSpec], initialized: Container[str]) -> Table:
    """A State's variables as a `Table`: name, shape, dtype, sharding, bytes, initialized.

    Args:
      specs: every declared variable, by name.
      initialized: the names that hold a value.

    >>> s = jstate.State({"w": jnp.zeros(3)})
    >>> print(state_table(s.specs, s))
    State: 1 variables, 1 initialized, 12 B
    name  shape  dtype    sharding  bytes  initialized
    ----  -----  -------  --------  -----  -----------
    w     (3,)   float32  default   12 B   yes
    """
    rows = [
        (n, s.shape, s.dtype.name, describe(s.sharding), human_bytes(s.nbytes), n in initialized)
        for n, s in specs.items()
    ]
    total = sum(s.nbytes for s in specs.values())
    count = sum(n in initialized for n in specs)
    title = f"State: {len(rows)} variables, {count} initialized, {human_bytes(total)}"
    if len(rows) > MAX_ROWS:
        title += f" (first {MAX_ROWS} shown)"
        rows = rows[:MAX_ROWS]
    return Table(("name", "shape", "dtype", "sharding", "bytes", "initialized"), rows, title)


def placement_table(specs: Iterable[VariableSpec]) -> Table:
    """Where each variable lives: name, shape, dtype, sharding, bytes per device, and what placed it.

    >>> print(placement_table([state.spec("biases")]))
    name    shape   dtype    sharding  bytes/device  source
    ------  ------  -------  --------  ------------  -------
    biases  (200,)  float32  default   800 B         default
    """
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
