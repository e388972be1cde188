"""jstate checkpoints on gs:// and s3://, against fake-gcs-server and moto on 127.0.0.1
(tests/cloud/emulators.py).

The same commit rule as on local disk: the manifest, one object written last, is the commit. Every
test works in a fresh prefix of the one bucket each emulator serves; a test whose emulator could
not start is skipped with the reason. Saves are checked by restoring in a fresh process whose
working directory is empty, so a save that wrote its arrays locally (a directory named ``s3:``)
cannot pass.
"""

import json
import os
import subprocess
import sys
import textwrap
import uuid

import emulators
import jax
import multihost
import numpy as np
import pytest
from emulators import objects

import jstate
from jstate.checkpoint.inspect import inspect_checkpoint
from jstate.formats import orbax as _orbax
from jstate.formats import orbax_s3
from jstate.storage import store as _storage
from jstate.storage import tokens as _tokens


def model(s):
    s.variable("kernel", jstate.initializers.normal(1.0), (64, 32))
    s.variable("bias", jstate.initializers.zeros, (32,))
    s.variable("step", jstate.initializers.zeros, (), "int32")


def make_state(value: int) -> jstate.State:
    return jstate.init(model, jax.random.key(0)).assign("step", value)


def restore_in_fresh_process(path: str, env: dict, cwd) -> dict:
    """``{name: [dtype, shape, sum]}`` of the checkpoint at `path`, restored by a new process."""
    code = """
    import json, sys
    import jstate
    ckpt = jstate.open_checkpoint(sys.argv[1])
    values = ckpt.read_host(list(ckpt.entries))
    print(json.dumps({n: [str(v.dtype), list(v.shape), float(v.sum())] for n, v in values.items()}))
    """
    return json.loads(emulators.run_python(code, env, args=[path], cwd=str(cwd)).strip().splitlines()[-1])


@pytest.mark.slow
def test_save_restore_latest_and_retention(store, root, cloud_env, tmp_path):
    """Saves with a step and max_to_keep=2: the checkpoints listed, the latest, the variables, the
    retained ones (the retired one's objects all gone), a restore here and one in a fresh process."""
    saver = jstate.Saver(max_to_keep=2)
    paths = [saver.save(make_state(step), f"{root}/model", step=step) for step in (1, 2, 3)]
    assert paths == [f"{root}/model-{step}" for step in (1, 2, 3)]
    assert jstate.latest_checkpoint(root) == jstate.latest_checkpoint(f"{root}/model") == paths[2]
    assert [row[0] for row in jstate.list_checkpoints(root)] == paths[1:]
    assert saver.last_checkpoints == paths[1:]
    assert not any(name.startswith("model-1/") for name in objects(root))  # manifest and arrays

    assert jstate.list_variables(paths[2]) == [
        ("bias", (32,), np.dtype("float32")),
        ("kernel", (64, 32), np.dtype("float32")),
        ("step", (), np.dtype("int32")),
    ]
    assert int(jstate.load_variable(paths[1], "step")) == 2
    restored = saver.restore(root, jstate.abstract(model))  # a directory: its latest
    np.testing.assert_array_equal(np.asarray(restored["kernel"]), np.asarray(make_state(3)["kernel"]))
    assert int(restored["step"]) == 3

    fresh = restore_in_fresh_process(root, cloud_env, tmp_path)
    assert fresh["step"] == ["int32", [], 3.0]
    assert fresh["kernel"][:2] == ["float32", [64, 32]]
    assert fresh["kernel"][2] == pytest.approx(float(np.asarray(make_state(3)["kernel"]).sum()), rel=1e-6)


def test_resave_replaces_and_inspect_prints(root, capsys):
    saver = jstate.Saver()
    path = saver.save(make_state(1), f"{root}/model")
    saver.save(make_state(2), path)  # a new manifest naming new arrays, the old arrays removed
    assert int(jstate.load_variable(path, "step")) == 2
    assert len({name.split("/")[0] for name in objects(path) if name.startswith("arrays-")}) == 1
    inspect_checkpoint(path, values=True, name="step")
    assert "tensor_name: step  shape: ()  dtype: int32" in capsys.readouterr().out


def test_safetensors_export_and_read_back(root):
    state = make_state(7)
    path = jstate.save_safetensors(state, f"{root}/model.safetensors")
    assert path == f"{root}/model.safetensors" and objects(root) == ["model.safetensors"]
    assert int(jstate.load_variable(path, "step")) == 7
    restored = jstate.Saver().restore(path, jstate.abstract(model))
    np.testing.assert_array_equal(np.asarray(restored["kernel"]), np.asarray(state["kernel"]))


def test_background_save(root):
    saver = jstate.Saver(max_to_keep=1)
    for step in (1, 2):
        saver.save(make_state(step), f"{root}/model", step=step, blocking=False)
    saver.wait()
    assert jstate.latest_checkpoint(root) == f"{root}/model-2"
    assert [row[0] for row in jstate.list_checkpoints(root)] == [f"{root}/model-2"]


# -- faults ------------------------------------------------------------------------------------
def _arrays_file(path: str, data: bool) -> str:
    """One file of a checkpoint's arrays: an array data file, or Orbax's metadata."""
    names = [n for n in objects(path) if n.startswith("arrays-")]
    return next(n for n in names if _orbax.is_data_file(n) == data and (data or n.endswith("/_METADATA")))


@pytest.mark.parametrize(
    "damage", ["truncate data", "delete data", "delete metadata", "garble manifest", "delete manifest"]
)
def test_damaged_objects_are_never_latest(root, damage):
    """An object deleted or truncated behind jstate's back: the checkpoint is not latest (the one
    before is), and opening it raises an error naming it and the object."""
    saver = jstate.Saver()
    saver.save(make_state(1), f"{root}/model", step=1)
    path = saver.save(make_state(2), f"{root}/model", step=2)
    target = "jstate.json" if "manifest" in damage else _arrays_file(path, data="data" in damage)
    victim = _storage.as_path(f"{path}/{target}")
    if damage.startswith("truncate"):
        _storage.write_bytes(victim, _storage.read_bytes(victim)[:-1])
    elif damage.startswith("garble"):
        _storage.write_bytes(victim, _storage.read_bytes(victim).replace(b'"step":2', b'"step":3'))
    else:
        _storage.unlink(victim)

    assert jstate.latest_checkpoint(root) == f"{root}/model-1"
    assert int(jstate.Saver().restore(root, jstate.abstract(model))["step"]) == 1
    if damage == "delete manifest":
        with pytest.raises(jstate.CheckpointNotFoundError, match="no committed checkpoint"):
            jstate.open_checkpoint(path)
        return
    with pytest.raises(jstate.CorruptCheckpointError, match=f"{path}.*" if "manifest" in damage else target):
        jstate.open_checkpoint(path)


def test_flipped_bits_in_data_are_corruption(store, root):
    """A data object rewritten with one byte changed (same size): CorruptCheckpointError. On GCS,
    which keeps a CRC32C of every object, the message names the damaged object."""
    path = jstate.Saver().save(make_state(1), f"{root}/model")
    damaged = _arrays_file(path, data=True)
    victim = _storage.as_path(f"{path}/{damaged}")
    data = bytearray(_storage.read_bytes(victim))
    data[len(data) // 2] ^= 0xFF
    _storage.write_bytes(victim, bytes(data))
    named = f"damaged file: {victim}" if store.scheme == "gs" else "is damaged"
    with pytest.raises(jstate.CorruptCheckpointError, match=f"{path}.*{named}"):
        jstate.Saver().restore(path, jstate.abstract(model))


KILLED_SAVE = """
import os, sys, threading
import jax, jax.numpy as jnp
import jstate
from jstate.formats import integrity as _integrity
root = sys.argv[1]
jstate.Saver().save(jstate.State.from_tree({"x": jnp.zeros(4)}), root + "/model", step=1)
real = _integrity.file_records
def killed(*args, **kwargs):  # the arrays are written, the manifest not yet: the worst moment
    print("killing", flush=True)
    os._exit(9)
_integrity.file_records = killed
jstate.Saver().save(jstate.State.from_tree({"x": jnp.ones(4)}), root + "/model", step=2)
"""


@pytest.mark.slow
def test_save_killed_mid_way_is_never_listed(root, cloud_env, tmp_path, monkeypatch):
    """A process killed after writing its arrays, before its manifest: never listed, the earlier
    checkpoint is latest. Its leftovers are another process's: kept while younger than
    `_tokens.STALE_AFTER` (a writer on another machine may still be at work), removed by the next
    save into the directory after that."""
    completed = subprocess.run(
        [sys.executable, "-c", KILLED_SAVE, root],
        env=emulators.subprocess_env(cloud_env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 9 and "killing" in completed.stdout, completed.stderr[-3000:]
    assert any(n.startswith("model-2/arrays-") for n in objects(root))  # half a save
    assert jstate.latest_checkpoint(root) == f"{root}/model-1"
    assert [row[0] for row in jstate.list_checkpoints(root)] == [f"{root}/model-1"]
    with pytest.raises(jstate.CheckpointNotFoundError, match="model-2 holds no committed checkpoint"):
        jstate.open_checkpoint(f"{root}/model-2")

    jstate.Saver().save(make_state(3), f"{root}/model", step=3)  # a young leftover: kept
    assert any(n.startswith("model-2/") for n in objects(root))
    monkeypatch.setattr(_tokens, "STALE_AFTER", 0.0)
    jstate.Saver().save(make_state(4), f"{root}/model", step=4)
    assert not any(n.startswith("model-2/") for n in objects(root))
    assert [row[0] for row in jstate.list_checkpoints(root)] == [f"{root}/model-{s}" for s in (1, 3, 4)]


def test_object_store_liveness_is_by_age_for_every_other_writer():
    """On a shared store a pid means nothing: even a dead pid of this host counts as alive until stale."""
    dead = f"{int(__import__('time').time()):x}_999999999_deadbeef_{_tokens._HOST}"
    assert not _tokens.alive(dead) and _tokens.alive(dead, shared=True)
    old = f"{int(__import__('time').time() - _tokens.STALE_AFTER - 10):x}_1_deadbeef_otherhost"
    assert not _tokens.alive(old, shared=True)


# -- paths -------------------------------------------------------------------------------------
def test_unsupported_scheme_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(jstate.CheckpointError, match=r"hdfs://cluster/ckpt.*not hdfs://.*Nothing was"):
        jstate.Saver().save(make_state(1), "hdfs://cluster/ckpt/model", step=1)
    with pytest.raises(jstate.CheckpointError, match="names a bucket first"):
        jstate.latest_checkpoint("gs:///ckpt")
    assert os.listdir(tmp_path) == []


def test_s3_shim_gives_tensorstore_the_s3_driver(s3, cloud_env):
    """The shim against the Orbax installed: s3:// paths get tensorstore's s3 kvstore with the
    emulator's endpoint, with and without OCDBT; gs:// and local paths are left to Orbax."""
    from orbax.checkpoint._src.serialization import tensorstore_utils

    orbax_s3.apply()
    spec = tensorstore_utils.build_kvstore_tspec("s3://bucket/ckpt/arrays-x", use_ocdbt=False)
    assert spec == {"driver": "s3", "bucket": "bucket", "path": "ckpt/arrays-x", "endpoint": s3.endpoint,
                    "aws_region": emulators.REGION, "aws_credentials": {"type": "environment"}}  # fmt: skip
    ocdbt = tensorstore_utils.build_kvstore_tspec("s3://bucket/ckpt/arrays-x/", use_ocdbt=True)
    assert ocdbt["driver"] == "ocdbt" and "s3" in json.dumps(ocdbt) and "file" not in json.dumps(ocdbt)
    assert tensorstore_utils.build_kvstore_tspec("gs://b/c", use_ocdbt=False)["driver"] == "gcs"
    assert tensorstore_utils.build_kvstore_tspec("/tmp/c", use_ocdbt=False)["driver"] == "file"


# -- several processes ---------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_save_to_and_restore_from_gcs(gcs, cloud_env, tmp_path):
    """tests/checkpoint/test_multihost.py's two-process save, with the checkpoint directory on the GCS
    emulator: no local directory is shared (each process's working directory is its own, empty)."""
    root = gcs.url(f"multihost-{uuid.uuid4().hex[:8]}")
    results = multihost.run_processes("save", root, env=emulators.subprocess_env(cloud_env), cwd=tmp_path)
    for code, _, err in results:
        assert code == 0, err[-3000:]
    r0, r1 = (multihost.last_json(out) for _, out, _ in results)
    assert r0["path"] == r1["path"] == r0["latest"] == r1["latest"] == f"{root}/model-2"
    assert r0["same"] == r0["sums"] and r1["same"] == r1["sums"]
    assert r0["other"] == pytest.approx(r0["sums"], rel=1e-5)
    assert [row[0] for row in jstate.list_checkpoints(root)] == [f"{root}/model-1", f"{root}/model-2"]
    restored = jstate.Saver().restore(root, jstate.abstract(multihost.model))
    for name, total in r0["sums"].items():
        assert float(np.sum(np.asarray(restored[name]))) == pytest.approx(total, rel=1e-5)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_killing_one_process_mid_save_to_gcs_leaves_the_previous_checkpoint(gcs, cloud_env, tmp_path):
    """tests/checkpoint/test_multihost.py's kill scenario with the checkpoints on GCS: process 1 dies
    mid-save; process 0's save fails once the Saver's timeout (2 s) has passed at a barrier, instead
    of hanging, and model-1 stays the latest, restorable. (A 16 MiB array, not 256: on the emulator
    the large one took 18 s.)"""
    root = gcs.url(f"multihost-kill-{uuid.uuid4().hex[:8]}")
    env = emulators.subprocess_env({**cloud_env, "JSTATE_TEST_KILL_TIMEOUT": "2", "JSTATE_TEST_KILL_ROWS": "4"})
    results = multihost.run_processes("kill", root, timeout=90, env=env, cwd=tmp_path)
    assert results[1][0] == 9, results[1][2][-3000:]
    assert results[0][0] == 0, results[0][2][-3000:]
    failed = multihost.last_json(results[0][1])["failed"]
    assert failed.startswith(f"Saving checkpoint {root}/model-2 failed") and "Earlier checkpoints are intact" in failed
    assert jstate.latest_checkpoint(root) == f"{root}/model-1"
    assert jstate.Saver().restore(root, jstate.abstract(multihost.model)).uninitialized() == []
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_orbax_unpatched_writes_s3_locally_and_jstate_refuses_an_orbax_it_cannot_patch(s3, cloud_env, tmp_path):
    """Why the shim exists, checked against the Orbax installed: plain Orbax, given s3:// without
    OCDBT, writes its arrays under a local directory named ``s3:`` (if a future Orbax stops, this
    fails, and the shim in jstate/formats/orbax_s3.py can go). And an Orbax whose internals the shim does not
    find gets jstate's error, with nothing written anywhere."""
    code = textwrap.dedent(
        """
        import json, os, sys, jax.numpy as jnp, orbax.checkpoint as ocp
        with ocp.StandardCheckpointer(use_ocdbt=False) as c:
            try:
                c.save(sys.argv[1] + "/plain", {"x": jnp.arange(4)})
                c.wait_until_finished()
            except Exception as e:
                print("failed:", type(e).__name__)
        os.chdir(sys.argv[2])
        import jstate
        from orbax.checkpoint._src.serialization import tensorstore_utils
        del tensorstore_utils._use_gcs_driver  # as if a newer Orbax had renamed it
        try:
            jstate.Saver().save(jstate.State.from_tree({"x": jnp.arange(4)}), sys.argv[1] + "/model", step=1)
            print(json.dumps("saved"))
        except jstate.CheckpointError as e:
            print(json.dumps(str(e)))
        """
    )
    url, elsewhere = s3.url(f"unpatched-{uuid.uuid4().hex[:8]}"), tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = emulators.run_python(code, cloud_env, args=[url, str(elsewhere)], cwd=str(tmp_path))
    assert os.path.isdir(tmp_path / "s3:"), "plain Orbax no longer writes s3:// locally: review the shim"
    message = json.loads(out.strip().splitlines()[-1])
    assert "s3:// checkpoints need orbax-checkpoint 0.12.8" in message and "Nothing was written" in message
    assert os.listdir(elsewhere) == [] and not any(n.startswith("model") for n in objects(url))


# Saves paused after their arrays are written, before their manifests, while the store goes away:
# restarted at once (with its objects: the emulator keeps them on disk), down until the save has
# given up, frozen (SIGSTOP: connections are accepted, nothing answers) for good, or frozen for a
# second (a slow store). One process, its own emulator (the session's is not disturbed), a
# directory per mode; one line of JSON per mode.
STORE_GOES_AWAY = """
import json, os, signal, sys, tempfile, threading
sys.path.insert(0, sys.argv[1])
import emulators
server = emulators.RestartableGCS(tempfile.mkdtemp())
server.start()
os.environ.update(emulators.loopback_env(server.emulator(), None))
import jax.numpy as jnp
import jstate
from jstate.formats import integrity as _integrity

real = _integrity.file_records
for mode in sys.argv[2:]:
    root = "gs://jstate-test/" + mode.replace(" ", "-")
    jstate.Saver().save(jstate.State.from_tree({"x": jnp.zeros(4)}), root + "/model", step=1)

    def store_goes_away(*args, **kwargs):
        pid = server.process.proc.pid
        if mode in ("restart", "stay down"):
            server.stop()
        if mode == "restart":
            server.start()
        if mode in ("stall", "slow"):
            os.kill(pid, signal.SIGSTOP)
        if mode == "slow":
            threading.Timer(1.0, os.kill, (pid, signal.SIGCONT)).start()
        return real(*args, **kwargs)

    _integrity.file_records = store_goes_away
    try:
        timeout = 3 if mode in ("restart", "slow") else 1  # what it completes within; what it must give up after
        jstate.Saver(timeout=timeout).save(jstate.State.from_tree({"x": jnp.ones(4)}), root + "/model", step=2)
        outcome = "saved"
    except jstate.CheckpointError as e:
        outcome = str(e)
    _integrity.file_records = real
    if mode == "stay down":
        server.start()
    if mode == "stall":
        os.kill(server.process.proc.pid, signal.SIGCONT)
    latest = jstate.latest_checkpoint(root)
    print(json.dumps({"mode": mode, "root": root, "outcome": outcome, "latest": latest,
                      "x": jstate.load_variable(latest, "x").tolist(),
                      "listed": [row[0] for row in jstate.list_checkpoints(root)]}), flush=True)
server.stop()
"""
MODES = ["restart", "slow", "stay down", "stall"]


@pytest.fixture(scope="module")
def store_went_away(cloud_session, tmp_path_factory) -> dict:
    if cloud_session.gcs is None:
        pytest.skip(f"GCS emulator unavailable: {cloud_session.gcs_error}")
    cwd = tmp_path_factory.mktemp("store-went-away")
    here = os.path.dirname(os.path.abspath(__file__))
    out = emulators.run_python(STORE_GOES_AWAY, cloud_session.env, args=[here, *MODES], cwd=str(cwd), timeout=150)
    assert os.listdir(cwd) == []
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {r["mode"]: r for r in results}


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_store_going_away_mid_save(store_went_away, mode):
    """Restarted mid-save (objects kept) or slow for a second, the save completes and is latest.
    Down or frozen for good, the save fails with a CheckpointError once a request has waited the
    Saver's timeout (1 s here; the GCS client alone retries for over a minute, and waits on a
    frozen store for ever), and model-1 stays the latest, intact."""
    result = store_went_away[mode]
    root = result["root"]
    if mode in ("restart", "slow"):
        assert result["outcome"] == "saved"
        assert result["latest"] == f"{root}/model-2" and result["x"] == [1.0] * 4
        assert result["listed"] == [f"{root}/model-1", f"{root}/model-2"]
    else:
        assert f"Saving checkpoint {root}/model-2 failed" in result["outcome"]
        assert "did not answer within 1 s" in result["outcome"] or "Cannot connect" in result["outcome"]
        assert result["latest"] == f"{root}/model-1" and result["x"] == [0.0] * 4
        assert result["listed"] == [f"{root}/model-1"]


@pytest.mark.parametrize("store", ["gcs"], indirect=True)
def test_orbax_layout_and_orbax_manager_steps_on_an_object_store(root):
    """`Saver(layout="orbax")` on an object store: retention removes a step's objects whole; a
    CheckpointManager's steps there are read as they are, an unfinished one (no commit file) never."""
    import orbax.checkpoint as ocp

    saver = jstate.Saver(layout="orbax", max_to_keep=2)
    paths = [saver.save(make_state(step), f"{root}/model", step=step) for step in (1, 2, 3)]
    assert jstate.latest_checkpoint(root) == paths[2] == f"{root}/model_3"
    assert not any(name.startswith("model_1/") for name in objects(root))
    assert int(jstate.Saver().restore(root, jstate.abstract(model))["step"]) == 3
    plain = ocp.StandardCheckpointer().restore(f"{paths[2]}/default")
    assert int(plain["step"]) == 3

    with ocp.CheckpointManager(f"{root}/mgr", item_names=("params", "metadata")) as mgr:
        for step in (10, 20):
            mgr.save(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave({"w": np.full(3, step)}), metadata=ocp.args.JsonSave({"step": step})
                ),
            )
    assert jstate.latest_checkpoint(f"{root}/mgr") == f"{root}/mgr/20"
    assert jstate.load_variable(f"{root}/mgr/20", "metadata") == {"step": 20}
    assert jstate.load_variable(f"{root}/mgr", "params/w").tolist() == [20, 20, 20]
    _storage.remove(_storage.as_path(f"{root}/mgr/20/commit_success.txt"))  # as if its save never finished
    assert jstate.latest_checkpoint(f"{root}/mgr") == f"{root}/mgr/10"
