"""Any pytree a training loop holds, as the one flat State a save or restore works on, and back.

`Saver.save` and `Saver.restore` take a State or any pytree: a dict of States, an optax state, a
Flax ``TrainState``, an NNX state or module, with jax or NumPy arrays, Python numbers and PRNG
keys as leaves. `as_state` names each leaf by its tree path joined with "/" (a State inside
contributes its own names under its key: ``{"model": state}`` holds ``"model/weights"``);
`like` puts restored values back into the target's own structure.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, TypeVar

import jax

from ..core import tree as _tree
from ..core.names import join
from ..core.tree import path_name
from ..model.state import State

T = TypeVar("T")


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

    >>> as_state({"model": state, "step": 3}).specs.keys()
    dict_keys(['model/biases', 'model/layer1/kernel', 'model/w2', 'model/weights', 'step'])
    """
    if isinstance(tree, State):
        return tree
    if _is_nnx(tree):
        return State.from_nnx(tree)
    parts, leaves, names = [], {}, []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)[0]:
        prefix = path_name(path)
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


def like(target: T, restored: State) -> T:
    """`restored` in the structure of `target` (see `as_state`); leaves it lacks stay as they are.

    Args:
      target: the tree `restored` was made from by `as_state`; it is left unchanged.
      restored: a State holding values under the names `as_state` gave the target's leaves.

    Returns:
      A new tree of `target`'s structure: NNX states keep their Variable types, States get the
      restored values of their own variables, other leaves the restored value of their name.

    >>> tree = {"model": state, "step": 3}
    >>> restored = like(tree, as_state(tree).assign({"step": 4}))
    >>> int(restored["step"]), type(restored["model"]).__name__
    (4, 'State')
    """

    def leaf(path: jax.tree_util.KeyPath, x: Any) -> Any:
        prefix = path_name(path)
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
