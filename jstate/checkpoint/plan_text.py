"""How a restore plan says things in 120 columns and one line: the entries a transform reads as
a range with a count, stray entries grouped by their last name, cells shortened in the middle."""

from __future__ import annotations

import re
from typing import Any

from ..core.errors import CheckpointError, shorten

WIDTH = 120  # a plan's table fits a terminal, a notebook cell and a log line
HEAD = ("variable", "from", "transform", "shape", "dtype")

# TF1 checkpoints hold an optimizer's slots next to each variable (`*/Adam`, `*/Adam_1`): the
# message groups entries by their last path component, and suggests one pattern per group.
_STRAY = (
    "Checkpoint {path} holds {n} variable(s) that the Saver does not restore: {grouped}. To restore "
    "strictly without them, pass `ignore=[{patterns}]` (regular expressions searched in checkpoint names); "
    "or pass `strict=False`."
)


def stray(path: Any, names: list[str]) -> CheckpointError:
    """The error of a strict restore for the entries `names` that nothing uses or ignores.

    >>> print(stray("ckpt/tf", ["w/Adam", "b/Adam", "global_step"]))
    Checkpoint ckpt/tf holds 3 variable(s) that the Saver does not restore: */Adam (2: 'w/Adam', 'b/Adam'), 'global_step'. To restore strictly without them, pass `ignore=[r"/Adam$", r"^global_step$"]` (regular expressions searched in checkpoint names); or pass `strict=False`.
    """
    groups, alone = _groups(names)
    patterns = [f"/{re.escape(last)}$" for last in groups] + [f"^{re.escape(name)}$" for name in alone]
    shown = ", ".join(f'r"{p}"' for p in patterns[:6]) + (", ..." if len(patterns) > 6 else "")
    return CheckpointError(_STRAY.format(path=path, n=len(names), grouped=grouped(names), patterns=shown))


def _groups(names: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """`names` by their last path component where several share one, and the rest."""
    by_last: dict[str, list[str]] = {}
    for name in names:
        by_last.setdefault(name.rsplit("/", 1)[-1], []).append(name)
    groups = {last: members for last, members in by_last.items() if len(members) > 1 and "/" in members[0]}
    taken = {n for members in groups.values() for n in members}
    return groups, [n for n in names if n not in taken]


def grouped(names: list[str], limit: int = 8) -> str:
    """`names` for a message, grouped by their last path component where several share one:
    ``*/Adam (4: 'layer1/biases/Adam', ...)``, then the rest by name.

    >>> grouped(["a/Adam", "b/Adam", "c/Adam", "global_step"])
    "*/Adam (3: 'a/Adam', 'b/Adam' and 1 more), 'global_step'"
    """
    groups, alone = _groups(names)
    shown = [f"*/{last} ({len(members)}: {shorten(members, 2)})" for last, members in groups.items()]
    more = f", and {len(shown) - limit} more groups" if len(shown) > limit else ""
    return ", ".join([*shown[:limit], *([shorten(alone, limit)] if alone else [])]) + more


def sources(entries: list[str]) -> str:
    """The entries a transform reads, for a plan's "from" cell: a few by name, numbered ones as a
    range with their count, others as the first and a count.

    >>> sources(["a", "b"]), sources([f"layers_{i}/kernel" for i in range(24)]), sources(["x", "y", "z"])
    ('a, b', 'layers_{0..23}/kernel (24)', 'x, ... 3 entries')
    """
    if len(entries) <= 2:
        return ", ".join(entries)
    parts = [re.split(r"(\d+)", e) for e in entries]
    if all(len(p) == len(parts[0]) for p in parts):
        differ = [i for i in range(1, len(parts[0]), 2) if len({p[i] for p in parts}) > 1]
        same = all(p[i] == parts[0][i] for p in parts for i in range(len(p)) if i not in differ)
        if len(differ) == 1 and same:
            i = differ[0]
            numbers = [int(p[i]) for p in parts]
            if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
                head, tail = "".join(parts[0][:i]), "".join(parts[0][i + 1 :])
                return f"{head}{{{numbers[0]}..{numbers[-1]}}}{tail} ({len(entries)})"
    return f"{entries[0]}, ... {len(entries)} entries"


def fit(rows: list[tuple], width: int = WIDTH) -> list[tuple]:
    """`rows` (cells as `HEAD` names them) with their text cells (variable, from, transform)
    shortened in the middle until a table of them fits `width` columns (two spaces between
    columns): the column furthest above its floor gives first, variable names keeping the most
    (40), then entries (28), transforms (24); past those floors, every text column down to 16.

    >>> cell = fit([("model/" + "x" * 200 + "/kernel", "a", "", (2,), "float32")])[0][0]
    >>> len(cell), cell[:8], cell[-10:]
    (87, 'model/xx', 'xxx/kernel')
    """
    cells = [[str(c) for c in r] for r in rows]
    if not cells:
        return rows
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(HEAD)]
    for floors in ((40, 28, 24), (16, 16, 16)):
        while sum(widths) + 2 * (len(widths) - 1) > width:
            i = max(range(3), key=lambda i: widths[i] - floors[i])
            if widths[i] <= floors[i]:
                break
            widths[i] -= 1
    return [
        tuple(_middle(str(c), widths[i]) if i < 3 and len(str(c)) > widths[i] else c for i, c in enumerate(r))
        for r in rows
    ]


def _middle(text: str, width: int) -> str:
    """`text` in `width` characters: its start and end, "..." between (a name's ends tell most)."""
    keep = width - 3
    return text[: keep - keep // 2] + "..." + text[len(text) - keep // 2 :]
