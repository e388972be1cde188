"""Directories that Orbax's own CheckpointManager (and Flax's Orbax-based helpers) wrote, read as
they are: steps listed whatever their names, several items as one checkpoint, JSON items as
values, unfinished steps and unreadable items never passed off as something else."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jstate
from jstate.checkpoint.inspect import inspect_checkpoint

PARAMS = {"dense": {"kernel": jnp.arange(12.0).reshape(4, 3), "bias": jnp.full(3, 0.5)}}
TX = optax.adamw(1e-3)


def opt_state(step):
    grads = jax.tree.map(lambda p: p * step, PARAMS)
    return TX.update(grads, TX.init(PARAMS), PARAMS)[1]  # count 1, non-zero moments


def composite(step):
    return ocp.args.Composite(
        params=ocp.args.StandardSave(PARAMS),
        opt_state=ocp.args.StandardSave(opt_state(step)),
        metadata=ocp.args.JsonSave({"step": step, "lr": 1e-3, "tags": ["a", "b"]}),
    )


def write_manager(directory, **options):
    names = ("params", "opt_state", "metadata")
    with ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(max_to_keep=3, **options), item_names=names
    ) as mgr:
        for step in (100, 200, 300, 400):
            mgr.save(step, args=composite(step))
    return directory


@pytest.fixture(scope="module")
def managed(tmp_path_factory):
    return write_manager(tmp_path_factory.mktemp("orbax") / "mgr")


def test_a_managers_directory_lists_its_steps_and_the_latest(managed):
    table = jstate.list_checkpoints(managed)
    assert [(row[0], row[1], row[-1]) for row in table] == [
        (str(managed / str(step)), step, "orbax") for step in (200, 300, 400)
    ]
    assert jstate.latest_checkpoint(managed) == str(managed / "400")
    assert jstate.open_checkpoint(managed).step == 400


@pytest.mark.parametrize("options", [{"step_prefix": "ckpt"}, {"step_prefix": "ckpt", "step_format_fixed_length": 6}])
def test_steps_are_found_whatever_the_step_prefix_and_format(tmp_path, options):
    directory = write_manager(tmp_path / "mgr", **options)
    name = ocp.path.step.standard_name_format(**options).build_name(400)  # ckpt_400, ckpt_000400
    assert jstate.latest_checkpoint(directory) == str(directory / name)
    assert [row[1] for row in jstate.list_checkpoints(directory)] == [200, 300, 400]
    assert jstate.open_checkpoint(directory / name).step == 400


def test_a_step_of_several_items_is_one_checkpoint_named_by_item(managed):
    ckpt = jstate.open_checkpoint(managed / "400")
    assert sorted(ckpt.entries) == [
        "opt_state/0/count",
        "opt_state/0/mu/dense/bias",
        "opt_state/0/mu/dense/kernel",
        "opt_state/0/nu/dense/bias",
        "opt_state/0/nu/dense/kernel",
        "params/dense/bias",
        "params/dense/kernel",
    ]
    assert ckpt.values == {"metadata": {"step": 400, "lr": 1e-3, "tags": ["a", "b"]}}
    assert ckpt.skipped == {}
    np.testing.assert_array_equal(
        jstate.load_variable(managed / "400", "params/dense/kernel"), PARAMS["dense"]["kernel"]
    )
    expected_mu = opt_state(400)[0].mu["dense"]["bias"]
    np.testing.assert_array_equal(jstate.load_variable(managed, "opt_state/0/mu/dense/bias"), expected_mu)
    assert jstate.load_variable(managed / "300", "metadata") == {"step": 300, "lr": 1e-3, "tags": ["a", "b"]}


def test_restores_into_an_eval_shape_target_keeping_optax_types(managed):
    target = jax.eval_shape(lambda: {"params": PARAMS, "opt_state": TX.init(PARAMS)})
    restored = jstate.Saver().restore(managed, target)  # the latest step
    assert jax.tree.structure(restored) == jax.tree.structure(target)
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
    expected = {"params": PARAMS, "opt_state": opt_state(400)}
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(got, want)


def test_restores_one_item_into_a_target_of_that_item(managed):
    restored = jstate.Saver().restore(managed / "200", {"params": jax.tree.map(jnp.zeros_like, PARAMS)})
    np.testing.assert_array_equal(restored["params"]["dense"]["kernel"], PARAMS["dense"]["kernel"])
    with pytest.raises(jstate.CheckpointError, match="opt_state/0/count"):  # never one item for the whole step
        jstate.Saver().restore(managed / "200", {"params": PARAMS}, strict=True)


def test_inspect_lists_items_values_and_unreadable_items(managed, tmp_path, capsys):
    inspect_checkpoint(managed / "400")
    out = capsys.readouterr().out
    assert "params/dense/kernel" in out and "opt_state/0/nu/dense/bias" in out
    assert "metadata" in out and "'tags': ['a', 'b']" in out
    inspect_checkpoint(managed / "400", name="metadata")
    assert "{'step': 400, 'lr': 0.001, 'tags': ['a', 'b']}" in capsys.readouterr().out

    with ocp.CheckpointManager(tmp_path / "mixed", item_names=("params", "proto")) as mgr:
        mgr.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(PARAMS), proto=ocp.args.ProtoSave(_proto())))
    ckpt = jstate.open_checkpoint(tmp_path / "mixed" / "1")
    assert set(ckpt.skipped) == {"proto"} and "ProtoCheckpointHandler" in ckpt.skipped["proto"]
    assert "params/dense/bias" in ckpt.entries
    with pytest.raises(jstate.CheckpointError, match="jstate cannot read 'proto'.*ProtoCheckpointHandler"):
        jstate.load_variable(tmp_path / "mixed" / "1", "proto")


def _proto():
    from google.protobuf import struct_pb2

    message = struct_pb2.Struct()
    message.update({"note": "not an array"})
    return message


def test_unfinished_steps_are_never_listed(managed, tmp_path):
    directory = tmp_path / "mgr"
    shutil.copytree(managed, directory)
    # What Orbax leaves of a save killed midway: the step under its temporary name.
    shutil.copytree(directory / "400", directory / "500.orbax-checkpoint-tmp-1796564270")
    assert jstate.latest_checkpoint(directory) == str(directory / "400")
    assert [row[1] for row in jstate.list_checkpoints(directory)] == [200, 300, 400]
    with pytest.raises(jstate.CheckpointNotFoundError, match="has not finished"):
        jstate.open_checkpoint(directory / "500.orbax-checkpoint-tmp-1796564270")


def test_a_damaged_json_item_makes_its_step_unlisted(managed, tmp_path):
    directory = tmp_path / "mgr"
    shutil.copytree(managed, directory)
    (directory / "400" / "metadata" / "metadata").write_text("{not json")
    with pytest.raises(jstate.CorruptCheckpointError, match="metadata"):
        jstate.open_checkpoint(directory / "400")
    assert jstate.latest_checkpoint(directory) == str(directory / "300")


def test_deeply_nested_json_in_a_step_is_damage_not_a_recursion_error(managed, tmp_path):
    """JSON nested deeper than Python decodes: a JSON item is a damaged item naming its file, and
    a step's `_CHECKPOINT_METADATA` is metadata as unreadable as any other garbled one."""
    directory = tmp_path / "mgr"
    shutil.copytree(managed, directory)
    deep = "[" * 200_000 + "]" * 200_000
    (directory / "300" / "_CHECKPOINT_METADATA").write_text(deep)
    (directory / "400" / "metadata" / "metadata").write_text(deep)
    with pytest.raises(jstate.CorruptCheckpointError, match=r"400/metadata cannot be read .*nested deeper"):
        jstate.open_checkpoint(directory / "400")
    assert jstate.latest_checkpoint(directory) == str(directory / "300")
    assert ("params/dense/bias", (3,), np.dtype("float32")) in jstate.list_variables(directory / "300")


def test_a_single_item_manager_reads_as_its_item(tmp_path):
    with ocp.CheckpointManager(tmp_path / "mgr", options=ocp.CheckpointManagerOptions(max_to_keep=2)) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, args=ocp.args.StandardSave(jax.tree.map(lambda p, s=step: p * s, PARAMS)))
    assert [row[1] for row in jstate.list_checkpoints(tmp_path / "mgr")] == [2, 3]
    assert jstate.list_variables(tmp_path / "mgr") == [
        ("dense/bias", (3,), np.dtype("float32")),
        ("dense/kernel", (4, 3), np.dtype("float32")),
    ]
    restored = jstate.Saver().restore(tmp_path / "mgr", PARAMS)
    np.testing.assert_array_equal(restored["dense"]["kernel"], PARAMS["dense"]["kernel"] * 3)


def test_flax_orbax_helpers_directories(tmp_path):
    from flax.training import checkpoints, orbax_utils, train_state

    state = train_state.TrainState.create(apply_fn=None, params=PARAMS, tx=TX)
    for step in (1, 2, 3):  # Flax's `save_checkpoint`: PyTree checkpoints named checkpoint_<step>
        checkpoints.save_checkpoint(tmp_path / "flax", state.replace(step=step), step=step, keep=2)
    assert [(row[0], row[1]) for row in jstate.list_checkpoints(tmp_path / "flax")] == [
        (str(tmp_path / "flax" / f"checkpoint_{step}"), step) for step in (2, 3)
    ]
    assert jstate.latest_checkpoint(tmp_path / "flax") == str(tmp_path / "flax" / "checkpoint_3")
    np.testing.assert_array_equal(jstate.load_variable(tmp_path / "flax", "step"), 3)
    restored = jstate.Saver(["params/"]).restore(tmp_path / "flax", {"params": PARAMS})
    np.testing.assert_array_equal(restored["params"]["dense"]["bias"], PARAMS["dense"]["bias"])

    # Flax's guide: a CheckpointManager over a PyTreeCheckpointer, save args from `orbax_utils`.
    manager = ocp.CheckpointManager(tmp_path / "managed", ocp.PyTreeCheckpointer())
    manager.save(7, state, save_kwargs={"save_args": orbax_utils.save_args_from_target(state)})
    manager.wait_until_finished()
    assert jstate.latest_checkpoint(tmp_path / "managed") == str(tmp_path / "managed" / "7")
    assert "opt_state/0/mu/dense/kernel" in jstate.open_checkpoint(tmp_path / "managed").entries


@pytest.fixture
def bare_arrays(tmp_path):
    """One array as each of Orbax's ways writes it alone: entries '' and 'checkpoint' (without OCDBT)."""
    array = jnp.arange(6.0).reshape(2, 3)
    ocp.PyTreeCheckpointer().save(tmp_path / "pytree", array)
    ocp.Checkpointer(ocp.ArrayCheckpointHandler()).save(tmp_path / "array", args=ocp.args.ArraySave(array))
    with ocp.CheckpointManager(tmp_path / "mgr") as mgr:
        mgr.save(1, args=ocp.args.ArraySave(array))
    return array, {"pytree": "", "array": "checkpoint", "mgr/1": "checkpoint"}


def test_orbaxs_bare_arrays_restore_into_a_bare_target(tmp_path, bare_arrays):
    array, names = bare_arrays
    for where, name in names.items():
        path = tmp_path / where
        assert jstate.list_variables(path) == [(name, (2, 3), np.dtype("float32"))]
        for target in (jax.ShapeDtypeStruct((2, 3), jnp.float32), jnp.zeros((2, 3))):
            np.testing.assert_array_equal(jstate.Saver().restore(path, target), array)
        assert jstate.Saver().plan(path, jnp.zeros((2, 3))).names == {"value": name}
        np.testing.assert_array_equal(jstate.load_variable(path, name), array)
    with pytest.raises(jstate.CheckpointError, match="lacks 1 variable.*'w'"):  # one leaf, not a tree of one
        jstate.Saver().restore(tmp_path / "array", {"w": jnp.zeros((2, 3))})


def test_a_step_whose_only_item_jstate_cannot_read_names_it_where_a_variable_is_lacking(tmp_path):
    with ocp.CheckpointManager(tmp_path / "mgr") as mgr:
        mgr.save(1, args=ocp.args.ProtoSave(_proto()))
    assert jstate.list_variables(tmp_path / "mgr" / "1") == []
    with pytest.raises(
        jstate.CheckpointError,
        match=r"lacks 1 variable\(s\) the Saver restores: 'value'\. It also holds what jstate does not read: "
        r"'default' \(an item of Orbax's ProtoCheckpointHandler",
    ):
        jstate.Saver().restore(tmp_path / "mgr", jnp.zeros((2, 3)))
