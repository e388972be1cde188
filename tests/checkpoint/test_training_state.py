"""The everyday paths of Flax, optax and Orbax users: optax states, lists and tuples, relative
paths."""

import os

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


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_restoring_onto_another_mesh_verifies_every_region(tmp_path, axis_type):
    kind = jax.sharding.AxisType.Explicit if axis_type == "explicit" else jax.sharding.AxisType.Auto
    saved_on = jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind, kind))
    restored_on = jax.make_mesh((4, 2), ("data", "model"), axis_types=(kind, kind))
    spec = jax.sharding.PartitionSpec("data", "model")
    value = jax.device_put(jnp.arange(64.0 * 32).reshape(64, 32), jax.sharding.NamedSharding(saved_on, spec))
    path = jstate.Saver(pack=False).save(jstate.State({"w": value}), tmp_path / "m")  # stored by shard, not packed
    target = jstate.State.from_tree(
        {"w": jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=jax.sharding.NamedSharding(restored_on, spec))}
    )
    restored = jstate.Saver().restore(path, target)
    np.testing.assert_array_equal(restored["w"], value)
    assert restored["w"].sharding == jax.sharding.NamedSharding(restored_on, spec)
    # Every saved region is checked: read through the host, on the whole array; read by Orbax
    # onto the devices (a compressed checkpoint, several processes), each region assembled on
    # the host from the new shards.
    from jstate.formats import integrity as _integrity
    from jstate.formats.native import NativeCheckpoint

    checked = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            _integrity,
            "checksum",
            lambda data, real=_integrity.checksum: checked.append(getattr(data, "shape", "file")) or real(data),
        )
        jstate.Saver().restore(path, target)
    assert [c for c in checked if c != "file"] == [(32, 8)] * 8  # the 8 regions of the (2, 4) mesh
    checked = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(NativeCheckpoint, "_through_host", lambda self, todo: set())
        mp.setattr(_integrity, "_check", lambda job, real=_integrity._check: checked.append(job[1]) or real(job))
        jstate.Saver().restore(path, target)
    assert len(checked) == 8  # each assembled from the (4, 2) shards


@pytest.mark.slow  # compiles jitted training steps for seconds
def test_a_flax_and_optax_training_state_on_a_mesh_round_trips_through_eval_shape(tmp_path, monkeypatch):
    import flax.linen as nn
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    monkeypatch.chdir(tmp_path)
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    module = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(4)])
    tx = optax.adamw(1e-2)

    def shard(x):
        spec = P(None, "model") if x.ndim == 2 else P()
        return jax.device_put(x, NamedSharding(mesh, spec))

    def make(key):
        params = module.init(key, jnp.ones((8, 8)))
        return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0), "rng": jax.random.key(1)}

    train = jax.tree.map(shard, make(jax.random.key(0)))

    @jax.jit
    def step(train, x):
        grads = jax.grad(lambda p: jnp.sum(module.apply(p, x) ** 2))(train["params"])
        updates, opt_state = tx.update(grads, train["opt_state"], train["params"])
        rng, _ = jax.random.split(train["rng"])
        params = optax.apply_updates(train["params"], updates)
        return {"params": params, "opt_state": opt_state, "step": train["step"] + 1, "rng": rng}

    x = jax.device_put(jnp.ones((8, 8)), NamedSharding(mesh, P("data")))
    saver = jstate.Saver(max_to_keep=2)
    for i in range(3):
        train = step(train, x)
        saver.save(train, "ckpt/train", step=i, blocking=False)
    saver.wait()
    # A fresh run resumes from abstract shapes with the shardings it will train with.
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=s.sharding), train)
    resumed = jstate.Saver().restore(jstate.latest_checkpoint("ckpt"), target)
    assert jax.tree.structure(resumed) == jax.tree.structure(train)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(train)):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(a, b)
        assert a.sharding == b.sharding
    assert jax.random.key_impl(resumed["rng"]) == jax.random.key_impl(train["rng"])
    # It trains on, bit for bit with the run that never stopped.
    np.testing.assert_array_equal(
        jax.tree.leaves(step(resumed, x)["params"])[0], jax.tree.leaves(step(train, x)["params"])[0]
    )


def test_prng_keys_are_variables(tmp_path):
    def model(s):
        s.variable("rng", jax.random.key(1))
        s.variable("w", jstate.initializers.zeros, (2,))

    state = jstate.init(model, jax.random.key(0))
    path = jstate.Saver().save(state, tmp_path / "m")
    assert ("rng", (), jax.random.key(0).dtype) in jstate.list_variables(path)
    restored = jstate.Saver().restore(path, jstate.abstract(model))
    np.testing.assert_array_equal(jax.random.key_data(restored["rng"]), jax.random.key_data(state["rng"]))
    from_tree = jstate.State.from_tree({"keys": jax.random.split(jax.random.key(3), 4)})
    again = jstate.Saver().restore(jstate.Saver().save(from_tree, tmp_path / "k"), from_tree)
    assert again["keys"].shape == (4,) and jax.dtypes.issubdtype(again["keys"].dtype, jax.dtypes.prng_key)


def test_an_nnx_model_with_rngs_is_checkpointed(tmp_path):
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(3, 2, rngs=rngs)
            self.dropout = nnx.Dropout(0.5, rngs=rngs)

    model = Model(nnx.Rngs(0))
    state = jstate.from_nnx(model)
    path = jstate.Saver().save(state, tmp_path / "nnx")
    fresh = Model(nnx.Rngs(1))
    restored = jstate.Saver().restore(path, jstate.from_nnx(fresh))
    nnx.update(fresh, jstate.to_nnx(restored))
    np.testing.assert_array_equal(fresh.dense.kernel[...], model.dense.kernel[...])


@pytest.mark.slow
def test_a_64_bit_checkpoint_restores_with_cast_in_a_32_bit_process(tmp_path):
    import subprocess
    import sys

    code = (
        "import jax; jax.config.update('jax_enable_x64', True)\n"
        "import jax.numpy as jnp, jstate, sys\n"
        "st = jstate.State({'d': jnp.arange(4, dtype=jnp.float64) / 3, 'i': jnp.arange(3, dtype=jnp.int64) + 2**40})\n"
        "jstate.Saver().save(st, sys.argv[1])\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "x64")], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}
    )
    path = tmp_path / "x64"
    d = jstate.load_variable(path, "d")  # NumPy, in the stored dtype, as TF's load_variable
    assert isinstance(d, np.ndarray) and d.dtype == np.float64
    np.testing.assert_array_equal(d, np.arange(4, dtype=np.float64) / 3)
    assert jstate.load_variable(path, "i")[0] == 2**40
    target = jstate.State.from_tree({"d": jax.ShapeDtypeStruct((4,), jnp.float32)})
    with pytest.raises(jstate.SpecMismatchError, match="Pass `cast=True`"):
        jstate.Saver(["d"]).restore(path, target)
    restored = jstate.Saver(["d"]).restore(path, target, cast=True)  # checksums on the stored 64-bit bytes
    np.testing.assert_array_equal(restored["d"], (np.arange(4) / 3).astype(np.float32))


def test_paths_with_a_tilde_and_pathlike_objects(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    state = jstate.State({"w": jnp.ones(2)})
    path = jstate.Saver().save(state, "~/ckpt/model", step=3)
    assert path == str(tmp_path / "ckpt" / "model-3")
    assert jstate.latest_checkpoint("~/ckpt") == path
    np.testing.assert_array_equal(jstate.load_variable("~/ckpt/model-3", "w"), np.ones(2))


def test_tf_saver_habits_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = jstate.State({"w": jnp.ones(2)})
    target = jstate.State.from_tree({"w": jax.ShapeDtypeStruct((2,), jnp.float32)})
    (tmp_path / "empty").mkdir()
    with pytest.raises(jstate.CheckpointNotFoundError, match="the path is None"):
        jstate.Saver().restore(jstate.latest_checkpoint("empty"), target)
    saver = jstate.Saver(keep_checkpoint_every_n_hours=1.0, max_to_keep=1)
    saver.save(state, "ckpt/my-model", step=1)
    assert jstate.latest_checkpoint("ckpt/my-model") == "ckpt/my-model-1"
    np.testing.assert_array_equal(saver.restore("ckpt/my-model", target)["w"], np.ones(2))  # a prefix
    assert saver.last_checkpoints == ["ckpt/my-model-1"]
    assert [row[0] for row in jstate.list_checkpoints("ckpt")] == ["ckpt/my-model-1"]


def test_two_leaves_with_one_name_are_refused_not_merged(tmp_path):
    tree = {"a/b": jnp.ones(2), "a": {"b": jnp.zeros(2)}}
    with pytest.raises(jstate.InvalidNameError, match="both named 'a/b'"):
        jstate.Saver().save(tree, tmp_path / "m", step=1)
    assert not (tmp_path / "m-1").exists()


def test_initializers_refuse_tensorflows_positional_order():
    with pytest.raises(TypeError, match=r"normal\(stddev=..., mean=...\)"):
        jstate.initializers.normal(0.5, 0.35)
    with pytest.raises(TypeError, match=r"uniform\(minval=..., maxval=...\)"):
        jstate.initializers.uniform(-1.0, 1.0)


@pytest.mark.parametrize("step", [3.5, "7", True])
def test_a_step_must_be_an_integer(tmp_path, step):
    with pytest.raises((TypeError, ValueError), match="`step` must be an integer"):
        jstate.Saver().save({"w": jnp.ones(2)}, tmp_path / "m", step=step)


@pytest.mark.slow
def test_inspect_values_shows_prng_key_data(tmp_path):
    import subprocess
    import sys

    path = jstate.Saver().save({"key": jax.random.key(0)}, tmp_path / "m", step=1)
    out = subprocess.run([sys.executable, "-m", "jstate", "inspect", path, "--values"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "key data (threefry2x32)" in out.stdout


def test_plain_orbax_reads_the_arrays_of_a_relative_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = jstate.Saver(pack=False).save({"w": jnp.arange(3.0)}, "readme/model", step=1)  # a plain tree of names
    tree = ocp.StandardCheckpointer().restore(jstate.open_checkpoint(path).arrays)
    np.testing.assert_array_equal(tree["w"], np.arange(3.0))


def test_nnx_states_save_and_restore_under_the_names_from_nnx_gives(tmp_path):
    from flax import nnx

    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    path = jstate.Saver().save(nnx.state(model), tmp_path / "raw", step=1)
    assert [n for n, *_ in jstate.list_variables(path)] == ["bias", "kernel"]
    restored = jstate.Saver().restore(path, nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(1))))
    assert isinstance(restored, nnx.State)
    np.testing.assert_array_equal(restored["kernel"][...], model.kernel[...])
    into_state = jstate.Saver().restore(path, jstate.from_nnx(nnx.Linear(2, 3, rngs=nnx.Rngs(1))))
    np.testing.assert_array_equal(into_state["kernel"], model.kernel[...])


@pytest.mark.parametrize("url", ["hdfs://cluster/ckpt/model", "file:///tmp/ckpt/model", "az://container/ckpt"])
def test_unsupported_urls_are_refused_not_written_locally(tmp_path, monkeypatch, url):
    """gs:// and s3:// are supported (tests/cloud/test_cloud_checkpoints.py); any other URL is one clear
    error, never a local directory named after its scheme."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(jstate.CheckpointError, match=f"{url}: jstate reads and writes local paths, gs://"):
        jstate.Saver().save({"w": jnp.ones(2)}, url, step=1)
    with pytest.raises(jstate.CheckpointError, match="Nothing was read or written"):
        jstate.latest_checkpoint(url)
    assert list(tmp_path.iterdir()) == []
