"""Corner cases of a Flax model's keys and draws found by trying them as a user would."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import jstate
from jstate.core.names import name_hash
from jstate.model import programs


def test_a_model_initialized_again_after_jax_threefry_partitionable_changes_draws_the_new_bits():
    # (a derived program made under one setting pools its draws as partitionable threefry does)
    module, x = nn.Dense(3), jnp.ones((1, 4))
    model = jstate.flax_model(module, x)
    key = jax.random.key(0)
    jstate.init(model, key)
    with jax.threefry_partitionable(False):
        state = jstate.init(model, key)
        root = jax.random.fold_in(programs.fold(key, name_hash("flax")), 0x726E67)
        expected = jax.jit(module.init)(root, x)["params"]["kernel"]
    np.testing.assert_allclose(state["params/kernel"], expected, rtol=1e-6, atol=1e-7)
