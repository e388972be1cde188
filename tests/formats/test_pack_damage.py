"""Damaged and hostile packed checkpoints: a malformed manifest, a manifest whose dtypes Orbax does
not hold, one from a newer jstate, flipped or truncated data files. Each is a clear
CorruptCheckpointError naming the checkpoint (and the variable where known), never a crash nor
values read as another dtype; a damaged checkpoint never stops later saves or lookups."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jstate
from jstate.formats import manifest as _manifest
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


MALFORMED = {
    "slot-too-short": lambda raw: raw["variables"]["w"].update(packed=["float32-0"]),
    "slot-empty": lambda raw: raw["variables"]["w"].update(packed=[]),
    "slot-offset-infinite": lambda raw: raw["variables"]["w"].update(packed=["float32-0", float("inf")]),
    "packed-shape-infinite": lambda raw: raw["packed"]["float32-0"].update(shape=[float("inf")]),
    # Not about packing, but damage of the same kind:
    "step-infinite": lambda raw: raw.update(step=float("inf")),
    "shape-infinite": lambda raw: raw["variables"]["big"].update(shape=[float("inf")]),
}


@pytest.mark.parametrize("edit", list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_malformed_packed_slot_is_a_damaged_manifest_not_a_crash(tmp_path, edit):
    """A packed slot too short or empty, an infinite offset, shape or step: the manifest is
    damaged (CorruptCheckpointError), never an IndexError or OverflowError from decoding it."""
    _, path = small_checkpoint(tmp_path)
    rewrite(path, edit)
    with pytest.raises(jstate.CorruptCheckpointError, match="manifest .*jstate.json is damaged"):
        jstate.list_variables(path)


def test_one_malformed_slot_does_not_stop_latest_checkpoint_or_later_saves(tmp_path):
    """The newest checkpoint's manifest has a malformed slot: it is skipped as damaged, the one
    before is the latest, and the next save (whose retention reads every manifest) works."""
    saver = jstate.Saver(max_to_keep=3)
    for step in range(3):
        saver.save(jstate.State({"w": jnp.arange(4.0) + step}), tmp_path / "m", step=step)
    rewrite(tmp_path / "m-2", MALFORMED["slot-too-short"])
    assert jstate.latest_checkpoint(tmp_path) == str(tmp_path / "m-1")
    path = saver.save(jstate.State({"w": jnp.arange(4.0)}), tmp_path / "m", step=3)
    assert jstate.latest_checkpoint(tmp_path) == path


def _claim_int16(raw):
    raw["variables"]["i"]["dtype"] = "int16"
    if "int32-0" in raw.get("packed", {}):
        raw["packed"]["int32-0"]["dtype"] = "int16"


@pytest.mark.parametrize("pack", [False, True], ids=["unpacked", "packed"])
def test_a_verified_restore_refuses_a_manifest_dtype_orbax_does_not_hold(tmp_path, pack):
    """A manifest listing an int32 variable as int16: a verified restore refuses it naming the
    checkpoint, packed or not, never reads the int32 bytes as int16 values."""
    vals = {"i": jnp.asarray([100000, 5, -70000], jnp.int32)}
    path = Path(jstate.Saver(pack=pack).save(jstate.State(vals), tmp_path / "m"))
    rewrite(path, _claim_int16)
    assert jstate.list_variables(path) == [("i", (3,), np.dtype("int16"))]
    target = jstate.State.from_tree({"i": jax.ShapeDtypeStruct((3,), jnp.int16)})
    with pytest.raises(jstate.CorruptCheckpointError, match=str(path)):
        jstate.Saver().restore(path, target)


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "unpacked"])
def test_load_variable_never_returns_a_dtype_other_than_the_listed_one(tmp_path, pack):
    """`load_variable` returns the dtype `list_variables` lists, or refuses the checkpoint as
    damaged; never an int32 array for a variable listed as int16."""
    vals = {"i": jnp.asarray([100000, 5, -70000], jnp.int32)}
    path = Path(jstate.Saver(pack=pack).save(jstate.State(vals), tmp_path / "m"))
    rewrite(path, _claim_int16)
    try:
        value = jstate.load_variable(path, "i")
    except jstate.CorruptCheckpointError:
        return
    assert value.dtype == np.dtype("int16")


def test_a_manifest_from_a_newer_jstate_is_refused_clearly(tmp_path):
    """A manifest version newer than this jstate's is refused saying so, not taken for damage."""
    _, path = small_checkpoint(tmp_path)
    rewrite(path, lambda raw: raw.update(version=_manifest.VERSION + 1))
    with pytest.raises(jstate.CheckpointError, match=r"(?i)version|newer"):
        jstate.list_variables(path)


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
    """Overlapping slots, a packed array Orbax does not hold, one claimed to be 2**60 elements:
    each a CorruptCheckpointError naming the checkpoint, with nothing of that size allocated."""
    vals, path = small_checkpoint(tmp_path)
    rewrite(path, edit)
    with pytest.raises(jstate.CorruptCheckpointError, match=str(path)):
        jstate.Saver(["w"]).restore(path, abstract(vals))
    with pytest.raises(jstate.CorruptCheckpointError):
        jstate.load_variable(path, "w")


def test_a_flipped_byte_in_compressed_packed_data_names_the_variable(tmp_path):
    """One flipped bit in a compressed data file: the restore names the variable and the file."""
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
    """A data file cut in half: the checkpoint says how many bytes were written and is not listed."""
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
