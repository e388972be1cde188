"""TensorFlow 1's "Variables" guide, snippet by snippet, each as a small jstate program.

Each test names the guide's section and the TF code it stands for.
"""

import contextlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jstate
from jstate import initializers as inits
from jstate.__main__ import main as jstate_command

KEY = jax.random.key(0)


def weights_and_biases(s):
    """weights = tf.Variable(tf.random_normal([784, 200], stddev=0.35), name="weights")
    biases = tf.Variable(tf.zeros([200]), name="biases")"""
    s.variable("weights", inits.normal(stddev=0.35), (784, 200))
    s.variable("biases", inits.zeros, (200,))


def v1_v2(s):
    """v1 = tf.Variable(..., name="v1"); v2 = tf.Variable(..., name="v2")"""
    s.variable("v1", inits.normal(1.0), (3,))
    s.variable("v2", inits.uniform(minval=-1.0, maxval=1.0), (5,))


def layers(n):
    def model(s):
        for i in range(1, n + 1):
            s.scope(f"layer{i}").variable("kernel", inits.glorot_uniform(), (8, 8))
            s.scope(f"layer{i}").variable("bias", inits.zeros, (8,))

    return model


def has_gpu():
    with contextlib.suppress(RuntimeError):
        return bool(jax.devices("gpu"))
    return False


# -- Creation ----------------------------------------------------------------------------------


def test_creation_with_an_initial_value_op():
    state = jstate.init(weights_and_biases, KEY)
    assert state["weights"].shape == (784, 200) and state["weights"].dtype == jnp.float32
    assert abs(float(state["weights"].std()) - 0.35) < 0.01
    assert (state["biases"] == 0).all()


def test_creation_shape_is_fixed_but_can_be_reshaped_explicitly():
    """ "Variables generally have a fixed shape, but TensorFlow provides advanced mechanisms to
    reshape variables": `tf.Variable(..., validate_shape=False)` then `tf.assign`."""
    state = jstate.init(weights_and_biases, KEY)
    with pytest.raises(jstate.SpecMismatchError, match="state.redeclare"):
        state.assign("biases", jnp.zeros(300))
    wider = state.redeclare("biases", jnp.zeros(300))
    assert wider.spec("biases").shape == (300,) and wider["biases"].shape == (300,)


# -- Device placement --------------------------------------------------------------------------


def test_pin_a_variable_to_cpu():
    """with tf.device("/cpu:0"): v = tf.Variable(...)"""

    def model(s):
        with s.placement("/cpu:0"):
            s.variable("v", inits.zeros, (2,))

    state = jstate.init(model, KEY)
    assert state["v"].devices() == {jax.devices("cpu")[0]}
    assert state.placement("v").source == "placement block"


def test_pin_a_variable_to_gpu():
    """with tf.device("/gpu:0"): v = tf.Variable(...); a CPU-only machine needs
    ``allow_soft_placement``, jstate's ``soft_placement=True``."""

    def model(s):
        with s.placement("/gpu:0"):
            s.variable("v", inits.zeros, (2,))

    if has_gpu():
        assert jstate.init(model, KEY)["v"].devices() == {jax.devices("gpu")[0]}
        return
    with pytest.raises(jstate.PlacementError, match="'/gpu:0' matches no device.*soft_placement=True"):
        jstate.init(model, KEY)
    with pytest.warns(UserWarning, match="Variable 'v': device spec '/gpu:0' matches no device"):
        state = jstate.init(model, KEY, soft_placement=True)
    assert state["v"].devices() == {jax.devices()[0]}


def test_pin_a_variable_to_a_parameter_server_task():
    """with tf.device("/job:ps/task:7"): v = tf.Variable(...); task N is JAX process N."""

    def model(s):
        with s.placement(f"/job:ps/task:{jax.process_count() - 1}"):
            s.variable("v", inits.zeros, (2,))
        with s.placement("/job:ps/task:7"):
            s.variable("far", inits.zeros, (2,))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = jstate.init(model, KEY, soft_placement=True)  # one process here: no task 7
    assert state["v"].devices() == {jax.devices()[0]}
    assert [str(w.message).split(";")[0] for w in caught] == [
        "Variable 'far': device spec '/job:ps/task:7' matches no device"
    ]


def test_mutating_ops_run_where_the_variable_lives():
    """ "Operations that mutate a variable ... must run on the same device as the variable"."""
    state = jstate.init(lambda s: s.variable("v", inits.zeros, (2,), device="cpu:3"), KEY)
    assert state.assign_add("v", 1.0)["v"].devices() == {jax.devices()[3]}


def test_replica_device_setter():
    """with tf.device(tf.train.replica_device_setter(ps_tasks=2)): variables round-robin over
    the parameter servers (here, two devices)."""

    def model(s):
        with s.placement(jstate.round_robin(["cpu:0", "cpu:1"])):
            layers(3)(s)

    table = jstate.explain_placement(model)
    where = {row[0]: row[3] for row in table.rows}
    assert where == {f"layer{i}/{v}": d for i in (1, 2, 3) for v, d in (("kernel", "cpu:0"), ("bias", "cpu:1"))}
    assert {row[5] for row in table.rows} == {"placement block, round-robin by order"}


# -- Initialization ----------------------------------------------------------------------------


def test_global_variables_initializer():
    """init_op = tf.global_variables_initializer(); sess.run(init_op)"""
    before = jstate.abstract(weights_and_biases)
    assert jstate.report_uninitialized(before) == ["biases", "weights"]
    with pytest.raises(jstate.UninitializedError, match="'weights' is declared but not initialized"):
        before["weights"]
    state = jstate.init(weights_and_biases, KEY)
    assert jstate.report_uninitialized(state) == []


def test_initialization_from_another_variable():
    """w2 = tf.Variable(weights.initialized_value(), name="w2")
    w_twice = tf.Variable(weights.initialized_value() * 2.0, name="w_twice")"""

    def model(s):
        weights = s.variable("weights", inits.normal(stddev=0.35), (784, 200))
        s.variable("w2", weights)
        s.variable("w_twice", weights * 2.0)

    state = jstate.init(model, KEY)
    np.testing.assert_array_equal(state["w2"], state["weights"])
    np.testing.assert_array_equal(state["w_twice"], 2.0 * np.asarray(state["weights"]))


def test_custom_initialization_of_a_list_of_variables():
    """sess.run(tf.variables_initializer([biases])), then the rest."""
    partial = jstate.init(weights_and_biases, KEY, only=["biases"])
    assert partial.uninitialized() == ["weights"] and partial.is_initialized("biases")
    full = jstate.init(weights_and_biases, KEY, state=partial)
    assert full.uninitialized() == []
    np.testing.assert_array_equal(full["weights"], jstate.init(weights_and_biases, KEY)["weights"])


def test_report_uninitialized_variables():
    """tf.report_uninitialized_variables()"""
    state = jstate.init(layers(2), KEY, only=["layer1/kernel", "layer1/bias"])
    assert jstate.report_uninitialized(state) == ["layer2/bias", "layer2/kernel"]
    assert state.subset(["layer2/"]).uninitialized() == ["layer2/bias", "layer2/kernel"]


# -- Saving and restoring ----------------------------------------------------------------------


def test_saving_variables(tmp_path):
    """saver = tf.train.Saver(); save_path = saver.save(sess, "/tmp/model.ckpt")"""
    state = jstate.init(v1_v2, KEY)
    save_path = jstate.Saver().save(state, tmp_path / "model.ckpt")
    assert save_path == str(tmp_path / "model.ckpt")
    assert [name for name, _, _ in jstate.list_variables(save_path)] == ["v1", "v2"]


def test_restoring_variables_without_initializing_them(tmp_path):
    """saver.restore(sess, "/tmp/model.ckpt"): no initialization needed beforehand."""
    state = jstate.init(v1_v2, KEY).assign("v1", jnp.arange(3.0))
    path = jstate.Saver().save(state, tmp_path / "model.ckpt")
    restored = jstate.Saver().restore(path, jstate.abstract(v1_v2))
    assert restored.uninitialized() == []
    for name in ("v1", "v2"):
        np.testing.assert_array_equal(restored[name], state[name])


def test_save_and_restore_one_variable_under_another_name(tmp_path):
    """saver = tf.train.Saver({"my_v2": v2}); the others are initialized separately."""
    state = jstate.init(v1_v2, KEY)
    saver = jstate.Saver({"my_v2": "v2"})
    path = saver.save(state, tmp_path / "model.ckpt")
    assert [name for name, _, _ in jstate.list_variables(path)] == ["my_v2"]
    restored = saver.restore(path, jstate.abstract(v1_v2))
    assert restored.uninitialized() == ["v1"]  # "you have to run an initialize op for the other variables"
    restored = jstate.init(v1_v2, jax.random.key(1), state=restored)
    np.testing.assert_array_equal(restored["v2"], state["v2"])


def test_restore_weights_into_a_variable_named_params(tmp_path):
    """A variable trained as "weights" restored into a new variable named "params"."""
    trained = jstate.init(weights_and_biases, KEY)
    path = jstate.Saver().save(trained, tmp_path / "trained")

    def new_model(s):
        s.variable("params", inits.zeros, (784, 200))

    restored = jstate.Saver({"weights": "params"}).restore(path, jstate.abstract(new_model))
    np.testing.assert_array_equal(restored["params"], trained["weights"])


def test_restore_five_layers_into_the_first_five_of_six(tmp_path):
    """Train 5 layers, then restore them into the first 5 layers of a 6-layer model."""
    five = jstate.init(layers(5), KEY)
    path = jstate.Saver().save(five, tmp_path / "five")
    saver = jstate.Saver([f"layer{i}/" for i in range(1, 6)])
    six = saver.restore(path, jstate.abstract(layers(6)))
    assert six.uninitialized() == ["layer6/bias", "layer6/kernel"]
    six = jstate.init(layers(6), jax.random.key(1), state=six)
    np.testing.assert_array_equal(six["layer5/kernel"], five["layer5/kernel"])


def test_several_savers_share_a_variable(tmp_path):
    """ "The same variable can be listed in multiple saver objects; its value is only changed when
    the saver restore() method is run"."""
    state = jstate.init(v1_v2, KEY)
    both, only_v2 = jstate.Saver(["v1", "v2"]), jstate.Saver(["v2"])
    path = only_v2.save(state.assign("v2", jnp.ones(5)), tmp_path / "v2")
    both_path = both.save(state, tmp_path / "both")
    np.testing.assert_array_equal(state["v2"], jstate.init(v1_v2, KEY)["v2"])  # saving changed nothing
    restored = only_v2.restore(path, state)
    np.testing.assert_array_equal(restored["v2"], np.ones(5))
    np.testing.assert_array_equal(both.restore(both_path, restored)["v2"], state["v2"])


# -- Checkpoint files --------------------------------------------------------------------------


def test_inspect_a_checkpoint(tmp_path, capsys):
    """inspect_checkpoint.print_tensors_in_checkpoint_file("/tmp/model.ckpt", tensor_name="", all_tensors=True)"""
    state = jstate.init(v1_v2, KEY).assign("v1", jnp.array([1.0, 2.0, 3.0]))
    path = jstate.Saver().save(state, tmp_path / "model.ckpt")
    assert jstate.list_variables(path) == [("v1", (3,), np.dtype("float32")), ("v2", (5,), np.dtype("float32"))]
    np.testing.assert_array_equal(jstate.load_variable(path, "v1"), [1.0, 2.0, 3.0])
    assert jstate_command(["inspect", path, "--values", "--name", "v1"]) == 0
    out = capsys.readouterr().out
    assert "tensor_name: v1  shape: (3,)  dtype: float32" in out and "[1. 2. 3.]" in out
