"""`Shaped`: what an array's shape and dtype say about it, its element count and its bytes.

Every record of an array without its values has a shape and a dtype: a declared variable
(`jstate.VariableSpec`), an entry of a checkpoint (`formats.base.Entry`), a variable of a jstate
manifest (`formats.manifest.Variable`). Each is its own frozen dataclass with its own fields,
declared in its own order (``VariableSpec(name, shape, dtype)`` is public); what follows from a
shape and a dtype is computed here, once, for all of them.
"""

from __future__ import annotations

import math
from typing import Any


class Shaped:
    """A mixin for records with `shape` and `dtype` fields: their `size` and `nbytes`.

    A subclass declares both fields itself (a mixin with fields of its own would fix their
    place among the subclass's). The dtype may be one of JAX's PRNG key dtypes, whose itemsize
    is that of its key data.

    Attributes:
      shape: the array's shape.
      dtype: its dtype (a NumPy dtype, or JAX's for PRNG keys).

    >>> import dataclasses, numpy as np
    >>> @dataclasses.dataclass(frozen=True)
    ... class Array(Shaped):
    ...     shape: tuple[int, ...]
    ...     dtype: np.dtype
    >>> Array((2, 3), np.dtype("float32")).size, Array((2, 3), np.dtype("float32")).nbytes
    (6, 24)
    """

    __slots__ = ()
    shape: tuple[int, ...]
    dtype: Any

    @property
    def size(self) -> int:
        """The number of elements: the product of `shape` (1 for a scalar)."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """The bytes its values take: `size` times the dtype's itemsize."""
        return self.size * self.dtype.itemsize
