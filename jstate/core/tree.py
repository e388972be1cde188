"""Pytrees <-> flat ``{"a/b/c": leaf}`` dicts: how any training pytree (nested dicts, optax
states, Flax variables, NNX states) becomes named variables, and back.

These work on plain mappings, not on `State`, so `State` can build on them. The NNX conversions
are here once, one per direction: `State.from_nnx` makes a State of `from_nnx`'s names, and
`jstate.to_nnx` is `to_nnx` (a State is a mapping).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax

from .errors import InvalidNameError
from .names import SEP

_TWICE = (
    "Two leaves of the tree are both named '{name}' (a key holding '/' and a nested path). "
    "Rename one: every leaf needs a name of its own."
)
_NOT_NESTABLE = (
    "Cannot nest the variables into a tree: '{leaf}' holds a value and is also the scope of '{inside}'. "
    "Rename one (e.g. `state.rename({{'{leaf}': '{leaf}/value'}})`), or use the State as a flat mapping."
)


def path_name(path: jax.tree_util.KeyPath) -> str:
    """The variable name of a tree path: its keys joined by "/".

    >>> path_name((jax.tree_util.DictKey("a"), jax.tree_util.SequenceKey(0)))  # {"a": [x]}'s x
    'a/0'
    """
    return jax.tree_util.keystr(path, simple=True, separator=SEP)


def flatten(tree: Any) -> dict[str, Any]:
    """``{name: leaf}`` of any pytree, each leaf named by its path (`path_name`).

    Args:
      tree: any pytree; a `jax.ShapeDtypeStruct` is a leaf.

    Returns:
      The leaves by name, in the tree's leaf order.

    Raises:
      InvalidNameError: two leaves have the same name (see `check_unique`).

    >>> flatten({"a": {"b": 1}, "c": [2, 3]})
    {'a/b': 1, 'c/0': 2, 'c/1': 3}
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    flat = {path_name(path): leaf for path, leaf in leaves}
    if len(flat) < len(leaves):
        check_unique([path_name(path) for path, _ in leaves])
    return flat


def check_unique(names: Iterable[str]) -> None:
    """Raise if two leaves of a tree have the same name: one name for two leaves would lose one.

    ``{"a/b": x, "a": {"b": y}}`` names both leaves "a/b".

    Args:
      names: the name of every leaf, in tree order.

    Raises:
      InvalidNameError: naming the first name given twice.

    >>> check_unique(["a/b", "c"])
    >>> check_unique(["a/b", "a/b"])
    Traceback (most recent call last):
    ...
    jstate.core.errors.InvalidNameError: Two leaves of the tree are both named 'a/b' (a key holding '/' and a nested path). ...
    """
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise InvalidNameError(_TWICE.format(name=name))
        seen.add(name)


def unflatten(flat: Mapping[str, Any], like: Any = None) -> Any:
    """The inverse of `flatten`: nested dicts by default, or the structure of `like`.

    Args:
      flat: ``{name: leaf}``.
      like: any pytree; each of its leaves is replaced by ``flat[its path name]``.

    Returns:
      Nested dicts split at "/", or a pytree of `like`'s structure.

    Raises:
      InvalidNameError: without `like`, a name is also the scope of another (`check_nestable`).
      KeyError: a leaf of `like` names no entry of `flat`.

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
    """Raise if a name is also the scope of another ("a" and "a/b"): nested dicts cannot hold both.

    Raises:
      InvalidNameError: naming both, and how to rename one.

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
    """``{name: array}`` of an NNX module or `nnx.State`, each variable named by its path.

    The one conversion from NNX: `jstate.from_nnx` (`State.from_nnx`) makes a State of it.

    Args:
      source: an `nnx.Module` or `nnx.State`.

    Returns:
      The arrays by "/"-joined path (list indices as numbers: ``"layers/0/kernel"``).

    >>> from flax import nnx
    >>> sorted(from_nnx(nnx.Linear(2, 3, rngs=nnx.Rngs(0))))
    ['bias', 'kernel']
    """
    from flax import nnx  # NNX is imported only by code that uses it

    if isinstance(source, nnx.Module):
        source = nnx.state(source)
    return flatten(nnx.to_pure_dict(source))


def to_nnx(state: Mapping[str, Any]) -> Any:
    """A State's initialized variables as an `nnx.State`, for ``nnx.update(module, ...)``.

    The one conversion to NNX (`State.to_nnx` calls it); any ``{name: array}`` mapping works.

    Args:
      state: a `State`, or any mapping of "/"-joined names to arrays.

    Returns:
      An `nnx.State` nested by name; path parts that are numbers (``"layers/0/kernel"``) become
      ints, as NNX expects.

    Raises:
      InvalidNameError: a name is also the scope of another (see `check_nestable`).

    >>> from flax import nnx
    >>> layer = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> nnx.update(layer, jstate.to_nnx(jstate.from_nnx(layer).assign("bias", 1.0)))
    >>> layer.bias[...]
    Array([1., 1., 1.], dtype=float32)
    """
    from flax import nnx

    return nnx.State(to_nnx_pure(state))


def to_nnx_pure(flat: Mapping[str, Any]) -> dict:
    """``{name: array}`` nested as NNX's pure dicts (``nnx.to_pure_dict``'s form), int keys for numbers.

    What `to_nnx` wraps, and what ``nnx.replace_by_pure_dict`` takes.

    >>> to_nnx_pure({"layers/0/w": 1, "b": 2})
    {'layers': {0: {'w': 1}}, 'b': 2}
    """
    from flax import traverse_util

    check_nestable(flat)
    nested = {tuple(int(p) if p.isdigit() else p for p in n.split(SEP)): v for n, v in flat.items()}
    return traverse_util.unflatten_dict(nested)
