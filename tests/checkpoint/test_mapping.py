"""Saver name mapping: pure functions over flat names, no Orbax."""

import jax.numpy as jnp
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jstate
from jstate.checkpoint.mapping import compile_var_list

NAMES = ["biases", "model/encoder/k", "model/encoder/b", "model/decoder/k", "v2", "weights"]


def resolve(var_list, names=NAMES):
    return compile_var_list(var_list).resolve(names)


def test_none_maps_every_name_to_itself():
    assert resolve(None) == {n: n for n in NAMES}


def test_list_selects_names_and_scopes():
    assert resolve(["weights", "biases"]) == {"weights": "weights", "biases": "biases"}
    assert resolve(["model/encoder/"]) == {"model/encoder/b": "model/encoder/b", "model/encoder/k": "model/encoder/k"}


def test_dict_maps_checkpoint_names_to_state_names():
    assert resolve({"my_v2": "v2"}) == {"v2": "my_v2"}
    assert resolve({"encoder/": "model/encoder/"}) == {"model/encoder/b": "encoder/b", "model/encoder/k": "encoder/k"}


def test_regex_rules_with_group_references_first_match_wins():
    rules = [(r"^model/decoder/", None), (r"^model/(\w+)/(\w)$", r"\1_\2"), (r"^w(.*)$", r"W\1")]
    assert resolve(rules) == {"model/encoder/b": "encoder_b", "model/encoder/k": "encoder_k", "weights": "Weights"}


def test_the_first_rule_that_matches_a_name_wins_whatever_its_kind():
    skip_decoder = (r"^model/decoder/", None)
    assert resolve([skip_decoder, "model/decoder/k", "weights"]) == {"weights": "weights"}
    assert resolve(["model/decoder/k", skip_decoder]) == {"model/decoder/k": "model/decoder/k"}
    assert resolve([(r"^(w)eights$", r"W"), "weights"]) == {"weights": "W"}
    assert resolve(["weights", (r"^(w)eights$", r"W")]) == {"weights": "weights"}


def test_a_thousand_names_resolve_against_a_thousand_variables():
    names = [f"layer{i}/w" for i in range(1000)]
    assert resolve(names[::-1], names) == {n: n for n in names}


def test_two_names_mapped_to_one_is_an_error():
    with pytest.raises(
        jstate.MappingError, match="maps both 'model/decoder/k' and 'model/encoder/k' to checkpoint name 'k'"
    ):
        resolve([(r"^model/\w+/(k)$", r"\1")])


def test_naming_an_undeclared_variable_is_an_error():
    with pytest.raises(
        jstate.UnknownVariableError, match="The Saver names variable 'weight' is not declared. Did you mean 'weights'"
    ):
        resolve(["weight"])
    with pytest.raises(jstate.MappingError, match="scope 'model/enc/' matches no variable"):
        resolve({"enc/": "model/enc/"})


@pytest.mark.parametrize(
    "var_list, message",
    [
        ("weights", "pass a list of names"),
        ({"a/": "b"}, "a scope \\(ending in '/'\\) must map to a scope"),
        ([3], "is not a name, a scope"),
        ([("([", "x")], "does not compile"),
    ],
)
def test_malformed_var_lists(var_list, message):
    with pytest.raises(jstate.MappingError, match=message):
        compile_var_list(var_list)


def test_checkpoint_names_of_other_writers_are_allowed_when_reading():
    tf2 = "model/layers/0/kernel/.ATTRIBUTES/VARIABLE_VALUE"
    assert resolve({tf2: "weights"}) == {"weights": tf2}
    assert resolve([(r"^(weights)$", r"x.\1")]) == {"weights": "x.weights"}


name = st.text(alphabet="abcxyz_0", min_size=1, max_size=4)


@given(st.lists(st.lists(name, min_size=1, max_size=3).map("/".join), min_size=1, max_size=8, unique=True))
def test_rename_then_inverse_rename_is_identity(names):
    forward = resolve([(r"^(.*)$", r"renamed/\1")], names)
    backward = resolve([(r"^renamed/(.*)$", r"\1")], list(forward.values()))
    assert {backward[forward[n]] for n in names} == set(names)


def test_one_variable_under_two_checkpoint_names_is_an_error():
    with pytest.raises(jstate.MappingError, match="maps State variable 'v2' to two checkpoint names"):
        compile_var_list({"a": "v2", "b": "v2"})


def test_a_regex_rule_that_matches_no_variable_is_an_error_not_an_empty_restore(tmp_path):
    """Written checkpoint-side first (as the dict form is), a rule matches nothing: the restore
    must say so instead of returning a State with nothing restored."""
    old = jstate.State({"encoder/w": jnp.ones(3)})
    path = jstate.Saver().save(old, tmp_path / "m")
    target = jstate.State({"model/w": jnp.zeros(3)})
    with pytest.raises(jstate.MappingError, match=r"rule r'\^encoder/\(\.\*\)\$' matches no variable.*State side"):
        jstate.Saver([(r"^encoder/(.*)$", r"model/\1")]).restore(path, target)
    restored = jstate.Saver([(r"^model/(.*)$", r"encoder/\1")]).restore(path, target)
    assert (restored["model/w"] == 1).all()


def test_a_var_list_that_is_not_a_collection_is_a_mapping_error():
    with pytest.raises(jstate.MappingError, match="`var_list` is 42; pass None, a list of names"):
        jstate.Saver(42)
