"""A save or a deletion killed at any moment (SIGKILL) never costs an earlier checkpoint: the
moment is the N-th file operation of a save loop, N drawn from the seed."""

import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import jstate

pytestmark = pytest.mark.slow  # four processes killed mid-save

# The child kills itself (SIGKILL) at the N-th file operation after its first save, N drawn from
# the seed: before or after any directory made, file synced, renamed or deleted, in a save or in
# the deletion of a retired checkpoint (about 30 operations a save).
CHILD = textwrap.dedent(
    """
    import os, random, signal, sys, jax, jax.numpy as jnp, jstate
    kill_at, done = random.Random(int(sys.argv[2])).randrange(1, 120), [0]

    def counted(fn):
        def operation(*args, **kwargs):
            if done[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            done[0] += 1
            return fn(*args, **kwargs)
        return operation

    def model(s):
        for i in range(20):
            s.variable(f"v{i}", jstate.initializers.zeros, (256, 256))
    state = jstate.init(model, jax.random.key(0))
    saver = jstate.Saver(max_to_keep=2)
    for step in range(1, 1000):
        state = jax.tree.map(lambda x: jnp.full_like(x, step), state)
        saver.save(state, sys.argv[1] + "/model", step=step)
        print(step, flush=True)
        if step == 1:
            for name in ("mkdir", "rename", "replace", "fsync", "unlink", "rmdir"):
                setattr(os, name, counted(getattr(os, name)))
    """
)


def model(s):
    for i in range(20):
        s.variable(f"v{i}", jstate.initializers.zeros, (256, 256))


def run_and_kill(directory, seed):
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory), str(seed)], stdout=subprocess.PIPE, text=True
    )
    out, _ = child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL, (child.returncode, out)
    assert out.split()[:1] == ["1"], out  # the first save is complete


@pytest.mark.parametrize("seed", range(4))
def test_sigkill_mid_save_or_delete_leaves_every_listed_checkpoint_restorable(tmp_path, seed):
    run_and_kill(tmp_path, seed)
    latest = jstate.latest_checkpoint(tmp_path)
    assert latest is not None
    listed = [c.path for c in jstate.checkpoint.directory.checkpoints(tmp_path)]
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
