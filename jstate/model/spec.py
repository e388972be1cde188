"""What a variable is declared to be: its name, shape, dtype and placement."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from ..core.shaped import Shaped
from .placement import DEFAULT, Origin, Placement


def dtype_of(value: Any) -> Any:
    """`value`'s dtype: a NumPy dtype, or JAX's own for PRNG keys, which NumPy cannot represent.

    >>> dtype_of(jnp.zeros(2)), dtype_of(jax.random.key(0))
    (dtype('float32'), key<fry>)
    """
    dtype = value.dtype
    return dtype if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) else np.dtype(dtype)


@dataclasses.dataclass(frozen=True)
class VariableSpec(Shaped):
    """A declared variable: everything about it but its value.

    Attributes:
      name: full "/"-joined name, e.g. "layer1/kernel".
      shape: the fixed shape.
      dtype: the fixed dtype.
      placement: where it lives (see `Placement`).
      options: extra keyword options given at declaration, as sorted (key, value) pairs.
      trainable: whether `State.trainable` holds it (``s.variable(..., trainable=False)``).
      size, nbytes: its number of elements and the bytes its value takes (`core.shaped.Shaped`).

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
        """Its placement's sharding (None where it has no placement)."""
        return self.placement.sharding

    def struct(self) -> jax.ShapeDtypeStruct:
        """The variable as a `jax.ShapeDtypeStruct` (with its sharding, if placed).

        >>> state.spec("biases").struct()
        ShapeDtypeStruct(shape=(200,), dtype=float32)
        """
        return jax.ShapeDtypeStruct(self.shape, self.dtype, sharding=self.sharding)


def spec_of(name: str, leaf: jax.Array | jax.ShapeDtypeStruct) -> VariableSpec:
    """The declaration a value implies: its shape, dtype, and the sharding it was placed on.

    A committed array's sharding, or a struct's if it has one, becomes the placement;
    uncommitted and traced arrays have none. How `State.from_tree` declares each leaf.

    Args:
      name: the variable's name.
      leaf: its value, or a `jax.ShapeDtypeStruct` for an uninitialized variable.

    >>> str(spec_of("w", jax.device_put(jnp.zeros(2), jax.devices()[1])).placement)
    'cpu:1 (from sharding=)'
    >>> str(spec_of("w", jnp.zeros(2)).placement)
    'default (from default)'
    """
    if isinstance(leaf, jax.ShapeDtypeStruct):
        sharding = leaf.sharding
    else:
        sharding = leaf.sharding if not isinstance(leaf, jax.core.Tracer) and leaf.committed else None
    placement = Placement(sharding, Origin.SHARDING, sharding) if sharding is not None else DEFAULT
    return VariableSpec(name, tuple(leaf.shape), dtype_of(leaf), placement)
