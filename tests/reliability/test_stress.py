"""Chaos: several processes, each with several Savers (blocking and not), save into one directory
while a reader reads it, and the parent interrupts them (SIGINT) and kills them (SIGKILL, and
SIGTERM's default) at random moments. Afterwards every save that returned is listed, or was
retired by a policy of its own prefix, and every listed checkpoint restores a whole save.

The schedule (which child, which signal, which Saver, step and mode) follows one seed, paced by
the writers' own reports (a signal after a random number of them), so a slow machine gets the same
chaos, only slower; where in a save each signal lands does not follow the seed, so each run meets
the saves at other moments. About 45 seconds on two cores.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import jstate
from jstate.checkpoint import lookup as _checkpoint
from jstate.formats.manifest import FILE, Manifest

pytestmark = pytest.mark.slow  # a chaos run of about 45 s

SEED = 11
ROUNDS = 40  # signals sent, or chances to send one
WRITERS = 3
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}

# Prefixes: "k" keeps everything (its steps collide across writers: the same paths); "k-1" keeps
# one, and must never take "k-1" (prefix "k", step 1) with it; "r" keeps 1 to 3, steps jumping
# back and forth like resumed runs.
CHILD = textwrap.dedent(
    """
    import os, random, sys
    import jax.numpy as jnp
    import jstate

    def say(*parts):  # one write: a line is whole or missing, even when a signal lands
        os.write(1, (" ".join(map(str, parts)) + "\\n").encode())

    index, seed = int(sys.argv[1]), int(sys.argv[2])
    rng = random.Random(seed)
    savers = [("k", jstate.Saver(), 6), ("k-1", jstate.Saver(max_to_keep=1), 4),
              ("r", jstate.Saver(max_to_keep=rng.choice([1, 2, 3])), 20)]
    say("ready")
    for i in range(200):
        prefix, saver, steps = rng.choice(savers)
        step, blocking, value = rng.randrange(steps), rng.random() < 0.5, index * 1000 + i
        path = f"ckpt/{prefix}-{step}"
        try:
            say("begin", path, value)
            state = jstate.State({"x": jnp.full((8, 8), value, jnp.float32), "y": jnp.arange(16, dtype=jnp.int32) + value})
            saver.save(state, f"ckpt/{prefix}", step=step, blocking=blocking)
            saver.wait()
            say("saved", path, value)
        except KeyboardInterrupt:
            say("interrupted", path, value)
    """
)

READER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import jax.numpy as jnp
    import numpy as np
    import jstate

    target = jstate.State({"x": jnp.zeros((8, 8), jnp.float32), "y": jnp.zeros(16, jnp.int32)})
    stop, reads, problems = Path(sys.argv[1]), 0, []
    print("ready", flush=True)
    while not stop.exists():
        try:
            if jstate.latest_checkpoint("ckpt") is None:
                problems.append("latest_checkpoint returned None")
            jstate.open_checkpoint("ckpt")
            r = jstate.Saver().restore("ckpt", target)
            x, y = np.asarray(r["x"]), np.asarray(r["y"])
            if not ((x == x.flat[0]).all() and (y == np.arange(16) + int(x.flat[0])).all()):
                problems.append(f"a mix of saves: {x.flat[0]} {y[:2]}")
        except Exception as e:
            problems.append(f"{type(e).__name__}: {e}")
        reads += 1
    print(json.dumps({"reads": reads, "count": len(problems), "problems": problems[:5]}), flush=True)
    """
)


class Child:
    """A writer process; each line it says, and its exit, is also put on `events`."""

    def __init__(self, index: int, seed: int, cwd: Path, events: queue.Queue):
        self.index = index
        self.lines: list[str] = []
        self.events = events
        self.process = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(index), str(seed)],
            cwd=cwd,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            self.events.put(line)
        self.events.put("exited")

    @property
    def ready(self) -> bool:
        return "ready\n" in self.lines

    def finish(self) -> None:
        self.process.wait(timeout=60)
        self._reader.join(timeout=10)


def test_many_writers_and_signals_lose_nothing(tmp_path):
    rng = random.Random(SEED)
    ckpt = tmp_path / "ckpt"
    base = jstate.State({"x": jnp.full((8, 8), 7, jnp.float32), "y": jnp.arange(16, dtype=jnp.int32) + 7})
    jstate.Saver().save(base, ckpt / "base")  # never deleted: a reader never rightly sees none
    stop = tmp_path / "stop"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(stop)], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, text=True
    )
    done: list[Child] = []
    signals = {"SIGINT": 0, "SIGKILL": 0, "SIGTERM": 0}
    events: queue.Queue[str] = queue.Queue()
    children = [Child(i, rng.randrange(2**31), tmp_path, events) for i in range(WRITERS)]
    spawned = WRITERS
    try:
        for _ in range(ROUNDS):
            for _ in range(rng.randint(1, 6)):  # the writers report that many steps of their saves
                events.get(timeout=120)
            for child in [c for c in children if c.process.poll() is not None]:
                children.remove(child)
                done.append(child)
                children.append(Child(spawned, rng.randrange(2**31), tmp_path, events))
                spawned += 1
            child = rng.choice(children)
            action = rng.choices(["SIGINT", "SIGKILL", "SIGTERM", None], weights=[5, 2, 1, 2])[0]
            if action is not None and child.ready:
                child.process.send_signal(getattr(signal, action))
                signals[action] += 1
        for child in children:
            child.process.send_signal(signal.SIGKILL if rng.random() < 0.5 else signal.SIGTERM)
    finally:
        for child in children:
            child.process.kill()
            child.finish()
        stop.touch()
        read_out, _ = reader.communicate(timeout=60)
        reader.kill()
    done += children

    begun: dict[str, set[int]] = {}
    saved: list[tuple[str, int]] = []
    for child in done:
        for line in child.lines:
            parts = line.split()
            if len(parts) == 3 and parts[0] in ("begin", "saved") and parts[2].isdigit():
                name, value = Path(parts[1]).name, int(parts[2])
                if parts[0] == "begin":
                    begun.setdefault(name, set()).add(value)
                else:
                    saved.append((name, value))
    assert len(saved) >= 10 and sum(signals.values()) >= 10, (len(saved), signals)  # it did exercise them

    # Every listed checkpoint restores a whole save that was made to that path.
    target = jstate.State({"x": jnp.zeros((8, 8), jnp.float32), "y": jnp.zeros(16, jnp.int32)})
    found = {}
    for ckpt_ in _checkpoint.checkpoints(ckpt):
        restored = jstate.Saver().restore(ckpt_.path, target)
        x, y = np.asarray(restored["x"]), np.asarray(restored["y"])
        value = int(x.flat[0])
        assert (x == value).all() and (y == np.arange(16) + value).all(), ckpt_.path
        assert ckpt_.path.name == "base" or value in begun[ckpt_.path.name], (ckpt_.path, value)
        found[ckpt_.path.name] = value
    assert found["base"] == 7

    # Every save that returned is listed, unless a policy of its own prefix retired it.
    for name, _ in saved:
        prefix = name.rsplit("-", 1)[0]
        if prefix == "k":  # keeps everything; and "k-1" is never taken by the Savers of prefix "k-1"
            assert name in found and found[name] in begun[name], name
    for prefix in ("k-1", "r"):  # the most recently committed of a prefix is never retired
        if any(name.rsplit("-", 1)[0] == prefix for name, _ in saved):
            assert any(n.rsplit("-", 1)[0] == prefix for n in found), prefix

    read = json.loads(read_out.splitlines()[-1])
    print(f"{spawned} writers, {len(saved)} saves returned, {len(found)} listed, signals {signals}, {read}")
    assert read["count"] == 0 and read["reads"] > 20, read

    # Every writer is gone: the next save into the directory removes everything they left,
    # except directories a writer killed right after making them left empty.
    jstate.Saver().save(base, ckpt / "final")
    for child in sorted(ckpt.iterdir()):
        manifest = Manifest.read(child)
        if manifest is None:
            assert not any(child.iterdir()), f"{child} holds files no checkpoint names"
        else:
            assert {e.name for e in child.iterdir()} == {FILE, manifest.arrays}, child
