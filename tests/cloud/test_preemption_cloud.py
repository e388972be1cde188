"""`jstate.Preemption` with the checkpoints on the GCS emulator: two JAX processes, SIGTERM to one
of them, both save the same step into the bucket (tests/reliability/test_preemption.py does it locally)."""

import importlib.util
import uuid
from pathlib import Path

import emulators
import pytest

_spec = importlib.util.spec_from_file_location(
    "preemption_tests", Path(__file__).parents[1] / "reliability" / "test_preemption.py"
)
preemption_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(preemption_tests)


@pytest.mark.slow
def test_a_sigterm_to_one_of_two_processes_makes_both_save_the_same_step_on_gcs(gcs, cloud_env, tmp_path):
    root = gcs.url(f"preemption-{uuid.uuid4().hex[:8]}")
    preemption_tests.preempt_two_processes(root, "jax", env=emulators.subprocess_env(cloud_env), cwd=tmp_path)
    assert emulators.objects(root)  # in the bucket
    assert list(tmp_path.iterdir()) == []  # and nothing written locally
