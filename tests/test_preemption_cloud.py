"""`jstate.Preemption` with the checkpoints on the GCS emulator: two JAX processes, SIGTERM to one
of them, both save the same step into the bucket (tests/test_preemption.py does it locally)."""

import uuid

import cloud
import pytest
import test_preemption

cloud_session, cloud_env, gcs = cloud.cloud_session, cloud.cloud_env, cloud.gcs


@pytest.mark.slow
def test_a_sigterm_to_one_of_two_processes_makes_both_save_the_same_step_on_gcs(gcs, cloud_env, tmp_path):
    root = gcs.url(f"preemption-{uuid.uuid4().hex[:8]}")
    test_preemption.preempt_two_processes(root, "jax", env=cloud.subprocess_env(cloud_env), cwd=tmp_path)
    assert cloud.objects(root)  # in the bucket
    assert list(tmp_path.iterdir()) == []  # and nothing written locally
