"""The everyday paths of Flax, optax and Orbax users: optax states, lists and tuples, relative
paths."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jstate


@pytest.fixture
def adam_checkpoint(tmp_path):
    """An optax Adam state (a tuple of namedtuples) and params saved by plain Orbax."""
    params = {"dense": {"kernel": jnp.arange(6.0).reshape(3, 2), "bias": jnp.ones(2)}}
    tree = {"params": params, "opt_state": optax.adam(1e-3).init(params), "step": jnp.int32(7)}
    tree["opt_state"][0].mu["dense"]["kernel"] += 5.0  # distinct from the params
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "orbax", tree)
    checkpointer.wait_until_finished()
    return tmp_path / "orbax", tree


def test_orbax_trees_with_tuples_list_load_and_restore_with_renaming(adam_checkpoint):
    path, tree = adam_checkpoint
    names = [n for n, *_ in jstate.list_variables(path)]
    assert "opt_state/0/mu/dense/kernel" in names and "opt_state/0/count" in names
    np.testing.assert_array_equal(
        jstate.load_variable(path, "opt_state/0/mu/dense/kernel"), tree["opt_state"][0].mu["dense"]["kernel"]
    )
    target = jstate.State.from_tree({"mu": jax.ShapeDtypeStruct((3, 2), jnp.float32)})
    restored = jstate.Saver({"opt_state/0/mu/dense/kernel": "mu"}).restore(path, target)
    np.testing.assert_array_equal(restored["mu"], tree["opt_state"][0].mu["dense"]["kernel"])


def test_relative_checkpoint_paths_work_everywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = jstate.State({"w": jnp.arange(4.0)})
    saver = jstate.Saver()
    path = saver.save(state, "ckpt/model", step=1)
    assert path == "ckpt/model-1"
    saver.save(state, "ckpt/model", step=2, blocking=False)
    saver.wait()
    assert jstate.latest_checkpoint("ckpt") == "ckpt/model-2"
    np.testing.assert_array_equal(jstate.load_variable("ckpt/model-1", "w"), state["w"])
    restored = saver.restore("ckpt", jstate.State.from_tree({"w": jax.ShapeDtypeStruct((4,), jnp.float32)}))
    np.testing.assert_array_equal(restored["w"], state["w"])
