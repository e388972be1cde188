"""`Saver`: TensorFlow's ``tf.train.Saver`` on top of Orbax, with name mapping and retention."""

from __future__ import annotations

import atexit
import functools
import os
import threading
import time
import weakref
from pathlib import Path

import jax
import jax.numpy as jnp

from . import _checkpoint, _files, _integrity, _orbax
from ._errors import CheckpointError, SpecMismatchError, UninitializedError, closest, shorten
from ._mapping import VarList, compile_var_list
from ._names import check_name
from ._state import State

_VERSION = 1

# Savers with a `blocking=False` save in flight. The interpreter finishes them at exit, before
# concurrent.futures stops taking work (Orbax needs it): threading's own exit hooks run first,
# newest first, and this one is registered after concurrent.futures'.
_unfinished: weakref.WeakSet = weakref.WeakSet()


def _finish_at_exit() -> None:
    for saver in list(_unfinished):
        saver._join()


getattr(threading, "_register_atexit", atexit.register)(_finish_at_exit)


class Saver:
    """Saves and restores a State's variables, all or some, under chosen names.

    Valid forms of `var_list` (see `jstate._mapping` for details):

      Saver()                                 every initialized variable, under its own name
      Saver(["weights", "biases"])            a subset; ``"encoder/"`` names a whole scope
      Saver({"my_v2": "v2"})                  checkpoint name -> State name
      Saver({"encoder/": "model/encoder/"})   checkpoint scope -> State scope
      Saver([(r"^model/(.*)$", r"\\1")])        regex over State names -> checkpoint name

    Checkpoints are Orbax PyTree checkpoints (arrays keyed by checkpoint name, in ``arrays/``)
    plus a small ``jstate.json`` manifest; plain Orbax can restore them. Each save is atomic.

    Args:
      var_list: which variables, under which names.
      max_to_keep: keep only the newest N checkpoints of a prefix (None or 0 keeps all).
      keep_every_n_hours: also keep, for good, one checkpoint per N hours.
      keep_every_n_steps: also keep, for good, checkpoints whose step is a multiple of N.
      compression: zstd-compress arrays (Orbax's default; ~8% smaller float data, ~2x slower).
      timeout: seconds that processes of a multi-process save wait for each other.

    >>> saver = jstate.Saver(max_to_keep=3)
    >>> path = saver.save(state, "ckpt/model", step=1000)
    >>> state = saver.restore(path, jstate.abstract(model))
    """

    def __init__(
        self,
        var_list: VarList = None,
        *,
        max_to_keep: int | None = None,
        keep_every_n_hours: float | None = None,
        keep_every_n_steps: int | None = None,
        compression: bool = False,
        timeout: float = 600.0,
    ):
        for arg, value in (("max_to_keep", max_to_keep), ("keep_every_n_steps", keep_every_n_steps)):
            if value is not None and value < 0 or (arg == "keep_every_n_steps" and value == 0):
                raise ValueError(f"Saver: `{arg}` must be a positive number or None, got {value}.")
        if keep_every_n_hours is not None and keep_every_n_hours <= 0:
            raise ValueError(f"Saver: `keep_every_n_hours` must be positive or None, got {keep_every_n_hours}.")
        self._names = compile_var_list(var_list)
        max_to_keep = max_to_keep or None  # TensorFlow's Saver: 0 or None keeps every checkpoint
        self._max_to_keep = max_to_keep
        self._keep_hours = keep_every_n_hours
        self._keep_steps = keep_every_n_steps
        self._compression = compression
        self._timeout = timeout
        self._saves = 0
        self._writer: _orbax.Writer | None = None
        self._pending: threading.Thread | None = None
        self._error: BaseException | None = None
        self._error_path: Path | None = None

    # -- saving ------------------------------------------------------------------------------
    def save(self, state: State, path: str | os.PathLike, step: int | None = None, *, blocking: bool = True) -> str:
        """Write this Saver's variables of `state` to ``<path>-<step>`` (or `path`).

        Returns the checkpoint's path. With ``blocking=False`` it returns as soon as the values
        are copied off the device (donating `state` right after is safe); `wait` finishes it, and
        so does the interpreter's exit. A save killed at any moment leaves earlier checkpoints
        intact and is never listed. `path` may be an earlier checkpoint of this name (it is
        replaced), never another directory. A Saver is used from one thread at a time.

        Raises:
          CheckpointError: the save failed (or an earlier ``blocking=False`` one did).
        """
        if step is not None and int(step) < 0:
            raise ValueError(f"Saver.save: `step` must be >= 0, got {step}.")
        self.wait()
        arrays = self._arrays(state)
        if not arrays:
            raise CheckpointError(
                f"Nothing to save to {path}: the Saver's variables hold no values. Initialize or restore them first."
            )
        # Orbax cannot store zero-size arrays; their shape and dtype in the manifest are all of them.
        stored = {n: a for n, a in arrays.items() if a.size}
        final = Path(f"{path}-{int(step)}" if step is not None else path)
        _files.check_replaceable(final)
        tmp = _files.temporary(final)
        self._saves += 1
        barrier = functools.partial(_orbax.barrier, f"jstate-save-{self._saves}-{final}", self._timeout)
        # With several JAX processes, all call `save` on a shared directory: process 0 prepares
        # and commits; every process writes its shards (through Orbax) and their checksums.
        if jax.process_index() == 0:
            final.parent.mkdir(parents=True, exist_ok=True)
            _files.clean_stale(final.parent)
            tmp.mkdir()
        barrier("start")
        # Checksums are taken now: the values saved are the values at call time.
        digests = {n: _integrity.array_digests(a) for n, a in stored.items()}
        manifest = {
            "format": _files.FORMAT,
            "version": _VERSION,
            "step": None if step is None else int(step),
            "variables": {n: {"shape": list(a.shape), "dtype": a.dtype.name} for n, a in arrays.items()},
        }
        if self._writer is None:
            self._writer = _orbax.Writer(self._compression, self._timeout)
        finish = functools.partial(self._finish, tmp, final, manifest, digests, Path(path), barrier)
        try:
            if stored:
                self._writer.save(tmp / _files.ARRAYS, stored)
            if blocking:
                finish()
        except Exception as e:
            raise _save_failed(final, e) from e
        if not blocking:
            self._error_path = final
            self._pending = threading.Thread(target=self._background, args=(finish,), daemon=True)
            self._pending.start()
            _unfinished.add(self)
        return str(final)

    def _arrays(self, state: State) -> dict[str, jax.Array]:
        if self._names.rules is None:
            names = self._names.resolve(state.keys())
        else:
            names = self._names.resolve(state.specs, "the State")
        empty = [n for n in names if not state.is_initialized(n)]
        if empty:
            raise UninitializedError(
                f"Cannot save: variable {shorten(empty)} {'is' if len(empty) == 1 else 'are'} not "
                "initialized. Initialize or restore it first, or leave it out of the Saver."
            )
        if jax.process_count() > 1:
            local = [n for n in names if state[n].is_fully_addressable]
            if local:
                raise CheckpointError(
                    f"Cannot save variable {shorten(local)} from {jax.process_count()} processes: it lives on "
                    "one process's devices only. Place it on a mesh over all processes' devices "
                    "(e.g. a rule `(name, P())`), or leave it out of the Saver."
                )
        for ckpt in names.values():
            check_name(ckpt)  # "." would let two names share storage in Orbax's files
        return {ckpt: jnp.asarray(state[n]) for n, ckpt in names.items()}  # numpy values too

    def _finish(self, tmp: Path, final: Path, manifest: dict, digests: dict, prefix: Path, barrier) -> None:
        self._writer.wait()
        process = jax.process_index()
        if jax.process_count() > 1:
            _files.write_json(tmp / f"digests.{process}.json", digests)
        barrier("written")
        if process == 0:
            for other in range(1, jax.process_count()):
                part = tmp / f"digests.{other}.json"
                for name, regions in _files.read_json(part).items():
                    digests[name].update(regions)
                part.unlink()
            for name, regions in digests.items():
                manifest["variables"][name]["digests"] = regions
            manifest["created"] = time.time()
            manifest["files"] = _integrity.file_records(tmp / _files.ARRAYS)
            _files.write_manifest(tmp, manifest)
            _files.commit(tmp, final)
            self._retire(prefix)
        barrier("committed")  # every process sees the new checkpoint once `save` returns

    def _background(self, finish) -> None:
        try:
            finish()
        except BaseException as e:  # re-raised by `wait`
            self._error = e

    def wait(self) -> None:
        """Block until a ``blocking=False`` save is on disk; re-raise its error, if any."""
        self._join()
        if self._error is not None:
            error, self._error = self._error, None
            raise _save_failed(self._error_path, error) from error

    def _join(self) -> None:
        if self._pending is not None:
            self._pending.join()
            self._pending = None
            _unfinished.discard(self)

    def _retire(self, prefix: Path) -> None:
        """Delete checkpoints of `prefix` beyond `max_to_keep`, sparing those kept for good."""
        if self._max_to_keep is None:
            return
        steps = [c for c in _checkpoint.checkpoints(prefix) if c.step is not None]
        old = steps[: max(len(steps) - self._max_to_keep, 0)]
        last_kept_time = None
        for ckpt in steps:
            keep = self._keep_steps and ckpt.step % self._keep_steps == 0
            if self._keep_hours is not None and (
                last_kept_time is None or ckpt.created >= last_kept_time + self._keep_hours * 3600
            ):
                keep, last_kept_time = True, ckpt.created
            if ckpt in old and not keep:
                _files.delete(ckpt.path)

    # -- restoring ---------------------------------------------------------------------------
    def restore(
        self,
        path: str | os.PathLike,
        target: State,
        *,
        cast: bool = False,
        strict: bool = False,
        verify: bool = True,
    ) -> State:
        """A new State: `target` with this Saver's variables read from the checkpoint at `path`.

        `target` may be abstract (`jstate.abstract(model)`): no initialization is needed first.
        Variables outside this Saver stay as they are in `target`, initialized or not. Only the
        arrays needed are read, each straight onto the target variable's sharding or device.
        `path` may also be a directory of checkpoints: its latest complete one is read.

        Args:
          path: a checkpoint, or a directory of them.
          target: the State to restore into; it is left unchanged.
          cast: allow a checkpoint dtype that differs from the declaration (converted).
          strict: fail if the checkpoint holds variables this Saver does not restore.
          verify: check each array against the checksums recorded when it was saved.

        Raises:
          CheckpointNotFoundError, CorruptCheckpointError: for a missing or damaged checkpoint.
          CheckpointError: for variables missing from the checkpoint (with the closest names).
          SpecMismatchError: for a shape (or, without `cast`, dtype) that differs.
        """
        self._join()  # a failed background save is reported by `wait` or the next `save`, not here
        names = self._names.resolve(target.specs, "the target State")
        ckpt = _checkpoint.open_checkpoint(path)
        missing = {n: c for n, c in names.items() if c not in ckpt.entries}
        unreadable = {c: ckpt.skipped[c] for c in missing.values() if c in ckpt.skipped}
        if unreadable:
            name, why = next(iter(unreadable.items()))
            raise CheckpointError(
                f"Checkpoint {ckpt.path}: jstate cannot read '{name}' ({why}). Leave it out of the Saver."
            )
        if missing:
            first_state, first = next(iter(missing.items()))
            shown = shorten(f"{c}" if c == n else f"{c} (for '{n}')" for n, c in missing.items())
            raise CheckpointError(
                f"Checkpoint {ckpt.path} lacks {len(missing)} variable(s) the Saver restores: {shown}."
                f"{closest(first, ckpt.entries)} Restore a subset with `Saver([...])`, or map names with "
                "`Saver({checkpoint_name: state_name})`."
            )
        if strict:
            extra = sorted(set(ckpt.entries) - set(names.values()))
            if extra:
                raise CheckpointError(
                    f"Checkpoint {ckpt.path} holds {len(extra)} variable(s) that the Saver does not restore: "
                    f"{shorten(extra)}. Pass `strict=False` to ignore them."
                )
        wanted = {}
        for n, c in names.items():
            spec, entry = target.spec(n), ckpt.entries[c]
            if entry.shape != spec.shape or (entry.dtype != spec.dtype and not cast):
                raise SpecMismatchError(
                    f"Checkpoint {ckpt.path}: variable '{c}' has shape {entry.shape} and dtype "
                    f"{entry.dtype.name}, but '{n}' is declared with shape {spec.shape} and dtype "
                    f"{spec.dtype.name}."
                    + (" Pass `cast=True` to convert the dtype." if entry.shape == spec.shape else "")
                )
            wanted[c] = (entry, spec.struct())
        arrays = _checkpoint.read(ckpt, wanted, verify=verify)
        return target._replace_values({n: arrays[c] for n, c in names.items()})

    def __repr__(self) -> str:
        return f"Saver(max_to_keep={self._max_to_keep}, compression={self._compression})"


def _save_failed(path: Path | None, error: BaseException) -> CheckpointError:
    """One short error for a failed save; Orbax's own messages can hold whole arrays."""
    if isinstance(error, CheckpointError):
        return error
    detail = str(error).splitlines()[0] if str(error) else ""
    detail = detail if len(detail) <= 200 else detail[:200] + "..."
    return CheckpointError(
        f"Saving checkpoint {path} failed ({type(error).__name__}: {detail}). Earlier checkpoints are intact; "
        "the partial one is hidden and removed by the next save."
    )


def save_safetensors(state: State, path: str | os.PathLike) -> str:
    """Export the State's initialized variables, under their names, to one ``.safetensors`` file.

    Written atomically (temporary file, fsync, rename). Needs ``pip install jstate[safetensors]``.
    Read it back with ``Saver().restore(path, target)`` or `jstate.load_variable`.
    """
    from . import _safetensors

    return str(_safetensors.save(state, path))
