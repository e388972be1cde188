"""Transforms applied: what a restore reads through a `jstate.transforms.Transform` and what a
save writes back through it.

`jstate.transforms` is the language a Saver's rules are written in (the `Transform` values and
how they print); this module runs it. The same functions serve NumPy (restoring, on the host) and
jax.numpy (shapes, through `jax.eval_shape`; saving, on the devices): `struct` checks a rule
against a checkpoint before anything is read, `evaluate` computes a value from the entries, and
`invert` gives the entries that restore to a State's values (a Saver's export).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..transforms import Transform, brief, count


def apply(t: Transform, xp: Any, inputs: list[Any]) -> Any:
    """The value (a tuple of them for split/unstack) of `t` given its inputs' values, with the
    array module `xp` (numpy or jax.numpy).

    >>> apply(T.transpose("w"), np, [np.zeros((2, 3))]).shape
    (3, 2)
    """
    (x, *_), args = inputs or [None], t.args
    if t.op == "reshape":
        return xp.reshape(x, args[0])
    if t.op == "transpose":
        return xp.transpose(x, args[0])
    if t.op == "cast":
        return x.astype(args[0])
    if t.op == "stack":
        return xp.stack(inputs, axis=args[0])
    if t.op == "concat":
        return xp.concatenate(inputs, axis=args[0])
    if t.op == "split":
        return tuple(xp.split(x, args[0], axis=args[1]))
    if t.op == "unstack":
        return tuple(xp.moveaxis(x, args[0], 0))
    if t.op == "part":
        return x[args[0]]
    raise AssertionError(t.op)


def evaluate(t: Transform, read: Callable[[str], Any], xp: Any, memo: dict) -> Any:
    """`t`'s value, its entries from `read(name)`; `memo` keeps values shared between transforms.

    >>> entries = {"a": np.ones(2), "b": np.zeros(2)}
    >>> evaluate(T.stack(["a", "b"], axis=1), entries.__getitem__, np, {}).tolist()
    [[1.0, 0.0], [1.0, 0.0]]
    """
    if t not in memo:
        if t.op == "entry":
            memo[t] = read(t.args[0])
        else:
            memo[t] = apply(t, xp, [evaluate(i, read, xp, memo) for i in t.inputs])
    return memo[t]


def struct(t: Transform, entries: dict[str, jax.ShapeDtypeStruct], memo: dict) -> Any:
    """`t`'s shape and dtype (a tuple of them for split/unstack) from its entries', computed by
    `jax.eval_shape` on the jax.numpy version; dtypes follow NumPy's rules (JAX would narrow
    64-bit ones).

    >>> struct(T.split("qkv", 3, axis=-1)[0], {"qkv": jax.ShapeDtypeStruct((8, 24), np.float64)}, {})
    ShapeDtypeStruct(shape=(8, 8), dtype=float64)
    """
    if t in memo:
        return memo[t]
    if t.op == "entry":
        out = entries[t.args[0]]
    elif t.op == "part":
        parts, (index, named) = struct(t.inputs[0], entries, memo), t.args
        if named is not None and named != len(parts):
            raise ValueError(f"{brief(t.inputs[0])} has {len(parts)} parts, and the rule names {named} State variables")
        if not -len(parts) <= index < len(parts):
            raise ValueError(f"{brief(t.inputs[0])} has {len(parts)} parts, so no part [{index}]")
        out = parts[index]
    else:
        ins = [struct(i, entries, memo) for i in t.inputs]
        shapes = jax.eval_shape(
            lambda *xs: apply(t, jnp, list(xs)), *(jax.ShapeDtypeStruct(s.shape, jnp.float32) for s in ins)
        )
        dtype = _dtype(t, [s.dtype for s in ins])
        if t.op == "unstack" and t.args[1] is not None and t.args[1] != len(shapes):
            raise ValueError(
                f"{brief(t)} expects {t.args[1]} parts, and its input has {len(shapes)} along axis {t.args[0]}"
            )
        if t.multi:
            out = tuple(jax.ShapeDtypeStruct(s.shape, dtype) for s in shapes)
        else:
            out = jax.ShapeDtypeStruct(shapes.shape, dtype)
    memo[t] = out
    return out


def _dtype(t: Transform, dtypes: list[np.dtype]) -> np.dtype:
    if t.op == "cast":
        return np.dtype(jnp.dtype(t.args[0]))
    return np.result_type(*dtypes) if len(dtypes) > 1 else np.dtype(dtypes[0])


class NotInvertible(ValueError):
    """Saving through a transform needs what the restore direction left out (a saved shape)."""


def invert(targets: dict[str, tuple[Transform, Any]]) -> dict[str, Any]:
    """The checkpoint entries whose transforms give the values of `targets` (``{variable:
    (transform, value)}``), computed with jax.numpy: what a save writes so that restoring
    through the transforms gives the values back. The parts of a split or unstack are joined
    once every part is there.

    Raises:
      NotInvertible: a reshape or concat without its saved shape or sizes, parts of a split or
        unstack missing, or two variables for one entry or part (naming them).

    >>> qkv = T.split("qkv", 3, axis=-1)
    >>> invert({n: (qkv[i], jnp.full((2, 1), i)) for i, n in enumerate("qkv")})["qkv"].tolist()
    [[0, 1, 2], [0, 1, 2]]
    """
    out: dict[str, tuple[str, Any]] = {}  # entry: (the variable it comes from, value)
    parts: dict[Transform, dict[int, tuple[str, Any]]] = {}
    named: dict[Transform, int | None] = {}  # how many parts the rules taking them name (a tuple: all)
    todo = [(t, value, name) for name, (t, value) in targets.items()]
    while todo:
        t, value, name = todo.pop()
        if t.op == "entry":
            if t.args[0] in out:
                raise NotInvertible(
                    f"variables '{out[t.args[0]][0]}' and '{name}' would both be saved as checkpoint entry "
                    f"'{t.args[0]}'; save one of them with another Saver"
                )
            out[t.args[0]] = (name, value)
        elif t.op == "part":
            parent, (index, of) = t.inputs[0], t.args
            if index < 0:
                raise NotInvertible(f"saving through {brief(t)} (the rule for '{name}') needs a part index >= 0")
            got = parts.setdefault(parent, {})
            if index in got:
                raise NotInvertible(
                    f"variables '{got[index][0]}' and '{name}' are both {brief(t)}; only one of them can be saved there"
                )
            got[index] = (name, value)
            named[parent] = named.get(parent) or of
        else:
            todo += [(i, v, name) for i, v in zip(t.inputs, _inverse(t, value))]
        if not todo:  # every single-output chain is done: join the parts that are complete
            for parent, got in list(parts.items()):
                if sorted(got) == list(range(count(parent) or named[parent] or -1)):
                    del parts[parent]
                    joined = [got[i][1] for i in sorted(got)]
                    axis = parent.args[1] if parent.op == "split" else parent.args[0]
                    whole = jnp.concatenate(joined, axis) if parent.op == "split" else jnp.stack(joined, axis)
                    todo.append((parent.inputs[0], whole, got[0][0]))
    for parent, got in parts.items():
        raise NotInvertible(_incomplete(parent, got, count(parent) or named[parent]))
    return {entry: value for entry, (_, value) in out.items()}


def _incomplete(parent: Transform, got: dict[int, tuple[str, Any]], parts: int | None) -> str:
    """Why saving through some of `parent`'s parts would lose the others: every part is needed to
    write the entry whole (the tuple form names them all; parts named one by one may not)."""
    have = ", ".join(f"[{i}] from '{got[i][0]}'" for i in sorted(got))
    if parts is None:
        return (
            f"saving through {brief(parent)} writes its entry from the parts the rules name ({have}), and an "
            "unstack's number of parts is known only from a checkpoint, so a missing slice would be dropped "
            "silently. Give the count, `T.unstack(..., parts=N)`, or name every part in one rule: "
            "`((name_0, ..., name_n), T.unstack(...))`"
        )
    missing = [i for i in range(parts) if i not in got]
    return (
        f"saving through {brief(parent)} needs all its parts, and got only parts {sorted(got)} ({have}): "
        f"part(s) {missing} of {parts} missing. Add a rule for each missing part, or save the entry by name"
    )


def _inverse(t: Transform, value: Any) -> list[Any]:
    """The inputs of single-output `t` that give `value`."""
    args = t.args
    if t.op == "reshape":
        if args[1] is None:
            raise NotInvertible(f"saving through {brief(t)} needs the saved shape: reshape(..., saved_shape=...)")
        return [jnp.reshape(value, args[1])]
    if t.op == "transpose":
        axes = args[0] if args[0] is not None else tuple(reversed(range(value.ndim)))
        return [jnp.transpose(value, np.argsort([a % value.ndim for a in axes]))]
    if t.op == "cast":
        return [value if args[1] is None else value.astype(args[1])]
    if t.op == "stack":
        return [jnp.take(value, i, axis=args[0]) for i in range(len(t.inputs))]
    if t.op == "concat":
        if args[1] is None:
            raise NotInvertible(f"saving through {brief(t)} needs each input's size: concat(..., sizes=[...])")
        return jnp.split(value, np.cumsum(args[1])[:-1], axis=args[0])
    raise AssertionError(t.op)
