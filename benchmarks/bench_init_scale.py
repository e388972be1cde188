"""`jstate.init` at model scale, against one `jax.jit` of the same initializers (issue 21).

    python benchmarks/bench_init_scale.py [--quick] [--runs N]

Eight CPU devices, variables replicated over a 4x2 mesh unless said otherwise. First calls are
measured in fresh processes (compile included, imports excluded), N per variant (default 5,
interleaved), and compared by the median of per-round ratios; steady state (second and later
calls of the same model function) runs the variants in turn in this process. Targets:

1. 50 Dense layers of distinct widths (100 distinct shapes), jstate initializers:
     first call, jstate / one `jax.jit` of the same initializers (replicated out_shardings) .. <= 0.25
     steady, jstate / that jit ................................................................. <= 1.1
   and the same model as a Flax linen module through `jstate.flax_model`, against
   `jax.jit(module.init, out_shardings=replicated)`: the same two targets.
2. A 4-layer transformer LM (d_model 256, 8 heads, vocab 8k) through `flax_model`:
     first call / `jax.jit(module.init)` with replicated out_shardings .......................... <= 0.5
     first call / plain `jax.jit(module.init)` on one device ..................................... <= 1.0
     steady / the replicated jit ................................................................. <= 1.1
3. 8 x 2048^2 glorot_normal, steady, jstate / a hand-written single jit ........................ <= 1.1
4. 1,000 x 64^2 normal, jstate / flax nnx eager: steady <= 0.15, first call <= 0.5.
5. JAX's persistent compilation cache (`jax_compilation_cache_dir` set by the user): a second
   process's first init of model 1 / the first process's ....................................... <= 0.25
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import _harness as h

h.use_cpu_devices(8)

import jax  # noqa: E402  (after the device setup above)
import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import jstate  # noqa: E402

WIDTHS = [32 + 16 * i for i in range(51)]  # 50 layers: 100 distinct shapes, 12M parameters
KEY = jax.random.key(0)


def mesh():
    return jax.make_mesh((4, 2), ("data", "model"))


def replicated():
    return NamedSharding(mesh(), PartitionSpec())


EVERYWHERE = [(".*", PartitionSpec())]  # jstate rules: every variable replicated over the mesh


# -- models ---------------------------------------------------------------------------------
def shapes_model(s):
    for i in range(len(WIDTHS) - 1):
        layer = s.scope(f"layer{i}")
        layer.variable("kernel", jstate.initializers.glorot_uniform(), (WIDTHS[i], WIDTHS[i + 1]))
        layer.variable("bias", jstate.initializers.zeros, (WIDTHS[i + 1],))


def shapes_jit():
    glorot, zeros = jstate.initializers.glorot_uniform(), jstate.initializers.zeros

    def init(key):
        out = {}
        for i in range(len(WIDTHS) - 1):
            k = jax.random.fold_in(key, i)
            out[f"layer{i}/kernel"] = glorot(k, (WIDTHS[i], WIDTHS[i + 1]), jnp.float32)
            out[f"layer{i}/bias"] = zeros(k, (WIDTHS[i + 1],), jnp.float32)
        return out

    return jax.jit(init, out_shardings=replicated())


class Dense50(nn.Module):
    @nn.compact
    def __call__(self, x):
        for w in WIDTHS[1:]:
            x = nn.Dense(w)(x)
        return x


class Block(nn.Module):
    d: int
    heads: int

    @nn.compact
    def __call__(self, x):
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(x))
        h = nn.Dense(4 * self.d)(nn.LayerNorm()(x))
        return x + nn.Dense(self.d)(nn.gelu(h))


class LM(nn.Module):
    vocab: int = 8192
    d: int = 256
    heads: int = 8
    layers: int = 4

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.d)(tokens)
        x = x + self.param("positions", nn.initializers.normal(0.02), (tokens.shape[-1], self.d))
        for _ in range(self.layers):
            x = Block(self.d, self.heads)(x)
        return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def flax_case(name):
    if name == "shapes":
        return Dense50(), jnp.ones((1, WIDTHS[0]))
    return LM(), jnp.zeros((1, 128), jnp.int32)


def big_model(s):
    for i in range(8):
        s.variable(f"w{i}", jstate.initializers.glorot_normal(), (2048, 2048))


def big_jit():
    glorot = jstate.initializers.glorot_normal()
    return jax.jit(lambda key: [glorot(jax.random.fold_in(key, i), (2048, 2048), jnp.float32) for i in range(8)])


def many_model(s):
    normal = jax.nn.initializers.normal(0.02)
    for i in range(1000):
        s.scope(f"block{i}").variable("w", normal, (64, 64))


class NnxMany(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        normal = jax.nn.initializers.normal(0.02)
        self.params = nnx.List([nnx.Param(normal(rngs.params(), (64, 64))) for _ in range(1000)])


# -- variants: zero-argument callables that block until their result is ready ----------------
def variants() -> dict:
    """Every variant, built lazily (a child builds just its own)."""
    ready = jax.block_until_ready

    def jstate_init(model, **kw):
        return lambda: ready(jstate.init(model, KEY, **kw))

    def flax_jstate(name):
        module, x = flax_case(name)
        return jstate_init(jstate.flax_model(module, x), mesh=mesh(), rules=EVERYWHERE)

    def flax_jit(name, sharded=True):
        module, x = flax_case(name)
        program = jax.jit(module.init, out_shardings=replicated()) if sharded else jax.jit(module.init)
        return lambda: ready(program(KEY, x))

    def with_program(make):
        program = None

        def run():
            nonlocal program
            program = program or make()
            return ready(program(KEY))

        return run

    return {
        "shapes:jstate": lambda: jstate_init(shapes_model, mesh=mesh(), rules=EVERYWHERE),
        "shapes:jit": lambda: with_program(shapes_jit),
        "shapes:flax": lambda: flax_jstate("shapes"),
        "shapes:flax-jit": lambda: flax_jit("shapes"),
        "lm:jstate": lambda: flax_jstate("lm"),
        "lm:jit": lambda: flax_jit("lm"),
        "lm:jit-one-device": lambda: flax_jit("lm", sharded=False),
        "big:jstate": lambda: jstate_init(big_model),
        "big:jit": lambda: with_program(big_jit),
        "many:jstate": lambda: jstate_init(many_model),
        "many:nnx": lambda: lambda: ready(nnx.state(NnxMany(nnx.Rngs(0)))),
    }


FRESH = [
    "shapes:jstate",
    "shapes:jit",
    "shapes:flax",
    "shapes:flax-jit",
    "lm:jstate",
    "lm:jit",
    "lm:jit-one-device",
    "many:jstate",
    "many:nnx",
]
STEADY = [("shapes:jstate", "shapes:jit"), ("shapes:flax", "shapes:flax-jit"), ("lm:jstate", "lm:jit")]
STEADY += [("big:jstate", "big:jit"), ("many:jstate", "many:nnx")]


# -- entry points ---------------------------------------------------------------------------
def run_child(name: str, cache_dir: str | None) -> None:
    if cache_dir:
        # What the README asks of a user: JAX's persistent cache, every program kept.
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    fn = variants()[name]()
    h.report_to_parent(h.first_call(fn))


def cache_runs(runs: int) -> list[float]:
    """Second-process / first-process first-call time of model 1, each pair on a fresh cache."""
    ratios = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as cache:
            first, second = (h._run_child(__file__, "shapes:jstate", ["--cache", cache]) for _ in range(2))
            ratios.append(second["seconds"] / first["seconds"])
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one run per variant, few steady rounds")
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per variant")
    parser.add_argument("--only", help="comma-separated sections: shapes, lm, big, many, cache")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child, args.cache)
        return
    runs, rounds = (1, 3) if args.quick else (args.runs, 7)
    only = set(args.only.split(",")) if args.only else {"shapes", "lm", "big", "many", "cache"}
    h.print_header("jstate init at model scale", args.quick, jax)
    fresh_names = [n for n in FRESH if n.split(":")[0] in only]
    fresh = h.in_children(__file__, fresh_names, runs) if fresh_names else {}
    first = {name: h.column(r, "seconds") for name, r in fresh.items()}
    made = variants()
    steady = {}
    for a, b in STEADY:
        if a.split(":")[0] in only:
            steady.update(h.interleave({a: made[a](), b: made[b]()}, rounds))

    def ratio(a, b, times):
        return h.median_ratio(times[a], times[b]) if a in times and b in times else None

    rows = [
        ("1. 100 shapes, first call, jstate / jit", ratio("shapes:jstate", "shapes:jit", first), 0.25),
        ("1. 100 shapes, steady, jstate / jit", ratio("shapes:jstate", "shapes:jit", steady), 1.1),
        (
            "1. 100 shapes via flax_model, first call / jit(module.init)",
            ratio("shapes:flax", "shapes:flax-jit", first),
            0.25,
        ),
        (
            "1. 100 shapes via flax_model, steady / jit(module.init)",
            ratio("shapes:flax", "shapes:flax-jit", steady),
            1.1,
        ),
        ("2. LM via flax_model, first call / replicated jit", ratio("lm:jstate", "lm:jit", first), 0.5),
        ("2. LM via flax_model, first call / one-device jit", ratio("lm:jstate", "lm:jit-one-device", first), 1.0),
        ("2. LM via flax_model, steady / replicated jit", ratio("lm:jstate", "lm:jit", steady), 1.1),
        ("3. 8 x 2048^2, steady, jstate / hand jit", ratio("big:jstate", "big:jit", steady), 1.1),
        ("4. 1,000 x 64^2, steady, jstate / nnx eager", ratio("many:jstate", "many:nnx", steady), 0.15),
        ("4. 1,000 x 64^2, first call, jstate / nnx eager", ratio("many:jstate", "many:nnx", first), 0.5),
    ]
    if "cache" in only:
        rows.append(("5. persistent cache, 2nd process / 1st, first call", h.median(cache_runs(runs)), 0.25))
    table = [h.Row(what, value, at_most=bound) for what, value, bound in rows if value is not None]
    table += [h.Row(f"first call, {name}", h.median(times), "s") for name, times in first.items()]
    table += [h.Row(f"steady, {name}", h.median(times), "s") for name, times in steady.items()]
    h.print_rows(f"ratios (median of per-round ratios; load average now {os.getloadavg()[0]:.2f})", table)
    json.dump({"first": first, "steady": steady}, sys.stderr)


if __name__ == "__main__":
    main()
