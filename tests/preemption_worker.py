"""A training loop under `jstate.Preemption` (started by tests/reliability/test_preemption.py), and the
training step the tests replay to compare with it.

Usage:
  python preemption_worker.py train DIR
      one process: trains (resuming from DIR's latest checkpoint if any) until preempted
  python preemption_worker.py multi DIR PORT PROCESS_ID NUM_PROCESSES SERVICE
      one of several JAX processes on loopback; SERVICE "jax" keeps JAX's preemption service,
      "coordinator" turns it off (the processes then agree through the key-value store)

Prints "ready" once a notice would be acted on, "step N" after each step, and
"saved PATH STEP CHECKSUM" when it saved for the preemption.
"""

from __future__ import annotations

import os
import sys
import zlib

if __name__ == "__main__" and sys.argv[1] == "multi":
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // int(sys.argv[5])}"
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jstate  # noqa: E402

MAX_STEPS = 1_000_000  # a preemption always comes first: the tests send it
optimizer = optax.adam(1e-2)


def initial_state():
    key = jax.random.key(0)
    params = {"w": jax.random.normal(key, (16, 8)) * 0.1, "b": jnp.zeros(8)}
    return {"params": params, "opt": optimizer.init(params), "step": jnp.int32(0)}


def train_step(state, batch_sharding=None):
    """One step of a regression on a batch that depends only on the step number."""
    key = jax.random.fold_in(jax.random.key(1), state["step"])
    x = jax.random.normal(key, (64, 16))
    if batch_sharding is not None:
        x = jax.lax.with_sharding_constraint(x, batch_sharding)  # a data-parallel step: gradients all-reduce
    y = jnp.sin(x @ jnp.arange(128.0).reshape(16, 8) / 100)

    def loss(params):
        return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)

    grads = jax.grad(loss)(state["params"])
    updates, opt = optimizer.update(grads, state["opt"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt": opt, "step": state["step"] + 1}


def checksum(state) -> str:
    """The exact bits of every leaf (the same on every process: all are replicated)."""
    leaves = [np.asarray(jax.device_get(leaf)).tobytes() for leaf in jax.tree.leaves(state)]
    return f"{zlib.crc32(b''.join(leaves)):08x}"


def run(directory, step_fn, state, first_step):
    saver = jstate.Saver(max_to_keep=2)
    with jstate.Preemption(saver, f"{directory}/model", grace=60) as preemption:
        print("ready", flush=True)
        for step in range(first_step, MAX_STEPS):
            state = step_fn(state)
            print(f"step {step}", flush=True)
            path = preemption.save_if_preempted(state, step)
            if path:
                print(f"saved {path} {step} {checksum(state)}", flush=True)
                break
        else:
            print("finished without a preemption", flush=True)


def train(directory):
    state, first_step = initial_state(), 0
    latest = jstate.latest_checkpoint(directory)
    if latest is not None:
        state = jstate.Saver().restore(latest, state)
        first_step = int(state["step"])
    run(directory, jax.jit(train_step), state, first_step)


def multi(directory, port, process_id, num_processes, service):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_preemption_service", service == "jax")
    jax.distributed.initialize(f"127.0.0.1:{port}", int(num_processes), int(process_id), initialization_timeout=60)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    state = jax.jit(initial_state, out_shardings=replicated)()
    step_fn = jax.jit(lambda s: train_step(s, batch), out_shardings=replicated)
    # One step in flight at a time: gloo's CPU all-reduces of several dispatched steps can deadlock.
    run(directory, lambda s: jax.block_until_ready(step_fn(s)), state, 0)
    jax.distributed.shutdown()


if __name__ == "__main__":
    {"train": train, "multi": multi}[sys.argv[1]](*sys.argv[2:])
