"""`State`: an immutable, checked mapping of name to array that is also a pytree."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jstate
from jstate import initializers as inits


def model(s):
    s.variable("weights", inits.normal(0.35), (784, 200))
    s.variable("biases", inits.zeros, (200,))
    s.variable("step", 0)
    s.scope("layer1").variable("kernel", inits.glorot_uniform(), (200, 10))


@pytest.fixture(scope="module")
def state():
    return jstate.init(model, jax.random.key(0))


def eager_and_jit(fn):
    """Run `fn(state)` eagerly and under jax.jit; both must agree."""
    return [fn, jax.jit(fn)]


def test_state_is_a_read_only_mapping_in_name_order(state):
    assert list(state) == ["biases", "layer1/kernel", "step", "weights"]
    assert len(state) == 4 and "weights" in state and "nope" not in state
    assert dict(state.items())["biases"] is state["biases"]
    with pytest.raises(TypeError):
        state["biases"] = jnp.ones(200)


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_assign_returns_a_new_state_and_leaves_the_old_unchanged(state, mode):
    def fn(s):
        s2 = s.assign("biases", jnp.ones(200))
        return s2, s2.assign_add("biases", 1.0).assign_sub("weights", s2["weights"])

    fn = jax.jit(fn) if mode == "jit" else fn
    s2, s3 = fn(state)
    assert not state["biases"].any()
    assert (s2["biases"] == 1).all() and (s3["biases"] == 2).all()
    assert not s3["weights"].any()


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_assign_dict_updates_several(state, mode):
    fn = lambda s: s.assign({"biases": jnp.full(200, 3.0), "step": jnp.int32(5)})  # noqa: E731
    out = (jax.jit(fn) if mode == "jit" else fn)(state)
    assert (out["biases"] == 3).all() and out["step"] == 5


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_assign_rejects_shape_change(state, mode):
    fn = lambda s: s.assign("biases", jnp.ones(100))  # noqa: E731
    with pytest.raises(
        jstate.SpecMismatchError,
        match=r"variable 'biases': declared shape \(200,\) and dtype float32, given shape \(100,\)",
    ):
        (jax.jit(fn) if mode == "jit" else fn)(state)


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_assign_rejects_dtype_change(state, mode):
    fn = lambda s: s.assign("biases", jnp.ones(200, jnp.int32))  # noqa: E731
    with pytest.raises(jstate.SpecMismatchError, match="declared shape .* dtype float32, given shape .* dtype int32"):
        (jax.jit(fn) if mode == "jit" else fn)(state)


def test_python_scalars_broadcast_only_when_dtype_is_kept(state):
    assert (state.assign("biases", 2)["biases"] == 2).all()
    assert state.assign_add("step", 1)["step"].dtype == jnp.int32
    with pytest.raises(jstate.SpecMismatchError, match="Python float 1.5 would change its dtype int32"):
        state.assign_add("step", 1.5)


def test_assign_to_undeclared_name_suggests_closest(state):
    with pytest.raises(jstate.UnknownVariableError, match="'bias' is not declared. Did you mean 'biases'"):
        state.assign("bias", jnp.ones(200))


def test_assign_to_uninitialized_variable_initializes_it():
    abstract = jstate.abstract(model)
    s = abstract.assign("biases", jnp.ones(200))
    assert s.is_initialized("biases") and s.uninitialized() == ["layer1/kernel", "step", "weights"]
    assert list(s) == ["biases"]


@pytest.mark.slow  # compiles jitted training steps for seconds
def test_state_goes_through_jit_with_donation_grad_tree_map_and_optax(state):
    step = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    copy = jax.tree.map(jnp.copy, state)
    out = step(copy)
    assert isinstance(out, jstate.State) and list(out) == list(state)
    assert out["step"] == 1

    def loss(s):
        return jnp.sum(s["weights"] ** 2) + jnp.sum(s["biases"])

    grads = jax.grad(loss)(state.subset(["weights", "biases"]))
    assert isinstance(grads, jstate.State)
    np.testing.assert_allclose(grads["weights"], 2 * state["weights"], rtol=1e-6)

    params = state.subset(["weights", "biases", "layer1/kernel"])
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)
    updates, opt_state = opt.update(jax.grad(loss)(params), opt_state, params)
    new = optax.apply_updates(params, updates)
    assert isinstance(new, jstate.State) and new.spec("weights") == params.spec("weights")
    assert not np.array_equal(new["weights"], params["weights"])


def test_uninitialized_variables_are_metadata_not_leaves():
    partial = jstate.init(model, jax.random.key(0), only=["biases"])
    leaves, treedef = jax.tree.flatten(partial)
    assert len(leaves) == 1
    back = jax.tree.unflatten(treedef, leaves)
    assert back.uninitialized() == partial.uninitialized()
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(partial)[0]]
    assert paths == ["['biases']"]


def test_tree_and_from_tree_round_trip(state):
    tree = state.tree()
    assert tree["layer1"]["kernel"] is state["layer1/kernel"]
    back = jstate.State.from_tree(tree)
    assert list(back) == list(state)
    abstract = jstate.State.from_tree({"a": {"b": jax.ShapeDtypeStruct((2,), jnp.float32)}})
    assert abstract.uninitialized() == ["a/b"]


def test_subset_merge_rename(state):
    sub = state.subset(["weights"])
    assert list(sub) == ["weights"]
    merged = sub.merge(state.subset(["biases"]).assign("biases", jnp.ones(200)))
    assert list(merged) == ["biases", "weights"] and (merged["biases"] == 1).all()
    renamed = state.rename({"weights": "params"})
    assert "params" in renamed and "weights" not in renamed
    assert renamed.rename({"params": "weights"}).spec("weights").shape == (784, 200)
    with pytest.raises(jstate.InvalidNameError, match="two variables would be named 'biases'"):
        state.rename({"weights": "biases"})
    with pytest.raises(jstate.SpecMismatchError, match="'biases' is declared with shape \\(200,\\)"):
        state.merge(jstate.State({"biases": jnp.ones(3)}))


def test_state_prints_as_a_table_and_renders_html():
    partial = jstate.init(model, jax.random.key(0), only=["biases"])
    text = repr(partial)
    assert "State: 4 variables, 1 initialized" in text
    assert "biases" in text and "(784, 200)" in text and "no" in text
    html = partial._repr_html_()
    assert html.startswith("<table>") and "layer1/kernel" in html
    # Never prints values.
    assert "0.0" not in text


def test_tree_like_rebuilds_any_pytree():
    opt = optax.adam(1e-3)
    params = jstate.State.from_tree({"w": jnp.ones(3), "b": jnp.zeros(2)})
    opt_state = opt.init(params)
    flat = jstate.State.from_tree({"opt": opt_state})
    back = flat.subset([n for n in flat.specs]).tree(like={"opt": opt_state})["opt"]
    assert jax.tree.structure(back) == jax.tree.structure(opt_state)
    np.testing.assert_array_equal(back[0].mu["w"], opt_state[0].mu["w"])
