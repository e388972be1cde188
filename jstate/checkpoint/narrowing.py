"""Bookkeeping values as Orbax and TensorFlow store them, in the variables JAX holds them in.

Orbax stores a Python ``int`` step as int64 and a Python ``float`` learning rate as float64, and
TensorFlow's ``global_step`` is int64; with JAX's 64-bit mode off (its default) the target holds
them as int32 or float32. Such an entry restores without ``cast=True`` when every value converts
exactly: it is read to the host in its stored dtype, checked value by value, then placed.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np

from ..core.errors import SpecMismatchError
from ..formats.base import Checkpoint, from_host

log = logging.getLogger("jstate")

_DOES_NOT_FIT = (
    "Checkpoint {path}: variable '{c}' is {stored}, and its value {value!r} does not fit {declared}, "
    "what '{n}' is with JAX's 64-bit mode off. Pass `cast=True` to convert it anyway, or enable 64-bit mode "
    "(`jax.config.update('jax_enable_x64', True)`) and declare it {stored}."
)


def narrows(stored: np.dtype, declared: np.dtype) -> bool:
    """Whether `declared` is what JAX makes of the 64-bit `stored` with its 64-bit mode off
    (int64 -> int32, uint64 -> uint32, float64 -> float32, complex128 -> complex64).

    >>> narrows(np.dtype("int64"), np.dtype("int32")), narrows(np.dtype("float32"), np.dtype("bfloat16"))
    (True, False)
    """
    if not isinstance(stored, np.dtype) or stored.kind not in "iufc":  # PRNG keys, bfloat16: never
        return False
    return stored != declared and jax.dtypes.canonicalize_dtype(stored) == declared


def read(
    ckpt: Checkpoint,
    narrowed: dict[str, str],
    targets: dict[str, jax.ShapeDtypeStruct],
    loose: frozenset[str],
    verify: bool,
    exact: dict[str, np.ndarray],
) -> dict[str, jax.Array]:
    """The variables `narrowed` (``{State name: checkpoint name}``) read to the host, checked
    value by value and placed as `targets` says. One INFO record names them.

    Args:
      ckpt: the checkpoint.
      narrowed: what to read, by `narrows`.
      targets: each variable's 32-bit dtype and sharding.
      loose: variables that were Python numbers: a float there may round (Python's float would
        hold it), not overflow.
      verify: check what is read against the checkpoint's checksums.
      exact: filled with the values as stored, by State name (a Python number gets them back).

    Returns:
      ``{State name: array}``.

    Raises:
      SpecMismatchError: the first value that does not fit, naming its variable, the value and
        `cast=True`.
    """
    if not narrowed:
        return {}
    host = ckpt.read_host(sorted(set(narrowed.values())), verify=verify)
    out = {}
    for n, c in narrowed.items():
        declared = targets[n].dtype
        bad = misfit(host[c], declared, n in loose)
        if bad is not None:
            raise SpecMismatchError(
                _DOES_NOT_FIT.format(
                    path=ckpt.path, c=c, n=n, value=bad, stored=host[c].dtype.name, declared=np.dtype(declared).name
                )
            )
        exact[n] = host[c]
        out[n] = from_host(host[c], targets[n])
    log.info(
        "Restored %d variable(s) stored in 64 bits into 32 bits (JAX's 64-bit mode is off), every value fitting: %s",
        len(narrowed),
        ", ".join(f"{n} ({host[c].dtype.name} -> {np.dtype(targets[n].dtype).name})" for n, c in narrowed.items()),
    )
    return out


def misfit(host: np.ndarray, declared: np.dtype, loose: bool) -> Any:
    """The first value of `host` that `declared` cannot hold (as a Python number), None if all fit:
    integers out of range; floats whose `declared` value is another number (with `loose`, only
    those it overflows). NaN and infinities fit.

    >>> misfit(np.array([1, 2**31], np.int64), np.dtype(np.int32), False), misfit(np.array([0.5, 0.1]), np.dtype(np.float32), False)
    (2147483648, 0.1)
    >>> misfit(np.array([0.1, np.nan]), np.dtype(np.float32), True) is None
    True
    """
    if np.issubdtype(host.dtype, np.integer):
        info = np.iinfo(declared)
        bad = (host < info.min) | (host > info.max)
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            narrow = host.astype(declared)
        overflow = np.isfinite(host) & ~np.isfinite(narrow)
        # a Python float (`loose`) was a float64 anyway: rounding it to float32 is what JAX does to it
        bad = overflow if loose else overflow | ~((narrow.astype(host.dtype) == host) | np.isnan(host))
    where = np.flatnonzero(bad)
    return host.flat[where[0]].item() if where.size else None
