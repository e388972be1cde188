"""Bookkeeping values as the tools wrote them: an int64 step or a float64 learning rate (what
Orbax and TensorFlow store for Python numbers and `global_step`) restores into the 32-bit
variables JAX holds with its 64-bit mode off, without `cast=True`, when every value fits; a
Python number in the target comes back as one, as Orbax returns it."""

import logging
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax.training import train_state

import jstate

TF = Path(__file__).parents[1] / "data" / "tensorflow"
S = jax.ShapeDtypeStruct


def orbax_save(path, tree):
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
    return path


def make_train_state(step=0):
    module = nn.Dense(3)
    params = module.init(jax.random.key(0), jnp.ones((1, 2)))
    return train_state.TrainState.create(apply_fn=module.apply, params=params, tx=optax.adam(1e-3)).replace(step=step)


@pytest.fixture
def flax_checkpoint(tmp_path):
    """A Flax TrainState (its `step` a Python int) and a Python float learning rate, saved by Orbax."""
    tree = {"train": make_train_state(step=5), "lr": 0.1}
    return orbax_save(tmp_path / "orbax", tree), tree


def test_a_flax_train_state_saved_by_orbax_restores_into_its_eval_shape_target(flax_checkpoint, caplog):
    assert not jax.config.jax_enable_x64
    path, tree = flax_checkpoint
    stored = dict((n, d) for n, _, d in jstate.list_variables(path))
    assert stored["train/step"] == np.int64 and stored["lr"] == np.float64  # as Orbax wrote them
    target = jax.eval_shape(lambda: {"train": make_train_state(), "lr": 0.1})
    with caplog.at_level(logging.INFO, logger="jstate"):
        restored = jstate.Saver().restore(path, target)
    assert int(restored["train"].step) == 5 and restored["train"].step.dtype == jnp.int32
    assert restored["lr"].dtype == jnp.float32 and float(restored["lr"]) == np.float32(0.1)
    for got, want in zip(jax.tree.leaves(restored["train"].params), jax.tree.leaves(tree["train"].params)):
        np.testing.assert_array_equal(got, want)
    narrowed = [r.getMessage() for r in caplog.records if "64 bits" in r.getMessage()]
    assert (
        len(narrowed) == 1 and "train/step (int64 -> int32)" in narrowed[0] and "lr (float64 -> float32)" in narrowed[0]
    )


def test_python_numbers_in_a_target_come_back_as_python_numbers_as_orbax_returns_them(flax_checkpoint):
    path, _ = flax_checkpoint
    target = {"train": make_train_state(), "lr": 0.5}
    restored = jstate.Saver().restore(path, target)
    by_orbax = ocp.StandardCheckpointer().restore(path, target)
    assert type(restored["train"].step) is type(by_orbax["train"].step) is int and restored["train"].step == 5
    # the float64 stored, not its float32 rounding (0.10000000149011612)
    assert type(restored["lr"]) is type(by_orbax["lr"]) is float and restored["lr"] == by_orbax["lr"] == 0.1


def test_tensorflow_int64_global_step_restores_into_an_int32_variable():
    def model(s):
        s.variable("global_step", jnp.array(0, jnp.int32), trainable=False)
        s.variable("layer1/weights", jstate.initializers.zeros, (4, 8))

    saver = jstate.Saver(["global_step", "layer1/weights"])
    plan = saver.plan(TF / "train", jstate.abstract(model))
    assert plan.problems == [] and plan.narrowed == {"global_step": "global_step"}
    assert "int64 -> int32" in str(
        plan
    ) and "Stored in 64 bits, read into 32 if every value fits: 'global_step'" in str(plan)
    restored = saver.restore(TF / "train", jstate.abstract(model))
    assert int(restored["global_step"]) == 20 and restored["global_step"].dtype == jnp.int32
    np.testing.assert_array_equal(
        restored["layer1/weights"], jstate.load_variable(TF / "train/model.ckpt-20", "layer1/weights")
    )


def test_a_64_bit_value_that_does_not_fit_names_the_variable_the_value_and_cast(tmp_path):
    path = orbax_save(tmp_path / "big", {"step": np.array([1, 2**40], np.int64), "scale": np.float64(0.1)})
    with pytest.raises(jstate.SpecMismatchError, match=r"'step' is int64, and its value 1099511627776 .*`cast=True`"):
        jstate.Saver(["step"]).restore(path, {"step": S((2,), jnp.int32)})
    assert int(jstate.Saver(["step"]).restore(path, {"step": S((2,), jnp.int32)}, cast=True)["step"][0]) == 1
    # a float64 whose float32 value is another number, into a float32 array: not exact either
    with pytest.raises(jstate.SpecMismatchError, match=r"'scale' is float64, and its value 0.1 does not fit float32"):
        jstate.Saver(["scale"]).restore(path, {"scale": S((), jnp.float32)})
    # into a Python float (or what jax.eval_shape makes of one), it is the value a Python float holds
    assert jstate.Saver(["scale"]).restore(path, {"scale": 1.0})["scale"] == 0.1
    assert float(jstate.Saver(["scale"]).restore(path, jax.eval_shape(lambda: {"scale": 1.0}))["scale"]) == np.float32(
        0.1
    )


def test_a_float64_that_overflows_float32_is_refused_even_into_a_python_float(tmp_path):
    path = orbax_save(tmp_path / "huge", {"x": np.float64(1e300), "y": np.array([0.5, 2.0, np.nan])})
    with pytest.raises(jstate.SpecMismatchError, match=r"'x' is float64, and its value 1e\+300 does not fit"):
        jstate.Saver(["x"]).restore(path, {"x": 1.0})
    restored = jstate.Saver(["y"]).restore(path, {"y": S((3,), jnp.float32)})  # exact, NaN included
    np.testing.assert_array_equal(restored["y"], np.array([0.5, 2.0, np.nan], np.float32))
