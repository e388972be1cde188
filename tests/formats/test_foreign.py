"""TensorFlow and safetensors checkpoints through jstate's public API: list, load, inspect,
restore with the Saver's name mapping, and export to safetensors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jstate
from jstate import initializers as inits

DATA = Path(__file__).parents[1] / "data" / "tensorflow"
INDEX = json.loads((DATA / "values" / "index.json").read_text())


def saved(checkpoint, name):
    info = INDEX[checkpoint][name]
    value = np.load(DATA / info["file"])
    return value.view(ml_dtypes.bfloat16) if info["dtype"] == "bfloat16" else value


def test_list_and_load_a_tensorflow_checkpoint():
    listed = jstate.list_variables(DATA / "guide" / "model.ckpt")
    assert [n for n, *_ in listed] == ["biases", "v1", "v2", "weights"]
    np.testing.assert_array_equal(
        jstate.load_variable(DATA / "guide" / "model.ckpt", "v2"), saved("guide/model.ckpt", "v2")
    )


def test_restore_the_guides_checkpoint_with_a_dict_mapped_saver():
    def model(s):
        s.variable("params/v2", inits.zeros, saved("guide/my_v2.ckpt", "my_v2").shape)
        s.variable("other", inits.zeros, (3,))

    mesh = jax.make_mesh((8,), ("x",))
    target = jstate.abstract(model, mesh=mesh, rules=[(".*", P())])
    restored = jstate.Saver({"my_v2": "params/v2"}).restore(DATA / "guide" / "my_v2.ckpt", target)
    np.testing.assert_array_equal(restored["params/v2"], saved("guide/my_v2.ckpt", "my_v2"))
    assert restored["params/v2"].sharding == target.spec("params/v2").sharding
    assert restored["params/v2"].sharding.is_equivalent_to(NamedSharding(mesh, P()), 1)
    assert restored.uninitialized() == ["other"]


def test_latest_checkpoint_reads_tensorflows_state_file(tmp_path):
    shutil.copytree(DATA / "train", tmp_path / "train")
    latest = jstate.latest_checkpoint(tmp_path / "train")
    assert latest == str(tmp_path / "train" / "model.ckpt-20")
    assert jstate.open_checkpoint(tmp_path / "train").step == 20


def test_tf2_object_graph_names_map_with_regex_rules():
    ckpt = DATA / "tf2" / "ckpt-1"
    names = dict((n, shape) for n, shape, _ in jstate.list_variables(ckpt))
    kernel = "model/layers/0/kernel/.ATTRIBUTES/VARIABLE_VALUE"

    def model(s):
        s.variable("dense0/kernel", inits.zeros, names[kernel])

    saver = jstate.Saver([(r"^dense(\d+)/(\w+)$", r"model/layers/\1/\2/.ATTRIBUTES/VARIABLE_VALUE")])
    restored = saver.restore(ckpt, jstate.abstract(model))
    np.testing.assert_array_equal(restored["dense0/kernel"], saved("tf2/ckpt-1", kernel))


def test_unreadable_entries_are_listed_and_refused_by_name():
    ckpt = jstate.open_checkpoint(DATA / "tf2" / "ckpt-1")
    assert "_CHECKPOINTABLE_OBJECT_GRAPH" in ckpt.skipped
    assert "skipped: " in str(ckpt)

    def model(s):
        s.variable("graph", inits.zeros, (1,))

    with pytest.raises(jstate.CheckpointError, match="jstate cannot read '_CHECKPOINTABLE_OBJECT_GRAPH'"):
        jstate.Saver({"_CHECKPOINTABLE_OBJECT_GRAPH": "graph"}).restore(DATA / "tf2" / "ckpt-1", jstate.abstract(model))


def test_shape_and_dtype_checks_are_the_same_as_for_orbax():
    def model(s):
        s.variable("v2", inits.zeros, (99,))

    with pytest.raises(jstate.SpecMismatchError, match="variable 'v2' has shape"):
        jstate.Saver(["v2"]).restore(DATA / "guide" / "model.ckpt", jstate.abstract(model))


@pytest.mark.slow
def test_inspect_a_tensorflow_checkpoint_like_tensorflow():
    run = lambda *a: subprocess.run([sys.executable, "-m", "jstate", "inspect", *a], capture_output=True, text=True)  # noqa: E731
    out = run(str(DATA / "train" / "model.ckpt-20")).stdout
    assert "(tensorflow)" in out and "layer1/weights" in out
    values = run(str(DATA / "guide" / "model.ckpt"), "--values", "--name", "v1").stdout
    assert "tensor_name: v1" in values


def test_safetensors_export_list_and_restore(tmp_path):
    def model(s):
        s.variable("w", inits.normal(1.0), (4, 3))
        s.variable("b", inits.zeros, (3,), jnp.bfloat16)

    state = jstate.init(model, jax.random.key(0))
    path = jstate.save_safetensors(state, tmp_path / "model.safetensors")
    assert jstate.list_variables(path) == [
        ("b", (3,), np.dtype(ml_dtypes.bfloat16)),
        ("w", (4, 3), np.dtype("float32")),
    ]
    restored = jstate.Saver().restore(path, jstate.abstract(model))
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert restored["b"].dtype == jnp.bfloat16
