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
from collections.abc import Iterable, Sequence
from typing import Any, Union

import jax.numpy as jnp

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


def count(t: Transform) -> int | None:
    """How many parts a split or unstack has (an unstack's count, unless given as `parts`, depends
    on its input's shape: None)."""
    if t.op == "unstack":
        return t.args[1]
    if t.op != "split":
        return None
    sections = t.args[0]
    return sections if isinstance(sections, int) else len(sections) + 1
