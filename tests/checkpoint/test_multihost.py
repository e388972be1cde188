"""Multi-process JAX on one machine: 2 local processes x 4 CPU devices, loopback only."""

import os

import jax
import numpy as np
import pytest
from multihost import last_json, model, run_processes

import jstate

pytestmark = pytest.mark.slow  # two JAX processes per scenario


@pytest.fixture(scope="module")
def two_process_save(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("multihost")
    results = run_processes("save", workdir)
    for code, _, err in results:
        assert code == 0, err[-3000:]
    return workdir, [last_json(out) for _, out, _ in results]


def test_init_creates_each_process_shards_only(two_process_save):
    _, (r0, r1) = two_process_save
    for r, process in ((r0, 0), (r1, 1)):
        assert r["fully_addressable"] is False
        assert r["local_shards"] == 4 and r["local_devices"] == [process]


def test_one_checkpoint_from_both_and_latest_agrees(two_process_save):
    workdir, (r0, r1) = two_process_save
    assert r0["path"] == r1["path"] == str(workdir / "model-2")
    assert r0["latest"] == r1["latest"] == str(workdir / "model-2")
    assert sorted(os.listdir(workdir)) == ["model-1", "model-2"]


def test_restore_onto_same_and_other_mesh_shape(two_process_save):
    _, (r0, r1) = two_process_save
    for r in (r0, r1):
        assert r["same"] == r["sums"]  # same layout, same reduction order: exact
        assert r["other"] == pytest.approx(r["sums"], rel=1e-5)  # sums reduce in another order
        assert r["other_spec"] == "P('data', 'model')"
        assert r["crossed"] == pytest.approx(r["sums"], rel=1e-5)


def test_regions_no_process_holds_whole_are_checked_by_one_of_them(two_process_save):
    _, (r0, r1) = two_process_save
    checked = [names for r in (r0, r1) for names in r["host_checked"]]
    kernels = {n for names in checked for n in names}
    assert kernels == {"layer0/kernel", "layer1/kernel", "layer2/kernel"}  # each by one process or both


def test_restore_onto_one_process_with_8_devices(two_process_save):
    workdir, (r0, _) = two_process_save
    restored = jstate.Saver().restore(workdir, jstate.abstract(model))
    expected = jstate.init(model, jax.random.key(0))  # values do not depend on placement
    for name in expected:
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(expected[name]))
        assert float(np.sum(np.asarray(restored[name]))) == pytest.approx(r0["sums"][name], rel=1e-5)


def test_task_placement_maps_to_that_process(two_process_save):
    _, (r0, r1) = two_process_save
    assert r0["task1_process"] == r1["task1_process"] == 1


def test_killing_one_process_mid_save_leaves_previous_checkpoint_valid(tmp_path):
    # The Saver's timeout (2 s) passes before JAX's heartbeat timeout (10 s) would end process 0.
    results = run_processes("kill", tmp_path, timeout=90, env={**os.environ, "JSTATE_TEST_KILL_TIMEOUT": "2"})
    assert results[1][0] == 9
    assert results[0][0] == 0, results[0][2][-3000:]
    assert last_json(results[0][1])["failed"].startswith(f"Saving checkpoint {tmp_path / 'model-2'} failed")
    assert jstate.latest_checkpoint(tmp_path) == str(tmp_path / "model-1")
    restored = jstate.Saver().restore(tmp_path, jstate.abstract(model))
    assert restored.uninitialized() == []
