"""Ensembles: `jstate.init(model, keys)` and ``jax.vmap`` of `jstate.init` give a State whose
declarations carry the ensemble axis; `spec`, `table`, `assign`, save and restore into itself
work, and `State.member` takes one model out, the one its own key gives."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jstate
from jstate.core.errors import SpecMismatchError

N = 3
RULES = [("kernel", P(None, "model")), (".*", P())]


def model(s):
    w = s.variable("dense/kernel", jstate.initializers.glorot_uniform(), (16, 8))
    s.variable("dense/bias", jstate.initializers.zeros, (8,))
    s.variable("tied", w.T)  # computed from another variable
    s.variable("big", jstate.initializers.normal(0.02), (1100, 1000))  # too large for a pool
    s.variable("step", jnp.zeros((), jnp.int32), trainable=False)


def keys():
    return jax.random.split(jax.random.key(0), N)


@pytest.mark.slow
@pytest.mark.parametrize("placed", [False, True], ids=["default", "mesh"])
def test_init_with_keys_holds_each_members_own_values(placed, mesh):
    kw = dict(mesh=mesh, rules=RULES) if placed else {}
    ensemble = jstate.init(model, keys(), **kw)
    assert ensemble.spec("dense/kernel").shape == (N, 16, 8)
    assert ensemble.spec("step").shape == (N,)
    for i in range(N):
        alone = jstate.init(model, keys()[i], **kw)
        one = ensemble.member(i)
        assert one.specs == alone.specs
        for name in alone:
            np.testing.assert_array_equal(one[name], alone[name], err_msg=name)
            assert one[name].sharding == alone[name].sharding, name
    if placed:
        sharding = ensemble.spec("dense/kernel").sharding
        assert sharding.spec == P(None, None, "model")
        assert ensemble["dense/kernel"].sharding.is_equivalent_to(sharding, 3)


@pytest.mark.slow
def test_vmap_of_init_gives_the_same_state_as_init_with_keys(mesh):
    ensemble = jstate.init(model, keys(), mesh=mesh, rules=RULES)
    vmapped = jax.vmap(lambda k: jstate.init(model, k, mesh=mesh, rules=RULES))(keys())
    assert vmapped.specs == ensemble.specs
    assert vmapped.spec("tied").shape == (N, 8, 16)
    for name in ensemble:
        np.testing.assert_array_equal(vmapped[name], ensemble[name], err_msg=name)
    # A jitted vmap too: the declarations follow the values out of both.
    jitted = jax.jit(jax.vmap(lambda k: jstate.init(model, k)))(keys())
    assert jitted.spec("big").shape == (N, 1100, 1000)


def test_table_and_assign_use_the_ensemble_shape():
    ensemble = jax.vmap(lambda k: jstate.init(model, k))(keys())
    table = str(ensemble.subset(["dense/bias"]).table())
    assert "(3, 8)" in table and "96 B" in table
    new = ensemble.assign("dense/bias", jnp.ones((N, 8)))
    np.testing.assert_array_equal(new["dense/bias"], np.ones((N, 8)))
    assert ensemble.assign("step", 7)["step"].tolist() == [7] * N  # a scalar fills every member
    with pytest.raises(SpecMismatchError, match=r"dense/bias.*\(3, 8\).*given shape \(8,\)"):
        ensemble.assign("dense/bias", jnp.ones(8))


def test_vmap_over_an_ensemble_sees_one_member():
    ensemble = jstate.init(model, keys())

    def step(member):
        assert member.spec("dense/bias").shape == (8,)  # inside: one member's declarations
        return member.assign_add("dense/bias", 1.0).assign_add("step", 1)

    stepped = jax.jit(jax.vmap(step))(ensemble)
    assert stepped.spec("dense/bias").shape == (N, 8)
    np.testing.assert_array_equal(stepped["dense/bias"], np.ones((N, 8)))
    assert stepped["step"].tolist() == [1] * N


@pytest.mark.slow  # seconds of compiles on a mesh; test_restore_a_vmapped_ensemble_into_itself is the fast loop's
@pytest.mark.parametrize("target", ["itself", "abstract"])
def test_save_and_restore_an_ensemble(tmp_path, mesh, target):
    ensemble = jstate.init(model, keys(), mesh=mesh, rules=RULES)
    saver = jstate.Saver()
    path = saver.save(ensemble, tmp_path / "ckpt")
    if target == "itself":
        into = jstate.init(model, jax.random.split(jax.random.key(1), N), mesh=mesh, rules=RULES)
    else:
        into = jstate.abstract(model, mesh=mesh, rules=RULES, ensemble=N)
    restored = saver.restore(path, into)
    assert restored.specs == ensemble.specs
    for name in ensemble:
        np.testing.assert_array_equal(restored[name], ensemble[name], err_msg=name)
        assert restored[name].sharding == ensemble.spec(name).sharding, name


def test_restore_a_vmapped_ensemble_into_itself(tmp_path):
    ensemble = jax.vmap(lambda k: jstate.init(model, k))(keys())
    saver = jstate.Saver()
    path = saver.save(ensemble, tmp_path / "ckpt")
    restored = saver.restore(path, jax.vmap(lambda k: jstate.init(model, k))(jax.random.split(jax.random.key(1), N)))
    np.testing.assert_array_equal(restored["big"], ensemble["big"])


def test_flax_model_ensemble(mesh):
    dense = nn.Dense(4, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model")))
    flax = jstate.flax_model(dense, jnp.ones((1, 6)))
    ensemble = jstate.init(flax, keys(), mesh=mesh)
    assert ensemble.spec("params/kernel").shape == (N, 6, 4)
    assert ensemble.spec("params/kernel").sharding.spec == P(None, None, "model")
    alone = jstate.init(flax, keys()[2], mesh=mesh)
    np.testing.assert_allclose(ensemble.member(2)["params/kernel"], alone["params/kernel"], rtol=1e-6)


def test_partial_ensemble_init_keeps_the_ensemble_shape():
    partial = jstate.init(model, keys(), only=["dense/bias"])
    assert partial.spec("big").shape == (N, 1100, 1000) and not partial.is_initialized("big")
    full = jstate.init(model, keys(), state=partial)
    assert full.uninitialized() == []
    np.testing.assert_array_equal(full["big"], jstate.init(model, keys())["big"])


def test_member_errors():
    ensemble = jstate.init(model, keys())
    with pytest.raises(IndexError, match="3 members"):
        ensemble.member(3)
    assert ensemble.member(-1).spec("step").shape == ()
    with pytest.raises(SpecMismatchError, match="first axis of the same length"):
        jstate.State({"a": jnp.zeros((2, 3)), "b": jnp.zeros((3, 3))}).member(0)


def test_keys_of_two_batch_axes_are_refused():
    with pytest.raises(TypeError, match=r"1-D batch.*\(2, 3\).*reshape"):
        jstate.init(model, jax.random.split(jax.random.key(0), (2, 3)))


@pytest.mark.slow  # legacy keys compile programs of their own
def test_legacy_uint32_keys_make_an_ensemble():
    raw = jax.random.split(jax.random.PRNGKey(0), N)
    ensemble = jstate.init(model, raw)
    assert ensemble.spec("dense/kernel").shape == (N, 16, 8)
    np.testing.assert_array_equal(ensemble.member(1)["dense/kernel"], jstate.init(model, raw[1])["dense/kernel"])
