"""Compiled initializer programs, one per distinct (initializer, shape, dtype, sharding).

Why not one `jax.jit` over the whole model: XLA's compile time grows super-linearly with the
size of the program (1,000 variables in one jit took minutes to compile), while 1,000 variables
that share an initializer, shape and dtype share one small program here, compiled once and
dispatched 1,000 times with different keys. Each program is created where its variable lives
(``out_shardings``), and peak memory stays at the parameters plus one variable's temporaries.
"""

from __future__ import annotations

import collections
import functools
import inspect
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..core.errors import InitializerError

_CACHE_SIZE = 4096
_programs: collections.OrderedDict[Hashable, Callable] = collections.OrderedDict()


def initializer_program(initializer: Callable, shape: tuple[int, ...], dtype: np.dtype, sharding: Any) -> Callable:
    """A jitted ``program(key, key_words) -> value`` for this initializer, shape, dtype, sharding.

    `key_words` are the two uint32 words of the variable's name hash, folded into `key` inside the
    program, so a variable's value depends on the init key and its own name only.
    """
    cache_key = (initializer_identity(initializer), shape, dtype, sharding)
    program = _programs.get(cache_key)
    if program is None:
        program = jax.jit(functools.partial(_initialize, initializer, shape, dtype), out_shardings=sharding)
        _programs[cache_key] = program
        if len(_programs) > _CACHE_SIZE:
            _programs.popitem(last=False)
    else:
        _programs.move_to_end(cache_key)
    return program


def _initialize(initializer: Callable, shape: tuple[int, ...], dtype: np.dtype, key: jax.Array, key_words: jax.Array):
    key = jax.random.fold_in(jax.random.fold_in(key, key_words[0]), key_words[1])
    value = jnp.asarray(initializer(key, shape, dtype))
    if value.shape != shape or value.dtype != dtype:
        raise InitializerError(
            f"the initializer returned shape {value.shape} and dtype {value.dtype.name}; the "
            f"declaration asks for shape {shape} and dtype {dtype.name}."
        )
    return value


def initializer_identity(fn: Callable) -> Hashable:
    """A hashable key under which equal initializers share a compiled program.

    `jax.nn.initializers.normal(0.35)` returns a new closure on every call, so a model that builds
    its initializers inline would compile anew on every `init` if programs were keyed by object
    identity. Closures are keyed by their code and captured values instead (when those are
    hashable); `functools.partial` by its function and arguments; anything else by itself.
    """
    if inspect.ismethod(fn):  # the bound object is part of what the method computes
        self_key = fn.__self__
        try:
            hash(self_key)
        except TypeError:
            self_key = _ByIdentity(self_key)
        return ("method", initializer_identity(fn.__func__), self_key)
    if isinstance(fn, functools.partial):
        try:
            key = ("partial", initializer_identity(fn.func), _exact(fn.args), _exact(sorted(fn.keywords.items())))
            hash(key)
            return key
        except TypeError:
            return fn
    code = getattr(fn, "__code__", None)
    if code is not None:
        cells = tuple(c.cell_contents for c in (fn.__closure__ or ()))
        key = (
            "code",
            code,
            _exact(cells),
            _exact(fn.__defaults__ or ()),
            _exact(sorted((fn.__kwdefaults__ or {}).items())),
        )
        try:
            hash(key)
            return key
        except TypeError:
            return fn
    try:
        hash(fn)
        return fn
    except TypeError:
        return _ByIdentity(fn)


def _exact(values) -> tuple:
    """Values keyed so that only equal-and-same values match: ``0.0`` and ``-0.0``, ``1`` and
    ``True`` and ``1.0`` compare equal in Python but may initialize differently."""
    out = []
    for v in values:
        if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str):
            out.append((v[0], *_exact([v[1]])))  # a (keyword, value) pair
        elif isinstance(v, float):
            out.append(("float", v.hex()))
        elif isinstance(v, (bool, int, complex, np.generic)):
            out.append((type(v).__name__, repr(v)))
        else:
            out.append(v)
    return tuple(out)


class _ByIdentity:
    """Hashes an unhashable object by identity, keeping it alive so its id is never reused."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ByIdentity) and other.obj is self.obj
