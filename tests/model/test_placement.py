"""Device placement and sharding on 8 CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import jstate
from jstate import initializers as inits
from jstate.model.devices import parse_device

KEY = jax.random.key(0)
RULES = [(r".*/kernel$", P("data", "model")), (r".*", P())]


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((4, 2), ("data", "model"))


def model(s):
    s.variable("step", inits.zeros, (), jnp.int32, device="cpu:0")
    with s.placement("cpu:1"):
        s.variable("stats", inits.zeros, (10,))
        s.variable("pinned", inits.ones, (2,), device="/cpu:2")  # its own spec beats the block
    for i in range(2):
        layer = s.scope(f"layer{i}")
        layer.variable("kernel", inits.glorot_uniform(), (64, 32))
        layer.variable("bias", inits.zeros, (32,), sharding=P("model"))


def mesh_model(s):
    """Only mesh-placed variables, so a jitted step can take the whole State."""
    for i in range(2):
        layer = s.scope(f"layer{i}")
        layer.variable("kernel", inits.glorot_uniform(), (64, 32))
        layer.variable("bias", inits.zeros, (32,), sharding=P("model"))
    s.variable("scale", s.scope("layer0").variable("gain", inits.ones, (32,)) * 2.0)


@pytest.mark.parametrize(
    "spec, device_id",
    [
        ("/cpu:0", 0),
        ("cpu:3", 3),
        ("/device:CPU:2", 2),
        ("cpu", 0),
        ("CPU:7", 7),
        ("/job:ps/task:0", 0),
        ("/job:worker/replica:0/task:0/device:CPU:5", 5),
    ],
)
def test_tensorflow_device_strings(spec, device_id):
    assert parse_device(spec) == jax.devices()[device_id]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("gpu:0", "'gpu:0' matches no device. Devices: cpu:0 \\(process 0\\), cpu:1"),
        ("cpu:99", "'cpu:99' matches no device"),
        ("/job:ps/task:7", "'/job:ps/task:7' matches no device"),
        ("potato:1", "'potato:1' is not understood \\(at 'potato:1'\\)"),
        ("cpu:x", "'cpu:x': 'cpu:x' needs a whole number"),
    ],
)
def test_device_string_that_matches_nothing_lists_devices(spec, message):
    def m(s):
        s.variable("v", inits.zeros, (2,), device=spec)

    with pytest.raises(jstate.PlacementError, match="Variable 'v': device spec " + message):
        jstate.abstract(m)


def test_placement_sources_in_order_of_strength(mesh):
    state = jstate.init(model, KEY, mesh=mesh, rules=RULES)
    assert state["step"].sharding == SingleDeviceSharding(jax.devices()[0])
    assert state["stats"].sharding == SingleDeviceSharding(jax.devices()[1])
    assert state["pinned"].sharding == SingleDeviceSharding(jax.devices()[2])
    assert state["layer0/kernel"].sharding == NamedSharding(mesh, P("data", "model"))
    assert state["layer1/bias"].sharding == NamedSharding(mesh, P("model"))
    assert state.placement("step").source == "device="
    assert state.placement("stats").source == "placement block"
    assert state.placement("layer1/bias").source == "sharding="
    assert state.placement("layer0/kernel").source == "rule 0 ('.*/kernel$')"
    assert str(state.placement("step")) == "cpu:0 (from device=)"


def test_without_rules_variables_go_to_the_default_device():
    def m(s):
        s.variable("v", inits.zeros, (4,))

    state = jstate.init(m, KEY)
    assert state.placement("v").source == "default"
    assert state["v"].sharding == SingleDeviceSharding(jax.devices()[0])


def test_variables_are_created_sharded_not_gathered(mesh):
    state = jstate.init(model, KEY, mesh=mesh, rules=RULES)
    shards = state["layer0/kernel"].addressable_shards
    assert len(shards) == 8 and {s.data.shape for s in shards} == {(16, 16)}
    from jstate.model.programs import initializer_program

    spec = state.spec("layer0/kernel")
    program = initializer_program(inits.glorot_uniform(), spec.shape, spec.dtype, spec.sharding)
    compiled = program.lower(KEY, np.zeros(2, np.uint32)).compile()
    assert compiled.output_shardings == NamedSharding(mesh, P("data", "model"))


def test_initial_values_are_the_same_whatever_the_mesh_or_rules(mesh):
    other = jax.make_mesh((2, 4), ("data", "model"))
    a = jstate.init(model, KEY, mesh=mesh, rules=RULES)
    b = jstate.init(model, KEY, mesh=other, rules=[(r".*", P())])
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))


def test_assign_keeps_placement_eagerly(mesh):
    state = jstate.init(model, KEY, mesh=mesh, rules=RULES)
    out = state.assign("layer0/kernel", np.ones((64, 32), np.float32)).assign("step", jnp.int32(3))
    assert out["layer0/kernel"].sharding == NamedSharding(mesh, P("data", "model"))
    assert out["step"].sharding == SingleDeviceSharding(jax.devices()[0])


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_assign_keeps_placement_under_jit(axis_type):
    types = (jax.sharding.AxisType.Explicit if axis_type == "explicit" else jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=types)
    state = jstate.init(mesh_model, KEY, mesh=mesh, rules=RULES)

    @jax.jit
    def step(s):
        return s.assign("layer0/kernel", jnp.ones((64, 32))).assign_add("layer1/bias", 1.0)

    out = step(state)
    assert out["layer0/kernel"].sharding == NamedSharding(mesh, P("data", "model"))
    assert out["layer1/bias"].sharding.spec == P("model")
    assert out["scale"].sharding.is_fully_replicated


def test_derived_variables_are_placed_too(mesh):
    state = jstate.init(mesh_model, KEY, mesh=mesh, rules=[(r"scale", P("model")), (r".*", P())])
    assert state["scale"].sharding == NamedSharding(mesh, P("model"))
    np.testing.assert_array_equal(state["scale"], 2 * np.ones(32))


def test_replace_placement_moves_a_whole_state(mesh):
    state = jstate.init(model, KEY, mesh=mesh, rules=RULES)
    other = jax.make_mesh((8,), ("model",))
    moved = state.replace_placement(mesh=other, rules=[(r".*/kernel$", P(None, "model"))])
    assert moved["layer0/kernel"].sharding == NamedSharding(other, P(None, "model"))
    assert moved["layer0/bias"].sharding == NamedSharding(other, P("model"))  # declared spec, new mesh
    assert moved["step"].sharding == state["step"].sharding  # pinned stays
    np.testing.assert_array_equal(moved["layer0/kernel"], state["layer0/kernel"])


def test_abstract_specs_carry_shardings(mesh):
    abstract = jstate.abstract(model, mesh=mesh, rules=RULES)
    struct = abstract.spec("layer0/kernel").struct()
    assert struct.sharding == NamedSharding(mesh, P("data", "model"))
    assert abstract.structs()["step"].sharding == SingleDeviceSharding(jax.devices()[0])


def test_explain_placement_table(mesh):
    table = jstate.explain_placement(model, mesh=mesh, rules=RULES)
    rows = {r[0]: r for r in table.rows}
    assert rows["layer0/kernel"][3] == "P('data', 'model') over mesh(data=4, model=2)"
    assert rows["layer0/kernel"][4] == "1.0 KiB"  # 64*32*4 bytes / 8 devices
    assert rows["stats"][5] == "placement block"
    assert "bytes/device" in str(table) and "<table>" in table._repr_html_()


# -- errors --------------------------------------------------------------------------------


def one(spec=None, shape=(8,), **kw):
    def m(s):
        s.variable("w", inits.zeros, shape, sharding=spec, **kw)

    return m


def test_partition_spec_axis_missing_from_mesh(mesh):
    with pytest.raises(
        jstate.PlacementError,
        match="Variable 'w': PartitionSpec .* uses mesh axis 'batch', but the mesh has axes \\('data', 'model'\\)",
    ):
        jstate.abstract(one(P("batch")), mesh=mesh)


def test_dimension_not_divisible_by_mesh_axis(mesh):
    with pytest.raises(
        jstate.PlacementError, match=r"Variable 'w' of shape \(6,\): dimension 0 \(size 6\) is not divisible by 4"
    ):
        jstate.abstract(one(P("data"), shape=(6,)), mesh=mesh)


def test_partition_spec_longer_than_rank(mesh):
    with pytest.raises(jstate.PlacementError, match="'w' has shape \\(8,\\) \\(1 dims\\) but PartitionSpec"):
        jstate.abstract(one(P("data", "model")), mesh=mesh)


def test_rule_regex_that_does_not_compile():
    with pytest.raises(jstate.PlacementError, match=r"Placement rule 1: the pattern '\(\[' does not compile"):
        jstate.abstract(one(), rules=[(".*", None), ("([", P())])


def test_partition_spec_without_mesh():
    with pytest.raises(jstate.PlacementError, match="'w' is placed with PartitionSpec .* but no mesh was given"):
        jstate.abstract(one(P("data")))


@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto])
@pytest.mark.parametrize("spec", [P("data"), P("data", None)])
def test_jitted_steps_keep_the_very_same_sharding(axis_type, spec):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)

    def m(s):
        s.variable("w", inits.ones, (8, 4), sharding=spec)

    state = jstate.init(m, KEY, mesh=mesh)
    out = jax.jit(lambda s: s.assign_add("w", 1.0))(state)
    assert out["w"].sharding == state["w"].sharding == state.placement("w").sharding
