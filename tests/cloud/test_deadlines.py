"""Deadlines and faults of object stores (gs://, s3://): `latest_checkpoint`, `list_checkpoints`,
`open_checkpoint`, `list_variables`, `load_variable` and the Saver with `timeout=` fail within their
timeout with a StoreTimeoutError naming the path, a store that errs or dies mid-answer is a
StoreError (never an older checkpoint passed for the newest), the newest checkpoint is the newest by
the store's clock for lookups and retention alike, and a lookup whose listing went stale looks again.

Store faults are made by a small HTTP proxy on 127.0.0.1 in front of the emulator (`Proxy`):
the clients of this process are pointed at it for the lookup only (`through`), and a rule per
request says whether it is forwarded, answered with an error, cut off mid-body, or held.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import socket
import struct
import threading
import time
import types
import uuid

import emulators
import jax.numpy as jnp
import pytest
from emulators import objects, small

import jstate
from jstate.checkpoint import writer as _writer
from jstate.storage import remote as _remote
from jstate.storage import store as _storage

pytestmark = pytest.mark.slow  # timeouts waited out, subprocesses, a thousand objects


def children(url: str) -> list[str]:
    return sorted({name.split("/", 1)[0] for name in objects(url)})


def value(path: str) -> float:
    return float(jstate.load_variable(path, "w")[0])


def lingering() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("jstate: ")]


def wait_for_workers(seconds: float = 15.0) -> list[str]:
    """The names of jstate's lookup threads still running once each has been waited for (up to
    `seconds` in all): a thread abandoned at a timeout must end by itself."""
    deadline = time.monotonic() + seconds
    for thread in threading.enumerate():
        if thread.name.startswith("jstate: "):
            thread.join(max(0.0, deadline - time.monotonic()))
    return lingering()


# -- a proxy that misbehaves on request ---------------------------------------------------------
class Proxy:
    """An HTTP/1.1 proxy on 127.0.0.1 to `upstream`. `rule(method, path)` decides each request:
    None forwards it; ("status", code, body) answers with that; "freeze" reads the request and
    never answers; "drop" closes the connection unanswered; "reset" resets it; ("cut", n) forwards it and sends the headers and only `n` bytes of the body,
    then closes; ("edit", fn) forwards it with its body replaced by fn(body); ("stall", n) the same but holds the connection open instead of closing."""

    def __init__(self, upstream: str):
        self.upstream = upstream.split("://", 1)[1]
        self.rule = lambda method, path: None
        self.seen: list[tuple[str, str]] = []
        self.released = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                proxy.seen.append((self.command, self.path))
                action = proxy.rule(self.command, self.path)
                if action == "drop":
                    self.close_connection = True
                    return
                if action == "reset":  # closed with a TCP RST: ECONNRESET on the client
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if action == "freeze":
                    proxy.released.wait(120)
                    self.close_connection = True
                    return
                if isinstance(action, tuple) and action[0] == "status":
                    _, code, payload = action
                    self.send_response(code)
                    self.send_header("Content-Length", str(len(payload)))
                    self.send_header("Content-Type", "application/xml" if payload[:1] == b"<" else "application/json")
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")
                }
                if body:
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    response = conn.getresponse()
                    payload = response.read()
                    if isinstance(action, tuple) and action[0] == "edit":
                        payload = action[1](payload)
                    self.send_response(response.status, response.reason)
                    for k, v in response.getheaders():
                        if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if isinstance(action, tuple) and action[0] in ("cut", "stall", "cutreset"):
                        self.wfile.write(payload[: action[1]])
                        self.wfile.flush()
                        if action[0] == "stall":
                            proxy.released.wait(120)
                        if action[0] == "cutreset":
                            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        self.close_connection = True
                        return
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="fault proxy", daemon=True)
        self.thread.start()

    def close(self):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def through(store, extra_env: dict | None = None):
    """This process's gs:// and s3:// clients sent through a `Proxy` to `store` for the block."""
    proxy = Proxy(store.endpoint)
    names = (
        ("STORAGE_EMULATOR_HOST",)
        if store.scheme == "gs"
        else ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "FSSPEC_S3_ENDPOINT_URL")
    )
    env = {**dict.fromkeys(names, proxy.endpoint), **(extra_env or {})}
    with pytest.MonkeyPatch.context() as m:
        for k, v in env.items():
            m.setenv(k, v)
        import fsspec.config

        if store.scheme == "s3":
            m.setitem(fsspec.config.conf, "s3", {**fsspec.config.conf.get("s3", {}), "endpoint_url": proxy.endpoint})
        emulators.reset_clients()
        try:
            yield proxy
        finally:
            proxy.released.set()
            wait_for_workers()
            emulators.reset_clients()
    emulators.reset_clients()
    proxy.close()


@pytest.fixture
def fast_retries(monkeypatch):
    """gcsfs's and s3fs's retries without their back-off sleeps (gcsfs: 6 tries, ~31 s): the
    same errors in the end, sooner."""
    import asyncio

    import gcsfs.retry
    import s3fs.core

    real = asyncio.sleep

    async def sleep(seconds, *args, **kwargs):
        return await real(min(seconds, 0.01), *args, **kwargs)

    monkeypatch.setattr(gcsfs.retry, "asyncio", types.SimpleNamespace(sleep=sleep))
    monkeypatch.setattr(s3fs.core, "asyncio", types.SimpleNamespace(**{**vars(asyncio), "sleep": sleep}))


def manifest_get(path: str, name: str) -> bool:
    """Whether an HTTP request path is the GET of checkpoint `name`'s manifest (GCS JSON API or S3)."""
    from urllib.parse import unquote

    return f"{name}/jstate.json" in unquote(path)


def listing(store, path: str, key: str) -> bool:
    """Whether an HTTP request path lists objects under `key` (GCS JSON API, S3 ListObjectsV2)."""
    from urllib.parse import unquote

    path = unquote(path)
    is_list = "/o?" in path if store.scheme == "gs" else "list-type=2" in path
    return is_list and f"prefix={key}" in path


def _key(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[1]


LOOKUPS = {
    "latest_checkpoint": lambda root, t: jstate.latest_checkpoint(root, timeout=t),
    "list_checkpoints": lambda root, t: jstate.list_checkpoints(root, timeout=t),
    "open_checkpoint": lambda root, t: jstate.open_checkpoint(root, timeout=t),
    "list_variables": lambda root, t: jstate.list_variables(root, timeout=t),
    "load_variable": lambda root, t: jstate.load_variable(root, "w", timeout=t),
}


def _run_all(root: str, timeout: float) -> dict:
    out = {}
    for name, call in LOOKUPS.items():
        start = time.monotonic()
        try:
            result = call(root, timeout)
            out[name] = {"returned": repr(result)[:200]}
        except Exception as e:
            public = getattr(jstate, type(e).__name__, None) is type(e)  # jstate's errors by their public name
            kind = f"jstate.{type(e).__name__}" if public else f"{type(e).__module__}.{type(e).__name__}"
            out[name] = {"type": kind, "message": str(e)[:400],
                         "store_error": isinstance(e, jstate.StoreError)}  # fmt: skip
        out[name]["seconds"] = round(time.monotonic() - start, 2)
    return out


def _latest_while_failing(store, root: str, action) -> str:
    """latest_checkpoint(root) through a `Proxy` that answers every GET of model-2's manifest
    with `action`: what it returned or raised, in words."""
    with through(store, {"AWS_MAX_ATTEMPTS": "1"}) as proxy:
        proxy.rule = lambda method, path: action if method == "GET" and manifest_get(path, "model-2") else None
        try:
            got = f"returned {jstate.latest_checkpoint(root, timeout=60)}"
        except jstate.StoreError as e:
            got = f"StoreError naming model-2: {'model-2' in str(e)}"
        except Exception as e:
            got = f"{type(e).__module__}.{type(e).__name__} (CheckpointError: {isinstance(e, jstate.CheckpointError)})"
        assert any(manifest_get(p, "model-2") for _, p in proxy.seen), "the rule never fired"
    return got


def test_latest_is_never_older_when_the_listed_newest_is_retired_meanwhile(root, monkeypatch):
    """Right after the reader's listing, another writer commits model-12 and retention retires
    model-11, the newest listed: a checkpoint gone since the listing means the listing is stale,
    so latest_checkpoint looks again and answers model-12, never model-10 (kept for good by
    keep_every_n_steps), which was the newest at no moment of the call. The same holds for
    open_checkpoint(dir) and Saver.restore(dir), which find the checkpoint the same way."""
    writer = jstate.Saver(max_to_keep=1, keep_every_n_steps=10)
    for step in (10, 11):
        writer.save(small(step), f"{root}/model", step=step)
    assert children(root) == ["model-10", "model-11"]

    real, raced = _storage.files, []

    def files(directory, prefix=""):
        listed = real(directory, prefix)
        if not raced and str(directory) == root:  # the reader's listing is taken: the writer moves on
            raced.append(True)
            writer.save(small(12), f"{root}/model", step=12)
        return listed

    monkeypatch.setattr(_storage, "files", files)
    latest = jstate.latest_checkpoint(root)
    monkeypatch.undo()
    assert raced and children(root) == ["model-10", "model-12"]
    assert latest == f"{root}/model-12", f"latest_checkpoint answered {latest}, older than every newest of the call"


@pytest.mark.parametrize("store", ["gcs"], indirect=True)
def test_a_metadata_update_on_an_old_manifest_does_not_make_it_the_newest(store, root):
    """On GCS an object's ``updated`` time changes with any metadata (a custom label, a lifecycle
    rule moving it to Nearline); when it was written is ``timeCreated`` (a re-save is a new object).
    Checkpoints rank by when their manifests were written: model-1's manifest labelled after
    model-2 was saved leaves model-2 the latest and list_checkpoints in save order.
    (fake-gcs-server does not bump ``updated`` on a PATCH; the proxy gives its listings GCS's
    behaviour: the PATCH a second after model-2 was written.)"""
    import datetime
    import json
    from urllib.parse import unquote

    paths = [jstate.Saver().save(small(s), f"{root}/model", step=s) for s in (1, 2)]
    # fake-gcs-server leaves `updated` alone on a metadata PATCH; GCS sets it to the PATCH's
    # time (and bumps `metageneration`).
    patched = {}

    def as_gcs(body: bytes) -> bytes:
        listed = json.loads(body)
        for item in listed.get("items", []):
            if item["name"] in patched:
                item["updated"], item["metageneration"] = patched[item["name"]], "2"
        return json.dumps(listed).encode()

    def rule(method, path):
        if method == "PATCH":
            name = unquote(path.split("/o/", 1)[1].split("?", 1)[0])
            later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=1)
            patched[name] = later.isoformat().replace("+00:00", "Z")
        return ("edit", as_gcs) if listing(store, path, _key(root)) else None

    with through(store) as proxy:
        proxy.rule = rule
        fs, key = _remote._fs(_storage.as_path(paths[0]))
        fs.setxattrs(f"{key}/jstate.json", reviewed="yes")  # e.g. a tool marking the checkpoint it evaluated
        assert list(patched) == [f"{key}/jstate.json".split("/", 1)[1]]
        latest = jstate.latest_checkpoint(root)
        listed = [r[0] for r in jstate.list_checkpoints(root)]
    assert latest == paths[1], f"latest_checkpoint answered {latest}"
    assert listed == paths, listed


S3_INTERNAL = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again.</Message></Error>"
)
GCS_UNAVAILABLE = b'{"error": {"code": 503, "message": "Backend Error", "errors": []}}'


def test_a_store_error_on_the_newest_manifest_is_no_damage(store, root, fast_retries):
    """The store answers the GET of the newest manifest with a server error (S3 500
    InternalError, GCS 503), past the clients' retries; the rest is served. Nothing is known
    about model-2, as for an unreachable store: latest_checkpoint raises jstate.StoreError (a
    CheckpointError) naming it, never skips it as damaged to answer the older model-1 (README:
    "latest_checkpoint never answers None for a store that did not answer").
    (AWS_MAX_ATTEMPTS=1 and `fast_retries` only make the clients give up sooner.)"""
    for step in (1, 2):
        jstate.Saver().save(small(step), f"{root}/model", step=step)
    assert jstate.latest_checkpoint(root) == f"{root}/model-2"
    failing = ("status", 500, S3_INTERNAL) if store.scheme == "s3" else ("status", 503, GCS_UNAVAILABLE)
    got = _latest_while_failing(store, root, failing)
    assert got == "StoreError naming model-2: True", got


def test_a_manifest_read_cut_off_mid_body_is_a_store_error(store, root, fast_retries):
    """Every GET of the newest manifest sends its headers and 10 bytes, then the connection is
    reset (a middlebox, a store restarting); everything else is served. Once the clients' retries
    are spent, latest_checkpoint raises a StoreError naming model-2, never the client's own
    exception (README: "Every failure is one jstate.CheckpointError ... naming the path")."""
    for step in (1, 2):
        jstate.Saver().save(small(step), f"{root}/model", step=step)
    got = _latest_while_failing(store, root, ("cutreset", 10))
    assert got == "StoreError naming model-2: True", got


@pytest.mark.parametrize("store", ["gcs"], indirect=True)  # s3 held: botocore's ConnectionClosedError is a StoreError
def test_a_store_that_dies_mid_listing_is_a_store_error(store, root, fast_retries):
    """The listing's response is cut off half-way, and from then on the store closes every
    connection without an answer (a crashed store behind a load balancer, a proxy resetting):
    every lookup raises jstate.StoreError naming the path, as for a refused connection, within
    its timeout (20 s) and a little (3 s, or 10 times what a lookup took before)."""
    jstate.Saver().save(small(1), f"{root}/model", step=1)
    dead = []

    def rule(method, path):
        if dead:
            return "drop"
        if listing(store, path, _key(root)):
            dead.append(True)
            return ("cut", 40)
        return None

    with through(store, {"AWS_MAX_ATTEMPTS": "2"}) as proxy:
        start = time.monotonic()
        assert jstate.latest_checkpoint(root, timeout=20) == f"{root}/model-1"  # the store, still alive
        limit = 20 + max(3, 10 * (time.monotonic() - start))
        proxy.rule = rule
        result = _run_all(root, 20)
    bad = {name: got for name, got in result.items() if not got.get("store_error") or got["seconds"] > limit}
    assert not bad, bad


@pytest.mark.parametrize("store", ["gcs"], indirect=True)
def test_retention_keeps_the_newest_by_the_same_clock_as_the_lookups(root, monkeypatch):
    """Two writers of one prefix, writer A's clock a minute ahead (no NTP on one host). On an
    object store, lookups and list_checkpoints order by the store's clock (README: "the same for
    every writer"), and so does retention, never by a writer's own clock: A saves model-1 and
    model-2, then B (max_to_keep=2) saves model-3, keeping model-2 and model-3, then model-4,
    keeping model-3 and model-4."""
    fast = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fast.time = lambda: time.time() + 60.0
    with monkeypatch.context() as m:
        m.setattr(_writer, "time", fast)
        a = jstate.Saver(max_to_keep=2)
        for step in (1, 2):
            a.save(small(step), f"{root}/model", step=step)
    b = jstate.Saver(max_to_keep=2)
    b.save(small(3), f"{root}/model", step=3)
    after_3 = children(root)
    b.save(small(4), f"{root}/model", step=4)
    assert jstate.latest_checkpoint(root) == f"{root}/model-4"
    kept = children(root)
    assert (after_3, kept) == (["model-2", "model-3"], ["model-3", "model-4"]), f"kept {after_3}, then {kept}"


def _outcome(call) -> str:
    try:
        call()
        return "returned"
    except Exception as e:
        return type(e).__name__


@pytest.mark.parametrize("store", ["gcs"], indirect=True)
def test_a_timeout_that_is_not_a_number_is_a_clear_error(root, monkeypatch):
    """``timeout="5"`` (from a config file or a CLI flag) is an ArgumentError raised in
    the caller, before any thread (none dies with a traceback), on gs:// and on a local path."""
    path = jstate.Saver().save(small(1), f"{root}/model", step=1)
    died = []  # what threading's excepthook would print to stderr
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(f"{args.thread.name}: {args.exc_value!r}"))
    remote = _outcome(lambda: jstate.latest_checkpoint(root, timeout="5"))
    assert died == [], died
    assert remote == "ArgumentError", remote  # a TypeError and a ValueError
    assert _outcome(lambda: jstate.load_variable(path, "w", timeout="5")) == "ArgumentError"


@pytest.mark.parametrize("store", ["gcs"], indirect=True)
def test_an_infinite_timeout_waits_as_none_does(root):
    """``timeout=float("inf")`` (no limit, as ``math.inf`` often means) is the same as None, or a
    clear ValueError; never an OverflowError from waiting an infinite time."""
    path = jstate.Saver().save(small(1), f"{root}/model", step=1)
    got = {
        "latest_checkpoint": _outcome(lambda: jstate.latest_checkpoint(root, timeout=float("inf"))),
        "open_checkpoint": _outcome(lambda: jstate.open_checkpoint(path, timeout=float("inf"))),
    }
    assert set(got.values()) <= {"returned", "ValueError"}, got


@pytest.mark.parametrize("store", ["gcs"], indirect=True)
def test_a_timeout_of_1e12_seconds_works_as_a_long_one(root):
    """``timeout=1e12`` (meaning "forever") overflowed threading's wait (OverflowError) and Orbax's
    datetime deadline (a failed save): it is taken as `deadlines.LONGEST` seconds."""
    saver = jstate.Saver(timeout=1e12)
    path = saver.save(small(1), f"{root}/model", step=1)
    assert jstate.latest_checkpoint(root, timeout=1e12) == path
    assert int(jstate.load_variable(path, "w", timeout=1e12).sum()) == int(small(1)["w"].sum())
    assert saver.restore(path, small(0)).keys() == small(1).keys()


@pytest.mark.parametrize("store", ["gcs"], indirect=True)
@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_a_negative_or_nan_timeout_is_refused_not_blamed_on_the_store(root, tmp_path_factory, bad):
    """``timeout=-1`` or NaN is an argument error, the same on gs:// as on a local path: never a
    StoreTimeoutError blaming a store that was asked nothing."""
    jstate.Saver().save(small(1), f"{root}/model", step=1)
    local = str(tmp_path_factory.mktemp("local") / "ckpt")
    jstate.Saver().save(small(1), f"{local}/model", step=1)
    remote_outcome = _outcome(lambda: jstate.latest_checkpoint(root, timeout=bad))
    local_outcome = _outcome(lambda: jstate.latest_checkpoint(local, timeout=bad))
    assert remote_outcome != "StoreTimeoutError", "an invalid argument reported as a store that did not answer"
    assert remote_outcome == local_outcome, (remote_outcome, local_outcome)


@pytest.mark.parametrize("store", ["gcs"], indirect=True)
def test_latest_looks_again_when_the_only_listed_checkpoint_is_retired_meanwhile(root, monkeypatch):
    """The only checkpoint listed is retired right after the listing, for a newer one: the lookup
    looks again and answers the newer one, never None."""
    writer = jstate.Saver(max_to_keep=1)
    writer.save(small(11), f"{root}/model", step=11)
    real, raced = _storage.files, []

    def files(directory, prefix=""):
        listed = real(directory, prefix)
        if not raced and str(directory) == root:
            raced.append(True)
            writer.save(small(12), f"{root}/model", step=12)
        return listed

    monkeypatch.setattr(_storage, "files", files)
    assert jstate.latest_checkpoint(root) == f"{root}/model-12"


def test_a_store_frozen_mid_listing_times_out_cleanly(store, root, capfd):
    """Every lookup fails with StoreTimeoutError naming the path within its timeout (and a little:
    at most 3 s, or 10 times what an answered lookup takes on this machine now), the abandoned
    threads end by themselves, nothing is printed after, nothing is written."""
    for step in (1, 2):
        jstate.Saver().save(small(step), f"{root}/model", step=step)
    before = objects(root)
    with through(store) as proxy:
        start = time.monotonic()
        assert jstate.latest_checkpoint(root, timeout=30) == f"{root}/model-2"  # the proxy itself is faithful
        answered = time.monotonic() - start
        proxy.rule = lambda method, path: ("stall", 60) if listing(store, path, _key(root)) else None
        result = _run_all(root, 1)
        capfd.readouterr()
        assert wait_for_workers() == []  # joined: nothing of them can print later
    for name, got in result.items():
        assert got.get("type") == "jstate.StoreTimeoutError", (name, got)
        assert got["seconds"] < 1 + max(3, 10 * answered), (name, got, answered)
        assert root in got["message"] and "larger `timeout`" in got["message"], (name, got)
    assert capfd.readouterr().err.count("Traceback") == 0
    assert objects(root) == before


@pytest.mark.parametrize("store", ["gcs", "s3"], indirect=True)
def test_the_next_lookup_after_a_timeout_answers_once_the_store_is_back(store, root):
    """A store that froze once and came back: the same clients answer the next lookups at once
    (within 5 s, or 5 times what they took before the freeze), not after their own retries."""
    for step in (1, 2):
        jstate.Saver().save(small(step), f"{root}/model", step=step)

    def lookups() -> float:
        start = time.monotonic()
        assert jstate.latest_checkpoint(root, timeout=10) == f"{root}/model-2"
        assert [r[0] for r in jstate.list_checkpoints(root, timeout=10)] == [f"{root}/model-1", f"{root}/model-2"]
        assert value(f"{root}/model-2") == 2.0
        return time.monotonic() - start

    with through(store) as proxy:
        before = lookups()
        proxy.rule = lambda method, path: "freeze" if listing(store, path, _key(root)) else None
        with pytest.raises(jstate.StoreTimeoutError):
            jstate.latest_checkpoint(root, timeout=1)
        proxy.rule = lambda method, path: None
        after = lookups()
    assert after < max(5, 5 * before), (after, before)


def test_lookups_beside_thousands_of_junk_objects_and_look_alikes(store, root):
    """Over a thousand objects beside the checkpoints (more than one listing page), names with
    spaces and unicode, a very long key, a foreign Orbax checkpoint, and look-alikes: a file
    named model-99, a damaged manifest committed last (model-98), a half-written save (model-97:
    marker and arrays, no manifest), leftover arrays only (model-95), a manifest under another
    name (model-96). latest is the newest complete checkpoint, list_checkpoints lists exactly
    the complete ones in commit order, with the prefix form too."""
    fs, key = _remote._fs(_storage.as_path(root))
    foreign = [f"{root}/params"] if store.scheme == "gs" else []  # plain Orbax cannot write s3:// unaided
    for url in foreign:
        emulators.orbax_save(url, {"a": jnp.ones(3)})
    paths = [jstate.Saver().save(small(s), f"{root}/model", step=s) for s in (1, 2, 3)]
    junk = {f"{key}/junk/obj {i:04d} ü ✓.bin": b"x" for i in range(1100)}
    junk |= {
        f"{key}/{'l' * 300}/{'o' * 300}/{'n' * 300}": b"long",
        f"{key}/model-99": b"a file named like a checkpoint",
        f"{key}/model-97/.saving.{uuid.uuid4().hex}_1_host.tmp": b"",
        f"{key}/model-97/arrays-{uuid.uuid4().hex}_1_host/_METADATA": b"{}",
        f"{key}/model-95/arrays-{uuid.uuid4().hex}_1_host/_METADATA": b"{}",
        f"{key}/model-96/jstate.json.bak": b"{}",
        f"{key}/model 4 ü/jstate.json.txt": b"{}",
    }
    fs.pipe(junk)
    while True:  # the damaged manifest committed last by the store's clock (S3's counts whole seconds)
        fs.pipe({f"{key}/model-98/jstate.json": b'{"format": "jstate", damaged'})
        written = _storage.files(_storage.as_path(root))
        if written["model-98/jstate.json"].mtime > written["model-3/jstate.json"].mtime:
            break
    assert len(objects(root)) > 1100

    assert jstate.latest_checkpoint(root) == paths[-1]
    assert jstate.latest_checkpoint(f"{root}/model") == paths[-1]
    assert [r[0] for r in jstate.list_checkpoints(root)] == [*foreign, *paths]
    assert [r[0] for r in jstate.list_checkpoints(f"{root}/model")] == paths
    assert value(jstate.latest_checkpoint(root)) == 3.0


FROZEN_READ = """
import json, sys, threading, time
import jstate
answered, frozen = sys.argv[1:]
start = time.monotonic()
jstate.load_variable(answered, "w", timeout=30)  # what a read takes here, clients made included
out = {"answered": time.monotonic() - start}
start = time.monotonic()
try:
    jstate.load_variable(frozen, "w", timeout=2)
    out["returned"] = True
except Exception as e:
    out.update(type=type(e).__name__, message=str(e)[:300])
out["seconds"] = round(time.monotonic() - start, 2)
out["lingering"] = [t.name for t in threading.enumerate() if t.name.startswith("jstate: ")]
print(json.dumps(out), flush=True)
"""


@pytest.mark.parametrize("store", ["gcs"], indirect=True)
def test_load_variable_whose_array_read_freezes(store, root, cloud_env, tmp_path):
    """Manifests and listings answered, every array request tensorstore makes for one checkpoint
    held unanswered: load_variable(timeout=2) fails with StoreTimeoutError in about 2 s (under 5 s,
    or 2 s and 10 times what a read of another checkpoint took), and the process exits normally
    afterwards."""
    import subprocess
    import sys
    from urllib.parse import unquote

    answered = jstate.Saver().save(small(6), f"{root}/other", step=1)
    frozen = jstate.Saver().save(small(7), f"{root}/model", step=1)
    proxy = Proxy(store.endpoint)
    proxy.rule = lambda method, p: "freeze" if "/model-1/" in unquote(p) else None
    env = {**cloud_env, "TENSORSTORE_GCS_HTTP_URL": proxy.endpoint}  # tensorstore's requests only
    try:
        done = subprocess.run([sys.executable, "-c", FROZEN_READ, answered, frozen], env=emulators.subprocess_env(env),
                              cwd=tmp_path, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip
    finally:
        proxy.close()
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    # (The thread it ran in stays, stuck in tensorstore's retries: got["lingering"]; documented.)
    assert got.get("type") == "StoreTimeoutError", got
    assert got["seconds"] < max(5, 2 + 10 * got["answered"]), got
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


FROZEN = """
import json, sys, threading, time
import jax.numpy as jnp, jstate
url = sys.argv[1]
state = jstate.State.from_tree({"w": jnp.zeros(8)})
calls = {
    "latest_checkpoint": lambda: jstate.latest_checkpoint(url, timeout=1),
    "list_checkpoints": lambda: jstate.list_checkpoints(url, timeout=1),
    "open_checkpoint": lambda: jstate.open_checkpoint(url + "/model-1", timeout=1),
    "list_variables": lambda: jstate.list_variables(url + "/model-1", timeout=1),
    "load_variable": lambda: jstate.load_variable(url + "/model-1", "w", timeout=1),
    "Saver.save": lambda: jstate.Saver(timeout=1).save(state, url + "/model", step=2),
    "Saver.restore": lambda: jstate.Saver(timeout=1).restore(url, state),
}
out = {}
for name, call in calls.items():
    start = time.monotonic()
    try:
        call()
        out[name] = {"returned": True}
        continue
    except Exception as e:
        out[name] = {"seconds": time.monotonic() - start, "type": type(e).__name__, "message": str(e),
                     "checkpoint_error": isinstance(e, jstate.CheckpointError), "timeout": isinstance(e, TimeoutError)}
    # The thread a lookup was abandoned in: its requests now fail at once, so it ends by itself.
    deadline = time.monotonic() + 20
    for thread in [t for t in threading.enumerate() if t.name.startswith("jstate: ")]:
        thread.join(max(0.0, deadline - time.monotonic()))
    out[name]["lingering"] = [t.name for t in threading.enumerate() if t.name.startswith("jstate: ")]
print(json.dumps(out), flush=True)
"""


def test_frozen_store_fails_every_call_within_its_timeout(store, root, cloud_env, tmp_path):
    """A store that accepts connections and never answers (where the clients alone would retry for
    minutes): latest_checkpoint, list_checkpoints, open_checkpoint, list_variables, load_variable,
    Saver.save and Saver.restore each fail with a StoreTimeoutError (a CheckpointError and a
    TimeoutError) that names the path, the seconds and what to do, after the call's `timeout` (1 s;
    under 30 s, or 1 s and 10 times what the call takes on a store that answers, is asserted), and
    the thread a lookup ran in ends by itself (nothing of it acts later)."""
    state = small(0)
    jstate.Saver().save(state, f"{root}/model", step=1)
    answered = {}
    for name, call in {
        "latest_checkpoint": lambda: jstate.latest_checkpoint(root),
        "list_checkpoints": lambda: jstate.list_checkpoints(root),
        "open_checkpoint": lambda: jstate.open_checkpoint(f"{root}/model-1"),
        "list_variables": lambda: jstate.list_variables(f"{root}/model-1"),
        "load_variable": lambda: jstate.load_variable(f"{root}/model-1", "w"),
        "Saver.save": lambda: jstate.Saver().save(state, f"{root}/model", step=2),
        "Saver.restore": lambda: jstate.Saver().restore(root, state),
    }.items():
        start = time.monotonic()
        call()
        answered[name] = time.monotonic() - start
    url = f"{store.scheme}://{emulators.BUCKET}/run"
    with emulators.frozen_store() as endpoint:
        out = emulators.run_python(
            FROZEN, emulators.frozen_env(cloud_env, endpoint), [url], cwd=str(tmp_path), timeout=300
        )
    result = json.loads(out.strip().splitlines()[-1])
    for name, got in result.items():
        assert got.get("type") == "StoreTimeoutError" and got["checkpoint_error"] and got["timeout"], (name, got)
        assert got["seconds"] < max(30, 1 + 10 * answered[name]) and got["lingering"] == [], (name, got)
        assert url in got["message"] and "did not answer within 1 s" in got["message"], (name, got)
        assert "larger `timeout`" in got["message"], (name, got)
    assert result["latest_checkpoint"]["message"].startswith(f"latest_checkpoint('{url}'): the object store")
    assert result["Saver.restore"]["message"].startswith(f"Saver.restore('{url}'): the object store")
    assert result["load_variable"]["message"].endswith("Nothing was changed.")
    assert result["Saver.save"]["message"].startswith(f"Saving checkpoint {url}/model-2 failed (StoreTimeoutError")
    assert os.listdir(tmp_path) == []
