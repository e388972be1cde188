"""Variables with initializers are placeholders in the model's trace (`scope.declared_p`): values
computed from them, wherever the model declares them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jstate
from jstate import initializers as inits
from jstate.core.names import name_hash
from jstate.model import programs

KEY = jax.random.key(0)


@pytest.mark.parametrize("wrap", ["jit", "checkpoint", "compile_time_eval"])
def test_a_variable_declared_inside_a_transformed_helper_feeds_values_computed_from_it(wrap):
    # A placeholder bound inside `jax.jit` or `jax.checkpoint` is in their jaxpr, not the model's,
    # where `init` cannot replace it; under `ensure_compile_time_eval` it was evaluated at once.
    def declare(s):
        if wrap == "compile_time_eval":
            with jax.ensure_compile_time_eval():
                return s.variable("w", inits.normal(), (3,))
        transform = jax.jit if wrap == "jit" else jax.checkpoint
        return transform(lambda: s.variable("w", inits.normal(), (3,)))()

    def model(s):
        w = declare(s)
        s.variable("w2", w * 2)

    full = jstate.init(model, KEY)
    np.testing.assert_array_equal(full["w2"], full["w"] * 2)
    alone = jstate.init(model, KEY, only=["w2"])
    np.testing.assert_array_equal(alone["w2"], full["w2"])
    assert jstate.init(model, KEY, only=["w"])["w"].shape == (3,)


def test_python_control_flow_on_a_declared_value_says_it_depends_on_the_key():
    # The placeholder reads init's key, so JAX's error says where the traced value comes from.
    def model(s):
        w = s.variable("w", inits.normal(), (3,))
        if float(w.sum()) > 0:
            s.variable("w2", w * 2)

    with pytest.raises(
        jstate.ModelError, match=r"(?s)after declaring variable 'w'.*ConcretizationTypeError.*argument key"
    ):
        jstate.abstract(model)


@pytest.mark.parametrize("key", [jax.random.key(7), jax.random.PRNGKey(7)], ids=["typed", "legacy"])
def test_programs_made_under_one_threefry_setting_are_not_reused_under_the_other(key):
    # A cached program evaluates the initializer's jaxpr of the plan that made it; a jaxpr traced
    # under one setting of `jax_threefry_partitionable` draws that setting's bits wherever it is
    # evaluated (its nested `jax.jit`s are lowered as they were): reused after the setting
    # changed, the program gave the other setting's bits.
    def model(s):
        s.variable("w", inits.normal(), (5, 3))
        s.variable("big", inits.normal(), (600, 600))

    own = lambda name, shape: inits.normal()(programs.fold(key, name_hash(name)), shape, jnp.float32)  # noqa: E731
    before = jax.config.jax_threefry_partitionable
    try:
        for setting in (before, not before, before):
            jax.config.update("jax_threefry_partitionable", setting)
            state = jstate.init(model, key)
            for name, shape in [("w", (5, 3)), ("big", (600, 600))]:
                np.testing.assert_array_equal(state[name], own(name, shape), err_msg=f"{name} {setting}")
    finally:
        jax.config.update("jax_threefry_partitionable", before)


def test_an_ensembles_keys_replicated_over_a_mesh_of_explicit_axes():
    # `jax.make_mesh`'s axes are Explicit: keys put there replicated are typed by that mesh, the
    # programs' outputs by its Auto copy, and JAX compiled no program of both.
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)

    def model(s):
        w = s.variable("w", inits.normal(), (8, 4), sharding=jax.sharding.PartitionSpec("data"))
        s.variable("w2", w * 2)

    keys = jax.random.split(KEY, 2)
    placed = jax.device_put(keys, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    state = jstate.init(model, placed, mesh=mesh)
    for i in range(2):
        member = jstate.init(model, keys[i], mesh=mesh)
        for name in ("w", "w2"):
            np.testing.assert_array_equal(state[name][i], member[name])
