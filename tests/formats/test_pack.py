"""Packed small variables: stored as a few flat arrays per dtype, restored by name onto any
sharding, partially, verified one variable at a time."""

import json
import os
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
from jstate.formats import manifest as _manifest
from jstate.formats import pack as _pack
from jstate.formats.manifest import FILE, Manifest

BIG = 2 * _pack.THRESHOLD // 4  # float32 elements of a variable too big to pack


def values():
    """Every kind of leaf a training state holds: small ones of many dtypes, a PRNG key, a
    zero-size array, a scalar, and one variable above the threshold."""
    rng = np.random.default_rng(0)
    return {
        "dense/kernel": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32),  # 8 KiB: not inlined by OCDBT
        "dense/bias": jnp.asarray(rng.normal(size=8), jnp.float32),
        "norm/scale": jnp.asarray(rng.normal(size=8), jnp.bfloat16),
        "quant": jnp.asarray(rng.integers(-100, 100, size=(3, 5)), jnp.int8),
        "mask": jnp.asarray(rng.random(7) > 0.5),
        "step": jnp.int32(1234),
        "rng": jax.random.split(jax.random.key(3), 4),
        "empty": jnp.zeros((0, 4)),
        "big": jnp.asarray(rng.normal(size=BIG), jnp.float32),
    }


def assert_same(restored, expected):
    for name, value in expected.items():
        got = restored[name]
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(got) == jax.random.key_impl(value), name
            got, value = jax.random.key_data(got), jax.random.key_data(value)
        assert got.dtype == value.dtype and got.shape == value.shape, name
        np.testing.assert_array_equal(np.asarray(got), np.asarray(value), err_msg=name)


def abstract(vals, sharding=None):
    return jstate.State.from_tree(
        {n: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for n, v in vals.items()}, flat=True
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    vals = values()
    path = jstate.Saver().save(jstate.State(vals), tmp_path_factory.mktemp("pack") / "model", step=1)
    return vals, Path(path)


def test_small_variables_are_packed_per_dtype_and_restore_exactly(saved):
    vals, path = saved
    manifest = Manifest.read(path)
    packed = {n for n, v in manifest.variables.items() if v.packed is not None}
    assert packed == set(vals) - {"big", "empty"}
    assert sorted(manifest.packed) == ["bfloat16-0", "bool-0", "float32-0", "int32-0", "int8-0", "uint32-0"]
    assert manifest.variables["rng"].packed.array == "uint32-0"  # a key is stored as its key data
    restored = jstate.Saver().restore(path, abstract(vals))
    assert_same(restored, vals)


def test_packed_variables_are_listed_by_their_names(saved, capsys):
    vals, path = saved
    assert [n for n, *_ in jstate.list_variables(path)] == sorted(vals)
    assert jstate.open_checkpoint(path).entries["rng"].shape == (4,)
    from jstate.checkpoint.inspect import inspect_checkpoint

    inspect_checkpoint(path)
    out = capsys.readouterr().out
    assert "dense/kernel" in out and "jstate.packed" not in out


def test_plain_orbax_sees_large_arrays_by_name_and_packed_ones_per_dtype(saved):
    vals, path = saved
    manifest = Manifest.read(path)
    tree = ocp.StandardCheckpointer().restore(jstate.open_checkpoint(path).arrays)
    assert sorted(tree) == ["big", _pack.KEY]
    np.testing.assert_array_equal(tree["big"], vals["big"])
    flat = tree[_pack.KEY]["float32-0"]
    assert flat.ndim == 1 and flat.dtype == np.float32
    slot = manifest.variables["dense/kernel"].packed
    np.testing.assert_array_equal(_pack.unpack(np.asarray(flat), slot, (64, 32)), vals["dense/kernel"])


@pytest.mark.parametrize("pack", [False, 0])
def test_pack_false_or_zero_writes_a_plain_tree_of_names(tmp_path, pack):
    vals = values()
    path = jstate.Saver(pack=pack).save(jstate.State(vals), tmp_path / "plain")
    assert not Manifest.read(path).packed
    tree = ocp.StandardCheckpointer().restore(jstate.open_checkpoint(path).arrays)
    assert sorted(tree) == sorted(set(vals) - {"empty"})  # zero-size arrays: in the manifest only
    assert_same(jstate.Saver().restore(path, abstract(vals)), vals)


def test_a_threshold_in_bytes_packs_exactly_the_variables_up_to_it(tmp_path):
    vals = {"a": jnp.ones(16), "b": jnp.ones(17)}  # 64 and 68 bytes
    path = jstate.Saver(pack=64).save(jstate.State(vals), tmp_path / "t")
    variables = Manifest.read(path).variables
    assert variables["a"].packed is not None and variables["b"].packed is None
    with pytest.raises(TypeError, match="`pack` takes True, False or a size in bytes"):
        jstate.Saver(pack=-1)


def test_packed_variables_restore_onto_any_sharding(saved):
    vals, path = saved
    mesh = jax.make_mesh((8,), ("x",))
    sharded = NamedSharding(mesh, P("x"))
    target = abstract({"dense/kernel": vals["dense/kernel"], "dense/bias": vals["dense/bias"]}, sharded)
    restored = jstate.Saver(["dense/kernel", "dense/bias"]).restore(path, target)
    assert restored["dense/kernel"].sharding == sharded
    assert len(restored["dense/kernel"].addressable_shards) == 8
    assert_same(restored, {n: vals[n] for n in ("dense/kernel", "dense/bias")})
    one = jax.devices()[5]
    restored = jstate.Saver(["step"]).restore(
        path, abstract({"step": vals["step"]}, jax.sharding.SingleDeviceSharding(one))
    )
    assert restored["step"].devices() == {one} and int(restored["step"]) == 1234


def test_sharded_small_variables_are_gathered_and_packed(tmp_path):
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    sharding = NamedSharding(mesh, P("a", "b"))
    value = jax.device_put(jnp.arange(64.0).reshape(8, 8), sharding)
    path = jstate.Saver().save(jstate.State({"w": value}), tmp_path / "s")
    assert Manifest.read(path).variables["w"].packed is not None
    restored = jstate.Saver().restore(path, abstract({"w": value}, NamedSharding(mesh, P("b", None))))
    np.testing.assert_array_equal(restored["w"], value)


def test_a_cast_restore_of_a_packed_variable(saved):
    vals, path = saved
    target = abstract({"dense/kernel": jax.ShapeDtypeStruct((64, 32), jnp.bfloat16)})
    restored = jstate.Saver(["dense/kernel"]).restore(path, target, cast=True)
    assert restored["dense/kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(restored["dense/kernel"], vals["dense/kernel"].astype(jnp.bfloat16))


def test_partial_restore_reads_only_the_packed_arrays_it_needs(tmp_path, monkeypatch, array_reads):
    monkeypatch.setattr(_pack, "CHUNK", 1024)  # 256 floats per packed array
    vals = {f"layer{i}/w": jnp.full(100, i, jnp.float32) for i in range(6)} | {"count": jnp.int32(5)}
    path = jstate.Saver().save(jstate.State(vals), tmp_path / "p")
    assert sorted(Manifest.read(path).packed) == ["float32-0", "float32-1", "float32-2", "int32-0"]
    restored = jstate.Saver(["layer4/w", "layer5/w"]).restore(path, abstract(vals))
    assert array_reads == ["jstate.packed.float32-2"]  # layers 4 and 5 share the third chunk (name order)
    np.testing.assert_array_equal(restored["layer4/w"], vals["layer4/w"])
    array_reads.clear()
    restored = jstate.Saver(["layer1/w"]).restore(path, abstract(vals))
    assert array_reads == ["jstate.packed.float32-0[100:200]"]  # half a packed array or less: just its slot
    np.testing.assert_array_equal(restored["layer1/w"], vals["layer1/w"])
    array_reads.clear()
    assert int(jstate.load_variable(path, "count")) == 5
    assert array_reads == ["jstate.packed.int32-0"]


def test_load_variable_of_a_packed_variable_is_a_copy_of_its_own(saved):
    vals, path = saved
    kernel = jstate.load_variable(path, "dense/kernel")
    assert kernel.base is None and kernel.flags.writeable and kernel.shape == (64, 32)
    kernel[:] = 0  # writing it changes nothing else
    np.testing.assert_array_equal(jstate.load_variable(path, "dense/bias"), vals["dense/bias"])
    key = jstate.load_variable(path, "rng")
    assert jax.random.key_impl(key) == jax.random.key_impl(vals["rng"])


def test_an_unverified_restore_of_packed_variables(saved):
    vals, path = saved
    assert_same(jstate.Saver().restore(path, abstract(vals), verify=False), vals)


def _copy(path: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "copy-1"
    shutil.copytree(path, dst)
    return dst


def test_a_flipped_byte_in_packed_data_names_the_variable_and_the_file(saved, tmp_path):
    vals, path = saved
    copy = _copy(path, tmp_path)
    arrays = copy / Manifest.read(copy).arrays
    needle = np.asarray(vals["dense/kernel"]).tobytes()[:64]
    # OCDBT inlines small values into its b-tree nodes and keeps the nodes each commit replaced:
    # the bytes can be in several files, of which one is read. Damage them all.
    damaged = []
    for data in (f for f in arrays.rglob("*") if f.is_file() and "d" in f.relative_to(arrays).parts[:-1]):
        blob = bytearray(data.read_bytes())
        at = blob.find(needle)
        if at >= 0:
            blob[at + 5] ^= 0x10
            data.write_bytes(bytes(blob))
            damaged.append(str(data))
    assert damaged, "dense/kernel's bytes not found in any data file"
    with pytest.raises(jstate.CorruptCheckpointError) as info:
        jstate.Saver().restore(copy, abstract(vals))
    message = str(info.value)
    assert f"Checkpoint {copy}: variable 'dense/kernel'" in message
    assert "damaged file: " in message and any(d in message for d in damaged)
    # Its neighbours in the same packed array are checked alone, and still load.
    np.testing.assert_array_equal(jstate.load_variable(copy, "dense/bias"), vals["dense/bias"])
    restored = jstate.Saver(["big", "step"]).restore(copy, abstract(vals))
    assert int(restored["step"]) == 1234
    assert jstate.load_variable(copy, "dense/kernel", verify=False).shape == (64, 32)


def _rewrite(path: Path, edit) -> None:
    raw = json.loads((path / FILE).read_text())
    edit(raw)
    (path / FILE).write_bytes(_manifest.encode(raw))  # well-formed, correctly checksummed


@pytest.mark.parametrize(
    "edit",
    [
        lambda raw: raw["variables"]["dense/bias"].update(packed=["float32-0", 10**9]),
        lambda raw: raw["variables"]["dense/bias"].update(packed=["float32-0", -1]),
        lambda raw: raw["variables"]["dense/bias"].update(packed=["int8-0", 0]),
        lambda raw: raw["variables"]["dense/bias"].update(packed=["nowhere", 0]),
        lambda raw: raw["variables"]["dense/bias"].update(packed=["float32-0"]),
        lambda raw: raw["variables"]["dense/bias"].update(packed=["float32-0", 1.5]),
    ],
    ids=["past-the-end", "negative", "other-dtype", "no-such-array", "too-short", "not-an-integer"],
)
def test_a_crafted_slot_is_a_damaged_manifest(saved, tmp_path, edit):
    vals, path = saved
    copy = _copy(path, tmp_path)
    _rewrite(copy, edit)
    with pytest.raises(jstate.CorruptCheckpointError, match="manifest .*jstate.json is damaged.*'dense/bias'"):
        jstate.list_variables(copy)


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
def test_a_packed_array_that_disagrees_with_orbax_is_a_corrupt_checkpoint(saved, tmp_path, verify):
    vals, path = saved
    copy = _copy(path, tmp_path)
    _rewrite(copy, lambda raw: raw["packed"].update({"int8-0": {"shape": [16], "dtype": "int8"}}))
    with pytest.raises(jstate.CorruptCheckpointError, match=str(copy)):
        jstate.Saver(["quant"]).restore(copy, abstract(vals), verify=verify)


def test_a_manifest_of_a_newer_version_is_refused_as_such_not_as_damage(saved, tmp_path):
    vals, path = saved
    copy = _copy(path, tmp_path)
    _rewrite(copy, lambda raw: raw.update(version=_manifest.VERSION + 1))
    with pytest.raises(jstate.CheckpointError, match="written by a newer jstate .*not damaged") as info:
        jstate.list_variables(copy)
    assert not isinstance(info.value, jstate.CorruptCheckpointError)
    jstate.Saver().save(jstate.State(vals), tmp_path / "next")  # cleaning beside it keeps it
    assert (copy / FILE).exists()


def test_version_2_manifests_without_packing_still_read(tmp_path):
    vals = values()
    path = Path(jstate.Saver(pack=False).save(jstate.State(vals), tmp_path / "v2"))

    def as_version_2(raw):
        raw["version"] = 2
        del raw["packed"]

    _rewrite(path, as_version_2)
    assert_same(jstate.Saver().restore(path, abstract(vals)), vals)


@pytest.mark.slow
def test_64_bit_values_are_packed_and_stay_64_bit(tmp_path):
    code = (
        "import jax; jax.config.update('jax_enable_x64', True)\n"
        "import jax.numpy as jnp, jstate, sys\n"
        "st = jstate.State({'d': jnp.arange(4, dtype=jnp.float64) / 3, 'i': jnp.arange(3, dtype=jnp.int64) + 2**40})\n"
        "jstate.Saver().save(st, sys.argv[1])\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "x64")], check=True, env=env)
    path = tmp_path / "x64"
    assert sorted(Manifest.read(path).packed) == ["float64-0", "int64-0"]
    assert jstate.load_variable(path, "i")[0] == 2**40
    d = jstate.load_variable(path, "d")
    assert d.dtype == np.float64
    np.testing.assert_array_equal(d, np.arange(4, dtype=np.float64) / 3)
    target = jstate.State.from_tree({"d": jax.ShapeDtypeStruct((4,), jnp.float32)})
    restored = jstate.Saver(["d"]).restore(path, target, cast=True)
    np.testing.assert_array_equal(restored["d"], (np.arange(4) / 3).astype(np.float32))


@pytest.mark.slow
def test_two_processes_pack_replicated_variables_and_store_sharded_ones_by_name(tmp_path):
    from test_multihost import last_json, model, run_processes

    results = run_processes("pack", tmp_path)
    for code, _, err in results:
        assert code == 0, err[-3000:]
    r0, r1 = (last_json(out) for _, out, _ in results)
    assert r0["packed"] == r1["packed"] == ["layer0/bias", "layer1/bias", "layer2/bias", "rng", "step"]
    for r in (r0, r1):
        assert r["onto"] == pytest.approx(r["sums"], rel=1e-5)
        assert r["bias_spec"] == "P('model',)" and r["rng_same"]
    # One process with 8 devices reads what two wrote.
    restored = jstate.Saver(["layer1/bias", "layer1/kernel"]).restore(tmp_path / "packed", jstate.abstract(model))
    expected = jstate.init(model, jax.random.key(0))
    for name in ("layer1/bias", "layer1/kernel"):
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(expected[name]))
