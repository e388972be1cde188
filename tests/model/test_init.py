"""Declaring variables and initializing them: `Scope`, `jstate.init`, `jstate.abstract`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jstate
from jstate import initializers as inits


def guide_model(s: jstate.Scope):
    weights = s.variable("weights", inits.normal(stddev=0.35), (784, 200))
    s.variable("biases", inits.zeros, (200,))
    s.variable("w2", weights)
    s.variable("w_twice", weights * 2.0)
    s.scope("layer1").variable("kernel", inits.glorot_uniform(), (200, 10))


KEY = jax.random.key(0)


def test_init_creates_every_declared_variable():
    state = jstate.init(guide_model, KEY)
    assert list(state) == ["biases", "layer1/kernel", "w2", "w_twice", "weights"]
    assert state["weights"].shape == (784, 200)
    assert state["weights"].dtype == jnp.float32
    assert float(jnp.std(state["weights"])) == pytest.approx(0.35, rel=0.05)
    assert not state["biases"].any()


def test_variable_initialized_from_another_variables_initial_value():
    state = jstate.init(guide_model, KEY)
    np.testing.assert_array_equal(state["w2"], state["weights"])
    np.testing.assert_array_equal(state["w_twice"], state["weights"] * 2.0)
    # w2 is a leaf of its own, not an alias of weights' buffer.
    assert state["w2"] is not state["weights"]


def test_initializers_accept_jax_and_custom_callables():
    def model(s):
        s.variable("a", jax.nn.initializers.he_normal(), (8, 4))
        s.variable("b", lambda key, shape, dtype: jnp.full(shape, 3, dtype), (2,), jnp.int32)
        s.variable("c", inits.constant(0.5), (3,), jnp.bfloat16)
        s.variable("d", 7)
        s.variable("e", np.arange(3.0), dtype=jnp.float16)

    state = jstate.init(model, KEY)
    assert all(isinstance(v, jax.Array) for v in state.values())
    assert state["b"].dtype == jnp.int32 and state["b"].tolist() == [3, 3]
    assert state["c"].dtype == jnp.bfloat16
    assert state["d"].dtype == jnp.int32 and state.spec("d").shape == ()
    assert state["e"].dtype == jnp.float16 and state["e"].tolist() == [0.0, 1.0, 2.0]


def test_nested_scopes_join_names_with_slashes():
    def model(s):
        s.scope("a").scope("b").variable("c", inits.zeros, (1,))
        assert s.scope("a").name == "a"

    assert list(jstate.init(model, KEY)) == ["a/b/c"]


@pytest.mark.parametrize(
    "name, why",
    [
        ("", "empty"),
        ("a//b", "empty part"),
        ("/a", "starts or ends"),
        ("a/", "starts or ends"),
        ("a.b", r"'\.' is not allowed"),
        ("a/../b", r"'\.\.' is not allowed"),
    ],
)
def test_invalid_names_are_rejected_at_declaration(name, why):
    def model(s):
        s.variable(name, inits.zeros, (1,))

    with pytest.raises(jstate.InvalidNameError, match=why):
        jstate.init(model, KEY)


def test_duplicate_name_is_an_error_naming_it():
    def model(s):
        s.scope("a").variable("x", inits.zeros, (1,))
        s.variable("a/x", inits.ones, (1,))

    with pytest.raises(jstate.InvalidNameError, match="'a/x' is declared twice"):
        jstate.abstract(model)


def test_only_initializes_just_those_and_matches_full_init_bit_for_bit():
    full = jstate.init(guide_model, KEY)
    partial = jstate.init(guide_model, KEY, only=["w2"])
    assert partial.uninitialized() == ["biases", "layer1/kernel", "w_twice", "weights"]
    assert partial.is_initialized("w2") and not partial.is_initialized("weights")
    np.testing.assert_array_equal(partial["w2"], full["w2"])
    with pytest.raises(jstate.UninitializedError, match="'weights' is declared but not initialized"):
        partial["weights"]
    with pytest.raises(KeyError):  # a KeyError subclass, for ordinary `except KeyError`
        partial["weights"]


def test_init_with_state_fills_only_what_is_missing():
    partial = jstate.init(guide_model, KEY, only=["w2"])
    partial = partial.assign("w2", jnp.zeros((784, 200)))
    full = jstate.init(guide_model, KEY, state=partial)
    assert jstate.report_uninitialized(full) == []
    assert full["w2"] is partial["w2"]  # kept as it was
    np.testing.assert_array_equal(full["weights"], jstate.init(guide_model, KEY)["weights"])


def test_only_with_unknown_name_is_an_error_with_suggestion():
    with pytest.raises(jstate.UnknownVariableError, match="'weight' is not declared. Did you mean 'weights'"):
        jstate.init(guide_model, KEY, only=["weight"])


def test_only_takes_a_scope_as_tf_users_write_it():
    def model(s):
        s.scope("layer1").variable("kernel", inits.ones, (2, 3))
        s.scope("layer1").scope("inner").variable("bias", inits.ones, (3,))
        s.scope("layer10").variable("kernel", inits.ones, (2,))
        s.variable("w", inits.ones, (2,))

    for scope in ("layer1", "layer1/"):
        partial = jstate.init(model, KEY, only=[scope])
        assert sorted(partial) == ["layer1/inner/bias", "layer1/kernel"]  # not layer10
    assert sorted(jstate.init(model, KEY, only=["layer1/inner", "w"])) == ["layer1/inner/bias", "w"]
    with pytest.raises(jstate.UnknownVariableError, match="'layr1' is not declared. Did you mean 'layer1/'.*scopes"):
        jstate.init(model, KEY, only=["layr1"])


def test_a_64_bit_declaration_with_64_bit_types_off_says_how_to_turn_them_on():
    assert not jax.config.jax_enable_x64
    fix = r'jax\.config\.update\("jax_enable_x64", True\)'

    def drawn(s):
        s.variable("w", inits.normal(), (2,), jnp.float64)

    with pytest.raises(jstate.InitializerError, match=f"'w' is declared float64.*makes it float32.*{fix}"):
        jstate.init(drawn, KEY)

    def counter(s):
        s.variable("step", 0, (), "int64", trainable=False)

    with pytest.warns(UserWarning, match=f"'step' is declared int64.*{fix}.*declared int32 now"):
        state = jstate.init(counter, KEY)
    assert state.spec("step").dtype == np.int32


def test_abstract_declares_everything_and_computes_nothing():
    calls = []

    def counting(key, shape, dtype):
        calls.append(1)
        return jnp.zeros(shape, dtype)

    def model(s):
        s.variable("a", counting, (4, 4))

    abstract = jstate.abstract(model)
    assert abstract.spec("a").shape == (4, 4) and abstract.spec("a").dtype == np.float32
    assert abstract.uninitialized() == ["a"] and len(abstract) == 0


def test_second_init_with_new_key_compiles_nothing(monkeypatch):
    def model(s):
        for i in range(5):
            s.variable(f"v{i}", inits.normal(0.1), (16, 16))  # a new closure on every trace

    jstate.init(model, jax.random.key(1))
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *_, **__: compiles.append(event) if "backend_compile" in event else None
    )
    try:
        a = jstate.init(model, jax.random.key(2))
        b = jstate.init(lambda s: model(s), jax.random.key(3))  # retraced, still no compile
    finally:
        jax.monitoring.clear_event_listeners()
    assert compiles == []
    assert not np.array_equal(a["v0"], b["v0"])


def test_variables_share_programs_by_signature():
    from jstate.model.programs import _programs

    def model(s):
        for i in range(50):
            s.variable(f"v{i}", inits.uniform(0.3), (3, 5))

    before = len(_programs)
    state = jstate.init(model, KEY)
    assert len(_programs) - before <= 1
    assert len({np.asarray(state[f"v{i}"]).tobytes() for i in range(50)}) == 50  # distinct keys


@settings(max_examples=25, deadline=None)
@given(
    names=st.lists(st.sampled_from(["a", "b", "c/d", "c/e", "f/g/h", "x"]), min_size=1, unique=True),
    extra=st.lists(st.sampled_from(["p", "q/r", "s"]), unique=True),
    seed=st.integers(0, 2**31 - 1),
)
@pytest.mark.slow  # seconds of compiles: in CI, not the fast loop
def test_initial_values_do_not_depend_on_other_variables_or_order(names, extra, seed):
    def make(order):
        def model(s):
            for n in order:
                s.variable(n, inits.normal(1.0), (3,))

        return model

    key = jax.random.key(seed)
    alone = jstate.init(make(names), key)
    crowded = jstate.init(make(list(reversed(extra + names))), key)
    only = jstate.init(make(extra + names), key, only=names[:1])
    for n in names:
        np.testing.assert_array_equal(alone[n], crowded[n])
    np.testing.assert_array_equal(only[names[0]], alone[names[0]])


@pytest.mark.slow  # compiles jitted training steps for seconds
def test_legacy_uint32_keys_work():
    state = jstate.init(guide_model, jax.random.PRNGKey(0))
    assert state["weights"].shape == (784, 200)


# -- errors --------------------------------------------------------------------------------


def test_initializer_with_wrong_signature_names_the_variable():
    def model(s):
        s.variable("w", lambda key, shape: jnp.zeros(shape), (2,))

    with pytest.raises(
        jstate.InitializerError,
        match=r"Variable 'w': initializer .* failed when called as `init\(key, shape=\(2,\), dtype=float32\)`",
    ):
        jstate.init(model, KEY)


def test_initializer_returning_wrong_shape_names_the_variable():
    def model(s):
        s.variable("w", lambda key, shape, dtype: jnp.zeros((3,), dtype), (2,))

    with pytest.raises(
        jstate.InitializerError, match=r"Variable 'w': the initializer returned shape \(3,\).*shape \(2,\)"
    ):
        jstate.init(model, KEY)


def test_initializer_without_shape_is_an_error():
    def model(s):
        s.variable("w", inits.zeros)

    with pytest.raises(jstate.InitializerError, match="'w': a shape is required"):
        jstate.abstract(model)


def test_value_with_mismatched_declared_shape_is_an_error():
    def model(s):
        s.variable("w", jnp.zeros(3), (4,))

    with pytest.raises(
        jstate.InitializerError, match=r"'w': declared shape \(4,\) but its initial value has shape \(3,\)"
    ):
        jstate.abstract(model)


def test_model_failing_while_traced_names_the_variable_being_declared():
    def model(s):
        w = s.variable("w", inits.zeros, (2, 3))
        s.variable("v", w @ w)  # shapes do not match

    with pytest.raises(
        jstate.ModelError, match="failed after declaring variable 'w' \\(the last one declared\\): TypeError"
    ):
        jstate.init(model, KEY)


def test_model_failing_inside_a_declaration_names_that_variable():
    def model(s):
        s.variable("w", inits.zeros, (2,))
        s.variable("v", object())

    with pytest.raises(jstate.InitializerError, match="Variable 'v': `init` must be an initializer"):
        jstate.init(model, KEY)


def test_initializers_that_compare_equal_but_differ_get_their_own_programs():
    class Const:
        def __init__(self, value):
            self.value = value

        def init(self, key, shape, dtype):
            return jnp.full(shape, self.value, dtype)

    def model(s):
        s.variable("one", Const(1.0).init, (2,))
        s.variable("five", Const(5.0).init, (2,))
        s.variable("neg_zero", inits.constant(-0.0), (1,))
        s.variable("zero", inits.constant(0.0), (1,))

    state = jstate.init(model, KEY)
    assert state["one"].tolist() == [1, 1] and state["five"].tolist() == [5, 5]
    assert np.signbit(state["neg_zero"][0]) and not np.signbit(state["zero"][0])


def test_only_given_a_string_is_a_clear_error():
    with pytest.raises(TypeError, match="Write `only=\\['w2'\\]`"):
        jstate.init(guide_model, KEY, only="w2")
