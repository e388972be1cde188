"""Flax interop: a linen Module as a jstate model. (NNX states convert in `_tree`.)"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from ..core.errors import PlacementError, shorten
from ..core.tree import path_name
from .scope import Scope

log = logging.getLogger("jstate")
LogicalRules = Sequence[tuple[str, "str | tuple[str, ...] | None"]]

_NOT_APPLIED = (
    "%s: no mesh was given, so the partitioning of %d parameter(s) (%s) was not applied: every "
    "variable is on the default device. Pass `mesh=` to `jstate.init` or `jstate.abstract` to shard them."
)
_NO_MESH_AXIS = "Variable '{name}' is partitioned over mesh axis {axis!r}{source}, but the mesh has axes {axes}. {fix}"
_NO_RULES = (
    "Variable '{name}' has logical axis names {names} (`nn.with_logical_partitioning`) but no logical "
    "axis rules map them to mesh axes. Pass `jstate.flax_model(module, ..., logical_axis_rules=[(logical, "
    "mesh_axis), ...])`."
)


def flax_model(
    module: Any,
    *args: Any,
    method: str | None = None,
    logical_axis_rules: LogicalRules | None = None,
    exact_init: bool = False,
    **kwargs: Any,
) -> Callable[[Scope], None]:
    """A jstate model declaring the variables of a Flax linen `module`, named by their paths.

    ``module.init`` runs inside the model (traced like the rest of it); every variable it
    creates becomes a jstate variable named by its path, e.g. ``"params/Dense_0/kernel"``, so
    Saver mappings, placement rules and ``only=`` work on them. `args` and `kwargs` are example
    inputs (arrays or `jax.ShapeDtypeStruct`s) and options of the module's call.

    Partitioned parameters (``nn.with_partitioning``, ``nn.with_logical_partitioning``) are
    unboxed, and their axis names become their placement, a PartitionSpec over the ``mesh=``
    given to `jstate.init` (or the box's own mesh); it wins over ``rules=``, which place the
    other variables. With `logical_axis_rules`, every partitioned parameter's names are logical
    names mapped by those rules, as ``nn.logical_to_mesh_sharding(nn.get_partition_spec(v),
    mesh, rules)`` maps them. A box's own ``rules`` win; without either, a logically partitioned
    parameter takes the rules of an enclosing ``with nn.logical_axis_rules(...)`` when the model
    is first traced, and ``nn.with_partitioning``'s names are mesh axes.

    Initial values: by default ``module.init`` gets a key derived from init's key and the
    scope the model runs in (``s.make_rng("flax")``), so two Flax models in one jstate model get
    different keys, and the values differ from ``module.init(key, *args)``'s. Flax derives each
    value's key from that one by its own scheme (module path and call order), not from the
    jstate name as jstate's own initializers do.

    Where the values are made: by default the whole of ``module.init`` runs as one compiled
    program whose outputs are created on their shardings (``out_shardings``), so no device holds
    more than its own shards plus temporaries, and every random draw of the module is taken from
    one threefry op (so the program compiles in about the time of one draw, not one per
    parameter). Its values are those of ``jax.jit(module.init)`` up to XLA's rounding (a last bit
    may differ). With ``exact_init=True`` it gets init's key itself and is computed op by op, as
    ``module.init`` computes eagerly: ``jstate.init(model, key)`` holds exactly
    ``module.init(key, *args)``, bit for bit, computed on the default device and then moved to
    the shardings (so a model too large for one device needs the default).

    Args:
      module: a Flax linen Module.
      *args: example inputs of its call.
      method: the method ``module.init`` calls, if not ``__call__``.
      logical_axis_rules: ``[(logical_name, mesh_axis or None), ...]``, as Flax's.
      exact_init: give ``module.init`` init's key unchanged, and compute it op by op.
      **kwargs: keyword arguments of its call.

    Without a mesh (``jstate.abstract(model)``, evaluation on one device), partitioned
    parameters go to the default device, and one INFO record of the ``jstate`` logger says the
    partitioning was not applied.

    Raises:
      PlacementError: a logically partitioned parameter with no rules, or one partitioned over
        a mesh axis the mesh lacks (the message names the rule and the axis to add).

    >>> from flax import linen as nn
    >>> model = jstate.flax_model(nn.Dense(3), jnp.ones((1, 4)))
    >>> state = jstate.init(model, jax.random.key(0))
    >>> list(state), nn.Dense(3).apply(state.tree(), jnp.ones((1, 4))).shape
    (['params/bias', 'params/kernel'], (1, 3))
    >>> dense = nn.Dense(8, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model")))
    >>> model = jstate.flax_model(dense, jnp.ones((1, 4)), exact_init=True)
    >>> state = jstate.init(model, jax.random.key(0), mesh=jax.make_mesh((8,), ("model",)))
    >>> state.placement("params/kernel").sharding.spec
    P(None, 'model')
    >>> flax_params = nn.unbox(dense.init(jax.random.key(0), jnp.ones((1, 4))))["params"]
    >>> np.array_equal(state["params/kernel"], flax_params["kernel"])  # exact_init: module.init's values
    True
    """
    from flax.core import meta  # (flax's import costs ~0.15 s: not at `import jstate`)

    def model(s: Scope) -> None:
        inputs = [jnp.zeros(a.shape, a.dtype) if isinstance(a, jax.ShapeDtypeStruct) else a for a in args]
        init_kwargs = {"method": method} if method is not None else {}
        key = s._key if exact_init else s.make_rng("flax")
        s._record.eager |= exact_init
        variables = module.init(key, *inputs, **kwargs, **init_kwargs)
        boxed = lambda x: isinstance(x, meta.AxisMetadata)  # noqa: E731
        unplaced = []
        for path, leaf in jax.tree_util.tree_flatten_with_path(dict(variables), is_leaf=boxed)[0]:
            name = path_name(path)
            if isinstance(leaf, meta.Partitioned) and leaf.mesh is None and s._record.mesh is None:
                unplaced.append(name)  # looking at a model needs no mesh: the default device
                s.variable(name, leaf.value)
            elif isinstance(leaf, meta.Partitioned):
                s.variable(name, leaf.value, sharding=_sharding(name, leaf, logical_axis_rules, s._record.mesh))
            elif isinstance(leaf, meta.AxisMetadata):  # other metadata places nothing
                s.variable(name, leaf.unbox())
            else:
                s.variable(name, leaf)
        if unplaced:  # once per trace of the model
            log.info(_NOT_APPLIED, model.__qualname__, len(unplaced), shorten(unplaced))

    model.__qualname__ = f"flax_model({type(module).__name__})"
    return model


def _sharding(name: str, box: Any, rules: LogicalRules | None, mesh: Any) -> PartitionSpec | NamedSharding:
    """The placement of a partitioned parameter: its names, mapped by logical rules if any."""
    from flax.linen import spmd

    own = getattr(box, "rules", None)  # `nn.with_logical_partitioning(..., rules=...)`
    table = own if own is not None else rules
    if table is None and isinstance(box, spmd.LogicallyPartitioned):
        table = spmd.get_logical_axis_rules() or None  # an enclosing `with nn.logical_axis_rules(...)`
        if table is None:
            raise PlacementError(_NO_RULES.format(name=name, names=tuple(box.names)))
    spec = PartitionSpec(*box.names) if table is None else spmd.logical_to_mesh_axes(box.names, table)
    _check_axes(name, box, spec, table, box.mesh if box.mesh is not None else mesh)
    return spec if box.mesh is None else NamedSharding(box.mesh, spec)


def _check_axes(name: str, box: Any, spec: PartitionSpec, table: Any, mesh: Any) -> None:
    """A mesh axis the mesh lacks: say which logical-axis rule produced it, and what to add."""
    axes = tuple(mesh.axis_names)
    for logical, entry in zip(box.names, spec):
        for axis in entry if isinstance(entry, tuple) else (entry,):
            if axis is None or axis in axes:
                continue
            if table is None:
                source, fix = "", f"Add a mesh axis {axis!r}, or partition over one of {axes}."
            else:
                source = f" (logical axis {logical!r}, mapped by the rule ({logical!r}, {axis!r}))"
                fix = (
                    f"Add a mesh axis {axis!r}, or map logical axis {logical!r} to one of {axes} (or to None, "
                    "to replicate it) in `logical_axis_rules`."
                )
            raise PlacementError(_NO_MESH_AXIS.format(name=name, axis=axis, source=source, axes=axes, fix=fix))
