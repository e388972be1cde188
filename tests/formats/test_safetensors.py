"""Reading and exporting ``.safetensors`` files, against files the safetensors package writes itself."""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jstate
from jstate import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from jstate import initializers as inits
from jstate.formats import safetensors as st
from jstate.formats.base import Entry

ARRAYS = {
    "layer1/kernel": np.arange(12, dtype=np.float32).reshape(3, 4),
    "layer1/bias": np.array([0.5, -1.5, 2.0], ml_dtypes.bfloat16),
    "step": np.array(7, np.int64),
    "mask": np.array([True, False, True]),
    "half": np.ones((2, 2), np.float16),
    "bytes": np.arange(5, dtype=np.uint8),
}


@pytest.fixture
def file(tmp_path):
    """A file written by the safetensors package itself, as Hugging Face tools write them."""
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(ARRAYS, path)
    return path


def test_load_accepts_safetensors_files_only(file, tmp_path):
    assert st.load(file).path == file
    assert st.load(tmp_path / "other.safetensors") is None
    (tmp_path / "model.npz").write_bytes(b"")
    assert st.load(tmp_path / "model.npz") is None
    assert st.load(tmp_path) is None


def test_entries_come_from_the_header(file):
    entries = st.SafetensorsCheckpoint(file).entries
    assert entries == {n: Entry((n,), a.shape, a.dtype) for n, a in ARRAYS.items()}
    assert entries["layer1/bias"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert entries["step"].shape == ()
    assert st.SafetensorsCheckpoint(file).skipped == {}


def test_read_returns_exactly_the_arrays_asked_for(file):
    values = st.read(file, ["step", "layer1/bias", "layer1/kernel"])
    assert list(values) == ["step", "layer1/bias", "layer1/kernel"]
    for name, value in values.items():
        assert value.dtype == ARRAYS[name].dtype and value.shape == ARRAYS[name].shape
        np.testing.assert_array_equal(value, ARRAYS[name])


def test_reading_an_unknown_name_suggests_the_closest(file):
    with pytest.raises(CheckpointError, match=r"holds no array 'layer1/kernal'\. Did you mean 'layer1/kernel'"):
        st.read(file, ["layer1/kernal"])


def test_float8_arrays_are_skipped_with_a_reason(tmp_path):
    path = tmp_path / "f8.safetensors"
    safetensors.numpy.save_file({"x": np.zeros(4, ml_dtypes.float8_e4m3fn), "y": np.ones(2, np.float32)}, path)
    assert set(st.SafetensorsCheckpoint(path).entries) == {"y"}
    assert "F8_E4M3" in st.SafetensorsCheckpoint(path).skipped["x"]
    with pytest.raises(CheckpointError, match=r"array 'x' cannot be read: its dtype F8_E4M3"):
        st.read(path, ["x"])


def test_a_missing_file_is_not_found(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"No safetensors file at .*nope\.safetensors"):
        st.SafetensorsCheckpoint(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("keep", [0, 7, 20, -3])
def test_a_truncated_file_is_corrupt(file, keep):
    file.write_bytes(file.read_bytes()[:keep])
    with pytest.raises(CorruptCheckpointError, match=r"Safetensors file .*model\.safetensors is damaged or truncated"):
        st.read(file, ["layer1/kernel"])


def test_a_garbled_header_is_corrupt(file):
    data = bytearray(file.read_bytes())
    data[8:12] = b"\xff\xfe{]"
    file.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors is damaged"):
        st.SafetensorsCheckpoint(file)


# -- exporting a State ------------------------------------------------------------------------
def model(s):
    s.variable("weights", inits.normal(0.35), (16, 8))
    s.variable("biases", inits.zeros, (8,), dtype=jnp.bfloat16)
    s.variable("step", 3)
    s.scope("later").variable("k", inits.ones, (4,))


def test_save_exports_initialized_variables_and_reads_back(tmp_path):
    values = {"weights": np.linspace(-1, 1, 128, dtype=np.float32).reshape(16, 8), "step": np.int32(3)}
    state = jstate.abstract(model).assign({**values, "biases": jnp.full(8, 0.25, jnp.bfloat16)})
    path = Path(st.save_safetensors(state, tmp_path / "out" / "model.safetensors"))
    assert path == tmp_path / "out" / "model.safetensors"
    assert st.SafetensorsCheckpoint(path).entries == {n: Entry((n,), a.shape, a.dtype) for n, a in state.items()}
    values = st.read(path, list(state))
    for name, value in values.items():
        np.testing.assert_array_equal(value, np.asarray(state[name]))
    assert "later/k" not in values  # uninitialized: left out
    assert os.listdir(path.parent) == ["model.safetensors"]  # no temporary left behind


def test_save_gathers_sharded_variables(tmp_path):
    mesh = jax.make_mesh((8,), ("x",))
    kernel = jax.device_put(jnp.arange(64.0, dtype=jnp.float32).reshape(16, 4), NamedSharding(mesh, P("x")))
    state = jstate.State({"kernel": kernel})
    path = st.save_safetensors(state, tmp_path / "sharded.safetensors")
    np.testing.assert_array_equal(st.read(path, ["kernel"])["kernel"], np.arange(64.0).reshape(16, 4))


def test_save_replaces_an_existing_file_whole(file):
    state = jstate.State({"only": jnp.ones(3)})
    st.save_safetensors(state, file)
    assert set(st.SafetensorsCheckpoint(file).entries) == {"only"}


def test_a_failed_save_leaves_the_old_file_and_no_temporary(file):
    state = jstate.State({"fine": jnp.ones(3), "nibbles": jnp.ones(4, jnp.int4)})
    with pytest.raises(
        CheckpointError, match=r"Cannot export variable 'nibbles' to .*model\.safetensors: its dtype int4"
    ):
        st.save_safetensors(state, file)
    assert st.SafetensorsCheckpoint(file).entries == {n: Entry((n,), a.shape, a.dtype) for n, a in ARRAYS.items()}
    assert os.listdir(file.parent) == ["model.safetensors"]


def test_save_leaves_the_state_unchanged(tmp_path):
    state = jstate.State({"a": jnp.arange(4.0)})
    before = state["a"]
    st.save_safetensors(state, tmp_path / "a.safetensors")
    assert state["a"] is before and list(state) == ["a"]
