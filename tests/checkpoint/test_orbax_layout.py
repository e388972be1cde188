"""`Saver(layout="orbax")`: checkpoints that plain Orbax reads as its own (StandardCheckpointer into
the user's own tree, CheckpointManager listing and restoring the steps), and that jstate still
reads with all its checks."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jstate
from jstate import initializers as inits

PARAMS = {"dense": {"kernel": jnp.arange(12.0).reshape(4, 3), "bias": jnp.full(3, 0.5)}}
TX = optax.adamw(1e-3)  # (ScaleByAdamState, EmptyState(), EmptyState()): empty nodes too


def training_tree(step):
    grads = jax.tree.map(lambda p: p * step, PARAMS)
    return {"params": PARAMS, "opt_state": TX.update(grads, TX.init(PARAMS), PARAMS)[1], "step": jnp.int32(step)}


def assert_tree_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


@pytest.fixture
def saved(tmp_path):
    saver = jstate.Saver(layout="orbax", max_to_keep=2)
    paths = [saver.save(training_tree(step), tmp_path / "ckpt" / "model", step=step) for step in (100, 200, 300)]
    return tmp_path / "ckpt", paths


def test_plain_orbax_restores_into_the_users_own_tree(saved):
    directory, paths = saved
    assert paths[-1] == str(directory / "model_300")
    target = jax.eval_shape(lambda: training_tree(0))
    restored = ocp.StandardCheckpointer().restore(f"{paths[-1]}/default", target)
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
    assert_tree_equal(restored, training_tree(300))


def test_a_checkpoint_manager_lists_and_restores_the_steps(saved):
    directory, _ = saved
    options = ocp.CheckpointManagerOptions(step_prefix="model", read_only=True)
    with ocp.CheckpointManager(directory, options=options) as manager:
        assert manager.all_steps() == [200, 300]  # retention removed step 100 whole
        assert manager.latest_step() == 300
        restored = manager.restore(200, args=ocp.args.StandardRestore(jax.eval_shape(lambda: training_tree(0))))
    assert_tree_equal(restored, training_tree(200))


def test_jstate_reads_them_with_its_checks(saved):
    directory, paths = saved
    assert jstate.latest_checkpoint(directory) == paths[-1]
    assert jstate.latest_checkpoint(directory / "model") == paths[-1]
    assert [row[1] for row in jstate.list_checkpoints(directory)] == [200, 300]
    ckpt = jstate.open_checkpoint(paths[-1])
    assert ckpt.writer == "jstate" and ckpt.checksums and ckpt.manifest.layout == "orbax"
    assert "opt_state/0/mu/dense/kernel" in ckpt.entries
    restored = jstate.Saver().restore(directory, jax.eval_shape(lambda: training_tree(0)))
    assert_tree_equal(restored, training_tree(300))
    expected = training_tree(300)["opt_state"][0].nu["dense"]["bias"]
    np.testing.assert_array_equal(jstate.load_variable(paths[-1], "opt_state/0/nu/dense/bias"), expected)


def test_damage_is_caught_as_in_jstates_own_layout(saved):
    _, paths = saved
    data = sorted(
        os.path.join(root, f)
        for root, _, files in os.walk(f"{paths[-1]}/default")
        for f in files
        if "/d/" in root + "/"
    )
    with open(data[0], "r+b") as f:
        f.seek(-8, os.SEEK_END)
        last = f.read(8)
        f.seek(-8, os.SEEK_END)
        f.write(bytes(b ^ 0xFF for b in last))
    with pytest.raises(jstate.CorruptCheckpointError):
        jstate.Saver().restore(paths[-1], jax.eval_shape(lambda: training_tree(0)))


def test_a_state_is_saved_as_nested_dicts(tmp_path):
    def model(s):
        s.variable("w", inits.ones, (2, 3))
        s.scope("layer1").variable("kernel", inits.zeros, (3,))

    state = jstate.init(model, jax.random.key(0))
    path = jstate.Saver(layout="orbax").save(state, tmp_path / "model")
    restored = ocp.StandardCheckpointer().restore(f"{path}/default")
    assert jax.tree.structure(restored) == jax.tree.structure({"layer1": {"kernel": 0}, "w": 0})
    np.testing.assert_array_equal(restored["w"], np.ones((2, 3)))
    again = jstate.Saver().restore(path, jstate.abstract(model))
    np.testing.assert_array_equal(again["w"], state["w"])


def test_names_nested_keys_cannot_hold_are_refused(tmp_path):
    state = jstate.State.from_tree({"a": jnp.ones(1), "a/b": jnp.zeros(1)}, flat=True)
    with pytest.raises(
        jstate.InvalidNameError, match=r"layout='orbax'.*'a' holds a value and is also the scope of 'a/b'"
    ):
        jstate.Saver(layout="orbax").save(state, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    jstate.Saver().save(state, tmp_path / "x")  # jstate's own layout holds both


def test_a_checkpoint_is_written_once(saved):
    directory, paths = saved
    with pytest.raises(jstate.CheckpointError, match="writes each checkpoint once"):
        jstate.Saver(layout="orbax").save(training_tree(7), directory / "model", step=300)
    assert_tree_equal(jstate.Saver().restore(paths[-1], training_tree(0)), training_tree(300))


def test_layout_arguments_are_checked():
    with pytest.raises(ValueError, match="'jstate' or 'orbax'"):
        jstate.Saver(layout="flax")
    with pytest.raises(ValueError, match="Leave `pack` out"):
        jstate.Saver(layout="orbax", pack=1024)


def test_what_a_killed_save_left_is_never_listed_and_is_replaced(saved, tmp_path):
    import shutil
    import time

    from jstate.storage import tokens

    directory, paths = saved
    dead = f"{int(time.time()):x}_999999999_deadbeef_{tokens._HOST}"  # a token of no live process
    left = directory / "model_400"  # arrays written, killed before the manifest
    left.mkdir()
    (left / f".saving.{dead}.tmp").write_bytes(b"")
    shutil.copytree(f"{paths[-1]}/default", left / "default")
    assert jstate.latest_checkpoint(directory) == paths[-1]
    path = jstate.Saver(layout="orbax").save(training_tree(400), directory / "model", step=400)
    assert sorted(os.listdir(path)) == ["default", "jstate.json"]
    assert_tree_equal(jstate.Saver().restore(path, training_tree(0)), training_tree(400))


def test_an_orbax_managers_own_step_is_never_taken_for_leftovers(tmp_path):
    with ocp.CheckpointManager(tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(step_prefix="model")) as mgr:
        mgr.save(400, args=ocp.args.StandardSave(PARAMS))
    with pytest.raises(jstate.CheckpointError, match="not a jstate checkpoint"):
        jstate.Saver(layout="orbax").save(training_tree(1), tmp_path / "ckpt" / "model", step=400)
    jstate.Saver(layout="orbax").save(training_tree(1), tmp_path / "ckpt" / "model", step=500)  # cleans beside it
    assert sorted(os.listdir(tmp_path / "ckpt" / "model_400" / "default"))  # untouched
    assert jstate.open_checkpoint(tmp_path / "ckpt" / "model_400").writer == "orbax"


@pytest.mark.parametrize("bare, what", [(jnp.ones(3), "array"), (3.5, "number")])
def test_a_bare_array_or_number_is_refused_before_anything_is_written(tmp_path, bare, what):
    # Orbax's StandardCheckpointer refuses them too ("does not support single arrays or scalars")
    with pytest.raises(jstate.CheckpointError, match=rf"bare {what}.*`saver.save\(\{{'value': x\}}, path\)`"):
        jstate.Saver(layout="orbax").save(bare, tmp_path / "ckpt" / "model", step=1)
    assert not (tmp_path / "ckpt").exists()
    path = jstate.Saver(layout="orbax").save({"value": bare}, tmp_path / "ckpt" / "model", step=1)  # the way
    np.testing.assert_array_equal(ocp.StandardCheckpointer().restore(f"{path}/default")["value"], bare)
    np.testing.assert_array_equal(jstate.Saver().restore(path, {"value": bare})["value"], bare)


def test_a_refused_save_retires_no_earlier_step(tmp_path):
    saver = jstate.Saver(layout="orbax", max_to_keep=1)
    good = saver.save({"value": jnp.ones(3)}, tmp_path / "model", step=1)
    with pytest.raises(jstate.CheckpointError, match="bare array"):
        saver.save(jnp.ones(3), tmp_path / "model", step=2)
    assert sorted(os.listdir(tmp_path)) == ["model_1"]
    assert jstate.latest_checkpoint(tmp_path) == good
    assert saver.last_checkpoints == [good]
    np.testing.assert_array_equal(jstate.Saver().restore(good, {"value": jnp.zeros(3)})["value"], np.ones(3))


def test_only_zero_size_arrays_are_refused(tmp_path):
    empty = {"e": jnp.zeros((0, 4))}
    with pytest.raises(jstate.CheckpointError, match=r"cannot save 'e': every array it would save is zero-size"):
        jstate.Saver(layout="orbax").save(empty, tmp_path / "tree")
    state = jstate.State.from_tree({"e": jnp.zeros((0, 4)), "w": jnp.ones(3)})
    with pytest.raises(jstate.CheckpointError, match="zero-size"):
        jstate.Saver(["e"], layout="orbax").save(state, tmp_path / "subset")
    assert sorted(os.listdir(tmp_path)) == []
    # beside a non-empty array, a zero-size one is in the manifest only: both layouts restore it
    path = jstate.Saver(layout="orbax").save(empty | {"w": jnp.ones(3)}, tmp_path / "mixed")
    assert sorted(os.listdir(path)) == ["default", "jstate.json"]
    restored = jstate.Saver().restore(path, jax.eval_shape(lambda: empty | {"w": jnp.ones(3)}))
    assert restored["e"].shape == (0, 4)
    np.testing.assert_array_equal(restored["w"], np.ones(3))


def test_a_tree_that_lost_arrays_is_never_committed(tmp_path):
    from jstate.checkpoint.writer import Writer

    writer = Writer(compression=False, timeout=60.0, pack=0, layout="orbax")
    with pytest.raises(jstate.CheckpointError, match="holds 0 of the 1 arrays"):
        writer.save({"w": jnp.ones(3)}, tmp_path / "model", None, None, blocking=True, nest=lambda arrays: None)
    assert not (tmp_path / "model").exists()
