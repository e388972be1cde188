"""`jstate.initializers`: TensorFlow's arguments, `jax.nn.initializers`' values."""

import pydoc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.nn import initializers as jax_inits

import jstate
from jstate import initializers as inits
from jstate.model.programs import initializer_identity

KEY = jax.random.key(7)

# (jstate form as used in the tests, notebooks and README, the jax.nn.initializers it must equal)
EXISTING_FORMS = {
    "normal(0.35)": (inits.normal(0.35), jax_inits.normal(0.35)),
    "normal(stddev=0.35)": (inits.normal(stddev=0.35), jax_inits.normal(stddev=0.35)),
    "normal(0.02)": (inits.normal(0.02), jax_inits.normal(0.02)),
    "normal(0.35, float32)": (inits.normal(0.35, jnp.float32), jax_inits.normal(0.35, jnp.float32)),
    "uniform(0.3)": (inits.uniform(0.3), jax_inits.uniform(0.3)),
    "uniform(scale=0.3)": (inits.uniform(scale=0.3), jax_inits.uniform(scale=0.3)),
    "truncated_normal(0.02)": (inits.truncated_normal(0.02), jax_inits.truncated_normal(0.02)),
    "constant(0.5)": (inits.constant(0.5), jax_inits.constant(0.5)),
    "constant(-0.0)": (inits.constant(-0.0), jax_inits.constant(-0.0)),
    "zeros": (inits.zeros, jax_inits.zeros),
    "ones": (inits.ones, jax_inits.ones),
    "glorot_uniform()": (inits.glorot_uniform(), jax_inits.glorot_uniform()),
    "glorot_normal()": (inits.glorot_normal(), jax_inits.glorot_normal()),
    "xavier_uniform()": (inits.xavier_uniform(), jax_inits.xavier_uniform()),
    "he_normal()": (inits.he_normal(), jax_inits.he_normal()),
    "he_uniform()": (inits.he_uniform(), jax_inits.he_uniform()),
    "kaiming_normal()": (inits.kaiming_normal(), jax_inits.kaiming_normal()),
    "lecun_normal()": (inits.lecun_normal(), jax_inits.lecun_normal()),
    "lecun_uniform()": (inits.lecun_uniform(), jax_inits.lecun_uniform()),
    "variance_scaling(2.0, 'fan_in', 'normal')": (
        inits.variance_scaling(2.0, "fan_in", "normal"),
        jax_inits.variance_scaling(2.0, "fan_in", "normal"),
    ),
    "orthogonal()": (inits.orthogonal(), jax_inits.orthogonal()),
    "delta_orthogonal()": (inits.delta_orthogonal(), jax_inits.delta_orthogonal()),
}


def bits(x):
    return np.asarray(x).view(np.uint8)


@pytest.mark.parametrize("form", list(EXISTING_FORMS))
@pytest.mark.parametrize("jit", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "jit"])
def test_existing_argument_forms_give_bit_identical_values(form, jit):
    ours, theirs = EXISTING_FORMS[form]
    shape = (3, 4, 4) if "delta" in form else (4, 6)
    call = (lambda f: jax.jit(f, static_argnums=(1, 2))) if jit else (lambda f: f)
    np.testing.assert_array_equal(
        bits(call(ours)(KEY, shape, jnp.float32)), bits(call(theirs)(KEY, shape, jnp.float32))
    )


def test_readme_model_values_are_unchanged():
    """The README's model initialized with `jax.nn.initializers` directly gives the same State."""

    def with_jax(s):
        weights = s.variable("weights", jax_inits.normal(stddev=0.35), (784, 200))
        s.variable("biases", jax_inits.zeros, (200,))
        s.variable("w2", weights)
        s.scope("layer1").variable("kernel", jax_inits.glorot_uniform(), (200, 10))

    def with_jstate(s):
        weights = s.variable("weights", inits.normal(stddev=0.35), (784, 200))
        s.variable("biases", inits.zeros, (200,))
        s.variable("w2", weights)
        s.scope("layer1").variable("kernel", inits.glorot_uniform(), (200, 10))

    a, b = jstate.init(with_jax, KEY), jstate.init(with_jstate, KEY)
    for name in a:
        np.testing.assert_array_equal(bits(a[name]), bits(b[name]))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_normal_takes_a_mean_as_tf_does(jit):
    call = (lambda f: jax.jit(f, static_argnums=(1, 2))) if jit else (lambda f: f)
    shifted = call(inits.normal(0.35, mean=2.0))(KEY, (20_000,), jnp.float32)
    centered = call(inits.normal(0.35))(KEY, (20_000,), jnp.float32)
    np.testing.assert_allclose(shifted, centered + np.float32(2.0), rtol=1e-6)  # XLA may fuse an FMA
    assert abs(float(shifted.mean()) - 2.0) < 0.01 and abs(float(shifted.std()) - 0.35) < 0.01


@pytest.mark.slow  # seconds of compiles: in CI, not the fast loop
def test_defaults_are_tensorflows():
    np.testing.assert_array_equal(inits.normal()(KEY, (8,), jnp.float32), jax_inits.normal(1.0)(KEY, (8,), jnp.float32))
    np.testing.assert_array_equal(
        inits.truncated_normal()(KEY, (8,), jnp.float32), jax_inits.truncated_normal(1.0)(KEY, (8,), jnp.float32)
    )
    np.testing.assert_array_equal(
        inits.uniform()(KEY, (8,), jnp.float32), jax_inits.uniform(1.0)(KEY, (8,), jnp.float32)
    )
    np.testing.assert_array_equal(
        inits.variance_scaling()(KEY, (8, 4), jnp.float32),
        jax_inits.variance_scaling(1.0, "fan_in", "truncated_normal")(KEY, (8, 4), jnp.float32),
    )
    assert float(inits.constant()(KEY, (), jnp.float32)) == 0.0


def test_truncated_normal_stays_within_two_stddev_of_the_mean():
    x = np.asarray(inits.truncated_normal(0.5, mean=-3.0)(KEY, (50_000,), jnp.float32))
    assert x.min() >= -4.0 and x.max() <= -2.0
    assert x.min() < -3.9 and x.max() > -2.1  # truncated at 2 stddev, not rescaled further in


def test_uniform_takes_minval_and_maxval():
    x = np.asarray(inits.uniform(minval=-2.0, maxval=3.0)(KEY, (50_000,), jnp.float32))
    assert x.min() >= -2.0 and x.max() < 3.0 and x.min() < -1.99 and x.max() > 2.99
    np.testing.assert_array_equal(
        inits.uniform(maxval=0.3)(KEY, (8,), jnp.float32), inits.uniform(0.3)(KEY, (8,), jnp.float32)
    )
    with pytest.raises(ValueError, match="takes `scale` \\(0.3\\) or `maxval` \\(0.5\\), the same bound, not both"):
        inits.uniform(0.3, maxval=0.5)


def test_variance_scaling_accepts_tf_distribution_names():
    tf_name = inits.variance_scaling(2.0, "fan_avg", "untruncated_normal")(KEY, (8, 4), jnp.float32)
    jax_name = jax_inits.variance_scaling(2.0, "fan_avg", "normal")(KEY, (8, 4), jnp.float32)
    np.testing.assert_array_equal(tf_name, jax_name)


@pytest.mark.parametrize(
    "make",
    [
        lambda: inits.normal(0.35),
        lambda: inits.normal(0.35, mean=1.0),
        lambda: inits.truncated_normal(0.1, mean=-1.0),
        lambda: inits.uniform(minval=-1.0, maxval=2.0),
        lambda: inits.variance_scaling(2.0, "fan_out", "untruncated_normal"),
        lambda: inits.glorot_uniform(),
        lambda: inits.orthogonal(2.0),
        lambda: inits.constant(3.0),
    ],
)
def test_equal_arguments_give_equal_program_keys(make):
    assert initializer_identity(make()) == initializer_identity(make())
    hash(initializer_identity(make()))


def test_second_init_with_tf_arguments_compiles_nothing():
    def model(s):  # new closures on every trace
        s.variable("w", inits.normal(0.35, mean=1.0), (16, 16))
        s.variable("t", inits.truncated_normal(0.1, mean=-1.0), (16,))
        s.variable("u", inits.uniform(minval=-1.0, maxval=1.0), (16,))

    jstate.init(model, jax.random.key(1))
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *_, **__: compiles.append(event) if "backend_compile" in event else None
    )
    try:
        jstate.init(lambda s: model(s), jax.random.key(2))  # retraced: new closures, same programs
    finally:
        jax.monitoring.clear_event_listeners()
    assert compiles == []


def test_different_means_get_different_programs():
    a = jstate.init(lambda s: s.variable("w", inits.normal(0.1, mean=1.0), (4,)), KEY)
    b = jstate.init(lambda s: s.variable("w", inits.normal(0.1, mean=2.0), (4,)), KEY)
    np.testing.assert_allclose(np.asarray(b["w"]) - np.asarray(a["w"]), 1.0, rtol=1e-6)


def test_help_lists_every_initializer_with_a_one_line_doc():
    text = pydoc.render_doc(inits, renderer=pydoc.plaintext)
    for name in inits.__all__:
        fn = getattr(inits, name)
        assert fn.__module__ == "jstate.initializers", name
        summary = fn.__doc__.strip().splitlines()[0]
        assert name in text and summary in text, name
        assert ">>>" in fn.__doc__, f"{name} has no example"
    for tf_name in ("tf.random_normal_initializer", "tf.truncated_normal_initializer", "tf.glorot_uniform_initializer"):
        assert tf_name in inits.__doc__
