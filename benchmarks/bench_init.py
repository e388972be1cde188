"""Benchmarks of `jstate.init` and of a State's overheads, against hand-written JAX and flax nnx.

    python benchmarks/bench_init.py [--quick]

What is measured (targets hold for the full run; --quick only smoke-tests the script):

1. A ~100M-parameter model: 24 layers of 2048x2048 normal(0.02) kernels and zero biases, float32.
   `jstate.init` against one hand-written `jax.jit` that builds the same dict, and against eager
   variable-by-variable init (no jit).
     steady-state time, jstate / hand-jit ...................................... <= 1.05
     first-call time in a fresh process (compile included), jstate / hand-jit .. <= 1.2
     peak RSS above the pre-init baseline / parameter bytes, jstate ............ <= 1.6
2. 1,000 variables of 64x64 (normal init), `jstate.init`:
     first call in a fresh process (compile included, jax import excluded) ..... <= 2 s
     steady state .............................................................. <= 0.2 s
   shown next to flax nnx's eager construction of 1,000 `nnx.Param`. A hand-written single
   `jax.jit` over 1,000 variables is deliberately not run: its first call took 309 s (compile)
   in the issue's measurement.
3. A jitted, donated step ``x + 1`` over 1,000 (16,) float32 variables, per call:
     State / dict of the same arrays ........................................... <= 1.05
   (flax nnx.State shown for comparison).
4. Replacing one variable of a 1,000-variable state outside jit:
     ``state.assign(name, arr)`` / ``{**d, name: arr}`` ........................ <= 4

Steady-state timings run the variants in turn (A B C, B C A, ...) and report the median of the
per-round ratios. First calls and peak RSS are measured in a fresh child process per variant and
run (peak RSS from getrusage, minus the RSS read from /proc/self/statm just before the call).
"""

from __future__ import annotations

import dataclasses

import _harness as h

h.use_cpu_devices(1)

import jax  # noqa: E402  (after the device setup above)
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import jstate  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    layers: int  # section 1 model: `layers` of (width, width) kernels and (width,) biases
    width: int
    many: int  # variables in sections 2-4
    child_runs: int  # fresh processes per variant
    init_rounds: int  # interleaved rounds, section 1
    rounds: int  # interleaved rounds, sections 2-4
    step_calls: int  # jitted steps per round, section 3
    assign_calls: int  # replacements per round, section 4


FULL = Config(
    layers=24, width=2048, many=1000, child_runs=3, init_rounds=7, rounds=11, step_calls=200, assign_calls=2000
)
QUICK = Config(layers=4, width=512, many=100, child_runs=1, init_rounds=2, rounds=3, step_calls=20, assign_calls=200)


# -- models ---------------------------------------------------------------------------------
def layered_model(cfg: Config):
    def model(s):
        for i in range(cfg.layers):
            layer = s.scope(f"layer{i}")
            layer.variable("kernel", jstate.initializers.normal(0.02), (cfg.width, cfg.width))
            layer.variable("bias", jstate.initializers.zeros, (cfg.width,))

    return model


def hand_init_fn(cfg: Config):
    """What a user would write without jstate: one function building the whole dict."""

    def init(key):
        params = {}
        for i in range(cfg.layers):
            params[f"layer{i}/kernel"] = 0.02 * jax.random.normal(jax.random.fold_in(key, i), (cfg.width, cfg.width))
            params[f"layer{i}/bias"] = jnp.zeros((cfg.width,))
        return params

    return init


def many_model(count: int, shape: tuple[int, ...], init):
    def model(s):
        for i in range(count):
            s.scope(f"block{i}").variable("w", init, shape)

    return model


class NnxMany(nnx.Module):
    """flax nnx's counterpart of `many_model`: `count` Params, built eagerly."""

    def __init__(self, count: int, shape: tuple[int, ...], init, rngs: nnx.Rngs):
        self.params = nnx.List([nnx.Param(init(rngs.params(), shape)) for _ in range(count)])


def param_bytes(cfg: Config) -> int:
    return cfg.layers * (cfg.width * cfg.width + cfg.width) * 4


# -- variants: zero-argument callables that block until their result is ready ----------------
def big_init_variants(cfg: Config) -> dict:
    key = jax.random.key(0)
    model, hand = layered_model(cfg), hand_init_fn(cfg)
    hand_jit = jax.jit(hand)
    return {
        "jstate": lambda: jax.block_until_ready(jstate.init(model, key)),
        "hand-jit": lambda: jax.block_until_ready(hand_jit(key)),
        "eager": lambda: jax.block_until_ready(hand(key)),
    }


def many_init_variants(cfg: Config) -> dict:
    key, normal = jax.random.key(0), jax.nn.initializers.normal(0.02)
    model = many_model(cfg.many, (64, 64), normal)
    return {
        "jstate": lambda: jax.block_until_ready(jstate.init(model, key)),
        "nnx": lambda: jax.block_until_ready(nnx.state(NnxMany(cfg.many, (64, 64), normal, nnx.Rngs(0)))),
    }


CHILD_VARIANTS = {"big": big_init_variants, "many": many_init_variants}


def step_loop(tree, calls: int):
    """A callable running `calls` donated jitted steps, carrying `tree` from one call to the next."""
    step = jax.jit(lambda t: jax.tree.map(lambda x: x + 1, t), donate_argnums=0)

    def run():
        nonlocal tree
        for _ in range(calls):
            tree = step(tree)
        jax.block_until_ready(tree)

    return run


def small_state(cfg: Config) -> jstate.State:
    return jstate.init(many_model(cfg.many, (16,), jstate.initializers.zeros), jax.random.key(0))


# -- sections -------------------------------------------------------------------------------
def bench_big_init(cfg: Config) -> None:
    fresh = h.in_children(__file__, ["big:jstate", "big:hand-jit", "big:eager"], cfg.child_runs, _child_args(cfg))
    steady = h.interleave(big_init_variants(cfg), cfg.init_rounds)
    first = {name.split(":")[1]: h.column(runs, "seconds") for name, runs in fresh.items()}
    rss = {name.split(":")[1]: h.column(runs, "peak_rss") for name, runs in fresh.items()}
    nbytes = param_bytes(cfg)
    rows = [
        h.Row("steady time, jstate / hand-jit", h.median_ratio(steady["jstate"], steady["hand-jit"]), at_most=1.05),
        h.Row("steady time, eager / hand-jit", h.median_ratio(steady["eager"], steady["hand-jit"])),
        h.Row("first-call time, jstate / hand-jit", h.median_ratio(first["jstate"], first["hand-jit"]), at_most=1.2),
        h.Row("first-call time, eager / hand-jit", h.median_ratio(first["eager"], first["hand-jit"])),
        *[h.Row(f"steady time, {name}", h.median(times), "s") for name, times in steady.items()],
        *[h.Row(f"first-call time, {name}", h.median(times), "s") for name, times in first.items()],
        *[
            h.Row(
                f"peak RSS over baseline / param bytes, {name}",
                h.median(peaks) / nbytes,
                at_most=1.6 if name == "jstate" else None,
            )
            for name, peaks in rss.items()
        ],
    ]
    h.print_rows(f"1. init of {cfg.layers} layers of {cfg.width}x{cfg.width} ({nbytes / 2**20:.0f} MiB float32)", rows)


def bench_many_init(cfg: Config) -> None:
    fresh = h.in_children(__file__, ["many:jstate", "many:nnx"], cfg.child_runs, _child_args(cfg))
    steady = h.interleave(many_init_variants(cfg), cfg.rounds)
    first = {name.split(":")[1]: h.column(runs, "seconds") for name, runs in fresh.items()}
    rows = [
        h.Row("first call (fresh process), jstate", h.median(first["jstate"]), "s", at_most=2.0),
        h.Row("steady, jstate", h.median(steady["jstate"]), "s", at_most=0.2),
        h.Row("first call (fresh process), nnx", h.median(first["nnx"]), "s"),
        h.Row("steady, nnx", h.median(steady["nnx"]), "s"),
        h.Row("first call, jstate / nnx", h.median_ratio(first["jstate"], first["nnx"])),
        h.Row("steady, jstate / nnx", h.median_ratio(steady["jstate"], steady["nnx"])),
    ]
    h.print_rows(f"2. init of {cfg.many} variables of 64x64 (hand-written single jit not run: 309 s first call)", rows)


def bench_dispatch(cfg: Config) -> None:
    state = small_state(cfg)
    plain = {name: jnp.copy(value) for name, value in state.items()}
    module = NnxMany(cfg.many, (16,), jax.nn.initializers.zeros, nnx.Rngs(0))
    loops = {"State": state, "dict": plain, "nnx.State": nnx.state(module)}
    times = h.interleave({name: step_loop(tree, cfg.step_calls) for name, tree in loops.items()}, cfg.rounds)
    per_call = {name: [t / cfg.step_calls for t in runs] for name, runs in times.items()}
    rows = [
        h.Row("per call, State / dict", h.median_ratio(per_call["State"], per_call["dict"]), at_most=1.05),
        h.Row("per call, nnx.State / dict", h.median_ratio(per_call["nnx.State"], per_call["dict"])),
        *[h.Row(f"per call, {name}", h.median(runs), "ms") for name, runs in per_call.items()],
    ]
    h.print_rows(f"3. jitted donated step over {cfg.many} variables of (16,) float32", rows)


def bench_assign(cfg: Config) -> None:
    state = small_state(cfg)
    plain = dict(state)
    name = sorted(state)[len(state) // 2]
    value = jnp.zeros_like(state[name])

    def assign():
        for _ in range(cfg.assign_calls):
            state.assign(name, value)

    def dict_copy():
        for _ in range(cfg.assign_calls):
            {**plain, name: value}  # noqa: B018  (the copy is what is measured)

    times = h.interleave({"assign": assign, "dict copy": dict_copy}, cfg.rounds)
    per_call = {label: [t / cfg.assign_calls for t in runs] for label, runs in times.items()}
    rows = [
        h.Row(
            "per call, state.assign / dict copy", h.median_ratio(per_call["assign"], per_call["dict copy"]), at_most=4.0
        ),
        *[h.Row(f"per call, {label}", h.median(runs), "us") for label, runs in per_call.items()],
    ]
    h.print_rows(f"4. replacing one variable of {cfg.many}, outside jit", rows)


# -- entry points ---------------------------------------------------------------------------
def _child_args(cfg: Config) -> list[str]:
    return ["--quick"] if cfg is QUICK else []


def run_child(name: str, cfg: Config) -> None:
    """Measure one variant's first call in this (fresh) process and report it to the parent."""
    group, variant = name.split(":")
    fn = CHILD_VARIANTS[group](cfg)[variant]
    h.report_to_parent(h.first_call(fn))


def main() -> None:
    args = h.parse_args(__doc__.split("\n")[0])
    cfg = QUICK if args.quick else FULL
    if args.child:
        run_child(args.child, cfg)
        return
    h.print_header("jstate init benchmarks", args.quick, jax)
    bench_big_init(cfg)
    bench_many_init(cfg)
    bench_dispatch(cfg)
    bench_assign(cfg)


if __name__ == "__main__":
    main()
