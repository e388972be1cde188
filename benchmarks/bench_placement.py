"""Benchmark of sharded init: `jstate.init(..., mesh=, rules=)` against hand-written JAX.

    python benchmarks/bench_placement.py [--quick]

A ~1 GiB float32 model (16 layers of 4096x4096 glorot_uniform kernels and zero biases) sharded
over 8 virtual CPU devices, mesh ``jax.make_mesh((4, 2), ("data", "model"))``, rules
``[(r".*/kernel$", P("data", "model")), (r".*", P())]``. Three ways to build it:

  jstate      jstate.init(model, key, mesh=mesh, rules=rules)
  hand-jit    jax.jit(init_fn, out_shardings={name: NamedSharding(mesh, spec)})(key)
  per-var-jit one small jitted program per kind of variable, called per variable (jstate's
              approach written by hand; shown to tell its cost from jstate's own overhead)
  device_put  jax.jit(init_fn)(key) on one device, then jax.device_put to the same shardings

Targets (full run; --quick uses a small model and only smoke-tests the script):
  steady-state time, jstate / hand-jit ........................................ <= 1.10
  peak RSS above the pre-init baseline, jstate / hand-jit ..................... <= 1.10
  peak RSS, jstate / device_put: clearly below, read here as .................. <= 0.8

Steady-state timings run the variants in turn (A B C, B C A, ...) and report the median of the
per-round ratios. First calls and peak RSS are measured in a fresh child process per variant and
run (peak RSS from getrusage, minus the RSS read from /proc/self/statm just before the call).
"""

from __future__ import annotations

import dataclasses

import _harness as h

h.use_cpu_devices(8)

import jax  # noqa: E402  (after the device setup above)
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jstate  # noqa: E402

RULES = [(r".*/kernel$", P("data", "model")), (r".*", P())]


@dataclasses.dataclass(frozen=True)
class Config:
    layers: int  # `layers` of (width, width) kernels and (width,) biases
    width: int
    child_runs: int  # fresh processes per variant
    rounds: int  # interleaved steady-state rounds


FULL = Config(layers=16, width=4096, child_runs=2, rounds=7)
QUICK = Config(layers=4, width=1024, child_runs=1, rounds=3)


def model_fn(cfg: Config):
    def model(s):
        for i in range(cfg.layers):
            layer = s.scope(f"layer{i}")
            layer.variable("kernel", jstate.initializers.glorot_uniform(), (cfg.width, cfg.width))
            layer.variable("bias", jstate.initializers.zeros, (cfg.width,))

    return model


def hand_init_fn(cfg: Config):
    """What a user would write without jstate: one function building the whole dict."""
    glorot = jax.nn.initializers.glorot_uniform()

    def init(key):
        params = {}
        for i in range(cfg.layers):
            params[f"layer{i}/kernel"] = glorot(jax.random.fold_in(key, i), (cfg.width, cfg.width))
            params[f"layer{i}/bias"] = jnp.zeros((cfg.width,))
        return params

    return init


def per_variable_init_fn(cfg: Config, mesh: jax.sharding.Mesh):
    """jstate's approach written by hand: one small jitted program per kind of variable."""
    glorot = jax.nn.initializers.glorot_uniform()
    shape = (cfg.width, cfg.width)
    kernel = jax.jit(
        lambda key, i: glorot(jax.random.fold_in(key, i), shape), out_shardings=NamedSharding(mesh, P("data", "model"))
    )
    bias = jax.jit(lambda: jnp.zeros((cfg.width,)), out_shardings=NamedSharding(mesh, P()))

    def init(key):
        params = {}
        for i in range(cfg.layers):
            params[f"layer{i}/kernel"] = kernel(key, i)
            params[f"layer{i}/bias"] = bias()
        return params

    return init


def hand_shardings(cfg: Config, mesh: jax.sharding.Mesh) -> dict[str, NamedSharding]:
    """The shardings RULES give, written out by hand."""
    shardings = {}
    for i in range(cfg.layers):
        shardings[f"layer{i}/kernel"] = NamedSharding(mesh, P("data", "model"))
        shardings[f"layer{i}/bias"] = NamedSharding(mesh, P())
    return shardings


def param_bytes(cfg: Config) -> int:
    return cfg.layers * (cfg.width * cfg.width + cfg.width) * 4


def variants(cfg: Config) -> dict:
    """Zero-argument callables that build the sharded parameters and block until they are ready."""
    key = jax.random.key(0)
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    model, init = model_fn(cfg), hand_init_fn(cfg)
    shardings = hand_shardings(cfg, mesh)
    sharded_init, one_device_init = jax.jit(init, out_shardings=shardings), jax.jit(init)
    per_variable_init = per_variable_init_fn(cfg, mesh)
    return {
        "jstate": lambda: jax.block_until_ready(jstate.init(model, key, mesh=mesh, rules=RULES)),
        "hand-jit": lambda: jax.block_until_ready(sharded_init(key)),
        "per-var-jit": lambda: jax.block_until_ready(per_variable_init(key)),
        "device_put": lambda: jax.block_until_ready(jax.device_put(one_device_init(key), shardings)),
    }


def check_same_placement(fns: dict) -> None:
    """Every variant must produce the same names on the same shardings, or the comparison is moot."""
    placed = {name: {k: v.sharding for k, v in dict(fn()).items()} for name, fn in fns.items()}
    reference = placed["hand-jit"]
    for name, shardings in placed.items():
        if shardings.keys() != reference.keys() or any(
            not s.is_equivalent_to(reference[k], 2) for k, s in shardings.items()
        ):
            raise AssertionError(f"{name} places the variables differently from hand-jit")


def bench(cfg: Config) -> None:
    names = ["jstate", "hand-jit", "per-var-jit", "device_put"]
    extra = ["--quick"] if cfg is QUICK else []
    fresh = h.in_children(__file__, names, cfg.child_runs, extra)
    fns = variants(cfg)
    check_same_placement(fns)
    steady = h.interleave(fns, cfg.rounds, warmup=0)  # check_same_placement was the warm-up
    first = {name: h.column(runs, "seconds") for name, runs in fresh.items()}
    rss = {name: h.column(runs, "peak_rss") for name, runs in fresh.items()}
    nbytes = param_bytes(cfg)
    rows = [
        h.Row("steady time, jstate / hand-jit", h.median_ratio(steady["jstate"], steady["hand-jit"]), at_most=1.10),
        h.Row("steady time, per-var-jit / hand-jit", h.median_ratio(steady["per-var-jit"], steady["hand-jit"])),
        h.Row("steady time, jstate / per-var-jit", h.median_ratio(steady["jstate"], steady["per-var-jit"])),
        h.Row("steady time, device_put / hand-jit", h.median_ratio(steady["device_put"], steady["hand-jit"])),
        h.Row("peak RSS, jstate / hand-jit", h.median_ratio(rss["jstate"], rss["hand-jit"]), at_most=1.10),
        h.Row("peak RSS, jstate / device_put", h.median_ratio(rss["jstate"], rss["device_put"]), at_most=0.8),
        h.Row("first-call time, jstate / hand-jit", h.median_ratio(first["jstate"], first["hand-jit"])),
        *[h.Row(f"steady time, {name}", h.median(times), "s") for name, times in steady.items()],
        *[h.Row(f"first-call time, {name}", h.median(times), "s") for name, times in first.items()],
        *[
            h.Row(f"peak RSS over baseline / param bytes, {name}", h.median(peaks) / nbytes)
            for name, peaks in rss.items()
        ],
    ]
    title = (
        f"sharded init of {cfg.layers} layers of {cfg.width}x{cfg.width} ({nbytes / 2**20:.0f} MiB float32) "
        "over mesh (data=4, model=2)"
    )
    h.print_rows(title, rows)


def main() -> None:
    args = h.parse_args(__doc__.split("\n")[0])
    cfg = QUICK if args.quick else FULL
    if args.child:
        h.report_to_parent(h.first_call(variants(cfg)[args.child]))
        return
    h.print_header("jstate placement benchmark", args.quick, jax)
    bench(cfg)


if __name__ == "__main__":
    main()
