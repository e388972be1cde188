"""A ``.safetensors`` file on gs:// or s3:// is read with ranged requests: its length and header
first, then only the arrays asked for, each once. Counted by wrapping the requests jstate makes
of the storage clients (`remote._call`): every byte that comes back is counted."""

import collections

import jax.numpy as jnp
import numpy as np
import pytest

import jstate
from jstate.formats import safetensors as st
from jstate.storage import remote as _remote

BIG = 1 << 20  # bytes of the array a load_variable of the small one must not download


@pytest.fixture
def counted(monkeypatch):
    """``{client method name: [requests, bytes returned]}`` of every request from here on."""
    seen = collections.defaultdict(lambda: [0, 0])
    real = _remote._call

    def call(method, key, *args, **kwargs):
        out = real(method, key, *args, **kwargs)
        seen[method.__name__][0] += 1
        seen[method.__name__][1] += len(out) if isinstance(out, (bytes, bytearray)) else 0
        return out

    monkeypatch.setattr(_remote, "_call", call)
    return seen


def state() -> jstate.State:
    return jstate.State({"big": jnp.arange(BIG // 4, dtype=jnp.float32), "small": jnp.array([1.0, 2.0, 3.0])})


def test_load_variable_reads_the_header_and_that_array_only(root, counted):
    path = jstate.save_safetensors(state(), f"{root}/model.safetensors")
    counted.clear()
    np.testing.assert_array_equal(jstate.load_variable(path, "small"), [1.0, 2.0, 3.0])
    fetched = sum(n for _, n in counted.values())
    assert fetched <= st._FIRST_READ + 12, dict(counted)  # the header's read, then 12 bytes
    assert "get_file" not in counted, "downloaded whole"


def test_restore_reads_each_array_once(root, counted):
    path = jstate.save_safetensors(state(), f"{root}/model.safetensors")
    counted.clear()
    restored = jstate.Saver().restore(path, state())
    np.testing.assert_array_equal(restored["big"], state()["big"])
    fetched = sum(n for _, n in counted.values())
    assert BIG <= fetched <= BIG + 12 + st._FIRST_READ, dict(counted)  # once each, and the header's read
    assert "get_file" not in counted, "downloaded whole"
