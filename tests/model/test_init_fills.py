"""Constant variables made on the host (`programs.fills`): what a hostile model can throw at them."""

from __future__ import annotations

import math
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jstate
from jstate import initializers as inits
from jstate.core.names import name_hash
from jstate.model import programs

KEY = jax.random.key(0)


def own_value(name, init, shape, dtype, key=KEY):
    """What the initializer gives the variable's own key, called directly."""
    return init(programs.fold(key, name_hash(name)), shape, dtype)


def test_casts_that_are_not_exact_are_computed_by_xla_without_a_warning_from_jstate():
    # numpy warns on these casts (overflow, NaN or inf to int, negative to unsigned) where XLA does not: init
    # must not (under `-W error`, it would fail), and must give XLA's values.
    casts = {
        "overflow": (lambda k, s, d: jnp.full(s, 1e30).astype(d), jnp.float16),
        "nan_to_int": (lambda k, s, d: jnp.full(s, jnp.nan).astype(d), jnp.int32),
        "inf_to_int": (lambda k, s, d: jnp.full(s, -jnp.inf).astype(d), jnp.int8),
        "negative_to_unsigned": (lambda k, s, d: jnp.full(s, -1.0).astype(d), jnp.uint8),
    }

    def model(s):
        for name, (init, dtype) in casts.items():
            s.variable(name, init, (3,), dtype)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = jstate.init(model, KEY)
    for name, (init, dtype) in casts.items():
        expected = np.asarray(own_value(name, init, (3,), dtype))
        assert state[name].dtype == expected.dtype, name
        assert np.asarray(state[name]).tobytes() == expected.tobytes(), name


def test_a_complex_constant_cast_to_real_is_its_real_part_without_a_warning_from_jstate():
    def model(s):
        s.variable("x", lambda k, s, d: jax.lax.convert_element_type(jnp.full(s, 2 + 0j, jnp.complex64), d), (3,))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = jstate.init(model, KEY)
    library = os.path.dirname(jstate.__file__)
    assert [str(w.message) for w in caught if w.filename.startswith(library)] == []  # (JAX warns: the model's own)
    np.testing.assert_array_equal(state["x"], np.full((3,), 2.0, np.float32))


@pytest.mark.parametrize("axes", [AxisType.Auto, AxisType.Explicit])
def test_init_inside_jit_with_a_constant_key_keeps_each_fills_sharding(axes):
    # init traced with a key it closes over (not a tracer): a constant's `jax.device_put` there
    # keeps no sharding, so a fill must be made on its own, as a drawn value is
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axes,) * 2)
    spread = P("data", "model")

    def model(s):
        s.variable("b", inits.constant(3.0), (8, 4), sharding=spread)
        s.variable("w", inits.normal(), (8, 4), sharding=spread)
        s.variable("r", inits.ones, (5,), jnp.int8, sharding=P())

    state = jax.jit(lambda: jstate.init(model, KEY, mesh=mesh))()
    for name in ("b", "w"):
        assert state[name].sharding.is_equivalent_to(NamedSharding(mesh, spread), 2), name
    assert state["r"].sharding.is_equivalent_to(NamedSharding(mesh, P()), 1)
    np.testing.assert_array_equal(state["b"], np.full((8, 4), 3.0, np.float32))
    np.testing.assert_array_equal(state["r"], np.ones((5,), np.int8))
    np.testing.assert_array_equal(state["w"], own_value("w", inits.normal(), (8, 4), jnp.float32))


def test_an_ensembles_fills_hold_at_most_fill_max_bytes_on_the_host(monkeypatch):
    # a fill of n members is n times its variable's bytes: past `FILL_MAX`, computed in place
    monkeypatch.setattr(programs, "FILL_MAX", 64)  # bytes
    made = []
    filled = programs.filled

    def spy(value, shape, sharding, ensemble=0):
        made.append(math.prod(shape) * value.dtype.itemsize * (ensemble or 1))
        return filled(value, shape, sharding, ensemble)

    monkeypatch.setattr(programs, "filled", spy)

    def model(s):
        s.variable("b", inits.constant(-1.0), (8,))  # 32 bytes, 128 for 4 members

    keys = jax.random.split(KEY, 4)
    one = jstate.init(model, KEY)
    assert made == [32]
    ensemble = jstate.init(model, keys)
    assert made == [32]  # (the ensemble's: computed by a program)
    np.testing.assert_array_equal(ensemble["b"], np.full((4, 8), -1.0, np.float32))
    np.testing.assert_array_equal(ensemble.member(3)["b"], one["b"])


@pytest.mark.parametrize("fill_max", [programs.FILL_MAX, 16])
def test_a_fill_without_a_placement_lives_where_a_committed_key_puts_the_others(mesh, monkeypatch, fill_max):
    # init's programs compute unplaced variables where a committed key is, those that do not
    # read it too (a pool of zeros larger than `FILL_MAX`): its fills go there as well
    monkeypatch.setattr(programs, "FILL_MAX", fill_max)  # bytes

    def model(s):
        s.variable("b", inits.zeros, (8,))
        s.variable("w", inits.normal(), (8,))
        s.variable("pinned", inits.ones, (8,), device="cpu:5")  # (placed: not where the key is)

    for key in (jax.device_put(KEY, jax.devices()[2]), jax.device_put(KEY, NamedSharding(mesh, P()))):
        state = jstate.init(model, key)
        assert state["b"].committed and state["b"].sharding.is_equivalent_to(state["w"].sharding, 1)
        assert state["b"].sharding.is_equivalent_to(key.sharding, 0)
        assert state["pinned"].devices() == {jax.devices()[5]}
        np.testing.assert_array_equal(state["b"], np.zeros((8,), np.float32))
        np.testing.assert_array_equal(state["pinned"], np.ones((8,), np.float32))
    keys = jax.device_put(jax.random.split(KEY, 3), jax.devices()[2])
    ensemble = jstate.init(model, keys)
    assert ensemble["b"].committed and ensemble["b"].devices() == {jax.devices()[2]}
    np.testing.assert_array_equal(ensemble["b"], np.zeros((3, 8), np.float32))


def test_an_initializer_with_effects_is_run_not_filled():
    # `jax.debug.callback` (or `jax.debug.print`) in an initializer that returns zeros runs at
    # every init, as it does in a program: a host fill would skip it
    calls = []

    def logged_zeros(key, shape, dtype):
        jax.debug.callback(lambda: calls.append(1))
        return jnp.zeros(shape, dtype)

    def model(s):
        s.variable("b", logged_zeros, (3,))

    for seed in range(2):
        state = jstate.init(model, jax.random.key(seed))
    jax.effects_barrier()
    assert len(calls) == 2
    np.testing.assert_array_equal(state["b"], np.zeros((3,), np.float32))
