"""Which old checkpoints a Saver deletes: a pure function of the checkpoints and the policy."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol, TypeVar


class Saved(Protocol):
    """What retention needs to know of a checkpoint (a `Checkpoint` is one): its `step` and
    when it was `created`."""

    step: int | None
    created: float


S = TypeVar("S", bound=Saved)


@dataclasses.dataclass(frozen=True)
class Policy:
    """TensorFlow Saver's retention arguments.

    Attributes:
      max_to_keep: keep the N most recently saved checkpoints (None keeps all).
      keep_every_n_hours: also keep, for good, one checkpoint per N hours.
      keep_every_n_steps: also keep, for good, checkpoints whose step is a multiple of N.

    Raises:
      ValueError: a negative or zero count or period (``max_to_keep=0`` keeps all, as in TF).

    >>> Policy(max_to_keep=0).max_to_keep is None
    True
    """

    max_to_keep: int | None = None
    keep_every_n_hours: float | None = None
    keep_every_n_steps: int | None = None

    def __post_init__(self):
        for arg in ("max_to_keep", "keep_every_n_steps"):
            value = getattr(self, arg)
            if value is not None and (value < 0 or (arg == "keep_every_n_steps" and value == 0)):
                raise ValueError(f"Saver: `{arg}` must be a positive number or None, got {value}.")
        if self.keep_every_n_hours is not None and self.keep_every_n_hours <= 0:
            raise ValueError(f"Saver: `keep_every_n_hours` must be positive or None, got {self.keep_every_n_hours}.")
        if self.max_to_keep == 0:  # TensorFlow's Saver: 0 or None keeps every checkpoint
            object.__setattr__(self, "max_to_keep", None)


def to_delete(policy: Policy, saved: Sequence[S], newest: S | None = None) -> list[S]:
    """The checkpoints of one prefix that `policy` deletes.

    Args:
      policy: the retention policy.
      saved: the prefix's checkpoints, in any order; they are ordered by `created`, so the
        most recently saved are kept whatever their steps (as TensorFlow's Saver does).
      newest: the checkpoint just written, never deleted. It is ordered by its `created` like
        the others: a checkpoint another writer committed after it is more recent, and kept.

    Beyond the newest `max_to_keep`, a checkpoint survives if its step is a multiple of
    `keep_every_n_steps`, or if it is the first one at least `keep_every_n_hours` after the
    last one kept that way. Checkpoints without a step are never deleted.

    >>> from types import SimpleNamespace as C
    >>> saved = [C(step=s, created=i * 3600.0) for i, s in enumerate((1000, 2000, 10, 20))]
    >>> [c.step for c in to_delete(Policy(max_to_keep=2), saved)]  # by save order, not step
    [1000, 2000]
    >>> saved = [C(step=s, created=s * 3600.0) for s in range(5)]
    >>> [c.step for c in to_delete(Policy(max_to_keep=2, keep_every_n_hours=2), saved)]
    [1]
    """
    if policy.max_to_keep is None:
        return []
    # With several writers of one prefix, another may commit after `newest`: placing `newest`
    # last regardless would delete that more recent checkpoint, and both writers deleting each
    # other's could leave the prefix with none. A stable sort puts `newest` last among equals.
    ordered = sorted(
        [c for c in saved if c.step is not None and c is not newest] + ([newest] if newest is not None else []),
        key=lambda c: c.created,
    )
    old = ordered[: max(len(ordered) - policy.max_to_keep, 0)]
    kept_for_good: set[int] = set()
    last_kept_time = None
    for i, ckpt in enumerate(ordered):
        if policy.keep_every_n_steps and ckpt.step % policy.keep_every_n_steps == 0:
            kept_for_good.add(i)
        if policy.keep_every_n_hours is not None and (
            last_kept_time is None or ckpt.created >= last_kept_time + policy.keep_every_n_hours * 3600
        ):
            kept_for_good.add(i)
            last_kept_time = ckpt.created
    return [c for i, c in enumerate(old) if i not in kept_for_good and c is not newest]
