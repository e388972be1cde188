"""Small text and HTML tables: how States, placements and checkpoints show themselves."""

from __future__ import annotations

import html
from collections.abc import Sequence


def human_bytes(n: float) -> str:
    """A byte count for people, in powers of 1024: the one byte formatter of jstate's tables and logs.

    Args:
      n: bytes (a float for rates such as bytes per second).

    Returns:
      Whole bytes below 1 KiB, else one decimal in KiB, MiB or GiB.

    >>> human_bytes(512), human_bytes(3 * 2**20), human_bytes(1.5 * 2**30)
    ('512 B', '3.0 MiB', '1.5 GiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Table:
    """Rows of cells with a header; prints as aligned text and renders as HTML in Jupyter.

    Attributes:
      columns: the header.
      rows: one tuple of cells per row (the values themselves, not strings).

    >>> print(jstate.Table(["name", "shape", "initialized"], [("w", (3,), True)], title="1 variable"))
    1 variable
    name  shape  initialized
    ----  -----  -----------
    w     (3,)   yes
    """

    def __init__(self, columns: Sequence[str], rows: Sequence[Sequence[object]], title: str = ""):
        self.columns = tuple(columns)
        self.rows = [tuple(r) for r in rows]
        self.title = title

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __str__(self) -> str:
        cells = [self.columns] + [tuple(_cell(c) for c in r) for r in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if self.title:
            lines.insert(0, self.title)
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        head = "".join(f"<th style='text-align:left'>{html.escape(c)}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(f"<td style='text-align:left'>{html.escape(_cell(c))}</td>" for c in r) + "</tr>"
            for r in self.rows
        )
        caption = f"<caption style='text-align:left'>{html.escape(self.title)}</caption>" if self.title else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple):
        return "(" + ", ".join(map(str, value)) + ("," if len(value) == 1 else "") + ")"
    return str(value)
