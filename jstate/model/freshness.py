"""Which globals a traced function read, to know when its trace is stale.

`jax.jit` keeps a function's first trace even after a global it reads is rebound (``SCALE =
5.0``); jstate traces a model again instead. A trace records, for the model function and each
initializer, the globals their code names (and those of the functions they call that live
outside JAX, Flax and NumPy), and is reused only while each name is still bound to the same
object. Rebinding is what is detected: mutating a global list or dict in place is not.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from collections.abc import Callable, Iterable
from typing import Any

# Functions of these packages are taken as fixed: they are not rebound while a program runs,
# and following their globals would cost more than a trace saves.
_LIBRARIES = frozenset({"jax", "jaxlib", "flax", "numpy", "jstate", "optax", "ml_dtypes", "math", "functools"})
_MISSING = object()


@dataclasses.dataclass(frozen=True)
class Reads:
    """The globals some functions read: ``(namespace, name, value)``, compared by identity."""

    entries: tuple[tuple[dict, str, Any], ...]

    @classmethod
    def of(cls, functions: Iterable[Callable]) -> Reads:
        """What `functions` (and the user functions they name) read from their globals.

        >>> SCALE = 2.0
        >>> reads = Reads.of([lambda: SCALE])
        >>> reads.unchanged()
        True
        """
        entries: dict[tuple[int, str], tuple[dict, str, Any]] = {}
        seen: set[int] = set()
        todo = list(functions)
        while todo:
            fn = _unwrap(todo.pop())
            if fn is None or id(fn) in seen:
                continue
            seen.add(id(fn))
            namespace = fn.__globals__
            for name in _names(fn.__code__):
                value = namespace.get(name, _MISSING)
                entries[(id(namespace), name)] = (namespace, name, value)
                if _followed(value):
                    todo.append(value)
            for cell in fn.__closure__ or ():
                try:
                    value = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                if _followed(value):
                    todo.append(value)
        return cls(tuple(entries.values()))

    def unchanged(self) -> bool:
        """Whether every global read is still bound to the same object."""
        return all(ns.get(name, _MISSING) is value for ns, name, value in self.entries)


def _unwrap(fn: Any) -> types.FunctionType | None:
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.ismethod(fn):
        fn = fn.__func__
    return fn if isinstance(fn, types.FunctionType) else None


def _followed(value: Any) -> bool:
    fn = _unwrap(value)
    return fn is not None and (fn.__module__ or "").split(".")[0] not in _LIBRARIES


def _names(code: types.CodeType) -> set[str]:
    """Every global name `code` (and the functions defined in it) may read."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names
