"""The object-storage fixtures: fake-gcs-server (``gs://``) and moto (``s3://``) on 127.0.0.1, started
once per session (tests/cloud/emulators.py), and the one decision of where the tests using them run.

Where this machine can give a process a network namespace with only loopback (root, ``unshare -n``)
and the session runs `test_emulators.py::test_the_cloud_tests_pass_inside_a_network_namespace`, the
tests that use the emulators are skipped in the session and run there, in one pytest run of their
own: nothing could reach another host even if a client ignored the loopback environment.
Elsewhere (no namespace, that run itself, or that test deselected as by ``pytest -m "not slow"``)
they run in the session, kept on loopback by their environment.

Every test in this folder is marked ``cloud``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from emulators import (
    IN_NAMESPACE,
    NESTED,
    Emulator,
    EmulatorUnavailable,
    fake_gcs_server,
    loopback_env,
    moto_s3_server,
    namespace_unavailable,
    reset_clients,
    use_loopback_env,
)

HERE = Path(__file__).parent


@pytest.hookimpl(tryfirst=True)  # before `-m` selects: `-m cloud` sees the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.cloud)


def deferred_to_namespace(session: pytest.Session) -> bool:
    """Whether this session leaves the tests that use the emulators to the run inside a network
    namespace (it can make one, is not that run, and runs the test that starts it)."""
    if os.environ.get(IN_NAMESPACE) == "1" or namespace_unavailable() is not None:
        return False
    return any(item.name == NESTED for item in session.items)


@dataclasses.dataclass
class CloudSession:
    gcs: Emulator | None
    s3: Emulator | None
    gcs_error: str | None
    s3_error: str | None
    env: dict[str, str]


@pytest.fixture(scope="session")
def cloud_session(request: pytest.FixtureRequest) -> Iterator[CloudSession]:
    """Both emulators, started once; the loopback environment, set in this process until the end."""
    if deferred_to_namespace(request.session):
        pytest.skip(f"runs inside a network namespace with only loopback, by tests/cloud/test_emulators.py::{NESTED}")
    with contextlib.ExitStack() as stack:
        started, errors = {}, {}
        for name, start in (("gcs", fake_gcs_server), ("s3", moto_s3_server)):
            try:
                started[name] = stack.enter_context(start())
            except EmulatorUnavailable as e:
                errors[name] = str(e)
        env = loopback_env(started.get("gcs"), started.get("s3"))
        monkeypatch = stack.enter_context(pytest.MonkeyPatch.context())
        use_loopback_env(monkeypatch, env)
        stack.callback(reset_clients)  # Runs before the environment is restored.
        yield CloudSession(started.get("gcs"), started.get("s3"), errors.get("gcs"), errors.get("s3"), env)


@pytest.fixture
def gcs(cloud_session: CloudSession) -> Emulator:
    """fake-gcs-server with bucket `emulators.BUCKET`; the test is skipped with the reason if it did not start."""
    if cloud_session.gcs is None:
        pytest.skip(f"GCS emulator unavailable: {cloud_session.gcs_error}")
    return cloud_session.gcs


@pytest.fixture
def s3(cloud_session: CloudSession) -> Emulator:
    """moto's S3 with bucket `emulators.BUCKET`; the test is skipped with the reason if it did not start."""
    if cloud_session.s3 is None:
        pytest.skip(f"S3 emulator unavailable: {cloud_session.s3_error}")
    return cloud_session.s3


# moto answers several times slower than fake-gcs-server: the s3 side of these tests is `slow`.
@pytest.fixture(params=["gcs", pytest.param("s3", marks=pytest.mark.slow)])
def store(request: pytest.FixtureRequest) -> Emulator:
    """Each emulator in turn (a test using it runs once per store); narrow it with
    ``@pytest.mark.parametrize("store", ["gcs"], indirect=True)``."""
    return request.getfixturevalue(request.param)


@pytest.fixture
def root(store: Emulator, tmp_path, monkeypatch) -> Iterator[str]:
    """A fresh prefix in the store's bucket; the working directory is an empty temporary one, which
    must stay empty (a local ``gs:`` or ``s3:`` directory would appear there)."""
    monkeypatch.chdir(tmp_path)
    yield store.url(f"t-{uuid.uuid4().hex[:8]}")
    assert os.listdir(tmp_path) == [], "a save wrote locally"


@pytest.fixture
def cloud_env(cloud_session: CloudSession) -> dict[str, str]:
    """The loopback environment (already set in this process): pass it to `emulators.run_python` or
    `emulators.subprocess_env` for a subprocess."""
    return dict(cloud_session.env)
