"""What a State's values may become: the checks and placement behind `State.assign`,
`assign_add`, `assign_sub`, `redeclare` and `merge`.

These work on a State's parts (``{name: VariableSpec}`` and ``{name: value}``) and return new
ones, so `State` keeps only the immutable mapping and this module owns every rule of an update:
a value keeps its variable's shape and dtype (a Python scalar may be broadcast if it keeps the
dtype), `redeclare` is the one way to change them, and every new value lives on its variable's
sharding (`placement.constrain`), eagerly and under `jax.jit`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..core.errors import SpecMismatchError, uninitialized, unknown_names
from . import placement as _placement
from .placement import constrain
from .spec import VariableSpec, dtype_of


def assign(
    specs: Mapping[str, VariableSpec],
    values: Mapping[str, Any],
    updates: Mapping[str, Any],
    op: Callable[[Any, Any], Any] | None,
    verb: str,
) -> dict[str, Any]:
    """`values` with `updates` checked, combined with the old values by `op`, and placed.

    Args:
      specs: every declared variable of the State.
      values: the State's values by name.
      updates: ``{name: new value}``.
      op: None to set, else how the old value and the new one combine (``operator.add``).
      verb: the State method, for errors (``"assign_add"``).

    Returns:
      A new dict: `values` in their order, updated; names `values` lacked come last.

    Raises:
      UnknownVariableError: a name is not declared.
      UninitializedError: `op` needs the old value of a variable that holds none.
      SpecMismatchError: a value has another shape or dtype (see `coerce`).

    >>> new = assign(state.specs, dict(state), {"biases": 2.0}, None, "assign")
    >>> new["biases"][:2]
    Array([2., 2.], dtype=float32)
    """
    new = dict(values)
    for n, v in updates.items():
        spec = specs.get(n)
        if spec is None:
            raise unknown_names("Cannot assign: variable", [n], specs, "Declare it in the model first.")
        spec = current(spec, values.get(n))
        v = coerce(spec, v, broadcast=op is None, verb=verb)
        if op is not None:
            if n not in values:
                raise uninitialized(n)
            v = op(values[n], v)
        new[n] = constrain(v, spec.sharding)
    return new


def redeclare(spec: VariableSpec, value: Any) -> tuple[VariableSpec, Any]:
    """`spec` declared anew with `value`'s shape and dtype, and `value` on its placement.

    The placement is derived again for the new shape (`placement.reshape`).

    Args:
      spec: the variable's declaration.
      value: its new value, of any shape and dtype (NumPy and Python values take JAX's dtypes).

    Returns:
      The new declaration, and the value on its sharding.

    Raises:
      PlacementError: the placement cannot hold the new shape.

    >>> new, value = redeclare(state.spec("biases"), jnp.zeros(300))
    >>> new.shape, value.shape
    ((300,), (300,))
    """
    if not isinstance(value, jax.Array):
        value = jnp.asarray(value)
    if getattr(value, "weak_type", False):
        value = jax.lax.convert_element_type(value, value.dtype)
    shape = tuple(value.shape)
    placement = _placement.reshape(spec.placement, spec.name, spec.shape, shape)
    new = dataclasses.replace(spec, shape=shape, dtype=dtype_of(value), placement=placement)
    return new, constrain(value, placement.sharding)


def merge(
    specs: Mapping[str, VariableSpec],
    values: Mapping[str, Any],
    other_specs: Mapping[str, VariableSpec],
    other_values: Mapping[str, Any],
) -> tuple[dict[str, VariableSpec], dict[str, Any]]:
    """The declarations and values of two States; where both hold a value, the other's wins.

    Where both declare a variable, the first declaration is kept and the other's value is put on
    its sharding; variables only the other declares keep the other's declaration.

    Raises:
      SpecMismatchError: a variable both declare has another shape or dtype in each.

    >>> specs, values = merge(state.specs, dict(state), {}, {})
    >>> sorted(values) == sorted(state)
    True
    """
    specs, values = dict(specs), dict(values)
    for n, spec in other_specs.items():
        mine = specs.get(n)
        if mine is None:
            specs[n] = spec
            if n in other_values:
                values[n] = other_values[n]
            continue
        mine, theirs = current(mine, values.get(n)), current(spec, other_values.get(n))
        if (mine.shape, mine.dtype) != (theirs.shape, theirs.dtype):
            raise SpecMismatchError(
                f"Cannot merge: variable '{n}' is declared with shape {mine.shape} and dtype "
                f"{mine.dtype.name} here but shape {theirs.shape} and dtype {theirs.dtype.name} in the other State."
            )
        value = other_values.get(n)
        if isinstance(value, jax.Array):  # (a State of structs or shardings holds no arrays)
            values[n] = constrain(value, mine.sharding)
        elif n in other_values:
            values[n] = value
    return specs, values


def coerce(spec: VariableSpec, value: Any, broadcast: bool, verb: str) -> Any:
    """`value`, checked against `spec`: the declared shape and dtype, or a Python scalar that keeps the dtype.

    Args:
      spec: the variable's declaration (its current dtype: see `current`).
      value: an array, NumPy value or Python number.
      broadcast: fill the declared shape with a Python scalar (`assign`), or leave it as it is
        for an `op` to broadcast (`assign_add`).
      verb: the State method, for errors.

    Returns:
      `value`, a strongly typed JAX value if it was weakly typed (so jit signatures stay stable).

    Raises:
      SpecMismatchError: naming the variable, the declared shape and dtype and the given ones,
        or the Python number that would change the dtype or does not fit it.

    >>> coerce(state.spec("biases"), 1, broadcast=True, verb="assign").shape
    (200,)
    """
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
    """The range of `dtype` if the Python number `value` falls outside it, else "".

    >>> out_of_range(300, jnp.int8), out_of_range(3, jnp.int8)
    ('-128 to 127', '')
    """
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

    ``jax.tree.map(lambda x: x.astype(jnp.bfloat16), state)`` gives a State with the old
    declarations and bfloat16 values: the pytree's unflatten reuses the `StateDef`, as checking
    every leaf there would slow down every `jax.jit` call. A State's specs follow its values here
    instead.

    >>> current(state.spec("biases"), jnp.zeros(200, jnp.bfloat16)).dtype
    dtype(bfloat16)
    """
    dtype = getattr(value, "dtype", None)
    if dtype is None or dtype == spec.dtype:
        return spec
    return dataclasses.replace(spec, dtype=dtype_of(value))
