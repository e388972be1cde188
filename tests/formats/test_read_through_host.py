"""Restores through host memory (`NativeCheckpoint._read_through_host`): arrays `_ocdbt` can read
from their files, and every array of a target on accelerators, are read into host memory a
batch at a time, checked there, and put on their devices. The machines here have no
accelerator: that case is forced on the 8 CPU devices, which exercises everything but the speed."""

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jstate
from jstate.formats import native as _native
from jstate.formats import ocdbt as _ocdbt
from jstate.formats import orbax as _orbax
from jstate.formats.manifest import Manifest
from jstate.formats.native import NativeCheckpoint


def values():
    rng = np.random.default_rng(1)
    return {f"w{i}": jnp.asarray(rng.normal(size=(64, 512)), jnp.float32) for i in range(6)} | {
        "rng": jax.random.split(jax.random.key(0), 2**17)  # 1 MiB of key data: stored by name
    }


def target(vals, sharding):
    return jstate.State.from_tree(
        {n: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for n, v in vals.items()}, flat=True
    )


@pytest.fixture(params=["from files", "through orbax"])
def on_host(request, monkeypatch):
    """Every restore read as for accelerators, in batches of ~300 KB; the arrays read from their
    files by `_ocdbt`, or (as for a compressed checkpoint) through Orbax. Returns the batches put
    on the devices."""
    monkeypatch.setattr(NativeCheckpoint, "_through_host", lambda self, todo: set(todo))
    monkeypatch.setattr(_native, "_BATCH_BYTES", 300_000)  # several batches
    if request.param == "through orbax":
        monkeypatch.setattr(_ocdbt, "locate", lambda directory: {})
    monkeypatch.setattr(_orbax, "read", lambda *a, **k: pytest.fail("the device path must not be taken"))
    placed = []
    real = NativeCheckpoint._put_all
    monkeypatch.setattr(
        NativeCheckpoint, "_put_all", lambda self, host, w: placed.append(sorted(host)) or real(self, host, w)
    )
    return placed


def todo(ckpt, names, sharding):
    return {
        n: (ckpt.entries[n], jax.ShapeDtypeStruct(ckpt.entries[n].shape, jnp.float32, sharding=sharding)) for n in names
    }


def test_on_the_cpu_arrays_read_from_their_files_go_through_the_host_and_others_through_orbax(tmp_path):
    sharding = NamedSharding(jax.make_mesh((8,), ("x",)), P("x"))
    vals = values()
    plain = jstate.open_checkpoint(jstate.Saver(pack=False).save(jstate.State(vals), tmp_path / "plain"))
    assert plain._through_host(todo(plain, ["w0", "w1"], sharding)) == {"w0", "w1"}
    zipped = jstate.open_checkpoint(jstate.Saver(pack=False, compression=True).save(jstate.State(vals), tmp_path / "z"))
    assert zipped._through_host(todo(zipped, ["w0", "w1"], sharding)) == set()


def test_a_compressed_checkpoint_is_read_by_orbax_onto_the_shardings(tmp_path, array_reads):
    vals = values()
    path = jstate.Saver(pack=False, compression=True).save(jstate.State(vals), tmp_path / "z")
    sharding = NamedSharding(jax.make_mesh((4, 2), ("a", "b")), P("a", "b"))
    restored = jstate.Saver(["w1", "w2"]).restore(path, target({n: vals[n] for n in ("w1", "w2")}, sharding))
    assert sorted(array_reads) == ["w1", "w2"]
    assert restored["w2"].sharding == sharding
    np.testing.assert_array_equal(restored["w2"], vals["w2"])


def test_a_verified_restore_through_the_host_in_batches(tmp_path, on_host):
    vals = values()
    path = jstate.Saver(pack=False).save(jstate.State(vals), tmp_path / "m")
    sharding = NamedSharding(jax.make_mesh((4, 2), ("a", "b")), P("a", "b"))
    weights = {n: v for n, v in vals.items() if n != "rng"}
    restored = jstate.Saver(list(weights)).restore(path, target(weights, sharding))
    assert on_host == [["w0", "w1", "w2"], ["w3", "w4", "w5"]]  # batches of ~300 KB, each placed once
    for i in range(6):
        assert restored[f"w{i}"].sharding == sharding
        np.testing.assert_array_equal(restored[f"w{i}"], vals[f"w{i}"])
    single = jax.sharding.SingleDeviceSharding(jax.devices()[3])
    key = jstate.Saver(["rng"]).restore(path, target({"rng": vals["rng"]}, single))["rng"]
    assert jax.random.key_impl(key) == jax.random.key_impl(vals["rng"])
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(vals["rng"]))
    half = jstate.State.from_tree({"w0": jax.ShapeDtypeStruct((64, 512), jnp.bfloat16, sharding=sharding)})
    cast = jstate.Saver(["w0"]).restore(path, half, cast=True)["w0"]
    assert cast.dtype == jnp.bfloat16 and cast.sharding == sharding


def test_a_flipped_byte_is_found_on_the_host_and_names_the_variable(tmp_path, on_host):
    vals = values()
    path = Path(jstate.Saver(pack=False).save(jstate.State(vals), tmp_path / "m"))
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    arrays = copy / Manifest.read(copy).arrays
    needle = np.asarray(vals["w4"]).tobytes()[4096:4160]
    damaged = []
    for data in (f for f in arrays.rglob("*") if f.is_file() and "d" in f.relative_to(arrays).parts[:-1]):
        blob = bytearray(data.read_bytes())
        at = blob.find(needle)
        if at >= 0:
            blob[at + 9] ^= 0x01
            data.write_bytes(bytes(blob))
            damaged.append(str(data))
    assert damaged
    with pytest.raises(jstate.CorruptCheckpointError, match="variable 'w4'.*damaged file") as info:
        jstate.Saver().restore(copy, target(vals, None))
    assert any(d in str(info.value) for d in damaged)
