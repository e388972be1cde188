"""Any pytree a training loop holds, as the one flat State a save or restore works on, and back.

`Saver.save` and `Saver.restore` take a State or any pytree: a dict of States, an optax state, a
Flax ``TrainState``, an NNX state or module, with jax or NumPy arrays, Python numbers and PRNG
keys as leaves. `as_state` names each leaf by its tree path joined with "/" (a State inside
contributes its own names under its key: ``{"model": state}`` holds ``"model/weights"``);
`like` puts restored values back into the target's own structure.

A tree that is one leaf (a bare array or number) holds one variable, named `LEAF` ("value"); it
restores from that entry, or from the one entry of a checkpoint holding one, whatever its name
(Orbax's own bare arrays: ``''`` from ``PyTreeCheckpointer``, ``'checkpoint'`` from ``ArraySave``).
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Any, TypeVar

import jax
import numpy as np

from ..core import tree as _tree
from ..core.names import join
from ..core.tree import path_name
from ..model.state import State

T = TypeVar("T")

LEAF = "value"  # the name of the one variable of a tree that is a single leaf (a bare array)

# Python's own numbers (numpy's float64 subclasses float: not one of them), as Orbax returns them
_NUMBERS = (bool, int, float, complex)

_FUNCTION = (
    "{where}the function `{name}`, where a State or pytree of arrays belongs: a model function only "
    "declares variables. Restore into `jstate.abstract({name})` (its variables, no values yet), and save the "
    "State that `jstate.init({name}, key)` returns."
)


def _is_leaf(x: Any) -> bool:
    """Whether `x` is one leaf of a tree to save: a State, a struct or an NNX state or module."""
    return isinstance(x, (State, jax.ShapeDtypeStruct)) or _is_nnx(x)


def _is_nnx(x: Any) -> bool:
    """An NNX state or module (whose variables are named as `jstate.from_nnx` names them)."""
    nnx = sys.modules.get("flax.nnx")  # not imported here: a program without NNX has none
    return nnx is not None and isinstance(x, (nnx.State, nnx.Module))


def as_state(tree: Any) -> State:
    """Any pytree as one State: leaves named by tree path, a State's variables under its key.

    Args:
      tree: a State (returned as it is), an NNX state or module, or any pytree of arrays,
        numbers, `jax.ShapeDtypeStruct` leaves, States and NNX states.

    Returns:
      One State holding every leaf under its name.

    Raises:
      InvalidNameError: two leaves get the same name (a key holding "/" and a nested path).
      TypeError: a function where values belong (a model function instead of its State).

    >>> as_state({"model": state, "step": 3}).specs.keys()
    dict_keys(['model/biases', 'model/layer1/kernel', 'model/w2', 'model/weights', 'step'])
    """
    if isinstance(tree, State):
        return tree
    if _is_nnx(tree):
        return State.from_nnx(tree)
    parts, leaves, names = [], {}, []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)[0]:
        prefix = _name(path)
        if inspect.isfunction(leaf) or inspect.ismethod(leaf) or isinstance(leaf, functools.partial):
            where = f"Leaf '{prefix}' is " if path else "Got "
            raise TypeError(_FUNCTION.format(where=where, name=getattr(leaf, "__name__", "model")))
        if _is_nnx(leaf):
            leaf = State.from_nnx(leaf)
        if isinstance(leaf, State):
            parts.append(leaf.rename({n: join(prefix, n) for n in leaf.specs}))
            names += parts[-1].specs
        else:
            leaves[prefix] = leaf
            names.append(prefix)
    _tree.check_unique(names)
    return functools.reduce(State.merge, parts, State.from_tree(leaves, flat=True))


def is_one_leaf(tree: Any) -> bool:
    """Whether `tree` is a bare leaf (an array, struct or number): its one variable is `LEAF`.

    >>> is_one_leaf(jnp.ones(3)), is_one_leaf(0.5), is_one_leaf({"value": jnp.ones(3)}), is_one_leaf(state)
    (True, True, False, False)
    """
    if isinstance(tree, State) or _is_nnx(tree):
        return False
    return jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(tree, is_leaf=_is_leaf))


def _name(path: jax.tree_util.KeyPath) -> str:
    """A leaf's variable name: its tree path, `LEAF` for a tree that is one leaf."""
    return path_name(path) if path else LEAF


def python_numbers(tree: Any) -> frozenset[str]:
    """The names of `tree`'s leaves that are Python numbers, or were (a weakly typed array or
    struct: what ``jax.eval_shape`` makes of a Python number), as `as_state` names them.

    >>> sorted(python_numbers({"step": 3, "lr": jax.eval_shape(lambda: 0.1), "w": jnp.ones(2)}))
    ['lr', 'step']
    """
    if isinstance(tree, State) or _is_nnx(tree):
        return frozenset()
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)[0]
    return frozenset(_name(path) for path, x in leaves if type(x) in _NUMBERS or getattr(x, "weak_type", False) is True)


def like(target: T, restored: State, exact: dict[str, np.ndarray] | None = None) -> T:
    """`restored` in the structure of `target` (see `as_state`); leaves it lacks stay as they are.

    Args:
      target: the tree `restored` was made from by `as_state`; it is left unchanged.
      restored: a State holding values under the names `as_state` gave the target's leaves.
      exact: values as stored, by name, for those JAX narrowed (a float64 learning rate): a
        Python number in `target` gets the stored value back.

    Returns:
      A new tree of `target`'s structure: NNX states keep their Variable types, States get the
      restored values of their own variables, a Python number the restored number, of its type
      (as Orbax returns it), other leaves the restored value of their name.

    >>> tree = {"model": state, "step": 3}
    >>> restored = like(tree, as_state(tree).assign({"step": 4}))
    >>> int(restored["step"]), type(restored["model"]).__name__
    (4, 'State')
    """

    def leaf(path: jax.tree_util.KeyPath, x: Any) -> Any:
        prefix = path_name(path) if isinstance(x, State) or _is_nnx(x) else _name(path)  # a State: its own names
        if type(x) in _NUMBERS and prefix in restored:
            return type(x)((exact or {}).get(prefix, restored[prefix]).item())
        if _is_nnx(x):  # a new nnx.State with the restored values, its Variable types kept
            from flax import nnx

            state = jax.tree.map(lambda v: v, nnx.state(x) if isinstance(x, nnx.Module) else x)
            mine = {n: restored[join(prefix, n)] for n in _tree.from_nnx(x) if join(prefix, n) in restored}
            nnx.replace_by_pure_dict(state, _tree.to_nnx_pure(mine))
            return state
        if isinstance(x, State):
            return x._replace_values({n: restored[join(prefix, n)] for n in x.specs if join(prefix, n) in restored})
        return restored.get(prefix, x)

    if _is_nnx(target):
        return leaf((), target)
    return jax.tree_util.tree_map_with_path(leaf, target, is_leaf=_is_leaf)
