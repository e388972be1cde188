"""JAX's ``fold_in`` computed on the host: variables' own keys, and the keys a Flax model
derives, without compiling.

Every variable's key is init's key with the two words of its name hash folded in, and a
`flax_model` derives a key per module and parameter by folding hashed names in too. Inside a
compiled program each ``fold_in`` is a threefry loop for XLA to lower and compile (0.2-0.3 s a
program on a CPU, whatever the number of variables); run by JAX outside one, the first of a
process compiles a program of its own (70-100 ms), then each costs a dispatch. They are hashes
of two 32-bit words: Python computes one in microseconds, numpy a thousand at once in about a
millisecond, bit for bit JAX's (the tests compare them on many keys). No library computes
threefry outside JAX (numpy's Philox is another generator), so it is written here, after
``jax._src.random.threefry2x32._threefry2x32_lowering``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.extend.core import Literal

_MASK = 0xFFFFFFFF
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = 0x1BD11BDA


def hash2x32(key: tuple[Any, Any], x: tuple[Any, Any]) -> tuple[Any, Any]:
    """Threefry-2x32, 20 rounds (JAX's ``threefry2x32_p``), of the counter pair `x` under `key`:
    Python ints, or uint32 arrays (elementwise, broadcast)."""
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


def fold_in(key: tuple[Any, Any], data: Any) -> tuple[Any, Any]:
    """``jax.random.fold_in`` of a threefry key's two words and a 32-bit datum (or of arrays of them)."""
    return hash2x32(key, (0, data & _MASK))


def words_of(key: Any) -> np.ndarray | None:
    """The two words of `key` where its folds can be computed here (one concrete, typed threefry
    key, outside any trace: a key closed over by a `jax.jit` function is traced there), else None."""
    if isinstance(key, jax.core.Tracer) or getattr(key, "shape", None) != ():
        return None
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) or str(jax.random.key_impl(key)) != "threefry2x32":
        return None
    data = jax.random.key_data(key)
    return None if isinstance(data, jax.core.Tracer) else np.asarray(data)


def fold_names(key: np.ndarray, words: np.ndarray) -> np.ndarray:
    """The words of each variable's own key (`programs.fold`: the key whose words are `key`
    (`words_of`) with the two words of its name hash folded in), for the ``(n, 2)`` name hashes
    `words`: ``(n, 2)`` uint32."""
    words = np.asarray(words, np.uint32).reshape(-1, 2)
    own = fold_in(fold_in((int(key[0]), int(key[1])), words[:, 0]), words[:, 1])
    return np.stack([np.broadcast_to(w, len(words)) for w in own], axis=1).astype(np.uint32)


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
