"""The object-storage test harness (tests/emulators.py) against real emulators on 127.0.0.1: fake-gcs-server
for gs://, moto for s3://. Every test does real I/O through an emulator; a test whose emulator cannot
start is skipped with the reason. Nothing may contact an address other than loopback: the last test
proves it in a network namespace that has only loopback, with every connect() traced."""

import os
import re
import shutil
import subprocess
import sys
import uuid
import warnings

import emulators
import numpy as np
import pytest
from emulators import Emulator, encode_arrays, orbax_save, restore_in_fresh_process, sample_tree

# The harness itself, and the run of the other cloud tests in a network namespace: jstate's own
# use of the emulators is in the other files.
pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))


def unique(emulator: Emulator, name: str) -> str:
    return emulator.url(f"{name}-{uuid.uuid4().hex[:8]}")


def test_epath_files(store, cloud_env):
    """Write, read, list, rename, exclusive create and delete through etils.epath (gcsfs / s3fs)."""
    from etils import epath

    root = epath.Path(unique(store, "epath"))
    root.mkdir(parents=True, exist_ok=True)  # A no-op on object storage: nothing exists until written.
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.bin").write_bytes(b"\x00\x01\xff")
    assert root.is_dir() and (root / "sub").is_dir() and (root / "a.txt").is_file()
    assert (root / "a.txt").read_text() == "alpha"
    assert (root / "sub" / "b.bin").read_bytes() == b"\x00\x01\xff"
    assert sorted(p.name for p in root.iterdir()) == ["a.txt", "sub"]
    assert [p.name for p in root.glob("*/*.bin")] == ["b.bin"]
    assert (root / "a.txt").stat().length == 5

    (root / "a.txt").rename(root / "c.txt")  # One object: copy, then delete.
    assert not (root / "a.txt").exists() and (root / "c.txt").read_text() == "alpha"
    (root / "lock").touch(exist_ok=False)  # Check-then-write: not atomic, but refuses an existing object.
    with pytest.raises(FileExistsError):
        (root / "lock").touch(exist_ok=False)

    (root / "lock").unlink()
    assert not (root / "lock").exists()
    root.rmtree()
    assert not root.exists() and not (root / "sub" / "b.bin").exists()


def test_orbax_checkpoint_on_gcs_restores_in_a_fresh_process(gcs, cloud_env, tmp_path, monkeypatch):
    """Orbax's StandardCheckpointer saves to gs:// with and without OCDBT; a new process restores both
    bit for bit. (A test that only saves can pass while the arrays went to a local directory.)"""
    from etils import epath

    monkeypatch.chdir(tmp_path)  # A local directory named "gs:" would show up here.
    tree = sample_tree()
    paths = {ocdbt: unique(gcs, f"orbax-ocdbt-{ocdbt}") for ocdbt in (True, False)}
    for ocdbt, path in paths.items():
        orbax_save(path, tree, use_ocdbt=ocdbt)
        assert (epath.Path(path) / "commit_success.txt").exists()
    assert (epath.Path(paths[True]) / "manifest.ocdbt").exists()
    assert (epath.Path(paths[False]) / "ids").is_dir()  # One zarr array per leaf without OCDBT.

    restored = restore_in_fresh_process(list(paths.values()), cloud_env, cwd=str(tmp_path))
    for path in paths.values():
        assert restored[path] == encode_arrays(tree)
    assert os.listdir(tmp_path) == []


def test_tensorstore_s3_driver(s3, cloud_env):
    """tensorstore's own s3 driver, endpoint in the spec: an array written and read back; the objects are
    in moto's bucket (listed through boto3)."""
    import boto3
    import tensorstore as ts

    prefix = f"ts-{uuid.uuid4().hex[:8]}/"
    spec = {"driver": "zarr3", "kvstore": s3.kvstore(prefix), "metadata": {"shape": [5, 4], "data_type": "int32"}}
    expected = np.arange(20, dtype=np.int32).reshape(5, 4) * -7
    ts.open(spec, create=True).result().write(expected).result()
    got = ts.open({"driver": "zarr3", "kvstore": s3.kvstore(prefix)}).result().read().result()
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.int32

    client = boto3.client("s3", endpoint_url=s3.endpoint)  # Credentials and region from cloud_env.
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix).get("Contents", [])]
    assert f"{prefix}zarr.json" in keys and len(keys) > 1


def _strace_works(strace: list[str]) -> bool:
    """strace is installed and may trace here (not under another tracer, nor without CAP_SYS_PTRACE)."""
    if not shutil.which("strace"):
        return False
    return subprocess.run([*strace, "-o", os.devnull, "true"], capture_output=True).returncode == 0


CONNECT = re.compile(r'connect\(\d+, \{sa_family=(AF_INET6?),.*?(?:inet_addr\("|inet_pton\(AF_INET6, ")([^"]+)"')


def test_nothing_leaves_loopback(tmp_path):
    """The self-check (emulators, Orbax on gs:// restored in a fresh process, tensorstore and epath on
    s3://) inside a new network namespace that has only loopback; with strace, every connect() of
    every process is to 127.0.0.1 or ::1."""
    reason = emulators.namespace_unavailable()
    if reason:
        pytest.skip(reason)
    trace = tmp_path / "connect.trace"
    strace = ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect", "-e", "signal=none", "-o", str(trace)]
    traced = _strace_works(strace[:-2])
    if not traced:  # The namespace alone still guarantees it; only the list of connections is missing.
        warnings.warn("strace is missing or cannot trace here: connections not listed", stacklevel=1)
    command = " ".join([*(strace if traced else []), sys.executable, os.path.join(HERE, "emulators.py"), "selfcheck"])
    result = subprocess.run(
        ["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {command}"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr[-6000:]}"
    assert '"ok": true' in result.stdout
    if trace.exists():
        addresses = [m.group(2) for m in CONNECT.finditer(trace.read_text())]
        assert "127.0.0.1" in addresses, "strace saw no connection: the trace is not working"
        outside = {a for a in addresses if not (a.startswith("127.") or a in ("::1", "::ffff:127.0.0.1"))}
        assert not outside, f"connections outside loopback: {outside}"
    assert [p.name for p in tmp_path.iterdir()] in ([], ["connect.trace"])  # Nothing written locally.


def test_the_cloud_tests_pass_inside_a_network_namespace(request):
    """Where this machine can make a network namespace with only loopback (root, `unshare -n`),
    every test of this session that uses the emulators runs in one, in a pytest run of its own:
    there, nothing could reach another host even if a client ignored the loopback environment.
    (This session skips them, saying so: tests/cloud/conftest.py; elsewhere they run in it, kept
    on loopback by their environment.)"""
    if os.environ.get(emulators.IN_NAMESPACE) == "1":
        pytest.skip("this is the run inside the namespace")
    reason = emulators.namespace_unavailable()
    if reason:
        pytest.skip(f"{reason}: the cloud tests run in this session, on loopback by their environment")
    ids = [item.nodeid for item in request.session.items if emulators.uses_emulators(item)]
    if not ids:
        pytest.skip("no test of this session uses the emulators")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "--strict-markers"]
    result = subprocess.run(
        ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command, "-rfEs", *ids],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=request.config.rootpath,
        env={**os.environ, emulators.IN_NAMESPACE: "1"},
        stdin=subprocess.DEVNULL,
    )
    summary = result.stdout[-8000:]
    assert result.returncode == 0, f"the cloud tests failed inside the namespace:\n{summary}\n{result.stderr[-2000:]}"
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= min(40, len(ids)), (
        f"too few cloud tests ran inside the namespace:\n{summary}"
    )
    assert "emulator unavailable" not in summary, f"an emulator did not start inside the namespace:\n{summary}"
