"""Finding checkpoints and reading what they hold: `latest_checkpoint`, `list_variables`,
`load_variable`. Writing is the Saver's (`_saver.py`)."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np

from . import _files, _integrity, _orbax, _placement, _tensorflow
from ._errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, closest
from ._spec import Entry
from ._table import Table, human_bytes


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One complete checkpoint on disk.

    Attributes:
      path: the checkpoint's directory.
      source: what holds its arrays: an Orbax PyTree checkpoint directory, a TensorFlow
        checkpoint prefix, or a file.
      format: "orbax", "tensorflow" or "safetensors": how `source` is read.
      step: its step, when saved with one.
      created: seconds since the epoch when it was committed (0 when unknown).
      entries: every array it holds, by name.
      writer: "jstate", or who else wrote it ("orbax" for plain Orbax or Flax).
      digests: per variable, the checksum of each saved region (jstate checkpoints only).
      files: ``{path under source: [size, crc32c]}`` of every array file (jstate only).
      skipped: entries jstate cannot read (strings, partitioned slices, ...), with the reason.
    """

    path: Path
    source: Path
    format: str
    step: int | None
    created: float
    entries: dict[str, Entry]
    writer: str
    digests: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict, repr=False)
    files: dict[str, list[int]] = dataclasses.field(default_factory=dict, repr=False)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)

    def table(self) -> Table:
        rows = [(n, e.shape, e.dtype.name, human_bytes(e.nbytes)) for n, e in sorted(self.entries.items())]
        total = sum(e.nbytes for e in self.entries.values())
        rows += [(n, "-", "-", f"skipped: {why}") for n, why in sorted(self.skipped.items())]
        step = f", step {self.step}" if self.step is not None else ""
        title = f"Checkpoint {self.path}{step} ({self.writer}): {len(self.entries)} variables, {human_bytes(total)}"
        return Table(("name", "shape", "dtype", "size"), rows, title)

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()

    def __repr__(self) -> str:
        return str(self.table())


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The checkpoint at `path`, read from its metadata only.

    Valid forms of `path`:

      ckpt/model-1000              a jstate checkpoint
      ckpt/flax_params             an Orbax PyTree checkpoint (plain Orbax, Flax)
      ckpt/1000                    an Orbax CheckpointManager step with one item
      old/model.ckpt-20            a TensorFlow checkpoint prefix (or its .index file)
      model.safetensors            a safetensors file (needs `jstate[safetensors]`)
      ckpt/                        a directory of any of these: its latest complete one

    Raises:
      CheckpointNotFoundError: nothing readable at `path`.
      CorruptCheckpointError: a checkpoint that is incomplete or damaged.
    """
    path = Path(path)
    found = _load(path)
    if found is not None:
        return found
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is not None:
            return _load(Path(latest))
        raise CheckpointNotFoundError(
            f"{path} is a directory but holds no complete checkpoint (no {_files.MANIFEST} or Orbax "
            f"{_orbax.METADATA_FILE} in it or in its subdirectories)."
        )
    near = closest(path.name, os.listdir(path.parent)) if path.parent.is_dir() else ""
    raise CheckpointNotFoundError(f"No checkpoint at {path}: it does not exist.{near}")


def _load(path: Path) -> Checkpoint | None:
    """`path` as a checkpoint, None if it is not one (CorruptCheckpointError if damaged)."""
    if not path.is_dir():
        return _load_file(path)
    manifest = _files.read_manifest(path)
    if manifest is not None:
        arrays = path / _files.ARRAYS
        holds_data = any(math.prod(v.get("shape", [1])) for v in manifest["variables"].values())
        if holds_data and not (arrays / _orbax.METADATA_FILE).is_file():
            raise CorruptCheckpointError(
                f"Checkpoint {path} is incomplete: {arrays / _orbax.METADATA_FILE} is missing."
            )
        try:
            variables = manifest["variables"]
            entries = {n: Entry((n,), tuple(v["shape"]), np.dtype(_dtype(v["dtype"]))) for n, v in variables.items()}
            digests = {n: dict(v.get("digests", {})) for n, v in variables.items()}
            files = dict(manifest.get("files", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptCheckpointError(f"Checkpoint {path}: its manifest {path / _files.MANIFEST} is damaged.") from e
        _integrity.check_files(arrays, files, path)  # sizes only: cheap enough for every listing
        step, created = manifest.get("step"), manifest.get("created", 0.0)
        return Checkpoint(path, arrays, "orbax", step, created, entries, "jstate", digests, files)
    if (path / _files.ARRAYS / _orbax.METADATA_FILE).is_file():  # jstate's layout without its manifest
        raise CorruptCheckpointError(
            f"Checkpoint {path} is incomplete: its manifest {path / _files.MANIFEST} is missing."
        )
    arrays = _orbax_dir(path)
    if arrays is None:
        return None
    try:
        entries = _orbax.entries(arrays)
    except Exception as e:  # Orbax raises bare Exceptions and KeyErrors for damaged metadata.
        raise CorruptCheckpointError(
            f"Checkpoint {arrays}: Orbax cannot read its metadata ({type(e).__name__})."
        ) from e
    step = int(path.name) if path.name.isdigit() else None
    created = (arrays / _orbax.METADATA_FILE).stat().st_mtime
    return Checkpoint(path, arrays, "orbax", step, created, entries, "orbax")


def _load_file(path: Path) -> Checkpoint | None:
    """A TensorFlow checkpoint (its prefix or one of its files) or a ``.safetensors`` file."""
    prefix = _tensorflow.find(path)
    if prefix is not None:
        index = prefix.with_name(prefix.name + ".index")
        step = re.search(r"-(\d+)$", prefix.name)
        return Checkpoint(
            prefix,
            prefix,
            "tensorflow",
            int(step.group(1)) if step else None,
            index.stat().st_mtime,
            _tensorflow.entries(prefix),
            "tensorflow",
            skipped=_tensorflow.skipped(prefix),
        )
    if path.suffix == ".safetensors" and path.is_file():
        from . import _safetensors  # an optional extra: `pip install jstate[safetensors]`

        return Checkpoint(
            path,
            path,
            "safetensors",
            None,
            path.stat().st_mtime,
            _safetensors.entries(path),
            "safetensors",
            skipped=_safetensors.skipped(path),
        )
    return None


def _orbax_dir(path: Path) -> Path | None:
    if (path / _orbax.METADATA_FILE).is_file():
        return path
    items = [p for p in path.iterdir() if (p / _orbax.METADATA_FILE).is_file()] if path.is_dir() else []
    return items[0] if len(items) == 1 else None


def _dtype(name: str) -> np.dtype:
    return jax.numpy.dtype(name)  # knows bfloat16 and the other ml_dtypes


def checkpoints(path: str | os.PathLike) -> list[Checkpoint]:
    """Complete checkpoints in directory `path`, or named ``<path>-<step>`` beside it, oldest first."""
    path = Path(path)
    if path.is_dir() and not _is_checkpoint_dir(path):
        parent, prefix = path, None
    else:
        parent, prefix = path.parent, path.name
    if not parent.is_dir():
        return []
    found = {}
    for entry in parent.iterdir():
        if entry.name.endswith(".index"):  # a TensorFlow checkpoint: list it by its prefix
            entry = entry.with_name(entry.name[: -len(".index")])
        if entry.name.startswith(".") or entry in found:
            continue
        if prefix is not None and entry.name != prefix and _files.step_of(entry.name, prefix) is None:
            continue
        ckpt = _load_quietly(entry)
        if ckpt is not None:
            found[entry] = ckpt
    return sorted(found.values(), key=lambda c: (c.step if c.step is not None else -1, c.created))


def _is_checkpoint_dir(path: Path) -> bool:
    """Whether `path` is meant as one checkpoint (complete or not), not a directory of them."""
    return (path / _files.MANIFEST).exists() or (path / _files.ARRAYS).exists() or _load_quietly(path) is not None


def _load_quietly(path: Path) -> Checkpoint | None:
    try:
        return _load(path)
    except (CheckpointError, OSError):
        return None  # damaged or half-written: not a checkpoint to list


def latest_checkpoint(path: str | os.PathLike) -> str | None:
    """The newest complete checkpoint in directory `path` (or saved with prefix `path`), or None.

    Incomplete or damaged checkpoints are skipped, so the result is always restorable.

    >>> jstate.latest_checkpoint("ckpt")
    'ckpt/model-2000'
    """
    found = checkpoints(path)
    if found and found[-1].format == "tensorflow" and Path(path).is_dir():
        named = _tensorflow.latest(Path(path))  # TensorFlow's own `checkpoint` state file decides
        if named is not None:
            return str(named)
    return str(found[-1].path) if found else None


def list_variables(path: str | os.PathLike) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """``[(name, shape, dtype)]`` of a checkpoint, sorted by name, from its metadata only."""
    ckpt = open_checkpoint(path)
    return [(n, e.shape, e.dtype) for n, e in sorted(ckpt.entries.items())]


def load_variable(path: str | os.PathLike, name: str, *, verify: bool = True) -> jax.Array:
    """One variable of a checkpoint, reading only that array (onto the default device).

    With `verify` (the default), it is checked against the checksum recorded at save.
    """
    ckpt = open_checkpoint(path)
    entry = ckpt.entries.get(name)
    if entry is None:
        raise CheckpointError(
            f"Checkpoint {ckpt.path} holds no variable '{name}'.{closest(name, ckpt.entries)} "
            "`jstate.list_variables(path)` lists them."
        )
    return read(ckpt, {name: (entry, jax.ShapeDtypeStruct(entry.shape, entry.dtype))}, verify=verify)[name]


def read(
    ckpt: Checkpoint, wanted: dict[str, tuple[Entry, jax.ShapeDtypeStruct]], *, verify: bool = True
) -> dict[str, jax.Array]:
    """Read `wanted` arrays of `ckpt`, each onto its target struct's sharding and dtype.

    With `verify`, the small metadata files and each array are checked against the checksums
    recorded at save. Any failure becomes one CorruptCheckpointError naming the checkpoint,
    the variable and, where it can be found, the damaged file.
    """
    if verify and ckpt.files:
        metadata = [rel for rel in ckpt.files if "d" not in rel.split("/")[:-1]]  # all but data files
        _integrity.check_files(ckpt.source, ckpt.files, ckpt.path, contents=metadata)
    targets = {n: t for n, (_, t) in wanted.items()}
    # Zero-size arrays hold no data (Orbax cannot even store them): made, not read.
    arrays = {n: _place_host(np.zeros(t.shape, t.dtype), t) for n, (e, t) in wanted.items() if not e.nbytes}
    wanted = {n: item for n, item in wanted.items() if n not in arrays}
    # Read in the stored dtype, check, then cast on the device: a cast never skips the checksums.
    if verify:
        wanted = {n: (e, jax.ShapeDtypeStruct(t.shape, e.dtype, sharding=t.sharding)) for n, (e, t) in wanted.items()}
    # Large restores go in batches, each batch's checksums computed while the next one is read.
    batches = _batches(wanted) if verify and ckpt.format == "orbax" else [wanted] if wanted else []
    with ThreadPoolExecutor(max_workers=1) as verifier:
        checks = []
        for batch in batches:
            read = _read_batch(ckpt, batch)
            arrays.update(read)
            if verify:
                checks.append(verifier.submit(_integrity.verify_arrays, read, ckpt.digests))
        for check in checks:
            bad = check.result()
            if bad is not None:
                name, region = bad
                raise CorruptCheckpointError(
                    f"Checkpoint {ckpt.path}: variable '{name}' (region [{region}]) does not match the "
                    f"checksum recorded at save{_culprit(ckpt)}."
                )
    return {n: a if a.dtype == targets[n].dtype else a.astype(targets[n].dtype) for n, a in arrays.items()}


_BATCH_BYTES = 512 * 1024 * 1024


def _batches(wanted: dict[str, tuple[Entry, jax.ShapeDtypeStruct]]) -> list[dict]:
    """`wanted` split into batches of about `_BATCH_BYTES` (one batch if it is smaller)."""
    batches, batch, size = [], {}, 0
    for name, item in wanted.items():
        batch[name] = item
        size += item[0].nbytes
        if size >= _BATCH_BYTES:
            batches.append(batch)
            batch, size = {}, 0
    return batches + [batch] if batch else batches


def _read_batch(ckpt: Checkpoint, wanted: dict[str, tuple[Entry, jax.ShapeDtypeStruct]]) -> dict[str, jax.Array]:
    """Read `wanted` arrays; any failure becomes one CorruptCheckpointError."""
    names = sorted(wanted)
    try:
        if ckpt.format == "orbax":
            return _orbax.read(ckpt.source, wanted)
        return _place(_read_flat(ckpt, [entry.keypath[0] for entry, _ in wanted.values()]), wanted)
    except CheckpointError:
        raise
    except Exception as e:
        which = f"variable '{names[0]}'" if len(names) == 1 else f"{len(names)} variables (from '{names[0]}')"
        raise CorruptCheckpointError(
            f"Checkpoint {ckpt.path}: reading {which} failed ({type(e).__name__}){_culprit(ckpt)}."
        ) from e


def _read_flat(ckpt: Checkpoint, names: list[str]) -> dict[str, np.ndarray]:
    """Host arrays from a flat, single-file-per-format checkpoint (TensorFlow, safetensors)."""
    if ckpt.format == "tensorflow":
        return _tensorflow.read(ckpt.source, names)
    from . import _safetensors

    return _safetensors.read(ckpt.source, names)


def _place(host: dict[str, np.ndarray], wanted: dict[str, tuple[Entry, jax.ShapeDtypeStruct]]) -> dict[str, jax.Array]:
    """Put host arrays onto their targets' shardings (each process holds the whole array, so
    this works for shardings over several processes too), cast to the targets' dtypes."""
    return {name: _place_host(host.pop(name), target) for name, (_, target) in wanted.items()}


def _place_host(array: np.ndarray, target: jax.ShapeDtypeStruct) -> jax.Array:
    return jax.device_put(array.astype(target.dtype, copy=False), _placement.or_default(target.sharding))


def _culprit(ckpt: Checkpoint) -> str:
    """ ", damaged file: <path>" when the recorded file checksums find one."""
    bad = _integrity.damaged_files(ckpt.source, ckpt.files, ckpt.path) if ckpt.files else []
    if bad:
        return f"; damaged file: {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
    return f"; its files under {ckpt.source} are damaged or incomplete"
