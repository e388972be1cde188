"""``jstate tour``: TensorFlow 1's "Variables" guide, section by section, in jstate."""

from __future__ import annotations

import tempfile
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

import jstate
from jstate import initializers as init


def _section(title: str, text: str) -> None:
    print(f"\n== {title} ==\n" + textwrap.fill(text, 96))


def model(s: jstate.Scope) -> None:
    """The guide's variables, declared in a pure function."""
    weights = s.variable("weights", init.normal(stddev=0.35), (784, 200))
    s.variable("biases", init.zeros, (200,))
    s.variable("w2", weights)  # TF: weights.initialized_value()
    s.variable("w_twice", weights * 2.0)


def layers(n: int):
    def model(s: jstate.Scope) -> None:
        for i in range(1, n + 1):
            layer = s.scope(f"layer{i}")
            layer.variable("kernel", init.glorot_uniform(), (32, 32))
            layer.variable("bias", init.zeros, (32,))

    return model


def tour() -> None:
    key = jax.random.key(0)
    _section(
        "Creation",
        "Variables are declared in a pure function; `jstate.init` runs their initializers as compiled XLA code.",
    )
    state = jstate.init(model, key)
    print(state)

    _section("Device placement", "`device=`, `with s.placement(...)` and name rules pin or shard variables.")
    devices = jax.devices()
    print(f"devices: {[f'{d.platform}:{d.id}' for d in devices]}")

    def placed(s):
        s.variable("step", init.zeros, (), jnp.int32, device="cpu:0")
        with s.placement(f"cpu:{len(devices) - 1}"):
            s.variable("stats", init.zeros, (10,))

    print(jstate.explain_placement(placed))

    _section("Initialization", "`init` initializes everything; `abstract` declares without computing anything.")
    abstract = jstate.abstract(model)
    print("uninitialized in abstract:", jstate.report_uninitialized(abstract))

    _section("Initialization from another variable", "w2 starts equal to weights, w_twice at twice it.")
    assert np.array_equal(state["w2"], state["weights"])
    assert np.allclose(state["w_twice"], 2 * state["weights"])
    print("w2 == weights and w_twice == 2 * weights: ok")

    _section("Custom initialization", "`only=` initializes a subset; `state=` fills in the rest.")
    partial = jstate.init(model, key, only=["w2"])
    print("uninitialized:", partial.uninitialized())
    full = jstate.init(model, key, state=partial)
    print("after init(state=partial):", jstate.report_uninitialized(full))

    with tempfile.TemporaryDirectory() as tmp:
        _section("Saving", "A Saver writes an Orbax checkpoint atomically and returns its path.")
        saver = jstate.Saver()
        path = saver.save(state, f"{tmp}/model", step=1)
        print("saved to", path)

        _section("Restoring", "Restore into an abstract State: no initialization needed first.")
        restored = saver.restore(path, jstate.abstract(model))
        assert all(np.array_equal(restored[n], state[n]) for n in state)
        print("restored", len(restored), "variables, equal to the saved ones")

        _section("Choosing which variables to save and restore", "Save v2 only, as 'my_v2'.")
        small = jstate.Saver({"my_v2": "w2"})
        print(jstate.list_variables(small.save(state, f"{tmp}/small")))

        _section("Five layers into six", "Restore layers 1-5 from a 5-layer checkpoint, initialize layer 6.")
        five = jstate.init(layers(5), key)
        ckpt = jstate.Saver().save(five, f"{tmp}/five")
        six = jstate.Saver([f"layer{i}/" for i in range(1, 6)]).restore(ckpt, jstate.abstract(layers(6)))
        print("after restore, uninitialized:", six.uninitialized())
        six = jstate.init(layers(6), key, state=six)
        assert np.array_equal(six["layer3/kernel"], five["layer3/kernel"])
        print("layers 1-5 equal the old model; layer 6 initialized")

        _section("Inspecting a checkpoint", "Reads metadata only (also `python -m jstate inspect PATH`).")
        from jstate.checkpoint.inspect import inspect_checkpoint

        inspect_checkpoint(path)
    print("\nTour complete.")
