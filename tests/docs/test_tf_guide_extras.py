"""The rest of TF's guide: reshaping (`redeclare`), round-robin and soft placement, trainable
variables, and the smaller edges (a State given to `Saver`, scopes in `subset`, rules that
match nothing)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import jstate
from jstate import initializers as inits

KEY = jax.random.key(0)
DEVICES = jax.devices()


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((4, 2), ("data", "model"))


def on(i):
    return SingleDeviceSharding(DEVICES[i])


# -- redeclare: reshaping, explicitly ---------------------------------------------------------


def mlp(s):
    s.variable("w", inits.normal(0.1), (8, 4))
    s.variable("b", inits.zeros, (4,), sharding=P("model"))
    s.variable("pinned", inits.ones, (3,), device="cpu:3")
    s.variable("free", inits.zeros, (5,))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_redeclare_changes_shape_and_dtype_and_leaves_the_original(mesh, jit):
    state = jstate.init(mlp, KEY, mesh=mesh, rules=[("w", P("data"))]).subset(["w", "b"])
    redeclare = lambda s: s.redeclare("w", jnp.ones((12, 4), jnp.bfloat16))  # noqa: E731
    out = jax.jit(redeclare)(state) if jit else redeclare(state)
    assert out.spec("w").shape == (12, 4) and out.spec("w").dtype == jnp.bfloat16
    assert out["w"].shape == (12, 4) and out["w"].dtype == jnp.bfloat16
    assert state.spec("w").shape == (8, 4) and state["w"].shape == (8, 4)  # unchanged
    # The rule's PartitionSpec is re-derived for the new shape.
    assert out["w"].sharding == out.spec("w").sharding and out["w"].sharding.spec[0] == "data"
    assert out.placement("w").source == "rule 0 ('w')" and out.placement("w").request == P("data")
    np.testing.assert_array_equal(out["b"], state["b"])


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_redeclare_rechecks_a_declared_partition_spec(mesh, jit):
    state = jstate.init(mlp, KEY, mesh=mesh, rules=[(".", P())]).subset(["w", "b"])
    ok = state.redeclare("b", jnp.zeros(6))
    assert ok["b"].sharding == NamedSharding(mesh, P("model")) and ok.placement("b").source == "sharding="
    bad = lambda s: s.redeclare("b", jnp.zeros(5))  # noqa: E731
    with pytest.raises(
        jstate.PlacementError,
        match=r"Cannot redeclare variable 'b' from shape \(4,\) to \(5,\): its placement P\('model',\) over "
        r"mesh\(data=4, model=2\) \(from sharding=\) cannot hold the new shape\. .*not divisible by 2",
    ):
        jax.jit(bad)(state) if jit else bad(state)


def test_redeclare_rechecks_a_rule_placement(mesh):
    state = jstate.init(mlp, KEY, mesh=mesh, rules=[("w", P("data", "model")), (".", P())])
    with pytest.raises(jstate.PlacementError, match=r"'w' from shape \(8, 4\) to \(8, 3\).*from rule 0 \('w'\)"):
        state.redeclare("w", jnp.zeros((8, 3)))


def test_redeclare_keeps_a_single_device_and_the_default(mesh):
    state = jstate.init(mlp, KEY, mesh=mesh)
    out = state.redeclare("pinned", np.arange(7, dtype=np.int32)).redeclare("free", 2.5)
    assert out["pinned"].sharding == on(3) and out.spec("pinned").dtype == np.int32
    assert out.spec("free").shape == () and out.spec("free").dtype == np.float32
    assert not out["free"].weak_type  # a Python scalar gets a fixed dtype, as in `assign`
    assert out.placement("pinned").source == "device=" and out.placement("free").source == "default"


def test_assign_still_refuses_another_shape_and_points_to_redeclare(mesh):
    state = jstate.init(mlp, KEY, mesh=mesh)
    with pytest.raises(
        jstate.SpecMismatchError,
        match=r"declared shape \(8, 4\) and dtype float32, given shape \(9, 4\).*`state.redeclare\('w', value\)`",
    ):
        state.assign("w", jnp.zeros((9, 4)))


def test_redeclare_an_undeclared_name_is_an_error():
    state = jstate.State({"w": jnp.zeros(2)})
    with pytest.raises(jstate.UnknownVariableError, match="Variable 'ww' is not declared. Did you mean 'w'"):
        state.redeclare("ww", jnp.zeros(3))


def test_a_redeclared_variable_saves_and_restores_with_its_new_shape(tmp_path):
    state = jstate.State({"w": jnp.zeros(2)}).redeclare("w", jnp.arange(5.0))
    path = jstate.Saver().save(state, tmp_path / "ckpt")
    assert jstate.list_variables(path) == [("w", (5,), np.dtype("float32"))]
    with pytest.raises(jstate.SpecMismatchError):
        jstate.Saver().restore(path, jstate.State({"w": jnp.zeros(2)}))
    np.testing.assert_array_equal(jstate.Saver().restore(path, state)["w"], np.arange(5.0))


# -- round-robin placement: replica_device_setter ---------------------------------------------


def spread_model(spread):
    def model(s):
        with s.placement(spread):
            s.variable("big", inits.zeros, (1000,))
            for name in "abcd":
                s.variable(name, inits.ones, (10,))
        s.variable("local", inits.zeros, (2,), device="cpu:7")

    return model


def test_round_robin_by_order_places_in_declaration_order():
    state = jstate.init(spread_model(jstate.round_robin(["cpu:0", "cpu:1", "cpu:2"])), KEY)
    where = {n: state[n].sharding for n in state}
    assert where == {"big": on(0), "a": on(1), "b": on(2), "c": on(0), "d": on(1), "local": on(7)}
    assert state.placement("c").source == "placement block, round-robin by order"
    assert str(state.placement("c")) == "cpu:0 (from placement block, round-robin by order)"
    np.testing.assert_array_equal(state["c"], np.ones(10))


def test_round_robin_by_size_puts_each_variable_on_the_least_loaded_device():
    model = spread_model(jstate.round_robin(["cpu:0", "cpu:1", "cpu:2"], by="size"))
    state = jstate.init(model, KEY)
    assert [state[n].sharding for n in ("big", "a", "b", "c", "d")] == [on(0), on(1), on(2), on(1), on(2)]
    rows = [row.split(maxsplit=5) for row in str(jstate.explain_placement(model)).splitlines()[2:]]
    assert ["big", "(1000,)", "float32", "cpu:0", "3.9", "KiB       placement block, round-robin by size"] in rows
    assert ["c", "(10,)", "float32", "cpu:1", "40", "B          placement block, round-robin by size"] in rows


def test_round_robin_as_a_rule_target_and_with_devices():
    spread = jstate.round_robin([DEVICES[5], DEVICES[6]])

    def model(s):
        for i in range(3):
            s.scope(f"ps{i}").variable("table", inits.zeros, (4,))
        s.variable("head", inits.zeros, (4,))

    state = jstate.init(model, KEY, rules=[(r"^ps\d/", spread)])
    assert [state[f"ps{i}/table"].sharding for i in range(3)] == [on(5), on(6), on(5)]
    assert state.placement("ps1/table").source == r"rule 0 ('^ps\\d/'), round-robin by order"
    assert state.placement("head").source == "default"


def test_equal_round_robins_continue_one_rotation():
    def model(s):
        with s.placement(jstate.round_robin(["cpu:1", "cpu:2"])):
            s.variable("a", inits.zeros, (1,))
        s.variable("b", inits.zeros, (1,))

    state = jstate.abstract(model, rules=[("b", jstate.round_robin(["cpu:1", "cpu:2"]))])
    assert state.spec("a").sharding == on(1) and state.spec("b").sharding == on(2)


def test_round_robin_over_parameter_server_tasks():
    state = jstate.init(spread_model(jstate.round_robin(["/job:ps/task:0", "/job:ps/task:0/device:CPU:4"])), KEY)
    assert [state[n].sharding for n in ("big", "a", "b")] == [on(0), on(4), on(0)]


def test_round_robin_is_the_same_for_init_abstract_and_only():
    model = spread_model(jstate.round_robin(["cpu:0", "cpu:1", "cpu:2"], by="size"))
    full = jstate.init(model, KEY)
    partial = jstate.init(model, KEY, only=["c"])
    assert partial["c"].sharding == full["c"].sharding == jstate.abstract(model).spec("c").sharding


def test_round_robin_spreads_again_in_name_order_on_replace_placement():
    state = jstate.init(lambda s: [s.variable(n, inits.zeros, (2,)) for n in "cab"], KEY)
    moved = state.replace_placement(rules=[(".", jstate.round_robin(["cpu:3", "cpu:4"]))])
    assert [moved[n].sharding for n in "abc"] == [on(3), on(4), on(3)]
    assert moved.redeclare("a", jnp.zeros(9))["a"].sharding == on(3)  # a device already chosen is kept


@pytest.mark.parametrize(
    "args, message",
    [
        (("cpu:0",), r"takes a list of devices, got 'cpu:0'. Write `round_robin\(\['cpu:0', ...\]\)`"),
        (([],), "needs at least one device"),
        (([P("x")],), r"device P\('x',\) \(P\) is not a device spec"),
        ((["cpu:0"], "bytes"), r'`round_robin\(..., by=\'bytes\'\)`: `by` is "order" or "size"'),
    ],
)
def test_round_robin_rejects_what_it_cannot_spread_over(args, message):
    with pytest.raises(jstate.PlacementError, match=message):
        jstate.round_robin(*args)


# -- soft placement: allow_soft_placement ------------------------------------------------------


def gpu_model(s):
    s.variable("on_gpu", inits.ones, (3,), device="/gpu:0")
    with s.placement("/job:ps/task:7"):
        s.variable("on_ps7", inits.zeros, (2,))
    s.variable("on_cpu", inits.zeros, (2,), device="cpu:2")


def test_a_missing_device_is_an_error_that_mentions_soft_placement():
    with pytest.raises(
        jstate.PlacementError,
        match=r"Variable 'on_gpu': device spec '/gpu:0' matches no device\. Devices: cpu:0 .*"
        r"Pass `soft_placement=True` to `jstate.init`",
    ):
        jstate.init(gpu_model, KEY)


def test_soft_placement_falls_back_to_the_default_device_with_a_warning():
    with pytest.warns(UserWarning) as caught:
        state = jstate.init(gpu_model, jax.random.key(11), soft_placement=True)
    messages = [str(w.message) for w in caught]
    assert messages == [
        "Variable 'on_gpu': device spec '/gpu:0' matches no device; soft placement puts it on the default "
        "device (cpu:0).",
        "Variable 'on_ps7': device spec '/job:ps/task:7' matches no device; soft placement puts it on the "
        "default device (cpu:0).",
    ]
    assert state["on_gpu"].sharding == on(0) and state["on_cpu"].sharding == on(2)
    np.testing.assert_array_equal(state["on_gpu"], np.ones(3))
    assert state.placement("on_gpu").source == "device=, soft placement: '/gpu:0' matches no device"
    assert state.placement("on_gpu").fallback == "/gpu:0" and state.placement("on_gpu").sharding is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = str(jstate.explain_placement(gpu_model, soft_placement=True))
    assert "on_ps7  (2,)   float32  default   8 B           placement block, soft placement: '/job:ps/task:7'" in table


def test_soft_placement_is_part_of_the_trace_cache_key():
    def model(s):
        s.variable("v", inits.zeros, (2,), device="gpu:0")

    with pytest.warns(UserWarning, match="soft placement"):
        assert jstate.abstract(model, soft_placement=True).spec("v").sharding is None
    with pytest.raises(jstate.PlacementError, match="matches no device"):
        jstate.abstract(model)  # not served from the soft trace
    with pytest.raises(jstate.PlacementError, match="matches no device"):
        jstate.init(model, KEY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert jstate.init(model, KEY, soft_placement=True)["v"].sharding == on(0)


def test_soft_placement_does_not_excuse_a_malformed_spec():
    with pytest.raises(jstate.PlacementError, match="'potato:1' is not understood"):
        jstate.abstract(lambda s: s.variable("v", inits.zeros, (2,), device="potato:1"), soft_placement=True)


def test_a_softly_placed_state_goes_through_jit():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = jstate.init(lambda s: s.variable("v", inits.ones, (2,), device="/gpu:0"), KEY, soft_placement=True)
    out = jax.jit(lambda s: s.assign_add("v", 1.0))(state)
    np.testing.assert_array_equal(out["v"], [2.0, 2.0])
    assert out.placement("v").fallback == "/gpu:0"


def test_soft_placement_of_a_round_robin_device():
    spread = jstate.round_robin(["cpu:1", "gpu:0"])
    with pytest.warns(UserWarning) as caught:
        state = jstate.abstract(spread_model(spread), soft_placement=True)
    assert [str(w.message).split(";")[0] for w in caught] == [
        "Variable 'a': device spec 'gpu:0' matches no device",
        "Variable 'c': device spec 'gpu:0' matches no device",
    ]
    assert state.spec("big").sharding == on(1) and state.spec("a").sharding is None
    assert state.spec("b").sharding == on(1)
    assert state.placement("a").source == (
        "placement block, round-robin by order, soft placement: 'gpu:0' matches no device"
    )


# -- trainable ---------------------------------------------------------------------------------


def regression(s):
    s.variable("w", inits.normal(1.0), (3,))
    s.variable("b", inits.zeros, ())
    s.variable("step", inits.zeros, (), jnp.int32, trainable=False)


X = jnp.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0], [-1.0, 0.0, 1.0], [2.0, 1.0, 0.0]])
Y = X @ jnp.array([0.5, -1.0, 2.0]) + 0.25


def loss(params):
    return jnp.mean((X @ params["w"] + params["b"] - Y) ** 2)


def train_step(state):
    params = state.trainable()
    grads = jax.grad(loss)(params)
    params = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
    return state.merge(params).assign_add("step", 1)


@pytest.mark.slow  # seconds of compiles: in CI, not the fast loop
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_a_training_step_differentiates_only_trainable_variables(jit):
    state = jstate.init(regression, KEY)
    assert state.spec("step").trainable is False and state.spec("w").trainable is True
    assert list(state.trainable()) == ["b", "w"] and list(state.non_trainable()) == ["step"]
    step = jax.jit(train_step, donate_argnums=0) if jit else train_step
    first = float(loss(state.trainable()))
    for _ in range(200):
        state = step(state)
    assert int(state["step"]) == 200 and state["step"].dtype == jnp.int32
    assert float(loss(state.trainable())) < first / 100
    assert state.spec("step").trainable is False  # the declaration travels through jit and merge


def test_trainable_is_declared_not_an_extra_option():
    state = jstate.abstract(regression)
    assert state.spec("step").options == ()
    assert state.trainable().uninitialized() == ["b", "w"]  # declared variables, initialized or not
    assert state.rename({"step": "global_step"}).spec("global_step").trainable is False
    with pytest.raises(jstate.ModelError, match="while declaring variable 'v'.*`trainable` is True or False, got 'no'"):
        jstate.abstract(lambda s: s.variable("v", inits.zeros, (2,), trainable="no"))


def test_restore_keeps_the_targets_trainable_flags(tmp_path):
    path = jstate.Saver().save(jstate.init(regression, KEY), tmp_path / "ckpt")
    restored = jstate.Saver().restore(path, jstate.abstract(regression))
    assert list(restored.non_trainable()) == ["step"]


# -- smaller ones ------------------------------------------------------------------------------


def test_a_state_given_to_saver_is_a_clear_error():
    state = jstate.init(regression, KEY)
    with pytest.raises(
        jstate.MappingError, match=r"`jstate.Saver\(state\)`: a Saver's `var_list` takes variable names"
    ):
        jstate.Saver(state)
    with pytest.raises(jstate.MappingError, match=r"'my_w' maps to an array of shape \(3,\) and dtype float32"):
        jstate.Saver({"my_w": state["w"]})
    with pytest.raises(jstate.MappingError, match=r"item an array of shape \(3,\) and dtype float32 is not a name"):
        jstate.Saver([state["w"]])


def layered(s):
    for i in range(2):
        s.scope("params").scope(f"layer{i}").variable("kernel", inits.ones, (2, 2))
    s.scope("opt").variable("count", inits.zeros, (), jnp.int32)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_subset_takes_scopes(jit):
    state = jstate.init(layered, KEY)
    pick = lambda s: s.subset(["params/", "opt/count", "params/layer0/kernel"])  # noqa: E731
    out = jax.jit(pick)(state) if jit else pick(state)
    assert list(out) == ["opt/count", "params/layer0/kernel", "params/layer1/kernel"]
    assert list(state.subset(["params/layer1/"])) == ["params/layer1/kernel"]


def test_subset_scope_that_matches_nothing_is_an_error():
    state = jstate.init(layered, KEY)
    with pytest.raises(
        jstate.UnknownVariableError, match=r"`subset`: scope 'param/' holds no variable\. Did you mean 'params/'"
    ):
        state.subset(["param/"])
    with pytest.raises(jstate.UnknownVariableError, match=r"takes declared names and scopes ending in '/'"):
        state.subset(["params"])
    with pytest.raises(TypeError, match=r"got the string 'opt/'\. Write \['opt/'\]"):
        state.subset("opt/")


def test_a_rule_that_matches_no_variable_is_an_error_naming_it():
    rules = [("kernel", "cpu:1"), ("kernal", "cpu:2"), ("bias", "cpu:3")]
    message = r"Placement rules 1 \('kernal'\) and 2 \('bias'\) match no variable of model `layered`"
    with pytest.raises(jstate.PlacementError, match=message):
        jstate.init(layered, KEY, rules=rules)
    with pytest.raises(jstate.PlacementError, match=message + r".*`unused_rules=\"warn\"`"):
        jstate.abstract(layered, rules=rules)  # a cached trace is checked too
    with pytest.raises(jstate.PlacementError, match=r"Placement rule 0 \('x'\) matches no variable"):
        jstate.explain_placement(layered, rules=[("x", "cpu:1")])


def test_unused_rules_can_warn_or_be_ignored():
    rules = [("kernel", "cpu:1"), ("kernal", "cpu:2")]
    with pytest.warns(UserWarning, match=r"Placement rule 1 \('kernal'\) matches no variable"):
        state = jstate.init(layered, KEY, rules=rules, unused_rules="warn")
    assert state["params/layer0/kernel"].sharding == on(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jstate.abstract(layered, rules=rules, unused_rules="ignore")
    with pytest.raises(ValueError, match='`unused_rules=` is "error", "warn" or "ignore", got \'silent\''):
        jstate.abstract(layered, rules=rules, unused_rules="silent")


def test_a_rule_whose_variables_are_placed_otherwise_still_matches():
    def model(s):
        s.variable("v", inits.zeros, (2,), device="cpu:4")

    assert jstate.abstract(model, rules=[("v", "cpu:1")]).spec("v").sharding == on(4)
