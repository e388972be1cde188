"""Preemption-safe training (`jstate.Preemption`): a notice saves the next step boundary, every
process of a job saves the same step, and a run resumes from it bit-exactly.

The loops that get real signals from the test run in child processes (tests/preemption_worker.py);
the handler tests run here, with a recording handler in place of the default one, so that a
signal jstate lets through is seen rather than ending pytest. Everything waits on events (a line
a child prints, a handler that ran), never on a sleep.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import pytest

import jstate

WORKER = Path(__file__).parents[1] / "preemption_worker.py"
_spec = importlib.util.spec_from_file_location("preemption_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


# -- the handlers -------------------------------------------------------------------------------
def _watchdogs_ended() -> bool:
    """Whether no watchdog is left to deliver a signal later (each is cancelled or has fired)."""
    for thread in threading.enumerate():
        if thread.name == "jstate-preemption-watchdog":
            thread.join(timeout=10)
    return not any(t.name == "jstate-preemption-watchdog" for t in threading.enumerate())


class Recorder(list):
    """A signal handler that records the signals it gets."""

    def __init__(self):
        super().__init__()
        self.arrived = threading.Event()

    def handler(self, signum, frame):
        self.append(signum)
        self.arrived.set()


@pytest.fixture
def seen():
    """Signals that reached the handler jstate replaces (a recording one, installed for the test)."""
    recorder = Recorder()
    previous = signal.signal(signal.SIGTERM, recorder.handler)
    yield recorder
    signal.signal(signal.SIGTERM, previous)


def test_without_a_notice_nothing_is_saved_and_the_handler_comes_back(tmp_path, seen):
    state = jstate.State({"x": np.arange(4.0)})
    with jstate.Preemption(jstate.Saver(), tmp_path / "model", grace=20) as preemption:
        assert signal.getsignal(signal.SIGTERM) != seen.handler
        assert [preemption.save_if_preempted(state, step) for step in range(3)] == [None] * 3
        assert not preemption.noticed
    assert signal.getsignal(signal.SIGTERM) == seen.handler
    assert jstate.latest_checkpoint(tmp_path) is None and seen == []


def test_a_notice_saves_the_next_step_once_and_a_second_signal_is_not_caught(tmp_path, seen):
    state = jstate.State({"x": np.arange(4.0)})
    with jstate.Preemption(jstate.Saver(), tmp_path / "model", grace=20) as preemption:
        assert preemption.save_if_preempted(state, 0) is None
        signal.raise_signal(signal.SIGTERM)
        assert seen == [] and preemption.noticed  # held back: the loop saves first
        signal.raise_signal(signal.SIGTERM)  # a second one (the operator insists): never swallowed
        assert seen == [signal.SIGTERM]
        path = preemption.save_if_preempted(state, 1)
        assert path == str(tmp_path / "model-1")
        assert preemption.save_if_preempted(state, 2) == path  # saved once; the loop should have stopped
    assert jstate.latest_checkpoint(tmp_path) == path and _watchdogs_ended()
    assert signal.getsignal(signal.SIGTERM) == seen.handler and seen == [signal.SIGTERM]


def test_a_notice_the_loop_never_acted_on_is_delivered_when_the_block_ends(tmp_path, seen):
    with jstate.Preemption(jstate.Saver(), tmp_path / "model", grace=20):
        signal.raise_signal(signal.SIGTERM)
        assert seen == []
    assert seen == [signal.SIGTERM]  # deferred, not swallowed
    assert _watchdogs_ended() and seen == [signal.SIGTERM]  # once
    assert jstate.latest_checkpoint(tmp_path) is None


def test_a_notice_not_saved_within_grace_is_delivered_by_the_watchdog(tmp_path, seen):
    with jstate.Preemption(jstate.Saver(), tmp_path / "model", grace=0.05):
        signal.raise_signal(signal.SIGTERM)
        assert seen.arrived.wait(timeout=30)  # a step that never ends: the grace runs out
        assert seen == [signal.SIGTERM]
    assert _watchdogs_ended() and seen == [signal.SIGTERM]  # once, not again when the block ends


def test_a_grace_of_1e12_seconds_keeps_its_watchdog_alive(tmp_path, seen, monkeypatch):
    """``grace=1e12`` ("forever") overflowed the watchdog's timer: its thread died (OverflowError)
    and a hung save would never be cut off. It is taken as `deadlines.LONGEST` seconds."""
    died = []  # what threading's excepthook would print to stderr
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(f"{args.thread.name}: {args.exc_value!r}"))
    state = jstate.State({"x": np.arange(4.0)})
    with jstate.Preemption(jstate.Saver(), tmp_path / "model", grace=1e12) as preemption:
        signal.raise_signal(signal.SIGTERM)
        assert preemption.save_if_preempted(state, 1) == str(tmp_path / "model-1")
    assert _watchdogs_ended() and died == [] and seen == []


@pytest.mark.parametrize("grace", [0, -1, float("nan"), float("inf"), "5", True])
def test_a_grace_that_is_no_finite_positive_number_is_an_argument_error(tmp_path, grace):
    with pytest.raises(jstate.ArgumentError, match=r"`jstate.Preemption\(grace=...\)` takes a positive number of sec"):
        jstate.Preemption(jstate.Saver(), tmp_path / "m", grace=grace)


def test_other_signals_on_request_and_a_second_ctrl_c_interrupts(tmp_path):
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    state = jstate.State({"x": np.arange(4.0)})
    try:
        with jstate.Preemption(jstate.Saver(), tmp_path / "model", grace=20, signals=[signal.SIGINT]) as preemption:
            signal.raise_signal(signal.SIGINT)  # caught: saves at the boundary
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
            assert preemption.save_if_preempted(state, 7) == str(tmp_path / "model-7")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_handler_set_inside_the_block_is_left_in_place(tmp_path, seen):
    def mine(signum, frame):
        pass

    with jstate.Preemption(jstate.Saver(), tmp_path / "model", grace=20):
        signal.signal(signal.SIGTERM, mine)
    assert signal.getsignal(signal.SIGTERM) is mine


def test_wrong_arguments_and_uses_are_clear_errors(tmp_path):
    saver = jstate.Saver()
    for grace in (0, -1, float("inf"), float("nan"), "30", True):
        with pytest.raises(ValueError, match=r"grace=.*positive number of seconds"):
            jstate.Preemption(saver, tmp_path / "m", grace=grace)
    with pytest.raises(TypeError, match="takes a `jstate.Saver` first, got str"):
        jstate.Preemption("ckpt", tmp_path / "m", grace=10)
    with pytest.raises(ValueError, match="at least one signal"):
        jstate.Preemption(saver, tmp_path / "m", grace=10, signals=[])
    with pytest.raises(ValueError, match="SIGKILL cannot be caught"):
        jstate.Preemption(saver, tmp_path / "m", grace=10, signals=[signal.SIGTERM, signal.SIGKILL])
    preemption = jstate.Preemption(saver, tmp_path / "m", grace=10)
    with pytest.raises(RuntimeError, match="inside `with jstate.Preemption"):
        preemption.save_if_preempted({"x": np.ones(2)}, 0)
    with preemption, pytest.raises(RuntimeError, match="already in use"):
        preemption.__enter__()
    errors = []

    def enter():
        try:
            jstate.Preemption(saver, tmp_path / "m", grace=10).__enter__()
        except RuntimeError as e:
            errors.append(str(e))

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert errors and "main thread" in errors[0]


# -- real signals to real training loops --------------------------------------------------------
class Child:
    """A worker process whose stdout lines the test waits on."""

    def __init__(self, *args: str, env=None, cwd=None):
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"} if env is None else env,
            cwd=cwd,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.strip())
        self.lines.put("")  # end of output

    def wait_for(self, prefix: str, timeout: float = 120) -> str:
        while True:
            line = self.lines.get(timeout=timeout)
            self.seen.append(line)
            if line.startswith(prefix):
                return line
            assert line or self.process.poll() is None, f"exited before '{prefix}': {self.finish()[1][-3000:]}"

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        try:
            _, err = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()  # SIGKILL: under JAX's preemption service a SIGTERM is only a notice
            _, err = self.process.communicate()
        return self.process.returncode, err


def _saved(line: str) -> tuple[str, int, str]:
    _, path, step, checksum = line.split()
    return path, int(step), checksum


def _preempt(child: Child, after_step: int) -> tuple[str, int, str]:
    child.wait_for(f"step {after_step}")
    child.process.send_signal(signal.SIGTERM)
    saved = _saved(child.wait_for("saved"))
    code, err = child.finish()
    assert code == 0, err[-3000:]
    return saved


def _reference(steps: int):
    """The state after `steps` steps of one uninterrupted run."""
    state, step_fn = worker.initial_state(), jax.jit(worker.train_step)
    for _ in range(steps):
        state = step_fn(state)
    return state


def _assert_same(restored, expected) -> None:
    leaves = zip(jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(expected), strict=True)
    for (path, a), b in leaves:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_sigterm_saves_the_next_step_and_the_resumed_run_matches_an_uninterrupted_one_bit_exactly(tmp_path):
    first_path, first_step, _ = _preempt(Child("train", str(tmp_path)), after_step=3)
    assert first_step >= 3 and first_path == str(tmp_path / f"model-{first_step}")
    second = Child("train", str(tmp_path))  # resumes from the checkpoint, and is preempted again
    second.wait_for(f"step {first_step + 1}")  # its first step: the one after the saved one
    second_path, second_step, _ = _preempt(second, after_step=first_step + 3)
    assert jstate.latest_checkpoint(tmp_path) == second_path
    for path, step in ((first_path, first_step), (second_path, second_step)):
        restored = jstate.Saver().restore(path, worker.initial_state())
        assert int(restored["step"]) == step + 1  # the state after step `step`, counted from 0
        _assert_same(restored, _reference(step + 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def preempt_two_processes(directory: str, service: str, env=None, cwd=None) -> None:
    """Two JAX processes x 4 CPU devices on loopback train (a data-parallel step: gradients
    all-reduce) and save into `directory`; SIGTERM goes to process 1 only: both save the same step."""
    port = _free_port()
    env = {k: v for k, v in (os.environ if env is None else env).items() if k != "XLA_FLAGS"}
    args = [str(directory), str(port), "", "2", service]
    children = []
    try:
        for i in range(2):
            args[2] = str(i)
            children.append(Child("multi", *args, env=env | {"PYTHONUNBUFFERED": "1"}, cwd=cwd))
        for child in children:
            child.wait_for("step 2")
        children[1].process.send_signal(signal.SIGTERM)
        saved = [_saved(child.wait_for("saved")) for child in children]
        for child in children:
            code, err = child.finish()
            assert code == 0, err[-3000:]
    finally:
        for child in children:
            child.process.kill()
    assert saved[0] == saved[1], saved  # one path, one step, the same bits on both processes
    path, step, checksum = saved[0]
    assert path == f"{directory}/model-{step}" and jstate.latest_checkpoint(directory) == path
    restored = jstate.Saver().restore(path, worker.initial_state())
    assert int(restored["step"]) == step + 1
    assert worker.checksum(restored) == checksum  # what both processes held


@pytest.mark.slow
@pytest.mark.parametrize("service", ["jax", "coordinator"])
def test_a_sigterm_to_one_of_two_processes_makes_both_save_the_same_step(tmp_path, service):
    """On a local directory (tests/cloud/test_preemption_cloud.py: on the GCS emulator). With JAX's
    preemption service (on by default) JAX's sync point names the step; without it, the
    processes agree through the coordinator's key-value store."""
    preempt_two_processes(str(tmp_path), service)
