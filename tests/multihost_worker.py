"""One JAX process of a multi-process test (started by tests/test_multihost.py).

Usage: python multihost_worker.py PORT PROCESS_ID NUM_PROCESSES SCENARIO WORKDIR
Prints one JSON line of results on success.
"""

import json
import os
import sys

port, process_id, num_processes, scenario, workdir = sys.argv[1:]
process_id, num_processes = int(process_id), int(num_processes)
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // num_processes}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    f"127.0.0.1:{port}",
    num_processes,
    process_id,
    initialization_timeout=60,
    heartbeat_timeout_seconds=10,
    shutdown_timeout_seconds=10,
)

import jstate  # noqa: E402

RULES = [(r"kernel$", P("data", "model")), (r"bias$", P("model")), (r".*", P())]


def model(s):
    for i in range(3):
        layer = s.scope(f"layer{i}")
        layer.variable("kernel", jstate.initializers.normal(1.0), (16, 32))
        layer.variable("bias", jstate.initializers.normal(1.0), (32,))


def sums(state):
    # A jitted reduction gives every process the global value of a sharded array.
    return {n: float(jax.jit(jnp.sum)(state[n])) for n in state}


def run_save():
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    state = jstate.init(model, jax.random.key(0), mesh=mesh, rules=RULES)
    kernel = state["layer0/kernel"]
    local = {
        "fully_addressable": kernel.is_fully_addressable,
        "local_shards": len(kernel.addressable_shards),
        "local_devices": sorted({d.process_index for d in kernel.sharding.addressable_devices}),
    }
    saver = jstate.Saver(max_to_keep=2, timeout=30)
    saver.save(state, f"{workdir}/model", step=1)
    path = saver.save(state, f"{workdir}/model", step=2)
    latest = jstate.latest_checkpoint(workdir)
    same = saver.restore(latest, jstate.abstract(model, mesh=mesh, rules=RULES))
    other_mesh = jax.make_mesh((4, 2), ("data", "model"))
    other = saver.restore(latest, jstate.abstract(model, mesh=other_mesh, rules=RULES))
    # Rows split over (model, data): no process holds a saved region whole; one checks it on the host.
    from jstate import _integrity

    host_checked = []
    real_verify_host = _integrity.verify_host
    _integrity.verify_host = lambda arrays, digests: (
        host_checked.append(sorted(digests)) or real_verify_host(arrays, digests)
    )
    crossed_rules = [(r"kernel$", P(("model", "data"), None)), (r"bias$", P("model")), (r".*", P())]
    crossed = saver.restore(latest, jstate.abstract(model, mesh=mesh, rules=crossed_rules))
    _integrity.verify_host = real_verify_host
    pinned = jstate.abstract(lambda s: s.variable("x", jstate.initializers.zeros, (2,), device="/job:worker/task:1"))
    return {
        **local,
        "path": path,
        "latest": latest,
        "sums": sums(state),
        "same": sums(same),
        "other": sums(other),
        "other_spec": str(other["layer0/kernel"].sharding.spec),
        "crossed": sums(crossed),
        "host_checked": host_checked,
        "task1_process": next(iter(pinned.spec("x").sharding.device_set)).process_index,
    }


def run_kill():
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    state = jstate.init(model, jax.random.key(0), mesh=mesh, rules=RULES)
    saver = jstate.Saver(timeout=15)
    saver.save(state, f"{workdir}/model", step=1)
    print(json.dumps({"saved": 1}), flush=True)
    sharding = jax.sharding.NamedSharding(mesh, P("data"))
    zeros = jax.jit(lambda: jnp.zeros((64, 1024, 1024), jnp.float32), out_shardings=sharding)()
    big = jstate.State.from_tree({"big": zeros})
    if process_id == 1:
        saver.save(big.merge(state), f"{workdir}/model", step=2, blocking=False)
        os._exit(9)  # killed mid-save
    saver.save(big.merge(state), f"{workdir}/model", step=2)  # must fail, not hang
    return {"unexpected": "save completed without its peer"}


print(json.dumps({"save": run_save, "kill": run_kill}[scenario]()), flush=True)
jax.distributed.shutdown()
