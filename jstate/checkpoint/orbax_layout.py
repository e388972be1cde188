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

from collections.abc import Callable
from typing import Any

import jax

from ..core import tree as _tree
from ..core.errors import InvalidNameError
from ..core.tree import path_name
from ..model.state import State
from .adapters import _is_leaf, _is_nnx

LAYOUTS = ("jstate", "orbax")
STEP_SEPARATOR = "_"  # Orbax's: ``<step_prefix>_<step>`` (jstate's own layout names ``<prefix>-<step>``)


def check_layout(layout: str, pack: bool | int) -> bool | int:
    """The `pack` a Saver of `layout` uses: in the Orbax layout every variable keeps its own key,
    so nothing is packed (`pack` True, its default, packs nothing there).

    Raises:
      ValueError: an unknown layout, or a packing size asked of the Orbax layout.

    >>> check_layout("orbax", True), check_layout("jstate", True)
    (False, True)
    """
    if layout not in LAYOUTS:
        raise ValueError(f"Saver: `layout` is 'jstate' or 'orbax', got {layout!r}.")
    if layout != "orbax":
        return pack
    if pack is not True and pack:
        raise ValueError(
            f"Saver(layout='orbax', pack={pack!r}): the Orbax layout stores each variable under its own key, "
            "as plain Orbax restores it; packing would hide small ones in shared arrays. Leave `pack` out."
        )
    return False


def nesting(saved: Any, names: dict[str, str], stored: list[str]) -> Callable[[dict[str, jax.Array]], Any]:
    """How the Orbax layout arranges the arrays of a save: a function of ``{checkpoint name:
    array}`` (those Orbax stores) giving the tree to write.

    Where `saved` is a pytree whose variables keep their own names (`names` maps each to
    itself), the tree is `saved`'s own, with its tuples, NamedTuples and dataclasses, which plain
    Orbax restores into a target of that structure; the leaves not stored are None (an empty
    node, as Orbax writes None). Otherwise (a State, renamed variables) nested dicts split at "/".

    Args:
      saved: what `Saver.save` was given.
      names: ``{State name: checkpoint name}`` of the variables saved by name.
      stored: the checkpoint names of every array saved (those written through transforms too).

    Raises:
      InvalidNameError: a checkpoint name is also the scope of another ("a" and "a/b"), which
        nested keys cannot hold both of.

    >>> nest = nesting({"w": 0, "opt": (1, 2)}, {"w": "w", "opt/0": "opt/0", "opt/1": "opt/1"}, ["w", "opt/0", "opt/1"])
    >>> nest({"w": "W", "opt/0": "A"})
    {'opt': ('A', None), 'w': 'W'}
    >>> nesting(state, {n: n for n in state}, list(state))({n: 0 for n in state})["layer1"]
    {'kernel': 0}
    """
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
