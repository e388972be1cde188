"""The exceptions jstate raises.

Each subclasses a built-in, so an ordinary ``except KeyError`` or ``except ValueError``
still catches it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class JStateError(Exception):
    """Base class of every jstate error."""


class InvalidNameError(JStateError, ValueError):
    """A variable name is malformed or declared twice."""


class SpecMismatchError(JStateError, ValueError):
    """A value's shape or dtype differs from its variable's declaration."""


class UninitializedError(JStateError, KeyError):
    """A variable is declared but holds no value yet."""

    def __str__(self) -> str:  # KeyError would quote the whole message.
        return str(self.args[0])


class UnknownVariableError(JStateError, KeyError):
    """A name that no variable of the State or model declares."""

    def __str__(self) -> str:
        return str(self.args[0])


class InitializerError(JStateError, ValueError):
    """An initializer has the wrong signature or returns the wrong shape or dtype."""


class ModelError(JStateError, RuntimeError):
    """The model function raised while it was being traced."""


class PlacementError(JStateError, ValueError):
    """A device, sharding or placement rule cannot be applied."""


class MappingError(JStateError, ValueError):
    """A Saver's name mapping is malformed, ambiguous, or names undeclared variables."""


class CheckpointError(JStateError, ValueError):
    """A checkpoint cannot be written or read; the message names the path and variable."""


class CheckpointNotFoundError(CheckpointError):
    """No checkpoint at a path."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files are truncated, altered, or incomplete."""


def closest(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """A short "did you mean" phrase for `name`, or "" when nothing is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
    if not matches:
        return ""
    return " Did you mean " + " or ".join(f"'{m}'" for m in matches) + "?"


def shorten(names: Iterable[str], limit: int = 8) -> str:
    """`names` quoted and comma-separated, with "and N more" past `limit`."""
    names = list(names)
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    if len(names) > limit:
        shown += f" and {len(names) - limit} more"
    return shown


def unknown_names(kind: str, names: Iterable[str], known: Iterable[str], hint: str) -> UnknownVariableError:
    """One error for a batch of undeclared names, with suggestions for the first."""
    names, known = sorted(names), sorted(known)
    return UnknownVariableError(
        f"{kind} {shorten(names)} {'is' if len(names) == 1 else 'are'} not declared.{closest(names[0], known)} {hint}"
    )


def not_in_checkpoint(
    where: str, names: Iterable[str], known: Iterable[str], kind: str = "variable"
) -> CheckpointError:
    """The one error for names a checkpoint does not hold, with the closest ones it does.

    >>> print(not_in_checkpoint("Checkpoint ckpt/m-1", ["weight"], ["weights", "biases"]))
    Checkpoint ckpt/m-1 holds no variable 'weight'. Did you mean 'weights'? `jstate.list_variables(path)` lists them.
    """
    names = sorted(names)
    return CheckpointError(
        f"{where} holds no {kind} {shorten(names)}.{closest(names[0], known)} `jstate.list_variables(path)` lists them."
    )
