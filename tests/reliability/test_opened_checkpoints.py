"""A `Checkpoint` opened, then re-saved in place by another Saver before or while it is read: the
read returns what was opened (every array checked against the manifest opened), or raises one
CheckpointError saying the checkpoint was replaced and to open it again; never a
CorruptCheckpointError calling a healthy checkpoint damaged."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jstate
from jstate import CheckpointError, CorruptCheckpointError

REPLACED = r"was re-saved or deleted since it was opened.*Open it again"


def state(value: float) -> jstate.State:
    return jstate.State({"w": jnp.full((8, 4), value), "b": jnp.full((4,), value)})


def targets() -> dict[str, jax.ShapeDtypeStruct]:
    return {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32), "b": jax.ShapeDtypeStruct((4,), jnp.float32)}


@pytest.mark.parametrize("how", ["read", "read_host"])
def test_reading_a_checkpoint_re_saved_since_it_was_opened_says_so(tmp_path, how):
    path = jstate.Saver().save(state(1.0), tmp_path / "ckpt/model")
    opened = jstate.open_checkpoint(path)
    jstate.Saver().save(state(2.0), path)  # replaces it: new arrays, the old ones removed
    read = (lambda: opened.read(targets())) if how == "read" else (lambda: opened.read_host(["w", "b"]))
    with pytest.raises(CheckpointError, match=REPLACED) as caught:
        read()
    assert not isinstance(caught.value, CorruptCheckpointError)
    assert "damaged" not in str(caught.value) and "incomplete" not in str(caught.value)
    np.testing.assert_array_equal(jstate.open_checkpoint(path).read_host(["w"])["w"], np.full((8, 4), 2.0))


def test_reading_a_checkpoint_deleted_since_it_was_opened_says_so(tmp_path):
    saver = jstate.Saver(max_to_keep=1)
    first = saver.save(state(1.0), tmp_path / "ckpt/model", step=1)
    opened = jstate.open_checkpoint(first)
    saver.save(state(2.0), tmp_path / "ckpt/model", step=2)  # retires step 1
    with pytest.raises(CheckpointError, match=REPLACED) as caught:
        opened.read_host(["w"])
    assert not isinstance(caught.value, CorruptCheckpointError)


@pytest.mark.slow
def test_reads_racing_re_saves_return_what_was_opened_or_say_it_was_replaced(tmp_path):
    """A writer re-saves one path in a loop while a reader opens it and reads it, a few hundred
    times: each read is one whole checkpoint that was saved (both arrays of one save), or the
    one "replaced" error."""
    path = jstate.Saver().save(state(0.0), tmp_path / "ckpt/model")
    stop = threading.Event()
    errors = []

    saves = []

    def write():
        saver = jstate.Saver()
        try:
            while not stop.is_set():
                saves.append(saver.save(state(float(len(saves) + 1)), path))
        except BaseException as e:
            errors.append(e)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    outcomes = {"read": 0, "replaced": 0}
    try:
        while len(saves) < 60 or outcomes["read"] + outcomes["replaced"] < 300:  # re-saves racing a few hundred reads
            opened = jstate.open_checkpoint(path)
            try:
                values = opened.read_host(["w", "b"])
            except CorruptCheckpointError as e:
                pytest.fail(f"a healthy checkpoint called damaged: {e}")
            except CheckpointError as e:
                assert "was re-saved or deleted since it was opened" in str(e), str(e)
                outcomes["replaced"] += 1
                continue
            value = float(values["b"][0])
            assert np.all(values["w"] == value) and np.all(values["b"] == value), "a mix of two saves"
            outcomes["read"] += 1
    finally:
        stop.set()
        writer.join(120)
    assert not errors, errors
    assert outcomes["read"] > 0, outcomes
