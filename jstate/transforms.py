"""Checkpoints in another layout than the model's: stack, split, transpose, reshape, cast.

Real checkpoints rarely match a new model one to one: per-layer variables become one
scan-stacked array, a fused QKV kernel is split, a PyTorch kernel is transposed. A `Saver`
pairs a State name with a transform of checkpoint entries, in its `var_list` (State name first,
as in its regex rules); a tuple of State names takes the parts of a `split` or `unstack`::

  from jstate import transforms as T

  saver = jstate.Saver([
      "embed/",                                                         # as before: by name
      ("layers/kernel", T.stack([f"layers_{i}/kernel" for i in range(4)])),  # per-layer -> stacked
      (("attn/q", "attn/k", "attn/v"), T.split("attn/qkv", 3, axis=-1)),      # fused -> three
      ("dense/kernel", T.transpose("linear/weight")),                        # PyTorch's layout
      ("proj", T.cast(T.reshape("proj_flat", (64, 64)), "bfloat16")),        # composed
  ])
  state = saver.restore(path, jstate.abstract(model))
  print(saver.plan(path, jstate.abstract(model)))                            # what it would do

Strings are checkpoint names; every transform takes strings or other transforms. A restore
checks every input, shape and dtype before it reads anything (`Saver.plan` shows the same
checks as a table), then reads one target's entries at a time into host memory, applies the
transform with NumPy and places the result onto the target's sharding, so host memory peaks at
about one variable's inputs and result above the restored State.

Saving with the same Saver writes the inverse layout (export): `stack` unstacks, `split`
concatenates, `transpose` transposes back. `reshape` and `concat` need the saved shape or
sizes for that (``saved_shape=``, ``sizes=``), and a `cast` saves the State's dtype unless given
``saved_dtype=``.

>>> from jstate import transforms as T
>>> T.transpose(T.stack(["l0/w", "l1/w"]), (1, 0, 2))
transpose(stack(['l0/w', 'l1/w'], axis=0), axes=(1, 0, 2))
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from .core.arguments import bad, integer
from .core.errors import ArgumentError, MappingError
from .core.names import abbreviated

__all__ = ["Transform", "cast", "concat", "reshape", "split", "stack", "transpose", "unstack"]

Input = Union[str, "Transform"]
MAX_DEPTH = 100  # transforms nested in one another


class _NoPart(ArgumentError, IndexError):
    """An index past a split's or unstack's parts: also an `IndexError`, so that unpacking
    (``q, k, v = T.split("qkv", 3)``) stops where Python's sequence protocol expects."""


@dataclasses.dataclass(frozen=True)
class Transform:
    """A value computed from checkpoint entries. Build one with this module's functions.

    Equal transforms are one value: the parts of ``split("qkv", 3)`` in three rules are computed
    from one read of ``qkv``.

    Attributes:
      op: ``"entry"`` (a checkpoint entry, by name), ``"reshape"``, ``"transpose"``, ``"cast"``,
        ``"stack"``, ``"concat"``, ``"split"``, ``"unstack"`` or ``"part"`` (one output of a
        split or unstack).
      inputs: the transforms it is computed from.
      args: the op's parameters.

    >>> T.split("qkv", 3, axis=-1)[1]
    split('qkv', 3, axis=-1)[1]
    """

    op: str
    inputs: tuple[Transform, ...] = ()
    args: tuple = ()
    # How many transforms deep it is (an entry: 1); checked so that comparing, hashing and
    # printing one, all recursive, never meet Python's recursion limit.
    depth: int = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        depth = 1 + max((i.depth for i in self.inputs), default=0)
        if depth > MAX_DEPTH:
            raise MappingError(
                f"A `{self.op}` of transforms nested {depth} deep (from {self.entries()[:1]}): jstate takes at most "
                f"{MAX_DEPTH}, and real layouts need a handful. Compose fewer: one `transpose` with `axes`, one "
                "`reshape`."
            )
        object.__setattr__(self, "depth", depth)

    @property
    def multi(self) -> bool:
        """Whether it has several outputs (`split`, `unstack`): rules take its parts."""
        return self.op in ("split", "unstack")

    def __getitem__(self, index: int) -> Transform:
        return self._part(index)

    def _part(self, index: int, of: int | None = None) -> Transform:
        """Part `index`; `of`: how many parts the rule taking it names (checked against the
        checkpoint: an unstack's count depends on its input's shape)."""
        if not self.multi:
            raise TypeError(f"{brief(self)} has one output; only split and unstack have parts to index.")
        index, parts = operator.index(index), count(self)
        if parts is not None and not -parts <= index < parts:
            raise _NoPart(f"{brief(self)} has {parts} parts, so no part [{index}].")
        return Transform("part", (self,), (index % parts if parts is not None else index, of))

    def entries(self) -> list[str]:
        """The checkpoint entries it reads, in order.

        >>> T.concat(["a", T.transpose("b")], axis=0).entries()
        ['a', 'b']
        """
        if self.op == "entry":
            return [self.args[0]]
        return list(dict.fromkeys(n for i in self.inputs for n in i.entries()))

    def __repr__(self) -> str:
        if self.op == "entry":
            return repr(self.args[0])
        if self.op == "part":
            return f"{self.inputs[0]!r}[{self.args[0]}]"
        if self.op in ("stack", "concat"):
            inputs = "[" + ", ".join(map(repr, self.inputs)) + "]"
        else:
            inputs = repr(self.inputs[0])
        shown = [inputs] + [f"{k}={v!r}" if k else repr(v) for k, v in _named_args(self)]
        return f"{self.op}({', '.join(shown)})"


def describe(t: Transform, params: bool = True) -> str:
    """`t` as its repr without the checkpoint entries it reads (a plan's table lists those in a
    column of their own): each op once, with its parameters; an input that is an entry is ``_``,
    and the inputs are left out where all are entries.

    Args:
      t: the transform.
      params: with each op's parameters; without them (``cast(transpose(stack))``), the chain
        of ops alone, for a narrow column.

    >>> T.describe(T.transpose(T.stack([f"layers_{i}/kernel" for i in range(24)]), (1, 0, 2)))
    'transpose(stack(axis=0), axes=(1, 0, 2))'
    >>> T.describe(T.split("attn/qkv", 3, axis=-1)[1]), T.describe(T.concat(["q", T.transpose("k")]))
    ('split(3, axis=-1)[1]', 'concat([_, transpose], axis=0)')
    >>> T.describe(T.cast(T.transpose(T.stack(["a", "b"])), "bfloat16"), params=False)
    'cast(transpose(stack))'
    """
    if t.op == "entry":
        return "_"
    if t.op == "part":
        return f"{describe(t.inputs[0], params)}[{t.args[0]}]"
    shown = [] if all(i.op == "entry" for i in t.inputs) else [_described_inputs(t, params)]
    if params:
        shown += [f"{k}={v!r}" if k else repr(v) for k, v in _named_args(t)]
    return f"{t.op}({', '.join(shown)})" if shown else t.op


def _described_inputs(t: Transform, params: bool) -> str:
    inputs = [describe(i, params) for i in t.inputs]
    if t.op not in ("stack", "concat"):
        return inputs[0]
    if len(inputs) > 3:  # long lists by count: a plan row stays one line
        inputs = [inputs[0], f"... {len(inputs)} inputs"]
    return "[" + ", ".join(inputs) + "]"


BRIEF = 100  # a transform's repr longer than this is said in a message as its ops and its entries


def brief(t: Transform) -> str:
    """`t` for a message: its repr where that is short, else its ops (`describe`) and the entries
    it reads said once, a numbered run as a range with its count (a message naming 24 stacked
    layers by name would run to a thousand characters, and say them again in its table).

    >>> T.brief(T.transpose("w"))
    "transpose('w')"
    >>> T.brief(T.transpose(T.stack([f"encoder/block_{i}/dense/kernel" for i in range(24)]), (0, 2, 1)))
    'transpose(stack(axis=0), axes=(0, 2, 1)) of encoder/block_{0..23}/dense/kernel (24)'
    """
    shown = repr(t)
    return shown if len(shown) <= BRIEF else f"{describe(t)} of {abbreviated(t.entries())}"


def _named_args(t: Transform) -> list[tuple[str, Any]]:
    """The op's parameters as they are written, None ones left out."""
    names = _ARG_NAMES[t.op]
    return [(k, v) for k, v in zip(names, t.args) if v is not None]


_ARG_NAMES = {
    "reshape": ("", "saved_shape"),
    "transpose": ("axes",),
    "cast": ("", "saved_dtype"),
    "stack": ("axis",),
    "concat": ("axis", "sizes"),
    "split": ("", "axis"),
    "unstack": ("axis", "parts"),
}


def _input(x: Input) -> Transform:
    if isinstance(x, Transform):
        if x.multi:
            raise TypeError(f"{brief(x)} has several outputs: take one with [i], or give the rule a tuple of names.")
        return x
    if isinstance(x, str) and x:
        return Transform("entry", (), (x,))
    raise TypeError(f"A transform's input is a checkpoint name (str) or a transform, got {x!r}.")


def _shape(shape: int | Iterable[int] | None) -> tuple[int, ...] | None:
    """A shape (or axes, sizes) as a tuple of ints; one int is a 1-D shape, as in NumPy."""
    if shape is None:
        return None
    try:
        return (operator.index(shape),)
    except TypeError:
        return tuple(operator.index(d) for d in shape)


def reshape(x: Input, shape: Sequence[int], *, saved_shape: Sequence[int] | None = None) -> Transform:
    """`x` reshaped to `shape` (one dimension may be -1), as `numpy.reshape`.

    `saved_shape` is the shape saving writes back (needed only to save through it).

    >>> T.reshape("conv/kernel", (-1, 128))
    reshape('conv/kernel', (-1, 128))
    """
    shape, saved_shape = _shape(shape), _shape(saved_shape)
    for name, given in (("shape", shape), ("saved_shape", saved_shape)):
        if given is not None and -1 in given and (given.count(-1) > 1 or 0 in given):
            raise MappingError(
                f"reshape({x!r}, {name}={given}): a -1 dimension is inferred from the others, so it needs exactly "
                "one -1 and no 0 beside it (any size would fit). Give the dimensions explicitly."
            )
    return Transform("reshape", (_input(x),), (shape, saved_shape))


def transpose(x: Input, axes: Sequence[int] | None = None) -> Transform:
    """`x` with its axes permuted (reversed by default: a PyTorch ``Linear`` weight as a kernel).

    >>> T.transpose("linear/weight")
    transpose('linear/weight')
    """
    return Transform("transpose", (_input(x),), (_shape(axes),))


def cast(x: Input, dtype: Any, *, saved_dtype: Any = None) -> Transform:
    """`x` converted to `dtype` (a restore otherwise needs ``cast=True`` for another dtype).

    Saving through it writes the State's dtype, or `saved_dtype` when given.

    >>> T.cast("embed", "bfloat16")
    cast('embed', 'bfloat16')
    """
    saved = None if saved_dtype is None else jnp.dtype(saved_dtype).name
    return Transform("cast", (_input(x),), (jnp.dtype(dtype).name, saved))


def stack(xs: Sequence[Input], axis: int = 0) -> Transform:
    """The entries `xs` stacked along a new `axis`: per-layer variables as one scanned array.

    >>> T.stack([f"layers_{i}/kernel" for i in range(2)])
    stack(['layers_0/kernel', 'layers_1/kernel'], axis=0)
    """
    if isinstance(xs, (str, Transform)) or not xs:
        raise TypeError(f"stack takes a non-empty list of inputs, got {xs!r}.")
    return Transform("stack", tuple(map(_input, xs)), (int(axis),))


def concat(xs: Sequence[Input], axis: int = 0, *, sizes: Sequence[int] | None = None) -> Transform:
    """The entries `xs` joined along `axis`: separate Q, K, V kernels as one fused kernel.

    `sizes` (each input's length along `axis`) is needed only to save through it.

    >>> T.concat(["q", "k", "v"], axis=-1)
    concat(['q', 'k', 'v'], axis=-1)
    """
    if isinstance(xs, (str, Transform)) or not xs:
        raise TypeError(f"concat takes a non-empty list of inputs, got {xs!r}.")
    return Transform("concat", tuple(map(_input, xs)), (int(axis), _shape(sizes)))


def split(x: Input, sections: int | Sequence[int], axis: int = 0) -> Transform:
    """`x` split along `axis` into `sections` equal parts, or at the given increasing indices
    (>= 0), as `numpy.split`: a fused QKV kernel as three. Rules take its parts: a tuple of
    State names, or ``split(...)[i]``.

    >>> T.split("attn/qkv", 3, axis=-1)
    split('attn/qkv', 3, axis=-1)
    """
    try:
        sections = operator.index(sections)
    except TypeError:
        sections = _shape(sections)
        if any(i < 0 for i in sections) or list(sections) != sorted(sections):
            raise ArgumentError(f"split: indices must be >= 0 and increasing, got {list(sections)}.") from None
    else:
        if sections < 1:
            raise bad("split(x, sections)", sections, "a number of equal parts >= 1, or increasing indices >= 0")
    return Transform("split", (_input(x),), (sections, operator.index(axis)))


def unstack(x: Input, axis: int = 0, *, parts: int | None = None) -> Transform:
    """`x` cut along `axis` into its slices: a scanned array as per-layer variables. Rules take
    its parts: a tuple of State names, or ``unstack(...)[i]``.

    `parts` (how many slices `x` has) is checked on restore, and needed to save through parts
    named one by one: without it the save cannot know whether a slice is missing (a tuple of
    State names says it: one per slice).

    >>> T.unstack("layers/kernel")[0]
    unstack('layers/kernel', axis=0)[0]
    >>> T.unstack("layers/kernel", parts=4)[3]
    unstack('layers/kernel', axis=0, parts=4)[3]
    """
    if parts is not None:
        parts = integer(parts, "unstack(parts=...)", "the number of slices, an integer >= 1, or None", minimum=1)
    return Transform("unstack", (_input(x),), (int(axis), parts))


# -- applying them: the same functions serve NumPy (restoring, on the host), jax.numpy (shapes,
# through jax.eval_shape; saving, on the devices) ------------------------------------------------
def apply(t: Transform, xp: Any, inputs: list[Any]) -> Any:
    """The value (a tuple of them for split/unstack) of `t` given its inputs' values, with the
    array module `xp` (numpy or jax.numpy)."""
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
    """`t`'s value, its entries from `read(name)`; `memo` keeps values shared between transforms."""
    if t not in memo:
        if t.op == "entry":
            memo[t] = read(t.args[0])
        else:
            memo[t] = apply(t, xp, [evaluate(i, read, xp, memo) for i in t.inputs])
    return memo[t]


def struct(t: Transform, entries: dict[str, jax.ShapeDtypeStruct], memo: dict) -> Any:
    """`t`'s shape and dtype (a tuple of them for split/unstack) from its entries', computed by
    `jax.eval_shape` on the jax.numpy version; dtypes follow NumPy's rules (JAX would narrow
    64-bit ones)."""
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


# -- saving through them: the inverse -------------------------------------------------------------
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


def count(t: Transform) -> int | None:
    """How many parts a split or unstack has (an unstack's count, unless given as `parts`, depends
    on its input's shape: None)."""
    if t.op == "unstack":
        return t.args[1]
    if t.op != "split":
        return None
    sections = t.args[0]
    return sections if isinstance(sections, int) else len(sections) + 1


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
