"""Flax interop: linen modules as jstate models, NNX state both ways, optax next to params."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jstate


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x))
        x = nn.BatchNorm(use_running_average=True)(x)
        return nn.Dense(3)(x)


X = jnp.ones((2, 8))


def test_linen_module_is_a_jstate_model_named_by_paths():
    model = jstate.flax_model(MLP(), X)
    state = jstate.init(model, jax.random.key(0))
    assert list(state) == [
        "batch_stats/BatchNorm_0/mean",
        "batch_stats/BatchNorm_0/var",
        "params/BatchNorm_0/bias",
        "params/BatchNorm_0/scale",
        "params/Dense_0/bias",
        "params/Dense_0/kernel",
        "params/Dense_1/bias",
        "params/Dense_1/kernel",
    ]
    y = MLP().apply(state.tree(), X)
    assert y.shape == (2, 3)


@pytest.mark.slow  # seconds of compiles: in CI, not the fast loop
def test_only_and_rules_work_on_flax_variables():
    model = jstate.flax_model(MLP(), jax.ShapeDtypeStruct((2, 8), jnp.float32))
    full = jstate.init(model, jax.random.key(0))
    only = jstate.init(model, jax.random.key(0), only=["params/Dense_1/kernel"])
    assert list(only) == ["params/Dense_1/kernel"]
    np.testing.assert_array_equal(only["params/Dense_1/kernel"], full["params/Dense_1/kernel"])
    mesh = jax.make_mesh((8,), ("model",))
    placed = jstate.init(
        model, jax.random.key(0), mesh=mesh, rules=[(r"Dense_0/kernel", P(None, "model")), (".*", P())]
    )
    assert placed["params/Dense_0/kernel"].sharding == NamedSharding(mesh, P(None, "model"))
    np.testing.assert_array_equal(placed["params/Dense_0/kernel"], full["params/Dense_0/kernel"])


def test_state_to_and_from_nnx():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.encoder = nnx.Linear(4, 8, rngs=rngs)
            self.blocks = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(2)])

    net = Net(nnx.Rngs(0))
    state = jstate.State.from_nnx(net)
    assert "blocks/1/kernel" in state and state["encoder/kernel"].shape == (4, 8)
    state = state.assign("blocks/1/bias", jnp.full(8, 3.0))
    nnx.update(net, state.to_nnx())
    np.testing.assert_array_equal(net.blocks[1].bias[...], 3.0)


@pytest.mark.slow  # seconds of compiles: in CI, not the fast loop
def test_optax_state_checkpointed_next_to_params(tmp_path):
    model = jstate.flax_model(nn.Dense(3), X)
    params = jstate.init(model, jax.random.key(0))
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)

    def loss(p):
        return jnp.sum(nn.Dense(3).apply(p.tree(), X) ** 2)

    updates, opt_state = opt.update(jax.grad(loss)(params), opt_state, params)
    params = optax.apply_updates(params, updates)
    both = params.merge(jstate.State.from_tree({"opt": opt_state}))
    path = jstate.Saver().save(both, tmp_path / "ckpt", step=1)
    names = [n for n, *_ in jstate.list_variables(path)]
    assert "opt/0/mu/params/kernel" in names and "opt/0/count" in names
    restored = jstate.Saver().restore(path, both)
    mu = restored.subset([n for n in restored if n.startswith("opt/0/mu/")])
    np.testing.assert_array_equal(mu["opt/0/mu/params/kernel"], opt_state[0].mu["params/kernel"])
