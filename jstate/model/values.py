"""What a variable's value may be: checked against its declaration, and kept where it lives.
Used by `State.assign` and friends."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from ..core.errors import SpecMismatchError
from .spec import VariableSpec, dtype_of


def coerce(spec: VariableSpec, value: Any, broadcast: bool, verb: str) -> Any:
    """Check `value` against `spec`; a Python scalar is allowed if it keeps the dtype."""
    if isinstance(value, (bool, int, float, complex)):
        if jnp.result_type(spec.dtype, value) != spec.dtype:
            raise SpecMismatchError(
                f"Cannot {verb} variable '{spec.name}': the Python {type(value).__name__} {value!r} "
                f"would change its dtype {spec.dtype.name}."
            )
        bounds = out_of_range(value, spec.dtype)
        if bounds:
            raise SpecMismatchError(
                f"Cannot {verb} variable '{spec.name}': the Python {type(value).__name__} {value!r} does not "
                f"fit its dtype {spec.dtype.name} ({bounds}); JAX would silently make it another number."
            )
        return jnp.full(spec.shape, value, spec.dtype) if broadcast else value
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dtype is None:
        value = np.asarray(value)
        shape, dtype = value.shape, value.dtype
    if tuple(shape) != spec.shape or dtype != spec.dtype:
        raise SpecMismatchError(
            f"Cannot {verb} variable '{spec.name}': declared shape {spec.shape} and dtype "
            f"{spec.dtype.name}, given shape {tuple(shape)} and dtype {np.dtype(dtype).name}. "
            f"To declare it anew with another shape or dtype, use `state.redeclare({spec.name!r}, value)`."
        )
    if getattr(value, "weak_type", False):
        value = jax.lax.convert_element_type(value, spec.dtype)  # keep jit signatures stable
    return value


def out_of_range(value: bool | int | float | complex, dtype: Any) -> str:
    """The range of `dtype` if the Python number `value` falls outside it, else ""."""
    if isinstance(value, int) and jnp.issubdtype(dtype, jnp.integer):
        info = jnp.iinfo(dtype)
        return "" if info.min <= value <= info.max else f"{info.min} to {info.max}"
    if isinstance(value, float) and jnp.issubdtype(dtype, jnp.floating) and np.isfinite(value):
        with np.errstate(over="ignore"):
            fits = np.isfinite(np.asarray(value, dtype))  # overflow becomes inf
        return "" if fits else f"largest {float(jnp.finfo(dtype).max):g}"
    return ""


def current(spec: VariableSpec, value: Any) -> VariableSpec:
    """`spec` with the dtype of `value`, the value it holds (if any).

    ``jax.tree.map(lambda x: x.astype(jnp.bfloat16), state)`` gives a State with the old layout
    and bfloat16 values: the pytree's unflatten reuses the layout, as checking every leaf there
    would slow down every `jax.jit` call. The State's specs follow the values here instead.
    """
    dtype = getattr(value, "dtype", None)
    if dtype is None or dtype == spec.dtype:
        return spec
    return dataclasses.replace(spec, dtype=dtype_of(value))


def place(value: Any, sharding: jax.sharding.Sharding | None) -> Any:
    """Keep a variable where it lives: move eager values, constrain traced ones."""
    if isinstance(value, jax.core.Tracer):
        if sharding is None:
            return value
        if isinstance(sharding, NamedSharding) and jax.sharding.AxisType.Explicit in sharding.mesh.axis_types:
            return jax.sharding.reshard(value, sharding)  # explicit axes: sharding is in the type
        return jax.lax.with_sharding_constraint(value, sharding)
    if sharding is None:
        return value if isinstance(value, jax.Array) else jnp.asarray(value)
    if isinstance(value, jax.Array) and value.sharding == sharding:
        return value
    return jax.device_put(value, sharding)
