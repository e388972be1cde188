"""Shared by the tests and the docstring examples (``pytest --doctest-modules jstate``).

Every test and example sees 8 CPU devices, so sharding is exercised on every machine, and every
docstring example runs in a fresh temporary directory with the README's model at hand.
"""

import os

# Must be set before jax is imported anywhere.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

# `--doctest-modules` imports every module it finds: not these scripts (TensorFlow, a worker), nor the
# tests' conftest.py files, which pytest loads itself (several share the module name "conftest").
collect_ignore = ["tests/data", "tests/multihost_worker.py", "tests/preemption_worker.py", "benchmarks"]
collect_ignore_glob = ["tests/*conftest.py"]


def readme_model(s):
    """The README's model: the TF guide's variables."""
    import jstate

    weights = s.variable("weights", jstate.initializers.normal(stddev=0.35), (784, 200))
    s.variable("biases", jstate.initializers.zeros, (200,))
    s.variable("w2", weights)
    s.scope("layer1").variable("kernel", jstate.initializers.glorot_uniform(), (200, 10))


@pytest.fixture(autouse=True)
def _doctest_setup(request, doctest_namespace, tmp_path, monkeypatch):
    """Docstring examples run in an empty directory, with ``jstate``, ``jax``, ``jnp``, ``np``,
    ``T`` (`jstate.transforms`), ``model`` (the README's) and ``state`` (it, initialized) defined."""
    if not isinstance(request.node, pytest.DoctestItem):
        return
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
        state=jstate.init(readme_model, jax.random.key(0)),
    )
