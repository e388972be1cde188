"""Corner cases with clear outcomes: nested trees of clashing names, ``s.placement(None)``,
regex flags in rules, derived variables across devices, clean model errors."""

import re

import jax
import jax.numpy as jnp
import pytest

import jstate
from jstate import initializers as inits


def test_tree_and_to_nnx_name_both_clashing_variables():
    state = jstate.State({"a": jnp.ones(2), "a/b": jnp.zeros(2), "c/d": jnp.ones(1)})
    message = r"Cannot nest the variables into a tree: 'a' holds a value and is also the scope of 'a/b'\. Rename one"
    with pytest.raises(jstate.InvalidNameError, match=message):
        state.tree()
    with pytest.raises(jstate.InvalidNameError, match=message):
        state.to_nnx()
    with pytest.raises(jstate.InvalidNameError, match=message):
        jstate.to_nnx(state)
    renamed = state.rename({"a": "a/value"}).tree()  # the fix the message suggests
    assert sorted(renamed["a"]) == ["b", "value"]
    assert state.tree(like={"a": 0, "a/b": 0})["a"].shape == (2,)  # a structure of one's own still works


def _in_blocks(s):
    with s.placement("cpu:1"):
        s.variable("pinned", inits.zeros, (2,))
        with s.placement(None):
            s.variable("free", inits.zeros, (2,))
            s.variable("own", inits.zeros, (2,), device="cpu:3")


def test_placement_none_clears_outer_blocks_and_rules_as_tf_device_none():
    state = jstate.init(_in_blocks, jax.random.key(0), rules=[("free|pinned", "cpu:2")])
    assert str(state.placement("free")) == "default (from placement block)"
    assert state["free"].devices() == {jax.devices()[0]} and not state["free"].committed
    assert str(state.placement("pinned")) == "cpu:1 (from placement block)"
    assert str(state.placement("own")) == "cpu:3 (from device=)"
    placed = state.replace_placement(rules=[(".*", "cpu:4")])
    assert placed.placement("free").sharding is None  # declared by the model: kept


def _w_and_W(s):
    s.variable("w", inits.zeros, (2,))
    s.variable("W", inits.zeros, (2,))


def test_rules_differing_only_in_regex_flags_are_traced_apart():
    plain = jstate.abstract(_w_and_W, rules=[("^w$", "cpu:1")])
    ignoring_case = jstate.abstract(_w_and_W, rules=[(re.compile("^w$", re.IGNORECASE), "cpu:1")])
    assert plain.placement("W").sharding is None
    assert str(ignoring_case.placement("W")) == "cpu:1 (from rule 0 ('^w$'))"
    assert jstate.abstract(_w_and_W, rules=[("^w$", "cpu:1")]).placement("W").sharding is None


def _across_devices(s):
    a = s.variable("a", inits.ones, (3,), device="cpu:0")
    b = s.variable("b", inits.ones, (3,), device="cpu:1")
    s.variable("a2", a * 2)  # one device: fine
    s.variable("c", jnp.tanh(a) + b)


def test_a_derived_variable_from_two_devices_is_a_placement_error_naming_it():
    with pytest.raises(
        jstate.PlacementError,
        match=r"initial value of variable 'c': it is computed from variables on different devices "
        r"\('a' on cpu:0, 'b' on cpu:1\).*Place those variables on one device",
    ):
        jstate.init(_across_devices, jax.random.key(0))
    state = jstate.init(_across_devices, jax.random.key(0), only=["a2"])
    assert (state["a2"] == 2).all()


def test_a_model_error_on_a_cache_miss_is_not_chained_to_a_key_error():
    def broken(s):
        s.variable("w", inits.zeros, (2,))
        raise RuntimeError("boom")

    with pytest.raises(jstate.ModelError, match="after declaring variable 'w'.*RuntimeError: boom") as info:
        jstate.init(broken, jax.random.key(0))
    chain, error = [], info.value
    while error is not None:
        chain.append(type(error))
        error = error.__context__
    assert KeyError not in chain and chain[:2] == [jstate.ModelError, RuntimeError]
