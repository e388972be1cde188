"""Inputs that once escaped as bare Python exceptions (ZeroDivisionError, RecursionError,
OverflowError, NumPy's TypeError) are jstate errors naming the argument or variable and what to
do, or simply work. (Special and hostile files: tests/formats/test_hostile_files.py.)"""

import os
import re

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


@pytest.mark.parametrize("call", ["restore", "load_variable", "list_variables", "latest_checkpoint", "save"])
def test_a_path_with_a_nul_byte_is_a_checkpoint_error(tmp_path, call):
    saved = jstate.Saver().save(small(), tmp_path / "model", step=1)
    bad = f"{tmp_path}/mo\0del"
    calls = {
        "restore": lambda: jstate.Saver().restore(bad, small()),
        "load_variable": lambda: jstate.load_variable(bad, "w"),
        "list_variables": lambda: jstate.list_variables(bad),
        "latest_checkpoint": lambda: jstate.latest_checkpoint(bad),
        "save": lambda: jstate.Saver().save(small(), bad, step=2),
    }
    with pytest.raises(CheckpointError, match=r"mo\\x00del'?: a path cannot hold a NUL byte"):
        calls[call]()
    assert os.listdir(tmp_path) == [os.path.basename(saved)]


@pytest.mark.parametrize("suffix", ["/", "/.", "//"])
def test_a_step_is_never_appended_to_a_path_that_names_a_directory(tmp_path, suffix):
    """`pathlib` reads ``run/`` as ``run``: with a step, the checkpoint would be ``run-3``, beside
    the directory named. Refused, suggesting a name inside it; without a step, ``run/`` is run."""
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(CheckpointError, match=rf"'{run}{suffix}' with step=3: .*'{run}/model', step=3"):
        jstate.Saver(max_to_keep=1).save(small(), f"{run}{suffix}", step=3)
    assert os.listdir(tmp_path) == ["run"] and os.listdir(run) == []
    assert jstate.Saver().save(small(), f"{run}{suffix}") == str(run)  # the directory itself, as named


@pytest.mark.parametrize("path", ["/", "."])
def test_a_step_cannot_name_the_root_or_the_current_directory(tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        CheckpointError, match=rf"Cannot save to '{re.escape(path)}' with step=1: .*Nothing was written"
    ):
        jstate.Saver().save(small(), path, step=1)
    assert os.listdir(tmp_path) == []
