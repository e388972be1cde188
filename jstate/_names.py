"""Variable names: validation, joining, and the stable hash that seeds each variable's key."""

from __future__ import annotations

import hashlib

import numpy as np

from ._errors import InvalidNameError

SEP = "/"


def check_part(part: str, where: str) -> None:
    """Validate one name component (a variable or scope name)."""
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
    """Return `name` if it is a valid full variable name, else raise `InvalidNameError`."""
    check_part(name, f"Variable {name!r}")
    return name


def join(prefix: str, name: str) -> str:
    return f"{prefix}{SEP}{name}" if prefix else name


def name_hash(name: str) -> np.ndarray:
    """Two uint32 words from a stable 64-bit digest of `name`.

    Python's ``hash`` is salted per process, so a cryptographic digest is used: a variable's
    random key must be the same in every process and every run.
    """
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return np.frombuffer(digest, dtype=np.uint32).copy()


def key_name(key: object) -> str:
    """One part of a name from a `jax.tree_util` path key (dict key, list index, field name)."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)
