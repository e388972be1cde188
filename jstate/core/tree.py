"""Pytrees <-> flat ``{"a/b/c": leaf}`` dicts: how any training pytree (nested dicts, optax
states, Flax variables, NNX states) becomes named variables, and back.

These work on plain mappings, not on `State`, so `State` can build on them (and `jstate.to_nnx`
can take a State, which is a mapping).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from .errors import InvalidNameError
from .names import SEP

_NOT_NESTABLE = (
    "Cannot nest the variables into a tree: '{leaf}' holds a value and is also the scope of '{inside}'. "
    "Rename one (e.g. `state.rename({{'{leaf}': '{leaf}/value'}})`), or use the State as a flat mapping."
)


def path_name(path: jax.tree_util.KeyPath) -> str:
    """The variable name of a tree path: its keys joined by "/" (``{"a": [x]}`` -> ``"a/0"``)."""
    return jax.tree_util.keystr(path, simple=True, separator=SEP)


def flatten(tree: Any) -> dict[str, Any]:
    """``{name: leaf}`` of any pytree, names from `path_name`; `jax.ShapeDtypeStruct` is a leaf.

    >>> flatten({"a": {"b": 1}, "c": [2, 3]})
    {'a/b': 1, 'c/0': 2, 'c/1': 3}
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    flat = {path_name(path): leaf for path, leaf in leaves}
    if len(flat) < len(leaves):  # {"a/b": x, "a": {"b": y}}: one name for two leaves would lose one
        seen: set[str] = set()
        for path, _ in leaves:
            name = path_name(path)
            if name in seen:
                raise InvalidNameError(
                    f"Two leaves of the tree are both named '{name}' (a key holding '/' and a nested path). "
                    "Rename one: every leaf needs a name of its own."
                )
            seen.add(name)
    return flat


def unflatten(flat: Mapping[str, Any], like: Any = None) -> Any:
    """The inverse of `flatten`: nested dicts by default, or the structure of `like`.

    Args:
      flat: ``{name: leaf}``.
      like: any pytree; each of its leaves is replaced by ``flat[its path name]``.

    >>> unflatten({"a/b": 1, "c": 2})
    {'a': {'b': 1}, 'c': 2}
    >>> unflatten({"0": "x", "1": "y"}, like=(0, 0))
    ('x', 'y')
    """
    if like is None:
        from flax import traverse_util  # (flax's package import costs ~0.15 s: not at `import jstate`)

        check_nestable(flat)
        return traverse_util.unflatten_dict(dict(flat), sep=SEP)
    return jax.tree_util.tree_map_with_path(lambda path, _: flat[path_name(path)], like)


def check_nestable(names: Any) -> None:
    """Raise `InvalidNameError` if a name is also the scope of another ("a" and "a/b"): nested
    dicts cannot hold both.

    >>> check_nestable(["a/b", "a/c", "ab"])
    >>> check_nestable(["a", "a/b"])
    Traceback (most recent call last):
    ...
    jstate.core.errors.InvalidNameError: Cannot nest the variables into a tree: 'a' holds a value and is also the scope of 'a/b'. ...
    """
    known = set(names)
    for name in sorted(known):
        parts = name.split(SEP)
        for i in range(1, len(parts)):
            leaf = SEP.join(parts[:i])
            if leaf in known:
                raise InvalidNameError(_NOT_NESTABLE.format(leaf=leaf, inside=name))


def from_nnx(source: Any) -> dict[str, Any]:
    """``{name: array}`` of an NNX module or `nnx.State`, named by their paths."""
    from flax import nnx  # NNX is imported only by code that uses it

    if isinstance(source, nnx.Module):
        source = nnx.state(source)
    return flatten(nnx.to_pure_dict(source))


def to_nnx(flat: Mapping[str, Any]) -> Any:
    """An `nnx.State` of ``{name: array}`` (a State too), for ``nnx.update(module, ...)``.

    Path parts that are numbers (list indices, ``"layers/0/kernel"``) become ints, as NNX
    expects.
    """
    from flax import nnx

    return nnx.State(to_nnx_pure(flat))


def to_nnx_pure(flat: Mapping[str, Any]) -> dict:
    """The nested dict NNX calls a pure dict (``nnx.to_pure_dict``'s form) of ``{name: array}``."""
    from flax import traverse_util

    check_nestable(flat)
    nested = {tuple(int(p) if p.isdigit() else p for p in n.split(SEP)): v for n, v in flat.items()}
    return traverse_util.unflatten_dict(nested)
