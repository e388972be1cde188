"""Reads of objects on gs:// and s3:// are ranged: a file of a known kind (a manifest) is read up
to its kind's limit and refused past it, never downloaded whole; a ``.safetensors`` file is read
as its length and header first, then only the arrays asked for, each once. Counted by wrapping
the requests jstate makes of the storage clients (`remote._call`): every byte that comes back is
counted."""

import collections

import jax.numpy as jnp
import numpy as np
import pytest

import jstate
from jstate.formats import safetensors as st
from jstate.storage import remote as _remote
from jstate.storage import store as _storage

BIG = 1 << 20  # bytes of the array a load_variable of the small one must not download


@pytest.fixture
def counted(monkeypatch):
    """``{client method name: [requests, bytes returned]}`` of every request from here on."""
    seen = collections.defaultdict(lambda: [0, 0])
    real = _remote._call

    def call(method, key, *args, **kwargs):
        out = real(method, key, *args, **kwargs)
        seen[method.__name__.lstrip("_")][0] += 1
        seen[method.__name__.lstrip("_")][1] += len(out) if isinstance(out, (bytes, bytearray)) else 0
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


def test_a_read_is_bounded_by_its_kinds_limit_and_ranged(root, counted):
    path = _storage.as_path(f"{root}/jstate.json")
    _storage.write_bytes(path, b"")
    assert _storage.read_bytes(path, 100, "manifest") == b""  # (the stores answer 416 to the range)
    _storage.write_bytes(path, b"x" * 1000)
    counted.clear()
    with pytest.raises(
        jstate.CheckpointError, match=r"jstate\.json: this manifest holds 11 bytes or more, over the 10"
    ):
        _storage.read_bytes(path, 10, "manifest")
    assert dict(counted) == {"cat_file": [1, 11]}  # one request, a byte past the limit
    assert _storage.read_range(path, 990, 100) == b"x" * 10
    assert _storage.read_range(path, 2000, 100) == b""
    with pytest.raises(FileNotFoundError):
        _storage.read_bytes(_storage.as_path(f"{root}/missing"), 10, "manifest")
