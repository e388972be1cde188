"""Keys derived on the host (`jstate.model.threefry`) are JAX's, bit for bit; a Flax model's
pool records its draws without tracing their transforms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jstate
from jstate.model import draws, threefry


def words(key: jax.Array) -> tuple[int, int]:
    return tuple(int(w) for w in np.asarray(jax.random.key_data(key)))


@pytest.mark.parametrize("data", [0, 1, 0x726E67, 2**31, 2**32 - 1])
def test_fold_in_is_jax_fold_in(data):
    rng = np.random.default_rng(data)
    for seed in rng.integers(0, 2**32, size=20, dtype=np.uint64):
        key = jax.random.split(jax.random.key(int(seed)))[1]  # (both words in use)
        assert threefry.fold_in(words(key), data) == words(jax.random.fold_in(key, data))


def test_derive_follows_a_chain_of_folds_as_jax_does():
    def derive(key):
        a = jax.random.fold_in(key, 7)
        return [jax.random.fold_in(a, 3), jax.random.fold_in(jax.random.fold_in(a, 2**32 - 5), 11)]

    key = jax.random.key(42)
    jaxpr = jax.make_jaxpr(derive)(key).jaxpr
    assert threefry.derivable(jaxpr.eqns)
    got = threefry.derive(jaxpr.eqns, jaxpr.invars[0], np.asarray(jax.random.key_data(key)), jaxpr.outvars)
    assert got.dtype == np.uint32 and got.shape == (2, 2)
    np.testing.assert_array_equal(got, np.stack([jax.random.key_data(k) for k in derive(key)]))


def test_only_folds_of_constants_are_derived_on_the_host():
    split = jax.make_jaxpr(lambda k: jax.random.split(k)[0])(jax.random.key(0)).jaxpr
    traced = jax.make_jaxpr(lambda k, d: jax.random.fold_in(k, d))(jax.random.key(0), jnp.uint32(1)).jaxpr
    assert not threefry.derivable(split.eqns)
    assert not threefry.derivable(traced.eqns)


class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.Dense(5, kernel_init=nn.initializers.normal(0.1))(x))


def test_flax_keys_are_hashed_on_the_host_and_give_the_same_values(monkeypatch):
    x = jnp.ones((1, 4))
    calls = []
    derive = threefry.derive
    monkeypatch.setattr(threefry, "derive", lambda *a: calls.append(1) or derive(*a))
    model = jstate.flax_model(Two(), x)
    state = jstate.init(model, jax.random.key(3))
    assert calls  # the keys came from the host
    # ... and are those JAX derives: under `jax.jit` (a traced key) they are folded by JAX
    jitted = jax.jit(lambda k: jstate.init(model, k))(jax.random.key(3))
    for name in state:
        np.testing.assert_array_equal(state[name], jitted[name], err_msg=name)


def test_the_recording_pass_traces_the_draws_keys_not_their_transforms():
    def init(key):
        k1, k2 = jax.random.split(jax.random.fold_in(key, 1))  # keys made by a call (`split` is jitted)
        normal = jax.random.truncated_normal(k1, -2.0, 2.0, (4, 4))  # a call that draws, then erf_inv
        return normal * 3.0, jax.random.uniform(k2, (2,))

    jaxpr = jax.make_jaxpr(init)(jax.random.key(0)).jaxpr

    def names(eqns, wanted=()):
        out = []
        for eqn in draws._for_draws(eqns, wanted)[0]:
            out.append(eqn.primitive.name)
            inner = draws._inner(eqn)
            if inner is not None:
                out += names(inner[0].eqns, draws._for_draws(eqns, wanted)[1][id(eqn)])
        return out

    kept_names = names(jaxpr.eqns)
    assert kept_names.count("random_bits") == 2
    assert "random_split" in kept_names and "random_fold_in" in kept_names
    assert "erf_inv" not in kept_names and "mul" not in kept_names
    # recorded in the order the full evaluation draws them
    requests = []
    env = {jaxpr.invars[0]: jax.random.key(0)}
    draws.run_eqns(jaxpr.eqns, env, draws._Recorder(requests))
    assert [shape for _, _, shape in requests] == [(4, 4), (2,)]


def test_fold_names_gives_each_variable_its_own_key():
    from jstate.core.names import name_hash
    from jstate.model import programs

    key = jax.random.split(jax.random.key(7))[1]
    names = np.stack([name_hash(f"layer{i}/kernel") for i in range(300)])
    own = threefry.fold_names(threefry.words_of(key), names)
    assert own.dtype == np.uint32 and own.shape == (300, 2)
    expected = jax.vmap(lambda w: jax.random.key_data(programs.fold(key, w)))(names)
    np.testing.assert_array_equal(own, expected)


def test_only_a_concrete_threefry_key_outside_a_trace_is_folded_on_the_host():
    key = jax.random.key(1)
    np.testing.assert_array_equal(threefry.words_of(key), jax.random.key_data(key))
    assert threefry.words_of(jax.random.PRNGKey(1)) is None  # a legacy uint32 key
    assert threefry.words_of(jax.random.key(1, impl="rbg")) is None
    assert threefry.words_of(jax.random.split(key, 3)) is None  # an ensemble's keys
    seen = []
    jax.jit(lambda k: seen.append(threefry.words_of(k)) or k)(key)  # a traced key
    jax.jit(lambda: seen.append(threefry.words_of(key)) or 0)()  # a key closed over by a trace
    assert seen == [None, None]


def test_programs_of_a_concrete_key_compile_no_fold_in(monkeypatch):
    import collections

    from jstate.model import programs

    monkeypatch.setattr(programs, "_programs", collections.OrderedDict())  # (none made by other tests)

    def model(s):
        for i in range(3):
            s.variable(f"w{i}", jax.nn.initializers.normal(), (4, i + 2))

    key = jax.random.key(5)
    state = jstate.init(model, key)
    ((cache_key, program),) = programs._programs.items()
    assert cache_key[0] == "pooled" and cache_key[-1] is True  # folded on the host
    text = program.lower(key, np.zeros((3, 2), np.uint32)).as_text()
    assert text.count("call @threefry2x32") == 1  # the pool's draw; no fold_in
    under_jit = jax.jit(lambda k: jstate.init(model, k))(key)  # (folded by the program: same values)
    for name in state:
        np.testing.assert_array_equal(state[name], under_jit[name], err_msg=name)


def test_a_concrete_key_closed_over_under_jit_is_folded_by_jax():
    # (the key is no tracer, but its words are: they cannot be hashed on the host)
    x = jnp.ones((1, 4))
    model = jstate.flax_model(Two(), x)
    key = jax.random.key(3)
    closed = jax.jit(lambda: jstate.init(model, key))()
    state = jstate.init(model, key)
    for name in state:
        np.testing.assert_array_equal(state[name], closed[name], err_msg=name)
