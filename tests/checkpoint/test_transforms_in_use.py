"""Restore-time transforms and `Saver.plan` as users use them: Flax and optax on a 4 x 2 mesh,
TF1 checkpoints, PyTorch-layout weights, safetensors, plain Orbax, narrow dtypes. Real checkpoints
in tmp_path, real shardings over the 8 CPU devices."""

from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import jstate
from jstate import transforms as T

S = jax.ShapeDtypeStruct
TF = Path(__file__).parents[1] / "data" / "tensorflow"
L, D = 3, 8


@pytest.mark.slow
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
    """Each part of one split lands on its own target's sharding: two meshes and one device."""
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


@pytest.mark.slow
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
    """A rule naming a variable the target lacks, or a transform that does not apply, fails
    before any array of the TensorFlow checkpoint is read."""
    target = {"k": S((8, 4), jnp.float32), "v": S((3,), jnp.float32)}
    saver = jstate.Saver(["v1", ("k", T.stack(["layer1/weights", "layer2/weights"]))])
    with pytest.raises(jstate.UnknownVariableError):  # "v1" is not in the target
        saver.restore(TF / "train", target)
    saver = jstate.Saver([("v", T.reshape("layer1/biases", (3,))), ("k", T.transpose("layer1/weights"))])
    with pytest.raises(jstate.MappingError, match=r"reshape\('layer1/biases', \(3,\)\) does not apply"):
        saver.restore(TF / "train", target)


def test_transforms_on_safetensors_and_plain_orbax(tmp_path, mesh):
    """Stack, split and cast read a safetensors file, and transpose and cast a plain Orbax
    checkpoint, onto sharded targets."""
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
    """Transforms of int, bool, zero-size and uint8 entries, casts to float8 and int4; a result
    whose dtype differs from the target's needs `cast=True`, and the error says so."""
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
