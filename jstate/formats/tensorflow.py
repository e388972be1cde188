"""Reading TensorFlow checkpoints without TensorFlow: TF1 ``Saver`` and TF2 ``tf.train.Checkpoint``.

Both write a "tensor bundle" (TF's V2 checkpoint format) under a prefix such as ``model.ckpt``:

  model.ckpt.index                  an SSTable (LevelDB's table format) mapping each tensor name
                                    to a ``BundleEntryProto`` (dtype, shape, data file, offset,
                                    size, masked CRC32C); the key "" holds a ``BundleHeaderProto``
  model.ckpt.data-00000-of-00002    the tensors' raw little-endian bytes, back to back
  checkpoint                        (beside it, optional) a text ``CheckpointState`` naming the
                                    latest prefix

The table is read by `tf_table`, its protobufs parsed with the protobuf package from
TensorFlow's message definitions copied into `tf_proto` (so TensorFlow is not needed); the
files' names and the state file are `tf_files`'. TF1's older V1 format (one ``model.ckpt``
file, no ``.index``) is not read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import crc32c
import jax
import ml_dtypes
import numpy as np
from google.protobuf.message import DecodeError, Message

from ..core.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, closest, shorten
from ..core.shaped import Shaped
from ..storage import store as _storage
from . import tf_proto as _tfproto
from . import tf_table as _sstable
from .base import Checkpoint, Entry, from_host
from .tf_files import data_file, find, index_file, latest

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
# The most of an index that is read: ~100 bytes a tensor, so millions of tensors.
INDEX_LIMIT = 1 << 30
_MAX_RANK = 64 if int(np.__version__.split(".")[0]) >= 2 else 32  # numpy's limit; TensorFlow's is 254

_BundleHeaderProto, _BundleEntryProto = _tfproto.BundleHeaderProto, _tfproto.BundleEntryProto


@dataclass(frozen=True)
class _BundleEntry(Shaped):
    """One tensor's ``BundleEntryProto``: what it is, where its bytes are and how to check them."""

    datatype: int  # TF's DataType enum
    dtype: np.dtype | None  # its numpy dtype; None where there is none (`_reason` says why)
    shape: tuple[int, ...]
    shard: int
    offset: int
    length: int  # bytes in its data file (TF's `size`, which is no element count)
    crc32c: int  # masked, as TF stores it
    slices: int  # number of TensorSliceProtos: > 0 for a partitioned variable


@dataclass(frozen=True)
class _Bundle:
    """A parsed ``.index`` file."""

    num_shards: int
    tensors: dict[str, _BundleEntry]


# -- what a checkpoint holds ------------------------------------------------------------------
def _reason(t: _BundleEntry) -> str | None:
    """Why jstate cannot read tensor `t`, or None: it can."""
    if t.dtype is None:
        kind = _UNREAD.get(t.datatype, f"DataType {t.datatype}")
        what = "a string tensor" if kind == "DT_STRING" else "a tensor"
        return f"{what} of dtype {kind}, which has no JAX equivalent"
    if len(t.shape) > _MAX_RANK:
        return f"a tensor of rank {len(t.shape)}; numpy arrays have at most {_MAX_RANK} dimensions"
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
      prefix: the checkpoint prefix (see `tf_files.find`).
      names: tensor names, as `TensorFlowCheckpoint.entries` lists them.

    Returns:
      ``{name: array}`` with TensorFlow's shape and dtype (bfloat16 as ``ml_dtypes.bfloat16``).

    Raises:
      CheckpointError: for a name the checkpoint lacks or holds in a form jstate cannot read.
      CorruptCheckpointError: for a missing, truncated or altered index or data file; the
        message names the file and the tensor.

    >>> DATA = Path(jstate.__file__).parents[1] / "tests/data/tensorflow"  # written by TensorFlow
    >>> read(DATA / "guide/model.ckpt", ["v1"])
    {'v1': array([1., 1., 1.], dtype=float32)}
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
        path = data_file(prefix, shard, bundle.num_shards)
        shard_names.sort(key=lambda n: bundle.tensors[n].offset)
        try:
            with _storage.open_regular(path, "TensorFlow data file") as (fd, stat), open(fd, "rb", closefd=False) as f:
                for name in shard_names:
                    out[name] = _read_tensor(f, stat.st_size, prefix, path, name, bundle.tensors[name])
        except FileNotFoundError:
            raise CorruptCheckpointError(
                f"TensorFlow checkpoint {prefix} is incomplete: its data file {path} is missing "
                f"(it holds '{shard_names[0]}')."
            ) from None
        except OSError as e:
            raise CorruptCheckpointError(f"TensorFlow checkpoint {prefix}: cannot read {path} ({e}).") from e
    return {name: out[name] for name in names}


def _read_tensor(f, file_size: int, prefix: Path, path: Path, name: str, t: _BundleEntry) -> np.ndarray:
    """Tensor `name` (entry `t`) from the open data file `f` at `path`, its CRC32C checked."""
    if t.length != t.nbytes:
        raise CorruptCheckpointError(
            f"TensorFlow checkpoint index {index_file(prefix)} is damaged: tensor '{name}' is recorded "
            f"as {t.length} bytes, but shape {t.shape} of {t.dtype.name} takes {t.nbytes}."
        )
    if t.offset + t.length > file_size:  # checked first: a garbled entry must not allocate terabytes
        raise CorruptCheckpointError(
            f"Data file {path} is truncated: tensor '{name}' needs bytes {t.offset}-{t.offset + t.length}, "
            f"but the file ends at byte {file_size}."
        )
    array = np.empty(t.shape, t.dtype)
    raw = memoryview(array.reshape(-1).view(np.uint8))  # plain bytes: numpy cannot export bfloat16 buffers
    f.seek(t.offset)
    if f.readinto(raw) != t.length:
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
    """The index of checkpoint `prefix`, parsed and checked (errors name the index file)."""
    path = index_file(prefix)
    try:
        data = _storage.read_bytes(path, INDEX_LIMIT, "TensorFlow index")
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"No TensorFlow checkpoint at {prefix}: {path} does not exist.") from None
    except OSError as e:
        raise CorruptCheckpointError(f"TensorFlow checkpoint index {path} cannot be read ({e}).") from e
    try:
        return _parse_bundle(data)
    except _sstable.Unsupported as e:
        raise CheckpointError(f"TensorFlow checkpoint index {path}: {e}") from None
    except (_sstable.Garbled, UnicodeDecodeError) as e:  # UnicodeDecodeError: a tensor name that is not UTF-8
        raise CorruptCheckpointError(
            f"TensorFlow checkpoint index {path} is damaged ({e}). Restore an earlier checkpoint."
        ) from e


def _parse_bundle(data: bytes) -> _Bundle:
    """An index file's bytes as a `_Bundle` (`_sstable.Garbled` or `Unsupported` if they are not one)."""
    header = None
    tensors = {}
    for key, value in _sstable.table(data):
        if key == b"":
            header = _parse(_BundleHeaderProto, value, "the header")
        elif key[0] != 0:  # keys starting with NUL hold the slices of partitioned variables
            name = key.decode("utf-8")
            tensors[name] = _entry(_parse(_BundleEntryProto, value, f"the entry of tensor '{name}'"))
    if header is None:
        raise _sstable.Garbled("no header entry")
    if header.endianness != _BundleHeaderProto.LITTLE:
        raise _sstable.Unsupported(
            "it was written on a big-endian machine; jstate reads little-endian checkpoints only. "
            "Re-save it with TensorFlow on a little-endian (x86 or ARM) machine."
        )
    min_consumer = header.version.min_consumer
    if min_consumer > 1 or 1 in header.version.bad_consumers:
        raise _sstable.Unsupported(
            f"it needs a tensor bundle reader of version {max(min_consumer, 2)} or newer; jstate reads "
            "version 1 (what TensorFlow 1.x and 2.x write)."
        )
    for name, t in tensors.items():
        if not 0 <= t.shard < header.num_shards or t.offset < 0 or t.length < 0 or not _fits(t):
            raise _sstable.Garbled(
                f"tensor '{name}' has shard {t.shard} of {header.num_shards}, offset {t.offset}, shape {t.shape}"
            )
    return _Bundle(header.num_shards, tensors)


def _parse(message_class: type[Message], data: bytes, what: str) -> Message:
    """`data` as a `message_class`, `what` naming it if it is not one."""
    try:
        return message_class.FromString(data)
    except DecodeError:
        raise _sstable.Garbled(f"{what} is not a valid {message_class.DESCRIPTOR.name}") from None


def _entry(proto: Message) -> _BundleEntry:
    """A ``BundleEntryProto`` as a `_BundleEntry`."""
    return _BundleEntry(
        datatype=proto.dtype,
        dtype=_DTYPES.get(proto.dtype),
        shape=tuple(dim.size for dim in proto.shape.dim),
        shard=proto.shard_id,
        offset=proto.offset,
        length=proto.size,
        crc32c=proto.crc32c,
        slices=len(proto.slices),
    )


def _fits(t: _BundleEntry) -> bool:
    """Whether numpy can hold a tensor of `t`'s shape and dtype (which no sane writer exceeds).

    numpy refuses a negative dimension, and a shape whose bytes, counting each empty dimension
    as 1, overflow its index type: even an empty array, such as one of shape ``(0, 2**62)``.
    """
    total = 1 if t.dtype is None else t.dtype.itemsize  # 1 for the skipped: only listed
    for size in t.shape:
        total *= max(size, 1)
        if size < 0 or total > np.iinfo(np.intp).max:  # stops early: a long shape of huge sizes costs nothing
            return False
    return True


# -- the reader -------------------------------------------------------------------------------
class TensorFlowCheckpoint(Checkpoint):
    """A TensorFlow tensor bundle: entries named as TensorFlow named them, each tensor verified
    against the CRC32C its index records as it is read.

    Names are TensorFlow's, unchanged: ``layer1/weights`` (TF1) or
    ``model/dense/kernel/.ATTRIBUTES/VARIABLE_VALUE`` (TF2). Strings (TF2's
    ``_CHECKPOINTABLE_OBJECT_GRAPH`` among them), resources, variants, quantized and 4-bit types,
    and partitioned variables (stored as slices) are in `skipped`, with the reason.

    Args:
      prefix: the checkpoint's prefix (`tf_files.find`).

    Raises:
      CheckpointNotFoundError: ``<prefix>.index`` does not exist.
      CorruptCheckpointError: it is truncated or garbled.
      CheckpointError: it was written big-endian or by a newer, incompatible TensorFlow.

    >>> DATA = Path(jstate.__file__).parents[1] / "tests/data/tensorflow"  # written by TensorFlow
    >>> ckpt = TensorFlowCheckpoint(DATA / "train/model.ckpt-20")
    >>> ckpt.step, ckpt.entries["layer1/weights"].shape
    (20, (4, 8))
    """

    writer = "tensorflow"
    checksums = True
    _noun = "tensor"

    def __init__(self, prefix: Path):
        bundle = _read_index(prefix)
        reasons = {name: _reason(t) for name, t in bundle.tensors.items()}
        found = {n: Entry((n,), t.shape, t.dtype) for n, t in bundle.tensors.items() if reasons[n] is None}
        step = re.search(r"-(\d+)$", prefix.name)
        super().__init__(
            prefix,
            found,
            step=int(step.group(1)) if step else None,
            created=index_file(prefix).stat().st_mtime,
            skipped={n: why for n, why in reasons.items() if why is not None},
        )

    def _read_host(self, names: list[str], verify: bool) -> dict[str, np.ndarray]:
        return read(self.path, names)

    def _read(self, wanted: dict[str, jax.ShapeDtypeStruct], verify: bool) -> dict[str, jax.Array]:
        host = read(self.path, list(wanted))  # each tensor's CRC is checked whatever `verify` says: it is free
        return {name: from_host(host.pop(name), target) for name, target in wanted.items()}

    @classmethod
    def _latest_in(cls, directory: Path) -> Path | None:
        return latest(directory)


def load(path: Path) -> TensorFlowCheckpoint | None:
    """`path` as a TensorFlow checkpoint (its prefix or one of its files), None if it is not one.

    Local files only: TensorFlow checkpoints on gs:// or s3:// are not read (copy them first).

    Raises:
      CorruptCheckpointError, CheckpointError: as `TensorFlowCheckpoint`.

    >>> DATA = Path(jstate.__file__).parents[1] / "tests/data/tensorflow"  # written by TensorFlow
    >>> load(DATA / "train/model.ckpt-20.index").path.name
    'model.ckpt-20'
    >>> print(load(DATA / "train"))  # a directory: `tf_files.latest` finds the prefix its state file names
    None
    """
    if _storage.local_path(path) is None:
        return None
    prefix = find(path)
    return None if prefix is None else TensorFlowCheckpoint(prefix)
