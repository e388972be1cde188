"""Attack on small-array packing; tests at the top fail until fixed.

Every test writes real checkpoints under tmp_path. The failing ones come first, most severe
first; the passing ones after them cover paths that tests/test_pack.py and
tests/test_progress.py do not (more dtypes, explicit meshes, interrupts, async saves, retention,
inspect --values, hostile manifests that are already handled).
"""

import json
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
from jstate.formats import manifest as _manifest
from jstate.formats import pack as _pack
from jstate.formats.manifest import FILE, Manifest


def abstract(vals, shardings=None):
    shardings = shardings or {}
    return jstate.State.from_tree(
        {n: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings.get(n)) for n, v in vals.items()}, flat=True
    )


def rewrite(path: Path, edit) -> None:
    """Edit a checkpoint's manifest and write it back well-formed and correctly checksummed:
    what a buggy writer or a crafted checkpoint would hold."""
    raw = json.loads((Path(path) / FILE).read_text())
    edit(raw)
    (Path(path) / FILE).write_bytes(_manifest.encode(raw))


def small_checkpoint(tmp_path, name="m", **saver):
    vals = {"w": jnp.arange(4.0), "i": jnp.arange(10, dtype=jnp.int32), "big": jnp.ones(300_000)}
    return vals, Path(jstate.Saver(**saver).save(jstate.State(vals), tmp_path / name))


# ---------------------------------------------------------------------------------------------
# FAILING: a malformed packed slot crashes with IndexError/OverflowError instead of
# CorruptCheckpointError; one such manifest breaks latest_checkpoint and every later save.
# ---------------------------------------------------------------------------------------------
MALFORMED = {
    "slot-too-short": lambda raw: raw["variables"]["w"].update(packed=["float32-0"]),
    "slot-empty": lambda raw: raw["variables"]["w"].update(packed=[]),
    "slot-offset-infinite": lambda raw: raw["variables"]["w"].update(packed=["float32-0", float("inf")]),
    "packed-shape-infinite": lambda raw: raw["packed"]["float32-0"].update(shape=[float("inf")]),
    # Not new with packing, same cause (`Manifest.decode` catches neither IndexError nor OverflowError):
    "preexisting-step-infinite": lambda raw: raw.update(step=float("inf")),
    "preexisting-shape-infinite": lambda raw: raw["variables"]["big"].update(shape=[float("inf")]),
}


@pytest.mark.parametrize("edit", list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_malformed_packed_slot_is_a_damaged_manifest_not_a_crash(tmp_path, edit):
    _, path = small_checkpoint(tmp_path)
    rewrite(path, edit)
    # Now: IndexError ("list index out of range") or OverflowError ("cannot convert float
    # infinity to integer") escapes `Manifest.decode`.
    with pytest.raises(jstate.CorruptCheckpointError, match="manifest .*jstate.json is damaged"):
        jstate.list_variables(path)


def test_one_malformed_slot_does_not_stop_latest_checkpoint_or_later_saves(tmp_path):
    saver = jstate.Saver(max_to_keep=3)
    for step in range(3):
        saver.save(jstate.State({"w": jnp.arange(4.0) + step}), tmp_path / "m", step=step)
    rewrite(tmp_path / "m-2", MALFORMED["slot-too-short"])
    # A manifest whose slot is garbage of another kind (["float32-0", "x"]) is skipped as damaged
    # and these calls work; a slot one element short makes them raise IndexError / fail the save.
    assert jstate.latest_checkpoint(tmp_path) == str(tmp_path / "m-1")
    path = saver.save(jstate.State({"w": jnp.arange(4.0)}), tmp_path / "m", step=3)
    assert jstate.latest_checkpoint(tmp_path) == path


# ---------------------------------------------------------------------------------------------
# FAILING: cast=True of a packed variable casts with NumPy on the host; an unpacked one casts
# with JAX. Out-of-range floats, NaN and inf restore to different integers depending only on
# whether the variable was small enough to be packed.
# ---------------------------------------------------------------------------------------------
CASTS = {
    "f32-nan-inf-to-int32": (np.array([3e9, -3e9, np.nan, np.inf, -1.5, 2.7], np.float32), jnp.int32),
    "f32-to-uint8": (np.array([-1.5, 300.0, 255.9, np.nan, -0.5, 1e10], np.float32), jnp.uint8),
    "f32-to-int8": (np.array([-1.5, 300.0, 127.9, np.nan, -200.0, 1e10], np.float32), jnp.int8),
    "bf16-to-int4": (np.array([9.0, -9.0, 7.6], jnp.bfloat16), jnp.int4),
}


@pytest.mark.parametrize("case", list(CASTS.values()), ids=list(CASTS))
def test_a_cast_restore_of_a_packed_variable_casts_as_an_unpacked_one_does(tmp_path, case):
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
    # Now e.g. NaN -> int32 gives -2147483648 packed, 0 unpacked; -1.5 -> uint8 gives 255 vs 0.
    np.testing.assert_array_equal(got[True], expected)


# ---------------------------------------------------------------------------------------------
# FAILING: a manifest whose dtype disagrees with Orbax's metadata is damage for unpacked
# variables (caught by the checksum or `_check_against_orbax`), but a verified restore of a
# packed one reads the packed array with `read_host`, which checks only its shape, and the
# checksum of the unchanged bytes passes: the values are silently cast.
# ---------------------------------------------------------------------------------------------
def _claim_int16(raw):
    raw["variables"]["i"]["dtype"] = "int16"
    if "int32-0" in raw.get("packed", {}):
        raw["packed"]["int32-0"]["dtype"] = "int16"


@pytest.mark.parametrize("pack", [False, True], ids=["unpacked-holds", "packed-fails"])
def test_a_verified_restore_refuses_a_manifest_dtype_orbax_does_not_hold(tmp_path, pack):
    vals = {"i": jnp.asarray([100000, 5, -70000], jnp.int32)}
    path = Path(jstate.Saver(pack=pack).save(jstate.State(vals), tmp_path / "m"))
    rewrite(path, _claim_int16)
    assert jstate.list_variables(path) == [("i", (3,), np.dtype("int16"))]
    target = jstate.State.from_tree({"i": jax.ShapeDtypeStruct((3,), jnp.int16)})
    # Packed, now: restores [-31072, 5, -4464] without any error.
    with pytest.raises(jstate.CorruptCheckpointError, match=str(path)):
        jstate.Saver().restore(path, target)


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "preexisting-unpacked"])
def test_load_variable_never_returns_a_dtype_other_than_the_listed_one(tmp_path, pack):
    vals = {"i": jnp.asarray([100000, 5, -70000], jnp.int32)}
    path = Path(jstate.Saver(pack=pack).save(jstate.State(vals), tmp_path / "m"))
    rewrite(path, _claim_int16)
    # Now: an int32 array comes back although the checkpoint lists 'i' as int16.
    try:
        value = jstate.load_variable(path, "i")
    except jstate.CorruptCheckpointError:
        return
    assert value.dtype == np.dtype("int16")


# ---------------------------------------------------------------------------------------------
# FAILING: the manifest version is written (now 3) but never read. jstate from before this
# change (which ignores `version` too) reports a packed checkpoint as damaged ("Orbax
# checkpoint ... does not hold 'w'") -- a user may delete a good checkpoint. The bump only
# helps from here on if readers refuse versions newer than their own with a clear message.
# ---------------------------------------------------------------------------------------------
def test_a_manifest_from_a_newer_jstate_is_refused_clearly(tmp_path):
    _, path = small_checkpoint(tmp_path)
    rewrite(path, lambda raw: raw.update(version=_manifest.VERSION + 1))
    with pytest.raises(jstate.CheckpointError, match=r"(?i)version|newer"):
        jstate.list_variables(path)


# =============================================================================================
# Passing: paths not covered by tests/test_pack.py and tests/test_progress.py.
# =============================================================================================
DTYPES = ["int4", "int2", "float4_e2m1fn", "float8_e4m3fn", "float8_e5m2", "float16", "int16", "uint8", "complex64"]


def test_packed_variables_of_narrow_and_complex_dtypes_round_trip(tmp_path):
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
    vals = {"at": jnp.zeros(_pack.THRESHOLD // 4), "over": jnp.zeros(_pack.THRESHOLD // 4 + 1)}
    path = jstate.Saver().save(jstate.State(vals), tmp_path / "m")
    variables = Manifest.read(path).variables
    assert variables["at"].packed is not None and variables["over"].packed is None


@pytest.mark.parametrize("pack", ["yes", 1.5, None, -5])
def test_a_pack_that_is_no_size_is_refused(pack):
    with pytest.raises(TypeError, match="`pack` takes True, False or a size in bytes"):
        jstate.Saver(pack=pack)


def test_packed_keys_scalars_and_narrow_dtypes_restore_onto_an_explicit_4x2_mesh_and_one_device(tmp_path):
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


def test_an_optax_state_of_packed_and_unpacked_leaves_round_trips_onto_a_mesh(tmp_path):
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
    saver = jstate.Saver(max_to_keep=2)
    for step in range(4):
        saver.save(jstate.State({"w": jnp.full(4, float(step))}), tmp_path / "m", step=step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-2", "m-3"]
    for kept in ("m-2", "m-3"):
        assert len([p for p in (tmp_path / kept).iterdir() if p.name.startswith("arrays")]) == 1
    np.testing.assert_array_equal(jstate.load_variable(tmp_path / "m-2", "w"), np.full(4, 2.0))


def test_inspect_values_prints_packed_variables_and_keys(tmp_path, capsys):
    from jstate.__main__ import main

    vals = {"a/w": jnp.arange(12.0).reshape(3, 4), "k": jax.random.key(7), "n": jnp.int32(9)}
    path = jstate.Saver().save(jstate.State(vals), tmp_path / "m")
    assert main(["inspect", path, "--values"]) == 0
    out = capsys.readouterr().out
    assert "[ 8.  9. 10. 11.]" in out and "[0 7]" in out and "jstate.packed" not in out


def test_a_read_with_a_bar_without_tqdm_says_what_to_install(tmp_path, monkeypatch):
    vals, path = small_checkpoint(tmp_path)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(ImportError, match=r"pip install jstate\[progress\]"):
        jstate.open_checkpoint(path).read({"w": jax.ShapeDtypeStruct((4,), jnp.float32)}, progress=True)


HANDLED = {
    # overlapping slots: each variable still has its own checksum
    "overlap": lambda raw: raw["variables"]["w"].update(packed=["float32-0", 1]),
    # a packed array the manifest names but Orbax does not hold
    "renamed": lambda raw: (
        raw["packed"].update({"float32-9": raw["packed"].pop("float32-0")}),
        raw["variables"]["w"].update(packed=["float32-9", 0]),
    ),
    # a packed array claimed to be huge: no allocation of that size
    "huge": lambda raw: raw["packed"]["float32-0"].update(shape=[2**60]),
}


@pytest.mark.parametrize("edit", list(HANDLED.values()), ids=list(HANDLED))
def test_hostile_packed_manifests_that_are_clear_errors(tmp_path, edit):
    vals, path = small_checkpoint(tmp_path)
    rewrite(path, edit)
    with pytest.raises(jstate.CorruptCheckpointError, match=str(path)):
        jstate.Saver(["w"]).restore(path, abstract(vals))
    with pytest.raises(jstate.CorruptCheckpointError):
        jstate.load_variable(path, "w")


def test_a_flipped_byte_in_compressed_packed_data_names_the_variable(tmp_path):
    rng = np.random.default_rng(3)
    vals = {f"l{i}/w": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32) for i in range(4)}
    path = Path(jstate.Saver(compression=True).save(jstate.State(vals), tmp_path / "m"))
    arrays = path / Manifest.read(path).arrays
    data = max(
        (f for f in arrays.rglob("*") if f.is_file() and "d" in f.relative_to(arrays).parts[:-1]),
        key=lambda f: f.stat().st_size,
    )
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0x40
    data.write_bytes(bytes(blob))
    with pytest.raises(jstate.CorruptCheckpointError, match=r"variable 'l\d/w'.*damaged file: .*" + data.name):
        jstate.Saver().restore(path, abstract(vals))


def test_a_truncated_packed_data_file_makes_the_checkpoint_incomplete(tmp_path):
    vals, path = small_checkpoint(tmp_path, "m-1")
    arrays = path / Manifest.read(path).arrays
    data = max(
        (f for f in arrays.rglob("*") if f.is_file() and "d" in f.relative_to(arrays).parts[:-1]),
        key=lambda f: f.stat().st_size,
    )
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(jstate.CorruptCheckpointError, match="bytes, .* were written"):
        jstate.load_variable(path, "w")
    assert jstate.latest_checkpoint(tmp_path) is None
