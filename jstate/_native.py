"""Reading jstate's own checkpoints: a manifest (`_manifest`) over an Orbax checkpoint, every
array verified against the checksums recorded at save."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np

from . import _commit, _integrity, _orbax
from ._errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from ._manifest import ARRAYS, FILE, Manifest
from ._reader import Checkpoint, place
from ._spec import Entry

# Restores go in batches of about this many bytes, each batch's checksums computed while the
# next batch is read.
_BATCH_BYTES = 512 * 1024 * 1024


class NativeCheckpoint(Checkpoint):
    """A checkpoint jstate wrote: entries named by checkpoint name, every region checksummed.

    Attributes:
      manifest: its `Manifest`.
      arrays: the Orbax checkpoint holding its arrays.
    """

    writer = "jstate"
    checksums = True

    def __init__(self, path: Path, manifest: Manifest):
        entries = {n: Entry((n,), v.shape, v.dtype) for n, v in manifest.variables.items()}
        super().__init__(path, entries, step=manifest.step, created=manifest.created)
        self.manifest = manifest
        self.arrays = path / manifest.arrays

    def changed(self) -> bool:
        try:
            return Manifest.read(self.path) != self.manifest
        except CheckpointError:
            return True

    def _read(self, wanted: dict[str, jax.ShapeDtypeStruct], verify: bool) -> dict[str, jax.Array]:
        files = self.manifest.files
        if verify and files:  # the small metadata files in full; data files through array digests
            metadata = [rel for rel in files if not _orbax.is_data_file(rel)]
            _integrity.check_files(self.arrays, files, self.path, contents=metadata)
        # Zero-size arrays hold no data (Orbax cannot even store them): made, not read.
        out = {n: place(np.zeros(t.shape, t.dtype), t) for n, t in wanted.items() if not self.entries[n].nbytes}
        todo = {n: (self.entries[n], t) for n, t in wanted.items() if n not in out}
        if not verify:
            return out | (_orbax.read(self.arrays, todo) if todo else {})
        # Read in the stored dtype and check, then cast on the device: a cast never skips the checksums.
        todo = {n: (e, jax.ShapeDtypeStruct(t.shape, e.dtype, sharding=t.sharding)) for n, (e, t) in todo.items()}
        digests = {n: v.digests for n, v in self.manifest.variables.items()}
        with ThreadPoolExecutor(max_workers=1) as verifier:
            checks = []
            for batch in _batches(todo):
                arrays = _orbax.read(self.arrays, batch)
                out.update(arrays)
                checks.append(verifier.submit(_integrity.verify_arrays, arrays, digests))
            for check in checks:
                bad = check.result()
                if bad is not None:
                    name, region = bad
                    damage = self._damage()
                    raise CorruptCheckpointError(
                        f"Checkpoint {self.path}: variable '{name}' (region [{region}]) does not match the "
                        f"checksum recorded at save{'; ' + damage if damage else ''}."
                    )
        return {n: a if a.dtype == wanted[n].dtype else a.astype(wanted[n].dtype) for n, a in out.items()}

    def _damage(self) -> str | None:
        bad = _integrity.damaged_files(self.arrays, self.manifest.files, self.path)
        if bad:
            return f"damaged file: {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
        return None


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
        counts: sizes are checked on every open, which costs one `stat` per file).
    """
    path = Path(path)
    if not path.is_dir():
        return None
    manifest = Manifest.read(path)
    if manifest is None:
        if _commit.is_ours(path) and any(path.iterdir()):
            raise CheckpointNotFoundError(
                f"{path} holds no committed checkpoint: a save into it has not finished, or was interrupted."
            )
        if (path / ARRAYS).exists():  # jstate's layout before tokens, without its manifest
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


def _checked(path: Path, manifest: Manifest) -> NativeCheckpoint:
    arrays = path / manifest.arrays
    if any(v.nbytes for v in manifest.variables.values()) and not _orbax.is_checkpoint(arrays):
        raise CorruptCheckpointError(f"Checkpoint {path} is incomplete: {arrays / _orbax.METADATA_FILE} is missing.")
    _integrity.check_files(arrays, manifest.files, path)
    return NativeCheckpoint(path, manifest)
