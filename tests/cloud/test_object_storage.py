"""Checkpoints on object storage (gs:// and s3://) where paths, buckets, neighbours and other
writers are not what a save expects: URLs that only look like paths, buckets without a prefix,
foreign objects, an unreachable store, another machine's live writer, many checkpoints beside,
threads, interrupts.

Against the emulators of tests/cloud/emulators.py (fake-gcs-server and moto on 127.0.0.1). Every
test works in a fresh prefix; subprocesses get the loopback environment (`emulators.subprocess_env`).
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import uuid

import emulators
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from emulators import Emulator, objects, small

import jstate
from jstate.storage import store as _storage

pytestmark = pytest.mark.slow  # hundreds of requests to the emulators, subprocesses


def _python(code: str, env: dict, args=(), cwd=None, timeout=120.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=emulators.subprocess_env(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_dotdot_in_url_never_commits_an_unreadable_checkpoint(root):
    """``s3://bucket/run/x/../y/model``: fsspec would write the manifest under the literal key
    ``x/../y/model-1/``, Orbax the arrays under ``y/model-1/``. The save is refused before anything
    is written, or saved where it is read back from."""
    url = f"{root}/x/../y/model"
    try:
        path = jstate.Saver().save(small(3.0), url, step=1)
    except jstate.CheckpointError:
        assert objects(root) == [], "refused, but after writing"
        return
    np.testing.assert_array_equal(jstate.load_variable(path, "w"), np.full(8, 3.0, np.float32))
    latest = jstate.latest_checkpoint(path.rsplit("/", 1)[0])
    np.testing.assert_array_equal(jstate.load_variable(latest, "w"), np.full(8, 3.0, np.float32))


def _create_bucket(store: Emulator, name: str) -> None:
    if store.scheme == "gs":
        body = json.dumps({"name": name}).encode()
        status = emulators._http("POST", f"{store.endpoint}/storage/v1/b?project={emulators.PROJECT}", body)
        assert status in (200, 409), status
    else:
        import boto3

        boto3.client("s3", endpoint_url=store.endpoint).create_bucket(Bucket=name)


def test_bucket_without_prefix_and_a_step_does_not_write_another_bucket(store, tmp_path, monkeypatch):
    """``saver.save(state, "gs://B", step=1)`` never writes to the bucket ``B-1`` (on a real store,
    someone else's: bucket names are global): a bucket alone names no prefix, so the save is a
    CheckpointError or goes under ``gs://B/``."""
    monkeypatch.chdir(tmp_path)
    bucket = f"odd-{uuid.uuid4().hex[:8]}"
    for name in (bucket, f"{bucket}-1"):
        _create_bucket(store, name)
    other = f"{store.scheme}://{bucket}-1"
    try:
        written = jstate.Saver().save(small(), f"{store.scheme}://{bucket}", step=1)
    except jstate.CheckpointError:
        written = None
    assert objects(other) == [], f"the save wrote into another bucket: {written}"
    assert written is None or written.startswith(f"{store.scheme}://{bucket}/")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_url_mangled_by_pathlib_is_refused_not_written_locally(cloud_env, scheme, tmp_path, monkeypatch):
    """``pathlib.Path("s3://bucket/run/model")`` is ``s3:/bucket/run/model``, which would read as a
    relative local path: it is refused with a CheckpointError (pass the URL as a string), and no
    local ``gs:`` or ``s3:`` directory is made."""
    monkeypatch.chdir(tmp_path)
    url = f"{scheme}://{emulators.BUCKET}/odd-{uuid.uuid4().hex[:8]}/model"
    for mangled in (pathlib.Path(url), url.replace("://", ":/")):
        with pytest.raises(jstate.CheckpointError):
            jstate.Saver().save(small(), mangled, step=1)
    assert os.listdir(tmp_path) == []


def test_foreign_objects_beside_checkpoints_do_not_hide_them(gcs, tmp_path, monkeypatch):
    """A prefix holding jstate checkpoints and one more directory with an ``_METADATA`` object (a
    damaged or foreign Orbax checkpoint) is still a directory of checkpoints: latest_checkpoint
    and list_checkpoints find the jstate ones; beside a valid plain Orbax checkpoint, the newest
    of them all. The prefix itself is never taken for one Orbax checkpoint."""
    monkeypatch.chdir(tmp_path)
    base = gcs.url(f"odd-{uuid.uuid4().hex[:8]}")
    damaged, plain = f"{base}/damaged", f"{base}/plain"
    for run in (damaged, plain):
        jstate.Saver().save(small(1.0), f"{run}/model", step=1)
        jstate.Saver().save(small(2.0), f"{run}/model", step=2)
    _storage.write_bytes(_storage.as_path(f"{damaged}/export/_METADATA"), b"{not json")
    emulators.orbax_save(f"{plain}/params", {"a": jnp.ones(3)})

    assert jstate.latest_checkpoint(damaged) == f"{damaged}/model-2"
    assert [row[0] for row in jstate.list_checkpoints(damaged)] == [f"{damaged}/model-1", f"{damaged}/model-2"]
    assert jstate.latest_checkpoint(plain) in (f"{plain}/model-2", f"{plain}/params")
    assert os.listdir(tmp_path) == []


UNREACHABLE = """
import json, jstate
out = {}
for name, call in [
    ("latest_checkpoint", lambda: jstate.latest_checkpoint("s3://jstate-test/run")),
    ("list_checkpoints", lambda: jstate.list_checkpoints("s3://jstate-test/run")),
    ("open_checkpoint", lambda: jstate.open_checkpoint("s3://jstate-test/run/model-1")),
    ("load_variable", lambda: jstate.load_variable("s3://jstate-test/run/model-1", "w")),
]:
    try:
        call()
        out[name] = "returned"
    except Exception as e:
        out[name] = type(e).__name__ + (" (CheckpointError)" if isinstance(e, jstate.CheckpointError) else "")
print(json.dumps(out))
"""


def test_unreachable_store_is_a_checkpoint_error(s3, cloud_env, tmp_path):
    """The S3 endpoint on a closed loopback port: latest_checkpoint, list_checkpoints,
    open_checkpoint and load_variable each raise a CheckpointError (README: "Every failure is one
    jstate.CheckpointError ... naming the path"), never the client's own exception.
    (AWS_MAX_ATTEMPTS=1 only makes it fail fast.)"""
    closed = f"http://{emulators.CLOSED}"
    env = {**cloud_env, "AWS_ENDPOINT_URL": closed, "AWS_ENDPOINT_URL_S3": closed,
           "FSSPEC_S3_ENDPOINT_URL": closed, "AWS_MAX_ATTEMPTS": "1"}  # fmt: skip
    completed = _python(UNREACHABLE, env, cwd=str(tmp_path), timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert all(v.endswith("(CheckpointError)") for v in result.values()), result
    assert os.listdir(tmp_path) == []


PAUSED_SAVE = """
import json, os, sys
import jax.numpy as jnp, jstate
from jstate.formats import integrity as _integrity
root = sys.argv[1]
real = _integrity.file_records
def paused(*args, **kwargs):  # arrays written, manifest not yet: wait for the other writer
    print("paused", flush=True)
    sys.stdin.readline()  # "go", or the end of input
    return real(*args, **kwargs)
_integrity.file_records = paused
out = {"pid": os.getpid()}
try:
    out["path"] = jstate.Saver().save(jstate.State.from_tree({"w": jnp.full(8, 2.0)}), root + "/model", step=2)
    out["w"] = jstate.load_variable(out["path"], "w").tolist()
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"[:600]
print(json.dumps(out), flush=True)
"""

OTHER_SAVE = """
import os, sys, jax.numpy as jnp, jstate
print(os.getpid(), jstate.Saver().save(jstate.State.from_tree({"w": jnp.full(8, 3.0)}), sys.argv[1] + "/model", step=3), flush=True)
"""


def _pid_namespaces_unavailable() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("unshare"):
        return "needs Linux, root and unshare"
    probe = subprocess.run(["unshare", "-p", "-f", "--mount-proc", "true"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"unshare -p does not work here: {probe.stderr.strip()}"


def test_live_writer_on_another_machine_with_same_host_name_and_pid_is_not_cleaned(gcs, cloud_env, tmp_path):
    """Two containers on two machines, both with host name H and the trainer as pid 1 (simulated:
    two PID namespaces on this host, each writer is pid 1). Writer B is paused between its arrays
    and its manifest while writer A saves beside it: A does not take B's files for its own
    leftovers (host names and pids repeat across machines), B's save completes and restores, and
    all three checkpoints are listed. README: "a live writer's files are never touched"."""
    reason = _pid_namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    root = gcs.url(f"odd-{uuid.uuid4().hex[:8]}")
    jstate.Saver().save(small(1.0), f"{root}/model", step=1)
    work = tmp_path / "cwd"
    work.mkdir()
    env = emulators.subprocess_env(cloud_env)

    def in_pid_namespace(code: str, *args: str) -> list[str]:
        return ["unshare", "-p", "-f", "--mount-proc", sys.executable, "-c", textwrap.dedent(code), *args]

    writer_b = subprocess.Popen(
        in_pid_namespace(PAUSED_SAVE, root), env=env, cwd=work,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.PIPE,
    )  # fmt: skip
    try:
        paused = writer_b.stdout.readline()  # B is between its arrays and its manifest
        assert paused == "paused\n", paused + writer_b.communicate()[1][-3000:]
        writer_a = subprocess.run(
            in_pid_namespace(OTHER_SAVE, root), env=env, cwd=work, capture_output=True, text=True, timeout=120,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert writer_a.returncode == 0, writer_a.stderr[-3000:]
    finally:
        out, err = writer_b.communicate("go\n", timeout=120)
    result = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"error": err[-3000:]}
    assert writer_a.stdout.split()[0] == str(result.get("pid")), "the simulation needs the same pid in both"
    assert result.get("w") == [2.0] * 8, result
    assert sorted(row[0] for row in jstate.list_checkpoints(root)) == [f"{root}/model-{s}" for s in (1, 2, 3)]
    assert os.listdir(work) == []


def _http_requests(monkeypatch, fn) -> int:
    """The HTTP requests the storage clients send while `fn` runs (gcsfs and s3fs both send
    through aiohttp; Orbax's own file operations included, tensorstore's array reads not)."""
    import aiohttp

    count = 0
    real = aiohttp.ClientSession._request

    async def counting(self, *args, **kwargs):
        nonlocal count
        count += 1
        return await real(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(aiohttp.ClientSession, "_request", counting)
        fn()
    assert count, "no request counted: the clients no longer send through aiohttp.ClientSession._request"
    return count


def _jstate_requests(monkeypatch, fn) -> int:
    """The requests jstate itself sends while `fn` runs: its calls of a storage client
    (`storage.remote._call`: one request each, or one per page of a listing). Orbax's own are
    left out: within one save, its background threads read back the step metadata they write
    a number of times that varies from run to run (`_CHECKPOINT_METADATA`, read again only if a
    write queued before has landed), whatever is beside."""
    from jstate.storage import remote as _remote

    count = 0
    real = _remote._call

    def counting(*args, **kwargs):
        nonlocal count
        count += 1
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(_remote, "_call", counting)
        fn()
    assert count, "no request counted: jstate no longer sends through storage.remote._call"
    return count


def test_requests_do_not_grow_with_the_checkpoints_beside(root, monkeypatch):
    """One listing of the prefix judges every checkpoint in it: a save, latest_checkpoint,
    open_checkpoint and a restore cost the same requests beside 20 checkpoints as beside 5
    (within a request or two); list_checkpoints, which shows what each manifest holds, costs one
    request more per checkpoint.

    A save's own requests are counted apart from Orbax's (`_jstate_requests`): Orbax's vary by a
    few from save to save (63 to 67 on GCS, measured). All of a save's requests together must
    still grow by less than one per checkpoint added: a request per checkpoint beside, jstate's or
    Orbax's, fails it."""
    saver, state = jstate.Saver(), small()
    costs, saved = {}, 0
    for n in (5, 20):
        while saved < n:
            saver.save(state, f"{root}/model", step=saved)
            saved += 1
        costs[n] = {
            "latest_checkpoint": _http_requests(monkeypatch, lambda: jstate.latest_checkpoint(root)),
            "open_checkpoint": _http_requests(monkeypatch, lambda: jstate.open_checkpoint(root)),
            "restore": _http_requests(monkeypatch, lambda: saver.restore(root, state)),
            "list_checkpoints": _http_requests(monkeypatch, lambda: jstate.list_checkpoints(root)),
            "save": _jstate_requests(monkeypatch, lambda n=n: saver.save(state, f"{root}/model", step=1000 + n)),
            "save with Orbax's": _http_requests(
                monkeypatch, lambda n=n: saver.save(state, f"{root}/model", step=2000 + n)
            ),
        }
        saved += 2
    few, many = costs[5], costs[20]
    for name in ("latest_checkpoint", "open_checkpoint", "restore", "save"):
        assert many[name] <= few[name] + 2, costs
    assert many["save with Orbax's"] < few["save with Orbax's"] + 15, costs
    assert many["list_checkpoints"] - few["list_checkpoints"] <= 15 + 2, costs
    assert few["latest_checkpoint"] <= 20, costs


def test_a_listing_older_than_a_resave_still_opens_the_new_checkpoint(root):
    """A checkpoint is judged from a listing taken before it was opened: re-saved in between
    (its old arrays removed), it is the new checkpoint that opens, whole."""
    from jstate.formats import native as _native
    from jstate.formats.manifest import Manifest

    path = jstate.Saver().save(small(1.0), f"{root}/model")
    listed = _storage.files(_storage.as_path(path))
    jstate.Saver().save(small(2.0), path)
    ckpt = _native.load_listed(_storage.as_path(path), listed)
    assert ckpt.manifest == Manifest.read(_storage.as_path(path))
    np.testing.assert_array_equal(ckpt.read_host(["w"])["w"], np.full(8, 2.0, np.float32))


def test_arrays_a_killed_resave_left_are_removed_by_the_next_save_beside(root, monkeypatch):
    """A re-save killed after its manifest, before it removed the arrays it replaced, leaves two
    arrays directories: the next save beside removes the one the manifest does not name (a
    checkpoint with one is left unread)."""
    from jstate.formats import commit as _commit

    path = jstate.Saver().save(small(1.0), f"{root}/model", step=1)
    with monkeypatch.context() as m:
        m.setattr(_commit, "clean_checkpoint", lambda *args, **kwargs: None)  # as if killed before it
        jstate.Saver().save(small(2.0), path)
    assert len({n.split("/")[0] for n in objects(path) if n.startswith("arrays-")}) == 2
    jstate.Saver().save(small(3.0), f"{root}/model", step=2)
    assert len({n.split("/")[0] for n in objects(path) if n.startswith("arrays-")}) == 1
    np.testing.assert_array_equal(jstate.load_variable(path, "w"), np.full(8, 2.0, np.float32))


def test_odd_but_valid_paths_round_trip(root):
    """Double slash, spaces, unicode, '?' and '#' in names; a trailing slash saves the directory
    named, and with a step is refused (the step would name a checkpoint beside it), as locally."""
    for i, url in enumerate([f"{root}/a//b/model", f"{root}/sp ace/mödel ü", f"{root}/q?x=1#f/m"]):
        path = jstate.Saver().save(small(i), url, step=1)
        assert "//" not in path.split("://", 1)[1] and not path.endswith("/")
        assert jstate.latest_checkpoint(path.rsplit("/", 1)[0]) == path
        np.testing.assert_array_equal(jstate.load_variable(path, "w"), np.full(8, i, np.float32))
    with pytest.raises(jstate.CheckpointError, match=r"trail/model/' with step=1: .*trail/model/model'.*Nothing was"):
        jstate.Saver().save(small(7), f"{root}/trail/model/", step=1)
    assert jstate.latest_checkpoint(f"{root}/trail") is None
    path = jstate.Saver().save(small(7), f"{root}/trail/model/")
    assert path == f"{root}/trail/model"
    np.testing.assert_array_equal(jstate.load_variable(path, "w"), np.full(8, 7, np.float32))


def test_missing_bucket_is_a_clear_error(store, tmp_path, monkeypatch):
    """No bucket: no latest checkpoint, a save that names the bucket, and CheckpointNotFoundError."""
    monkeypatch.chdir(tmp_path)
    url = f"{store.scheme}://no-such-bucket-{uuid.uuid4().hex[:6]}/run"
    assert jstate.latest_checkpoint(url) is None
    with pytest.raises(jstate.CheckpointError, match="no-such-bucket"):
        jstate.Saver(timeout=20).save(small(), f"{url}/model", step=1)
    with pytest.raises(jstate.CheckpointNotFoundError):
        jstate.open_checkpoint(f"{url}/model-1")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("store", ["gcs"], indirect=True)
def test_two_threads_same_prefix_with_retention(root):
    """Two threads saving into one prefix, each with max_to_keep=2: every latest checkpoint read
    meanwhile holds its own step, and two checkpoints remain, with nothing else in the prefix."""
    import threading

    errors = []

    def worker(k):
        saver = jstate.Saver(max_to_keep=2)
        for i in range(3):
            try:
                saver.save(small(k * 100 + i), f"{root}/model", step=k * 100 + i)
                latest = jstate.latest_checkpoint(root)
                assert jstate.load_variable(latest, "w")[0] == float(latest.rsplit("-", 1)[1])
            except Exception as e:
                errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    listed = [row[0] for row in jstate.list_checkpoints(root)]
    assert len(listed) == 2 and {p.rsplit("-", 1)[1] for p in listed} <= {"101", "102", "201", "202"}
    assert sorted({n.split("/")[0] for n in objects(root)}) == sorted(p.rsplit("/", 1)[1] for p in listed)


@pytest.mark.parametrize("store", ["s3"], indirect=True)
def test_background_save_interrupted_then_next_save_works(root, monkeypatch):
    """Ctrl-C while a background save starts, or while it records its files: earlier
    checkpoints stay the latest, nothing of the interrupted saves is left, and the next save works."""
    from jstate.formats import integrity as _integrity
    from jstate.formats import orbax as _orbax

    saver = jstate.Saver(max_to_keep=3)
    saver.save(small(1.0), f"{root}/model", step=1)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(_orbax.Writer, "save", interrupt)
        with pytest.raises(KeyboardInterrupt):
            saver.save(small(2.0), f"{root}/model", step=2, blocking=False)
    with monkeypatch.context() as m:
        m.setattr(_integrity, "file_records", interrupt)
        saver.save(small(3.0), f"{root}/model", step=3, blocking=False)
        with pytest.raises(jstate.CheckpointError, match="interrupted"):
            saver.wait()
    assert jstate.latest_checkpoint(root) == f"{root}/model-1"
    saver.save(small(4.0), f"{root}/model", step=4, blocking=False)
    saver.wait()
    assert [row[0] for row in jstate.list_checkpoints(root)] == [f"{root}/model-1", f"{root}/model-4"]
    assert sorted({n.split("/")[0] for n in objects(root)}) == ["model-1", "model-4"]


@pytest.mark.parametrize("store", ["s3"], indirect=True)
def test_restore_onto_named_shardings_from_eval_shape(root):
    """A train state saved from a 4 x 2 mesh restores onto a 2 x 4 mesh's shardings, from the
    target `jax.eval_shape` gives."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4, 2), ("data", "model"))

    def make(key):
        return {"w": jax.random.normal(key, (16, 8)), "opt": {"m": jnp.zeros((16, 8)), "count": jnp.int32(3)}}

    specs = {"w": P("data", "model"), "opt": {"m": P(None, "model"), "count": P()}}
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
    train = jax.jit(make, out_shardings=shardings)(jax.random.key(0))
    jstate.Saver().save(train, f"{root}/train", step=5)
    other = jax.make_mesh((2, 4), ("data", "model"))
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(other, s)),
        jax.eval_shape(make, jax.random.key(0)),
        specs,
        is_leaf=lambda x: isinstance(x, P),
    )
    restored = jstate.Saver().restore(root, target)
    assert restored["w"].sharding == target["w"].sharding
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(train["w"]))
    assert int(restored["opt"]["count"]) == 3


@pytest.mark.parametrize("store", ["gcs"], indirect=True)
def test_inspect_cli_on_object_store(root, cloud_env, tmp_path):
    """``python -m jstate inspect URL --values`` reads a checkpoint on object storage."""
    path = jstate.Saver().save(small(5.0), f"{root}/model", step=1)
    completed = subprocess.run(
        [sys.executable, "-m", "jstate", "inspect", path, "--values"],
        env=emulators.subprocess_env(cloud_env), cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "tensor_name: w  shape: (8,)  dtype: float32" in completed.stdout and "5." in completed.stdout


def _resave_between_compare_and_delete(root, monkeypatch) -> None:
    """Retention (max_to_keep=1) chooses model-1 for deletion and compares its manifest; another
    writer re-saves model-1 (value 11) just before the delete request."""
    from jstate.formats import commit as _commit

    retiring = jstate.Saver(max_to_keep=1)
    retiring.save(small(1.0), f"{root}/model", step=1)
    real, events = _storage.unlink_if, []

    def resave_first(path, version):
        if not events:
            events.append(str(path))
            jstate.Saver().save(small(11.0), f"{root}/model", step=1)
        return real(path, version)

    monkeypatch.setattr(_commit._storage, "unlink_if", resave_first)
    retiring.save(small(2.0), f"{root}/model", step=2)
    monkeypatch.undo()
    assert events == [f"{root}/model-1/jstate.json"]


@pytest.mark.parametrize("store", ["s3"], indirect=True)  # moto honours S3's If-Match on DeleteObject
def test_a_resave_between_retentions_compare_and_delete_is_kept(root, monkeypatch):
    _resave_between_compare_and_delete(root, monkeypatch)
    listed = {row[0].rsplit("/", 1)[1] for row in jstate.list_checkpoints(root)}
    assert listed == {"model-1", "model-2"}
    np.testing.assert_array_equal(jstate.load_variable(f"{root}/model-1", "w"), np.full(8, 11.0, np.float32))
    assert jstate.latest_checkpoint(root) == f"{root}/model-1"  # saved last


@pytest.mark.parametrize("store", ["gcs"], indirect=True)
def test_retention_on_gcs_deletes_only_the_generation_it_compared(root, monkeypatch):
    """fake-gcs-server ignores `ifGenerationMatch` on deletes (real GCS honours it): what is checked
    here is that the request carries the generation of the manifest compared, not a later one."""
    import fsspec

    fs = fsspec.filesystem("gs", use_listings_cache=False)
    sent, real_call = [], type(fs).call

    def call(self, method, path, *args, **kwargs):
        if method == "DELETE" and "ifGenerationMatch" in kwargs:
            sent.append((args[-1], kwargs["ifGenerationMatch"]))
        return real_call(self, method, path, *args, **kwargs)

    saver = jstate.Saver(max_to_keep=1)
    saver.save(small(1.0), f"{root}/model", step=1)
    generation = _storage.version(_storage.as_path(f"{root}/model-1/jstate.json"))
    monkeypatch.setattr(type(fs), "call", call)
    saver.save(small(2.0), f"{root}/model", step=2)
    assert [(name.rsplit("/", 2)[-2:], g) for name, g in sent] == [(["model-1", "jstate.json"], generation)]
