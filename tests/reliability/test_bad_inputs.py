"""Inputs that once escaped as bare Python exceptions (ZeroDivisionError, RecursionError,
OverflowError, NumPy's TypeError) are jstate errors naming the argument or variable and what to
do, or simply work. (Special and hostile files: tests/formats/test_hostile_files.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jstate
from jstate import CheckpointError, MappingError
from jstate import transforms as T
from jstate.storage import deadlines


def small() -> jstate.State:
    return jstate.State({"w": jnp.arange(12.0).reshape(4, 3)})


@pytest.mark.parametrize("shape", [(0, -1), (-1, 0), (-1, -1)])
def test_a_reshape_whose_minus_one_cannot_be_inferred_is_a_mapping_error(shape):
    with pytest.raises(MappingError, match=r"reshape\('w', shape=.*a -1 dimension is inferred from the others"):
        T.reshape("w", shape)
    with pytest.raises(MappingError, match=r"saved_shape="):
        T.reshape("w", (12,), saved_shape=shape)


def test_restoring_through_a_zero_minus_one_reshape_is_a_mapping_error(tmp_path):
    path = jstate.Saver().save(small(), tmp_path / "ckpt/model")
    with pytest.raises(MappingError, match=r"reshape\('w', shape=\(0, -1\)\)"):
        jstate.Saver([("w", T.reshape("w", (0, -1)))]).restore(path, small())


def test_thousands_of_nested_transforms_are_a_mapping_error():
    t = "w"
    with pytest.raises(MappingError, match=r"A `transpose` of transforms nested 101 deep \(from \['w'\]\)"):
        for _ in range(3000):
            t = T.transpose(t)


def test_transforms_nested_as_deep_as_allowed_still_restore(tmp_path):
    path = jstate.Saver().save(small(), tmp_path / "ckpt/model")
    t = "w"
    for _ in range(T.MAX_DEPTH - 2):  # 98 transposes of an entry, 99 deep: the identity
        t = T.transpose(t)
    restored = jstate.Saver([("w", t)]).restore(path, small())
    np.testing.assert_array_equal(restored["w"], small()["w"])


def test_a_timeout_of_1e12_seconds_saves_and_restores(tmp_path):
    """``timeout=1e12`` ("forever") overflowed Orbax's datetime deadline and threading's waits;
    it is taken as `deadlines.LONGEST` seconds."""
    saver = jstate.Saver(timeout=1e12)
    path = saver.save(small(), tmp_path / "ckpt/model", step=1)
    np.testing.assert_array_equal(saver.restore(path, small())["w"], small()["w"])
    assert jstate.latest_checkpoint(tmp_path / "ckpt", timeout=1e12) == path
    assert deadlines.seconds(1e12) == deadlines.LONGEST


def test_exporting_prng_keys_to_safetensors_is_a_checkpoint_error(tmp_path):
    state = jstate.State({"rng": jax.random.key(0), "w": jnp.ones(3)})
    with pytest.raises(CheckpointError, match=r"Cannot export variable 'rng' to .*: it holds PRNG keys \(key<fry>"):
        jstate.save_safetensors(state, tmp_path / "model.safetensors")
    assert not (tmp_path / "model.safetensors").exists()
