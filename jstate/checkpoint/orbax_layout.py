"""`Saver(layout="orbax")`: checkpoints that plain Orbax restores into the user's own tree.

jstate's own layout keys Orbax's tree by checkpoint name (``{"opt/0/mu/w": ...}``) and packs
small variables together: fast, but plain Orbax restores it only as that flat dict. The Orbax
layout instead gives Orbax the tree the user saved (their dicts, tuples, optax states, Flax
``TrainState``), unpacked, in the directory a CheckpointManager reads:

  ckpt/model_400/          the step, named as ``CheckpointManagerOptions(step_prefix="model")`` names it
    jstate.json            jstate's manifest (checksums, the commit), as in jstate's layout
    default/               a plain Orbax PyTree checkpoint: a CheckpointManager's one item

so that ``ocp.StandardCheckpointer().restore("ckpt/model_400/default", target)`` and
``ocp.CheckpointManager("ckpt", options=ocp.CheckpointManagerOptions(step_prefix="model"))``
read it, while jstate reads it with all its checks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax

from ..core import tree as _tree
from ..core.arguments import bad
from ..core.errors import ArgumentError, CheckpointError, InvalidNameError, shorten
from ..core.tree import path_name
from ..model.state import State
from .adapters import _is_leaf, _is_nnx

LAYOUTS = ("jstate", "orbax")
STEP_SEPARATOR = "_"  # Orbax's: ``<step_prefix>_<step>`` (jstate's own layout names ``<prefix>-<step>``)

_BARE = (
    "Saver(layout='orbax') cannot save a bare {what}: the Orbax layout's item is a tree of arrays, and "
    "Orbax's StandardCheckpointer, which reads it, refuses single arrays and numbers. Save it in a dict, "
    "`saver.save({{'value': x}}, path)`, which both restore into a target `{{'value': ...}}`; or save it with "
    "jstate's own layout (the default), which holds a bare {what}. Nothing was written."
)
_ALL_EMPTY = (
    "Saver(layout='orbax') cannot save {names}: every array it would save is zero-size, Orbax stores no "
    "zero-size array, and a checkpoint without any would have no item for plain Orbax to restore. Save at "
    "least one non-empty array, or use jstate's own layout (the default), which records zero-size arrays by "
    "shape and dtype. Nothing was written."
)


def check_layout(layout: str, pack: bool | int) -> bool | int:
    """The `pack` a Saver of `layout` uses: in the Orbax layout every variable keeps its own key,
    so nothing is packed (`pack` True, its default, packs nothing there).

    Raises:
      ArgumentError: an unknown layout, or a packing size asked of the Orbax layout.

    >>> check_layout("orbax", True), check_layout("jstate", True)
    (False, True)
    """
    if layout not in LAYOUTS:
        raise bad("Saver(layout=...)", layout, "'jstate' or 'orbax' ('jstate' is the default)")
    if layout != "orbax":
        return pack
    if pack is not True and pack:
        raise ArgumentError(
            f"Saver(layout='orbax', pack={pack!r}): the Orbax layout stores each variable under its own key, "
            "as plain Orbax restores it; packing would hide small ones in shared arrays. Leave `pack` out."
        )
    return False


def nesting(saved: Any, names: dict[str, str], arrays: Mapping[str, Any]) -> Callable[[dict[str, jax.Array]], Any]:
    """How the Orbax layout arranges the arrays of a save: a function of ``{checkpoint name:
    array}`` (those Orbax stores) giving the tree to write. Called before anything is written:
    what the layout cannot hold is refused here, not found missing after the commit.

    Where `saved` is a pytree whose variables keep their own names (`names` maps each to
    itself), the tree is `saved`'s own, with its tuples, NamedTuples and dataclasses, which plain
    Orbax restores into a target of that structure; the leaves not stored are None (an empty
    node, as Orbax writes None). Otherwise (a State, renamed variables) nested dicts split at "/".

    Args:
      saved: what `Saver.save` was given.
      names: ``{State name: checkpoint name}`` of the variables saved by name.
      arrays: every array saved, by checkpoint name (those written through transforms too).

    Raises:
      InvalidNameError: a checkpoint name is also the scope of another ("a" and "a/b"), which
        nested keys cannot hold both of.
      CheckpointError: `saved` is a bare array or number (Orbax's StandardCheckpointer holds
        none: its tree would be the leaf itself), or every array is zero-size (Orbax stores
        none, so there would be no item for Orbax to read).

    >>> ones = {n: jnp.ones(2) for n in ("w", "opt/0", "opt/1")}
    >>> nest = nesting({"w": 0, "opt": (1, 2)}, {n: n for n in ones}, ones)
    >>> nest({"w": "W", "opt/0": "A"})
    {'opt': ('A', None), 'w': 'W'}
    >>> nesting(state, {n: n for n in state}, state)({n: 0 for n in state})["layer1"]
    {'kernel': 0}
    >>> nesting(jnp.ones(3), {"value": "value"}, {"value": jnp.ones(3)})
    Traceback (most recent call last):
    ...
    jstate.core.errors.CheckpointError: Saver(layout='orbax') cannot save a bare array: ...
    """
    stored = list(arrays)
    try:
        _tree.check_nestable(stored)
    except InvalidNameError as e:
        raise InvalidNameError(
            f"Saver(layout='orbax') cannot save these variables. {e} (jstate's own layout, the default, holds both.)"
        ) from None
    own = (
        not isinstance(saved, State)
        and not any(_is_nnx(x) for x in jax.tree_util.tree_leaves(saved, is_leaf=_is_leaf))
        and all(n == c for n, c in names.items())
        and set(stored) == set(names.values())
    )
    if own and jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(saved, is_leaf=_is_leaf)):
        # Its tree would be the leaf itself, whose path names no key to write it under.
        raise CheckpointError(_BARE.format(what="array" if hasattr(saved, "shape") else "number"))
    if not any(a.size for a in arrays.values()):
        raise CheckpointError(_ALL_EMPTY.format(names=shorten(stored)))

    def nest(arrays: dict[str, jax.Array]) -> Any:
        if not own:
            return _tree.unflatten(arrays)

        def leaf(path: jax.tree_util.KeyPath, value: Any) -> Any:
            name = path_name(path)
            if isinstance(value, State):  # a State inside the tree: its variables, nested, under its key
                inside = {n[len(name) + 1 :]: a for n, a in arrays.items() if n.startswith(name + "/")}
                return _tree.unflatten(inside) if inside else None
            return arrays.get(name)

        return jax.tree_util.tree_map_with_path(leaf, saved, is_leaf=_is_leaf)

    return nest
