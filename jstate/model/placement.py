"""Where each variable lives: its own spec, the innermost placement block, then the first
matching rule (`choose`), and moving values there: one value (`constrain`), a whole State onto
another mesh or rules (`replace`).

What each form of request means as a `jax.sharding.Sharding` (device strings, devices,
shardings, PartitionSpecs) is `jstate.model.requests`'s; a round-robin's pick and soft
placement's fallback are settled here, as they depend on what was placed before.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, Sharding, SingleDeviceSharding

from ..core.errors import PlacementError
from .balance import Loads, RoundRobin
from .devices import NoDeviceError, describe
from .requests import resolve

Rules = tuple[tuple[re.Pattern, Any], ...]


class Origin(enum.Enum):
    """What put a variable where it lives, in order of precedence.

    >>> jstate.abstract(model, rules=[("kernel", "cpu:1")]).placement("layer1/kernel").origin
    <Origin.RULE: 'rule'>
    """

    DEVICE = "device="  # the declaration's own ``device=``
    SHARDING = "sharding="  # the declaration's own ``sharding=``
    BLOCK = "placement block"  # the innermost ``with s.placement(...)``
    RULE = "rule"  # the first matching ``rules=`` entry
    DEFAULT = "default"  # nothing: JAX's default device


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a variable lives and which declaration or rule put it there.

    Attributes:
      sharding: the variable's `jax.sharding.Sharding`, or None for JAX's default device.
      origin: what placed it (an `Origin`).
      request: what was asked for (a device string, `jax.Device`, `Sharding`,
        `PartitionSpec` or `jstate.round_robin`), kept so the State can be re-placed on
        another mesh.
      rule: for `Origin.RULE`, the rule's index and pattern.
      fallback: with soft placement, the device spec that matched no device (the variable is
        on JAX's default device instead); None otherwise.

    >>> str(jstate.Placement())
    'default (from default)'
    """

    sharding: Sharding | None = None
    origin: Origin = Origin.DEFAULT
    request: Any = None
    rule: tuple[int, str] | None = None
    fallback: Any = None

    @property
    def source(self) -> str:
        """`origin` as text, naming the rule, a round-robin and a soft-placement fallback.

        For example ``"device="``, ``"rule 0 ('.*/kernel$')"``, ``"placement block, round-robin
        by size"``, ``"device=, soft placement: '/gpu:0' matches no device"``.

        >>> jstate.abstract(model, rules=[("kernel", "cpu:1")]).placement("layer1/kernel").source
        "rule 0 ('kernel')"
        """
        if self.origin is Origin.RULE and self.rule is not None:
            text = f"rule {self.rule[0]} ({self.rule[1]!r})"
        else:
            text = self.origin.value
        if isinstance(self.request, RoundRobin):
            text += f", {self.request}"
        if self.fallback is not None:
            text += f", soft placement: {self.fallback!r} matches no device"
        return text

    @property
    def declared(self) -> bool:
        """Whether the model itself asked for it (not a rule or the default).

        >>> jstate.Placement(origin=jstate.Origin.RULE).declared
        False
        """
        return self.origin in (Origin.DEVICE, Origin.SHARDING, Origin.BLOCK)

    def __str__(self) -> str:
        return f"{describe(self.sharding)} (from {self.source})"


DEFAULT = Placement()

# `choose`'s `block` when no ``with s.placement(...)`` is open (None is a block: the default device).
NO_BLOCK = object()


def compile_rules(rules: Sequence[tuple[str, Any]] | None) -> Rules:
    """Check and compile placement rules; the first rule whose regex matches a name wins.

    Args:
      rules: ``[(regex, placement), ...]`` or a dict of them; None for no rules.

    Returns:
      ``((compiled regex, placement), ...)``.

    Raises:
      PlacementError: a rule is not a pair, or its regex does not compile (naming the rule).

    >>> [p.pattern for p, _ in compile_rules({"kernel$": "cpu:1"})]
    ['kernel$']
    """
    if rules is None:
        return ()
    if isinstance(rules, dict):
        rules = list(rules.items())
    compiled = []
    for i, rule in enumerate(rules):
        try:
            pattern, target = rule
        except (TypeError, ValueError):
            raise PlacementError(f"Placement rule {i} is {rule!r}; each rule must be a `(regex, spec)` pair.") from None
        try:
            compiled.append((re.compile(pattern), target))
        except re.error as e:
            raise PlacementError(
                f"Placement rule {i}: the pattern {pattern!r} does not compile ({e}). Fix the regex."
            ) from None
    return tuple(compiled)


def choose(
    name: str,
    shape: tuple[int, ...],
    own: tuple[Origin, Any] | None,
    block: Any,
    rules: Rules,
    mesh: Mesh | None,
    *,
    nbytes: int = 0,
    loads: Loads | None = None,
    soft: bool = False,
) -> Placement:
    """The placement of one variable: its own spec, then the innermost block, then the rules.

    Args:
      name: the variable's full name, which rules match.
      shape: its shape, which a PartitionSpec must divide.
      own: ``(Origin.DEVICE or Origin.SHARDING, request)`` from its declaration, or None.
      block: the innermost ``s.placement(...)`` request (None: JAX's default device), or `NO_BLOCK`.
      rules: from `compile_rules`.
      mesh: what PartitionSpecs are bound to.
      nbytes: the variable's size, for round-robins by size.
      loads: what round-robins placed so far in this trace.
      soft: a device string that matches no device falls back to the default device.

    Raises:
      PlacementError: the request is malformed or does not fit (see `resolve`).

    >>> str(choose("layer1/kernel", (200, 10), None, NO_BLOCK, compile_rules([("kernel", "cpu:1")]), None))
    "cpu:1 (from rule 0 ('kernel'))"
    """
    rule = None
    if own is not None:
        origin, request = own
    elif block is not NO_BLOCK:
        origin, request = Origin.BLOCK, block
    else:
        for i, (pattern, target) in enumerate(rules):
            if pattern.search(name):
                origin, request, rule = Origin.RULE, target, (i, pattern.pattern)
                break
        else:
            return DEFAULT
    return _from_request(origin, request, rule, name, shape, mesh, nbytes, loads or Loads(), soft)


def _from_request(
    origin: Origin,
    request: Any,
    rule: tuple[int, str] | None,
    name: str,
    shape: tuple[int, ...],
    mesh: Mesh | None,
    nbytes: int,
    loads: Loads,
    soft: bool,
) -> Placement:
    """The `Placement` `request` gives variable `name`: a round-robin's pick, resolved.

    With `soft`, a device string that names no device gives JAX's default device and a warning."""
    target = loads.pick(request, nbytes) if isinstance(request, RoundRobin) else request
    try:
        sharding = None if target is None else resolve(target, name, shape, mesh)
    except NoDeviceError as e:
        if not soft:
            raise PlacementError(f"{e} {_SOFT_HINT}") from None
        warnings.warn(
            f"Variable '{name}': device spec {target!r} matches no device; soft placement puts it on the "
            f"default device ({describe(or_default(None))}).",
            stacklevel=5,  # the model's `s.variable` line, when a model is traced
        )
        return Placement(None, origin, request, rule, fallback=target)
    return Placement(sharding, origin, request, rule)


_SOFT_HINT = (
    "Pass `soft_placement=True` to `jstate.init` (or `abstract`) to put such variables on the default device instead."
)


def unused_rules(rules: Rules, names: Sequence[str]) -> tuple[tuple[int, str], ...]:
    """``(index, pattern)`` of each rule whose regex matches none of `names`.

    >>> unused_rules(compile_rules([("kernel", "cpu:0"), ("bias", "cpu:1")]), ["layer1/kernel"])
    ((1, 'bias'),)
    """
    return tuple((i, p.pattern) for i, (p, _) in enumerate(rules) if not any(p.search(n) for n in names))


def replace(
    specs: dict[str, Any], values: dict[str, jax.Array], mesh: Mesh | None, rules: Any
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """`specs` re-placed for `mesh` and `rules`, and `values` moved to their new shardings.

    Placements the model declared are kept, with PartitionSpecs re-bound to the new mesh; every
    other variable follows the new rules (`State.replace_placement`'s work).

    Args:
      specs: every declared variable, by name.
      values: the initialized ones' values.
      mesh: the new mesh, or None.
      rules: the new ``[(regex, placement), ...]``.

    Returns:
      The new specs and the moved values (uncommitted where a variable has no placement).

    Raises:
      PlacementError: a placement does not fit on the new mesh.

    >>> specs, values = replace(state.specs, dict(state), None, [("weights", "cpu:3")])
    >>> str(specs["weights"].placement), values["weights"].devices()
    ("cpu:3 (from rule 0 ('weights'))", {CpuDevice(id=3)})
    """
    compiled = compile_rules(rules)
    loads = Loads()  # round-robins spread again, in name order
    new = {}
    for n, spec in specs.items():
        p = spec.placement
        if p.declared:
            # A variable placed softly once stays soft: its model opted in.
            p = _from_request(
                p.origin, p.request, None, n, spec.shape, mesh, spec.nbytes, loads, p.fallback is not None
            )
        else:
            p = choose(n, spec.shape, None, NO_BLOCK, compiled, mesh, nbytes=spec.nbytes, loads=loads)
        new[n] = dataclasses.replace(spec, placement=p)
    names = list(values)
    moved = jax.device_put([values[n] for n in names], [or_default(new[n].sharding) for n in names])
    # A variable with no placement is left uncommitted, as `init` leaves it.
    moved = [v if new[n].sharding is not None else uncommitted(v) for n, v in zip(names, moved)]
    return new, dict(zip(names, moved))


def reshape(placement: Placement, name: str, old: tuple[int, ...], new: tuple[int, ...]) -> Placement:
    """`placement` re-derived for variable `name`, re-declared from shape `old` to `new`.

    A declared or rule-given spec is resolved again for the new shape (a PartitionSpec over the
    mesh it was bound to); a device already chosen (one device, a round-robin's pick, a soft
    fallback) holds any shape and is kept.

    Args:
      placement: the variable's placement.
      name: the variable, for errors.
      old: its declared shape.
      new: its new shape.

    Raises:
      PlacementError: the placement cannot hold the new shape (naming both shapes).

    >>> str(reshape(state.placement("biases"), "biases", (200,), (300,)))
    'default (from default)'
    """
    sharding = placement.sharding
    if sharding is None or isinstance(sharding, SingleDeviceSharding) or placement.fallback is not None:
        return placement
    request = placement.request if placement.request is not None else sharding
    try:
        resharded = resolve(request, name, new, getattr(sharding, "mesh", None))
        resharded.shard_shape(new)  # any other `Sharding` checks the shape here
    except ValueError as e:
        raise PlacementError(
            f"Cannot redeclare variable '{name}' from shape {old} to {new}: its placement {placement} "
            f"cannot hold the new shape. {e}"
        ) from None
    return dataclasses.replace(placement, sharding=resharded)


def or_default(sharding: Sharding | None) -> Sharding:
    """`sharding`, or this process's first device for a variable with no placement.

    >>> or_default(None).device_set
    {CpuDevice(id=0)}
    """
    return sharding or SingleDeviceSharding(jax.local_devices()[0])


def constrain(value: Any, sharding: Sharding | None) -> Any:
    """`value` on `sharding`: an eager value moved there, a traced one constrained to it.

    What keeps every value a State takes (`assign`, `merge`, `constrain`) where its variable is
    declared, eagerly and under `jax.jit`. With no sharding, a traced value is left as it is and an
    eager one made a JAX array.

    Args:
      value: an array, a tracer, or anything `jnp.asarray` takes.
      sharding: the variable's sharding, or None (no placement).

    Returns:
      The value on `sharding`; unchanged (not copied) if it is there already.

    >>> constrain(jnp.zeros(8), jax.sharding.SingleDeviceSharding(jax.devices()[2])).devices()
    {CpuDevice(id=2)}
    """
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


def uncommitted(value: jax.Array) -> jax.Array:
    """`value` as an uncommitted array: what `jstate.init` gives a variable with no placement.

    `jax.jit` moves an uncommitted argument next to its other arguments (onto a mesh, say), where
    a committed one on a single device would make it fail ("incompatible devices"). A value on
    one device keeps its device and its buffer: nothing is copied, and the result shares the
    buffer with `value` (donating one deletes both). A value on several devices is first copied
    to this process's first device. PRNG keys stay keys; tracers and uncommitted values are
    returned as they are.

    >>> committed = jax.device_put(jnp.arange(3.0), jax.devices()[0])
    >>> committed.committed, uncommitted(committed).committed
    (True, False)
    """
    if isinstance(value, jax.core.Tracer) or not isinstance(value, jax.Array) or not value.committed:
        return value
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        data = uncommitted(jax.random.key_data(value))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(value))
    if len(value.sharding.device_set) > 1:
        value = jax.device_put(value, or_default(None))
    try:
        # JAX has no public way to drop the commitment of an array that is already on a device:
        # `device_put` keeps it, and going through host memory copies the bytes twice on an
        # accelerator. The array's own constructor re-labels the same buffer.
        return type(value)(value.aval, value.sharding, value._arrays, committed=False)
    except (AttributeError, TypeError):  # a JAX whose arrays are built differently: copy instead
        return jax.device_put(np.asarray(value))
