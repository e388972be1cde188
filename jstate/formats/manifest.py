"""The manifest of a jstate checkpoint, ``jstate.json``: written by the Saver, read by the
jstate reader, and nowhere else.

A jstate checkpoint is a directory holding an Orbax PyTree checkpoint keyed by variable name
(``arrays-<token>/``, see `commit`) and this manifest: each variable's shape, dtype and the
CRC32C of every saved region, the size and CRC32C of every file of the arrays, and which
directory holds them; small variables are packed together (`pack`), and the manifest says where
each one lives. Writing the manifest commits the checkpoint. The manifest checksums itself:
it is one JSON object whose first member is the CRC32C of the bytes after it, so it is checked
without re-serializing it: ``{"checksum":"1a2b3c4d", ...rest}``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import Any

import crc32c
import jax
import jax.numpy as jnp
import numpy as np

from ..core.errors import CheckpointError, CorruptCheckpointError, StoreError
from ..core.shaped import Shaped
from ..core.untrusted import parse_json
from ..storage import store as _storage
from .base import Entry
from .integrity import checksum
from .pack import Slot

FILE = "jstate.json"
ARRAYS = "arrays"  # the Orbax checkpoint beside the manifest
# The most a manifest is read of: ~250 bytes a variable with its digests, so millions of
# variables; a larger file is no manifest jstate wrote, and is refused unread.
LIMIT = 1 << 30
FORMAT = "jstate.checkpoint"
# The latest time a manifest records (`created`, `order`, `clock`: seconds since 1970), the year
# 5138: anything later is no clock's but a damaged or crafted manifest's, and is refused.
LATEST_TIME = 1e11
# 2: `arrays`, `prefix` (version 1 kept its arrays in ``arrays/``); 3: `packed` (versions 1 and
# 2 are read as manifests without packed variables); 4: `layout`, written only by the Orbax
# layout (checkpoints of jstate's own layout stay version 3, readable by jstate before it).
VERSION = 4
ORBAX_LAYOUT = "orbax"  # arrays in the tree the user saved, as plain Orbax restores it (`Saver(layout=...)`)

_HEAD = b'{"checksum":"'
_HEAD_LEN = len(_HEAD) + 8 + 2  # the hex digits, then '",'


@dataclasses.dataclass(frozen=True)
class Variable(Shaped):
    """One saved variable, as its manifest records it.

    Attributes:
      shape: its shape.
      dtype: its dtype.
      size, nbytes: its number of elements and the bytes its values take (`core.shaped.Shaped`).
      digests: CRC32C of each saved region, keyed by region (``"0:16,0:32"``).
      key: for a PRNG key array, its implementation (``"threefry2x32"``): the shape and
        dtype above are then those of its key data (`jax.random.key_data`).
      packed: where it lives in a packed array (`pack`), or None: stored under its own name.

    >>> v = Variable((2, 3), np.dtype("float32"), {"0:2,0:3": 7})
    >>> v.size, v.nbytes
    (6, 24)
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    digests: dict[str, int] = dataclasses.field(default_factory=dict)
    key: str | None = None
    packed: Slot | None = None


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a jstate checkpoint holds, and the checksums that prove it.

    Attributes:
      variables: every saved variable, by checkpoint name.
      step: the step it was saved at, if any.
      created: seconds since the epoch when it was committed.
      files: ``{path under arrays: (size, crc32c)}`` of every file Orbax wrote.
      arrays: the directory beside the manifest that holds the arrays.
      prefix: the name the Saver was given, when it saved with a step (``model`` for
        ``model-1000``): retention deletes only checkpoints of its own prefix.
      packed: the packed arrays (``pack.KEY/<name>``), each a 1-D `Variable` without digests
        (its variables carry their own).
      layout: how the arrays are keyed in Orbax's tree: "jstate" (one key per checkpoint name,
        or packed) or "orbax" (the tree the user saved, nested; `Saver(layout="orbax")`).
      order: where it sorts among the checkpoints of its directory: its `created`, or just
        after the newest checkpoint its writer saw there if that is later (a clock set back),
        so that a save comes after everything it saw (0: not recorded, `created` orders it).
      kept: whether retention keeps it for good (`keep_every_n_hours`/`_steps`), decided when
        it was committed (None: saved before jstate recorded it).
      clock: when the retention clock of `keep_every_n_hours` last started, as of this save
        (TensorFlow's ``last_preserved_timestamp``; None: not recorded).

    >>> m = Manifest({"w": Variable((2,), np.dtype("float32"), {"0:2": 7})}, step=3)
    >>> Manifest.decode(m.encode(), "ckpt") == m
    True
    """

    variables: dict[str, Variable]
    step: int | None = None
    created: float = 0.0
    files: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    arrays: str = ARRAYS
    prefix: str | None = None
    packed: dict[str, Variable] = dataclasses.field(default_factory=dict)
    layout: str = "jstate"
    order: float = 0.0
    kept: bool | None = None
    clock: float | None = None

    @functools.cached_property
    def entries(self) -> dict[str, Entry]:
        """What a restore sees of each variable, by name: a PRNG key array for one saved as key
        data. Computed once per manifest (`decode` shares the manifests of equal bytes).

        >>> m = Manifest({"k": Variable((4, 2), np.dtype("uint32"), key="threefry2x32")})
        >>> m.entries["k"].shape, m.entries["k"].dtype
        ((4,), key<fry>)
        """
        return {
            n: Entry((n,), v.shape, v.dtype) if v.key is None else _key_entry(n, v) for n, v in self.variables.items()
        }

    def encode(self) -> bytes:
        """The manifest as checksummed JSON bytes (`encode`); `decode` reads them back.

        >>> Manifest({}, step=3).encode()[:51]
        b'{"checksum":"...","format":"jstate.checkpoint"'
        """
        return encode(
            {
                "format": FORMAT,
                "version": VERSION if self.layout != "jstate" else 3,
                "step": self.step,
                # Before the variables: `read_order` finds a checkpoint's order in the first bytes.
                "created": self.created,
            }
            | ({"order": self.order} if self.order else {})
            | {
                "variables": {
                    n: {"shape": list(v.shape), "dtype": v.dtype.name, "digests": v.digests}
                    | ({"key": v.key} if v.key else {})
                    | ({"packed": [v.packed.array, v.packed.offset]} if v.packed else {})
                    for n, v in self.variables.items()
                },
                "files": {rel: list(record) for rel, record in self.files.items()},
                "arrays": self.arrays,
                "prefix": self.prefix,
                "packed": {a: {"shape": list(p.shape), "dtype": p.dtype.name} for a, p in self.packed.items()},
            }
            | ({"layout": self.layout} if self.layout != "jstate" else {})
            # Only where recorded: older jstate reads these manifests, ignoring what it does not know.
            | ({"kept": self.kept} if self.kept is not None else {})
            | ({"clock": self.clock} if self.clock is not None else {})
        )

    @classmethod
    def decode(cls, data: bytes, where: str | Path) -> Manifest:
        """Parse and validate manifest bytes of the checkpoint at `where`.

        Args:
          data: the bytes of a manifest file.
          where: the checkpoint, for messages.

        Returns:
          The manifest; equal bytes give the same (immutable) object.

        Raises:
          CorruptCheckpointError: the bytes fail their checksum or are not a valid manifest.
          CheckpointError: a newer jstate wrote it (a manifest version this one does not read).

        >>> Manifest.decode(Manifest({}, step=3).encode(), "ckpt").step
        3
        >>> Manifest.decode(b"{}", "ckpt")
        Traceback (most recent call last):
        ...
        jstate.core.errors.CorruptCheckpointError: Checkpoint ckpt: its manifest ckpt/jstate.json is damaged (ValueError: checksum mismatch). ...
        """
        try:
            return _decoded(cls, data)
        except _NewerVersion as e:
            raise CheckpointError(
                f"Checkpoint {where} was written by a newer jstate (manifest version {e.args[0]}; this jstate reads "
                f"versions up to {VERSION}). Upgrade jstate to read it; the checkpoint is not damaged."
            ) from None
        except (ValueError, KeyError, AttributeError, TypeError, IndexError, OverflowError) as e:
            raise CorruptCheckpointError(
                f"Checkpoint {where}: its manifest {where}/{FILE} is damaged ({type(e).__name__}: {e}). "
                "Restore an earlier checkpoint."
            ) from e

    @classmethod
    def _parse(cls, data: bytes) -> Manifest:
        """`decode` without `where`, raising the parser's own errors (and `_NewerVersion`)."""
        if not data.startswith(_HEAD) or int(data[len(_HEAD) : _HEAD_LEN - 2], 16) != checksum(data[_HEAD_LEN:]):
            raise ValueError("checksum mismatch")
        raw = parse_json(data)
        if raw.get("format") != FORMAT or not isinstance(raw.get("variables"), dict):
            raise ValueError("not a jstate manifest")
        _check_version(raw.get("version", 1))
        variables = {
            str(n): Variable(
                _shape(v["shape"]),
                _dtype(v["dtype"]),
                {str(k): int(c) for k, c in v.get("digests", {}).items()},
                None if v.get("key") is None else str(v["key"]),
                None if v.get("packed") is None else _slot(n, v["packed"]),
            )
            for n, v in raw["variables"].items()
        }
        packed = {str(a): Variable(_shape(p["shape"]), _dtype(p["dtype"])) for a, p in raw.get("packed", {}).items()}
        _check_slots(variables, packed)
        unchecked = [n for n, v in variables.items() if v.nbytes and not v.digests]
        if unchecked:  # jstate checksums every array it stores
            raise ValueError(f"variable {unchecked[0]!r} has no checksums")
        files = {str(rel): (int(size), int(crc)) for rel, (size, crc) in raw.get("files", {}).items()}
        step, prefix, arrays = raw.get("step"), raw.get("prefix"), str(raw.get("arrays", ARRAYS))
        kept, clock = raw.get("kept"), raw.get("clock")
        if kept is not None and not isinstance(kept, bool):
            raise ValueError(f"'kept' is {kept!r}, not true or false")
        if "/" in arrays or arrays in ("", ".", ".."):
            raise ValueError(f"arrays directory {arrays!r} is not a name inside the checkpoint")
        layout = raw.get("layout", "jstate")
        if layout not in ("jstate", ORBAX_LAYOUT):
            raise ValueError(f"layout {layout!r} is not one jstate writes")
        return cls(
            variables,
            None if step is None else int(step),
            _time(raw.get("created", 0.0)),
            files,
            arrays,
            None if prefix is None else str(prefix),
            packed,
            layout,
            _time(raw.get("order", 0.0)),
            kept,
            None if clock is None else _time(clock),
        )

    def write(self, directory: Path) -> None:
        """Write the manifest into `directory`, atomically and flushed to disk (this commits a
        checkpoint: `commit.commit`).

        >>> Path("ckpt").mkdir(); Manifest({}, step=3).write(Path("ckpt"))
        >>> Manifest.read(Path("ckpt")).step
        3
        """
        try:
            # Bytes the reader refuses would make a save that returned its path a checkpoint no
            # lookup lists (a time out of range). Its own fields go through the reader first; its
            # variables' records, made from arrays jstate holds, are left out: with them, this
            # would parse every record of a large model again (0.45 s for 20,000 variables).
            Manifest._parse(dataclasses.replace(self, variables={}).encode())
        except (ValueError, KeyError, TypeError, _NewerVersion) as e:
            raise CheckpointError(
                f"Checkpoint {directory}: its manifest would not read back ({e}), so it was not written. This is a "
                "jstate bug; please report it."
            ) from e
        _storage.write_bytes(_storage.as_path(directory) / FILE, self.encode())

    @classmethod
    def read(cls, directory: Path) -> Manifest | None:
        """The manifest in `directory`, None if there is none.

        Raises:
          CheckpointError: it cannot be read (naming the OS's reason).
          CorruptCheckpointError: it is damaged.

        >>> Manifest.read(Path(jstate.Saver().save(state, "ckpt/model"))).variables["biases"].shape
        (200,)
        >>> print(Manifest.read(Path(".")))
        None
        """
        directory = _storage.as_path(directory)
        return cls.read_file(directory / FILE, directory)

    @staticmethod
    def read_order(directory: Path) -> float | None:
        """The commit order of the checkpoint in `directory` (`order`, else `created`), from its
        manifest's checksummed bytes without decoding its variables: each save asks it of every
        checkpoint beside, and a manifest may be up to `LIMIT` bytes (see `_order_in`). None if
        it has no manifest or a damaged one, or one that cannot be read.

        >>> path = Path(jstate.Saver().save(state, "ckpt/model"))
        >>> Manifest.read_order(path) == Manifest.read(path).order, Manifest.read_order(Path("."))
        (True, None)
        """
        path = _storage.as_path(directory) / FILE
        try:
            head = bytes(_storage.read_range(path, 0, _ORDER_HEAD, "manifest"))
            size = _storage.size(path)
            if size > LIMIT or not head.startswith(_HEAD):
                return None
            # The checksum, a chunk at a time: the memory taken stays a chunk's, however large the file.
            crc = checksum(head[_HEAD_LEN:])
            for start in range(len(head), size, _ORDER_CHUNK):
                crc = crc32c.crc32c(_storage.read_range(path, start, _ORDER_CHUNK, "manifest"), crc)
            if int(head[len(_HEAD) : _HEAD_LEN - 2], 16) != crc:
                return None
            return _order_in(head, size, path)
        except StoreError:
            raise  # not knowing is no "not a checkpoint"
        except (CheckpointError, OSError, ValueError, TypeError, AttributeError, RecursionError):
            return None  # no manifest to order by (a FIFO, a loop, unreadable, damaged): lookups skip it too

    @classmethod
    def read_file(cls, path: Path, where: str | Path) -> Manifest | None:
        """The manifest in file `path` of checkpoint `where`, None if the file does not exist.

        Raises:
          CheckpointError, CorruptCheckpointError: as `read`.

        >>> path = jstate.Saver().save(state, "ckpt/model")
        >>> Manifest.read_file(Path(path) / FILE, path) == Manifest.read(Path(path))
        True
        """
        try:
            data = _storage.read_bytes(_storage.as_path(path), LIMIT, "manifest")
        except (FileNotFoundError, NotADirectoryError):
            return None
        except StoreError:
            raise  # says itself what went wrong, and is no damage
        except OSError as e:
            raise CheckpointError(f"Checkpoint {where}: cannot read its manifest {path} ({e}).") from e
        return cls.decode(data, where)


def encode(raw: dict[str, Any]) -> bytes:
    """A JSON object as manifest bytes: its own CRC32C first, then the rest.

    >>> encode({"format": "x"})
    b'{"checksum":"...","format":"x"}'
    """
    rest = json.dumps({k: v for k, v in raw.items() if k != "checksum"}, separators=(",", ":"))[1:].encode()
    return _HEAD + b"%08x" % checksum(rest) + b'",' + rest


# `read_order` reads a manifest's first `_ORDER_HEAD` bytes, where `encode` puts its times, and
# checksums the rest `_ORDER_CHUNK` bytes at a time.
_ORDER_HEAD = 1 << 16
_ORDER_CHUNK = 8 << 20
# A manifest jstate wrote before its times came first (before 0.2) is parsed whole for them up to
# this size (~16,000 variables; a crafted one of nested empty objects takes ~25 times its size to
# parse); past it, its order is found in its last bytes (`_OLD_ORDER`), or it orders nothing.
_ORDER_PARSED = 4 << 20
_OLD_ORDER = re.compile(rb',"order":([-+.eE0-9]+)(?:,"kept":(?:true|false))?(?:,"clock":[-+.eE0-9]+)?}\Z')


def _order_in(head: bytes, size: int, path: Path) -> float:
    """The order recorded by the checksummed manifest at `path` of `size` bytes, which begins
    with `head`. Its members are read one by one up to the first object or array (`variables`):
    `encode` writes `created` and `order` before it. Only a manifest of an older jstate, which
    wrote them after its variables, is read further (`_ORDER_PARSED`, `_OLD_ORDER`)."""
    decoder, text, fields = json.JSONDecoder(), head[_HEAD_LEN:].decode("utf-8", "replace"), {}
    at = 0
    while at < len(text) and text[at] == '"':
        key, at = decoder.raw_decode(text, at)
        if text[at : at + 1] != ":" or text[at + 1 : at + 2] in ("{", "["):
            break
        fields[key], at = decoder.raw_decode(text, at + 1)
        at += 1  # past "," (or the closing "}", which ends the loop)
    if "created" in fields:
        return _time(fields.get("order") or fields["created"])
    if size <= _ORDER_PARSED:
        raw = parse_json(_storage.read_bytes(path, _ORDER_PARSED, "manifest"))
        return _time(raw.get("order") or raw.get("created", 0.0))
    tail = bytes(_storage.read_range(path, max(size - 256, 0), 256, "manifest"))
    found = _OLD_ORDER.search(tail)
    return _time(found.group(1)) if found else 0.0


def _key_entry(name: str, v: Variable) -> Entry:
    """A PRNG key array saved as its key data `v`."""
    key = jax.eval_shape(lambda: jax.random.key(0, impl=v.key))
    data_dims = len(jax.eval_shape(jax.random.key_data, key).shape)
    return Entry((name,), v.shape[: len(v.shape) - data_dims], key.dtype)


@functools.lru_cache(maxsize=4)  # a 100,000-variable manifest is ~80 MB decoded
def _decoded(cls: type[Manifest], data: bytes) -> Manifest:
    """`Manifest._parse`, remembered by content: a checkpoint restored again (a partial restore
    after a full one, an evaluation loop) is not parsed again. Its file is still read each time,
    so a re-saved checkpoint is never served stale; a manifest is never mutated."""
    return cls._parse(data)


class _NewerVersion(Exception):
    """A manifest of a newer format (its version in `args[0]`)."""


def _check_version(version: Any) -> None:
    """Refuse a manifest of a newer format: an older reader would misread it (jstate before
    version 3 takes a packed checkpoint for a damaged one, and a user may delete it)."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"version {version!r} is not a version number")
    if version > VERSION:
        raise _NewerVersion(version)


def _slot(name: str, value: Any) -> Slot:
    """Variable `name`'s ``[array, offset]``."""
    if not isinstance(value, list) or len(value) != 2 or not isinstance(value[0], str):
        raise ValueError(f"variable {name!r} has the packed slot {value!r}, not [array name, offset]")
    if not isinstance(value[1], int) or isinstance(value[1], bool):
        raise ValueError(f"variable {name!r} has the packed slot {value!r}, without an integer offset")
    return Slot(value[0], value[1])


def _check_slots(variables: dict[str, Variable], packed: dict[str, Variable]) -> None:
    """Every packed variable lies inside a 1-D packed array of its own dtype: a crafted
    manifest cannot make a read slice past an array, or reinterpret its bytes."""
    for name, v in variables.items():
        if v.packed is None:
            continue
        array = packed.get(v.packed.array)
        if array is None or len(array.shape) != 1 or array.dtype != v.dtype:
            raise ValueError(
                f"variable {name!r} is packed into {v.packed.array!r}, which holds no {v.dtype.name} array"
            )
        if v.packed.offset < 0 or v.packed.offset + v.size > array.shape[0] or not v.nbytes:
            raise ValueError(f"variable {name!r} lies outside its packed array {v.packed.array!r}")


def _time(value: Any) -> float:
    """A time in seconds since 1970 that sorts and shows: NaN would make every comparison false
    (and a sort with it arbitrary), and no clock reads a time past `LATEST_TIME` (a checkpoint's
    listing could not show it, and a save ordered after it could not be written)."""
    seconds = float(value)
    if not 0 <= seconds <= LATEST_TIME:  # NaN fails too
        raise ValueError(f"time {value!r} is not a time in seconds since 1970 (0 to {LATEST_TIME:.0e})")
    return seconds


def _shape(value: Any) -> tuple[int, ...]:
    shape = tuple(int(d) for d in value)
    if any(d < 0 for d in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    return shape


def _dtype(name: str) -> np.dtype:
    return np.dtype(jnp.dtype(name))  # knows bfloat16 and the other ml_dtypes
