"""Checking a user's arguments: what an integer or a number of seconds argument accepts, said in
one wording, raised as one error (`ArgumentError`) before anything is done."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

from .errors import ArgumentError


def bad(name: str, value: Any, accepted: str) -> ArgumentError:
    """The one error for argument `name` given `value`, saying what it `accepted`.

    Args:
      name: the argument as the user wrote it, e.g. ``"Saver(max_to_keep=...)"``.
      value: what was given.
      accepted: what is, as the object of "takes".

    >>> print(bad("Saver(layout=...)", "bogus", "'jstate' or 'orbax'"))
    `Saver(layout=...)` takes 'jstate' or 'orbax'; got str 'bogus'.
    """
    return ArgumentError(f"`{name}` takes {accepted}; got {type(value).__name__} {value!r}.")


def integer(value: Any, name: str, accepted: str, minimum: int = 0) -> int:
    """`value` as an `int` >= `minimum`: a Python or NumPy integer, or a 0-d integer array (a
    training loop's step is often one); never a bool, a float (3.0 neither: 3.5 would have to
    be refused too) or a string.

    Raises:
      ArgumentError: anything else, saying `name` takes `accepted`.

    >>> integer(np.int64(3), "save(step=...)", "an integer >= 0")
    3
    >>> integer(0.5, "Saver(keep_every_n_steps=...)", "an integer >= 1", minimum=1)
    Traceback (most recent call last):
    ...
    jstate.core.errors.ArgumentError: `Saver(keep_every_n_steps=...)` takes an integer >= 1; got float 0.5.
    """
    if isinstance(value, bool):
        raise bad(name, value, accepted)
    try:
        number = operator.index(value)  # ints, NumPy integers and integer 0-d arrays, no floats
    except TypeError:
        raise bad(name, value, accepted) from None
    if number < minimum:
        raise bad(name, value, accepted)
    return number


def positive(value: Any, name: str, accepted: str, *, finite: bool = True) -> float:
    """`value` as a `float` > 0 (and finite, unless `finite` is False): never a bool, NaN or string.

    Raises:
      ArgumentError: anything else, saying `name` takes `accepted`.

    >>> positive(2, "Preemption(grace=...)", "seconds > 0")
    2.0
    >>> positive(float("nan"), "Preemption(grace=...)", "seconds > 0")
    Traceback (most recent call last):
    ...
    jstate.core.errors.ArgumentError: `Preemption(grace=...)` takes seconds > 0; got float nan.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise bad(name, value, accepted)
    if not value > 0 or (finite and math.isinf(value)):  # `not >` refuses NaN too
        raise bad(name, value, accepted)
    return float(value)
