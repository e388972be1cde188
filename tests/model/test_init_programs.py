"""How `init` compiles: pooled random bits, caches that are never stale, threads."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jstate
from jstate import initializers as inits
from jstate.core.names import name_hash
from jstate.model import draws, programs

KEY = jax.random.key(0)

INITIALIZERS = {
    "normal": (inits.normal(0.5), (7, 9), jnp.float32),
    "uniform_bf16": (inits.uniform(0.3), (5, 3), jnp.bfloat16),
    "truncated": (inits.truncated_normal(2.0, mean=1.0), (129,), jnp.float32),
    "glorot": (inits.glorot_uniform(), (33, 17), jnp.float32),
    "he_normal_f16": (inits.he_normal(), (4, 4, 3, 8), jnp.float16),
    "orthogonal": (inits.orthogonal(), (6, 4), jnp.float32),
    "zeros": (inits.zeros, (3,), jnp.float32),
    "int_bits": (lambda k, s, d: jax.random.bits(k, s, jnp.uint16).astype(d), (300,), jnp.int32),
    "empty": (inits.normal(), (0, 5), jnp.float32),
    "split": (lambda k, s, d: jax.random.normal(jax.random.split(k)[1], s, d), (4,), jnp.float32),
}


def own_value(name, init, shape, dtype, key=KEY):
    """What the initializer gives the variable's own key, called directly."""
    return init(programs.fold(key, name_hash(name)), shape, dtype)


@pytest.mark.slow  # seconds of compiles: in CI, not the fast loop
def test_pooled_values_are_the_initializers_own_values_bit_for_bit():
    def model(s):
        for name, (init, shape, dtype) in INITIALIZERS.items():
            s.variable(name, init, shape, dtype)

    state = jstate.init(model, KEY)
    for name, (init, shape, dtype) in INITIALIZERS.items():
        expected = own_value(name, init, shape, dtype)
        assert state[name].dtype == expected.dtype
        np.testing.assert_array_equal(np.asarray(state[name]), np.asarray(expected), err_msg=name)


@pytest.mark.slow  # seconds of compiles: in CI, not the fast loop
def test_variables_of_many_shapes_share_one_program():
    def model(s):
        for i in range(40):
            s.variable(f"w{i}", inits.glorot_normal(), (8 + i, 3 + i))

    before = len(programs._programs)
    state = jstate.init(model, KEY)
    assert len(programs._programs) - before == -(-40 // draws.CHUNK_DISTINCT)  # one per pool of distinct ones
    np.testing.assert_array_equal(state["w17"], own_value("w17", inits.glorot_normal(), (25, 20), jnp.float32))


def test_big_variables_keep_programs_of_their_own(monkeypatch):
    monkeypatch.setattr(draws, "POOL_MAX", 10)
    monkeypatch.setattr(draws, "CHUNK_VARIABLES", 2)

    def model(s):
        for i in range(5):
            s.variable(f"small{i}", inits.normal(), (3,))
        s.variable("big", inits.normal(), (4, 4))

    state = jstate.init(model, KEY)
    for name, shape in [("small4", (3,)), ("big", (4, 4))]:
        np.testing.assert_array_equal(state[name], own_value(name, inits.normal(), shape, jnp.float32))


@pytest.mark.slow  # seconds of compiles: in CI, not the fast loop
def test_pooled_variables_are_created_on_their_shardings():
    mesh = jax.make_mesh((4, 2), ("a", "b"))

    def model(s):
        s.variable("rows", inits.normal(), (8, 6), sharding=jax.sharding.PartitionSpec("a"))
        s.variable("cols", inits.normal(), (3, 4), sharding=jax.sharding.PartitionSpec(None, "b"))
        s.variable("alone", inits.normal(), (5,), device="cpu:3")

    state = jstate.init(model, KEY, mesh=mesh)
    named = lambda *spec: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))  # noqa: E731
    assert state["rows"].sharding.is_equivalent_to(named("a"), 2)
    assert state["cols"].sharding.is_equivalent_to(named(None, "b"), 2)
    assert state["alone"].devices() == {jax.devices()[3]}
    np.testing.assert_array_equal(state["rows"], own_value("rows", inits.normal(), (8, 6), jnp.float32))


SCALE = 1.0


def scaled(key, shape, dtype):
    return jnp.full(shape, SCALE, dtype)


def test_an_initializer_reading_a_changed_global_gets_the_new_value():
    global SCALE
    model = lambda s: s.variable("w", scaled, (3,))  # noqa: E731
    try:
        np.testing.assert_array_equal(jstate.init(model, KEY)["w"], [1.0, 1.0, 1.0])
        SCALE = 5.0
        np.testing.assert_array_equal(jstate.init(model, KEY)["w"], [5.0, 5.0, 5.0])  # the same model
        np.testing.assert_array_equal(jstate.init(lambda s: model(s), KEY)["w"], [5.0, 5.0, 5.0])  # a new one
    finally:
        SCALE = 1.0


def test_an_initializer_reading_a_changed_closure_gets_the_new_value():
    def make(scale):
        return lambda key, shape, dtype: jnp.full(shape, scale, dtype)

    for scale in (1.0, 2.0, -0.0):
        value = jstate.init(lambda s, scale=scale: s.variable("w", make(scale), (2,)), KEY)["w"]
        np.testing.assert_array_equal(value, [scale, scale])
        assert np.signbit(value[0]) == np.signbit(scale)


@pytest.mark.slow  # seconds of compiles: in CI, not the fast loop
def test_threads_initializing_different_and_equal_models_at_once_get_the_right_values():
    def make(width):
        def model(s):
            for i in range(6):
                s.variable(f"layer{i}/kernel", inits.glorot_uniform(), (width + i, width))
                s.variable(f"layer{i}/bias", inits.constant(float(width)), (width,))
            s.variable("sum", s.scope("layer0").variable("copy", jnp.zeros(width)) + 1.0)

        return model

    shared = make(4)
    models = [shared, shared, shared, shared, make(5), make(6), make(7), make(8)]
    expected = [jstate.init(make(4 + max(0, i - 3)), jax.random.key(i)) for i in range(8)]
    results: list = [None] * 8
    barrier = threading.Barrier(8)

    def work(i):
        barrier.wait()
        results[i] = jstate.init(models[i], jax.random.key(i))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (got, want) in enumerate(zip(results, expected)):
        assert got is not None, f"thread {i} failed"
        assert sorted(got) == sorted(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"thread {i}, {name}")


@pytest.mark.parametrize("name", ["split", "orthogonal"])
def test_legacy_keys_give_the_initializers_own_values(name):
    init, shape, dtype = INITIALIZERS[name]
    key = jax.random.PRNGKey(3)
    state = jstate.init(lambda s: s.variable(name, init, shape, dtype), key)
    np.testing.assert_array_equal(state[name], own_value(name, init, shape, dtype, key))


# -- Flax models: one program, created in place ---------------------------------------------


def flax_mlp(features: int, partitioned: bool):
    from flax import linen as nn

    wrap = (lambda init: nn.with_partitioning(init, (None, "model"))) if partitioned else (lambda init: init)

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(3):
                x = nn.Dense(features, kernel_init=wrap(nn.initializers.lecun_normal()), name=f"dense{i}")(x)
            return nn.LayerNorm()(x)

    return MLP()


@pytest.mark.slow  # seconds of compiles: in CI, not the fast loop
def test_flax_model_values_are_module_init_of_the_derived_key():
    module, x = flax_mlp(16, False), jnp.ones((1, 16))
    state = jstate.init(jstate.flax_model(module, x), KEY)
    root = jax.random.fold_in(programs.fold(KEY, name_hash("flax")), 0x726E67)  # `s.make_rng("flax")`
    expected = module.init(root, x)["params"]
    np.testing.assert_allclose(state["params/dense1/kernel"], expected["dense1"]["kernel"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(state["params/LayerNorm_0/scale"], expected["LayerNorm_0"]["scale"])


def test_a_sharded_flax_model_is_created_in_place(monkeypatch):
    from jstate.model import init as init_module

    monkeypatch.setattr(draws, "POOL_MAX", 256)  # the kernels are drawn by partitionable threefry
    mesh = jax.make_mesh((8,), ("model",))
    module, x = flax_mlp(512, True), jnp.ones((1, 512))
    model = jstate.flax_model(module, x)
    state = jstate.init(model, KEY, mesh=mesh)
    kernel = state["params/dense0/kernel"]
    assert {s.data.shape for s in kernel.addressable_shards} == {(512, 64)}
    (plan,) = init_module._plans[model].values()
    # one program for the sharded kernels, one for what lives on the default device
    memory = [program.lower(KEY, []).compile().memory_analysis() for program in plan.derive.values()]
    full = sum(state.spec(n).nbytes for n in state)
    kernels = sum(state.spec(n).nbytes for n in state if n.endswith("kernel"))
    assert kernels > 0.99 * full  # the kernels are (almost) all of it, and split 8 ways
    assert sum(m.output_size_in_bytes for m in memory) < full / 8 + 64 * 1024  # (+ the biases and LayerNorm)
    # threefry's temporaries for a device's shards, never a whole kernel (nor a pool of every bit)
    assert max(m.temp_size_in_bytes for m in memory) < state.spec("params/dense0/kernel").nbytes


def test_replicated_variables_on_a_mesh_gather_their_pool_once():
    # Left spread over the devices, the pool would be gathered back one variable at a time: a
    # collective per variable (and its compile). Gathered whole, their count does not grow.
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def collectives(n):
        traced = [programs.trace(inits.glorot_uniform(), (8, 3 + i), np.dtype(np.float32), KEY) for i in range(n)]
        words = np.stack([name_hash(f"w{i}") for i in range(n)])
        program = programs.pooled_program(traced, [replicated] * n)
        for value, t, w in zip(program(KEY, words), traced, words):
            np.testing.assert_array_equal(value, programs.evaluate(t, programs.fold(KEY, w)))
            assert value.sharding == replicated
        text = program.lower(KEY, words).compile().as_text()
        return sum(text.count(f" {op}(") for op in ("all-gather", "collective-permute", "all-reduce", "all-to-all"))

    assert collectives(3) == collectives(9)
