"""Integrity: every damaged checkpoint raises a CheckpointError; none restores wrong values."""

import json
import os
import random
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jstate
from jstate import initializers as inits


def model(s):
    s.variable("weights", inits.normal(1.0), (32, 16))
    s.variable("biases", inits.normal(1.0), (16,))
    s.variable("step", 3)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    state = jstate.init(model, jax.random.key(0))
    directory = tmp_path_factory.mktemp("ckpt")
    path = jstate.Saver().save(state, directory / "model", step=1)
    files = sorted(os.path.relpath(os.path.join(root, f), path) for root, _, names in os.walk(path) for f in names)
    return state, path, files


def copy_checkpoint(path, tmp_path):
    import shutil

    dst = tmp_path / "copy-1"
    shutil.copytree(path, dst)
    return str(dst)


def damage(path, rel, how, rng):
    file = os.path.join(path, rel)
    if how == "delete":
        os.remove(file)
    elif how == "truncate":
        size = os.path.getsize(file)
        with open(file, "r+b") as f:
            f.truncate(rng.randrange(size) if size else 0)
    else:
        data = bytearray(Path(file).read_bytes())
        if not data:
            return False
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        Path(file).write_bytes(bytes(data))
    return True


def restore_or_error(state, path):
    """Restore must give exactly the saved values or raise a CheckpointError, nothing else."""
    try:
        restored = jstate.Saver().restore(path, jstate.abstract(model))
    except jstate.CheckpointError as e:
        assert str(path) in str(e)
        return "error"
    for name in state:
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(state[name]), err_msg=name)
    return "ok"


# Orbax reading a damaged file can leave a callback for its closed asyncio loop; that is noise
# from Orbax's threads, not an error jstate lets through (each restore's outcome is asserted).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("how", ["delete", "truncate", "flip"])
def test_fuzz_every_file_of_a_checkpoint(saved, tmp_path, how):
    state, path, files = saved
    rng = random.Random(f"{how}")
    outcomes = {}
    for i, rel in enumerate(files):
        copy = copy_checkpoint(path, tmp_path / str(i))
        if damage(copy, rel, how, rng):
            outcomes[rel] = restore_or_error(state, copy)
            # A missing or cut file makes a checkpoint incomplete: never listed as the latest.
            # (Flipped bits are found when the data is read, not by listing.)
            latest = jstate.latest_checkpoint(tmp_path / str(i))
            if latest is not None:
                outcome = restore_or_error(state, latest)
                assert how == "flip" or outcome == "ok"
    assert outcomes and "error" in outcomes.values()


def test_flipped_byte_in_array_data_names_variable_and_file(saved, tmp_path):
    state, path, files = saved
    copy = copy_checkpoint(path, tmp_path)
    data_files = [f for f in files if "/d/" in f]
    assert data_files
    # Flip a byte inside the float data of 'weights' (uncompressed, so its bytes are on disk).
    needle = np.asarray(state["weights"]).tobytes()[:64]
    for rel in data_files:
        blob = bytearray(Path(copy, rel).read_bytes())
        at = blob.find(needle)
        if at >= 0:
            blob[at + 5] ^= 0x10
            Path(copy, rel).write_bytes(bytes(blob))
            break
    else:
        pytest.fail("weights' bytes not found in any data file")
    with pytest.raises(jstate.CorruptCheckpointError) as info:
        jstate.Saver().restore(copy, jstate.abstract(model))
    message = str(info.value)
    assert f"Checkpoint {copy}: variable 'weights'" in message
    assert "does not match the checksum recorded at save; damaged file: " in message and rel in message
    assert info.value.__cause__ is None or "Traceback" not in message
    with pytest.raises(jstate.CorruptCheckpointError, match="variable 'weights'"):
        jstate.load_variable(copy, "weights")
    np.testing.assert_array_equal(jstate.load_variable(copy, "biases"), state["biases"])
    assert jstate.load_variable(copy, "weights", verify=False).shape == (32, 16)


def test_manifest_is_checksummed(saved, tmp_path):
    state, path, _ = saved
    copy = copy_checkpoint(path, tmp_path)
    manifest = json.loads(Path(copy, "jstate.json").read_text())
    manifest["variables"]["biases"]["dtype"] = "float16"
    Path(copy, "jstate.json").write_text(json.dumps(manifest))
    with pytest.raises(jstate.CorruptCheckpointError, match="manifest .*jstate.json is damaged"):
        jstate.list_variables(copy)


@pytest.mark.parametrize("rel", ["../../etc/passwd", "/etc/passwd", "d/../../x"])
def test_crafted_manifest_cannot_read_outside_the_checkpoint(saved, tmp_path, rel):
    from jstate.formats import manifest as _manifest

    state, path, _ = saved
    copy = copy_checkpoint(path, tmp_path)
    manifest = json.loads(Path(copy, "jstate.json").read_text())
    manifest["files"][rel] = [10, 0]
    Path(copy, "jstate.json").write_bytes(_manifest.encode(manifest))  # a well-formed but hostile manifest
    with pytest.raises(jstate.CorruptCheckpointError, match="outside the checkpoint"):
        jstate.Saver().restore(copy, jstate.abstract(model))


@pytest.mark.parametrize("name", ["../x", "/abs", "a/../../b", "..", "a/./b"])
def test_names_cannot_escape_the_checkpoint_directory(name, tmp_path):
    with pytest.raises(jstate.InvalidNameError):
        jstate.State.from_tree({name: jnp.ones(1)}, flat=True)
    state = jstate.State.from_tree({"x": jnp.ones(1)}, flat=True)
    with pytest.raises(jstate.InvalidNameError):
        jstate.Saver({name: "x"}).save(state, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)


@pytest.mark.slow  # a hypothesis search of checkpoints
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(names, min_size=1, max_size=6, unique=True))
def test_every_name_is_rejected_or_round_trips_exactly(tmp_path, candidates):
    accepted = {}
    for i, name in enumerate(candidates):
        try:
            jstate.State.from_tree({name: jnp.full(2, i)}, flat=True)
        except jstate.InvalidNameError:
            continue
        accepted[name] = jnp.full(2, i)
    if not accepted:
        return
    state = jstate.State.from_tree(accepted, flat=True)
    path = jstate.Saver().save(state, tmp_path / f"h{random.getrandbits(32)}")
    assert sorted(n for n, *_ in jstate.list_variables(path)) == sorted(accepted)
    restored = jstate.Saver().restore(path, state)
    for name, value in accepted.items():  # no two names share storage
        np.testing.assert_array_equal(restored[name], value)


def test_a_cast_restore_still_checks_the_stored_bytes(saved, tmp_path):
    state, path, files = saved
    copy = copy_checkpoint(path, tmp_path)
    needle = np.asarray(state["weights"]).tobytes()[:64]
    for rel in (f for f in files if "/d/" in f):
        blob = bytearray(Path(copy, rel).read_bytes())
        at = blob.find(needle)
        if at >= 0:
            blob[at + 5] ^= 0x10
            Path(copy, rel).write_bytes(bytes(blob))

    def half(s):
        s.variable("weights", inits.zeros, (32, 16), jnp.bfloat16)

    with pytest.raises(jstate.CorruptCheckpointError, match="variable 'weights'"):
        jstate.Saver(["weights"]).restore(copy, jstate.abstract(half), cast=True)
    restored = jstate.Saver(["weights"]).restore(path, jstate.abstract(half), cast=True)
    assert restored["weights"].dtype == jnp.bfloat16
