"""`Checkpoint`: the one interface every checkpoint format implements, and its `Entry`.

A format is a module with ``load(path) -> Checkpoint | None`` (None: not this format) and a
`Checkpoint` subclass that knows its entries from metadata alone and reads some of them:

  native.py        jstate's own checkpoints (a manifest over an Orbax checkpoint)
  orbax.py         plain Orbax PyTree checkpoints (Orbax, Flax's ``checkpoint_<step>``)
  orbax_steps.py   Orbax CheckpointManager steps: their items as one checkpoint
  tensorflow.py    TensorFlow tensor bundles (TF1 ``Saver``, TF2 ``tf.train.Checkpoint``)
  safetensors.py   ``.safetensors`` files

`checkpoint/directory.py` finds a checkpoint and asks each format in turn; nothing else knows a
format.
"""

from __future__ import annotations

import abc
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np

from ..core.errors import CheckpointError, CorruptCheckpointError, Damaged, StoreError, not_in_checkpoint
from ..core.progress import Progress
from ..core.shaped import Shaped
from ..core.table import Table, human_bytes
from ..model.placement import or_default
from ..storage import store as _storage

T = TypeVar("T")
_GROUP_BYTES = 512 * 1024 * 1024  # a progress bar advances once per this many bytes read

REPLACED = (
    "Checkpoint {path} was re-saved or deleted since it was opened, so reading {which} from the checkpoint "
    "that was opened failed: its files were replaced or removed. Open it again (`jstate.open_checkpoint`) to "
    "read what is there now; `Saver.restore` does this by itself."
)


@dataclasses.dataclass(frozen=True)
class Entry(Shaped):
    """One array a checkpoint holds: where its format keeps it, and what it is.

    Attributes:
      keypath: its path in the checkpoint's tree (Orbax), or ``(name,)`` for flat formats.
      shape: its shape.
      dtype: its dtype.
      size, nbytes: its number of elements and the bytes its values take (`core.shaped.Shaped`).

    >>> ckpt = jstate.open_checkpoint(jstate.Saver().save(state, "ckpt/model"))
    >>> ckpt.entries["biases"]
    Entry(keypath=('biases',), shape=(200,), dtype=dtype('float32'))
    >>> ckpt.entries["biases"].nbytes
    800
    """

    keypath: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: np.dtype


class Checkpoint(abc.ABC):
    """One complete checkpoint, opened from its metadata: what it holds, and a way to read it.

    `jstate.open_checkpoint` returns one; it prints as a table of its entries.

    Attributes:
      path: the checkpoint (a directory, a TensorFlow prefix, or a file).
      writer: who wrote it: "jstate", "orbax" (plain Orbax or Flax), "tensorflow" or
        "safetensors".
      step: its step, when it was saved with one.
      created: seconds since the epoch when it was committed (0 when unknown).
      entries: every array it holds that jstate can read, by name.
      skipped: entries jstate cannot read (strings, partitioned slices, ...), with the reason.
      values: Python values it holds beside its arrays, by name (the JSON items of an Orbax
        CheckpointManager step); `jstate.load_variable` returns them.
      checksums: whether reads are verified against checksums the checkpoint stores.

    >>> ckpt = jstate.open_checkpoint(jstate.Saver().save(state, "ckpt/model", step=1))
    >>> ckpt.writer, ckpt.step, ckpt.entries["biases"].shape
    ('jstate', 1, (200,))
    """

    writer: str = ""
    checksums: bool = False
    _noun: str = "variable"  # what the format calls an entry, for messages

    def __init__(
        self,
        path: Path,
        entries: Mapping[str, Entry],
        *,
        step: int | None = None,
        created: float = 0.0,
        skipped: Mapping[str, str] | None = None,
    ):
        self.path = _storage.as_path(path)
        self.entries = dict(entries)
        self.step = step
        self.created = created
        self.skipped = dict(skipped or {})
        self.values: dict[str, Any] = {}

    @property
    def order(self) -> float:
        """Where it sorts among the checkpoints of its directory, oldest first: when it was
        committed, unless its format records a commit order of its own (jstate's does).

        >>> jstate.open_checkpoint(jstate.Saver().save(state, "ckpt/model")).order > 0
        True
        """
        return self.created

    def entry(self, name: str) -> Entry:
        """The entry `name`.

        Raises:
          CheckpointError: the checkpoint holds no such entry (naming the closest ones), or
            holds it in a form jstate cannot read (with the reason).

        >>> ckpt = jstate.open_checkpoint(jstate.Saver().save(state, "ckpt/model"))
        >>> ckpt.entry("layer1/kernel").shape, ckpt.entry("layer1/kernel").dtype
        ((200, 10), dtype('float32'))
        """
        found = self.entries.get(name)
        if found is not None:
            return found
        if name in self.skipped:
            raise CheckpointError(f"Checkpoint {self.path}: jstate cannot read '{name}' ({self.skipped[name]}).")
        raise not_in_checkpoint(f"Checkpoint {self.path}", [name], self.entries, self._noun)

    def read(
        self, wanted: Mapping[str, jax.ShapeDtypeStruct], *, verify: bool = True, progress: bool = False
    ) -> dict[str, jax.Array]:
        """Read the entries `wanted`, each onto its struct's sharding and cast to its dtype.

        Only these entries are read. With `verify`, formats that store checksums check them
        (on the stored bytes, before any cast). A read over 2 s is logged at INFO (logger
        ``jstate``); `progress` shows a progress bar (tqdm), advanced every ~512 MiB.

        Raises:
          CheckpointError: for an entry the checkpoint does not hold or jstate cannot read.
          CorruptCheckpointError: the files fail a checksum, size or structure check; the
            message names the checkpoint, the entry and, where known, the damaged file.

        >>> ckpt = jstate.open_checkpoint(jstate.Saver().save(state, "ckpt/model"))
        >>> ckpt.read({"biases": jax.ShapeDtypeStruct((200,), jnp.bfloat16)})["biases"].dtype
        dtype(bfloat16)
        """
        for name in wanted:
            self.entry(name)
        out: dict[str, jax.Array] = {}
        with self._progress("Restored", list(wanted), progress) as tracker:
            for group in self._groups(list(wanted), progress):
                out |= self._guarded(group, lambda g=group: self._read({n: wanted[n] for n in g}, verify))
                tracker.advance(sum(self.entries[n].nbytes for n in group))
        return out

    def _guarded(self, names: list[str], read: Callable[[], T]) -> T:
        """`read()`, its failures made one CheckpointError naming the checkpoint and variable.

        A read that fails because the checkpoint was re-saved or deleted since it was opened (a
        re-save removes the files this object knows) says so: never "damaged". One that
        succeeds read what was opened: a re-save writes its arrays under a new name, and every
        array read is checked against the manifest opened."""
        try:
            return read()
        except Exception as e:
            names = sorted(names)
            which = f"variable '{names[0]}'" if len(names) == 1 else f"{len(names)} variables (from '{names[0]}')"
            # (A store that did not answer is that, whatever a look at the manifest would say.)
            if not isinstance(e, StoreError) and self._changed():
                raise CheckpointError(REPLACED.format(path=self.path, which=which)) from e
            if isinstance(e, CheckpointError):
                raise
            damage = self._damage()
            if damage is not None:  # the files fail their checks: that, not the symptom, is the news
                raise CorruptCheckpointError(f"Checkpoint {self.path}: reading {which} failed; {damage}.") from e
            detail = (str(e).splitlines() or [""])[0]
            # Failed a reader's own checks, or tensorstore's.
            corrupt = isinstance(e, Damaged) or "DATA_LOSS" in detail or "corruption detected" in detail.lower()
            if len(detail) > 300:
                detail = detail[:300] + " ..."
            if corrupt:
                raise CorruptCheckpointError(
                    f"Checkpoint {self.path} is damaged: reading {which} failed ({type(e).__name__}: {detail})."
                ) from e
            raise CheckpointError(
                f"Checkpoint {self.path}: reading {which} failed ({type(e).__name__}: {detail})."
            ) from e

    def read_host(self, names: Sequence[str], *, verify: bool = True) -> dict[str, np.ndarray]:
        """Read the entries `names` into host memory, as NumPy arrays in their stored dtype
        (64-bit values stay 64-bit whatever JAX's x64 setting; PRNG keys come back as JAX key
        arrays, which NumPy cannot hold). Errors as in `read`.

        >>> ckpt = jstate.open_checkpoint(jstate.Saver().save(state, "ckpt/model"))
        >>> type(ckpt.read_host(["biases"])["biases"]).__name__
        'ndarray'
        """
        for name in names:
            self._fits_host(self.entry(name), name)
        with self._progress("Read", list(names), False):
            return self._guarded(names, lambda: self._read_host(list(names), verify))

    def _fits_host(self, entry: Entry, name: str) -> None:
        """Refuse, before anything is allocated, an entry larger than this machine's memory: a
        damaged or hostile metadata file (a zarr ``.zarray`` of shape ``[2**40]``) would
        otherwise end in a `MemoryError`, or the reading library's abort."""
        memory = _host_memory()
        if entry.nbytes > memory:
            raise CheckpointError(
                f"Checkpoint {self.path}: '{name}' is recorded as shape {entry.shape} of {entry.dtype.name} "
                f"({human_bytes(entry.nbytes)}), more than this machine's memory ({human_bytes(memory)}), so it "
                "cannot be read into host memory. If its metadata is damaged, use another checkpoint; else restore "
                "it sharded onto devices with `Saver.restore`."
            )

    def _progress(self, what: str, names: list[str], bar: bool) -> Progress:
        total = sum(self.entries[n].nbytes for n in names)
        return Progress(what, self.path, total, len(names), bar=bar)

    def _groups(self, names: list[str], bar: bool) -> list[list[str]]:
        """`names` in one group, or, to advance a bar, in groups of about `_GROUP_BYTES` (each
        read by its own call: a format's overlap of reading and checking spans one call)."""
        if not bar:
            return [names]
        groups, size = [[]], 0
        for name in names:
            if size >= _GROUP_BYTES:
                groups, size = [*groups, []], 0
            groups[-1].append(name)
            size += self.entries[name].nbytes
        return groups

    @abc.abstractmethod
    def _read_host(self, names: list[str], verify: bool) -> dict[str, np.ndarray]:
        """`read_host` without the checks: every name is one of `entries`."""

    @abc.abstractmethod
    def _read(self, wanted: dict[str, jax.ShapeDtypeStruct], verify: bool) -> dict[str, jax.Array]:
        """`read` without the checks: every name in `wanted` is one of `entries`."""

    def _damage(self) -> str | None:
        """For a read that failed: which file fails its checks ("damaged file: ..."), or None
        when the files pass them (or the format keeps no checksums)."""
        return None

    def _changed(self) -> bool:
        """Whether the checkpoint was re-saved or deleted since it was opened (formats that are
        never re-saved in place say False): `checkpoint.lookup` then opens it again.

        >>> ckpt = jstate.open_checkpoint(jstate.Saver().save(state, "ckpt/model"))
        >>> _ = jstate.Saver().save(state, "ckpt/model")  # replaces it
        >>> ckpt._changed()
        True
        """
        return False

    @classmethod
    def _latest_in(cls, directory: Path) -> Path | None:
        """The checkpoint this format's own bookkeeping in `directory` names as the latest
        (TensorFlow's ``checkpoint`` state file), or None to go by step and time.

        >>> ckpt = jstate.open_checkpoint(jstate.Saver().save(state, "ckpt/model"))
        >>> print(type(ckpt)._latest_in(Path("ckpt")))  # jstate's own checkpoints keep no such file
        None
        """
        return None

    def table(self) -> Table:
        """What the checkpoint holds, as a `Table` (name, shape, dtype, size; then `values`, shown
        in the size column, and skipped entries last).

        >>> print(jstate.open_checkpoint(jstate.Saver(["biases"]).save(state, "ckpt/model")).table())
        Checkpoint ckpt/model (jstate): 1 variables, 800 B
        name    shape   dtype    size
        ------  ------  -------  -----
        biases  (200,)  float32  800 B
        """
        entries = self.entries
        rows = [(n, e.shape, e.dtype.name, human_bytes(e.nbytes)) for n, e in sorted(entries.items())]
        rows += [(n, "-", "value", _short(v)) for n, v in sorted(self.values.items())]
        rows += [(n, "-", "-", f"skipped: {why}") for n, why in sorted(self.skipped.items())]
        total = sum(e.nbytes for e in entries.values())
        step = f", step {self.step}" if self.step is not None else ""
        title = f"Checkpoint {self.path}{step} ({self.writer}): {len(entries)} variables, {human_bytes(total)}"
        return Table(("name", "shape", "dtype", "size"), rows, title)

    def __repr__(self) -> str:
        return str(self.table())

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()


def _short(value: Any, limit: int = 60) -> str:
    """`value` as one line of at most `limit` characters (a table cell, never a whole tree)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def from_host(host: np.ndarray, target: jax.ShapeDtypeStruct) -> jax.Array:
    """A host array on its target's sharding and dtype.

    Every process holds the whole array, so this works for shardings over several processes too.

    Args:
      host: the whole array, in host memory.
      target: the dtype to cast to, and the sharding to put it on (None: the default device).

    Returns:
      The array, cast and placed (`own` of `host`: never a view into a larger buffer).

    >>> mesh = jax.make_mesh((8,), ("x",))
    >>> target = jax.ShapeDtypeStruct((16,), jnp.bfloat16, sharding=jax.NamedSharding(mesh, jax.P("x")))
    >>> placed = from_host(np.arange(16.0), target)
    >>> placed.dtype, len(placed.sharding.device_set)
    (dtype(bfloat16), 8)
    """
    return jax.device_put(own(host.astype(target.dtype, copy=False)), or_default(target.sharding))


def own(host: np.ndarray) -> np.ndarray:
    """`host`, copied if it is a view into a larger buffer.

    JAX on the CPU adopts an aligned host buffer without copying it, and would keep all of it
    alive for as long as the array lives (a restored slice of a split, or one variable of a
    packed array, pinning the whole).

    >>> whole = np.zeros(1024)
    >>> own(whole) is whole, own(whole[:4]).base is None
    (True, True)
    """
    base = host
    while isinstance(base.base, np.ndarray):
        base = base.base
    return host.copy() if base.nbytes > host.nbytes + 64 else host


def _host_memory() -> int:
    """This machine's physical memory in bytes (unbounded where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62
