"""Reading TensorFlow checkpoints without TensorFlow: TF1 ``Saver`` and TF2 ``tf.train.Checkpoint``.

Both write a "tensor bundle" (TF's V2 checkpoint format) under a prefix such as ``model.ckpt``:

  model.ckpt.index                  an SSTable (LevelDB's table format) mapping each tensor name
                                    to a ``BundleEntryProto`` (dtype, shape, data file, offset,
                                    size, masked CRC32C); the key "" holds a ``BundleHeaderProto``
  model.ckpt.data-00000-of-00002    the tensors' raw little-endian bytes, back to back
  checkpoint                        (beside it, optional) a text proto naming the latest prefix

The table and the two small protobufs are parsed here by hand, so TensorFlow and protobuf are
not needed. TF1's older V1 format (one ``model.ckpt`` file, no ``.index``) is not read.
"""

from __future__ import annotations

import codecs
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import crc32c
import ml_dtypes
import numpy as np

from . import _sstable
from ._errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, closest, shorten
from ._spec import Entry

STATE_FILE = "checkpoint"
_DATA_FILE = re.compile(r"(.+)\.data-\d{5}-of-\d{5}")

# TensorFlow's DataType enum (types.proto) -> numpy dtype, for the dtypes jstate reads.
_DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.float32),
    2: np.dtype(np.float64),
    3: np.dtype(np.int32),
    4: np.dtype(np.uint8),
    5: np.dtype(np.int16),
    6: np.dtype(np.int8),
    8: np.dtype(np.complex64),
    9: np.dtype(np.int64),
    10: np.dtype(np.bool_),
    14: np.dtype(ml_dtypes.bfloat16),
    17: np.dtype(np.uint16),
    18: np.dtype(np.complex128),
    19: np.dtype(np.float16),
    22: np.dtype(np.uint32),
    23: np.dtype(np.uint64),
}
# The rest, by name, for the reasons `skipped` gives.
_UNREAD = {7: "DT_STRING", 11: "DT_QINT8", 12: "DT_QUINT8", 13: "DT_QINT32", 15: "DT_QINT16", 16: "DT_QUINT16"}
_UNREAD |= {20: "DT_RESOURCE", 21: "DT_VARIANT", 24: "DT_FLOAT8_E5M2", 25: "DT_FLOAT8_E4M3FN", 29: "DT_INT4"}
_UNREAD |= {30: "DT_UINT4"}


@dataclass(frozen=True)
class _BundleEntry:
    """One tensor's ``BundleEntryProto``: where its bytes are and how to check them."""

    dtype: int  # TF DataType enum
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int  # masked, as TF stores it
    slices: int  # number of TensorSliceProtos: > 0 for a partitioned variable


@dataclass(frozen=True)
class _Bundle:
    """A parsed ``.index`` file."""

    num_shards: int
    tensors: dict[str, _BundleEntry]


# -- finding checkpoints ----------------------------------------------------------------------
def find(path: Path) -> Path | None:
    """The prefix of the TensorFlow checkpoint that `path` names, or None if it names none.

    Valid forms of `path`:

      ckpt/model.ckpt-1000                         the prefix (``model.ckpt-1000.index`` exists)
      ckpt/model.ckpt-1000.index                   its index file
      ckpt/model.ckpt-1000.data-00000-of-00001     one of its data files

    A directory is not a checkpoint here: `latest` finds the one its state file names.
    """
    path = Path(path)
    if path.name.endswith(".index") and path.is_file():
        return path.with_name(path.name[: -len(".index")])
    m = _DATA_FILE.fullmatch(path.name)
    if m and _index_file(path.with_name(m.group(1))).is_file():
        return path.with_name(m.group(1))
    return path if _index_file(path).is_file() else None


def latest(directory: Path) -> Path | None:
    """The prefix that TensorFlow's ``checkpoint`` state file in `directory` names as the latest.

    A relative ``model_checkpoint_path`` is taken relative to `directory` (as TF does). An
    absolute one that no longer exists (the directory was moved or copied) falls back to its
    last component inside `directory`. None if there is no state file, it names nothing, or the
    named checkpoint's ``.index`` is missing.

    >>> _tensorflow.latest(Path("train"))
    PosixPath('train/model.ckpt-20')
    """
    directory = Path(directory)
    try:
        text = (directory / STATE_FILE).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    m = re.search(r'^\s*model_checkpoint_path\s*:\s*"((?:[^"\\]|\\.)*)"', text, re.MULTILINE)
    if m is None:
        return None
    try:  # a text proto string: C escapes over UTF-8 bytes
        name = codecs.escape_decode(m.group(1).encode("utf-8"))[0].decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    for prefix in (directory / name, directory / Path(name).name):
        if _index_file(prefix).is_file():
            return prefix
    return None


def _index_file(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".index")


def _data_file(prefix: Path, shard: int, num_shards: int) -> Path:
    return prefix.with_name(f"{prefix.name}.data-{shard:05d}-of-{num_shards:05d}")


# -- what a checkpoint holds ------------------------------------------------------------------
def entries(prefix: Path) -> dict[str, Entry]:
    """Every tensor of the checkpoint that jstate can read, by name, from its index only.

    Names are TensorFlow's, unchanged: ``layer1/weights`` (TF1) or
    ``model/dense/kernel/.ATTRIBUTES/VARIABLE_VALUE`` (TF2). Tensors that cannot be read are
    listed by `skipped` instead.

    Raises:
      CheckpointNotFoundError: if ``<prefix>.index`` does not exist.
      CorruptCheckpointError: if it is truncated or garbled.
      CheckpointError: if it was written big-endian or by a newer, incompatible TensorFlow.
    """
    bundle = _read_index(Path(prefix))
    return {name: Entry((name,), t.shape, _DTYPES[t.dtype]) for name, t in bundle.tensors.items() if _reason(t) is None}


def skipped(prefix: Path) -> dict[str, str]:
    """The tensors of the checkpoint that jstate cannot read, by name, each with the reason.

    Strings (TF2's ``_CHECKPOINTABLE_OBJECT_GRAPH`` among them), resources, variants,
    quantized and 4-bit types, and partitioned variables (stored as slices) are skipped.
    """
    bundle = _read_index(Path(prefix))
    reasons = {name: _reason(t) for name, t in bundle.tensors.items()}
    return {name: reason for name, reason in reasons.items() if reason is not None}


def _reason(t: _BundleEntry) -> str | None:
    if t.dtype not in _DTYPES:
        kind = _UNREAD.get(t.dtype, f"DataType {t.dtype}")
        what = "a string tensor" if kind == "DT_STRING" else "a tensor"
        return f"{what} of dtype {kind}, which has no JAX equivalent"
    if t.slices:
        return (
            f"a partitioned variable, saved as {t.slices} slices; jstate reads whole tensors only "
            "(load it with TensorFlow and save it unpartitioned)"
        )
    return None


# -- reading tensors --------------------------------------------------------------------------
def read(prefix: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Read just the tensors `names` of the checkpoint, checking each one's CRC32C.

    Each data file is opened once and read at the tensors' offsets, in file order, straight into
    the arrays returned.

    Args:
      prefix: the checkpoint prefix (see `find`).
      names: tensor names, as `entries` lists them.

    Returns:
      ``{name: array}`` with TensorFlow's shape and dtype (bfloat16 as ``ml_dtypes.bfloat16``).

    Raises:
      CheckpointError: for a name the checkpoint lacks or holds in a form jstate cannot read.
      CorruptCheckpointError: for a missing, truncated or altered index or data file; the
        message names the file and the tensor.
    """
    prefix = Path(prefix)
    bundle = _read_index(prefix)
    missing = [n for n in names if n not in bundle.tensors]
    if missing:
        raise CheckpointError(
            f"TensorFlow checkpoint {prefix} holds no tensor {shorten(missing)}.{closest(missing[0], bundle.tensors)} "
            "`jstate.list_variables(path)` lists them."
        )
    for name in names:
        reason = _reason(bundle.tensors[name])
        if reason is not None:
            raise CheckpointError(f"TensorFlow checkpoint {prefix}: tensor '{name}' cannot be read: it is {reason}.")
    by_shard: dict[int, list[str]] = {}
    for name in dict.fromkeys(names):
        by_shard.setdefault(bundle.tensors[name].shard, []).append(name)
    out = {}
    for shard, shard_names in sorted(by_shard.items()):
        path = _data_file(prefix, shard, bundle.num_shards)
        shard_names.sort(key=lambda n: bundle.tensors[n].offset)
        try:
            with open(path, "rb") as f:
                file_size = os.fstat(f.fileno()).st_size
                for name in shard_names:
                    out[name] = _read_tensor(f, file_size, prefix, path, name, bundle.tensors[name])
        except FileNotFoundError:
            raise CorruptCheckpointError(
                f"TensorFlow checkpoint {prefix} is incomplete: its data file {path} is missing "
                f"(it holds '{shard_names[0]}')."
            ) from None
        except OSError as e:
            raise CorruptCheckpointError(f"TensorFlow checkpoint {prefix}: cannot read {path} ({e}).") from e
    return {name: out[name] for name in names}


def _read_tensor(f, file_size: int, prefix: Path, path: Path, name: str, t: _BundleEntry) -> np.ndarray:
    dtype = _DTYPES[t.dtype]
    expected = math.prod(t.shape) * dtype.itemsize
    if t.size != expected:
        raise CorruptCheckpointError(
            f"TensorFlow checkpoint index {_index_file(prefix)} is damaged: tensor '{name}' is recorded "
            f"as {t.size} bytes, but shape {t.shape} of {dtype.name} takes {expected}."
        )
    if t.offset + t.size > file_size:  # checked first: a garbled entry must not allocate terabytes
        raise CorruptCheckpointError(
            f"Data file {path} is truncated: tensor '{name}' needs bytes {t.offset}-{t.offset + t.size}, "
            f"but the file ends at byte {file_size}."
        )
    array = np.empty(t.shape, dtype)
    raw = memoryview(array.reshape(-1).view(np.uint8))  # plain bytes: numpy cannot export bfloat16 buffers
    f.seek(t.offset)
    if f.readinto(raw) != t.size:
        raise CorruptCheckpointError(f"Data file {path} changed while tensor '{name}' was read from it.")
    actual = _sstable.mask(crc32c.crc32c(raw))
    if actual != t.crc32c:
        raise CorruptCheckpointError(
            f"Data file {path}: tensor '{name}' fails its checksum (CRC32C {actual:#010x}, the index "
            f"records {t.crc32c:#010x}); the file is damaged. Restore an earlier checkpoint."
        )
    return array


# -- the index file: an SSTable of protobufs --------------------------------------------------
def _read_index(prefix: Path) -> _Bundle:
    path = _index_file(prefix)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"No TensorFlow checkpoint at {prefix}: {path} does not exist.") from None
    except OSError as e:
        raise CorruptCheckpointError(f"TensorFlow checkpoint index {path} cannot be read ({e}).") from e
    try:
        return _parse_bundle(data)
    except _sstable.Unsupported as e:
        raise CheckpointError(f"TensorFlow checkpoint index {path}: {e}") from None
    except (_sstable.Garbled, IndexError, TypeError, ValueError) as e:  # garbage where a message or number should be
        raise CorruptCheckpointError(
            f"TensorFlow checkpoint index {path} is damaged ({e}). Restore an earlier checkpoint."
        ) from e


def _parse_bundle(data: bytes) -> _Bundle:
    header = None
    tensors = {}
    for key, value in _sstable.table(data):
        if key == b"":
            header = value
        elif key[0] != 0:  # keys starting with NUL hold the slices of partitioned variables
            tensors[key.decode("utf-8")] = _parse_entry(value)
    if header is None:
        raise _sstable.Garbled("no header entry")
    num_shards, endianness, min_consumer, bad_consumers = 1, 0, 0, []
    for field, value in _sstable.fields(header):
        if field == 1:
            num_shards = _sstable.signed(value)
        elif field == 2:
            endianness = _sstable.signed(value)
        elif field == 3:  # VersionDef
            for f, v in _sstable.fields(value):
                if f == 2:
                    min_consumer = _sstable.signed(v)
                elif f == 3:  # repeated int32, packed by proto3 writers
                    bad_consumers += _sstable.packed(v) if isinstance(v, bytes) else [v]
    if endianness != 0:
        raise _sstable.Unsupported(
            "it was written on a big-endian machine; jstate reads little-endian checkpoints only. "
            "Re-save it with TensorFlow on a little-endian (x86 or ARM) machine."
        )
    if min_consumer > 1 or 1 in bad_consumers:
        raise _sstable.Unsupported(
            f"it needs a tensor bundle reader of version {max(min_consumer, 2)} or newer; jstate reads "
            "version 1 (what TensorFlow 1.x and 2.x write)."
        )
    for name, t in tensors.items():
        if not 0 <= t.shard < num_shards or t.offset < 0 or t.size < 0 or any(d < 0 for d in t.shape):
            raise _sstable.Garbled(
                f"tensor '{name}' has shard {t.shard} of {num_shards}, offset {t.offset}, shape {t.shape}"
            )
    return _Bundle(num_shards, tensors)


def _parse_entry(data: bytes) -> _BundleEntry:
    values = {"dtype": 0, "shard": 0, "offset": 0, "size": 0, "crc32c": 0}
    shape: list[int] = []
    slices = 0
    names = {1: "dtype", 3: "shard", 4: "offset", 5: "size", 6: "crc32c"}
    for field, value in _sstable.fields(data):
        if field == 2:  # TensorShapeProto: repeated Dim dim = 2 { int64 size = 1; }
            for f, dim in _sstable.fields(value):
                if f == 2:
                    shape.append(next((_sstable.signed(v) for g, v in _sstable.fields(dim) if g == 1), 0))
        elif field == 7:
            slices += 1
        elif field in names:
            values[names[field]] = _sstable.signed(value) & 0xFFFFFFFF if field == 6 else _sstable.signed(value)
    return _BundleEntry(shape=tuple(shape), slices=slices, **values)
