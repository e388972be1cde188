"""What a variable is declared to be: its name, shape, dtype and placement."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from .placement import DEFAULT, Placement


def dtype_of(value: Any) -> Any:
    """`value`'s dtype: a NumPy dtype, or JAX's own for PRNG keys (``key<fry>``), which NumPy
    cannot represent.

    >>> dtype_of(jnp.zeros(2)), dtype_of(jax.random.key(0))
    (dtype('float32'), key<fry>)
    """
    dtype = value.dtype
    return dtype if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) else np.dtype(dtype)


@dataclasses.dataclass(frozen=True)
class VariableSpec:
    """A declared variable: everything about it but its value.

    Attributes:
      name: full "/"-joined name, e.g. "layer1/kernel".
      shape: the fixed shape.
      dtype: the fixed dtype.
      placement: where it lives (see `Placement`).
      options: extra keyword options given at declaration, as sorted (key, value) pairs.
      trainable: whether `State.trainable` holds it (``s.variable(..., trainable=False)``).

    >>> spec = state.spec("layer1/kernel")
    >>> spec.name, spec.shape, spec.dtype, spec.nbytes
    ('layer1/kernel', (200, 10), dtype('float32'), 8000)
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    placement: Placement = DEFAULT
    options: tuple[tuple[str, Any], ...] = ()
    trainable: bool = True

    @property
    def sharding(self) -> jax.sharding.Sharding | None:
        """Where the variable lives, as a `jax.sharding.Sharding`; None when it is not placed (the default device)."""
        return self.placement.sharding

    @property
    def size(self) -> int:
        """The number of elements (1 for a scalar)."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """The bytes the variable's value takes: `size` times the dtype's item size."""
        return self.size * self.dtype.itemsize

    def struct(self) -> jax.ShapeDtypeStruct:
        """The variable as a `jax.ShapeDtypeStruct` (with its sharding, if placed).

        >>> state.spec("biases").struct()
        ShapeDtypeStruct(shape=(200,), dtype=float32)
        """
        return jax.ShapeDtypeStruct(self.shape, self.dtype, sharding=self.sharding)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One array a checkpoint holds: where its format keeps it, and what it is.

    Attributes:
      keypath: its path in the checkpoint's tree (Orbax), or ``(name,)`` for flat formats.
      shape: its shape.
      dtype: its dtype.
    """

    keypath: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize
