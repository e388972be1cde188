"""`StateDef`, a State's static part, and the pytree protocol that splits a State into it and its leaves.

A State is its `StateDef` (the declarations: the pytree's aux data) and its values (the leaves,
in name order). `register` makes a State class a pytree; its unflatten is where a State's
declarations follow values that gained or lost leading axes under `jax.vmap`
(`jstate.model.ensembles`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax

from . import ensembles as _ensembles
from .spec import VariableSpec


class StateDef:
    """The static part of a State (as NNX's ``GraphDef`` is a module's): its declarations.

    Every declared variable, and which ones hold values.

    It is the pytree aux data, compared by `jax.jit` on every call: its hash is computed once and
    equality short-circuits on identity, so a 1,000-variable State costs no more to dispatch
    than a dict of its arrays.

    Args:
      specs: every declared variable, by name.
      names: the names of those that hold a value.

    >>> StateDef(state.specs, state) == StateDef(state.specs, list(state))
    True
    """

    __slots__ = ("specs", "names", "_hash", "_first", "_refits")

    def __init__(self, specs: Mapping[str, VariableSpec], names: Iterable[str]):
        self.specs = dict(sorted(specs.items()))
        self.names = tuple(sorted(names))
        self._hash = hash((self.names, tuple((s.name, s.shape, s.dtype) for s in self.specs.values())))
        self._first = self.specs[self.names[0]].shape if self.names else None  # (see `register`)
        self._refits: dict[Any, StateDef] = {}

    def refit(self, leaves: tuple[Any, ...]) -> StateDef:
        """This StateDef, or the one whose declarations have the leading (batch) axes that
        `leaves`, the values of `names`, gained or lost (see `jstate.model.ensembles`).

        >>> StateDef(state.specs, ["biases"]).refit((jnp.zeros((3, 200)),)).specs["biases"].shape
        (3, 200)
        """
        change = _ensembles.refit(self.specs, self.names, leaves)
        if change is None:
            return self
        found = self._refits.get(change)
        if found is None:
            found = self._refits.setdefault(change, StateDef(_ensembles.apply(self.specs, change), self.names))
        return found

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"StateDef({len(self.specs)} variables, {len(self.names)} initialized)"

    def __eq__(self, other: object) -> bool:
        return self is other or (
            isinstance(other, StateDef)
            and self._hash == other._hash
            and self.names == other.names
            and self.specs == other.specs
        )


def register(cls: type) -> type:
    """Register `cls`, a State class, as a pytree: its values the leaves, its `StateDef` the aux data.

    `cls` has ``_values`` (name -> value, in ``_layout.names`` order), ``_layout`` (its StateDef)
    and ``cls._make(layout, values)``.

    Returns:
      `cls`, registered (a class decorator).

    >>> jax.tree.leaves(jstate.State({"a": jnp.ones(2)}))
    [Array([1., 1.], dtype=float32)]
    """
    make = cls._make

    def flatten(state):
        return tuple(state._values.values()), state._layout

    def flatten_with_keys(state):
        return tuple((jax.tree_util.DictKey(n), v) for n, v in state._values.items()), state._layout

    def unflatten(layout: StateDef, leaves: Iterable[Any]):
        leaves = tuple(leaves)
        # `jax.vmap` builds its output State from the aux data of the State its function returned,
        # one member's declarations, and values with the batch axis in front (and the reverse inside
        # the function): where the first value's shape is not its declared one, the declarations
        # follow the values' leading axes. One comparison on every other call (each `jax.jit` call).
        if leaves and getattr(leaves[0], "shape", layout._first) != layout._first:
            layout = layout.refit(leaves)
        return make(layout, dict(zip(layout.names, leaves)))

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return cls
