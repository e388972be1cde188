"""Direct reads: uncompressed arrays read from Orbax's OCDBT files by jstate itself (`_ocdbt`), not
through Orbax. They return exactly what Orbax would, for every dtype, layout and transform; refuse
damage as Orbax would, naming the checkpoint and the variable; hold no more memory than what they
return; never share data between copies of a checkpoint; and leave to Orbax what they cannot read."""

import gc
import os
import shutil
import threading
import tracemalloc
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jstate
from jstate import transforms as T
from jstate.formats import ocdbt as _ocdbt
from jstate.formats import orbax as _orbax
from jstate.formats.manifest import Manifest


def _arrays(path) -> Path:
    return Path(path) / Manifest.read(Path(path)).arrays


def _located(path) -> dict:
    return _ocdbt.locate(jstate.open_checkpoint(path).arrays)


def _poke(chunk: _ocdbt.Chunk, at: int, byte: int) -> None:
    assert chunk.inline is None, "the test needs a value stored out of line (over 1 KiB)"
    with open(chunk.file, "r+b") as f:
        f.seek(chunk.offset + at)
        f.write(bytes([byte]))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("pack", [False, True])
def test_a_damaged_bool_is_refused_with_verify_false_as_orbax_refuses_it(tmp_path, monkeypatch, pack):
    """A bool byte damaged to 0x02 (a flipped bit) is refused by Orbax (tensorstore checks bool
    bytes), and by the direct read too, even with verify=False: a CorruptCheckpointError naming
    'mask', never a non-canonical True where False was saved."""
    vals = {"mask": jnp.zeros((4096,), jnp.bool_), "other": jnp.ones((4096,), jnp.bool_)}
    path = jstate.Saver(pack=pack).save(jstate.State(vals), tmp_path / "m")
    located = _located(path)
    if pack:
        ckpt = jstate.open_checkpoint(path)
        slot = ckpt.manifest.variables["mask"].packed
        chunk, at = located[f"jstate.packed.{slot.array}"].chunks[(0,)], slot.offset + 5
    else:
        chunk, at = located["mask"].chunks[(0,)], 5
    _poke(chunk, at, 0x02)
    target = jstate.State({"mask": vals["mask"]})
    with monkeypatch.context() as m:  # the old path: Orbax refuses the damaged byte
        m.setattr(_ocdbt, "locate", lambda directory: {})
        with pytest.raises(jstate.CorruptCheckpointError, match="'mask'"):
            jstate.Saver(["mask"]).restore(path, target, verify=False)
    with pytest.raises(jstate.CorruptCheckpointError, match="'mask'"):
        restored = jstate.Saver(["mask"]).restore(path, target, verify=False)["mask"]
        print("restored mask[5] =", restored[5], "(saved False)")


def test_a_data_file_truncated_after_open_names_the_checkpoint_and_variable(tmp_path):
    """A data file truncated after the checkpoint was opened: the error names the checkpoint, the
    variable being read and the file, as the Orbax path does (README, "Errors")."""
    rng = np.random.default_rng(0)
    vals = {"w": jnp.asarray(rng.normal(size=(256, 256)), jnp.float32)}
    path = Path(jstate.Saver(pack=False).save(jstate.State(vals), tmp_path / "m"))
    ckpt = jstate.open_checkpoint(path)
    (chunk,) = _located(path)["w"].chunks.values()
    os.truncate(chunk.file, chunk.offset + 100)
    with pytest.raises(jstate.CorruptCheckpointError) as info:
        ckpt.read({"w": jax.ShapeDtypeStruct((256, 256), jnp.float32)}, verify=False)
    message = str(info.value)
    assert str(path) in message and chunk.file.name in message
    assert "variable 'w'" in message, message


def _held_after(restore) -> float:
    """MiB of NumPy (tracemalloc-tracked) memory still held once `restore()`'s result is kept
    and everything else is dropped."""
    gc.collect()
    tracemalloc.start()
    try:
        kept = restore()
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del kept
    return held / 2**20


@pytest.mark.slow  # seconds of compiles: in CI, not the fast loop
def test_a_slice_restored_through_a_transform_does_not_pin_its_whole_source(tmp_path, monkeypatch):
    """A transform that takes part of an entry (`split(...)[0]`) restores an array that owns only
    its own bytes: on the CPU `jax.device_put` adopts aligned host buffers without a copy, views
    included, so a placed view would keep the whole 32 MiB source alive. Under 4 MiB is held, as
    through Orbax (transforms.py: "host memory peaks at about one variable's inputs and result
    above the restored State")."""
    emb = jnp.arange(2048 * 4096, dtype=jnp.float32).reshape(2048, 4096)  # 32 MiB
    path = jstate.Saver(pack=False).save(jstate.State({"emb": emb}), tmp_path / "m")
    target = jstate.State.from_tree({"head": jax.ShapeDtypeStruct((8, 4096), jnp.float32)}, flat=True)
    saver = jstate.Saver([("head", T.split("emb", [8])[0])])
    with monkeypatch.context() as m:
        m.setattr(_ocdbt, "locate", lambda directory: {})
        assert _held_after(lambda: saver.restore(path, target)) < 4  # through Orbax: nothing held
    restored = saver.restore(path, target)
    np.testing.assert_array_equal(restored["head"], emb[:8])
    del restored
    held = _held_after(lambda: saver.restore(path, target))
    assert held < 4, f"a 128 KiB restored variable holds {held:.1f} MiB of host memory"


@pytest.mark.slow  # seconds of compiles: in CI, not the fast loop
def test_restored_packed_variables_do_not_pin_their_whole_packed_array(tmp_path, monkeypatch):
    """A restore that reads a packed array whole places copies of its variables, not views: one
    1 MiB variable kept from the restore holds under 4 MiB, not the whole 15 MiB packed array, as
    through Orbax."""
    vals = {f"v{i:02d}": jnp.full((256 * 1024,), i, jnp.float32) for i in range(15)}  # one 15 MiB packed array
    path = jstate.Saver().save(jstate.State(vals), tmp_path / "m")
    with monkeypatch.context() as m:
        m.setattr(_ocdbt, "locate", lambda directory: {})
        assert _held_after(lambda: jstate.Saver().restore(path, jstate.State(vals))["v00"]) < 4
    held = _held_after(lambda: jstate.Saver().restore(path, jstate.State(vals))["v00"])
    assert held < 4, f"one restored 1 MiB variable holds {held:.1f} MiB"


def test_a_packed_array_stored_in_several_chunks_is_read_or_left_to_orbax(tmp_path):
    """A packed array stored in several chunks (rewritten by a tool with tensorstore, or by an
    Orbax that chunks large arrays, its files re-recorded) is a valid checkpoint: `load_variable`
    reads a slot from it exactly."""
    import json

    import tensorstore as ts

    from jstate.formats import integrity as _integrity
    from jstate.formats import manifest as _manifest

    vals = {f"v{i}": jnp.full((1000,), i, jnp.float32) for i in range(8)}
    path = Path(jstate.Saver().save(jstate.State(vals), tmp_path / "m"))
    arrays = jstate.open_checkpoint(path).arrays
    spec = {
        "driver": "zarr",
        "kvstore": {"driver": "ocdbt", "base": f"file://{arrays}/", "path": "jstate.packed.float32-0"},
    }
    stored = ts.open(spec, open=True).result()
    data, metadata = stored.read().result(), stored.spec().to_json()["metadata"]
    metadata["chunks"] = [data.shape[0] // 2]  # the same values, in two chunks
    ts.open({**spec, "metadata": metadata}, create=True, delete_existing=True).result().write(data).result()
    raw = json.loads((path / "jstate.json").read_bytes())
    raw["files"] = _integrity.file_records(arrays)  # the rewrite's files recorded, as a tool would
    del raw["checksum"]
    (path / "jstate.json").write_bytes(_manifest.encode(raw))
    assert len(_located(path)["jstate.packed.float32-0"].chunks) == 2
    np.testing.assert_array_equal(jstate.load_variable(path, "v3"), vals["v3"])


def _dtype_values() -> dict:
    rng = np.random.default_rng(0)
    raw = rng.integers(-8, 8, size=(48, 40))
    vals = {
        f"v_{jnp.dtype(dt).name}": jnp.asarray(raw.astype(jnp.dtype(dt)))
        for dt in (jnp.int4, jnp.int8, jnp.uint16, jnp.float16, jnp.bfloat16, jnp.float8_e4m3fn, jnp.float8_e5m2)
    }
    vals["v_bool"] = jnp.asarray(raw > 0)
    vals["v_complex64"] = jnp.asarray((raw + 1j * raw[::-1]).astype(np.complex64))
    vals["scalar"] = jnp.float32(3.5)
    vals["key"] = jax.random.split(jax.random.key(1), 4)
    vals["rbg"] = jax.random.split(jax.random.key(1, impl="rbg"), 3)
    return vals


def _same(a, b) -> bool:
    if jax.dtypes.issubdtype(getattr(b, "dtype", None), jax.dtypes.prng_key):
        a, b = jax.random.key_data(a), jax.random.key_data(b)
    return np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("pack", [False, True])
def test_every_dtype_reads_exactly_from_its_files(tmp_path, monkeypatch, array_reads, pack):
    """Every dtype (int4 to complex64, bool, scalars, PRNG keys of both kinds) is read from its files
    by jstate, none through Orbax, exactly, verified or not; a packed variable reads its slot alone."""
    vals = _dtype_values()
    path = jstate.Saver(pack=pack).save(jstate.State(vals), tmp_path / "m")
    for fn in ("read", "read_host"):  # everything read by `_ocdbt`, none by Orbax
        monkeypatch.setattr(_orbax, fn, lambda *a, **k: pytest.fail("read through Orbax"))
    for verify in (True, False):
        restored = jstate.Saver().restore(path, jstate.State(vals), verify=verify)
        assert all(_same(restored[n], v) for n, v in vals.items())
    del array_reads[:]
    for n, v in vals.items():  # one variable: a slot read for packed ones
        assert _same(jstate.load_variable(path, n), v)
        assert _same(jstate.load_variable(path, n, verify=False), v)
    if pack:  # slots alone where a variable is half of its packed array or less
        assert any("[" in r for r in array_reads) and all(r.startswith("jstate.packed.") for r in array_reads)
    else:
        assert sorted(set(array_reads)) == sorted(vals)


def test_64_bit_values_without_x64_read_exactly_on_the_host(tmp_path):
    """int64 and float64 values saved with x64 load exactly on the host without it."""
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        vals = {
            "i64": jnp.asarray(rng.integers(-(2**60), 2**60, size=(64, 8)), jnp.int64),
            "f64": jnp.asarray(rng.normal(size=(300, 500)), jnp.float64),
        }
        host = {n: np.asarray(v) for n, v in vals.items()}
        paths = [jstate.Saver(pack=pk).save(jstate.State(vals), tmp_path / f"p{pk}") for pk in (False, True)]
    for path in paths:
        for n in vals:
            got = jstate.load_variable(path, n)
            assert got.dtype == host[n].dtype and np.array_equal(got, host[n])


@pytest.mark.slow  # seconds of compiles: in CI, not the fast loop
def test_sharded_layouts_restore_exactly_onto_other_meshes_and_damage_names_the_variable(tmp_path):
    """Arrays saved sharded by rows, columns, both or replicated restore exactly onto other meshes;
    a flipped byte in any shard's chunk names the variable and the damaged file."""
    rng = np.random.default_rng(2)
    m42, m24, m8 = jax.make_mesh((4, 2), ("a", "b")), jax.make_mesh((2, 4), ("a", "b")), jax.make_mesh((8,), ("x",))
    vals = {
        "rows": jax.device_put(rng.normal(size=(64, 40)).astype(np.float32), NamedSharding(m42, P("a"))),
        "cols": jax.device_put(rng.normal(size=(64, 40)).astype(np.float32), NamedSharding(m24, P(None, "b"))),
        "both": jax.device_put(rng.normal(size=(64, 40)).astype(np.float32), NamedSharding(m42, P("a", "b"))),
        "repl": jax.device_put(rng.normal(size=(33, 7)).astype(np.float32), NamedSharding(m8, P())),
        # 20 MB in 8 shards of 2.5 MB: shard boundaries inside the 2 MiB blocks `Running` is fed
        "big": jax.device_put(rng.normal(size=(1000, 5000)).astype(np.float32), NamedSharding(m8, P("x"))),
    }
    path = jstate.Saver(pack=False).save(jstate.State(vals), tmp_path / "m")
    located = _located(path)
    assert set(located) == set(vals) and len(located["both"].chunks) > 1
    for sharding in (NamedSharding(m24, P("b", "a")), NamedSharding(m8, P(None, "x")), None):
        target = jstate.State.from_tree(
            {
                n: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding if n != "repl" else None)
                for n, v in vals.items()
            },
            flat=True,
        )
        restored = jstate.Saver().restore(path, target)
        assert all(np.array_equal(restored[n], v) for n, v in vals.items())
    for name in ("cols", "big"):
        chunk = list(located[name].chunks.values())[-1]
        at = chunk.length // 2 + 3
        with open(chunk.file, "rb") as f:
            f.seek(chunk.offset + at)
            old = f.read(1)[0]
        _poke(chunk, at, old ^ 0x10)
        with pytest.raises(jstate.CorruptCheckpointError, match=f"variable '{name}'.*damaged file"):
            jstate.Saver().restore(path, jstate.State(vals))
        with pytest.raises(jstate.CorruptCheckpointError, match=f"'{name}'"):
            jstate.load_variable(path, name)
        _poke(chunk, at, old)


def test_copies_with_identical_manifests_never_share_data_and_fds_are_closed(tmp_path):
    """A copy of a checkpoint (same bytes, same mtimes) damaged after the original was read is read
    from its own files: its damage is reported, the original still restores, and no file is left open."""
    rng = np.random.default_rng(3)
    vals = {"w": jnp.asarray(rng.normal(size=(128, 64)), jnp.float32), "b": jnp.arange(300.0)}
    original = Path(jstate.Saver(pack=False).save(jstate.State(vals), tmp_path / "a"))
    assert jstate.Saver().restore(original, jstate.State(vals))["w"].shape == (128, 64)  # caches filled
    copy = tmp_path / "copy"
    shutil.copytree(original, copy, symlinks=True)  # cp -a: same bytes, same mtimes
    assert (copy / "jstate.json").read_bytes() == (original / "jstate.json").read_bytes()
    (chunk,) = _located(copy)["w"].chunks.values()
    assert str(chunk.file).startswith(str(copy))
    _poke(chunk, 17, 0xFF)
    fds = _fds()
    for _ in range(3):
        with pytest.raises(jstate.CorruptCheckpointError, match=f"{copy}.*'w'"):
            jstate.Saver().restore(copy, jstate.State(vals))
        with pytest.raises(jstate.CorruptCheckpointError):
            jstate.Saver().restore(copy, jstate.State(vals), verify=True)
        restored = jstate.Saver().restore(original, jstate.State(vals))
        assert np.array_equal(restored["w"], vals["w"]) and np.array_equal(restored["b"], vals["b"])
    assert _fds() == fds


def test_data_directories_linked_outside_are_refused_and_inside_are_read(tmp_path):
    """A data directory linked to another place inside the checkpoint is read; linked outside, refused."""
    vals = {"w": jnp.arange(4096.0).reshape(64, 64)}
    path = Path(jstate.Saver(pack=False).save(jstate.State(vals), tmp_path / "m"))
    data = _arrays(path) / "ocdbt.process_0" / "d"
    inside = data.with_name("d-moved")
    data.rename(inside)
    data.symlink_to(inside.resolve(), target_is_directory=True)
    assert np.array_equal(jstate.Saver().restore(path, jstate.State(vals))["w"], vals["w"])
    outside = tmp_path / "outside"
    shutil.copytree(inside, outside)
    data.unlink()
    data.symlink_to(outside.resolve(), target_is_directory=True)
    with pytest.raises(jstate.CheckpointError, match="outside"):
        jstate.Saver().restore(path, jstate.State(vals), verify=False)


def test_threads_restoring_while_the_same_path_is_resaved_see_one_whole_checkpoint(tmp_path):
    """Threads restoring a path while it is re-saved again and again each see one whole save, never a mix."""

    def state(k):
        return jstate.State(
            {f"w{i}": jnp.full((128, 128), k, jnp.float32) for i in range(3)}
            | {f"s{i}": jnp.full((10,), k, jnp.float32) for i in range(3)}
        )

    path = tmp_path / "m"
    jstate.Saver().save(state(0), path)
    stop, problems, seen = threading.Event(), [], set()

    def reader():
        while not stop.is_set():
            try:
                restored = jstate.Saver().restore(path, state(0))
                found = {float(np.asarray(v).ravel()[i]) for v in restored.values() for i in (0, -1)}
                problems.extend([found] if len(found) != 1 else [])
                seen.update(found)
            except Exception as e:  # noqa: BLE001
                problems.append(repr(e))

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    saver = jstate.Saver()
    for k in range(1, 8):
        saver.save(state(k), path, blocking=k % 2 == 0)
    saver.wait()
    stop.set()
    for t in readers:
        t.join()
    assert not problems and len(seen) > 1


def test_transforms_read_through_the_files_exactly_and_compressed_checkpoints_through_orbax(tmp_path, array_reads):
    """Stack, split, cast and transpose read uncompressed checkpoints from their files and compressed
    ones through Orbax, with the same values."""
    rng = np.random.default_rng(4)
    vals = {
        "l0/w": jnp.asarray(rng.normal(size=(64, 48)), jnp.float32),
        "l1/w": jnp.asarray(rng.normal(size=(64, 48)), jnp.float32),
        "qkv": jnp.asarray(rng.normal(size=(16, 96)), jnp.float32),
    }
    saver = jstate.Saver(
        [
            ("stacked", T.stack(["l0/w", "l1/w"])),
            (("q", "k", "v"), T.split("qkv", 3, axis=-1)),
            ("wt", T.cast(T.transpose("l1/w"), "bfloat16")),
        ]
    )
    target = jstate.State.from_tree(
        {
            "stacked": jax.ShapeDtypeStruct((2, 64, 48), jnp.float32),
            "q": jax.ShapeDtypeStruct((16, 32), jnp.float32),
            "k": jax.ShapeDtypeStruct((16, 32), jnp.float32),
            "v": jax.ShapeDtypeStruct((16, 32), jnp.float32),
            "wt": jax.ShapeDtypeStruct((48, 64), jnp.bfloat16),
        },
        flat=True,
    )
    for compression in (False, True):
        path = jstate.Saver(pack=False, compression=compression).save(jstate.State(vals), tmp_path / f"c{compression}")
        assert bool(_located(path)) is not compression
        out = saver.restore(path, target)
        np.testing.assert_array_equal(out["stacked"], np.stack([vals["l0/w"], vals["l1/w"]]))
        np.testing.assert_array_equal(out["k"], np.asarray(vals["qkv"])[:, 32:64])
        np.testing.assert_array_equal(out["wt"], np.asarray(vals["l1/w"]).T.astype(jnp.bfloat16))
