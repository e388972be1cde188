"""`_ocdbt` reads arrays from an OCDBT checkpoint's files by itself: whatever it locates must read
back exactly what tensorstore reads, and whatever it cannot read exactly it must not locate."""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jstate
from jstate.core.errors import Damaged
from jstate.formats import ocdbt as _ocdbt


def write(directory: Path, name: str, value: np.ndarray, chunks, **metadata) -> None:
    """`value` as a zarr array `name` in the OCDBT database `directory`, written by tensorstore."""
    spec = {
        "driver": "zarr",
        "kvstore": {"driver": "ocdbt", "base": f"file://{directory}/", "path": name},
        "metadata": {
            "shape": list(value.shape),
            "chunks": list(chunks),
            "dtype": metadata.pop("dtype", value.dtype.str if value.dtype.names is None else None),
            "compressor": None,
        }
        | metadata,
    }
    store = ts.open(spec, create=True).result()
    store.write(value).result()


def tensorstore_read(directory: Path, name: str) -> np.ndarray:
    spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{directory}/", "path": name}}
    return ts.open(spec, open=True).result().read().result()


@pytest.mark.parametrize(
    "shape, chunks, dtype",
    [
        ((4096,), (4096,), np.float32),  # one chunk, stored out of line
        ((10,), (10,), np.int8),  # one chunk, stored inline in the B+tree node
        ((), (), np.float64),  # a scalar
        ((600, 40), (150, 40), np.float32),  # chunks of whole rows: read in place
        ((600, 40), (150, 8), np.float32),  # split along both axes
        ((7, 10, 3), (3, 4, 2), np.int16),  # edge chunks stored padded
        ((33,), (8,), jnp.bfloat16),
        ((5, 5), (5, 5), np.bool_),
    ],
)
def test_located_arrays_read_what_tensorstore_reads(tmp_path, shape, chunks, dtype):
    rng = np.random.default_rng(0)
    value = (rng.normal(size=shape) * 100).astype(dtype)
    write(tmp_path, "a/b", value, chunks, **({"dtype": "bfloat16"} if dtype == jnp.bfloat16 else {}))
    located = _ocdbt.locate(tmp_path)["a/b"]
    read = located.read()
    np.testing.assert_array_equal(read, tensorstore_read(tmp_path, "a/b"))
    assert read.dtype == np.dtype(dtype) and read.ctypes.data % 64 == 0


def test_read_slices_reads_parts_of_a_one_chunk_array(tmp_path):
    write(tmp_path, "p", np.arange(1000, dtype=np.float32), (1000,))
    parts = _ocdbt.locate(tmp_path)["p"].read_slices([(10, 20), (990, 1000), (5, 5)])
    assert [p.tolist() for p in parts] == [list(range(10, 20)), list(range(990, 1000)), []]


@pytest.mark.parametrize(
    "metadata",
    [
        {"compressor": {"id": "zstd", "level": 1}},  # compressed
        {"dtype": ">f4"},  # big-endian
        {"order": "F"},  # column-major chunks
    ],
)
def test_arrays_stored_otherwise_are_not_located(tmp_path, metadata):
    write(tmp_path, "x", np.arange(24, dtype=np.float32).reshape(4, 6), (4, 6), **metadata)
    assert _ocdbt.locate(tmp_path) == {}


def test_an_array_with_a_chunk_never_written_is_not_located(tmp_path):
    spec = {
        "driver": "zarr",
        "kvstore": {"driver": "ocdbt", "base": f"file://{tmp_path}/", "path": "x"},
        "metadata": {"shape": [8], "chunks": [4], "dtype": "<f4", "compressor": None},
    }
    ts.open(spec, create=True).result()[:4].write(np.ones(4, np.float32)).result()  # chunk 1 is the fill value
    assert _ocdbt.locate(tmp_path) == {}


def test_not_an_ocdbt_checkpoint_locates_nothing(tmp_path):
    assert _ocdbt.locate(tmp_path) == {}
    (tmp_path / "manifest.ocdbt").write_bytes(b"not a manifest")
    assert _ocdbt.locate(tmp_path) == {}


def test_a_data_file_truncated_after_opening_is_named(tmp_path):
    write(tmp_path, "x", np.arange(4096, dtype=np.float32), (4096,))
    located = _ocdbt.locate(tmp_path)["x"]
    (chunk,) = located.chunks.values()
    os.truncate(chunk.file, chunk.offset + 100)
    with pytest.raises(Damaged, match=f"{chunk.file.name} ends before byte .* truncated"):
        located.read()


def test_sharded_checkpoints_restore_from_their_files_onto_any_sharding(tmp_path, array_reads):
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    saved = {
        "rows": NamedSharding(mesh, P("a", None)),
        "cols": NamedSharding(mesh, P(None, "b")),
        "both": NamedSharding(mesh, P("a", "b")),
    }
    rng = np.random.default_rng(2)
    vals = {n: jax.device_put(rng.normal(size=(64, 48)).astype(np.float32), s) for n, s in saved.items()}
    path = jstate.Saver(pack=False).save(jstate.State(vals), tmp_path / "m")
    restored_onto = NamedSharding(mesh, P("b", "a"))
    target = jstate.State.from_tree(
        {n: jax.ShapeDtypeStruct((64, 48), jnp.float32, sharding=restored_onto) for n in vals}, flat=True
    )
    restored = jstate.Saver().restore(path, target)
    assert sorted(array_reads) == ["both", "cols", "rows"]  # each read from its files, once
    for n, v in vals.items():
        assert restored[n].sharding == restored_onto
        np.testing.assert_array_equal(restored[n], v)
