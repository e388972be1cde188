"""Round-robin placement: TF's ``tf.train.replica_device_setter``, which spreads variables over
parameter-server tasks one after another (or, with ``GreedyLoadBalancingStrategy``, each onto the
least-loaded task by bytes).

This module only chooses among the devices it is given; `placement` turns the choice into a
`Sharding`. Nothing here is global: the loads live in one trace of one model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax

from ..core.errors import PlacementError

_BY = ("order", "size")


@dataclasses.dataclass(frozen=True)
class RoundRobin:
    """Devices that variables are spread over, one after another; see `round_robin`.

    >>> str(jstate.round_robin(["cpu:0", "cpu:1"], by="size"))
    'round-robin by size'
    """

    devices: tuple[str | jax.Device, ...]
    by: str = "order"

    def __str__(self) -> str:
        return f"round-robin by {self.by}"


def round_robin(devices: Sequence[str | jax.Device], by: str = "order") -> RoundRobin:
    """Spread variables over `devices`, as TF's ``tf.train.replica_device_setter`` does.

    Use it wherever a device spec goes: ``with s.placement(jstate.round_robin([...])):`` (TF's
    ``with tf.device(tf.train.replica_device_setter(...)):``), or as a rule's target,
    ``rules=[(r".*", jstate.round_robin([...]))]``. Each variable it places goes to one device:

      by="order"   the next device, in declaration order (TF's default round-robin strategy)
      by="size"    the device holding the fewest bytes so far, the first one on a tie (TF's
                   ``GreedyLoadBalancingStrategy`` with its byte-size load function)

    Equal round-robins share their count, as one TF device function would: the same list in a
    placement block and a rule continues one rotation. `jstate.explain_placement` shows where
    each variable went. `State.replace_placement` spreads again, in name order.

    Args:
      devices: device specs (``"cpu:1"``, ``"/job:ps/task:0"``) or `jax.Device`s.
      by: ``"order"`` or ``"size"``.

    Returns:
      A device spec for `Scope.placement`, ``device=`` and ``rules=``.

    Raises:
      PlacementError: `devices` is empty or not a list, or `by` is neither.

    >>> def model(s):
    ...     with s.placement(jstate.round_robin(["cpu:0", "cpu:1"])):
    ...         for name in ("a", "b", "c"):
    ...             s.variable(name, jstate.initializers.zeros, (2,))
    >>> [str(p.placement) for p in jstate.abstract(model).specs.values()]
    ['cpu:0 (from placement block, round-robin by order)', 'cpu:1 (from placement block, round-robin by order)', 'cpu:0 (from placement block, round-robin by order)']
    """
    if isinstance(devices, (str, jax.Device)) or not isinstance(devices, Sequence):
        raise PlacementError(
            f"`round_robin` takes a list of devices, got {devices!r}. Write `round_robin([{devices!r}, ...])`."
        )
    if not devices:
        raise PlacementError("`round_robin` needs at least one device, got an empty list.")
    for device in devices:
        if not isinstance(device, (str, jax.Device)):
            raise PlacementError(
                f"`round_robin` device {device!r} ({type(device).__name__}) is not a device spec: "
                "give device strings such as 'cpu:0' or '/job:ps/task:1', or `jax.Device`s."
            )
    if by not in _BY:
        raise PlacementError(f'`round_robin(..., by={by!r})`: `by` is "order" or "size".')
    return RoundRobin(tuple(devices), by)


class Loads:
    """How much each round-robin has placed on each of its devices so far, in one trace.

    >>> loads, spread = Loads(), jstate.round_robin(["cpu:0", "cpu:1"])
    >>> [loads.pick(spread, nbytes=4) for _ in range(3)]
    ['cpu:0', 'cpu:1', 'cpu:0']
    """

    __slots__ = ("_loads",)

    def __init__(self) -> None:
        self._loads: dict[RoundRobin, list[int]] = {}

    def pick(self, spread: RoundRobin, nbytes: int) -> str | jax.Device:
        """The device the next variable goes to, counted as placed there (see the class example).

        Args:
          spread: the round-robin.
          nbytes: the variable's size, counted by a round-robin ``by="size"``.
        """
        loads = self._loads.setdefault(spread, [0] * len(spread.devices))
        # Counting variables instead of bytes makes the least-loaded device the next in turn.
        i = loads.index(min(loads))
        loads[i] += 1 if spread.by == "order" else nbytes
        return spread.devices[i]
