"""Issue 13 trial: restore-time transforms and `Saver.plan` used as users would use them (Flax
and optax on a 4 x 2 mesh, TF1 checkpoints, PyTorch-layout weights, safetensors, plain Orbax),
then attacked. Real checkpoints in tmp_path, real shardings over the 8 CPU devices.

The tests at the top fail today and pass once the behaviour they describe is fixed; the rest
cover paths that work and are not tested elsewhere."""

from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import jstate
from jstate import transforms as T
from jstate.formats.native import NativeCheckpoint
from jstate.formats.tensorflow import TensorFlowCheckpoint

S = jax.ShapeDtypeStruct
TF = Path(__file__).parents[1] / "data" / "tensorflow"


@pytest.fixture
def mesh():
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


@pytest.fixture
def no_reads(monkeypatch):
    """Reading any array (jstate or TensorFlow checkpoint) fails the test."""

    def fail(*args, **kwargs):
        raise AssertionError("an array was read")

    for cls in (NativeCheckpoint, TensorFlowCheckpoint):
        monkeypatch.setattr(cls, "_read", fail)
        monkeypatch.setattr(cls, "_read_host", fail)


# ==== failures found: each fails now =============================================================


def test_export_through_transpose_with_negative_axes_writes_the_original_layout(tmp_path, monkeypatch):
    """`T.transpose(x, (-1, 0))` restores x.T (NumPy accepts negative axes), but saving through
    it inverts with `np.argsort(axes)`, which for (-1, 0) is the identity: the export silently
    writes the (3, 2) value under the (2, 3) entry's name, in the wrong layout."""
    monkeypatch.chdir(tmp_path)
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = jstate.Saver().save({"w": w}, "torch")
    saver = jstate.Saver([("k", T.transpose("w", (-1, 0)))])
    restored = saver.restore(path, {"k": S((3, 2), jnp.float32)})
    np.testing.assert_array_equal(restored["k"], w.T)
    back = saver.save(restored, "back")
    assert jstate.list_variables(back) == [("w", (2, 3), np.dtype("float32"))]
    np.testing.assert_array_equal(jstate.load_variable(back, "w"), w)


def test_export_through_transpose_with_negative_axes_3d(tmp_path):
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    path = jstate.Saver().save({"x": x}, tmp_path / "x")
    saver = jstate.Saver([("y", T.transpose("x", (0, -1, 1)))])  # (2, 4, 3)
    restored = saver.restore(path, {"y": S((2, 4, 3), jnp.float32)})
    np.testing.assert_array_equal(restored["y"], x.transpose(0, 2, 1))
    back = saver.save(restored, tmp_path / "back")
    np.testing.assert_array_equal(jstate.load_variable(back, "x"), x)


def test_unstack_into_fewer_names_than_slices_is_a_problem_not_a_silent_truncation(tmp_path, no_reads):
    """A tuple of names takes "the parts of a split or unstack"; for split a wrong count is
    refused when the Saver is built, for unstack nothing checks it: 2 names for a 4-layer stack
    restore layers 0-1, drop layers 2-3 without a word (the plan shows no problem, nothing
    'unused'), and saving through the same Saver then writes a 2-layer 'layers' entry."""
    path = jstate.Saver().save({"layers": np.zeros((4, 2, 3), np.float32)}, tmp_path / "stk")
    saver = jstate.Saver([(("b0", "b1"), T.unstack("layers"))])
    target = {f"b{i}": S((2, 3), jnp.float32) for i in range(2)}
    plan = saver.plan(path, target)
    assert plan.problems, "an unstack of 4 slices into 2 names should be reported"
    assert "4" in str(plan.problems[0]) and "'layers'" in str(plan.problems[0])
    with pytest.raises(jstate.MappingError):
        saver.restore(path, target)


def test_saving_through_split_parts_taken_with_negative_indices(tmp_path):
    """`split(...)[-1]` restores the last part, but saving collects parts by their index as
    written: {0, 1, -1} never counts as complete ("needs all its parts, and got only parts
    [-1, 0, 1]")."""
    qkv = np.arange(12, dtype=np.float32).reshape(2, 6)
    path = jstate.Saver().save({"qkv": qkv}, tmp_path / "qkv")
    parts = T.split("qkv", 3, axis=1)
    saver = jstate.Saver([("q", parts[0]), ("k", parts[1]), ("v", parts[-1])])
    restored = saver.restore(path, {n: S((2, 2), jnp.float32) for n in "qkv"})
    np.testing.assert_array_equal(restored["v"], qkv[:, 4:])
    back = saver.save(restored, tmp_path / "back")
    np.testing.assert_array_equal(jstate.load_variable(back, "qkv"), qkv)


def test_two_variables_from_one_split_part_do_not_save_one_of_them_silently(tmp_path):
    """Two State variables restored from the same part restore fine; saving them back when
    they differ keeps whichever came last and drops the other without a word (two values for
    one *entry* are refused, two for one *part* are not)."""
    qkv = np.arange(12, dtype=np.float32).reshape(2, 6)
    path = jstate.Saver().save({"qkv": qkv}, tmp_path / "qkv")
    parts = T.split("qkv", 3, axis=1)
    saver = jstate.Saver([("q", parts[0]), ("q_copy", parts[0]), ("k", parts[1]), ("v", parts[2])])
    restored = saver.restore(path, {n: S((2, 2), jnp.float32) for n in ("q", "q_copy", "k", "v")})
    restored = {**restored, "q_copy": restored["q_copy"] + 100}
    with pytest.raises(jstate.MappingError, match="q_copy"):
        saver.save(restored, tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_the_current_directory_is_a_directory_of_checkpoints(tmp_path, monkeypatch):
    """`latest_checkpoint(".")`, `restore(".")` and `plan(".")` raise a bare ValueError
    ("PosixPath('.') has an empty name", from the TensorFlow reader's `with_name`)."""
    monkeypatch.chdir(tmp_path)
    jstate.Saver().save({"w": np.ones((2, 3), np.float32)}, "model", step=1)
    monkeypatch.chdir(tmp_path)
    assert jstate.latest_checkpoint(".") == "model-1"
    target = {"w": S((2, 3), jnp.float32)}
    assert (jstate.Saver().restore(".", target)["w"] == 1).all()
    assert jstate.Saver([("k", T.transpose("w"))]).plan(".", {"k": S((3, 2), jnp.float32)}).problems == []


def test_an_empty_path_is_a_checkpoint_error_not_a_value_error():
    with pytest.raises(jstate.CheckpointError):
        jstate.Saver().restore("", {"w": S((2,), jnp.float32)})


def test_int64_values_are_not_truncated_without_x64(tmp_path):
    """Without jax_enable_x64, a target declared int64 (a `jax.ShapeDtypeStruct` keeps it) passes
    the dtype check, then the value 2**40 + 5 is placed as int32 and becomes 5 (by name and
    through a transform), with only JAX's UserWarning; an int32 target needs `cast=True`.
    Expected: refused before reading, saying to enable x64 or cast."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    assert not jax.config.jax_enable_x64
    path = str(tmp_path / "big.safetensors")
    safetensors_numpy.save_file({"big": np.array([2**40 + 5, 7], np.int64)}, path)
    with pytest.raises(jstate.JStateError):
        jstate.Saver().restore(path, {"big": S((2,), jnp.int64)})
    with pytest.raises(jstate.JStateError):
        jstate.Saver([("b", T.reshape("big", (2, 1)))]).restore(path, {"b": S((2, 1), jnp.int64)})


def test_a_huge_split_index_is_a_plan_problem(tmp_path):
    """An index too large for a C long raises a bare OverflowError out of `plan` (only
    TypeError, ValueError and IndexError are turned into the rule's MappingError)."""
    path = jstate.Saver().save({"x": np.arange(10, dtype=np.float32)}, tmp_path / "x")
    saver = jstate.Saver([(("a", "b"), T.split("x", [10**20]))])
    plan = saver.plan(path, {"a": S((10,), jnp.float32), "b": S((0,), jnp.float32)})
    assert plan.problems and isinstance(plan.problems[0], jstate.MappingError)


def test_split_at_negative_or_decreasing_indices_is_refused_when_written():
    """jnp.split (which computes the plan's shapes) refuses negative indices that numpy.split
    takes; `split` refuses them where they are written, so the plan and the values never differ."""
    with pytest.raises(ValueError, match=r"indices must be >= 0 and increasing, got \[-3\]"):
        T.split("x", [-3])
    with pytest.raises(ValueError, match="increasing"):
        T.split("x", [5, 2])


def test_split_sections_may_be_a_numpy_integer():
    """`T.split("qkv", np.int64(3))` (heads from a config array) raises "'numpy.int64' object is
    not iterable": only a Python int counts as a number of sections."""
    assert T.split("qkv", np.int64(3)) == T.split("qkv", 3)


def test_two_transforms_writing_one_entry_name_both_variables(tmp_path):
    """The message says "two variables would both be saved as checkpoint entry 'qkv'" without
    saying which two."""
    qkv = np.arange(12, dtype=np.float32).reshape(2, 6)
    path = jstate.Saver().save({"qkv": qkv}, tmp_path / "qkv")
    saver = jstate.Saver([("a", T.transpose("qkv")), ("b", T.cast("qkv", "bfloat16"))])
    restored = saver.restore(path, {"a": S((6, 2), jnp.float32), "b": S((2, 6), jnp.bfloat16)})
    with pytest.raises(jstate.MappingError, match=r"'a'.*'b'|'b'.*'a'"):
        saver.save(restored, tmp_path / "back")


def test_a_transform_result_that_its_sharding_cannot_hold_is_a_jstate_error(tmp_path, mesh):
    """README: "Every failure is one jstate.CheckpointError". A target whose sharding does not
    divide its shape gives, by name, a CheckpointError naming the variable; through a transform
    the bare ValueError of `jax.device_put` escapes (raised by `place` in `_transformed`,
    after the inputs were read)."""
    path = jstate.Saver().save({"w": np.ones((2, 3), np.float32)}, tmp_path / "m")
    bad = S((2, 3), jnp.float32, sharding=NamedSharding(mesh, P(None, "model")))
    with pytest.raises(jstate.PlacementError, match=r"'w' of shape \(2, 3\) .* axis 1 is partitioned 2 times"):
        jstate.Saver().restore(path, {"w": bad})
    with pytest.raises(jstate.PlacementError, match="'k'"):
        jstate.Saver([("k", T.reshape("w", (2, 3)))]).restore(path, {"k": bad})


# ==== paths that work (not covered by tests/test_transforms.py) ==================================

L, D = 3, 8


def test_flax_optax_per_layer_to_scanned_with_moments_and_export(tmp_path, monkeypatch, mesh):
    """A linen model of per-layer blocks with a fused QKV, trained with adamw and saved in the
    background, restored into an nn.scan model with separate Q, K, V (stack of split parts, the
    optax moments too) on NamedSharding targets from jax.eval_shape; same function, same next
    losses; exported back and resumed by the old trainer."""
    import flax.linen as nn
    import optax

    monkeypatch.chdir(tmp_path)

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            q, k, v = jnp.split(nn.Dense(3 * D, name="qkv")(x), 3, axis=-1)
            return x + nn.Dense(D, name="out")(jnp.tanh(q) * k + v)

    class Old(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(L):
                x = Block(name=f"block_{i}")(x)
            return x

    class NewBlock(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            q, k, v = (nn.Dense(D, name=n)(x) for n in "qkv")
            return x + nn.Dense(D, name="out")(jnp.tanh(q) * k + v), None

    class New(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(NewBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
            return scan(name="layers")(x, None)[0]

    tx = optax.adamw(1e-2)
    x = np.random.default_rng(0).normal(size=(16, D)).astype(np.float32)
    y = np.sin(x)

    def trainer(module, rules):
        model = jstate.flax_model(module, jnp.ones((16, D)))

        def new_ts(key):
            params = jstate.init(model, key, mesh=mesh, rules=rules)
            return {"params": params, "opt": tx.init(params), "step": jnp.array(0, jnp.int32)}

        abstract = jax.eval_shape(new_ts, jax.random.key(0))
        sh = jstate.shardings(abstract, default=NamedSharding(mesh, P()))

        @partial(jax.jit, out_shardings=(sh, None))
        def step(ts, x, y):
            loss, g = jax.value_and_grad(lambda p: jnp.mean((module.apply(p.tree(), x) - y) ** 2))(ts["params"])
            u, opt = tx.update(g, ts["opt"], ts["params"])
            return {"params": optax.apply_updates(ts["params"], u), "opt": opt, "step": ts["step"] + 1}, loss

        target = jax.tree.map(lambda a, s: S(a.shape, a.dtype, sharding=s), abstract, sh)
        return new_ts, sh, step, target

    old_ts_fn, old_sh, old_step, old_target = trainer(Old(), [(r"qkv/kernel$", P("data", "model")), (".*", P())])
    ts = jax.jit(old_ts_fn, out_shardings=old_sh)(jax.random.key(0))
    saver = jstate.Saver(max_to_keep=2)
    for i in range(1, 21):
        ts, _ = old_step(ts, x, y)
        if i % 10 == 0:
            saver.save(ts, "ckpt/old", step=i, blocking=False)
    saver.wait()
    assert saver.last_checkpoints == ["ckpt/old-10", "ckpt/old-20"]

    new_ts_fn, _, new_step, new_target = trainer(New(), [(r"layers/.*/kernel$", P(None, "data", "model")), (".*", P())])
    rules = ["opt/0/count", "step"]
    for prefix in ("params/params/", "opt/0/mu/params/", "opt/0/nu/params/"):
        for kind in ("kernel", "bias"):
            for i, n in enumerate("qkv"):
                parts = [T.split(f"{prefix}block_{b}/qkv/{kind}", 3, axis=-1)[i] for b in range(L)]
                rules.append((f"{prefix}layers/{n}/{kind}", T.stack(parts)))
            rules.append((f"{prefix}layers/out/{kind}", T.stack([f"{prefix}block_{b}/out/{kind}" for b in range(L)])))
    convert = jstate.Saver(rules)
    plan = convert.plan("ckpt", new_target, strict=True)
    assert plan.problems == [] and plan.unused == [] and plan.kept == []
    new = convert.restore("ckpt", new_target, strict=True)
    kernel = new["params"]["params/layers/q/kernel"]
    assert kernel.shape == (L, D, D) and kernel.sharding == NamedSharding(mesh, P(None, "data", "model"))
    assert int(new["step"]) == 20 and int(new["opt"][0].count) == 20
    np.testing.assert_allclose(
        Old().apply(jax.device_get(ts["params"].tree()), x),
        New().apply(jax.device_get(new["params"].tree()), x),
        atol=1e-5,
    )
    old_next, new_next = ts, new
    for _ in range(3):
        old_next, old_loss = old_step(old_next, x, y)
        new_next, new_loss = new_step(new_next, x, y)
    np.testing.assert_allclose(float(old_loss), float(new_loss), rtol=1e-4)
    assert new_step._cache_size() == 1

    exported = convert.save(new_next, "export/old", step=23, blocking=False)
    convert.wait()
    resumed = jstate.Saver().restore(exported, old_target)
    got = resumed["params"]["params/block_1/qkv/kernel"]
    assert got.sharding == NamedSharding(mesh, P("data", "model"))
    np.testing.assert_allclose(got, old_next["params"]["params/block_1/qkv/kernel"], atol=1e-6)
    assert int(resumed["opt"][0].count) == 23


def test_split_parts_land_on_differently_sharded_targets(tmp_path, mesh):
    qkv = np.arange(8 * 24, dtype=np.float32).reshape(8, 24)
    path = jstate.Saver().save({"qkv": qkv}, tmp_path / "qkv")
    target = {
        "q": S((8, 8), jnp.float32, sharding=NamedSharding(mesh, P("data", "model"))),
        "k": S((8, 8), jnp.float32, sharding=NamedSharding(mesh, P(None, "data"))),
        "v": S((8, 8), jnp.float32, sharding=SingleDeviceSharding(jax.devices()[5])),
    }
    restored = jstate.Saver([(("q", "k", "v"), T.split("qkv", 3, axis=1))]).restore(path, target)
    for i, n in enumerate("qkv"):
        assert restored[n].sharding == target[n].sharding
        np.testing.assert_array_equal(restored[n], qkv[:, 8 * i : 8 * i + 8])


def test_crash_during_background_saves_then_torch_layout_restore_in_bfloat16(tmp_path, mesh):
    """A process saving PyTorch-layout weights with blocking=False dies (os._exit) with a save in
    flight; the latest complete checkpoint restores transposed and cast to bfloat16 onto a
    mesh, partially, and exports back to float32 in the PyTorch layout."""
    import subprocess
    import sys

    child = (
        "import jax.numpy as jnp, jax, jstate, os\n"
        "p = {'fc1': {'weight': jnp.ones((16, 8)), 'bias': jnp.zeros(16)}, 'fc2': {'weight': jnp.ones((4, 16))}}\n"
        "s = jstate.Saver(max_to_keep=3)\n"
        "for step in range(1, 100):\n"
        "    p = jax.tree.map(lambda x: x * 0.5 + step, p)\n"
        "    s.save(p, 'torch/model', step=step, blocking=False)\n"
        "    if step == 5: os._exit(1)\n"
    )
    subprocess.run([sys.executable, "-c", child], cwd=tmp_path, check=False)
    latest = jstate.latest_checkpoint(tmp_path / "torch")
    assert latest is not None and Path(latest).name in {"model-4", "model-5"}
    target = {
        "dense1": {
            "kernel": S((8, 16), jnp.bfloat16, sharding=NamedSharding(mesh, P("model", "data"))),
            "bias": S((16,), jnp.float32, sharding=NamedSharding(mesh, P())),
        },
        "dense2": {"kernel": S((16, 4), jnp.bfloat16, sharding=NamedSharding(mesh, P("data", None)))},
    }
    saver = jstate.Saver(
        [
            ("dense1/kernel", T.cast(T.transpose("fc1/weight"), "bfloat16", saved_dtype="float32")),
            ("dense2/kernel", T.cast(T.transpose("fc2/weight"), "bfloat16", saved_dtype="float32")),
            ("dense1/bias", T.reshape("fc1/bias", (16,), saved_shape=(16,))),
        ]
    )
    assert saver.plan(latest, target).problems == []
    restored = saver.restore(latest, target)
    w = jstate.load_variable(latest, "fc1/weight")
    assert restored["dense1"]["kernel"].sharding.spec == P("model", "data")
    np.testing.assert_array_equal(restored["dense1"]["kernel"], w.T.astype(jnp.bfloat16))
    only = jstate.Saver([("dense2/kernel", T.cast(T.transpose("fc2/weight"), "bfloat16"))]).restore(latest, target)
    assert isinstance(only["dense1"]["kernel"], S) and isinstance(only["dense2"]["kernel"], jax.Array)
    back = saver.save(restored, tmp_path / "export", blocking=False)
    saver.wait()
    assert dict((n, (s, d)) for n, s, d in jstate.list_variables(back)) == {
        "fc1/bias": ((16,), np.dtype("float32")),
        "fc1/weight": ((16, 8), np.dtype("float32")),
        "fc2/weight": ((4, 16), np.dtype("float32")),
    }


def test_transforms_on_a_tensorflow_checkpoint_and_export(tmp_path, mesh):
    """TF1 Adam checkpoint: a transposed kernel onto a mesh, int64 global_step cast to int32
    (x64 off), found through the directory's `checkpoint` state file."""
    assert not jax.config.jax_enable_x64

    def model(s):
        s.variable("k1", jstate.initializers.zeros, (8, 4), sharding=NamedSharding(mesh, P("data", "model")))
        s.variable("global_step", jnp.array(0, jnp.int32), trainable=False)

    saver = jstate.Saver([("k1", T.transpose("layer1/weights")), ("global_step", T.cast("global_step", "int32"))])
    plan = saver.plan(TF / "train", jstate.abstract(model))
    assert plan.problems == [] and plan.checkpoint.path.name == "model.ckpt-20"
    restored = saver.restore(TF / "train", jstate.abstract(model))
    assert int(restored["global_step"]) == 20 and restored["global_step"].dtype == jnp.int32
    np.testing.assert_array_equal(restored["k1"], jstate.load_variable(TF / "train/model.ckpt-20", "layer1/weights").T)
    assert restored["k1"].sharding == NamedSharding(mesh, P("data", "model"))
    with pytest.raises(jstate.SpecMismatchError, match="int64.*int32.*Pass `cast=True`"):
        jstate.Saver([("global_step", T.reshape("global_step", ()))]).restore(TF / "train", jstate.abstract(model))
    back = saver.save(restored, tmp_path / "tf_layout")
    np.testing.assert_array_equal(
        jstate.load_variable(back, "layer1/weights"), jstate.load_variable(TF / "train/model.ckpt-20", "layer1/weights")
    )


def test_a_failing_transform_on_a_tensorflow_checkpoint_reads_nothing(no_reads):
    target = {"k": S((8, 4), jnp.float32), "v": S((3,), jnp.float32)}
    saver = jstate.Saver(["v1", ("k", T.stack(["layer1/weights", "layer2/weights"]))])
    with pytest.raises(jstate.UnknownVariableError):  # "v1" is not in the target
        saver.restore(TF / "train", target)
    saver = jstate.Saver([("v", T.reshape("layer1/biases", (3,))), ("k", T.transpose("layer1/weights"))])
    with pytest.raises(jstate.MappingError, match=r"reshape\('layer1/biases', \(3,\)\) does not apply"):
        saver.restore(TF / "train", target)


def test_transforms_on_safetensors_and_plain_orbax(tmp_path, mesh):
    pytest.importorskip("safetensors")
    import orbax.checkpoint as ocp

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    st = jstate.save_safetensors(jstate.State.from_tree({"a": a, "b": a + 10}, flat=True), tmp_path / "m.safetensors")
    stacked = jstate.Saver([("ab", T.stack(["a", "b"], axis=-1))]).restore(
        st, {"ab": S((2, 3, 2), jnp.float32, sharding=NamedSharding(mesh, P(None, None, "model")))}
    )
    np.testing.assert_array_equal(stacked["ab"], np.stack([a, a + 10], axis=-1))
    assert stacked["ab"].sharding.spec == P(None, None, "model")
    parts = jstate.Saver([(("x", "y", "z"), T.split("a", 3, axis=1))]).restore(
        st, {n: S((2, 1), jnp.bfloat16) for n in "xyz"}, cast=True
    )
    assert parts["z"].dtype == jnp.bfloat16 and parts["z"].tolist() == [[2.0], [5.0]]

    orbax_path = (tmp_path / "orbax").absolute()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(orbax_path, {"params": {"w": a}})
    checkpointer.wait_until_finished()
    got = jstate.Saver([("k", T.cast(T.transpose("params/w"), "bfloat16"))]).restore(
        orbax_path, {"k": S((3, 2), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "model")))}
    )
    np.testing.assert_array_equal(got["k"], a.T.astype(jnp.bfloat16))


def test_int_bool_zero_size_and_narrow_float_dtypes(tmp_path, mesh):
    tree = {
        "i": np.arange(12, dtype=np.int32).reshape(3, 4),
        "b": np.array([[True, False]] * 3),
        "z": np.zeros((0, 6), np.float32),
        "u8": np.arange(6, dtype=np.uint8),
    }
    path = jstate.Saver().save(tree, tmp_path / "dt")
    saver = jstate.Saver(
        [
            ("s", T.stack(["i", "i"], axis=-1)),
            ("bt", T.transpose("b")),
            (("z0", "z1", "z2"), T.split("z", 3, axis=1)),
            ("f8", T.cast("u8", "float8_e4m3fn")),
            ("i4", T.cast("i", "int4")),
        ]
    )
    zero = S((0, 2), jnp.float32, sharding=NamedSharding(mesh, P(None, "model")))
    target = {
        "s": S((3, 4, 2), jnp.int32),
        "bt": S((2, 3), jnp.bool_),
        "z0": zero,
        "z1": zero,
        "z2": zero,
        "f8": S((6,), jnp.float8_e4m3fn),
        "i4": S((3, 4), jnp.int4),
    }
    got = saver.restore(path, target)
    np.testing.assert_array_equal(got["s"][..., 1], tree["i"])
    np.testing.assert_array_equal(got["bt"], tree["b"].T)
    assert got["z1"].shape == (0, 2) and got["z1"].sharding == zero.sharding
    assert got["f8"].dtype == jnp.float8_e4m3fn and got["f8"].astype(jnp.float32).tolist() == [0, 1, 2, 3, 4, 5]
    assert got["i4"].dtype == jnp.int4
    with pytest.raises(
        jstate.SpecMismatchError, match=r"gives shape \(4, 3\) and dtype int32.*float32. Pass `cast=True`"
    ):
        jstate.Saver([("t", T.transpose("i"))]).restore(path, {"t": S((4, 3), jnp.float32)})


def test_a_plan_made_before_a_resave_does_not_bind_the_restore(tmp_path):
    path = jstate.Saver().save({"w": np.zeros((2, 3), np.float32)}, tmp_path / "m")
    saver = jstate.Saver([("k", T.transpose("w"))])
    assert saver.plan(path, {"k": S((3, 2), jnp.float32)}).problems == []
    jstate.Saver().save({"w": np.ones((4, 5), np.float32)}, tmp_path / "m")  # re-saved in place
    with pytest.raises(jstate.SpecMismatchError, match=r"gives shape \(5, 4\).*declared with shape \(3, 2\)"):
        saver.restore(path, {"k": S((3, 2), jnp.float32)})
    assert (saver.restore(path, {"k": S((5, 4), jnp.float32)})["k"] == 1).all()


def test_restoring_a_shared_entry_by_name_and_through_transforms(tmp_path):
    """One entry read by name, by a transpose, a cast and a split: all restore; saving back
    refuses, since one entry would have several sources."""
    qkv = np.arange(12, dtype=np.float32).reshape(2, 6)
    path = jstate.Saver().save({"qkv": qkv, "w": np.ones(3, np.float32)}, tmp_path / "m")
    saver = jstate.Saver(
        [
            "qkv",
            ("a", T.transpose("qkv")),
            ("b", T.cast("qkv", "bfloat16")),
            (("q", "k", "v"), T.split("qkv", 3, axis=1)),
        ]
    )
    target = {
        "qkv": S((2, 6), jnp.float32),
        "a": S((6, 2), jnp.float32),
        "b": S((2, 6), jnp.bfloat16),
        **{n: S((2, 2), jnp.float32) for n in "qkv"},
    }
    plan = saver.plan(path, target, strict=True)
    assert [type(p) for p in plan.problems] == [jstate.CheckpointError] and "'w'" in str(plan.problems[0])
    got = saver.restore(path, target)
    np.testing.assert_array_equal(got["a"], qkv.T)
    np.testing.assert_array_equal(got["v"], qkv[:, 4:])
    with pytest.raises(jstate.MappingError):
        saver.save(got, tmp_path / "back")
    assert not (tmp_path / "back").exists()
