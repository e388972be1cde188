"""JAX's ``fold_in`` computed on the host: the keys a Flax model derives, without compiling.

A `flax_model` derives a key per module and parameter by folding hashed names into init's key
(``jax.random.fold_in`` of a constant), before any value is drawn. Run by JAX, the first
``fold_in`` of a process compiles a program of its own (a threefry loop: 70-100 ms on a CPU,
5% of the transformer LM's init), then each costs a dispatch. They are a few dozen hashes of
two 32-bit words: Python computes each in microseconds, bit for bit JAX's (the tests compare
them on many keys). No library computes threefry outside JAX (numpy's Philox is another
generator), so it is written here, after ``jax._src.random.threefry2x32._threefry2x32_lowering``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from jax.extend.core import Literal

_MASK = 0xFFFFFFFF
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = 0x1BD11BDA


def hash2x32(key: tuple[int, int], x: tuple[int, int]) -> tuple[int, int]:
    """Threefry-2x32, 20 rounds (JAX's ``threefry2x32_p``), of the counter pair `x` under `key`."""
    ks = (key[0], key[1], key[0] ^ key[1] ^ _PARITY)
    x0, x1 = (x[0] + ks[0]) & _MASK, (x[1] + ks[1]) & _MASK
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = (x0 + x1) & _MASK
            x1 = ((x1 << r) | (x1 >> (32 - r))) & _MASK
            x1 ^= x0
        x0 = (x0 + ks[(i + 1) % 3]) & _MASK
        x1 = (x1 + ks[(i + 2) % 3] + i + 1) & _MASK
    return x0, x1


def fold_in(key: tuple[int, int], data: int) -> tuple[int, int]:
    """``jax.random.fold_in`` of a threefry key's two words and a 32-bit datum."""
    return hash2x32(key, (0, data & _MASK))


def derivable(eqns: Sequence[Any]) -> bool:
    """Whether `eqns` are all ``fold_in`` of a constant into a threefry key (what `derive` computes)."""
    return all(
        eqn.primitive.name == "random_fold_in"
        and isinstance(eqn.invars[1], Literal)
        and eqn.invars[1].aval.dtype == np.uint32
        and str(eqn.outvars[0].aval.dtype) == "key<fry>"
        and eqn.outvars[0].aval.shape == ()
        for eqn in eqns
    )


def derive(eqns: Sequence[Any], key_var: Any, key_data: np.ndarray, wanted: Sequence[Any]) -> np.ndarray:
    """The words of the `wanted` keys that `eqns` (`derivable`) derive from `key_var`, whose words
    are `key_data`: a ``(len(wanted), 2)`` uint32 array for ``jax.random.wrap_key_data``."""
    env = {key_var: (int(key_data[0]), int(key_data[1]))}
    for eqn in eqns:
        env[eqn.outvars[0]] = fold_in(env[eqn.invars[0]], int(eqn.invars[1].val))
    return np.array([env[v] for v in wanted], dtype=np.uint32).reshape(len(wanted), 2)
