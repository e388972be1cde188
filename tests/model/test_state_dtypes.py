"""Dtypes: Python numbers that do not fit a variable's dtype are refused, and a State's specs
follow its values' dtypes after `jax.tree.map` (a cast to bfloat16, say)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jstate


def counters(s):
    s.variable("count", jstate.initializers.zeros, (), jnp.uint8)
    s.variable("steps", jstate.initializers.zeros, (2,), jnp.int32)
    s.variable("small", jstate.initializers.zeros, (2,), jnp.float16)


@pytest.fixture
def state():
    return jstate.init(counters, jax.random.key(0))


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("count", 300, r"variable 'count': the Python int 300 does not fit its dtype uint8 \(0 to 255\)"),
        ("count", -1, r"variable 'count': the Python int -1 does not fit its dtype uint8 \(0 to 255\)"),
        (
            "steps",
            2**40,
            r"variable 'steps': the Python int 1099511627776 does not fit its dtype int32 \(-2147483648 to 2147483647\)",
        ),
        (
            "small",
            1e6,
            r"variable 'small': the Python float 1000000.0 does not fit its dtype float16 \(largest 65504\)",
        ),
    ],
)
@pytest.mark.parametrize("verb", ["assign", "assign_add"])
def test_a_python_number_that_does_not_fit_the_dtype_is_refused(state, name, value, message, verb):
    with pytest.raises(jstate.SpecMismatchError, match=f"Cannot {verb} {message}"):
        getattr(state, verb)(name, value)


def test_python_numbers_that_fit_are_assigned_eagerly_and_under_jit(state):
    assigned = state.assign({"count": 255, "steps": -(2**31), "small": 65504.0})
    assert int(assigned["count"]) == 255 and assigned["count"].dtype == jnp.uint8
    assert int(assigned["steps"][0]) == -(2**31)
    jitted = jax.jit(lambda st: st.assign("count", 200).assign_add("steps", 7))(state)
    assert int(jitted["count"]) == 200 and (jitted["steps"] == 7).all()
    with pytest.raises(jstate.SpecMismatchError, match="300 does not fit its dtype uint8"):
        jax.jit(lambda st: st.assign("count", 300))(state)


def test_a_state_cast_with_tree_map_declares_the_new_dtype(readme_state):
    cast = jax.tree.map(lambda x: x.astype(jnp.bfloat16), readme_state)
    assert cast.spec("weights").dtype == jnp.bfloat16 and cast.specs["biases"].dtype == jnp.bfloat16
    assert cast.structs()["weights"].dtype == jnp.bfloat16
    assert "bfloat16" in str(cast.table())
    assert readme_state.spec("weights").dtype == jnp.float32  # the original is unchanged
    # Its own values assign back, eagerly and under jit, and keep the placement.
    again = cast.assign(dict(cast))
    np.testing.assert_array_equal(again["weights"], cast["weights"])
    again = jax.jit(lambda st: st.assign("biases", st["biases"] + 1))(cast)
    assert again["biases"].dtype == jnp.bfloat16 and again.spec("biases").dtype == jnp.bfloat16
    with pytest.raises(
        jstate.SpecMismatchError,
        match=r"'biases': declared shape \(200,\) and dtype bfloat16, given shape \(200,\) and dtype float32",
    ):
        cast.assign("biases", jnp.zeros(200, jnp.float32))


def test_a_cast_state_saves_and_restores_as_bfloat16(readme_state, tmp_path):
    cast = jax.tree.map(lambda x: x.astype(jnp.bfloat16), readme_state)
    path = jstate.Saver().save(cast, tmp_path / "ckpt")
    assert dict((n, d) for n, _, d in jstate.list_variables(path))["weights"] == jnp.bfloat16
    restored = jstate.Saver().restore(path, cast)
    assert restored.spec("weights").dtype == jnp.bfloat16
    np.testing.assert_array_equal(restored["weights"], cast["weights"])
    with pytest.raises(jstate.SpecMismatchError, match="cast=True"):
        jstate.Saver().restore(path, readme_state)  # float32 declared, bfloat16 stored


def test_merge_compares_the_dtypes_the_values_have(readme_state):
    cast = jax.tree.map(lambda x: x.astype(jnp.bfloat16), readme_state.subset(["biases"]))
    with pytest.raises(
        jstate.SpecMismatchError,
        match="'biases' is declared with shape \\(200,\\) and dtype float32 here but shape \\(200,\\) and dtype bfloat16",
    ):
        readme_state.merge(cast)
    merged = jax.tree.map(lambda x: x.astype(jnp.bfloat16), readme_state).merge(cast)
    assert merged.spec("biases").dtype == jnp.bfloat16


def test_the_layout_stays_cheap_to_compare_after_a_cast(readme_state):
    """Unflattening reuses the layout object (the jit dispatch path stays a hash and an `is`)."""
    cast = jax.tree.map(lambda x: x.astype(jnp.bfloat16), readme_state)
    assert cast._layout is readme_state._layout
    assert jax.tree.structure(cast) == jax.tree.structure(readme_state)


def readme_model(s):
    weights = s.variable("weights", jstate.initializers.normal(stddev=0.35), (784, 200))
    s.variable("biases", jstate.initializers.zeros, (200,))
    s.variable("w2", weights)
    s.scope("layer1").variable("kernel", jstate.initializers.glorot_uniform(), (200, 10))


@pytest.fixture
def readme_state():
    return jstate.init(readme_model, jax.random.key(0))
