"""Variable names: validation, joining, and the stable hash that seeds each variable's key."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping

import numpy as np

from .errors import InvalidNameError, UnknownVariableError, closest, unknown_names

SEP = "/"


def check_part(part: str, where: str) -> None:
    """Check one variable or scope name (it may hold "/"; no empty, "." or ".." parts).

    Args:
      part: the name.
      where: what is named, for the error (``"Variable 'a'"``, ``"Scope 'layer1'"``).

    Raises:
      InvalidNameError: `part` is not a str or not a valid name, saying why.

    >>> check_part("layer1/kernel", "Variable")
    >>> check_part("a.b", "Variable")
    Traceback (most recent call last):
    ...
    jstate.core.errors.InvalidNameError: Variable: invalid name 'a.b': '.' is not allowed in a name ...
    """
    if not isinstance(part, str):
        raise InvalidNameError(f"{where}: a name must be a str, got {type(part).__name__} {part!r}.")
    problem = _problem(part)
    if problem:
        raise InvalidNameError(f"{where}: invalid name {part!r}: {problem}.")


def _problem(name: str) -> str:
    if not name:
        return "it is empty"
    if name.startswith(SEP) or name.endswith(SEP):
        return "it starts or ends with '/'"
    for part in name.split(SEP):
        if not part:
            return "it has an empty part ('//')"
        if part in (".", ".."):
            return f"'{part}' is not allowed as a part"
        if "." in part:
            # Orbax joins tree paths with "." on disk, so "a.b" and "a/b" would share storage.
            return "'.' is not allowed in a name (it collides with nested names in Orbax files)"
        if not part.isprintable() or part != part.strip():
            return "parts must be printable and have no leading or trailing whitespace"
    return ""


def check_name(name: str) -> str:
    """`name`, checked as a full variable name (see `check_part`).

    Raises:
      InvalidNameError: naming the variable and what is wrong.

    >>> check_name("layer1/kernel")
    'layer1/kernel'
    """
    check_part(name, f"Variable {name!r}")
    return name


def select(requested: Iterable[str], declared: Mapping[str, object] | Iterable[str], what: str) -> list[str]:
    """The `declared` names that `requested` lists, in the order given, each once.

    Args:
      requested: names, and scopes ending in "/" for every variable in them (as a Saver's
        ``var_list``).
      declared: the names there are.
      what: what asks, for errors (``"`subset`"``).

    Raises:
      TypeError: `requested` is one string, not a list of them.
      UnknownVariableError: a name is not declared, or a scope holds no variable.

    >>> select(["layer1/", "w"], ["layer1/b", "layer1/k", "layer2/k", "w"], "`subset`")
    ['layer1/b', 'layer1/k', 'w']
    """
    if isinstance(requested, str):
        raise TypeError(f"{what} takes a list of names; got the string {requested!r}. Write [{requested!r}].")
    declared = list(declared)
    known = set(declared)
    chosen: dict[str, None] = {}
    missing = []
    for name in requested:
        if isinstance(name, str) and name.endswith(SEP):
            inside = [n for n in declared if n.startswith(name)]
            if not inside:
                scopes = {n[: i + 1] for n in declared for i, c in enumerate(n) if c == SEP}
                raise UnknownVariableError(
                    f"{what}: scope '{name}' holds no variable.{closest(name, scopes)} A name ending in '/' "
                    "selects every variable in that scope."
                )
            chosen.update(dict.fromkeys(inside))
        elif name in known:
            chosen[name] = None
        else:
            missing.append(name)
    if missing:
        raise unknown_names("Variable", missing, declared, f"{what} takes declared names and scopes ending in '/'.")
    return list(chosen)


def join(prefix: str, name: str) -> str:
    """`name` inside scope `prefix` ("" for none).

    >>> join("layer1", "kernel"), join("", "kernel")
    ('layer1/kernel', 'kernel')
    """
    return f"{prefix}{SEP}{name}" if prefix else name


def abbreviated(names: list[str]) -> str:
    """`names` said once, briefly, for a table cell or a message: a few by name, a numbered run
    (the per-layer entries a `stack` reads, in order) as a range with its count, others as the
    first and a count.

    >>> abbreviated(["a", "b"]), abbreviated([f"layers_{i}/kernel" for i in range(24)])
    ('a, b', 'layers_{0..23}/kernel (24)')
    >>> abbreviated(["x", "y", "z"])
    'x, ... 3 entries'
    """
    if len(names) <= 2:
        return ", ".join(names)
    return _run(names) or f"{names[0]}, ... {len(names)} entries"


def _run(names: list[str]) -> str | None:
    """`names` as ``layers_{0..23}/kernel (24)`` where they differ in one number alone, counting
    up by one; else None."""
    parts = [re.split(r"(\d+)", n) for n in names]
    if len(names) < 2 or any(len(p) != len(parts[0]) for p in parts):
        return None
    differ = [i for i in range(1, len(parts[0]), 2) if len({p[i] for p in parts}) > 1]
    if len(differ) != 1 or any(p[i] != parts[0][i] for p in parts for i in range(len(p)) if i != differ[0]):
        return None
    i = differ[0]
    numbers = [int(p[i]) for p in parts]
    if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
        return None
    return f"{''.join(parts[0][:i])}{{{numbers[0]}..{numbers[-1]}}}{''.join(parts[0][i + 1 :])} ({len(names)})"


def runs(names: list[str]) -> list[tuple[str, int]]:
    """`names` for a message, the numbered runs among them (the slots of 24 layers) as one item
    each: ``(text, how many names it says)``, a name alone quoted.

    >>> runs(sorted(f"block_{i}/{leaf}/Adam" for i in range(12) for leaf in ("bias", "kernel")) + ["head/Adam"])
    [('block_{0..11}/bias/Adam (12)', 12), ('block_{0..11}/kernel/Adam (12)', 12), ("'head/Adam'", 1)]
    """
    by_form: dict[str, list[str]] = {}
    for name in names:  # names that differ in their numbers alone share a form
        by_form.setdefault(re.sub(r"\d+", "#", name), []).append(name)
    out = []
    for members in by_form.values():
        members = sorted(members, key=lambda n: [int(d) for d in re.findall(r"\d+", n)])
        run = _run(members) if len(members) > 2 else None
        out += [(run, len(members))] if run else [(f"'{n}'", 1) for n in members]
    return out


def name_hash(name: str) -> np.ndarray:
    """Two uint32 words from a stable 64-bit digest of `name`.

    Python's ``hash`` is salted per process, so a cryptographic digest is used: a variable's
    random key must be the same in every process and every run.

    >>> name_hash("weights").dtype, name_hash("weights").shape
    (dtype('uint32'), (2,))
    """
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return np.frombuffer(digest, dtype=np.uint32).copy()
