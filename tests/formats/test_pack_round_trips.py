"""Packed small variables round-trip exactly: every dtype (narrow, complex, PRNG keys), casts as an
unpacked variable casts, onto explicit meshes and single devices, in optax states; and the saves
around them hold: Ctrl-C while packing, a background save of deleted arrays, retention, inspect."""

import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import jstate
from jstate.formats import integrity as _integrity
from jstate.formats import pack as _pack
from jstate.formats.manifest import Manifest


def abstract(vals, shardings=None):
    shardings = shardings or {}
    return jstate.State.from_tree(
        {n: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings.get(n)) for n, v in vals.items()}, flat=True
    )


def small_checkpoint(tmp_path, name="m", **saver):
    vals = {"w": jnp.arange(4.0), "i": jnp.arange(10, dtype=jnp.int32), "big": jnp.ones(300_000)}
    return vals, Path(jstate.Saver(**saver).save(jstate.State(vals), tmp_path / name))


CASTS = {
    "f32-nan-inf-to-int32": (np.array([3e9, -3e9, np.nan, np.inf, -1.5, 2.7], np.float32), jnp.int32),
    "f32-to-uint8": (np.array([-1.5, 300.0, 255.9, np.nan, -0.5, 1e10], np.float32), jnp.uint8),
    "f32-to-int8": (np.array([-1.5, 300.0, 127.9, np.nan, -200.0, 1e10], np.float32), jnp.int8),
    "bf16-to-int4": (np.array([9.0, -9.0, 7.6], jnp.bfloat16), jnp.int4),
}


@pytest.mark.parametrize("case", list(CASTS.values()), ids=list(CASTS))
def test_a_cast_restore_of_a_packed_variable_casts_as_an_unpacked_one_does(tmp_path, case):
    """`cast=True` gives a packed variable JAX's cast, as it gives an unpacked one: NaN, inf and
    out-of-range values become the same integers whether the variable was small enough to pack."""
    value, dtype = case
    value = jnp.asarray(value)
    target = jstate.State.from_tree({"v": jax.ShapeDtypeStruct(value.shape, dtype)})
    got = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NumPy's "invalid value encountered in cast"
        expected = np.asarray(value.astype(dtype))
        for pack in (False, True):
            path = jstate.Saver(pack=pack).save(jstate.State({"v": value}), tmp_path / f"pack-{pack}")
            assert (Manifest.read(path).variables["v"].packed is not None) == pack
            got[pack] = np.asarray(jstate.Saver().restore(path, target, cast=True)["v"])
    np.testing.assert_array_equal(got[False], expected)  # unpacked: JAX's cast, as documented
    np.testing.assert_array_equal(got[True], expected)


DTYPES = ["int4", "int2", "float4_e2m1fn", "float8_e4m3fn", "float8_e5m2", "float16", "int16", "uint8", "complex64"]


@pytest.mark.slow  # seconds of compiles: in CI, not the fast loop
def test_packed_variables_of_narrow_and_complex_dtypes_round_trip(tmp_path):
    """int4, int2, float4, float8, float16, int16, uint8 and complex64 variables and scalars are
    all packed, and restore and load exactly, in their own dtypes."""
    rng = np.random.default_rng(1)
    vals = {}
    for dt in DTYPES:
        if dt.startswith("complex"):
            vals[dt] = jnp.asarray(rng.normal(size=(3, 5)) + 1j * rng.normal(size=(3, 5)), dt)
        elif "int" in dt:
            vals[dt] = jnp.asarray(rng.integers(-2, 2, size=(3, 5)), jnp.int32).astype(dt)
        else:
            vals[dt] = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32).astype(dt)
        vals[dt + "/scalar"] = vals[dt][0, 0]
    path = jstate.Saver().save(jstate.State(vals), tmp_path / "m")
    manifest = Manifest.read(path)
    assert all(v.packed is not None for v in manifest.variables.values())
    restored = jstate.Saver().restore(path, abstract(vals))
    for name, value in vals.items():
        assert restored[name].dtype == value.dtype and restored[name].shape == value.shape, name
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(value), err_msg=name)
        loaded = jstate.load_variable(path, name)
        assert loaded.dtype == value.dtype, name
        np.testing.assert_array_equal(loaded, np.asarray(value), err_msg=name)


def test_the_default_threshold_packs_exactly_one_mebibyte(tmp_path):
    """A variable of exactly 1 MiB is packed; one element more is stored by name."""
    vals = {"at": jnp.zeros(_pack.THRESHOLD // 4), "over": jnp.zeros(_pack.THRESHOLD // 4 + 1)}
    path = jstate.Saver().save(jstate.State(vals), tmp_path / "m")
    variables = Manifest.read(path).variables
    assert variables["at"].packed is not None and variables["over"].packed is None


@pytest.mark.parametrize("pack", ["yes", 1.5, None, -5])
def test_a_pack_that_is_no_size_is_refused(pack):
    """`pack` is True, False or a size in bytes; anything else is a TypeError saying so."""
    with pytest.raises(TypeError, match="`pack` takes True, False or a size in bytes"):
        jstate.Saver(pack=pack)


def test_packed_keys_scalars_and_narrow_dtypes_restore_onto_an_explicit_4x2_mesh_and_one_device(tmp_path):
    """Packed PRNG keys, scalars, int8 and bfloat16 restore exactly onto an explicit-axes 4 x 2
    mesh, verified or not, and onto one device cast to float16."""
    rng = np.random.default_rng(2)
    vals = {
        "w": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
        "k": jax.random.split(jax.random.key(1), 8),
        "s": jnp.float32(3.0),
        "q": jnp.arange(16, dtype=jnp.int8).reshape(4, 4),
        "b": jnp.asarray(rng.normal(size=8), jnp.bfloat16),
    }
    path = jstate.Saver().save(jstate.State(vals), tmp_path / "m")
    mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(AxisType.Explicit,) * 2)
    specs = {"w": P("a", "b"), "k": P("a"), "s": P(), "q": P(None, "a"), "b": P(("a", "b"))}
    shardings = {n: NamedSharding(mesh, s) for n, s in specs.items()}
    for verify in (True, False):
        restored = jstate.Saver().restore(path, abstract(vals, shardings), verify=verify)
        for n, v in vals.items():
            assert restored[n].sharding == shardings[n], n
            got, want = restored[n], v
            if n == "k":
                got, want = jax.random.key_data(got), jax.random.key_data(want)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=n)
    five = jax.devices()[5]
    target = jstate.State.from_tree(
        {
            n: jax.ShapeDtypeStruct(v.shape, v.dtype if n == "k" else jnp.float16, sharding=SingleDeviceSharding(five))
            for n, v in vals.items()
        },
        flat=True,
    )
    restored = jstate.Saver().restore(path, target, cast=True)
    for n, v in vals.items():
        assert restored[n].devices() == {five}, n
        if n != "k":
            assert restored[n].dtype == jnp.float16
            np.testing.assert_array_equal(np.asarray(restored[n]), np.asarray(v.astype(jnp.float16)), err_msg=n)


@pytest.mark.slow  # seconds of compiles: in CI, not the fast loop
def test_an_optax_state_of_packed_and_unpacked_leaves_round_trips_onto_a_mesh(tmp_path):
    """An adam train state, some leaves packed and one stored by name, resumes onto a mesh."""
    optax = pytest.importorskip("optax")
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    params = {
        "dense": {"kernel": jnp.ones((64, 32)), "bias": jnp.zeros(32)},
        "embed": jnp.ones((640, 512)) * 0.5,  # 1.25 MiB: stored by name
    }
    opt = optax.adam(1e-2)
    train = {"params": params, "opt_state": opt.init(params), "step": jnp.int32(0)}
    grads = jax.tree.map(jnp.ones_like, params)
    updates, train["opt_state"] = opt.update(grads, train["opt_state"], params)
    train["params"] = optax.apply_updates(params, updates)
    path = jstate.Saver().save(train, tmp_path / "train")
    manifest = Manifest.read(path)
    packed = {n for n, v in manifest.variables.items() if v.packed is not None}
    assert packed and packed != set(manifest.variables)

    def struct(x):
        spec = P("data", "model") if x.ndim == 2 else P()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

    resumed = jstate.Saver().restore(path, jax.tree.map(struct, train))
    assert jax.tree.structure(resumed) == jax.tree.structure(train)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(train)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding.spec == (P("data", "model") if b.ndim == 2 else P())


def _boom(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("where", [(_pack, "pack"), (_integrity, "whole_digest"), (_integrity, "array_digests")])
@pytest.mark.parametrize("blocking", [True, False])
def test_ctrl_c_while_packing_leaves_earlier_checkpoints_and_lists_nothing(tmp_path, monkeypatch, where, blocking):
    """Ctrl-C while packing or digesting, blocking or in the background: the earlier checkpoint
    stays the latest, nothing of the interrupted save is left, and the next save works."""
    vals, first = small_checkpoint(tmp_path, "m-1")
    saver = jstate.Saver()
    monkeypatch.setattr(*where, _boom)
    with pytest.raises(KeyboardInterrupt):
        saver.save(jstate.State(vals), tmp_path / "m", step=2, blocking=blocking)
    monkeypatch.undo()
    assert jstate.latest_checkpoint(tmp_path) == str(first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-1"]
    restored = jstate.Saver().restore(first, abstract(vals))
    np.testing.assert_array_equal(restored["w"], vals["w"])
    assert saver.save(jstate.State(vals), tmp_path / "m", step=3) == str(tmp_path / "m-3")


def test_an_async_save_keeps_the_values_at_call_time_even_when_deleted_right_after(tmp_path):
    """A background save holds the values it was called with: their arrays deleted right after
    the call, it still saves them."""
    vals = {f"v{i}": jnp.full((5,), float(i)) for i in range(5)} | {"big": jnp.ones(300_000)}
    structs = abstract(vals)
    saver = jstate.Saver()
    path = saver.save(jstate.State(vals), tmp_path / "m", blocking=False)
    for value in vals.values():
        value.delete()
    saver.wait()
    restored = jstate.Saver().restore(path, structs)
    assert [float(restored[f"v{i}"][0]) for i in range(5)] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert float(restored["big"].sum()) == 300_000.0


def test_retention_deletes_packed_checkpoints_whole(tmp_path):
    """Retention removes packed checkpoints whole; the kept ones hold one arrays directory each."""
    saver = jstate.Saver(max_to_keep=2)
    for step in range(4):
        saver.save(jstate.State({"w": jnp.full(4, float(step))}), tmp_path / "m", step=step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-2", "m-3"]
    for kept in ("m-2", "m-3"):
        assert len([p for p in (tmp_path / kept).iterdir() if p.name.startswith("arrays")]) == 1
    np.testing.assert_array_equal(jstate.load_variable(tmp_path / "m-2", "w"), np.full(4, 2.0))


def test_inspect_values_prints_packed_variables_and_keys(tmp_path, capsys):
    """`inspect --values` prints packed variables and PRNG keys by their own names and values."""
    from jstate.__main__ import main

    vals = {"a/w": jnp.arange(12.0).reshape(3, 4), "k": jax.random.key(7), "n": jnp.int32(9)}
    path = jstate.Saver().save(jstate.State(vals), tmp_path / "m")
    assert main(["inspect", path, "--values"]) == 0
    out = capsys.readouterr().out
    assert "[ 8.  9. 10. 11.]" in out and "[0 7]" in out and "jstate.packed" not in out


def test_a_read_with_a_bar_without_tqdm_says_what_to_install(tmp_path, monkeypatch):
    """`progress=True` without tqdm installed says to `pip install jstate[progress]`."""
    vals, path = small_checkpoint(tmp_path)
    monkeypatch.setitem(sys.modules, "tqdm.std", None)  # as if tqdm were not installed
    with pytest.raises(ImportError, match=r"pip install jstate\[progress\]"):
        jstate.open_checkpoint(path).read({"w": jax.ShapeDtypeStruct((4,), jnp.float32)}, progress=True)
