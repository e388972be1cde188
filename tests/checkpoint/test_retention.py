"""Retention as TensorFlow's Saver and CheckpointManager do it, with the clock under test control.

As TensorFlow's own `checkpoint_management_test.py` and `saver_test.py` do (they patch the
module's `time`), a fake clock replaces `time` in the modules that read the wall clock: the
Saver (when it is created) and the writer (when a checkpoint is committed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import jstate
from jstate.checkpoint import saver as _saver
from jstate.checkpoint import writer as _writer
from jstate.formats import manifest as _manifest
from jstate.formats.manifest import Manifest

HOUR = 3600.0


class FakeClock:
    """`time` with `time()` under the test's control (every other function is the real one)."""

    def __init__(self, now: float):
        self.now = now

    def time(self) -> float:
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock(1_000_000.0)
    monkeypatch.setattr(_saver, "time", fake)
    monkeypatch.setattr(_writer, "time", fake)
    return fake


def state_of(value: int) -> jstate.State:
    return jstate.State({"x": jnp.full((4,), value, jnp.float32)})


def on_disk(directory: Path) -> list[str]:
    return sorted(p for p in os.listdir(directory) if not p.startswith("."))


def value_at(path) -> int:
    return int(np.asarray(jstate.Saver().restore(path, state_of(0))["x"])[0])


def test_keep_every_n_hours_starts_its_clock_when_the_saver_is_created(tmp_path, clock):
    clock.now += 10 * HOUR  # long after the directory's last checkpoint: irrelevant to a new Saver
    saver = jstate.Saver(max_to_keep=1, keep_every_n_hours=1)
    for step in range(4):  # at 0, 25, 50 and 75 minutes after the Saver was created
        saver.save(state_of(step), tmp_path / "m", step=step)
        clock.now += 25 * 60
    # The first checkpoint is not kept for good (TensorFlow's too): an hour had not passed.
    assert on_disk(tmp_path) == ["m-3"]
    # TensorFlow 1's fixed schedule: one kept past each hour since the Saver was created (step 3 at
    # 75 minutes, then step 5 at 125, step 8 at 200), not an hour after the last one kept.
    for step in range(4, 9):  # 100 ... 200 minutes
        saver.save(state_of(step), tmp_path / "m", step=step)
        clock.now += 25 * 60
    assert on_disk(tmp_path) == ["m-3", "m-5", "m-8"]


# What TensorFlow 2.21's `tf.compat.v1.train.Saver(max_to_keep=2, keep_checkpoint_every_n_hours=2.5 / 3600)`
# left on disk after each save, saving every second from 1.25 s after it was created (a real run).
TF1_ON_DISK = [[1], [1, 2], [2, 3], [3, 4], [3, 4, 5], [3, 5, 6], [3, 5, 6, 7], [3, 5, 7, 8]]


def test_keep_every_n_hours_keeps_what_tensorflow_1s_saver_keeps(tmp_path, clock):
    start = clock.now
    saver = jstate.Saver(max_to_keep=2, keep_checkpoint_every_n_hours=2.5 / HOUR)
    for step, expected in enumerate(TF1_ON_DISK, start=1):
        clock.now = start + step + 0.25
        saver.save(state_of(step), tmp_path / "model", step=step)
        assert on_disk(tmp_path) == [f"model-{s}" for s in expected], step
        assert saver.last_checkpoints == [str(tmp_path / f"model-{s}") for s in (step - 1, step) if s > 0]


def test_a_resumed_run_recovers_the_clock_from_the_directory(tmp_path, clock):
    first = jstate.Saver(max_to_keep=1, keep_every_n_hours=1)
    for step in (0, 1):  # at 0 and 61 minutes: step 1 is kept for good, the clock's next hour starts at 60
        first.save(state_of(step), tmp_path / "m", step=step)
        clock.now += HOUR + 60
    assert on_disk(tmp_path) == ["m-1"]
    clock.now += 5 * 60  # 127 minutes: the job restarts
    resumed = jstate.Saver(max_to_keep=1, keep_every_n_hours=1)
    resumed.save(state_of(2), tmp_path / "m", step=2)  # past the second hour of the recovered clock: kept
    clock.now += 5 * 60
    resumed.save(state_of(3), tmp_path / "m", step=3)
    assert on_disk(tmp_path) == ["m-1", "m-2", "m-3"]


def test_last_checkpoints_lists_only_those_still_subject_to_max_to_keep(tmp_path, clock):
    saver = jstate.Saver(max_to_keep=2, keep_every_n_steps=2)
    for step in range(1, 6):
        saver.save(state_of(step), tmp_path / "m", step=step)
    assert on_disk(tmp_path) == ["m-2", "m-4", "m-5"]  # step 2 kept for good
    assert saver.last_checkpoints == [str(tmp_path / "m-4"), str(tmp_path / "m-5")]

    hourly = jstate.Saver(max_to_keep=1, keep_every_n_hours=1)
    for step in range(3):  # just over 1 h apart: each kept for good as it leaves the window
        clock.now += HOUR + 60
        hourly.save(state_of(step), tmp_path / "h", step=step)
    assert on_disk(tmp_path)[:3] == ["h-0", "h-1", "h-2"]
    assert hourly.last_checkpoints == [str(tmp_path / "h-2")]


def test_a_checkpoint_kept_for_good_survives_a_clock_set_back(tmp_path, clock):
    saver = jstate.Saver(max_to_keep=1, keep_every_n_hours=1)
    clock.now += HOUR + 60
    saver.save(state_of(1), tmp_path / "m", step=1)  # kept for good
    clock.now += 10 * 60
    saver.save(state_of(2), tmp_path / "m", step=2)
    clock.now -= 24 * HOUR  # the machine's clock moves back a day
    for step in (3, 4, 5):
        saver.save(state_of(step), tmp_path / "m", step=step)
        clock.now += 30 * 60
    restarted = jstate.Saver(max_to_keep=1, keep_every_n_hours=1)  # and a restarted job, still behind
    restarted.save(state_of(6), tmp_path / "m", step=6)
    assert on_disk(tmp_path) == ["m-1", "m-6"]
    assert value_at(tmp_path / "m-1") == 1
    clock.now += 61 * 60  # an hour after the restart, on the clock as it now runs: kept again
    restarted.save(state_of(7), tmp_path / "m", step=7)
    clock.now += 60
    restarted.save(state_of(8), tmp_path / "m", step=8)
    assert on_disk(tmp_path) == ["m-1", "m-7", "m-8"]


def test_the_checkpoint_just_saved_is_the_latest_when_the_clock_went_back(tmp_path, clock):
    saver = jstate.Saver(max_to_keep=2)
    saver.save(state_of(1), tmp_path / "model", step=1)
    saver.save(state_of(2), tmp_path / "other", step=2)  # another prefix, same directory
    clock.now -= 24 * HOUR
    jstate.Saver(max_to_keep=2).save(state_of(3), tmp_path / "model", step=3)
    assert jstate.latest_checkpoint(tmp_path) == str(tmp_path / "model-3")
    assert jstate.latest_checkpoint(tmp_path / "model") == str(tmp_path / "model-3")
    assert [row[1] for row in jstate.list_checkpoints(tmp_path)] == [1, 2, 3]
    assert value_at(tmp_path) == 3
    clock.now -= HOUR  # and again: max_to_keep deletes by commit order, not by the clock
    saver.save(state_of(4), tmp_path / "model", step=4)
    saver.save(state_of(5), tmp_path / "model", step=5)
    assert on_disk(tmp_path) == ["model-4", "model-5", "other-2"]
    assert jstate.latest_checkpoint(tmp_path) == str(tmp_path / "model-5")


@pytest.mark.parametrize("recorded", [sys.float_info.max, _manifest.LATEST_TIME])
def test_a_neighbour_recording_an_absurd_order_never_loses_a_save(tmp_path, recorded):
    """A neighbour's manifest (its checksum valid) recording the largest float as its order: the
    next save, ordered after it, was ordered `inf`, which no reader takes: the save returned a
    path never listed. Its order is now always one the reader takes, and it is the latest."""
    other = Path(jstate.Saver().save(state_of(1), tmp_path / "other", step=1))
    raw = json.loads((other / _manifest.FILE).read_bytes())
    (other / _manifest.FILE).write_bytes(_manifest.encode(raw | {"order": recorded}))
    saved = jstate.Saver(max_to_keep=1).save(state_of(5), tmp_path / "model", step=5)
    assert jstate.latest_checkpoint(tmp_path / "model") == saved
    assert value_at(saved) == 5
    assert Manifest.read(Path(saved)).order <= _manifest.LATEST_TIME


@pytest.mark.parametrize(
    "variables", [1, pytest.param(100_000, marks=pytest.mark.slow)]
)  # read whole, and (over 4 MiB) found in its last bytes
def test_a_manifest_of_an_older_jstate_is_ordered_by_its_order_recorded_last(tmp_path, clock, variables):
    """jstate before 0.2 wrote `created` and `order` after the variables, where `read_order` does
    not read a manifest of the current layout: such a neighbour still orders the next save."""
    old = Path(jstate.Saver().save(state_of(1), tmp_path / "old", step=1))
    raw = json.loads((old / _manifest.FILE).read_bytes())
    filler = {f"v{i}": {"shape": [0], "dtype": "float32", "digests": {}} for i in range(variables - 1)}
    head = {k: raw[k] for k in ("format", "version", "step")}
    rest = {k: raw[k] for k in raw if k not in head and k not in ("checksum", "variables", "created", "order")}
    ahead = clock.now + HOUR  # written by a clock an hour ahead of this one
    layout = head | {"variables": raw["variables"] | filler, "created": ahead} | rest | {"order": ahead + 1}
    (old / _manifest.FILE).write_bytes(_manifest.encode(layout))
    assert Manifest.read_order(old) == ahead + 1
    saved = jstate.Saver().save(state_of(2), tmp_path / "new", step=2)
    assert Manifest.read(Path(saved)).order > ahead + 1
    assert jstate.latest_checkpoint(tmp_path) == saved


def test_the_decision_is_recorded_in_the_manifest(tmp_path, clock):
    saver = jstate.Saver(max_to_keep=1, keep_every_n_hours=1, keep_every_n_steps=10)
    first = Manifest.read(Path(saver.save(state_of(1), tmp_path / "m", step=10)))
    assert (first.kept, first.clock, first.order) == (True, clock.now - 0.0, clock.now)
    clock.now += 30 * 60
    second = Manifest.read(Path(saver.save(state_of(2), tmp_path / "m", step=11)))
    assert (second.kept, second.clock) == (False, first.clock)
    unrelated = Manifest.read(Path(jstate.Saver().save(state_of(3), tmp_path / "plain")))
    assert unrelated.kept is None and unrelated.clock is None


def test_checkpoints_of_jstate_0_1_keep_their_old_rule(tmp_path, clock):
    """A manifest that recorded no decision (jstate 0.1) is judged as it was then: the first
    checkpoint and one per period kept for good, by their own commit times."""
    old = jstate.Saver()
    for step in range(4):  # 0, 40, 80, 120 minutes
        path = Path(old.save(state_of(step), tmp_path / "m", step=step))
        manifest = Manifest.read(path)
        dataclasses.replace(manifest, order=0.0, kept=None, clock=None).write(path)
        clock.now += 40 * 60
    jstate.Saver(max_to_keep=1, keep_every_n_hours=1).save(state_of(4), tmp_path / "m", step=4)
    assert on_disk(tmp_path) == ["m-0", "m-2", "m-4"]


def test_keep_every_n_steps_protects_checkpoints_saved_without_it(tmp_path, clock):
    for step in (10, 15, 20):
        jstate.Saver().save(state_of(step), tmp_path / "m", step=step)  # recorded: not kept for good
    jstate.Saver(max_to_keep=1, keep_every_n_steps=10).save(state_of(25), tmp_path / "m", step=25)
    assert on_disk(tmp_path) == ["m-10", "m-20", "m-25"]
