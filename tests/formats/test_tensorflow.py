"""Reading TensorFlow checkpoints without TensorFlow, against checkpoints real TensorFlow wrote.

The fixtures and the values TensorFlow saved in them come from tests/data/tensorflow/make_fixtures.py.
"""

import contextlib
import json
import math
import random
import re
import shutil
from pathlib import Path

import crc32c
import ml_dtypes
import numpy as np
import pytest

from jstate import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from jstate.formats import tensorflow as tf_ckpt
from jstate.formats import tf_files
from jstate.formats import tf_table as _sstable
from jstate.formats.base import Entry

DATA = Path(__file__).parents[1] / "data" / "tensorflow"
INDEX = json.loads((DATA / "values" / "index.json").read_text())


def saved(checkpoint: str, name: str) -> np.ndarray:
    """What TensorFlow saved as tensor `name` of `checkpoint`."""
    info = INDEX[checkpoint][name]
    value = np.load(DATA / info["file"])
    return value.view(ml_dtypes.bfloat16) if info["dtype"] == "bfloat16" else value


def copy(tmp_path: Path, checkpoint: str) -> Path:
    """A copy of a fixture checkpoint (all its files) under tmp_path; its prefix."""
    prefix = DATA / checkpoint
    for file in prefix.parent.glob(prefix.name + ".*"):
        shutil.copy(file, tmp_path / file.name)
    return tmp_path / prefix.name


# -- values -----------------------------------------------------------------------------------
@pytest.mark.parametrize("checkpoint", sorted(INDEX))
def test_every_value_equals_what_tensorflow_saved(checkpoint):
    entries = tf_ckpt.TensorFlowCheckpoint(DATA / checkpoint).entries
    readable = {n for n, info in INDEX[checkpoint].items() if info["file"] and not info["partitioned"]}
    assert set(entries) == readable
    values = tf_ckpt.read(DATA / checkpoint, sorted(entries))
    assert list(values) == sorted(entries)
    for name, value in values.items():
        expected = saved(checkpoint, name)
        assert entries[name] == Entry((name,), expected.shape, expected.dtype)
        assert value.dtype == expected.dtype and value.shape == expected.shape, name
        np.testing.assert_array_equal(value, expected, err_msg=name)


def test_tf1_guide_variables_hold_their_values_after_the_assign_ops():
    values = tf_ckpt.read(DATA / "guide/model.ckpt", ["v1", "v2", "weights", "biases"])
    np.testing.assert_array_equal(values["v1"], np.ones(3, np.float32))
    np.testing.assert_array_equal(values["v2"], -np.ones(5, np.float32))
    assert values["weights"].shape == (100, 20) and values["biases"].shape == (20,)
    assert tf_ckpt.TensorFlowCheckpoint(DATA / "guide/my_v2.ckpt").entries == {
        "my_v2": Entry(("my_v2",), (5,), np.dtype(np.float32))
    }


def test_every_dtype_maps_to_its_numpy_dtype():
    entries = tf_ckpt.TensorFlowCheckpoint(DATA / "dtypes/model.ckpt").entries
    for name, info in INDEX["dtypes/model.ckpt"].items():
        assert entries[name].dtype.name == info["dtype"], name
    assert entries["bfloat16"].dtype == np.dtype(ml_dtypes.bfloat16)


def test_scalars_and_empty_tensors_keep_their_shapes():
    values = tf_ckpt.read(DATA / "dtypes/model.ckpt", ["scalar", "scalar_int", "empty"])
    assert values["scalar"].shape == () and values["scalar"] == np.float32(2.5)
    assert values["scalar_int"].shape == () and values["scalar_int"] == -42
    assert values["empty"].shape == (0, 3)


def test_arrays_read_are_writable_and_independent_of_the_file():
    value = tf_ckpt.read(DATA / "guide/model.ckpt", ["v1"])["v1"]
    value += 1  # a plain numpy array, not a view of a file mapping
    np.testing.assert_array_equal(tf_ckpt.read(DATA / "guide/model.ckpt", ["v1"])["v1"], np.ones(3))


def test_multi_shard_checkpoint_reads_from_each_data_file():
    prefix = DATA / "sharded/model.ckpt"
    assert len(list(prefix.parent.glob("model.ckpt.data-*-of-00003"))) == 3
    values = tf_ckpt.read(prefix, ["cpu2/kernel", "cpu0/count", "cpu1/kernel"])
    assert list(values) == ["cpu2/kernel", "cpu0/count", "cpu1/kernel"]  # the order asked for
    for name, value in values.items():
        np.testing.assert_array_equal(value, saved("sharded/model.ckpt", name))


def test_reading_one_shard_opens_only_its_data_file(tmp_path):
    prefix = copy(tmp_path, "sharded/model.ckpt")
    (tmp_path / "model.ckpt.data-00000-of-00003").unlink()
    (tmp_path / "model.ckpt.data-00002-of-00003").unlink()
    value = tf_ckpt.read(prefix, ["cpu1/kernel"])["cpu1/kernel"]
    np.testing.assert_array_equal(value, saved("sharded/model.ckpt", "cpu1/kernel"))
    with pytest.raises(CorruptCheckpointError, match=r"incomplete: its data file .*data-00002-of-00003 is missing"):
        tf_ckpt.read(prefix, ["cpu2/kernel"])


def test_tf2_object_graph_names_are_listed_as_they_are():
    entries = tf_ckpt.TensorFlowCheckpoint(DATA / "tf2/ckpt-1").entries
    assert "model/layers/0/kernel/.ATTRIBUTES/VARIABLE_VALUE" in entries
    assert entries["model/scale/.ATTRIBUTES/VARIABLE_VALUE"].shape == ()
    assert "_CHECKPOINTABLE_OBJECT_GRAPH" not in entries
    assert "DT_STRING" in tf_ckpt.TensorFlowCheckpoint(DATA / "tf2/ckpt-1").skipped["_CHECKPOINTABLE_OBJECT_GRAPH"]
    step = tf_ckpt.read(DATA / "tf2/ckpt-1", ["step/.ATTRIBUTES/VARIABLE_VALUE"])
    assert step["step/.ATTRIBUTES/VARIABLE_VALUE"] == 7


# -- finding checkpoints ----------------------------------------------------------------------
def test_find_accepts_the_prefix_its_index_or_a_data_file():
    prefix = DATA / "train/model.ckpt-10"
    assert tf_files.find(prefix) == prefix
    assert tf_files.find(DATA / "train/model.ckpt-10.index") == prefix
    assert tf_files.find(DATA / "train/model.ckpt-10.data-00000-of-00001") == prefix
    assert tf_files.find(DATA / "train/model.ckpt-30") is None
    assert tf_files.find(DATA / "train") is None
    assert tf_files.find(DATA / "train/checkpoint") is None


def test_latest_follows_the_state_file():
    assert tf_files.latest(DATA / "train") == DATA / "train/model.ckpt-20"
    assert tf_files.latest(DATA / "tf2") == DATA / "tf2/ckpt-1"
    assert tf_files.latest(DATA / "guide") is None  # saved with write_state=False


def test_latest_finds_a_moved_checkpoint_whose_state_file_has_absolute_paths(tmp_path):
    copy(tmp_path, "train/model.ckpt-10")
    (tmp_path / "checkpoint").write_text(
        'model_checkpoint_path: "/old/machine/train/model.ckpt-10"\n'
        'all_model_checkpoint_paths: "/old/machine/train/model.ckpt-10"\n'
    )
    assert tf_files.latest(tmp_path) == tmp_path / "model.ckpt-10"


def test_latest_is_none_when_the_named_checkpoint_is_gone(tmp_path):
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-99"\n')
    assert tf_files.latest(tmp_path) is None
    (tmp_path / "checkpoint").write_text("garbage\n")
    assert tf_files.latest(tmp_path) is None


def state_file_elsewhere(tmp_path: Path) -> tuple[Path, list[str]]:
    """A directory `train` beside checkpoints outside it, and names in a state file that lead to them."""
    for outside in ("outside", "train-old"):  # train-old: a sibling whose path starts with train's
        (tmp_path / outside).mkdir()
        copy(tmp_path / outside, "train/model.ckpt-10")
    train = tmp_path / "train"
    train.mkdir()
    (train / "link").symlink_to(tmp_path / "outside")
    names = [
        "../outside/model.ckpt-10",
        "../train-old/model.ckpt-10",
        str(tmp_path / "outside" / "model.ckpt-10"),
        "link/model.ckpt-10",
        "link/../../outside/model.ckpt-10",
    ]
    return train, names


def test_state_file_naming_a_path_outside_its_directory_is_not_followed(tmp_path):
    train, names = state_file_elsewhere(tmp_path)
    for name in [*names, "..", "/", "."]:
        (train / "checkpoint").write_text(f'model_checkpoint_path: "{name}"\n')
        assert tf_files.latest(train) is None, name


def test_state_file_naming_a_path_outside_its_directory_falls_back_to_its_last_component_inside(tmp_path):
    train, names = state_file_elsewhere(tmp_path)
    copy(train, "train/model.ckpt-10")
    for name in names:
        (train / "checkpoint").write_text(f'model_checkpoint_path: "{name}"\n')
        assert tf_files.latest(train) == train / "model.ckpt-10", name


def test_state_file_may_name_a_checkpoint_below_its_directory_or_reached_through_a_symlink(tmp_path):
    train = tmp_path / "train"
    (train / "sub").mkdir(parents=True)
    copy(train / "sub", "train/model.ckpt-10")
    (train / "checkpoint").write_text('model_checkpoint_path: "sub/model.ckpt-10"\n')
    assert tf_files.latest(train) == train / "sub/model.ckpt-10"
    (train / "checkpoint").write_text(f'model_checkpoint_path: "{train}/sub/model.ckpt-10"\n')
    assert tf_files.latest(train) == train / "sub/model.ckpt-10"
    (tmp_path / "alias").symlink_to(train)  # the directory itself a symlink: its names are still inside it
    (train / "checkpoint").write_text('model_checkpoint_path: "sub/model.ckpt-10"\n')
    assert tf_files.latest(tmp_path / "alias") == tmp_path / "alias/sub/model.ckpt-10"


def test_state_file_fields_a_newer_tensorflow_may_add_are_ignored(tmp_path):
    copy(tmp_path, "train/model.ckpt-10")
    (tmp_path / "checkpoint").write_text(
        'model_checkpoint_path: "model.ckpt-10"\nsome_future_field: 3\nall_model_checkpoint_timestamps: 1.5\n'
    )
    assert tf_files.latest(tmp_path) == tmp_path / "model.ckpt-10"


# -- what cannot be read ----------------------------------------------------------------------
def test_strings_and_partitioned_variables_are_skipped_with_reasons():
    prefix = DATA / "skipped/model.ckpt"
    assert set(tf_ckpt.TensorFlowCheckpoint(prefix).entries) == {"plain"}
    reasons = tf_ckpt.TensorFlowCheckpoint(prefix).skipped
    assert set(reasons) == {"words", "embedding"}
    assert "string tensor of dtype DT_STRING" in reasons["words"]
    assert "partitioned variable, saved as 2 slices" in reasons["embedding"]
    assert tf_ckpt.TensorFlowCheckpoint(DATA / "guide/model.ckpt").skipped == {}


def test_reading_a_skipped_tensor_names_it_and_the_reason():
    with pytest.raises(
        CheckpointError, match=r"tensor 'words' cannot be read: it is a string tensor of dtype DT_STRING"
    ):
        tf_ckpt.read(DATA / "skipped/model.ckpt", ["plain", "words"])
    with pytest.raises(CheckpointError, match=r"'embedding' cannot be read: it is a partitioned variable"):
        tf_ckpt.read(DATA / "skipped/model.ckpt", ["embedding"])


def test_reading_an_unknown_name_suggests_the_closest():
    with pytest.raises(CheckpointError, match=r"holds no tensor 'layer1/weight'\. Did you mean 'layer1/weights'"):
        tf_ckpt.read(DATA / "train/model.ckpt-20", ["layer1/weight"])


# -- damage -----------------------------------------------------------------------------------
def varint_bytes(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes([*out, n])


def table_block(entries: list[tuple[bytes, bytes]]) -> bytes:
    """A table block as TF writes it (uncompressed, one restart point), with its trailer."""
    body = b"".join(varint_bytes(0) + varint_bytes(len(k)) + varint_bytes(len(v)) + k + v for k, v in entries)
    body += (0).to_bytes(4, "little") + (1).to_bytes(4, "little")
    return body + b"\0" + _sstable.mask(crc32c.crc32c(body + b"\0")).to_bytes(4, "little")


def sstable(entries: dict[bytes, bytes], listed: int = 1) -> bytes:
    """An SSTable holding `entries` in one data block, which its index block lists `listed` times."""
    data, meta = table_block(sorted(entries.items())), table_block([])
    handle = varint_bytes(0) + varint_bytes(len(data) - _sstable.TRAILER_SIZE)
    index = table_block([(b"%08d" % i, handle) for i in range(listed)])
    handles = (len(data), len(meta) - _sstable.TRAILER_SIZE, len(data) + len(meta), len(index) - _sstable.TRAILER_SIZE)
    footer = b"".join(map(varint_bytes, handles)).ljust(40, b"\0") + _sstable.TABLE_MAGIC.to_bytes(8, "little")
    return data + meta + index + footer


def rewrite_entry(prefix: Path, name: str, shape: tuple[int, ...] | None = None, **fields) -> None:
    """Change tensor `name`'s BundleEntryProto in the index, checksums kept valid (as a buggy writer would)."""
    index = prefix.with_name(prefix.name + ".index")
    entries = dict(_sstable.table(index.read_bytes()))
    entry = tf_ckpt._BundleEntryProto.FromString(entries[name.encode()])
    if shape is not None:
        del entry.shape.dim[:]
        for size in shape:
            entry.shape.dim.add(size=size)
    for field, value in fields.items():
        setattr(entry, field, value)
    entries[name.encode()] = entry.SerializeToString()
    index.write_bytes(sstable(entries))


def flip_byte_of(prefix: Path, name: str) -> None:
    tensor = tf_ckpt._read_index(prefix).tensors[name]
    data_file = prefix.with_name(prefix.name + ".data-00000-of-00001")
    data = bytearray(data_file.read_bytes())
    data[tensor.offset + tensor.length // 2] ^= 0x01
    data_file.write_bytes(bytes(data))


def test_a_flipped_byte_fails_the_checksum_naming_tensor_and_file(tmp_path):
    prefix = copy(tmp_path, "guide/model.ckpt")
    flip_byte_of(prefix, "weights")
    with pytest.raises(
        CorruptCheckpointError, match=r"model\.ckpt\.data-00000-of-00001: tensor 'weights' fails its checksum"
    ):
        tf_ckpt.read(prefix, ["v1", "weights"])


def test_damage_to_a_tensor_not_read_goes_unnoticed(tmp_path):
    prefix = copy(tmp_path, "guide/model.ckpt")
    flip_byte_of(prefix, "weights")
    values = tf_ckpt.read(prefix, ["biases", "v1", "v2"])
    np.testing.assert_array_equal(values["v2"], saved("guide/model.ckpt", "v2"))


def test_a_truncated_data_file_is_corrupt(tmp_path):
    prefix = copy(tmp_path, "guide/model.ckpt")
    data_file = tmp_path / "model.ckpt.data-00000-of-00001"
    data_file.write_bytes(data_file.read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError, match=r"data-00000-of-00001 is truncated: tensor '\w+' needs bytes"):
        tf_ckpt.read(prefix, ["weights"])


@pytest.mark.parametrize("keep", [0, 10, 47, 100, -1])
def test_a_truncated_index_is_corrupt(tmp_path, keep):
    prefix = copy(tmp_path, "guide/model.ckpt")
    index = tmp_path / "model.ckpt.index"
    index.write_bytes(index.read_bytes()[:keep])
    with pytest.raises(CorruptCheckpointError, match=r"index .*model\.ckpt\.index is damaged"):
        tf_ckpt.TensorFlowCheckpoint(prefix)


def test_every_flipped_byte_of_an_index_is_caught_or_harmless(tmp_path):
    prefix = copy(tmp_path, "guide/model.ckpt")
    index = tmp_path / "model.ckpt.index"
    original = index.read_bytes()
    expected = tf_ckpt.TensorFlowCheckpoint(DATA / "guide/model.ckpt").entries
    harmless = []
    for i in range(len(original)):
        damaged = bytearray(original)
        damaged[i] ^= 0x20
        index.write_bytes(bytes(damaged))
        try:
            entries = tf_ckpt.TensorFlowCheckpoint(prefix).entries
        except CorruptCheckpointError:
            continue
        assert entries == expected, f"byte {i}"
        harmless.append(i)
    # Unchecked: the metaindex block and its handle (TF writes it empty; neither TF nor jstate
    # reads it) and the footer's padding.
    footer = len(original) - 48
    meta_offset, pos = _sstable.varint(original, footer)
    meta_size, meta_end = _sstable.varint(original, pos)
    index_end = _sstable.varint(original, _sstable.varint(original, meta_end)[1])[1]
    unread = [
        *range(meta_offset, meta_offset + meta_size + 5),
        *range(footer, meta_end),
        *range(index_end, footer + 40),
    ]
    assert harmless and set(harmless) <= set(unread)


def test_garbage_that_passes_the_block_checksums_is_refused_or_read(tmp_path):
    # A writer with bugs (not a disk) can produce well-checksummed nonsense: it must raise a
    # CheckpointError, never IndexError or MemoryError. Deterministic random edits of each block.
    prefix = copy(tmp_path, "dtypes/model.ckpt")
    index = tmp_path / "model.ckpt.index"
    original = index.read_bytes()
    footer = len(original) - 48
    index_offset, pos = _sstable.varint(original, _sstable.varint(original, _sstable.varint(original, footer)[1])[1])
    blocks = [(index_offset, _sstable.varint(original, pos)[0])]
    for _, handle in _sstable.block(original, *blocks[0]):
        offset, pos = _sstable.varint(handle, 0)
        blocks.append((offset, _sstable.varint(handle, pos)[0]))
    rng = random.Random(0)
    for _ in range(150):
        data = bytearray(original)
        offset, size = rng.choice(blocks)
        for _ in range(rng.choice([1, 2, 8])):
            data[offset + rng.randrange(size)] = rng.randrange(256)
        trailer = _sstable.mask(crc32c.crc32c(bytes(data[offset : offset + size + 1])))
        data[offset + size + 1 : offset + size + 5] = trailer.to_bytes(4, "little")
        index.write_bytes(bytes(data))
        with contextlib.suppress(CheckpointError):
            tf_ckpt.read(prefix, list(tf_ckpt.TensorFlowCheckpoint(prefix).entries))


@pytest.mark.parametrize("times", [2, 5000])
def test_an_index_listing_one_block_many_times_is_corrupt_and_parses_it_once(tmp_path, monkeypatch, times):
    prefix = copy(tmp_path, "guide/model.ckpt")
    index = tmp_path / "model.ckpt.index"
    entries = dict(_sstable.table(index.read_bytes()))
    index.write_bytes(sstable(entries))
    assert (
        tf_ckpt.TensorFlowCheckpoint(prefix).entries == tf_ckpt.TensorFlowCheckpoint(DATA / "guide/model.ckpt").entries
    )  # the table built here reads
    index.write_bytes(sstable(entries, listed=times))
    parsed = []
    block = _sstable.block

    def counted_block(data, offset, size):
        parsed.append(offset)
        return block(data, offset, size)

    monkeypatch.setattr(_sstable, "block", counted_block)
    with pytest.raises(CorruptCheckpointError, match=r"model\.ckpt\.index is damaged \(the index lists blocks twice"):
        tf_ckpt.TensorFlowCheckpoint(prefix)
    assert len(parsed) == 2  # the index block and the data block, once each, however often it is listed


@pytest.mark.parametrize("shape", [(0, 2**62), (2**32, 2**32), (3, 0, 2**40, 2**40), (2**63 - 1,), (-1, 3), (3, -5)])
def test_a_tensor_of_a_shape_no_array_can_have_is_corrupt(tmp_path, shape):
    prefix = copy(tmp_path, "guide/model.ckpt")
    # The size that shape would take, where an int64 holds it: only the shape is at fault.
    rewrite_entry(prefix, "v1", shape, size=min(max(math.prod(shape), 0) * 4, 2**63 - 1))
    damaged = rf"\.index is damaged \(tensor 'v1' has shard 0 of 1, offset \d+, shape {re.escape(str(shape))}"
    with pytest.raises(CorruptCheckpointError, match=damaged):
        tf_ckpt.TensorFlowCheckpoint(prefix)
    with pytest.raises(CorruptCheckpointError, match=damaged):
        tf_ckpt.read(prefix, ["v1"])


def test_a_tensor_of_more_dimensions_than_numpy_allows_is_skipped_with_the_reason(tmp_path):
    prefix = copy(tmp_path, "guide/model.ckpt")
    rewrite_entry(prefix, "v1", (1,) * 65 + (3,))
    assert "v1" not in tf_ckpt.TensorFlowCheckpoint(prefix).entries
    assert "a tensor of rank 66; numpy arrays have at most" in tf_ckpt.TensorFlowCheckpoint(prefix).skipped["v1"]
    with pytest.raises(CheckpointError, match=r"tensor 'v1' cannot be read: it is a tensor of rank 66"):
        tf_ckpt.read(prefix, ["v1"])


@pytest.mark.parametrize("change", [{"shape": (2**20, 2**20), "size": 2**42}, {"offset": 2**62}])
def test_a_tensor_recorded_past_the_end_of_its_data_file_is_refused_before_allocating(tmp_path, change):
    prefix = copy(tmp_path, "guide/model.ckpt")
    rewrite_entry(prefix, "v1", **change)
    with pytest.raises(CorruptCheckpointError, match=r"data-00000-of-00001 is truncated: tensor 'v1' needs bytes"):
        tf_ckpt.read(prefix, ["v1"])


def test_a_missing_index_is_not_found(tmp_path):
    with pytest.raises(
        CheckpointNotFoundError, match=r"No TensorFlow checkpoint at .*model\.ckpt: .*\.index does not exist"
    ):
        tf_ckpt.TensorFlowCheckpoint(tmp_path / "model.ckpt")


def test_a_compressed_index_is_refused_clearly(tmp_path):
    prefix = copy(tmp_path, "guide/model.ckpt")
    index = tmp_path / "model.ckpt.index"
    data = bytearray(index.read_bytes())
    # The first data block starts at byte 0; its size is in the index block's first handle. Mark
    # it snappy-compressed and fix its checksum, as a non-TF writer would.
    footer = data[-48:]
    _, pos = _sstable.varint(footer, _sstable.varint(footer, 0)[1])
    index_offset, pos = _sstable.varint(footer, pos)
    index_size, _ = _sstable.varint(footer, pos)
    first_handle = next(_sstable.block(bytes(data), index_offset, index_size))[1]
    size = _sstable.varint(first_handle, _sstable.varint(first_handle, 0)[1])[0]
    data[size] = 1
    data[size + 1 : size + 5] = _sstable.mask(crc32c.crc32c(bytes(data[: size + 1]))).to_bytes(4, "little")
    index.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.ckpt\.index: its block at bytes 0-\d+ is compressed \(snappy\)"):
        tf_ckpt.TensorFlowCheckpoint(prefix)
