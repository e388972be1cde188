"""Reading TensorFlow checkpoints without TensorFlow: TF1 ``Saver`` and TF2 ``tf.train.Checkpoint``.

Both write a "tensor bundle" (TF's V2 checkpoint format) under a prefix such as ``model.ckpt``:

  model.ckpt.index                  an SSTable (LevelDB's table format) mapping each tensor name
                                    to a ``BundleEntryProto`` (dtype, shape, data file, offset,
                                    size, masked CRC32C); the key "" holds a ``BundleHeaderProto``
  model.ckpt.data-00000-of-00002    the tensors' raw little-endian bytes, back to back
  checkpoint                        (beside it, optional) a text ``CheckpointState`` naming the
                                    latest prefix

The table is read by `_sstable`; its protobufs and the state file are parsed with the protobuf
package, from TensorFlow's message definitions copied here (so TensorFlow is not needed). TF1's
older V1 format (one ``model.ckpt`` file, no ``.index``) is not read.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import crc32c
import jax
import ml_dtypes
import numpy as np
from google.protobuf import text_format
from google.protobuf.message import DecodeError, Message

from ..core.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, closest, shorten
from ..model.spec import Entry
from ..storage import store as _storage
from . import tf_proto as _tfproto
from . import tf_table as _sstable
from .base import Checkpoint, place

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
_MAX_RANK = 64 if int(np.__version__.split(".")[0]) >= 2 else 32  # numpy's limit; TensorFlow's is 254

_BundleHeaderProto, _BundleEntryProto, _CheckpointState = (
    _tfproto.BundleHeaderProto,
    _tfproto.BundleEntryProto,
    _tfproto.CheckpointState,
)


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
    if not path.name:  # "." or "/": a directory, never a prefix
        return None
    if path.name.endswith(".index") and path.is_file():
        return path.with_name(path.name[: -len(".index")])
    m = _DATA_FILE.fullmatch(path.name)
    if m and _index_file(path.with_name(m.group(1))).is_file():
        return path.with_name(m.group(1))
    return path if _index_file(path).is_file() else None


def latest(directory: Path) -> Path | None:
    """The prefix that TensorFlow's ``checkpoint`` state file in `directory` names as the latest.

    A relative ``model_checkpoint_path`` is taken relative to `directory` (as TF does). A name
    that leads outside `directory` (symlinks resolved) is never followed: an absolute path
    elsewhere, as after the directory was moved or copied from another machine, or ``../``. Its
    last component is looked for inside `directory` instead, so a moved directory still works
    and a state file cannot point at checkpoints elsewhere.

    Returns:
      The prefix, as `directory` joined with the name (or its last component); None if there is
      no state file, it does not parse, it names nothing, or the named checkpoint's ``.index``
      is missing.

    >>> Path("train").mkdir(); Path("train/model.ckpt-20.index").touch()
    >>> _ = Path("train/checkpoint").write_text('model_checkpoint_path: "model.ckpt-20"')
    >>> latest(Path("train"))
    PosixPath('train/model.ckpt-20')
    """
    directory = Path(directory)
    try:
        text = (directory / STATE_FILE).read_text(encoding="utf-8")
        # Unknown fields skipped: a newer TensorFlow may add some, and only the path matters here.
        name = text_format.Parse(text, _CheckpointState(), allow_unknown_field=True).model_checkpoint_path
    except (OSError, UnicodeDecodeError, text_format.ParseError):
        return None
    if not name:
        return None
    try:
        root = directory.resolve()
        for prefix in (directory / name, directory / Path(name).name):
            # Strictly below: a name that resolves to `directory` itself would put its .index beside it.
            if root in prefix.resolve().parents and _index_file(prefix).is_file():
                return prefix
    except (OSError, ValueError, RuntimeError):  # a NUL byte in the name, a symlink loop
        return None
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
    except (_sstable.Garbled, UnicodeDecodeError) as e:  # UnicodeDecodeError: a tensor name that is not UTF-8
        raise CorruptCheckpointError(
            f"TensorFlow checkpoint index {path} is damaged ({e}). Restore an earlier checkpoint."
        ) from e


def _parse_bundle(data: bytes) -> _Bundle:
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
        if not 0 <= t.shard < header.num_shards or t.offset < 0 or t.size < 0 or not _fits(t):
            raise _sstable.Garbled(
                f"tensor '{name}' has shard {t.shard} of {header.num_shards}, offset {t.offset}, shape {t.shape}"
            )
    return _Bundle(header.num_shards, tensors)


def _parse(message_class: type[Message], data: bytes, what: str) -> Message:
    try:
        return message_class.FromString(data)
    except DecodeError:
        raise _sstable.Garbled(f"{what} is not a valid {message_class.DESCRIPTOR.name}") from None


def _entry(proto: Message) -> _BundleEntry:
    return _BundleEntry(
        dtype=proto.dtype,
        shape=tuple(dim.size for dim in proto.shape.dim),
        shard=proto.shard_id,
        offset=proto.offset,
        size=proto.size,
        crc32c=proto.crc32c,
        slices=len(proto.slices),
    )


def _fits(t: _BundleEntry) -> bool:
    """Whether numpy can hold a tensor of `t`'s shape and dtype (which no sane writer exceeds).

    numpy refuses a negative dimension, and a shape whose bytes, counting each empty dimension
    as 1, overflow its index type: even an empty array, such as one of shape ``(0, 2**62)``.
    """
    total = _DTYPES[t.dtype].itemsize if t.dtype in _DTYPES else 1  # 1 for the skipped: only listed
    for size in t.shape:
        total *= max(size, 1)
        if size < 0 or total > np.iinfo(np.intp).max:  # stops early: a long shape of huge sizes costs nothing
            return False
    return True


# -- the reader -------------------------------------------------------------------------------
class TensorFlowCheckpoint(Checkpoint):
    """A TensorFlow tensor bundle: entries named as TensorFlow named them, each tensor verified
    against the CRC32C its index records as it is read."""

    writer = "tensorflow"
    checksums = True
    noun = "tensor"

    def __init__(self, prefix: Path):
        bundle = _read_index(prefix)
        reasons = {name: _reason(t) for name, t in bundle.tensors.items()}
        found = {n: Entry((n,), t.shape, _DTYPES[t.dtype]) for n, t in bundle.tensors.items() if reasons[n] is None}
        step = re.search(r"-(\d+)$", prefix.name)
        super().__init__(
            prefix,
            found,
            step=int(step.group(1)) if step else None,
            created=_index_file(prefix).stat().st_mtime,
            skipped={n: why for n, why in reasons.items() if why is not None},
        )

    def _read_host(self, names: list[str], verify: bool) -> dict[str, np.ndarray]:
        return read(self.path, names)

    def _read(self, wanted: dict[str, jax.ShapeDtypeStruct], verify: bool) -> dict[str, jax.Array]:
        host = read(self.path, list(wanted))  # each tensor's CRC is checked whatever `verify` says: it is free
        return {name: place(host.pop(name), target) for name, target in wanted.items()}

    @classmethod
    def latest_in(cls, directory: Path) -> Path | None:
        return latest(directory)


def load(path: Path) -> TensorFlowCheckpoint | None:
    """`path` as a TensorFlow checkpoint (its prefix or one of its files), None if it is not one.
    Local files only: TensorFlow checkpoints on gs:// or s3:// are not read (copy them first)."""
    if _storage.local_path(path) is None:
        return None
    prefix = find(path)
    return None if prefix is None else TensorFlowCheckpoint(prefix)
