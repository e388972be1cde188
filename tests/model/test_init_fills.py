"""Constant variables made on the host (`programs.fills`): what a hostile model can throw at them."""

from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import jstate
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
