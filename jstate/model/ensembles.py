"""Ensembles: declarations with leading batch axes, one model per index.

An ensemble State holds n models of one declaration: every variable has shape ``(n, *shape)``,
and its sharding is the member's with that axis unsharded (``P(None, *spec)``), the sharding
``jax.vmap`` gives a batched output of a jitted program. `jstate.init(model, keys)` makes one;
``jax.vmap(lambda k: jstate.init(model, k))(keys)`` makes the same State, because a State's
declarations follow its values' leading axes (`refit`, which its pytree unflatten calls): the
aux data a vmapped function returns holds the member's declarations, and the values came out
with the batch axis in front. The same rule gives a member's declarations to the State a
vmapped function sees of an ensemble it was given. `select` takes one member out (`State.member`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from ..core.errors import SpecMismatchError
from .placement import Placement, constrain
from .spec import VariableSpec


def batched(spec: VariableSpec, batch: tuple[int, ...]) -> VariableSpec:
    """`spec` with leading axes `batch`, unsharded: a variable of an ensemble of that shape.

    >>> batched(state.spec("biases"), (4,)).shape
    (4, 200)
    """
    if not batch:
        return spec
    pad = (None,) * len(batch)
    placement = spec.placement
    sharding = batched_sharding(placement.sharding, len(batch))
    request = placement.request
    if isinstance(request, PartitionSpec):
        request = PartitionSpec(*pad, *request)
    elif isinstance(request, NamedSharding):
        request = sharding
    placement = dataclasses.replace(placement, sharding=sharding, request=request)
    return dataclasses.replace(spec, shape=(*batch, *spec.shape), placement=placement)


def batched_sharding(sharding: Sharding | None, axes: int = 1) -> Sharding | None:
    """`sharding` for a value with `axes` more leading axes, unsharded along them (one device,
    or none, holds any shape as it is).

    >>> mesh = jax.make_mesh((8,), ("x",))
    >>> batched_sharding(jax.NamedSharding(mesh, jax.sharding.PartitionSpec("x")), 1).spec
    P(None, 'x')
    """
    if isinstance(sharding, NamedSharding) and axes:
        pad = (None,) * axes
        return NamedSharding(sharding.mesh, PartitionSpec(*pad, *sharding.spec), memory_kind=sharding.memory_kind)
    return sharding


def member(spec: VariableSpec, axes: int = 1) -> VariableSpec:
    """`spec` without its first `axes` axes: the declaration of one member of an ensemble.

    >>> member(batched(state.spec("biases"), (4,))) == state.spec("biases")
    True
    """
    if not axes:
        return spec
    placement: Placement = spec.placement
    sharding = placement.sharding
    if isinstance(sharding, NamedSharding):
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[axes:]), memory_kind=sharding.memory_kind)
    request = placement.request
    if isinstance(request, PartitionSpec):
        request = PartitionSpec(*request[axes:])
    elif isinstance(request, NamedSharding):
        request = sharding
    placement = dataclasses.replace(placement, sharding=sharding, request=request)
    return dataclasses.replace(spec, shape=spec.shape[axes:], placement=placement)


def refit(specs: Mapping[str, VariableSpec], names: Sequence[str], leaves: Sequence[Any]) -> tuple[str, Any] | None:
    """How declarations `specs` must change to describe `leaves` (the values of `names`):
    ``("batch", shape)`` where every array leaf has gained leading axes `shape` (a vmapped
    function's output), ``("member", k)`` where every one has lost its first `k` axes (inside a
    vmapped function), None where they need no change or change in any other way.

    >>> refit(state.specs, ["biases"], [jnp.zeros((3, 200))])
    ('batch', (3,))
    """
    shaped = [(specs[n].shape, tuple(v.shape)) for n, v in zip(names, leaves) if getattr(v, "shape", None) is not None]
    if not shaped:
        return None
    declared, first = shaped[0]
    extra = len(first) - len(declared)
    if extra > 0 and first[extra:] == declared:
        batch = first[:extra]
        return ("batch", batch) if all(have == (*batch, *want) for want, have in shaped) else None
    k = -extra
    if k > 0 and declared[k:] == first and all(len(s.shape) >= k for s in specs.values()):
        return ("member", k) if all(have == want[k:] for want, have in shaped) else None
    return None


def apply(specs: Mapping[str, VariableSpec], change: tuple[str, Any]) -> dict[str, VariableSpec]:
    """`specs` changed as `refit` said.

    >>> apply(state.specs, ("batch", (2,)))["weights"].shape
    (2, 784, 200)
    """
    kind, arg = change
    if kind == "batch":
        return {n: batched(s, arg) for n, s in specs.items()}
    return {n: member(s, arg) for n, s in specs.items()}


def select(specs: Mapping[str, VariableSpec], values: Mapping[str, Any], index: int) -> tuple[dict, dict]:
    """Member `index` of an ensemble's declarations and values (the work of `State.member`).

    Args:
      specs: every declared variable of the ensemble State (its current dtypes).
      values: its values by name.
      index: which member, ``0 <= index < n`` (negative counts from the end).

    Returns:
      ``(specs, values)`` of the member: declarations without the first axis, each value
      indexed along it and on the member's sharding.

    Raises:
      SpecMismatchError: a variable has no first axis, or one of another length.
      IndexError: `index` is out of range.

    >>> specs, values = select({"w": batched(state.spec("biases"), (3,))}, {"w": jnp.zeros((3, 200))}, -1)
    >>> specs["w"].shape, values["w"].shape
    ((200,), (200,))
    """
    sizes = {n: (s.shape[0] if s.shape else None) for n, s in specs.items()}
    lengths = set(sizes.values())
    if len(lengths) != 1 or None in lengths:
        shown = ", ".join(f"'{n}' {specs[n].shape}" for n in list(specs)[:4])
        raise SpecMismatchError(
            f"`member` takes one model out of an ensemble, a State whose every variable has a first axis "
            f"of the same length (`jstate.init(model, keys)`); this State's variables have shapes {shown}"
            f"{', ...' if len(specs) > 4 else ''}."
        )
    (n,) = lengths
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool) or not -n <= index < n:
        raise IndexError(f"Ensemble member {index!r} is out of range: the ensemble has {n} members (0 to {n - 1}).")
    members = {name: member(spec) for name, spec in specs.items()}
    return members, {name: constrain(v[index], members[name].sharding) for name, v in values.items()}
