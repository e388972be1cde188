"""The exceptions jstate raises.

Each subclasses a built-in, so an ordinary ``except KeyError`` or ``except ValueError``
still catches it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class JStateError(Exception):
    """Base class of every jstate error.

    >>> try:
    ...     state["weight"]
    ... except jstate.JStateError as e:  # also a KeyError here
    ...     print(type(e).__name__, isinstance(e, KeyError))
    UnknownVariableError True
    """


class InvalidNameError(JStateError, ValueError):
    """A variable name is malformed or declared twice.

    >>> jstate.State({"a//b": jnp.ones(2)})
    Traceback (most recent call last):
    ...
    jstate.core.errors.InvalidNameError: Variable 'a//b': invalid name 'a//b': it has an empty part ('//').
    """


class SpecMismatchError(JStateError, ValueError):
    """A value's shape or dtype differs from its variable's declaration.

    >>> state.assign("biases", jnp.ones(3))
    Traceback (most recent call last):
    ...
    jstate.core.errors.SpecMismatchError: Cannot assign variable 'biases': declared shape (200,) and dtype float32,
    given shape (3,) and dtype float32...
    """


class UninitializedError(JStateError, KeyError):
    """A variable is declared but holds no value yet.

    >>> jstate.abstract(model)["weights"]
    Traceback (most recent call last):
    ...
    jstate.core.errors.UninitializedError: Variable 'weights' is declared but not initialized. Initialize it with
    `jstate.init(model, key, state=state)` or restore it with `Saver.restore`.
    """

    def __str__(self) -> str:  # KeyError would quote the whole message.
        return str(self.args[0])


class UnknownVariableError(JStateError, KeyError):
    """A name that no variable of the State or model declares.

    >>> state["weight"]
    Traceback (most recent call last):
    ...
    jstate.core.errors.UnknownVariableError: Variable 'weight' is not declared. Did you mean 'weights'? ...
    """

    def __str__(self) -> str:
        return str(self.args[0])


class InitializerError(JStateError, ValueError):
    """An initializer has the wrong signature or returns the wrong shape or dtype.

    >>> jstate.abstract(lambda s: s.variable("w", jstate.initializers.zeros))
    Traceback (most recent call last):
    ...
    jstate.core.errors.InitializerError: Variable 'w': a shape is required with an initializer, e.g. ...
    """


class ModelError(JStateError, RuntimeError):
    """The model function raised while it was being traced.

    >>> def model(s):
    ...     w = s.variable("w", jnp.zeros(2))
    ...     s.variable("b", w @ jnp.zeros(3))
    >>> jstate.abstract(model)
    Traceback (most recent call last):
    ...
    jstate.core.errors.ModelError: Model `model` failed after declaring variable 'w' (the last one declared):
    TypeError: dot_general requires contracting dimensions to have the same shape, got (2,) and (3,).
    """


class PlacementError(JStateError, ValueError):
    """A device, sharding or placement rule cannot be applied.

    >>> jstate.abstract(lambda s: s.variable("w", jnp.zeros(2), device="cpu:99"))
    Traceback (most recent call last):
    ...
    jstate.core.errors.PlacementError: Variable 'w': device spec 'cpu:99' matches no device. Devices: cpu:0 ...
    """


class MappingError(JStateError, ValueError):
    """A Saver's name mapping is malformed, ambiguous, or names undeclared variables.

    >>> jstate.Saver({"encoder/": "weights"})
    Traceback (most recent call last):
    ...
    jstate.core.errors.MappingError: Saver entry 'encoder/': 'weights': a scope (ending in '/') must map to a scope.
    """


class CheckpointError(JStateError, ValueError):
    """A checkpoint cannot be written or read; the message names the path and variable.

    >>> jstate.load_variable(jstate.Saver().save(state, "ckpt/model"), "weight")
    Traceback (most recent call last):
    ...
    jstate.core.errors.CheckpointError: Checkpoint ckpt/model holds no variable 'weight'. Did you mean 'weights'? ...
    """


class CheckpointNotFoundError(CheckpointError):
    """No checkpoint at a path.

    >>> jstate.open_checkpoint("ckpt/model-1000")
    Traceback (most recent call last):
    ...
    jstate.core.errors.CheckpointNotFoundError: No checkpoint at ckpt/model-1000: it does not exist.
    """


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files are truncated, altered, or incomplete.

    >>> path = jstate.save_safetensors(state, "model.safetensors")
    >>> with open(path, "r+b") as f:
    ...     _ = f.truncate(100)
    >>> jstate.open_checkpoint(path)
    Traceback (most recent call last):
    ...
    jstate.core.errors.CorruptCheckpointError: Safetensors file model.safetensors is damaged or truncated (...).
    Restore or re-export it.
    """


class ArgumentError(JStateError, ValueError, TypeError):
    """An argument of a jstate call has the wrong type or value; the message names the argument,
    the value given and what is accepted.

    Both a `ValueError` and a `TypeError`, so ``except ValueError`` and ``except TypeError``
    (which of the two Python would raise depends on the value) catch it.

    >>> jstate.Saver(max_to_keep=2.5)
    Traceback (most recent call last):
    ...
    jstate.core.errors.ArgumentError: `Saver(max_to_keep=...)` takes an integer >= 0 (0 or None keeps every
    checkpoint); got float 2.5.
    """


class Damaged(Exception):
    """Bytes that cannot be what the checkpoint says they are, raised inside a format's reader.

    `Checkpoint.read` reports it as one CorruptCheckpointError naming the checkpoint, the
    variable and the damaged file. Not public: users see the CorruptCheckpointError."""


class StoreError(CheckpointError, OSError):
    """An object store (gs://, s3://) cannot be reached; also an `OSError`.

    Nothing is known about the checkpoint then, so no lookup takes it for a missing one
    (`latest_checkpoint` raises it, never returns None).

    >>> issubclass(jstate.StoreError, (jstate.CheckpointError, OSError))
    True
    """


class StoreTimeoutError(StoreError, TimeoutError):
    """An object store did not answer within the time allowed (a `timeout=`).

    Also a `TimeoutError`, so ``except TimeoutError`` catches it.

    >>> try:
    ...     raise jstate.StoreTimeoutError("gs://bucket/run: the object store did not answer within 1 s.")
    ... except TimeoutError as e:
    ...     print(isinstance(e, jstate.CheckpointError))
    True
    """


def closest(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """A short "did you mean" phrase for `name`, or "" when nothing is close.

    Args:
      name: the name asked for.
      candidates: the names there are.
      n: at most this many suggestions.

    >>> closest("weight", ["weights", "biases"])
    " Did you mean 'weights'?"
    """
    matches = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
    if not matches:
        return ""
    return " Did you mean " + " or ".join(f"'{m}'" for m in matches) + "?"


def shorten(names: Iterable[str], limit: int = 8) -> str:
    """`names` quoted and comma-separated, with "and N more" past `limit`.

    Args:
      names: the names.
      limit: at most this many are shown.

    >>> shorten(["a", "b", "c"], limit=2)
    "'a', 'b' and 1 more"
    """
    names = list(names)
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    if len(names) > limit:
        shown += f" and {len(names) - limit} more"
    return shown


def uninitialized(name: str) -> UninitializedError:
    """The one error for reading a declared variable that holds no value, and how to give it one.

    >>> print(uninitialized("weights"))
    Variable 'weights' is declared but not initialized. Initialize it with `jstate.init(model, key, state=state)` ...
    """
    return UninitializedError(
        f"Variable '{name}' is declared but not initialized. Initialize it with "
        "`jstate.init(model, key, state=state)` or restore it with `Saver.restore`."
    )


def unknown_names(kind: str, names: Iterable[str], known: Iterable[str], hint: str) -> UnknownVariableError:
    """One error for a batch of undeclared names, with suggestions for the first.

    Args:
      kind: what they are, starting the message (``"Variable"``, ``"Cannot assign: variable"``).
      names: the undeclared names.
      known: the declared ones.
      hint: the sentence that says how to proceed.

    Returns:
      The error, to raise.

    >>> print(unknown_names("Variable", ["weight"], ["weights"], "Declare it first."))
    Variable 'weight' is not declared. Did you mean 'weights'? Declare it first.
    """
    names, known = sorted(names), sorted(known)
    return UnknownVariableError(
        f"{kind} {shorten(names)} {'is' if len(names) == 1 else 'are'} not declared.{closest(names[0], known)} {hint}"
    )


def not_in_checkpoint(
    where: str, names: Iterable[str], known: Iterable[str], kind: str = "variable"
) -> CheckpointError:
    """The one error for names a checkpoint does not hold, with the closest ones it does.

    Args:
      where: the checkpoint, starting the message.
      names: the names it lacks.
      known: the names it holds.
      kind: what they are ("variable").

    >>> print(not_in_checkpoint("Checkpoint ckpt/m-1", ["weight"], ["weights", "biases"]))
    Checkpoint ckpt/m-1 holds no variable 'weight'. Did you mean 'weights'? `jstate.list_variables(path)` lists them.
    """
    names = sorted(names)
    return CheckpointError(
        f"{where} holds no {kind} {shorten(names)}.{closest(names[0], known)} `jstate.list_variables(path)` lists them."
    )
