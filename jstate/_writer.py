"""Writing one jstate checkpoint: a hidden temporary directory, the arrays through Orbax, their
checksums, the manifest, and the commit; in the caller's thread or in the background.

With several JAX processes, every process calls `Writer.save` for the same checkpoint on a
shared directory: process 0 prepares and commits; every process writes its shards (through
Orbax) and their checksums, and barriers keep them in step.
"""

from __future__ import annotations

import atexit
import functools
import json
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import jax

from . import _files, _integrity, _orbax
from ._errors import CheckpointError
from ._manifest import ARRAYS, FILE, Manifest, Variable

# Writers with a background save in flight. The interpreter finishes them at exit, before
# concurrent.futures stops taking work (Orbax needs it): threading's own exit hooks run first,
# newest first, and this one is registered after concurrent.futures'.
_unfinished: weakref.WeakSet = weakref.WeakSet()


def _finish_at_exit() -> None:
    for writer in list(_unfinished):
        writer.join()


getattr(threading, "_register_atexit", atexit.register)(_finish_at_exit)


class Writer:
    """Writes jstate checkpoints one at a time; a background save's error is kept for `wait`.

    Args:
      compression: zstd-compress arrays.
      timeout: seconds that processes of a multi-process save wait for each other.
    """

    def __init__(self, compression: bool, timeout: float):
        self._compression = compression
        self._timeout = timeout
        self._orbax: _orbax.Writer | None = None
        self._saves = 0
        self._pending: threading.Thread | None = None
        self._error: BaseException | None = None
        self._error_path: Path | None = None

    def save(
        self,
        arrays: dict[str, jax.Array],
        final: Path,
        step: int | None,
        *,
        blocking: bool,
        committed: Callable[[], None] = lambda: None,
    ) -> None:
        """Write `arrays` as the checkpoint `final`; call `committed` (process 0) once it is.

        Returns once the values are copied off the device. With ``blocking=False`` the rest
        happens in a background thread, which `wait` (or the interpreter's exit) finishes.

        Raises:
          CheckpointError: the save failed.
        """
        self.wait()
        check_replaceable(final)
        # Orbax cannot store zero-size arrays; their shape and dtype in the manifest are all of them.
        stored = {n: a for n, a in arrays.items() if a.size}
        tmp = _files.temporary(final)
        self._saves += 1
        barrier = functools.partial(_orbax.barrier, f"jstate-save-{self._saves}-{final}", self._timeout)
        if jax.process_index() == 0:
            final.parent.mkdir(parents=True, exist_ok=True)
            _files.clean_stale(final.parent)
            tmp.mkdir()
        barrier("start")
        # Checksums are taken now: the values saved are the values at call time.
        digests = {n: _integrity.array_digests(a) for n, a in stored.items()}
        shapes = {n: (tuple(a.shape), a.dtype) for n, a in arrays.items()}
        if self._orbax is None:
            self._orbax = _orbax.Writer(self._compression, self._timeout)
        finish = functools.partial(self._finish, tmp, final, step, shapes, digests, barrier, committed)
        try:
            if stored:
                self._orbax.save(tmp / ARRAYS, stored)
            if blocking:
                finish()
        except Exception as e:
            raise save_failed(final, e) from e
        if not blocking:
            self._error_path = final
            self._pending = threading.Thread(target=self._background, args=(finish,), daemon=True)
            self._pending.start()
            _unfinished.add(self)

    def _finish(self, tmp, final, step, shapes, digests, barrier, committed) -> None:
        self._orbax.wait()
        process = jax.process_index()
        if jax.process_count() > 1:
            with _files.atomic(tmp / f"digests.{process}.json") as part:
                part.write_text(json.dumps(digests))
        barrier("written")
        if process == 0:
            for other in range(1, jax.process_count()):
                part = tmp / f"digests.{other}.json"
                for name, regions in json.loads(part.read_text()).items():
                    digests[name].update(regions)
                part.unlink()
            variables = {n: Variable(shape, dtype, digests.get(n, {})) for n, (shape, dtype) in shapes.items()}
            files = _integrity.file_records(tmp / ARRAYS)
            Manifest(variables, step, time.time(), files).write(tmp)
            _files.commit(tmp, final)
            committed()
        barrier("committed")  # every process sees the new checkpoint once `save` returns

    def _background(self, finish: Callable[[], None]) -> None:
        try:
            finish()
        except BaseException as e:  # re-raised by `wait`
            self._error = e

    def wait(self) -> None:
        """Block until a background save is on disk; re-raise its error, if any."""
        self.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise save_failed(self._error_path, error) from error

    def join(self) -> None:
        """Block until a background save is done, keeping its error for `wait`."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
            _unfinished.discard(self)


def check_replaceable(final: Path) -> None:
    """Refuse to save over anything at `final` but a jstate checkpoint (never delete user files)."""
    if final.exists() and not (final / FILE).is_file():
        raise CheckpointError(
            f"Cannot save to {final}: it exists and is not a jstate checkpoint, and saving would replace it. "
            f"Save under a prefix inside it instead, e.g. `saver.save(state, '{final}/model', step=...)`."
        )


def save_failed(path: Path | None, error: BaseException) -> CheckpointError:
    """One short error for a failed save; Orbax's own messages can hold whole arrays."""
    if isinstance(error, CheckpointError):
        return error
    detail = str(error).splitlines()[0] if str(error) else ""
    detail = detail if len(detail) <= 200 else detail[:200] + "..."
    return CheckpointError(
        f"Saving checkpoint {path} failed ({type(error).__name__}: {detail}). Earlier checkpoints are intact; "
        "the partial one is hidden and removed by the next save."
    )
