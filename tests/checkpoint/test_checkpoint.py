"""Saving and restoring through Orbax: real checkpoints on disk, real shardings."""

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jstate
from jstate import initializers as inits
from jstate.formats.manifest import Manifest

KEY = jax.random.key(0)


def model(s):
    s.variable("weights", inits.normal(0.35), (64, 32))
    s.variable("biases", inits.zeros, (32,))
    s.variable("v2", inits.uniform(1.0), (4, 4))
    s.variable("step", 7)
    s.scope("model").scope("encoder").variable("k", inits.ones, (8, 8))


def layers(n):
    def m(s):
        for i in range(1, n + 1):
            s.scope(f"layer{i}").variable("kernel", inits.glorot_uniform(), (16, 16))
            s.scope(f"layer{i}").variable("bias", inits.normal(1.0), (16,))

    return m


@pytest.fixture(scope="module")
def state():
    return jstate.init(model, KEY)


def assert_same(a, b, names=None):
    for n in names or list(a):
        np.testing.assert_array_equal(np.asarray(a[n]), np.asarray(b[n]), err_msg=n)


def test_save_then_restore_without_initializing_first(state, tmp_path):
    saver = jstate.Saver()
    path = saver.save(state, tmp_path / "model", step=1000)
    assert path == str(tmp_path / "model-1000")
    restored = saver.restore(path, jstate.abstract(model))
    assert restored.uninitialized() == []
    assert_same(restored, state)
    assert restored["step"].dtype == jnp.int32


def test_plain_orbax_restores_jstate_checkpoints_with_names_as_keys(state, tmp_path):
    path = jstate.Saver(pack=False).save(state, tmp_path / "ckpt")  # packed ones: tests/formats/test_pack.py
    tree = ocp.StandardCheckpointer().restore(jstate.open_checkpoint(path).arrays)  # arrays-<token>
    assert sorted(tree) == list(state)
    np.testing.assert_array_equal(tree["model/encoder/k"], state["model/encoder/k"])


def test_restores_checkpoints_that_plain_orbax_wrote(tmp_path):
    params = {"params": {"Dense_0": {"kernel": np.ones((3, 2), np.float32), "bias": np.zeros(2, np.float32)}}}
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "flax", params)
    ckptr.wait_until_finished()
    assert jstate.list_variables(tmp_path / "flax") == [
        ("params/Dense_0/bias", (2,), np.dtype("float32")),
        ("params/Dense_0/kernel", (3, 2), np.dtype("float32")),
    ]

    def flax_like(s):
        d = s.scope("params").scope("Dense_0")
        d.variable("kernel", inits.zeros, (3, 2))
        d.variable("bias", inits.ones, (2,))

    restored = jstate.Saver().restore(tmp_path / "flax", jstate.abstract(flax_like))
    assert (restored["params/Dense_0/kernel"] == 1).all()
    # A CheckpointManager layout: <dir>/<step>/<item>/.
    with ocp.CheckpointManager(tmp_path / "mgr") as mgr:
        mgr.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(params)))
    assert jstate.latest_checkpoint(tmp_path / "mgr") == str(tmp_path / "mgr" / "5")
    assert jstate.load_variable(tmp_path / "mgr", "params/Dense_0/kernel").shape == (3, 2)


def test_names_never_share_storage(tmp_path):
    # Plain Orbax stores {"a.b": x} and {"a": {"b": y}} under one name; jstate rejects "a.b"
    # everywhere a name enters, so two variables can never share storage.
    with pytest.raises(jstate.InvalidNameError):
        jstate.State.from_tree({"a.b": jnp.ones(1)}, flat=True)
    with pytest.raises(jstate.InvalidNameError):
        jstate.abstract(lambda s: s.variable("a.b", inits.zeros, (1,)))
    state = jstate.State.from_tree({"a": {"b": jnp.ones(1)}, "a_b": jnp.zeros(1)})
    path = jstate.Saver().save(state, tmp_path / "x")
    restored = jstate.Saver().restore(path, state)
    assert restored["a/b"] == 1 and restored["a_b"] == 0


def test_subset_and_renamed_savers(state, tmp_path):
    path = jstate.Saver({"my_v2": "v2"}).save(state, tmp_path / "renamed")
    assert [n for n, *_ in jstate.list_variables(path)] == ["my_v2"]
    restored = jstate.Saver({"my_v2": "v2"}).restore(path, jstate.abstract(model))
    assert restored.uninitialized() == ["biases", "model/encoder/k", "step", "weights"]
    assert_same(restored, state, ["v2"])


def test_scope_mapping_moves_a_scope(state, tmp_path):
    path = jstate.Saver({"encoder/": "model/encoder/"}).save(state, tmp_path / "enc")
    assert [n for n, *_ in jstate.list_variables(path)] == ["encoder/k"]

    def other(s):
        s.scope("net").scope("enc").variable("k", inits.zeros, (8, 8))

    restored = jstate.Saver({"encoder/": "net/enc/"}).restore(path, jstate.abstract(other))
    assert (restored["net/enc/k"] == 1).all()


def test_restore_replaces_only_the_savers_variables(state, tmp_path):
    path = jstate.Saver(["weights"]).save(state, tmp_path / "w")
    changed = state.assign({"weights": jnp.zeros((64, 32)), "biases": jnp.ones(32)})
    restored = jstate.Saver(["weights"]).restore(path, changed)
    assert_same(restored, state, ["weights"])
    assert (restored["biases"] == 1).all()
    assert not changed["weights"].any()  # the target is unchanged


def test_restore_reads_only_the_arrays_it_needs(state, tmp_path, array_reads):
    path = jstate.Saver(pack=False).save(state, tmp_path / "all")  # packed: tests/formats/test_pack.py
    jstate.Saver(["biases"]).restore(path, jstate.abstract(model))
    assert array_reads == ["biases"]


@pytest.mark.slow  # seconds of compiles: in CI, not the fast loop
def test_restore_into_six_layers_from_five_layer_checkpoint(tmp_path):
    five = jstate.init(layers(5), jax.random.key(1))
    path = jstate.Saver().save(five, tmp_path / "five")
    saver = jstate.Saver([f"layer{i}/" for i in range(1, 6)])
    six = saver.restore(path, jstate.abstract(layers(6)))
    assert six.uninitialized() == ["layer6/bias", "layer6/kernel"]
    six = jstate.init(layers(6), jax.random.key(2), state=six)
    assert_same(six, five, list(five))
    assert six["layer6/kernel"].shape == (16, 16)


def test_overlapping_savers_restore_only_their_own(state, tmp_path):
    a, b = jstate.Saver(["weights", "biases"]), jstate.Saver(["biases", "v2"])
    pa = a.save(state, tmp_path / "a")
    pb = b.save(state.assign("biases", jnp.full(32, 5.0)), tmp_path / "b")
    target = jstate.abstract(model)
    restored = b.restore(pb, a.restore(pa, target))
    assert (restored["biases"] == 5).all()
    assert_same(restored, state, ["weights", "v2"])
    assert restored.uninitialized() == ["model/encoder/k", "step"]


def test_restore_places_each_array_on_the_target_sharding_any_device_count(state, tmp_path):
    mesh8 = jax.make_mesh((4, 2), ("data", "model"))
    rules = [(r"weights", P("data", "model")), (r".*", P())]
    sharded = jstate.init(model, KEY, mesh=mesh8, rules=rules)
    path = jstate.Saver().save(sharded, tmp_path / "sharded")
    mesh2 = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("model",))
    target = jstate.abstract(model, mesh=mesh2, rules=[(r"weights", P(None, "model")), (r".*", P())])
    restored = jstate.Saver().restore(path, target)
    assert restored["weights"].sharding == NamedSharding(mesh2, P(None, "model"))
    assert len(restored["weights"].sharding.device_set) == 2
    assert_same(restored, state)


def test_dtype_change_needs_cast(state, tmp_path):
    path = jstate.Saver(["v2"]).save(state, tmp_path / "v2")

    def half(s):
        s.variable("v2", inits.zeros, (4, 4), jnp.bfloat16)

    with pytest.raises(
        jstate.SpecMismatchError,
        match="'v2' has shape \\(4, 4\\) and dtype float32, but 'v2' is declared with shape \\(4, 4\\) and dtype bfloat16. Pass `cast=True`",
    ):
        jstate.Saver().restore(path, jstate.abstract(half))
    restored = jstate.Saver().restore(path, jstate.abstract(half), cast=True)
    assert restored["v2"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(restored["v2"], np.float32), state["v2"], rtol=1e-2)


def test_shape_mismatch_names_variable_and_path(state, tmp_path):
    path = jstate.Saver(["biases"]).save(state, tmp_path / "b")

    def wide(s):
        s.variable("biases", inits.zeros, (64,))

    with pytest.raises(
        jstate.SpecMismatchError, match=f"Checkpoint {tmp_path}/b: variable 'biases' has shape \\(32,\\)"
    ):
        jstate.Saver().restore(path, jstate.abstract(wide))


def test_missing_names_are_listed_with_closest_checkpoint_names(state, tmp_path):
    path = jstate.Saver(["weights"]).save(state, tmp_path / "w")

    def m(s):
        s.variable("weight", inits.zeros, (64, 32))

    with pytest.raises(
        jstate.CheckpointError, match="lacks 1 variable\\(s\\) the Saver restores: 'weight'. Did you mean 'weights'"
    ):
        jstate.Saver().restore(path, jstate.abstract(m))


def test_extra_names_are_ignored_unless_strict(state, tmp_path):
    path = jstate.Saver().save(state, tmp_path / "all")
    assert jstate.Saver(["v2"]).restore(path, jstate.abstract(model)).is_initialized("v2")
    with pytest.raises(
        jstate.CheckpointError, match="holds 4 variable\\(s\\) that the Saver does not restore: 'biases'"
    ):
        jstate.Saver(["v2"]).restore(path, jstate.abstract(model), strict=True)


TF_ADAM = os.path.join(os.path.dirname(__file__), "..", "data", "tensorflow", "train")  # TF1 graph mode, Adam


def tf_model(s):
    for layer, shape in (("layer1", (4, 8)), ("layer2", (8, 2))):
        s.scope(layer).variable("weights", inits.zeros, shape)
        s.scope(layer).variable("biases", inits.zeros, shape[1:])


def test_strict_with_ignore_fails_only_on_entries_nothing_uses_and_nothing_ignores():
    """A TF1 Adam checkpoint holds two slots per variable and the optimizer's powers: `strict`
    lists them grouped by their last name (one pattern per group is the fix), and `ignore`
    patterns take them out, so only an entry nothing uses and nothing ignores fails."""
    saver = jstate.Saver()
    with pytest.raises(jstate.CheckpointError) as raised:
        saver.restore(TF_ADAM, jstate.abstract(tf_model), strict=True)
    message = str(raised.value)
    assert "holds 11 variable(s) that the Saver does not restore: */Adam (4: 'layer1/biases/Adam'" in message
    assert "*/Adam_1 (4: 'layer1/biases/Adam_1'" in message and "'beta1_power', 'beta2_power', 'global_step'" in message
    # the fix it suggests, one pattern per group, works as it is
    suggested = re.findall(r'r"([^"]+)"', message.split("`ignore=[")[1].split("]`")[0])
    assert suggested == [r"/Adam$", r"/Adam_1$", r"^beta1_power$", r"^beta2_power$", r"^global_step$"]
    assert saver.restore(TF_ADAM, jstate.abstract(tf_model), strict=True, ignore=suggested).keys() == {
        "layer1/weights",
        "layer1/biases",
        "layer2/weights",
        "layer2/biases",
    }
    with pytest.raises(
        jstate.CheckpointError, match=r"holds 3 variable\(s\).*: 'beta1_power', 'beta2_power', 'global_step'\."
    ):
        saver.restore(TF_ADAM, jstate.abstract(tf_model), strict=True, ignore=[r"/Adam(_1)?$"])
    ignore = [r"/Adam(_1)?$", r"^beta[12]_power$", "^global_step$"]
    restored = saver.restore(TF_ADAM, jstate.abstract(tf_model), strict=True, ignore=ignore)
    np.testing.assert_array_equal(restored["layer2/biases"], jstate.load_variable(TF_ADAM, "layer2/biases"))
    plan = saver.plan(TF_ADAM, jstate.abstract(tf_model), strict=True, ignore=ignore)
    assert plan.problems == [] and len(plan.ignored) == len(plan.unused) == 11
    assert "Ignored (`ignore=`): */Adam (4: " in str(plan)
    with pytest.raises(jstate.MappingError, match=r"pass a list of patterns: \['/Adam\$'\]"):
        saver.restore(TF_ADAM, jstate.abstract(tf_model), strict=True, ignore="/Adam$")
    with pytest.raises(jstate.MappingError, match=r"`ignore` pattern '\(' does not compile"):
        saver.plan(TF_ADAM, jstate.abstract(tf_model), ignore=["("])


def test_a_bare_array_or_number_saves_as_one_entry_named_value(tmp_path):
    """A one-leaf pytree (a bare array or number) is the entry "value"."""
    array = jnp.arange(6.0).reshape(2, 3)
    path = jstate.Saver().save(array, tmp_path / "array")
    assert jstate.list_variables(path) == [("value", (2, 3), np.dtype("float32"))]
    restored = jstate.Saver().restore(path, jax.ShapeDtypeStruct((2, 3), jnp.float32))
    np.testing.assert_array_equal(restored, array)
    np.testing.assert_array_equal(jstate.Saver().restore(path, jnp.zeros((2, 3))), array)
    path = jstate.Saver().save(7, tmp_path / "number")
    assert jstate.Saver().restore(path, 0) == 7 and type(jstate.Saver().restore(path, 0)) is int
    assert int(jstate.Saver().restore(path, {"value": jax.ShapeDtypeStruct((), jnp.int32)})["value"]) == 7


def test_a_model_function_where_its_abstract_state_belongs_says_so(state, tmp_path):
    path = jstate.Saver().save(state, tmp_path / "m")
    with pytest.raises(TypeError, match=r"Got the function `model`.*Restore into `jstate.abstract\(model\)`"):
        jstate.Saver().restore(path, model)
    with pytest.raises(TypeError, match=r"Leaf 'net' is the function `model`"):
        jstate.Saver().plan(path, {"net": model})
    with pytest.raises(TypeError, match=r"save the State that `jstate.init\(model, key\)` returns"):
        jstate.Saver().save(model, tmp_path / "f")


def test_a_renamed_missing_variable_is_named_without_nested_quotes(state, tmp_path):
    path = jstate.Saver().save(state, tmp_path / "m")
    with pytest.raises(jstate.CheckpointError) as raised:
        jstate.Saver({"enc/kk": "model/encoder/k"}).restore(path, jstate.abstract(model))
    assert "restores: 'enc/kk' (for 'model/encoder/k')." in str(raised.value)


def test_bad_mapping_fails_before_anything_is_written(state, tmp_path):
    with pytest.raises(jstate.MappingError):
        jstate.Saver([(r".*", "same")]).save(state, tmp_path / "x")
    with pytest.raises(jstate.UnknownVariableError):
        jstate.Saver(["nope"]).save(state, tmp_path / "x")
    assert not (tmp_path / "x").exists() and os.listdir(tmp_path) == []


def test_saving_an_uninitialized_variable_is_an_error(tmp_path):
    partial = jstate.init(model, KEY, only=["v2"])
    with pytest.raises(jstate.UninitializedError, match="Cannot save: variable 'weights' is not initialized"):
        jstate.Saver(["weights"]).save(partial, tmp_path / "x")
    path = jstate.Saver().save(partial, tmp_path / "y")  # every *initialized* variable
    assert [n for n, *_ in jstate.list_variables(path)] == ["v2"]


def test_max_to_keep_and_keep_every_n_steps(state, tmp_path):
    saver = jstate.Saver(max_to_keep=2, keep_every_n_steps=3)
    for step in range(1, 8):
        saver.save(state, tmp_path / "model", step=step)
    assert sorted(os.listdir(tmp_path)) == ["model-3", "model-6", "model-7"]
    saver = jstate.Saver(max_to_keep=2)
    for step in range(10, 14):
        saver.save(state, tmp_path / "other", step=step)
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("other")) == ["other-12", "other-13"]
    assert jstate.latest_checkpoint(tmp_path / "other") == str(tmp_path / "other-13")


def test_keep_every_n_hours_keeps_one_per_period(state, tmp_path, monkeypatch):
    import time as time_module

    clock = [1_000_000.0]
    monkeypatch.setattr(time_module, "time", lambda: clock[0])
    saver = jstate.Saver(max_to_keep=1, keep_every_n_hours=1)
    for step in range(6):  # one save every 25 minutes
        saver.save(state, tmp_path / "m", step=step)
        clock[0] += 25 * 60
    # As TensorFlow: the clock starts when the Saver is created, so step 0 (t=0) is not kept;
    # kept for good: step 3 (t=75 min, an hour after the start); and the newest, step 5.
    assert sorted(os.listdir(tmp_path)) == ["m-3", "m-5"]


def test_latest_checkpoint_is_the_most_recently_committed(state, tmp_path):
    assert jstate.latest_checkpoint(tmp_path) is None
    saver = jstate.Saver()
    saver.save(state, tmp_path / "model", step=5)
    saver.save(state, tmp_path / "model", step=20)
    saver.save(state, tmp_path / "model", step=10)  # a resumed run: saved last, so latest
    assert jstate.latest_checkpoint(tmp_path) == str(tmp_path / "model-10")
    (tmp_path / "model-30" / "arrays-1_999999999_0_otherhost").mkdir(parents=True)  # a killed save
    (tmp_path / "model-40").mkdir()  # not a checkpoint
    assert jstate.latest_checkpoint(tmp_path) == str(tmp_path / "model-10")
    restored = saver.restore(tmp_path, jstate.abstract(model))  # a directory: its latest
    assert_same(restored, state)


def test_async_save_captures_values_even_if_donated(state, tmp_path):
    saver = jstate.Saver()
    live = jax.tree.map(jnp.copy, state)
    expected = {n: np.asarray(v) for n, v in live.items()}
    step = jax.jit(lambda s: jax.tree.map(lambda x: x * 0 + 1, s), donate_argnums=0)
    path = saver.save(live, tmp_path / "async", step=1, blocking=False)
    live = step(live)  # donates the saved buffers right away
    assert live["weights"].sum() == 64 * 32
    saver.wait()
    restored = saver.restore(path, jstate.abstract(model))
    for n, v in expected.items():
        np.testing.assert_array_equal(np.asarray(restored[n]), v)


def test_saving_twice_to_one_path_replaces_it(state, tmp_path):
    saver = jstate.Saver(["biases"])
    saver.save(state, tmp_path / "m")
    saver.save(state.assign("biases", jnp.ones(32)), tmp_path / "m")
    assert (jstate.load_variable(tmp_path / "m", "biases") == 1).all()
    assert os.listdir(tmp_path) == ["m"]


# -- inspecting --------------------------------------------------------------------------


def test_list_and_load_variable(state, tmp_path):
    path = jstate.Saver().save(state, tmp_path / "m")
    assert jstate.list_variables(path)[0] == ("biases", (32,), np.dtype("float32"))
    np.testing.assert_array_equal(jstate.load_variable(path, "weights"), state["weights"])
    with pytest.raises(jstate.CheckpointError, match="holds no variable 'weight'. Did you mean 'weights'"):
        jstate.load_variable(path, "weight")


def test_inspect_reads_metadata_only(state, tmp_path, monkeypatch, capsys):
    from jstate.checkpoint.inspect import inspect_checkpoint
    from jstate.formats import orbax as _orbax

    path = jstate.Saver().save(state, tmp_path / "m", step=3)

    def no_reading(*args, **kwargs):
        raise AssertionError("inspect must not read arrays or Orbax metadata")

    monkeypatch.setattr(_orbax, "read", no_reading)
    monkeypatch.setattr(_orbax, "entries", no_reading)
    inspect_checkpoint(path)
    out = capsys.readouterr().out
    assert "step 3 (jstate): 5 variables" in out
    assert re.search(r"weights\s+\(64, 32\)\s+float32\s+8.0 KiB", out)


@pytest.mark.slow
def test_inspect_of_a_damaged_checkpoint_is_an_error(state, tmp_path):
    path = jstate.Saver().save(state, tmp_path / "m", step=3)
    arrays = jstate.open_checkpoint(path).arrays
    os.remove(os.path.join(arrays, "_METADATA"))
    out = subprocess.run([sys.executable, "-m", "jstate", "inspect", path], capture_output=True, text=True)
    assert out.returncode == 1
    assert f"Checkpoint {path} is incomplete: {arrays}/_METADATA is missing." in out.stderr


@pytest.mark.slow
def test_inspect_values_and_directory_listing(state, tmp_path):
    saver = jstate.Saver()
    saver.save(state, tmp_path / "m", step=1)
    saver.save(state, tmp_path / "m", step=2)
    run = lambda *a: subprocess.run([sys.executable, "-m", "jstate", "inspect", *a], capture_output=True, text=True)  # noqa: E731
    listing = run(str(tmp_path)).stdout
    assert "2 checkpoints" in listing and "m-1" in listing and "m-2" in listing
    values = run(str(tmp_path / "m-2"), "--values", "--name", "step").stdout
    assert "tensor_name: step  shape: ()  dtype: int32" in values and "7" in values
    bad = run(str(tmp_path / "nothing"))
    assert bad.returncode == 1 and "No checkpoint at" in bad.stderr and "Traceback" not in bad.stderr


# -- bad input ---------------------------------------------------------------------------


def test_path_that_does_not_exist(tmp_path):
    with pytest.raises(jstate.CheckpointNotFoundError, match=f"No checkpoint at {tmp_path}/nope: it does not exist"):
        jstate.Saver().restore(tmp_path / "nope", jstate.abstract(model))


def test_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("hi")
    with pytest.raises(jstate.CheckpointNotFoundError, match="holds no complete checkpoint"):
        jstate.list_variables(tmp_path / "junk")


def test_damaged_manifest(state, tmp_path):
    path = jstate.Saver().save(state, tmp_path / "m")
    with open(os.path.join(path, "jstate.json"), "r+") as f:
        f.truncate(20)
    with pytest.raises(
        jstate.CorruptCheckpointError, match=f"Checkpoint {path}: its manifest .*jstate.json is damaged"
    ):
        jstate.Saver().restore(path, jstate.abstract(model))


def test_truncated_data_files(state, tmp_path):
    path = jstate.Saver().save(state, tmp_path / "m")
    target = jstate.abstract(model)
    for root, _, files in os.walk(jstate.open_checkpoint(path).arrays):
        for f in files:
            if root.endswith("/d"):
                with open(os.path.join(root, f), "r+b") as fh:
                    fh.truncate(10)
    with pytest.raises(
        jstate.CorruptCheckpointError, match=f"Checkpoint {path} is damaged: {path}/arrays-[^/]*/.*d/.* has 10 bytes"
    ):
        jstate.Saver().restore(path, target)
    assert target.uninitialized() == sorted(target.specs)


def test_a_failing_save_is_one_short_error_and_leaves_nothing_listed(state, tmp_path, monkeypatch):
    from jstate.formats import orbax as _orbax

    saver = jstate.Saver()
    saver.save(state, tmp_path / "m", step=1)

    def broken(self, directory, arrays):
        raise ValueError("disk on fire\n" + "x" * 5000)

    monkeypatch.setattr(_orbax.Writer, "save", broken)
    with pytest.raises(
        jstate.CheckpointError, match="Saving checkpoint .*m-2 failed \\(ValueError: disk on fire\\)"
    ) as e:
        saver.save(state, tmp_path / "m", step=2)
    assert len(str(e.value)) < 400
    assert jstate.latest_checkpoint(tmp_path) == str(tmp_path / "m-1")


def test_zero_size_bfloat16_bool_and_scalar_variables_round_trip(tmp_path):
    def m(s):
        s.variable("empty", inits.zeros, (0, 3))
        s.variable("bf", inits.normal(1.0), (5,), jnp.bfloat16)
        s.variable("scalar", 3.5)
        s.variable("flag", jnp.array(True))

    state = jstate.init(m, KEY)
    path = jstate.Saver().save(state, tmp_path / "m")
    restored = jstate.Saver().restore(path, jstate.abstract(m))
    assert_same(restored, state)
    assert restored["empty"].shape == (0, 3) and restored["bf"].dtype == jnp.bfloat16
    only_empty = jstate.Saver(["empty"]).save(state, tmp_path / "e")  # no array data at all
    assert jstate.Saver(["empty"]).restore(only_empty, jstate.abstract(m))["empty"].shape == (0, 3)
    assert jstate.latest_checkpoint(tmp_path / "e") == str(tmp_path / "e")


def test_saving_nothing_is_an_error(tmp_path):
    with pytest.raises(jstate.CheckpointError, match="Nothing to save"):
        jstate.Saver().save(jstate.abstract(model), tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_saving_over_a_directory_that_is_not_a_checkpoint_is_refused(state, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    with pytest.raises(jstate.CheckpointError, match="exists and is not a jstate checkpoint"):
        jstate.Saver().save(state, tmp_path / "mine")
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep me"


def test_a_directory_holding_only_arrays_is_a_user_s_and_never_replaced(state, tmp_path):
    """`arrays/` is the name jstate 0.1 gave a checkpoint's arrays, but without a jstate manifest
    beside it, it is a user's directory (or a plain Orbax checkpoint saved there): a save to its
    parent is refused, naming what is in the way, and deletes nothing."""
    (tmp_path / "model-5" / "arrays").mkdir(parents=True)
    (tmp_path / "model-5" / "arrays" / "precious.npy").write_bytes(b"user data")
    with ocp.StandardCheckpointer() as orbax:
        orbax.save(tmp_path / "model-7" / "arrays", {"x": np.ones(3)})
    orbax_files = sorted(p.relative_to(tmp_path) for p in (tmp_path / "model-7").rglob("*"))
    for step in (5, 7):
        with pytest.raises(
            jstate.CheckpointError, match=rf"model-{step}: .*holds arrays without a jstate manifest .*Nothing was"
        ):
            jstate.Saver().save(state, tmp_path / "model", step=step)
    assert (tmp_path / "model-5" / "arrays" / "precious.npy").read_bytes() == b"user data"
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "model-7").rglob("*")) == orbax_files
    assert sorted(os.listdir(tmp_path / "model-5")) == ["arrays"]
    jstate.Saver(max_to_keep=1).save(state, tmp_path / "model", step=8)  # cleaning leftovers beside them
    assert sorted(os.listdir(tmp_path / "model-5")) == ["arrays"]
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "model-7").rglob("*")) == orbax_files


def _as_jstate_0_1(path):
    """Checkpoint `path` rewritten in the layout jstate 0.1 saved: its arrays in ``arrays/``."""
    manifest = Manifest.read(Path(path))
    os.rename(jstate.open_checkpoint(path).arrays, os.path.join(path, "arrays"))
    dataclasses.replace(manifest, arrays="arrays").write(Path(path))
    assert sorted(os.listdir(path)) == ["arrays", "jstate.json"]


def test_checkpoints_of_jstate_0_1_restore_are_replaced_and_retired(state, tmp_path):
    saver = jstate.Saver(["biases"], max_to_keep=1)
    old = saver.save(state, tmp_path / "model", step=1)
    _as_jstate_0_1(old)
    assert (jstate.load_variable(old, "biases") == 0).all()
    saver.save(state.assign("biases", jnp.ones(32)), tmp_path / "model", step=1)  # re-saved: replaced
    assert (jstate.load_variable(old, "biases") == 1).all() and "arrays" not in os.listdir(old)
    _as_jstate_0_1(old)
    saver.save(state, tmp_path / "model", step=2)  # retired: gone with its arrays
    assert sorted(os.listdir(tmp_path)) == ["model-2"]


def test_a_replacing_save_killed_before_its_commit_loses_nothing(state, tmp_path):
    saver = jstate.Saver(["biases"])
    path = saver.save(state, tmp_path / "m")
    dead = os.path.join(path, "arrays-1_999999999_0_otherhost")  # a dead writer's arrays
    shutil.copytree(jstate.open_checkpoint(path).arrays, dead)
    assert (jstate.load_variable(tmp_path / "m", "biases") == 0).all()
    saver.save(state.assign("biases", jnp.ones(32)), tmp_path / "m")  # the next save cleans up
    assert (jstate.load_variable(tmp_path / "m", "biases") == 1).all()
    assert sorted(os.listdir(path)) == sorted(["jstate.json", os.path.basename(jstate.open_checkpoint(path).arrays)])


@pytest.mark.parametrize("bad", [float("nan"), 2.5, True, "3"])
def test_a_max_to_keep_that_is_not_a_whole_number_is_refused_by_the_saver(bad):
    with pytest.raises(ValueError, match="max_to_keep"):
        jstate.Saver(max_to_keep=bad)


def test_max_to_keep_zero_keeps_everything_and_bad_values_are_refused(state, tmp_path):
    saver = jstate.Saver(["biases"], max_to_keep=0)
    for step in range(3):
        saver.save(state, tmp_path / "m", step=step)
    assert sorted(os.listdir(tmp_path)) == ["m-0", "m-1", "m-2"]
    with pytest.raises(ValueError, match="max_to_keep"):
        jstate.Saver(max_to_keep=-1)
    with pytest.raises(ValueError, match="step"):
        saver.save(state, tmp_path / "m", step=-5)


def test_a_state_of_numpy_values_saves(state, tmp_path):
    host = jax.device_get(state)
    path = jstate.Saver().save(host, tmp_path / "h")
    assert_same(jstate.Saver().restore(path, jstate.abstract(model)), state)


def test_restore_does_not_raise_an_earlier_background_save_error(state, tmp_path, monkeypatch):
    saver = jstate.Saver()
    good = saver.save(state, tmp_path / "g", step=1)

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(saver._writer, "_finish", broken)
    saver.save(state, tmp_path / "g", step=2, blocking=False)
    assert saver.restore(good, jstate.abstract(model)).uninitialized() == []
    with pytest.raises(jstate.CheckpointError, match="g-2 failed \\(OSError: disk full\\)"):
        saver.wait()
