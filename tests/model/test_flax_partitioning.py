"""Flax linen models with partitioned parameters (`nn.with_partitioning`, logical axis names)
become jstate models placed on a mesh; `exact_init=True` reproduces `module.init` bit for bit."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jstate

LECUN = nn.initializers.lecun_normal()


class Sharded(nn.Module):
    """Mesh-axis names on the kernels; biases and norms unannotated."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16, kernel_init=nn.with_partitioning(LECUN, (None, "model")))(x)
        x = nn.relu(nn.LayerNorm()(x))
        return nn.Dense(4, kernel_init=nn.with_partitioning(LECUN, ("model", None)))(x)


class Logical(nn.Module):
    """Logical names, as Flax's "scale up" guide writes them."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(
            16,
            kernel_init=nn.with_logical_partitioning(LECUN, ("embed", "mlp")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)),
        )(x)
        return nn.Dense(4, kernel_init=nn.with_logical_partitioning(LECUN, ("mlp", "embed")))(nn.relu(x))


X = jnp.ones((8, 4))
# Flax's Dense does not say how a product over a sharded dimension is sharded, as explicit mesh
# axes require: its users' meshes are Auto.
MESH = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))
LOGICAL_RULES = [("batch", "data"), ("embed", None), ("mlp", "model")]


@pytest.mark.slow  # seconds of compiles: in CI, not the fast loop
def test_with_partitioning_names_become_placements_on_the_mesh():
    state = jstate.init(jstate.flax_model(Sharded(), X), jax.random.key(0), mesh=MESH)
    assert list(state) == [
        "params/Dense_0/bias",
        "params/Dense_0/kernel",
        "params/Dense_1/bias",
        "params/Dense_1/kernel",
        "params/LayerNorm_0/bias",
        "params/LayerNorm_0/scale",
    ]  # unboxed: no "/value"
    kernel = state.placement("params/Dense_0/kernel")
    assert kernel.origin is jstate.Origin.SHARDING and kernel.request == P(None, "model")
    assert state["params/Dense_0/kernel"].sharding == NamedSharding(MESH, P(None, "model"))
    assert state["params/Dense_1/kernel"].sharding.spec == state.spec("params/Dense_1/kernel").sharding.spec
    assert state.placement("params/Dense_0/bias").sharding is None  # unannotated: no placement
    y = Sharded().apply(state.tree(), X)
    assert y.shape == (8, 4)


def test_jstate_rules_place_the_unannotated_variables_and_annotations_win():
    model = jstate.flax_model(Sharded(), X)
    state = jstate.init(model, jax.random.key(0), mesh=MESH, rules=[("kernel", P()), (".*", P("model"))])
    assert state.placement("params/Dense_0/kernel").sharding.spec == NamedSharding(MESH, P(None, "model")).spec
    assert state.placement("params/Dense_0/bias").source == "rule 1 ('.*')"


def test_logical_axis_rules_map_logical_names_as_flax_does():
    model = jstate.flax_model(Logical(), X, logical_axis_rules=LOGICAL_RULES)
    state = jstate.init(model, jax.random.key(0), mesh=MESH)
    boxed = jax.eval_shape(Logical().init, jax.random.key(0), X)
    flax_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), MESH, LOGICAL_RULES)
    partitioned = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    names = {
        jax.tree_util.keystr(p, simple=True, separator="/") for p, x in partitioned if isinstance(x, nn.Partitioned)
    }
    assert names == {"params/Dense_0/kernel", "params/Dense_0/bias", "params/Dense_1/kernel"}
    for path, sharding in jax.tree_util.tree_leaves_with_path(flax_shardings):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        if name in names:
            assert state[name].sharding.is_equivalent_to(sharding, state[name].ndim), name
    assert state.placement("params/Dense_1/bias").sharding is None  # unannotated: no placement
    assert state.placement("params/Dense_0/kernel").request == P(None, "model")


def test_logical_names_without_rules_are_a_clear_error_or_take_flaxs_context_rules():
    model = jstate.flax_model(Logical(), X)
    with pytest.raises(
        jstate.PlacementError,
        match=r"Variable 'params/Dense_0/bias' has logical axis names \('mlp',\).*logical_axis_rules=",
    ):
        jstate.abstract(model, mesh=MESH)
    with nn.logical_axis_rules(LOGICAL_RULES):
        state = jstate.abstract(jstate.flax_model(Logical(), X), mesh=MESH)
    assert state.placement("params/Dense_0/kernel").request == P(None, "model")


def test_without_a_mesh_a_partitioned_model_lives_on_the_default_device(caplog):
    # (This replaces a test that asked for an error here: issue 21 asks that looking at a model,
    # or evaluating it on one device, need no mesh.)
    model = jstate.flax_model(Logical(), X)  # logical names, and no rules either
    with caplog.at_level("INFO", logger="jstate"):
        abstract = jstate.abstract(model)
        state = jstate.init(model, jax.random.key(0))
    assert all(abstract.spec(n).sharding is None for n in abstract.specs)
    assert all(state[n].devices() == {jax.devices()[0]} for n in state)
    records = [r for r in caplog.records if "was not applied" in r.getMessage()]
    assert len(records) == 1 and records[0].levelname == "INFO"
    assert "'params/Dense_0/kernel'" in records[0].getMessage()


def test_a_mesh_without_an_axis_the_model_names_says_what_to_add():
    data_only = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    with pytest.raises(
        jstate.PlacementError, match=r"'params/Dense_0/kernel'.*mesh axis 'model'.*Add a mesh axis 'model'"
    ):
        jstate.abstract(jstate.flax_model(Sharded(), X), mesh=data_only)
    logical = jstate.flax_model(Logical(), X, logical_axis_rules=LOGICAL_RULES)
    with pytest.raises(
        jstate.PlacementError,
        match=r"logical axis 'mlp', mapped by the rule \('mlp', 'model'\).*map logical axis 'mlp' to one of \('data',\)",
    ):
        jstate.abstract(logical, mesh=data_only)


def test_a_box_with_its_own_mesh_is_placed_on_it():
    own = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,))
    dense = nn.Dense(8, kernel_init=nn.with_partitioning(LECUN, (None, "model"), mesh=own))
    state = jstate.init(jstate.flax_model(dense, X), jax.random.key(0))
    assert state["params/kernel"].sharding == NamedSharding(own, P(None, "model"))


class WithStats(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16, kernel_init=nn.with_partitioning(LECUN, (None, "model")))(x)
        x = nn.BatchNorm(use_running_average=False)(x)
        x = nn.Dropout(0.5, deterministic=True)(x)
        return nn.Dense(3)(x) + self.param("offset", nn.initializers.normal(1.0), (3,))


@pytest.mark.slow  # Flax's init and jstate's, compiled per case
@pytest.mark.parametrize("key", [jax.random.key(7), jax.random.PRNGKey(7)], ids=["typed-key", "uint32-key"])
@pytest.mark.parametrize("mesh", [None, MESH], ids=["default-device", "mesh"])
def test_exact_init_equals_module_init_bit_for_bit(key, mesh):
    module = WithStats() if mesh is not None else nn.Dense(5)
    expected = jstate.State.from_tree(nn.unbox(module.init(key, X)))
    state = jstate.init(jstate.flax_model(module, X, exact_init=True), key, mesh=mesh)
    assert list(state) == list(expected)
    for name in expected:
        np.testing.assert_array_equal(state[name], expected[name], err_msg=name)
        assert state[name].dtype == expected[name].dtype
    only = jstate.init(jstate.flax_model(module, X, exact_init=True), key, mesh=mesh, only=[list(expected)[-1]])
    np.testing.assert_array_equal(only[list(expected)[-1]], expected[list(expected)[-1]])


@pytest.mark.slow  # seconds of compiles: in CI, not the fast loop
def test_by_default_flax_gets_a_key_derived_from_inits_key():
    key = jax.random.key(7)
    derived = jstate.init(jstate.flax_model(nn.Dense(5), X), key)
    assert not np.array_equal(derived["params/kernel"], nn.Dense(5).init(key, X)["params"]["kernel"])
    again = jstate.init(jstate.flax_model(nn.Dense(5), X), key)
    np.testing.assert_array_equal(derived["params/kernel"], again["params/kernel"])  # still a function of `key`
