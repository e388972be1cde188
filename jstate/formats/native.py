"""Reading jstate's own checkpoints: a manifest (`manifest`) over an Orbax checkpoint, every
array verified against the checksums recorded at save.

Packed variables (`pack`) are read by reading the packed arrays that hold them into host
memory once, checking each variable's own checksum, and putting each variable onto its target's
sharding from there: they are small, so a host copy costs little, and it works for any sharding.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ..core.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from ..model.placement import or_default
from ..storage import store as _storage
from . import commit as _commit
from . import integrity as _integrity
from . import ocdbt as _ocdbt
from . import orbax as _orbax
from . import pack as _pack
from .base import Checkpoint, Entry, from_host, own
from .manifest import ARRAYS, FILE, ORBAX_LAYOUT, Manifest, Variable

# Restores go in batches of about this many bytes, each batch's checksums computed while the
# next batch is read.
_BATCH_BYTES = 512 * 1024 * 1024
_READERS = 4  # threads reading and checking arrays at once: reads from the page cache and checksums release the GIL


class NativeCheckpoint(Checkpoint):
    """A checkpoint jstate wrote: entries named by checkpoint name, every region checksummed.

    Args:
      path: the checkpoint directory.
      manifest: its manifest, read and checked (`load` opens one).

    Attributes:
      manifest: its `Manifest`.
      arrays: the Orbax checkpoint holding its arrays.

    >>> ckpt = load(Path(jstate.Saver().save(state, "ckpt/model", step=7)))
    >>> ckpt.step, ckpt.manifest.step, ckpt.arrays.name.startswith("arrays-")
    (7, 7, True)
    """

    writer = "jstate"
    checksums = True

    def __init__(self, path: Path, manifest: Manifest):
        super().__init__(path, manifest.entries, step=manifest.step, created=manifest.created)
        self.manifest = manifest
        self.arrays = _storage.absolute(path / manifest.arrays)  # as Orbax takes it
        self._stored: dict[str, Entry] | None = None  # Orbax's own metadata, read on first use
        self._where: dict[str, _ocdbt.Located] | None = None  # where `ocdbt` can read arrays, found on first use
        self._orbax_tree: Any = None  # the Orbax layout's tree (Orbax's metadata), read on first use

    @property
    def order(self) -> float:
        return self.manifest.order or self.manifest.created  # (the commit time, where no order was recorded)

    @property
    def kept(self) -> bool | None:
        """Whether retention keeps it for good, as decided when it was committed (`Manifest.kept`)."""
        return self.manifest.kept

    def _changed(self) -> bool:
        try:
            return Manifest.read(self.path) != self.manifest
        except CheckpointError:
            return True

    def _read(self, wanted: dict[str, jax.ShapeDtypeStruct], verify: bool) -> dict[str, jax.Array]:
        files = self.manifest.files
        if verify and files:  # the small metadata files in full; data files through array digests
            metadata = [rel for rel in files if not _orbax.is_data_file(rel)]
            _integrity.check_files(self.arrays, files, self.path, contents=metadata)
        variables = self.manifest.variables
        packed = [n for n in wanted if variables[n].packed is not None]
        out = self._put_all(self._unpacked(packed, verify), wanted) if packed else {}
        # 64-bit values in a process without x64: JAX would truncate them before the checksums,
        # so they are read and checked on the host, then cast and placed.
        narrowed = [
            n
            for n in wanted
            if n not in out and jax.dtypes.canonicalize_dtype(variables[n].dtype) != variables[n].dtype
        ]
        out |= {n: from_host(a, wanted[n]) for n, a in self._read_host(narrowed, verify).items()} if narrowed else {}
        todo = {}
        for n, target in wanted.items():
            if n in out:
                continue
            v = variables[n]
            # Read what is stored: in its own dtype when verifying (a cast never skips the
            # checksums) or for a PRNG key (stored as its key data); else cast while reading.
            dtype = v.dtype if verify or v.key else target.dtype
            stored = jax.ShapeDtypeStruct(v.shape, dtype, sharding=target.sharding)
            if v.nbytes:
                todo[n] = (Entry(self._keypath(n), v.shape, v.dtype), stored)
            else:  # zero-size arrays hold no data (Orbax cannot even store them): made, not read
                out[n] = from_host(np.zeros(v.shape, v.dtype), stored)
        through_host = self._through_host(todo)
        self._read_through_host({n: item for n, item in todo.items() if n in through_host}, out, verify)
        todo = {n: item for n, item in todo.items() if n not in through_host}
        if not verify:
            # Without checksums to catch it, a manifest that disagrees with Orbax's metadata
            # would be a silent cast: compare them (Orbax's metadata costs ~0.5 ms per array).
            self._check_against_orbax(todo)
            out |= _orbax.read(self.arrays, todo, self._tree()) if todo else {}
        else:
            self._read_verified(todo, out)
        return {n: _as_target(a, variables[n], wanted[n]) for n, a in out.items()}

    def _read_host(self, names: list[str], verify: bool) -> dict[str, np.ndarray]:
        variables = self.manifest.variables
        out = {n: np.zeros(variables[n].shape, variables[n].dtype) for n in names if not variables[n].nbytes}
        packed = [n for n in names if variables[n].packed is not None]
        # Copies: a view would keep the whole packed array alive, and writable by the caller.
        unpacked = {n: a.copy() for n, a in self._unpacked(packed, verify).items()} if packed else {}
        todo = {
            n: Entry(self._keypath(n), variables[n].shape, variables[n].dtype) for n in names if n not in out | unpacked
        }
        if todo:
            with ThreadPoolExecutor(_READERS) as pool:
                out |= self._fetch(todo, verify, pool)
        out |= unpacked
        return {
            n: jax.random.wrap_key_data(a, impl=variables[n].key) if variables[n].key else a for n, a in out.items()
        }

    def _unpacked(self, names: list[str], verify: bool) -> dict[str, np.ndarray]:
        """The packed variables `names` in their stored dtype (a PRNG key as its key data), each
        checked when `verify`. Only the packed arrays holding them are read, once each, and the
        variables are views into them; where they fill half of one or less and `ocdbt` locates
        it, just their own bytes are read instead."""
        variables, records = self.manifest.variables, self.manifest.packed
        located = self._located()
        out: dict[str, np.ndarray] = {}
        arrays: dict[str, np.ndarray] = {}  # packed arrays read whole
        through_orbax = {}
        for array in {variables[n].packed.array for n in names}:
            entry = Entry((_pack.KEY, array), records[array].shape, records[array].dtype)
            found = located.get(f"{_pack.KEY}.{array}")
            inside = [n for n in names if variables[n].packed.array == array]
            if not _fits(found, entry):
                through_orbax[array] = entry
            elif len(found.chunks) == 1 and 2 * sum(variables[n].nbytes for n in inside) <= entry.nbytes:
                # Half of it or less: just their bytes.
                slots = [(variables[n].packed.offset, variables[n].size) for n in inside]
                parts = found.read_slices([(start, start + size) for start, size in slots])
                out |= {n: part.reshape(variables[n].shape) for n, part in zip(inside, parts)}
            else:
                arrays[array] = found.read()
        if through_orbax:
            if not verify:
                self._check_against_orbax({f"{_pack.KEY}/{a}": (e, None) for a, e in through_orbax.items()})
            arrays |= _orbax.read_host(self.arrays, through_orbax)
        for n in names:
            if (slot := variables[n].packed).array in arrays:
                out[n] = _pack.unpack(arrays[slot.array], slot, variables[n].shape)
        if verify:
            bad = _integrity.verify_host(out, {n: variables[n].digests for n in names})
            if bad is not None:
                self._mismatch(*bad)
        return out

    def _put_all(self, host: dict[str, np.ndarray], wanted: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
        """Host values onto their targets' shardings in their stored dtype, in one
        `jax.device_put` (one call for many small arrays costs far less than one call each).
        `_as_target` then casts with JAX, as for every other variable: NumPy's casts of NaN or
        out-of-range values differ from JAX's. Targets with no placement get uncommitted arrays,
        as `init` makes them (`uncommitted` would otherwise remake each one)."""
        placed = [n for n in host if wanted[n].sharding is not None]
        free = [n for n in host if wanted[n].sharding is None]
        out = dict(zip(placed, jax.device_put([own(host[n]) for n in placed], [wanted[n].sharding for n in placed])))
        return out | dict(zip(free, jax.device_put([own(host[n]) for n in free])))

    def _mismatch(self, name: str, region: str) -> None:
        damage = self._damage()
        raise CorruptCheckpointError(
            f"Checkpoint {self.path}: variable '{name}' (region [{region}]) does not match the "
            f"checksum recorded at save{'; ' + damage if damage else ''}."
        )

    def _check_against_orbax(self, todo: dict) -> None:
        """The manifest and Orbax's own metadata must agree on what is read: a manifest that
        names an array Orbax lacks, or gives it another shape or dtype, is damage, not a cast."""
        if not todo:
            return
        if self._stored is None:
            self._stored = _orbax.entries(self._tree() or _orbax.metadata(self.arrays))
        for name, (entry, _) in todo.items():
            stored = self._stored.get(name)
            if stored is None or (stored.shape, stored.dtype) != (entry.shape, entry.dtype):
                found = "does not hold it" if stored is None else f"holds shape {stored.shape} and dtype {stored.dtype}"
                raise CorruptCheckpointError(
                    f"Checkpoint {self.path} is damaged: its manifest lists variable '{name}' with shape "
                    f"{entry.shape} and dtype {entry.dtype}, but the Orbax checkpoint {self.arrays} {found}."
                )

    def _read_verified(self, todo: dict, out: dict) -> None:
        """Read `todo` into `out` in batches, each batch's checksums computed while the next is read."""
        digests = {n: v.digests for n, v in self.manifest.variables.items()}
        elsewhere: dict[str, dict[str, int]] = {}  # regions no process holds whole: checked on the host
        with ThreadPoolExecutor(max_workers=1) as verifier:
            checks = []
            for batch in _batches(todo):
                arrays = _orbax.read(self.arrays, batch, self._tree())
                out.update(arrays)
                checks.append(verifier.submit(_integrity.verify_arrays, arrays, digests, elsewhere))
            for check in checks:
                bad = check.result()
                if bad is not None:
                    self._mismatch(*bad)
        if elsewhere:  # every process reads these arrays whole: only where meshes disagree across processes
            host = _orbax.read_host(self.arrays, {n: todo[n][0] for n in elsewhere}, self._tree())
            bad = _integrity.verify_host(host, elsewhere)
            if bad is not None:
                self._mismatch(*bad)

    def _through_host(self, todo: dict) -> set[str]:
        """The names of `todo` that a restore reads into host memory and puts on the devices from
        there (`_read_through_host`); Orbax reads the others straight onto their shardings.

        With one process: arrays whose files `ocdbt` can read (one copy, where Orbax makes
        three), and every array of a target on accelerators, where reading onto the devices
        would bring the bytes back to the host for their checksums (on an H200 that made a
        verified 1 GiB restore cost 3.2x an unverified one). With several processes, Orbax reads
        each process's own shards."""
        if jax.process_count() > 1:
            return set()
        devices = {d for _, struct in todo.values() for d in or_default(struct.sharding).device_set}
        if any(d.platform != "cpu" for d in devices):
            return set(todo)
        located = self._located()
        return {n for n, (entry, _) in todo.items() if _fits(located.get(n), entry)}

    def _read_through_host(self, todo: dict, out: dict, verify: bool) -> None:
        """Read `todo` into `out` a batch at a time: each batch into host memory (each array
        checked as it arrives, while the others are read), then onto its targets' shardings.
        On the CPU, an aligned host array becomes the device array without a copy."""
        if not todo:
            return
        with ThreadPoolExecutor(_READERS) as pool:
            for batch in _batches(todo):
                host = self._fetch({n: entry for n, (entry, _) in batch.items()}, verify, pool)
                out.update(self._put_all(host, {n: struct for n, (_, struct) in batch.items()}))

    def _fetch(self, entries: dict[str, Entry], verify: bool, pool: ThreadPoolExecutor) -> dict[str, np.ndarray]:
        """`entries` (unpacked variables) in host memory in their stored dtype, each checked
        against its checksums when `verify`: those `ocdbt` locates are read in `pool`, each
        checked right after its read; the others through Orbax."""
        located = self._located()
        direct = {n for n, e in entries.items() if _fits(located.get(n), e)}

        def read(name: str) -> np.ndarray:
            if not verify:
                return located[name].read()
            running = _integrity.Running(entries[name].shape, entries[name].dtype.itemsize, self._digests(name))
            array = located[name].read(running.feed)
            if (bad := running.finish(array)) is not None:
                self._mismatch(name, bad)
            return array

        reads = {n: pool.submit(read, n) for n in direct}
        rest = {n: e for n, e in entries.items() if n not in direct}
        out = _orbax.read_host(self.arrays, rest, self._tree()) if rest else {}
        if verify:
            for check in [pool.submit(self._verify, n, a) for n, a in out.items()]:
                check.result()
        return out | {n: r.result() for n, r in reads.items()}

    def _verify(self, name: str, array: np.ndarray) -> None:
        bad = _integrity.verify_host({name: array}, {name: self._digests(name)})
        if bad is not None:
            self._mismatch(*bad)

    def _digests(self, name: str) -> dict[str, int]:
        return self.manifest.variables[name].digests

    def _located(self) -> dict[str, _ocdbt.Located]:
        if self._where is None:
            where = _ocdbt.locate(self.arrays)  # by Orbax's name: the key path joined by "."
            if self.manifest.layout == ORBAX_LAYOUT:
                where = {
                    n: found
                    for n, v in self.manifest.variables.items()
                    if v.nbytes and (found := where.get(".".join(self._keypath(n))))
                }
            self._where = where
        return self._where

    def _tree(self) -> Any:
        """Orbax's metadata tree of the Orbax layout's arrays (tuples and lists, as the user's
        tree held them), which reads of it need; None in jstate's layout (a dict by name)."""
        if self.manifest.layout != ORBAX_LAYOUT:
            return None
        if self._orbax_tree is None:
            self._orbax_tree = _orbax.metadata(self.arrays)
        return self._orbax_tree

    def _keypath(self, name: str) -> tuple[str, ...]:
        """Where Orbax's tree keeps variable `name`: under its name (jstate's layout), or, in the
        Orbax layout, its path in the user's tree, as Orbax's own metadata says."""
        if self.manifest.layout != ORBAX_LAYOUT:
            return (name,)
        if self._stored is None:
            self._stored = _orbax.entries(self._tree())
        found = self._stored.get(name)
        if found is None:
            raise CorruptCheckpointError(
                f"Checkpoint {self.path} is damaged: its manifest lists variable '{name}', but the Orbax "
                f"checkpoint {self.arrays} does not hold it."
            )
        return found.keypath

    def _damage(self) -> str | None:
        bad = _integrity.damaged_files(self.arrays, self.manifest.files, self.path)
        if bad:
            return f"damaged file: {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
        return None


def _fits(located: _ocdbt.Located | None, entry: Entry) -> bool:
    """Whether `located` is what the manifest says `entry` is (if not, Orbax reads it, and says so)."""
    return located is not None and (located.shape, located.dtype) == (entry.shape, entry.dtype)


def _as_target(array: jax.Array, v: Variable, target: jax.ShapeDtypeStruct) -> jax.Array:
    if v.key is not None:
        return jax.random.wrap_key_data(array, impl=v.key)
    return array if array.dtype == target.dtype else array.astype(target.dtype)


def _batches(wanted: dict) -> list[dict]:
    """`wanted` split into batches of about `_BATCH_BYTES` (one batch if it is smaller)."""
    batches, batch, size = [], {}, 0
    for name, item in wanted.items():
        batch[name] = item
        size += item[0].nbytes
        if size >= _BATCH_BYTES:
            batches.append(batch)
            batch, size = {}, 0
    return batches + [batch] if batch else batches


def load(path: Path) -> NativeCheckpoint | None:
    """`path` as a jstate checkpoint, None if it is not one.

    A checkpoint re-saved while it is being opened is opened again: the result is the old
    checkpoint or the new one, whole.

    Raises:
      CheckpointNotFoundError: `path` is where a save has not committed (yet, or ever).
      CorruptCheckpointError: it is one, but incomplete or damaged (a missing or truncated file
        counts: sizes are checked on every open, which costs one `stat` per file locally, one
        listing on an object store).
      CheckpointError: a metadata file of its arrays cannot be read (permissions), or is no
        regular file: it would fail every restore.

    >>> load(Path(jstate.Saver().save(state, "ckpt/model"))).writer
    'jstate'
    >>> print(load(Path(jstate.save_safetensors(state, "model.safetensors"))))  # another format's
    None
    """
    manifest = Manifest.read(path)  # first: on an object store, one request answers most calls
    if manifest is None:
        names = _storage.listdir(path)
        if names and not _storage.is_symlink(path) and _commit.only_ours(names):
            raise CheckpointNotFoundError(
                f"{path} holds no committed checkpoint: a save into it has not finished, or was interrupted."
            )
        if ARRAYS in names:  # jstate's layout before tokens, without its manifest
            raise CorruptCheckpointError(f"Checkpoint {path} is incomplete: its manifest {path / FILE} is missing.")
        return None
    for _ in range(_REOPEN):
        try:
            return _checked(path, manifest)
        except CorruptCheckpointError:
            again = Manifest.read(path)
            if again is None:
                raise CheckpointNotFoundError(f"Checkpoint {path} was deleted while it was opened.") from None
            if again == manifest:
                raise
            manifest = again  # re-saved (and the old arrays removed) while we looked
    return _checked(path, manifest)


_REOPEN = 5


def load_listed(path: Path, listed: dict[str, _storage.File]) -> NativeCheckpoint | None:
    """`load` of a checkpoint on an object store whose directory holds a manifest in a listing
    taken moments ago (`listed`: `storage.store.files(path)`): its files are checked against
    that listing, so opening it costs one request, its manifest. Where the two disagree
    (re-saved or deleted since the listing), `load` looks again.

    Its `created` is when the store wrote the manifest, by the store's clock, which every
    writer shares: lookups and retention order checkpoints by it, whatever each writer's clock.

    Returns:
      The checkpoint, or None: its manifest was deleted since the listing.

    Raises:
      CheckpointNotFoundError, CorruptCheckpointError: as `load`.

    >>> from jstate.storage import store
    >>> path = Path(jstate.Saver().save(state, "ckpt/model"))
    >>> load_listed(path, store.files(path)).manifest == load(path).manifest
    True
    """
    manifest = Manifest.read(path)
    if manifest is None:
        return None  # deleted since
    prefix = manifest.arrays + "/"
    try:
        ckpt = _checked(path, manifest, {k[len(prefix) :]: f for k, f in listed.items() if k.startswith(prefix)})
    except CorruptCheckpointError:
        return load(path)
    if FILE in listed and listed[FILE].mtime:
        ckpt.created = listed[FILE].mtime
    return ckpt


def _checked(path: Path, manifest: Manifest, listed: dict[str, _storage.File] | None = None) -> NativeCheckpoint:
    """The checkpoint `manifest` describes, once its files are found as recorded: listed in
    `listed` (its arrays directory's listing), or else asked for (on an object store, in one
    listing)."""
    arrays = _storage.safe_join(path, manifest.arrays, path)  # (links are followed inside only)
    _storage.safe_join(path, FILE, path)
    if listed is None and _storage.store_for(path).round_trips:
        listed = _storage.files(arrays)  # one request for what would be a few
    if any(v.nbytes for v in manifest.variables.values()) and not _orbax.is_checkpoint(arrays, listed):
        raise CorruptCheckpointError(f"Checkpoint {path} is incomplete: {arrays / _orbax.METADATA_FILE} is missing.")
    _integrity.check_files(arrays, manifest.files, path, listed=listed)
    if _storage.local_path(arrays) is not None:
        # The few metadata files (not the data) opened and closed, a few system calls each: one
        # this process cannot read (permissions) would fail every restore, so the checkpoint is
        # not listed, and never taken for the latest over a readable one.
        for rel in manifest.files:
            if not _orbax.is_data_file(rel):
                try:
                    with _storage.open_regular(arrays / rel, "Orbax metadata file"):
                        pass
                except (FileNotFoundError, NotADirectoryError):  # retired by a re-save since: `load` looks again
                    raise CorruptCheckpointError(
                        f"Checkpoint {path} is incomplete: {arrays / rel} is missing."
                    ) from None
    return NativeCheckpoint(path, manifest)
