"""A save or a deletion killed at any moment (SIGKILL) never costs an earlier checkpoint."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

import jstate

CHILD = textwrap.dedent(
    """
    import sys, jax, jax.numpy as jnp, jstate
    def model(s):
        for i in range(20):
            s.variable(f"v{i}", jstate.initializers.zeros, (256, 256))
    state = jstate.init(model, jax.random.key(0))
    saver = jstate.Saver(max_to_keep=2)
    for step in range(1, 1000):
        state = jax.tree.map(lambda x: jnp.full_like(x, step), state)
        saver.save(state, sys.argv[1] + "/model", step=step)
        print(step, flush=True)
    """
)


def model(s):
    for i in range(20):
        s.variable(f"v{i}", jstate.initializers.zeros, (256, 256))


def run_and_kill(directory, delay):
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(directory)], stdout=subprocess.PIPE, text=True)
    first = child.stdout.readline()  # the first save is complete
    assert first.strip() == "1", first
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()
    return int(first)


@pytest.mark.parametrize("seed", range(4))
def test_sigkill_mid_save_or_delete_leaves_every_listed_checkpoint_restorable(tmp_path, seed):
    delay = random.Random(seed).uniform(0.0, 1.5)
    run_and_kill(tmp_path, delay)
    latest = jstate.latest_checkpoint(tmp_path)
    assert latest is not None
    listed = [c.path for c in jstate.checkpoint.lookup.checkpoints(tmp_path)]
    assert 1 <= len(listed) <= 3  # max_to_keep=2, plus at most one whose deletion was cut short
    for path in listed:
        step = int(path.name.split("-")[1])
        restored = jstate.Saver().restore(path, jstate.abstract(model))
        for name in restored:
            assert np.all(np.asarray(restored[name]) == step), (path, name)
    # The next save cleans what the killed one left behind.
    state = jstate.init(model, jax.random.key(0))
    jstate.Saver().save(state, tmp_path / "model", step=10_000)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
