"""Two JAX processes on this machine (2 x 4 CPU devices, loopback only), each running a scenario of
tests/multihost_worker.py: shared by the multi-process tests on local disk and on object storage.
Not a test module."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jstate

WORKER = Path(__file__).with_name("multihost_worker.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(scenario, workdir, timeout=120, env=None, cwd=None):
    """Two workers running `scenario` on checkpoint directory `workdir` (a local path or a URL)."""
    port = free_port()
    env = {k: v for k, v in (os.environ if env is None else env).items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(port), str(i), "2", scenario, str(workdir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=cwd,
        )
        for i in range(2)
    ]
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        results.append((p.returncode, out, err))
    return results


def last_json(out):
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def model(s):
    for i in range(3):
        layer = s.scope(f"layer{i}")
        layer.variable("kernel", jstate.initializers.normal(1.0), (16, 32))
        layer.variable("bias", jstate.initializers.normal(1.0), (32,))
