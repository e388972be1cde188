"""GPU check: placement, init and restore on one accelerator; prints numbers to report.

Run on a machine with a GPU: ``python benchmarks/gpu_check.py``. Each init variant runs in its
own process so that peak device memory (``memory_stats()["peak_bytes_in_use"]``) is its own.
The init comparison repeats the issue's H200 baseline: 64 x 4096^2 float32 (1.07B parameters).
`flax` and `flax_jit` compare a Flax linen model of 16 partitioned 4096^2 Dense kernels through
`jstate.flax_model` (one program, created on its shardings: issue 21) with
`jax.jit(module.init, out_shardings=...)`: peak device memory over parameter bytes should match.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

# A dry run on a machine without a GPU uses small sizes and the CPU.
SMALL = os.environ.get("GPU_CHECK_SMALL") == "1"
LAYERS, DIM = (4, 256) if SMALL else (64, 4096)
KDIM = 256 if SMALL else 4096


def child(variant: str) -> None:
    import jax

    import jstate

    def model(s):
        for i in range(LAYERS):
            s.variable(f"w{i}", jstate.initializers.normal(0.02), (DIM, DIM))

    def hand(key):
        return {f"w{i}": jax.random.normal(jax.random.fold_in(key, i), (DIM, DIM)) * 0.02 for i in range(LAYERS)}

    hand_jit = jax.jit(hand)

    def eager(key):
        return {f"w{i}": jax.random.normal(jax.random.fold_in(key, i), (DIM, DIM)) * 0.02 for i in range(LAYERS)}

    run = {"jstate": lambda k: jstate.init(model, k), "hand_jit": hand_jit, "eager": eager}.get(variant)
    if variant.startswith("flax"):
        run, params = flax_variant(variant)
    else:
        params = LAYERS * DIM * DIM * 4
    times = []
    for i in range(4):
        t = time.perf_counter()
        out = run(jax.random.key(i))
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
        del out
    stats = jax.devices()[0].memory_stats() or {}
    print(
        json.dumps(
            {
                "variant": variant,
                "first_s": times[0],
                "steady_s": min(times[1:]),
                "peak_over_params": stats.get("peak_bytes_in_use", 0) / params,
            }
        )
    )


def flax_variant(variant: str):
    """A partitioned Flax model through jstate.flax_model, or through jax.jit(module.init)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import jstate

    layers = 4 if SMALL else 16
    mesh = jax.make_mesh((len(jax.devices()),), ("model",))
    kernel = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(layers):
                x = nn.Dense(DIM, kernel_init=kernel, use_bias=False)(x)
            return x

    x = jnp.ones((1, DIM))
    if variant == "flax":
        model = jstate.flax_model(MLP(), x)
        return (lambda k: jstate.init(model, k, mesh=mesh)), layers * DIM * DIM * 4
    shardings = nn.get_sharding(jax.eval_shape(MLP().init, jax.random.key(0), x), mesh)
    program = jax.jit(MLP().init, out_shardings=shardings)
    return (lambda k: program(k, x)), layers * DIM * DIM * 4


def checks() -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import jstate

    out = {"devices": [str(d) for d in jax.devices()], "jax": jax.__version__}
    platform = jax.devices()[0].platform
    mesh = jax.make_mesh((1,), ("model",))

    def model(s):
        s.variable("step", jstate.initializers.zeros, (), jnp.int32, device=f"{platform}:0")
        with s.placement("cpu:0"):
            s.variable("host_stats", jstate.initializers.zeros, (4,))
        for i in range(16):
            s.variable(f"layer{i}/kernel", jstate.initializers.glorot_uniform(), (KDIM, KDIM))
            s.variable(f"layer{i}/bias", jstate.initializers.zeros, (KDIM,), sharding=P("model"))

    state = jstate.init(model, jax.random.key(0), mesh=mesh, rules=[(r"kernel$", P(None, "model"))])
    out["step_device"] = str(state["step"].sharding)
    out["host_stats_device"] = str(state["host_stats"].sharding)
    out["kernel_sharding"] = str(state["layer0/kernel"].sharding)
    out["placement"] = str(state.placement("layer0/kernel"))
    gpu = state.subset([n for n in state if n.startswith("layer")])
    with tempfile.TemporaryDirectory() as tmp:
        saver = jstate.Saver()
        t = time.perf_counter()
        path = saver.save(gpu, f"{tmp}/model", step=1)
        out["save_1GiB_s"] = time.perf_counter() - t
        target = jstate.abstract(model, mesh=mesh, rules=[(r"kernel$", P(None, "model"))]).subset(list(gpu))
        for verify in (True, False, True, False):
            t = time.perf_counter()
            restored = saver.restore(path, target, verify=verify)
            jax.block_until_ready(restored)
            out[f"restore_1GiB_s_verify_{verify}"] = time.perf_counter() - t
        out["restored_sharding"] = str(restored["layer3/kernel"].sharding)
        out["restored_equal"] = all(bool(jnp.array_equal(restored[n], gpu[n])) for n in gpu)
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1:
        child(sys.argv[1])
        sys.exit(0)
    print(json.dumps(checks(), indent=1), flush=True)
    if os.environ.get("GPU_CHECK_ONLY_PLACEMENT") == "1":
        sys.exit(0)
    for variant in ("jstate", "hand_jit", "eager", "jstate", "hand_jit", "flax", "flax_jit", "flax", "flax_jit"):
        res = subprocess.run([sys.executable, __file__, variant], capture_output=True, text=True)
        print(res.stdout.strip() or res.stderr[-2000:], flush=True)
