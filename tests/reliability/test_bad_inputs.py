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


# -- arguments: one error, `ArgumentError` (a ValueError and a TypeError), naming argument and value
NAN = float("nan")
BAD_SAVER_ARGUMENTS = [
    ("max_to_keep", -1, "an integer >= 0"),
    ("max_to_keep", "3", "an integer >= 0"),
    ("max_to_keep", True, "an integer >= 0"),
    ("max_to_keep", NAN, "an integer >= 0"),
    ("max_to_keep", 2.5, "an integer >= 0"),
    ("keep_every_n_hours", 0, "a finite number of hours > 0"),
    ("keep_every_n_hours", -1, "a finite number of hours > 0"),
    ("keep_every_n_hours", "1", "a finite number of hours > 0"),
    ("keep_every_n_hours", NAN, "a finite number of hours > 0"),
    ("keep_checkpoint_every_n_hours", NAN, "a finite number of hours > 0"),
    ("keep_every_n_steps", -3, "an integer >= 1"),
    ("keep_every_n_steps", 0, "an integer >= 1"),
    ("keep_every_n_steps", 0.5, "an integer >= 1"),
    ("keep_every_n_steps", NAN, "an integer >= 1"),
    ("timeout", -1, "seconds as a number > 0"),
    ("timeout", 0, "seconds as a number > 0"),
    ("timeout", NAN, "seconds as a number > 0"),
    ("timeout", "5", "seconds as a number > 0"),
    ("timeout", float("inf"), "a finite number of seconds > 0"),
    ("timeout", None, "a finite number of seconds > 0"),
    ("layout", "bogus", "'jstate' or 'orbax'"),
]


@pytest.mark.parametrize(("argument", "value", "accepted"), BAD_SAVER_ARGUMENTS)
def test_a_saver_argument_of_the_wrong_type_or_value_is_an_argument_error(argument, value, accepted):
    with pytest.raises(jstate.ArgumentError, match=rf"`Saver\({argument}=\.\.\.\)` takes {accepted}.*; got ") as e:
        jstate.Saver(**{argument: value})
    assert isinstance(e.value, ValueError) and isinstance(e.value, TypeError)  # what `except` clauses catch today


@pytest.mark.parametrize("pack", [-5, NAN, "1024"])
def test_a_pack_that_is_no_size_is_an_argument_error(pack):
    with pytest.raises(jstate.ArgumentError, match=r"`pack` takes True, False or a size in bytes >= 0; got "):
        jstate.Saver(pack=pack)


def test_retention_arguments_as_numpy_integers_and_none_still_work(tmp_path):
    saver = jstate.Saver(max_to_keep=np.int64(1), keep_every_n_steps=np.int32(10), keep_checkpoint_every_n_hours=1)
    for step in (1, 10, 11):
        saver.save(small(), tmp_path / "ckpt/model", step=step)
    assert [row[1] for row in jstate.list_checkpoints(tmp_path / "ckpt")] == [10, 11]  # 10 kept for good


@pytest.mark.parametrize("step", [-1, 1.5, NAN, "7", True, np.array([1, 2])])
def test_a_step_that_is_no_integer_from_zero_up_is_an_argument_error_and_writes_nothing(tmp_path, step):
    with pytest.raises(jstate.ArgumentError, match=r"`Saver.save\(step=\.\.\.\)` takes an integer >= 0.*; got "):
        jstate.Saver().save(small(), tmp_path / "ckpt/model", step=step)
    assert not (tmp_path / "ckpt").exists()


def test_a_step_may_be_a_numpy_or_jax_integer(tmp_path):
    saver = jstate.Saver()
    assert saver.save(small(), tmp_path / "model", step=np.int64(3)).endswith("model-3")
    assert saver.save(small(), tmp_path / "model", step=jnp.asarray(4)).endswith("model-4")


@pytest.mark.parametrize("timeout", [-1, 0, NAN, True, "5"])
def test_a_lookup_timeout_that_is_no_positive_number_is_an_argument_error(tmp_path, timeout):
    path = jstate.Saver().save(small(), tmp_path / "ckpt/model", step=1)
    calls = {
        "latest_checkpoint": lambda: jstate.latest_checkpoint(tmp_path / "ckpt", timeout=timeout),
        "list_checkpoints": lambda: jstate.list_checkpoints(tmp_path / "ckpt", timeout=timeout),
        "list_variables": lambda: jstate.list_variables(path, timeout=timeout),
        "load_variable": lambda: jstate.load_variable(path, "w", timeout=timeout),
        "open_checkpoint": lambda: jstate.open_checkpoint(path, timeout=timeout),
    }
    for name, call in calls.items():
        with pytest.raises(jstate.ArgumentError, match=rf"`{name}\(timeout=\.\.\.\)` takes seconds as a number > 0"):
            call()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: T.unstack("w", parts=0), r"`unstack\(parts=\.\.\.\)` takes .*an integer >= 1.*; got int 0"),
        (lambda: T.unstack("w", parts=-1), r"`unstack\(parts=\.\.\.\)` takes .*an integer >= 1.*; got int -1"),
        (lambda: T.split("w", 0), r"`split\(x, sections\)` takes a number of equal parts >= 1.*; got int 0"),
        (lambda: T.unstack("w", parts=4)[7], r"unstack\('w', axis=0, parts=4\) has 4 parts, so no part \[7\]"),
    ],
)
def test_transform_arguments_out_of_range_are_argument_errors(make, message):
    with pytest.raises(jstate.ArgumentError, match=message):
        make()


def test_a_split_still_unpacks_into_its_parts():
    """An index past the parts is also an IndexError, which ends Python's sequence unpacking."""
    q, k, v = T.split("qkv", 3, axis=-1)
    assert (q, k, v) == tuple(T.split("qkv", 3, axis=-1)[i] for i in range(3))
    with pytest.raises(IndexError):
        T.unstack("w", parts=2)[2]
