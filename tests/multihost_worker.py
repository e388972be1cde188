"""One JAX process of a multi-process test (started by `multihost.run_processes`, for
tests/checkpoint/test_multihost.py and tests/cloud/test_cloud_checkpoints.py).

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
import numpy as np  # noqa: E402
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
    from jstate.formats import integrity as _integrity

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
    # The first save has both processes: no short timeout, which a loaded machine could spend at a
    # barrier. The second, whose peer dies, must fail within the short one.
    jstate.Saver().save(state, f"{workdir}/model", step=1)
    saver = jstate.Saver(timeout=float(os.environ.get("JSTATE_TEST_KILL_TIMEOUT", "15")))
    print(json.dumps({"saved": 1}), flush=True)
    sharding = jax.sharding.NamedSharding(mesh, P("data"))
    rows = int(os.environ.get("JSTATE_TEST_KILL_ROWS", "64"))  # of 4 MiB each
    zeros = jax.jit(lambda: jnp.zeros((rows, 1024, 1024), jnp.float32), out_shardings=sharding)()
    big = jstate.State.from_tree({"big": zeros})
    if process_id == 1:
        saver.save(big.merge(state), f"{workdir}/model", step=2, blocking=False)
        os._exit(9)  # killed mid-save
    try:
        saver.save(big.merge(state), f"{workdir}/model", step=2)  # must fail, not hang
    except jstate.CheckpointError as e:
        print(json.dumps({"failed": str(e)}), flush=True)
        os._exit(0)  # not `jax.distributed.shutdown()`: it would wait for the dead peer's heartbeat to time out
    return {"unexpected": "save completed without its peer"}


def run_pack():
    """Small replicated variables are packed (biases, a step, a key); sharded ones are not."""
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    rules = [(r"kernel$", P("data", "model")), (r".*", P())]

    replicated = jax.sharding.NamedSharding(mesh, P())

    def everywhere(host):  # the same value in every process
        return jax.make_array_from_callback(host.shape, replicated, lambda index: host[index])

    key_data = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(1), 2)))
    extra = {"step": everywhere(np.asarray(7, np.int32)), "rng": jax.random.wrap_key_data(everywhere(key_data))}
    state = jstate.init(model, jax.random.key(0), mesh=mesh, rules=rules).merge(jstate.State(extra))
    saver = jstate.Saver(timeout=30)
    path = saver.save(state, f"{workdir}/packed")
    manifest = jstate.open_checkpoint(path).manifest
    # Restored onto other shardings: the biases split over "model" across both processes.
    structs = {n: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated) for n, v in extra.items()}
    target = jstate.abstract(model, mesh=mesh, rules=RULES).merge(jstate.State.from_tree(structs))
    onto = saver.restore(path, target)
    rng_same = bool((jax.random.key_data(onto["rng"]) == jax.random.key_data(state["rng"])).all())
    plain = {n: v for n, v in state.items() if n != "rng"}
    return {
        "packed": sorted(n for n, v in manifest.variables.items() if v.packed is not None),
        "sums": sums(plain),
        "onto": sums({n: onto[n] for n in plain}),
        "bias_spec": str(onto["layer0/bias"].sharding.spec),
        "rng_same": rng_same,
    }


print(json.dumps({"save": run_save, "kill": run_kill, "pack": run_pack}[scenario]()), flush=True)
jax.distributed.shutdown()
