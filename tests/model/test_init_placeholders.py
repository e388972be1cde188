"""Variables with initializers are placeholders in the model's trace (`scope.declared_p`): values
computed from them, wherever the model declares them."""

import jax
import numpy as np
import pytest

import jstate
from jstate import initializers as inits

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
