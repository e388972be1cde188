"""Which old checkpoints a Saver deletes, as TensorFlow's Saver and CheckpointManager decide it.

Two decisions, each a pure function:

- when a checkpoint is committed, whether it is kept for good (`keeps`): its step is a multiple
  of `keep_every_n_steps`, or more than `keep_every_n_hours` have passed on the retention clock,
  which starts when the Saver is created or is recovered from the directory (`clock`) and moves
  on by one period per checkpoint kept, as in TensorFlow 1's ``tf.train.Saver``. The decision
  is recorded in the checkpoint's manifest, so no later clock (set back, or another machine's)
  can undo it;
- after each save, which checkpoints of the prefix leave the `max_to_keep` newest in commit
  order (`to_delete`): those not kept for good are deleted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol, TypeVar

from ..core.arguments import integer, positive


class Saved(Protocol):
    """What retention needs to know of a checkpoint (a `NativeCheckpoint` is one): its `step`,
    when it was `created`, its commit `order`, and whether it is `kept` for good (None: not
    recorded)."""

    step: int | None
    created: float
    order: float
    kept: bool | None


S = TypeVar("S", bound=Saved)

MAX_TO_KEEP = "an integer >= 0 (0 or None keeps every checkpoint)"
EVERY_N_STEPS = "an integer >= 1, or None"
EVERY_N_HOURS = "a finite number of hours > 0, or None"


@dataclasses.dataclass(frozen=True)
class Policy:
    """TensorFlow Saver's retention arguments.

    Attributes:
      max_to_keep: keep the N most recently saved checkpoints (None keeps all).
      keep_every_n_hours: also keep, for good, one checkpoint per N hours.
      keep_every_n_steps: also keep, for good, checkpoints whose step is a multiple of N.

    Raises:
      ArgumentError: a count that is no integer >= 0 (``max_to_keep=0`` keeps all, as in TF), a
        step period no integer >= 1, or an hour period no finite number > 0.

    >>> Policy(max_to_keep=0).max_to_keep is None
    True
    """

    max_to_keep: int | None = None
    keep_every_n_hours: float | None = None
    keep_every_n_steps: int | None = None

    def __post_init__(self):
        # Checked here, not where they are used: a 2.5 or NaN would otherwise be taken, then break
        # (or silently change) every later save's retention, after its checkpoint is committed.
        checked = {
            "max_to_keep": None
            if self.max_to_keep is None
            else integer(self.max_to_keep, "Saver(max_to_keep=...)", MAX_TO_KEEP),
            "keep_every_n_steps": None
            if self.keep_every_n_steps is None
            else integer(self.keep_every_n_steps, "Saver(keep_every_n_steps=...)", EVERY_N_STEPS, minimum=1),
            "keep_every_n_hours": None
            if self.keep_every_n_hours is None
            else positive(self.keep_every_n_hours, "Saver(keep_every_n_hours=...)", EVERY_N_HOURS),
        }
        if checked["max_to_keep"] == 0:  # TensorFlow's Saver: 0 or None keeps every checkpoint
            checked["max_to_keep"] = None
        for arg, value in checked.items():
            object.__setattr__(self, arg, value)


def clock(recorded: float | None, started: float, now: float) -> float:
    """When the `keep_every_n_hours` clock last started, for a Saver's first save into a prefix.

    As TensorFlow's CheckpointManager recovers it: the clock recorded by the prefix's newest
    checkpoint (a resumed run keeps its schedule), else when the Saver was created; never
    later than `now` (a clock set back would keep nothing for good until it caught up).

    Args:
      recorded: the newest checkpoint's recorded clock (`Manifest.clock`), if any.
      started: when the Saver was created.
      now: the time of this save.

    >>> clock(None, started=100.0, now=500.0), clock(300.0, started=400.0, now=500.0), clock(900.0, 100.0, 500.0)
    (100.0, 300.0, 500.0)
    """
    return min(started if recorded is None else recorded, now)


def keeps(policy: Policy, step: int | None, now: float, since: float) -> tuple[bool, float]:
    """Whether a checkpoint committed at `now` is kept for good, and the clock after it.

    Kept for good: its step is a multiple of `keep_every_n_steps`, or more than
    `keep_every_n_hours` have passed since the clock's current period started (`since`), which
    then moves on by one period: TensorFlow 1's ``tf.train.Saver`` keeps on a fixed schedule
    (``timestamp > next_checkpoint_time``, then ``next_checkpoint_time += n_hours * 3600``), not
    from the last checkpoint kept, as TF2's CheckpointManager does.

    >>> p = Policy(max_to_keep=1, keep_every_n_hours=1)
    >>> keeps(p, 5, now=3600.0, since=0.0), keeps(p, 6, now=3601.0, since=0.0)
    ((False, 0.0), (True, 3600.0))
    >>> keeps(Policy(max_to_keep=1, keep_every_n_steps=10), 20, now=1.0, since=0.0)
    (True, 0.0)
    """
    by_steps = bool(policy.keep_every_n_steps) and step is not None and step % policy.keep_every_n_steps == 0
    hours = policy.keep_every_n_hours
    by_hours = hours is not None and now - hours * 3600 > since
    return by_steps or by_hours, since + hours * 3600 if by_hours else since


def rotating(policy: Policy, saved: Sequence[S]) -> list[S]:
    """The checkpoints still subject to `max_to_keep` (TF's ``last_checkpoints``): the newest
    `max_to_keep` of `saved` (commit order, oldest first); all of them where none is deleted.

    >>> rotating(Policy(max_to_keep=2), ["a", "b", "c"]), rotating(Policy(), ["a", "b", "c"])
    (['b', 'c'], ['a', 'b', 'c'])
    """
    return list(saved[-policy.max_to_keep :] if policy.max_to_keep else saved)


def to_delete(policy: Policy, saved: Sequence[S], newest: S | None = None) -> list[S]:
    """The checkpoints of one prefix that `policy` deletes.

    Args:
      policy: the retention policy.
      saved: the prefix's checkpoints in commit order, oldest first (`directory.checkpoints`):
        the most recently saved are kept whatever their steps and whatever the writers' clocks.
      newest: the checkpoint just written, never deleted. It keeps its place in `saved` (or,
        not listed there, the place of its `order`): a checkpoint another writer committed
        after it is more recent, and kept.

    Beyond the newest `max_to_keep`, a checkpoint is deleted unless it is kept for good: as
    recorded when it was committed (`keeps`), or because its step is a multiple of
    `keep_every_n_steps` (a rule no clock affects, applied to every checkpoint). Checkpoints that
    recorded nothing (written by jstate 0.1) are also kept as then: each first one at least
    `keep_every_n_hours` after the last one kept that way, by their own commit times.
    Checkpoints without a step are never deleted.

    >>> from types import SimpleNamespace as C
    >>> saved = [C(step=s, created=i * 3600.0, order=i * 3600.0, kept=False) for i, s in enumerate((1000, 2000, 10, 20))]
    >>> [c.step for c in to_delete(Policy(max_to_keep=2), saved)]  # by save order, not step
    [1000, 2000]
    >>> saved[0].kept = True  # kept for good when it was committed: whatever the clock says now
    >>> [c.step for c in to_delete(Policy(max_to_keep=1), saved)]
    [2000, 10]
    """
    if policy.max_to_keep is None:
        return []
    ordered = [c for c in saved if c.step is not None]
    if newest is not None and not any(c is newest for c in ordered):
        # Not listed (another writer deleted it, keeping newer ones): appending it would make it
        # the newest, and delete what that writer kept. (A stable sort: only it moves.)
        later = [i for i, c in enumerate(ordered) if c.order > newest.order]
        ordered.insert(later[0] if later else len(ordered), newest)
    old = ordered[: max(len(ordered) - policy.max_to_keep, 0)]
    legacy = _kept_as_before(policy, [c for c in ordered if c.kept is None])
    every = policy.keep_every_n_steps
    return [c for c in old if not (c.kept or id(c) in legacy or (every and c.step % every == 0)) and c is not newest]


def _kept_as_before(policy: Policy, saved: list[S]) -> set[int]:
    """The ids of the checkpoints without a recorded decision that jstate 0.1 kept for good by
    `keep_every_n_hours`, judged among themselves by their commit times, which never change."""
    kept: set[int] = set()
    last_kept_time = None
    for ckpt in sorted(saved, key=lambda c: c.created):
        if policy.keep_every_n_hours is not None and (
            last_kept_time is None or ckpt.created >= last_kept_time + policy.keep_every_n_hours * 3600
        ):
            kept.add(id(ckpt))
            last_kept_time = ckpt.created
    return kept
