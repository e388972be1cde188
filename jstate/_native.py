"""Reading jstate's own checkpoints: a manifest (`_manifest`) over an Orbax checkpoint, every
array verified against the checksums recorded at save."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np

from . import _integrity, _orbax
from ._errors import CorruptCheckpointError
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
        self.arrays = path / ARRAYS

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
                    raise CorruptCheckpointError(
                        f"Checkpoint {self.path}: variable '{name}' (region [{region}]) does not match the "
                        f"checksum recorded at save{self._damage()}."
                    )
        return {n: a if a.dtype == wanted[n].dtype else a.astype(wanted[n].dtype) for n, a in out.items()}

    def _damage(self) -> str:
        bad = _integrity.damaged_files(self.arrays, self.manifest.files, self.path)
        if bad:
            return f"; damaged file: {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
        return f"; its files under {self.arrays} are damaged or incomplete"


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

    Raises:
      CorruptCheckpointError: it is one, but incomplete or damaged (a missing or truncated file
        counts: sizes are checked on every open, which costs one `stat` per file).
    """
    path = Path(path)
    if not path.is_dir():
        return None
    manifest = Manifest.read(path)
    if manifest is None:
        if (path / ARRAYS).exists():  # jstate's layout without its manifest
            raise CorruptCheckpointError(f"Checkpoint {path} is incomplete: its manifest {path / FILE} is missing.")
        return None
    arrays = path / ARRAYS
    if any(v.nbytes for v in manifest.variables.values()) and not _orbax.is_checkpoint(arrays):
        raise CorruptCheckpointError(f"Checkpoint {path} is incomplete: {arrays / _orbax.METADATA_FILE} is missing.")
    _integrity.check_files(arrays, manifest.files, path)
    return NativeCheckpoint(path, manifest)
