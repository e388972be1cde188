"""How a restore plan says things in 120 columns: stray entries grouped by their last name, the
table's cells shortened where they tell their rows apart least, the notes under it wrapped."""

from __future__ import annotations

import collections
import re
import textwrap
from typing import Any

from .. import transforms as T
from ..core.errors import CheckpointError, shorten
from ..core.names import runs

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
    shown = [_group(last, members) for last, members in groups.items()]
    more = f", and {len(shown) - limit} more groups" if len(shown) > limit else ""
    return ", ".join([*shown[:limit], *([shorten(alone, limit)] if alone else [])]) + more


def _group(last: str, names: list[str], limit: int = 2) -> str:
    """A group of `grouped`: one numbered run as itself, else the first `limit` items (a run one
    item) and how many names are left: ``*/Adam (50: block_{0..23}/bias/Adam (24), ... and 2 more)``."""
    items = runs(names)
    if len(items) == 1 and items[0][1] > 1:
        return items[0][0]
    left = len(names) - sum(n for _, n in items[:limit])
    return (
        f"*/{last} ({len(names)}: " + ", ".join(t for t, _ in items[:limit]) + (f" and {left} more)" if left else ")")
    )


def wrap(text: str, width: int = WIDTH) -> str:
    """`text` (a note under a plan's table, a problem) in lines of at most `width` columns, the
    later ones indented; broken at spaces, never at the hyphens or slashes inside a name.

    >>> print(wrap("Ignored (`ignore=`): " + ", ".join(f"'w{i}/Adam'" for i in range(8)), 60))
    Ignored (`ignore=`): 'w0/Adam', 'w1/Adam', 'w2/Adam',
      'w3/Adam', 'w4/Adam', 'w5/Adam', 'w6/Adam', 'w7/Adam'
    """
    return textwrap.fill(text, width, subsequent_indent="  ", break_on_hyphens=False)


def fit(rows: list[tuple], width: int = WIDTH) -> list[tuple]:
    """`rows` (cells as `HEAD` names them; a transform as a `Transform`) as text cells within a
    table of `width` columns (two spaces between columns).

    The column furthest above its floor gives first, variable names keeping the most (40), then
    entries (28), transforms (24); past those floors, every text column down to 16. A name too
    long for its column gives up what tells its rows apart least: the scopes it shares with
    other rows of the column (``encoder/.../dense/bias (24)``), first shortened, then replaced
    by "...", left to right, before the root, the leaf, a numbered run's count; a transform its
    parameters (``cast(transpose(stack))``). Only past all that is a cell cut in its middle.

    >>> rows = [(f"encoder/layers/dense/{leaf}", f"encoder/block_{{0..23}}/dense/{leaf} (24)", "", (2,), "float32")
    ...         for leaf in ("kernel", "bias")]
    >>> [row[:2] for row in fit(rows, 78)]
    [('encoder/.../dense/kernel', 'encoder/.../kernel (24)'), ('encoder/.../dense/bias', 'encoder/.../bias (24)')]
    >>> cell = fit([("model/" + "x" * 200 + "/kernel", "a", "", (2,), "float32")])[0][0]
    >>> len(cell), cell[:8], cell[-10:]
    (87, 'model/xx', 'xxx/kernel')
    """
    if not rows:
        return rows
    full = [[T.describe(c) if isinstance(c, T.Transform) else str(c) for c in r] for r in rows]
    widths = _widths([max(len(h), *(len(r[i]) for r in full)) for i, h in enumerate(HEAD)], width)
    if any(len(r[2]) > widths[2] for r in full):  # transforms by their ops alone: the room they free goes to names
        full = [
            [*r[:2], _ops(c[2], widths[2]) if isinstance(c[2], T.Transform) else r[2], *r[3:]]
            for c, r in zip(rows, full)
        ]
        widths = _widths([max(len(h), *(len(r[i]) for r in full)) for i, h in enumerate(HEAD)], width)
    shared = [_shared([r[i] for r in full]) for i in range(2)]
    out = []
    for row, texts in zip(rows, full):
        cells = list(row)
        for i in range(3):
            if len(texts[i]) > widths[i]:
                cells[i] = _ops(row[i], widths[i]) if i == 2 else _name(texts[i], widths[i], shared[i])
            elif i == 2:
                cells[i] = texts[i]
        out.append(tuple(cells))
    return out


def _widths(widths: list[int], width: int) -> list[int]:
    """Column widths within `width`, the text columns (the first three) given up as `fit` says."""
    widths = list(widths)
    for floors in ((40, 28, 24), (16, 16, 16)):
        while sum(widths) + 2 * (len(widths) - 1) > width:
            i = max(range(3), key=lambda i: widths[i] - floors[i])
            if widths[i] <= floors[i]:
                break
            widths[i] -= 1
    return widths


_COUNTED = re.compile(r"(.*?)( \(\d+\))?")  # a name, and a numbered run's count after it


def _shared(texts: list[str]) -> set[tuple[int, str]]:
    """The (position, scope) pairs that several of a column's names hold: what tells its rows apart least."""
    seen = collections.Counter(p for t in texts for p in enumerate(_COUNTED.fullmatch(t)[1].split("/")))
    return {p for p, n in seen.items() if n > 1}


def _name(text: str, width: int, shared: set[tuple[int, str]]) -> str:
    """`text`, a name or a run of them, in `width` characters: its inner scopes given up first,
    those `shared` with other rows before the rest, each shortened in its middle only as far as
    needed, or replaced by "..."; past that, the whole cut in its middle."""
    name, count = _COUNTED.fullmatch(text).groups(default="")
    parts = name.split("/")
    if ", " not in name:  # one name or one run, not a list
        inner = range(1, len(parts) - 1)
        for i in sorted(inner, key=lambda i: (i, parts[i]) not in shared):  # stable: left to right
            over = len(_joined(parts)) + len(count) - width
            if over <= 0:
                break
            keep = len(parts[i]) - over
            # a scope cut to "l...s", or a run cut through its range, would tell nothing: give it up whole
            parts[i] = _middle(parts[i], keep) if keep >= 8 and "{" not in parts[i] else "..."
        name = _joined(parts)
    if len(name) + len(count) <= width:
        return name + count
    return _middle(name, width - len(count)) + count if width - len(count) >= 8 else _middle(name + count, width)


def _joined(parts: list[str]) -> str:
    """A name from its scopes, those given up side by side as one "..."."""
    return re.sub(r"(/\.\.\.)+", "/...", "/".join(parts))


def _ops(cell: Any, width: int) -> str:
    """A transform in `width` characters: its ops with their parameters, else its ops alone,
    else those cut in their middle."""
    for text in (T.describe(cell), T.describe(cell, params=False)):
        if len(text) <= width:
            return text
    return _middle(text, width)


def _middle(text: str, width: int) -> str:
    """`text` in `width` characters: its start and end, "..." between (a name's ends tell most)."""
    keep = width - 3
    return text[: keep - keep // 2] + "..." + text[len(text) - keep // 2 :]
