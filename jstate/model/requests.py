"""Placement requests: every form a variable's placement may be asked in, and the
`jax.sharding.Sharding` each gives it, checked to fit the variable's shape.

Valid placements (anything a ``device=``, ``sharding=``, ``s.placement(...)`` or rule accepts):

  "cpu:0", "/job:ps/task:7", ...    a device string (valid forms: `jstate.model.devices`)
  jax.devices()[3]                  that device
  NamedSharding(mesh, P("x"))       any `jax.sharding.Sharding`, as it is
  P("data", "model")                a `PartitionSpec` over the `mesh=` passed to init
  jstate.round_robin(["cpu:0", ...]) each variable to the next device (TF's replica_device_setter)
  None                              JAX's default device (``s.placement(None)`` clears outer
                                    blocks and overrides the rules, as TF's ``tf.device(None)``)

A round-robin and None are settled by `jstate.model.placement` (which device comes next; no
sharding at all) before `resolve` sees a request. A device string that matches no device is an
error, or, with ``soft_placement=True`` (TF's ``allow_soft_placement``), a warning and JAX's
default device.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from ..core.errors import PlacementError
from .devices import parse_device


def resolve(request: Any, name: str, shape: tuple[int, ...], mesh: Mesh | None) -> Sharding:
    """The `Sharding` one placement request gives variable `name` of `shape`, checked to fit.

    Args:
      request: a device string, `jax.Device`, `Sharding` or `PartitionSpec` (module docstring).
      name: the variable, for errors.
      shape: its shape, which a PartitionSpec's mesh axes must divide.
      mesh: what a PartitionSpec is bound to.

    Raises:
      PlacementError: a PartitionSpec without a mesh or that does not fit; a request of
        another type; a malformed device string.
      NoDeviceError: a device string that names no device (soft placement's case).

    >>> resolve("cpu:2", "w", (3,), None).device_set
    {CpuDevice(id=2)}
    >>> resolve(jax.sharding.PartitionSpec("x"), "w", (3,), jax.make_mesh((8,), ("x",)))
    Traceback (most recent call last):
    ...
    jstate.core.errors.PlacementError: Variable 'w' of shape (3,): dimension 0 (size 3) is not divisible by 8, ...
    """
    if isinstance(request, PartitionSpec):
        if mesh is None:
            raise PlacementError(
                f"Variable '{name}' is placed with PartitionSpec {request}, but no mesh was given. "
                "Pass `mesh=` to `jstate.init` (or `abstract`), or give a `NamedSharding`."
            )
        _check_fits(request, mesh, name, shape)
        return NamedSharding(mesh, _canonical(request, mesh, len(shape)))
    if isinstance(request, NamedSharding):
        _check_fits(request.spec, request.mesh, name, shape)
        return request
    if isinstance(request, Sharding):
        return request
    if isinstance(request, jax.Device):
        return SingleDeviceSharding(request)
    if isinstance(request, str):
        return SingleDeviceSharding(parse_device(request, name))
    raise PlacementError(
        f"Variable '{name}': cannot place on {request!r} ({type(request).__name__}). Use a device "
        "string such as 'cpu:0', a `jax.Device`, a `Sharding` or a `PartitionSpec`."
    )


def _canonical(spec: PartitionSpec, mesh: Mesh, ndim: int) -> PartitionSpec:
    """The spec in the form `jax.jit` gives its outputs.

    So a State that goes through a jitted step compares equal to its placement and does not
    compile the step again: full rank on meshes with explicit axes (the sharding is part of the
    type), no trailing Nones on auto ones."""
    parts = list(spec)
    if jax.sharding.AxisType.Explicit in mesh.axis_types:
        parts += [None] * (ndim - len(parts))
    else:
        while parts and parts[-1] is None:
            parts.pop()
    return PartitionSpec(*parts)


def _check_fits(spec: PartitionSpec, mesh: Mesh, name: str, shape: tuple[int, ...]) -> None:
    mesh_shape = dict(mesh.shape)
    if len(spec) > len(shape):
        raise PlacementError(
            f"Variable '{name}' has shape {shape} ({len(shape)} dims) but PartitionSpec {spec} names {len(spec)} dims."
        )
    for dim, (size, axes) in enumerate(zip(shape, spec)):
        if axes is None:
            continue
        axes = axes if isinstance(axes, tuple) else (axes,)
        missing = [a for a in axes if a not in mesh_shape]
        if missing:
            raise PlacementError(
                f"Variable '{name}': PartitionSpec {spec} uses mesh axis {missing[0]!r}, but the mesh "
                f"has axes {tuple(mesh_shape)}."
            )
        ways = math.prod(mesh_shape[a] for a in axes)
        if size % ways:
            raise PlacementError(
                f"Variable '{name}' of shape {shape}: dimension {dim} (size {size}) is not divisible "
                f"by {ways}, the size of mesh axes {axes} in PartitionSpec {spec}. Choose a spec "
                "that divides it, or replicate that dimension (None)."
            )
