"""Finding checkpoints by path: `latest_checkpoint`, `Saver.restore` and `Saver.plan` on a directory
of checkpoints, relative paths included, and what a path that names nothing raises."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jstate
from jstate import transforms as T

S = jax.ShapeDtypeStruct


def small(value: float = 1.0) -> jstate.State:
    return jstate.State.from_tree({"w": jnp.full((8,), value, jnp.float32)})


def test_the_current_directory_is_a_directory_of_checkpoints(tmp_path, monkeypatch):
    """ "." names the current directory of checkpoints for `latest_checkpoint`, `restore` and
    `plan`, like any other directory."""
    monkeypatch.chdir(tmp_path)
    jstate.Saver().save({"w": np.ones((2, 3), np.float32)}, "model", step=1)
    monkeypatch.chdir(tmp_path)
    assert jstate.latest_checkpoint(".") == "model-1"
    target = {"w": S((2, 3), jnp.float32)}
    assert (jstate.Saver().restore(".", target)["w"] == 1).all()
    assert jstate.Saver([("k", T.transpose("w"))]).plan(".", {"k": S((3, 2), jnp.float32)}).problems == []


def test_an_empty_path_is_a_checkpoint_error_not_a_value_error():
    """An empty path names no checkpoint: a CheckpointError, like any path that names none."""
    with pytest.raises(jstate.CheckpointError):
        jstate.Saver().restore("", {"w": S((2,), jnp.float32)})


def test_lookups_on_local_paths_run_in_the_callers_thread(tmp_path, monkeypatch):
    """No thread for a local path: a lookup there is fast, and a thread would cost more than it."""
    from jstate.storage import deadlines as _limits

    monkeypatch.chdir(tmp_path)
    path = jstate.Saver().save(small(4.0), "ckpt/model", step=1)

    def within(*args, **kwargs):
        raise AssertionError("a local lookup went to a thread")

    monkeypatch.setattr(_limits, "within", within)
    assert jstate.latest_checkpoint("ckpt", timeout=1) == path
    assert jstate.load_variable(path, "w", timeout=1)[0] == 4.0
    assert [row[0] for row in jstate.list_checkpoints("ckpt", timeout=1)] == [path]
    assert jstate.Saver(timeout=1).restore("ckpt", small())["w"][0] == 4.0
