"""JAX's persistent compilation cache serves `jstate.init` in a new process (issue 21)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PRELUDE = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
import jstate

counts = {}
jax.monitoring.register_event_listener(lambda event, **_: counts.__setitem__(event, counts.get(event, 0) + 1))
# What the README asks of a user (jstate never changes JAX's configuration itself):
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
"""

CHILD = r"""
def model(s):
    for i in range(12):
        s.variable(f"layer{i}/kernel", jstate.initializers.glorot_uniform(), (16 + 8 * i, 24 + 8 * i))
        s.variable(f"layer{i}/bias", jstate.initializers.zeros, (24 + 8 * i,))
    s.variable("big", jstate.initializers.normal(), (64, 64))
    s.variable("sum", s.scope("layer0").variable("copy", np.ones(3)) * 2)

state = jstate.init(model, jax.random.key(0), mesh=jax.make_mesh((8,), ("x",)), rules=[("big", jax.P("x"))])
print(json.dumps({
    "requests": counts.get("/jax/compilation_cache/compile_requests_use_cache", 0),
    "hits": counts.get("/jax/compilation_cache/cache_hits", 0),
    "checksum": float(sum(np.asarray(v, np.float64).sum() for v in state.values())),
}))
"""


def run(child: str, cache: str, **env: str) -> dict:
    """`child` in a new process with JAX's persistent cache in `cache`: its last line, as JSON."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    out = subprocess.run([sys.executable, "-c", PRELUDE + child, cache], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_second_process_compiles_nothing_with_jaxs_persistent_cache(tmp_path):
    devices = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    first, second = (run(CHILD, str(tmp_path), **devices) for _ in range(2))
    assert first["requests"] >= 2 and first["hits"] == 0
    assert second["requests"] == first["requests"]
    assert second["hits"] == second["requests"]  # every program came from the cache
    assert second["checksum"] == first["checksum"]


FLAX_CHILD = r"""
from flax import linen as nn

class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.LayerNorm()(nn.MultiHeadDotProductAttention(num_heads=2)(x, x))

state = jstate.init(jstate.flax_model(Attention(), jnp.ones((1, 3, 8))), jax.random.key(0))
print(json.dumps({
    "requests": counts.get("/jax/compilation_cache/compile_requests_use_cache", 0),
    "hits": counts.get("/jax/compilation_cache/cache_hits", 0),
}))
"""


@pytest.mark.slow
def test_a_second_process_compiles_nothing_for_a_flax_model(tmp_path):
    # (its program takes the keys Flax derives, one parameter each: in the same order in every process)
    first, second, third = (run(FLAX_CHILD, str(tmp_path)) for _ in range(3))
    assert first["requests"] >= 1 and first["hits"] == 0
    assert second["hits"] == second["requests"] == first["requests"]
    assert third["hits"] == third["requests"] == first["requests"]
