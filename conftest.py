"""Shared by the tests and the docstring examples (``pytest --doctest-modules jstate``).

Every test and example sees 8 CPU devices, so sharding is exercised on every machine, and every
docstring example runs in a fresh temporary directory with the README's model at hand.
"""

import os
import sys

# Must be set before jax is imported anywhere.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

# `--doctest-modules` imports every module it finds: not these scripts (TensorFlow, a worker), nor the
# tests' conftest.py files, which pytest loads itself (several share the module name "conftest").
collect_ignore = ["tests/data", "tests/multihost_worker.py", "tests/preemption_worker.py", "benchmarks"]
collect_ignore_glob = ["tests/*conftest.py"]

# The fast loop compiles hundreds of tiny programs and runs each once or twice, so XLA's CPU code
# generation costs more than it saves. LLVM's optimization level 0 and XLA's older (non-fusion)
# emitters halve the fast loop's CPU time (107 s -> 56 s on 2 cores, 2026-12). They may change a
# transcendental function's last bit (a normal draw compared against a child process run without
# them differs in one element of 32), so only `-m "not slow"` uses them: the full run (CI) compiles
# as users' programs do, and its checks across processes compare exact bits.
FAST_COMPILES = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def pytest_configure(config):
    # XLA reads XLA_FLAGS when jax first makes a backend; the tests import jax after this hook.
    if "not slow" in (config.option.markexpr or "") and "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] += f" {FAST_COMPILES}"


def readme_model(s):
    """The README's model: the TF guide's variables."""
    import jstate

    weights = s.variable("weights", jstate.initializers.normal(stddev=0.35), (784, 200))
    s.variable("biases", jstate.initializers.zeros, (200,))
    s.variable("w2", weights)
    s.scope("layer1").variable("kernel", jstate.initializers.glorot_uniform(), (200, 10))


@pytest.fixture(scope="session")
def _readme_state():
    """The README's model, initialized once for every docstring example: a State is never mutated,
    and no example donates its buffers, so they can all share it."""
    import jax

    import jstate

    return jstate.init(readme_model, jax.random.key(0))


@pytest.fixture(autouse=True)
def _doctest_setup(request, doctest_namespace, tmp_path, monkeypatch):
    """Docstring examples run in an empty directory, with ``jstate``, ``jax``, ``jnp``, ``np``,
    ``T`` (`jstate.transforms`), ``model`` (the README's) and ``state`` (it, initialized) defined."""
    if not isinstance(request.node, pytest.DoctestItem):
        return  # tests never pay for the README's State
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jstate

    monkeypatch.chdir(tmp_path)
    doctest_namespace.update(
        jstate=jstate,
        jax=jax,
        jnp=jnp,
        np=np,
        T=jstate.transforms,
        model=readme_model,
        state=request.getfixturevalue("_readme_state"),
    )
