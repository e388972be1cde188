"""Files that are not what a checkpoint's reader expects: special files (a FIFO, a link to
/dev/zero or /dev/urandom, a directory) where a file should be, files larger than any of their
kind, metadata this process cannot read, and metadata declaring arrays no machine could hold.
Each is a CheckpointError naming the file and why, in bounded time and memory; never a hang, a
MemoryError, a PermissionError or a crash.

A call that could hang runs in a thread (`bounded`): the test fails, instead of hanging, if it
has not returned well within a generous limit.
"""

import json
import os
import shutil
import threading
import tracemalloc
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jstate
from jstate import CheckpointError, CorruptCheckpointError
from jstate.formats import manifest as _manifest
from jstate.formats import safetensors as st
from jstate.formats import tf_files
from jstate.formats.integrity import checksum
from jstate.storage import local as _local
from jstate.storage import store as _storage

DATA = Path(__file__).parents[1] / "data/tensorflow"
JOIN = 60.0  # seconds a call may take before it counts as hung: generous, on a loaded machine


def bounded(fn):
    """``fn()`` in a thread: what it returned, or the exception it raised; fails if it hangs."""
    outcome = []

    def run():
        try:
            outcome.append(("returned", fn()))
        except BaseException as e:
            outcome.append(("raised", e))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(JOIN)
    assert not thread.is_alive(), f"the call did not return within {JOIN} s: it blocked on a special file"
    return outcome[0]


def raised(fn) -> BaseException:
    kind, value = bounded(fn)
    assert kind == "raised", f"expected an error, got {value!r}"
    return value


@pytest.fixture
def tf_dir(tmp_path):
    """A copy of a directory of TensorFlow checkpoints (written by TensorFlow), with its state file."""
    directory = tmp_path / "train"
    shutil.copytree(DATA / "train", directory)
    assert (directory / tf_files.STATE_FILE).is_file()
    return directory


def small() -> jstate.State:
    return jstate.State({"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)})


def arrays_of(checkpoint: str) -> Path:
    return next(p for p in Path(checkpoint).iterdir() if p.name.startswith("arrays"))


# -- special files where a file should be -----------------------------------------------------
@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_a_state_file_linked_to_an_endless_device_is_refused_unread(tf_dir, device):
    (tf_dir / tf_files.STATE_FILE).unlink()
    (tf_dir / tf_files.STATE_FILE).symlink_to(device)
    error = raised(lambda: jstate.latest_checkpoint(tf_dir))
    assert isinstance(error, CheckpointError), repr(error)
    assert f"{tf_dir / 'checkpoint'}: this TensorFlow state file is a character device" in str(error)
    assert f"a link to {device}" in str(error)


def test_a_fifo_state_file_is_refused_without_blocking(tf_dir):
    (tf_dir / tf_files.STATE_FILE).unlink()
    os.mkfifo(tf_dir / tf_files.STATE_FILE)
    error = raised(lambda: jstate.latest_checkpoint(tf_dir))
    assert isinstance(error, CheckpointError), repr(error)
    assert "this TensorFlow state file is a FIFO (named pipe)" in str(error)


def test_a_fifo_manifest_is_refused_without_blocking(tmp_path):
    path = Path(jstate.Saver().save(small(), tmp_path / "ckpt/model"))
    (path / _manifest.FILE).unlink()
    os.mkfifo(path / _manifest.FILE)
    error = raised(lambda: jstate.open_checkpoint(path))
    assert isinstance(error, CheckpointError), repr(error)
    assert f"{path / _manifest.FILE}: this manifest is a FIFO" in str(error)
    # A lookup of the directory lists no such checkpoint, and never blocks on it.
    assert bounded(lambda: jstate.latest_checkpoint(tmp_path / "ckpt")) == ("returned", None)


def test_a_fifo_among_a_checkpoints_metadata_is_not_listed(tmp_path):
    """A FIFO for a jstate checkpoint's Orbax `_METADATA`, and for a plain Orbax checkpoint's:
    neither is listed or opened, the older readable checkpoint is the latest."""
    saver = jstate.Saver()
    older = saver.save(small(), tmp_path / "ckpt/model", step=1)
    newer = saver.save(small(), tmp_path / "ckpt/model", step=2)
    (arrays_of(newer) / "_METADATA").unlink()
    os.mkfifo(arrays_of(newer) / "_METADATA")
    assert bounded(lambda: jstate.latest_checkpoint(tmp_path / "ckpt")) == ("returned", older)

    plain = tmp_path / "orbax"
    ocp.PyTreeCheckpointer().save(plain, {"w": np.ones(3, np.float32)})
    (plain / "_METADATA").unlink()
    os.mkfifo(plain / "_METADATA")
    # No regular `_METADATA`: no Orbax checkpoint there (`orbax.is_checkpoint`), said at once.
    error = raised(lambda: jstate.open_checkpoint(plain))
    assert isinstance(error, CheckpointError) and "holds no complete checkpoint" in str(error), repr(error)


def test_a_fifo_index_or_data_file_of_a_tensorflow_checkpoint_never_blocks(tf_dir):
    prefix = tf_dir / "model.ckpt-20"
    data = next(tf_dir.glob("model.ckpt-20.data-*"))
    data.unlink()
    os.mkfifo(data)
    error = raised(lambda: jstate.load_variable(prefix, "layer1/weights"))
    assert isinstance(error, CheckpointError) and f"{data}: this TensorFlow data file is a FIFO" in str(error)


def test_reading_refuses_a_directory_and_a_special_file_by_name(tmp_path):
    (tmp_path / "dir").mkdir()
    with pytest.raises(CheckpointError, match=r"dir: this manifest is a directory; jstate reads only regular files"):
        _storage.read_bytes(tmp_path / "dir", 100, "manifest")
    with pytest.raises(CheckpointError, match=r"/dev/null: this file is a character device"):
        _storage.read_bytes(Path("/dev/null"))
    with pytest.raises(FileNotFoundError):  # a missing file is still one: callers tell it apart
        _storage.read_bytes(tmp_path / "missing")


# -- files larger than their kind --------------------------------------------------------------
def test_a_file_over_its_kinds_limit_is_refused_unread(tmp_path):
    big = tmp_path / "checkpoint"
    with open(big, "wb") as f:  # sparse: no disk or memory spent
        f.truncate(tf_files.STATE_LIMIT + 1)
    with pytest.raises(CheckpointError, match=r"checkpoint: this state file holds 1,048,577 bytes or more, over the "):
        _local.read_bytes(big, tf_files.STATE_LIMIT, "state file")


def test_an_oversized_manifest_is_refused_unread(tmp_path):
    path = Path(jstate.Saver().save(small(), tmp_path / "ckpt/model"))
    with open(path / _manifest.FILE, "r+b") as f:
        f.truncate(_manifest.LIMIT + 1)  # sparse
    with pytest.raises(CheckpointError, match=r"this manifest holds 1,073,741,825 bytes or more"):
        jstate.open_checkpoint(path)


def test_an_oversized_safetensors_header_is_refused_unread(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes((st.HEADER_LIMIT + 1).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: its header is said to hold 100,000,001 bytes"):
        jstate.open_checkpoint(path)


def test_a_state_file_linked_to_dev_zero_is_refused_as_a_safetensors_file_too(tmp_path):
    (tmp_path / "model.safetensors").symlink_to("/dev/zero")
    error = raised(lambda: jstate.open_checkpoint(tmp_path / "model.safetensors"))
    assert isinstance(error, CheckpointError) and "character device" in str(error), repr(error)


# -- metadata that cannot be read --------------------------------------------------------------
def test_metadata_that_is_a_directory_is_not_listed_and_not_latest(tmp_path):
    """A directory where the Orbax `_METADATA` file should be (what an unreadable file is to a
    reader, and works as root): that checkpoint is not listed, the older one is the latest, and
    opening it names the file."""
    saver = jstate.Saver()
    older = saver.save(small(), tmp_path / "ckpt/model", step=1)
    newer = saver.save(small(), tmp_path / "ckpt/model", step=2)
    (arrays_of(newer) / "_METADATA").unlink()
    (arrays_of(newer) / "_METADATA").mkdir()
    assert jstate.latest_checkpoint(tmp_path / "ckpt") == older
    assert [row[0] for row in jstate.list_checkpoints(tmp_path / "ckpt")] == [older]
    with pytest.raises(CheckpointError, match=r"_METADATA"):
        jstate.open_checkpoint(newer)
    assert jstate.Saver().restore(tmp_path / "ckpt", small()).keys() == small().keys()


def _unreadable_metadata_is_not_latest(tmp_path):
    saver = jstate.Saver()
    older = saver.save(small(), tmp_path / "ckpt/model", step=1)
    newer = saver.save(small(), tmp_path / "ckpt/model", step=2)
    return older, newer, arrays_of(newer) / "_METADATA"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file of mode 000")
def test_an_unreadable_metadata_file_is_not_listed_and_restoring_it_names_it(tmp_path):
    older, newer, metadata = _unreadable_metadata_is_not_latest(tmp_path)
    metadata.chmod(0)
    assert jstate.latest_checkpoint(tmp_path / "ckpt") == older
    with pytest.raises(CheckpointError, match=r"_METADATA: this Orbax metadata file cannot be read \(Permission"):
        jstate.Saver().restore(newer, small())


def test_a_permission_error_on_metadata_is_a_checkpoint_error_even_as_root(tmp_path, monkeypatch):
    """The same as the chmod test, for a process (root) that the OS lets read anything: opening
    the metadata file fails with EACCES as it would for another user."""
    older, newer, metadata = _unreadable_metadata_is_not_latest(tmp_path)
    real_open = os.open

    def denied(path, *args, **kwargs):
        if os.fspath(path) == os.fspath(metadata):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    assert jstate.latest_checkpoint(tmp_path / "ckpt") == older
    with pytest.raises(CheckpointError, match=r"_METADATA: this Orbax metadata file cannot be read \(Permission"):
        jstate.Saver().restore(newer, small())
    restored = jstate.Saver().restore(tmp_path / "ckpt", small())
    np.testing.assert_array_equal(restored["w"], small()["w"])


def _deny_search(monkeypatch, directory):
    """`os.stat` of anything inside `directory` fails with EACCES, as for a user without search
    (x) permission on it (a chmod does not stop root)."""
    real_stat = os.stat

    def denied(path, *args, **kwargs):
        if os.fspath(path).startswith(os.fspath(directory) + os.sep):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", denied)


def test_an_arrays_directory_without_search_permission_is_a_checkpoint_error_naming_it(tmp_path, monkeypatch):
    older, newer, metadata = _unreadable_metadata_is_not_latest(tmp_path)
    _deny_search(monkeypatch, metadata.parent)
    reads = {
        "open_checkpoint": lambda: jstate.open_checkpoint(newer),
        "list_variables": lambda: jstate.list_variables(newer),
        "load_variable": lambda: jstate.load_variable(newer, "w"),
        "restore": lambda: jstate.Saver().restore(newer, small()),
    }
    for read in reads.values():
        with pytest.raises(
            CheckpointError,
            match=rf"{metadata.parent.name}/_METADATA: cannot be looked up \(Perm.*"
            rf"search \(x\) permission",
        ):
            read()
    assert jstate.latest_checkpoint(tmp_path / "ckpt") == older  # as for any checkpoint it cannot open


def test_an_existence_check_under_a_directory_without_search_permission_names_it(tmp_path, monkeypatch):
    """Python 3.11's `Path.exists` and friends let a PermissionError through: the store's checks
    raise a CheckpointError naming the path (still a PermissionError, for `except OSError`)."""
    (tmp_path / "locked").mkdir()
    _deny_search(monkeypatch, tmp_path / "locked")
    for check in (_storage.exists, _storage.is_dir, _storage.is_file, _storage.size):
        with pytest.raises(CheckpointError, match=r"locked/x: cannot be looked up \(Permission denied\)") as e:
            check(tmp_path / "locked" / "x")
        assert isinstance(e.value, PermissionError)
    assert not _storage.exists(tmp_path / "nothing" / "here")


# -- JSON nested deeper than Python decodes ---------------------------------------------------
DEEP = b"[" * 200_000 + b"]" * 200_000  # a few hundred kilobytes; json.loads raises RecursionError


def test_a_deeply_nested_manifest_is_a_damaged_one_naming_it(tmp_path):
    """A manifest with a valid checksum whose JSON nests too deep: not listed, opening it names the
    file, and the next save into the directory works."""
    saver = jstate.Saver()
    older = saver.save(small(), tmp_path / "ckpt/model", step=1)
    newer = saver.save(small(), tmp_path / "ckpt/model", step=2)
    rest = b'"x":' + DEEP + b"}"
    Path(newer, _manifest.FILE).write_bytes(_manifest._HEAD + b"%08x" % checksum(rest) + b'",' + rest)
    assert jstate.latest_checkpoint(tmp_path / "ckpt") == older
    for read in (jstate.open_checkpoint, jstate.list_variables, lambda p: jstate.Saver().restore(p, small())):
        with pytest.raises(CorruptCheckpointError, match=r"model-2/jstate\.json is damaged .*nested deeper"):
            read(newer)
    assert saver.save(small(), tmp_path / "ckpt/model", step=3).endswith("model-3")


@pytest.mark.parametrize("header", [b'{"a":' + DEEP + b"}", b'{"__metadata__":{"k":' + DEEP + b"}}"])
def test_a_deeply_nested_safetensors_header_is_corrupt(tmp_path, header):
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors is damaged .*nested deeper"):
        jstate.open_checkpoint(path)


@pytest.mark.parametrize("created", [float("nan"), float("inf"), 1e300, -1.0])
def test_a_manifest_recording_an_impossible_time_is_damaged_and_never_listed(tmp_path, created):
    """Its checksum valid, a manifest whose `created` is no time (NaN, 1e400, past any calendar)
    is a damaged checkpoint: listing and lookups skip it rather than fail on it."""
    good = jstate.Saver().save(small(), tmp_path / "model", step=1)
    bad = Path(jstate.Saver().save(small(), tmp_path / "model", step=2))
    raw = json.loads((bad / _manifest.FILE).read_bytes())
    (bad / _manifest.FILE).write_bytes(_manifest.encode(raw | {"created": created}))
    assert [row[0] for row in jstate.list_checkpoints(tmp_path)] == [good]
    assert jstate.latest_checkpoint(tmp_path) == good
    with pytest.raises(jstate.CorruptCheckpointError, match="is not a time in seconds since 1970"):
        jstate.open_checkpoint(bad)


@pytest.mark.parametrize("field", ["created", "order", "clock"])
def test_a_manifest_its_reader_would_refuse_is_never_written(tmp_path, field):
    """A save commits by writing its manifest: bytes the reader refuses would be a save that
    returned a path no lookup lists. They are refused before anything is written."""
    manifest = _manifest.Manifest({}, step=1, **({"created": 1.0} | {field: _manifest.LATEST_TIME * 2}))
    with pytest.raises(CheckpointError, match=r"its manifest would not read back \(time 200000000000.0 is not a time"):
        manifest.write(tmp_path)
    assert os.listdir(tmp_path) == []


def test_reading_a_neighbours_order_takes_memory_bounded_whatever_its_manifest_size(tmp_path):
    """Each save reads the order of every checkpoint beside it. A manifest (its checksum valid)
    of 24 MiB of empty JSON objects took ~600 MB to parse; its order is now read from its first
    bytes and its checksum a chunk at a time, and a save beside it lands."""
    path = Path(jstate.Saver().save(small(), tmp_path / "model", step=1))
    rest = b'"x":[' + b"{}," * (8 << 20) + b"{}]}"
    (path / _manifest.FILE).write_bytes(_manifest._HEAD + b"%08x" % checksum(rest) + b'",' + rest)
    del rest
    tracemalloc.start()
    try:
        order = _manifest.Manifest.read_order(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert order == 0.0  # a checksummed jstate manifest, but one that records no order
    assert peak < 3 * _manifest._ORDER_CHUNK, f"{peak:,} bytes to read the order of a 24 MiB manifest"
    saved = jstate.Saver().save(small(), tmp_path / "model", step=2)
    assert jstate.latest_checkpoint(tmp_path / "model") == saved


# -- one bad entry beside the checkpoints ------------------------------------------------------
def _manifest_is(kind: str):
    """Make `<directory>/junk` an entry whose manifest is a `kind` of file no reader can take."""

    def make(directory: Path) -> None:
        manifest = directory / "junk" / _manifest.FILE
        manifest.parent.mkdir()
        if kind == "directory":
            manifest.mkdir()
        elif kind == "fifo":
            os.mkfifo(manifest)
        elif kind == "device":
            manifest.symlink_to("/dev/zero")
        elif kind == "loop":
            manifest.symlink_to(manifest.name)
        else:  # oversized, sparse: no disk spent
            with open(manifest, "wb") as f:
                f.truncate(_manifest.LIMIT + 1)

    return make


def _self_link(directory: Path) -> None:
    (directory / "zzz").symlink_to("zzz")


BAD_ENTRIES = {kind: _manifest_is(kind) for kind in ("directory", "fifo", "device", "loop", "oversized")}
BAD_ENTRIES["self-link"] = _self_link


@pytest.mark.parametrize("entry", sorted([*BAD_ENTRIES, "unlistable-checkpoint"]))
def test_one_bad_entry_in_the_directory_never_stops_a_save_into_it(tmp_path, monkeypatch, entry):
    """As lookups skip an entry they cannot read, so does a save ordering itself after its
    neighbours and cleaning beside itself: the save lands, and is the latest."""
    saver = jstate.Saver(max_to_keep=1)
    first = saver.save(small(), tmp_path / "model", step=1)
    if entry == "unlistable-checkpoint":  # a checkpoint directory without read permission (mode 0311)
        real = os.listdir

        def denied(path=".", *args):
            if os.fspath(path) == first:
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real(path, *args)

        monkeypatch.setattr(os, "listdir", denied)
    else:
        BAD_ENTRIES[entry](tmp_path)
    assert bounded(lambda: saver.save(small(), tmp_path / "model", step=2)) == ("returned", str(tmp_path / "model-2"))
    assert bounded(lambda: jstate.latest_checkpoint(tmp_path)) == ("returned", str(tmp_path / "model-2"))


# -- metadata declaring an impossible array ----------------------------------------------------
def test_a_zarray_declaring_a_huge_array_is_a_checkpoint_error(tmp_path):
    """A plain Orbax checkpoint (zarr, no OCDBT) whose ``.zarray`` declares shape ``[2**40]``
    with chunks ``[1]``: listed with that shape, but reading it is a CheckpointError naming the
    variable, not a MemoryError (or tensorstore's abort) from allocating 4 TiB."""
    path = tmp_path / "zarr"
    ocp.PyTreeCheckpointer(use_ocdbt=False).save(path, {"w": np.ones(4, np.float32)})
    zarray = path / "w" / ".zarray"
    meta = json.loads(zarray.read_text())
    zarray.write_text(json.dumps(meta | {"shape": [2**40], "chunks": [1]}))
    assert jstate.list_variables(path) == [("w", (2**40,), np.dtype("float32"))]
    with pytest.raises(
        CheckpointError, match=r"'w' is recorded as shape \(1099511627776,\) of float32 \(4096\.0 GiB\)"
    ):
        jstate.load_variable(path, "w")
    with pytest.raises(jstate.SpecMismatchError, match=r"'w' has shape \(1099511627776,\)"):
        jstate.Saver().restore(path, jstate.State({"w": jnp.ones(4)}))


def test_a_fifo_zarray_is_refused_without_blocking(tmp_path):
    path = tmp_path / "zarr"
    ocp.PyTreeCheckpointer(use_ocdbt=False).save(path, {"w": np.ones(4, np.float32)})
    (path / "w" / ".zarray").unlink()
    os.mkfifo(path / "w" / ".zarray")
    error = raised(lambda: jstate.open_checkpoint(path))
    assert isinstance(error, CheckpointError) and "this zarr metadata file is a FIFO" in str(error), repr(error)
