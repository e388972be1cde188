"""How `init` compiles: pooled random bits, caches that are never stale, threads."""

from __future__ import annotations

import collections
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

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


# -- Constant fills: made on the host, put on their shardings, no program ---------------------


FILLS = {
    "zeros": (inits.zeros, (5, 3), jnp.float32),
    "ones_bf16": (inits.ones, (4,), jnp.bfloat16),
    "constant": (inits.constant(-0.0), (2, 2), jnp.float32),
    "int_full": (lambda k, s, d: jnp.full(s, 7, d), (3,), jnp.int32),
    "reshaped": (lambda k, s, d: jnp.zeros((s[0] * s[1],), d).reshape(s), (2, 3), jnp.float32),
    "exact_cast": (lambda k, s, d: jnp.full(s, 0.5, jnp.float32).astype(d), (3,), jnp.bfloat16),
    "inexact_cast": (lambda k, s, d: jnp.full(s, 0.1, jnp.float32).astype(d), (3,), jnp.bfloat16),
    "scalar": (inits.ones, (), jnp.float32),
}


def fill_model(s):
    for name, (init, shape, dtype) in FILLS.items():
        s.variable(name, init, shape, dtype)


def test_constant_variables_are_the_initializers_own_values_without_a_program():
    from jstate.model import init as init_module

    before = len(programs._programs)
    state = jstate.init(fill_model, KEY)
    (plan,) = init_module._plans[fill_model].values()
    assert {plan.specs[i].name for i in plan.fills} == set(FILLS) - {"inexact_cast"}  # (numpy's rounding is not XLA's)
    assert len(programs._programs) - before <= 1  # just the pool of `inexact_cast`
    for name, (init, shape, dtype) in FILLS.items():
        expected = own_value(name, init, shape, dtype)
        assert state[name].dtype == expected.dtype and state[name].shape == shape, name
        np.testing.assert_array_equal(np.asarray(state[name]), np.asarray(expected), err_msg=name)
        assert np.signbit(np.asarray(state[name])).tolist() == np.signbit(np.asarray(expected)).tolist(), name
    # each variable is a buffer of its own: donating one leaves the others whole
    assert len({id(state[n]) for n in FILLS}) == len(FILLS)
    jax.jit(lambda x: x + 1, donate_argnums=0)(state["zeros"])
    np.testing.assert_array_equal(state["constant"], np.zeros((2, 2)))


def test_constant_variables_are_put_on_their_shardings_and_large_ones_computed_in_place(monkeypatch):
    monkeypatch.setattr(programs, "FILL_MAX", 64)  # bytes: "big" is computed by a program
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    spread = jax.sharding.PartitionSpec("a", "b")

    def model(s):
        s.variable("small", inits.ones, (4, 2), sharding=spread)
        s.variable("big", inits.ones, (8, 8), sharding=spread)
        s.variable("there", inits.zeros, (3,), device="cpu:5")

    state = jstate.init(model, KEY, mesh=mesh)
    for name in ("small", "big"):
        assert state[name].sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spread), 2), name
        shard = state.spec(name).shape[0] // 4, state.spec(name).shape[1] // 2
        assert {s.data.shape for s in state[name].addressable_shards} == {shard}
        np.testing.assert_array_equal(state[name], np.ones(state.spec(name).shape))
    assert state["there"].devices() == {jax.devices()[5]}


def test_constant_variables_under_jit_vmap_and_in_ensembles():
    def model(s):
        s.variable("w", inits.normal(), (3,))
        s.variable("b", inits.constant(2.0), (3,))

    keys = jax.random.split(KEY, 4)
    ensemble = jstate.init(model, keys)
    assert ensemble["b"].shape == (4, 3) and ensemble.spec("b").shape == (4, 3)
    mapped = jax.vmap(lambda k: jstate.init(model, k))(keys)
    jitted = jax.jit(lambda k: jstate.init(model, k))(KEY)
    np.testing.assert_array_equal(ensemble["b"], np.full((4, 3), 2.0))
    np.testing.assert_array_equal(mapped["b"], ensemble["b"])
    np.testing.assert_array_equal(jitted["b"], ensemble.member(0)["b"])
    np.testing.assert_array_equal(mapped["w"], ensemble["w"])


def test_equal_large_variables_are_computed_a_few_per_program(monkeypatch):
    monkeypatch.setattr(draws, "POOL_MAX", 10)  # every variable below is "large"
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    rows = jax.sharding.PartitionSpec("a")

    def model(s):
        for i in range(6):
            s.variable(f"w{i}", inits.glorot_normal(), (8, 4), sharding=rows)
        s.variable("other", inits.normal(), (4, 4))

    monkeypatch.setattr(programs, "_programs", collections.OrderedDict())  # (none made by other tests)
    state = jstate.init(model, KEY, mesh=mesh)
    made = [k[0] if k[0] != "equal" else ("equal", k[3]) for k in programs._programs]
    assert sorted(map(str, made)) == sorted(map(str, [("equal", programs.SIDE_BY_SIDE), ("equal", 2), "single"]))
    for i in range(6):
        np.testing.assert_array_equal(state[f"w{i}"], own_value(f"w{i}", inits.glorot_normal(), (8, 4), jnp.float32))
        assert state[f"w{i}"].sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, rows), 2)
    np.testing.assert_array_equal(state["other"], own_value("other", inits.normal(), (4, 4), jnp.float32))
    ensemble = jstate.init(model, jax.random.split(KEY, 2), mesh=mesh)
    np.testing.assert_array_equal(
        ensemble.member(1)["w5"], jstate.init(model, jax.random.split(KEY, 2)[1], mesh=mesh)["w5"]
    )


@pytest.mark.slow  # seconds of compiles: in CI, not the fast loop
def test_large_draws_of_a_flax_model_on_one_device_join_its_pool(monkeypatch):
    from jstate.model import init as init_module

    monkeypatch.setattr(draws, "POOL_MAX", 256)  # on a mesh, each kernel would be a draw of its own
    module, x = flax_mlp(64, False), jnp.ones((1, 64))
    model = jstate.flax_model(module, x)
    state = jstate.init(model, KEY)
    root = jax.random.fold_in(programs.fold(KEY, name_hash("flax")), 0x726E67)
    expected = module.init(root, x)["params"]
    for i in range(3):
        got = state[f"params/dense{i}/kernel"]
        np.testing.assert_allclose(got, expected[f"dense{i}"]["kernel"], rtol=1e-6, atol=1e-7)
    (plan,) = init_module._plans[model].values()
    (program,) = plan.derive.values()
    assert program.lower(KEY, []).as_text().count("call @threefry2x32") == 1  # one pool for the three kernels


def test_equal_large_variables_past_the_byte_bound_are_computed_one_per_program(monkeypatch):
    monkeypatch.setattr(draws, "POOL_MAX", 10)
    monkeypatch.setattr(programs, "SIDE_BY_SIDE_BYTES", 2 * 8 * 4 * 4)  # two 8x4 float32 variables
    monkeypatch.setattr(programs, "_programs", collections.OrderedDict())

    def model(s):
        for i in range(5):
            s.variable(f"w{i}", inits.glorot_normal(), (8, 4))

    state = jstate.init(model, KEY)
    assert sorted(k[0] if k[0] != "equal" else f"equal {k[3]}" for k in programs._programs) == ["equal 2", "single"]
    for i in range(5):
        np.testing.assert_array_equal(state[f"w{i}"], own_value(f"w{i}", inits.glorot_normal(), (8, 4), jnp.float32))


@pytest.mark.slow  # seconds of compiles
@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit])
def test_a_key_committed_to_one_device_draws_placed_variables_on_their_own_devices(axis_type):
    # A key committed to one device (`jax.device_put`, a split of a committed key, a key restored
    # from a checkpoint): unplaced variables are computed where it is, placed ones on their mesh
    # or device; JAX refuses a committed argument on other devices than a program's outputs.
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)

    def model(s):
        w = s.variable("w", inits.glorot_uniform(), (64, 32))  # a pool on the mesh
        s.variable("big", inits.normal(), (1100, 1000))  # a program of its own
        s.variable("w2", w)  # computed from `w`
        s.variable("u", inits.normal(), (5,))  # unplaced: where the key is
        s.variable("pinned", inits.normal(), (8,), device="cpu:5")

    rules = [("^w$", P(None, "model")), ("big", P("data")), ("w2", P())]
    expected = jstate.init(model, KEY, mesh=mesh, rules=rules)
    for device in (0, 7):
        state = jstate.init(model, jax.device_put(KEY, jax.devices()[device]), mesh=mesh, rules=rules)
        for name in expected:
            np.testing.assert_array_equal(state[name], expected[name])
        assert state["w"].sharding.is_equivalent_to(expected["w"].sharding, 2)
        assert state["big"].sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P("data")), 2)
        assert state["w2"].sharding.is_fully_replicated and len(state["w2"].devices()) == 8
        assert state["u"].committed and state["u"].devices() == {jax.devices()[device]}
        assert state["pinned"].devices() == {jax.devices()[5]}


@pytest.mark.slow  # seconds of compiles
def test_a_key_committed_to_one_device_initializes_a_flax_model_on_a_mesh(mesh):
    module, x = flax_mlp(16, True), jnp.ones((1, 16))
    model = jstate.flax_model(module, x)
    expected = jstate.init(model, KEY, mesh=mesh)
    for rules in (None, [(".*", P())]):
        state = jstate.init(model, jax.device_put(KEY, jax.devices()[7]), mesh=mesh, rules=rules)
        for name in expected:
            np.testing.assert_array_equal(state[name], expected[name])
        assert state["params/dense0/kernel"].sharding.spec == P(None, "model")


def test_an_unplaced_value_computed_from_placed_ones_follows_them_with_a_committed_key(mesh):
    # `w2` has no placement and is computed from `w` on the mesh: with an uncommitted key it is
    # computed where `w` is; a key committed to one device (the program keeps it) is taken there
    # too, rather than JAX refusing the key and `w` on different devices.
    def model(s):
        w = s.variable("w", inits.glorot_uniform(), (64, 32), sharding=P(None, "model"))
        s.variable("w2", w * 2)

    expected = jstate.init(model, KEY, mesh=mesh)
    state = jstate.init(model, jax.device_put(KEY, jax.devices()[7]), mesh=mesh)
    np.testing.assert_array_equal(state["w2"], 2 * np.asarray(expected["w"]))
    assert state["w2"].sharding.device_set == expected["w2"].sharding.device_set == set(mesh.devices.flat)


def test_an_initializer_that_traces_but_does_not_compile_is_named():
    # XLA's CPU QR has no bfloat16: `orthogonal` traces, then fails to compile (in `jax.jit` too)
    def model(s):
        s.variable("a", inits.normal(), (4, 4))
        s.variable("w", inits.orthogonal(), (4, 4), jnp.bfloat16)
        s.variable("b", inits.normal(), (3,))

    with pytest.raises(jstate.InitializerError, match=r"Variable 'w': .*shape \(4, 4\) and dtype bfloat16") as raised:
        jstate.init(model, KEY)
    assert "a'" not in str(raised.value) and "'b'" not in str(raised.value)


def test_a_flax_model_that_does_not_compile_names_its_variables():
    from flax import linen as nn

    module = nn.Dense(4, kernel_init=nn.initializers.orthogonal(), param_dtype=jnp.bfloat16)
    with pytest.raises(jstate.InitializerError, match="params/kernel"):
        jstate.init(jstate.flax_model(module, jnp.ones((1, 4))), KEY)


def test_a_value_computed_from_others_is_the_same_with_only():
    # Its inputs are computed by their own programs, then it from them, whatever `only=` asks
    # for: computed inside its program instead, XLA fused `w * 2 + b` into `w`'s transform and
    # rounded the last bit differently (1.2e-7 here) from the full init's value.
    def model(s):
        w = s.variable("w", inits.normal(), (4, 3))
        b = s.variable("b", inits.ones, (3,))
        s.variable("w2", w * 2 + b)

    full = jstate.init(model, KEY)
    alone = jstate.init(model, KEY, only=["w2"])
    assert list(alone) == ["w2"]
    np.testing.assert_array_equal(alone["w2"], full["w2"])
    np.testing.assert_array_equal(full["w2"], full["w"] * 2 + full["b"])
    kept = jstate.init(model, KEY, state=jstate.init(model, KEY, only=["w"]).assign({"w": jnp.zeros((4, 3))}))
    np.testing.assert_array_equal(kept["w2"], full["w2"])  # (from w's initial value, as TF's initialized_value)
    np.testing.assert_array_equal(kept["w"], np.zeros((4, 3)))
