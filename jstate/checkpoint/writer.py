"""Writing one jstate checkpoint under the commit rule of `formats.commit`: the arrays through Orbax
into a directory of the save's own, their checksums, then the manifest; in the caller's thread
or in the background (`background`).

With several JAX processes, every process calls `Writer.save` for the same checkpoint on a
shared directory: process 0 prepares and commits; every process writes its shards (through
Orbax) and their checksums, and barriers keep them in step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax

from ..core import progress as _progress
from ..core import tree as _tree
from ..core.errors import CheckpointError, StoreError
from ..core.untrusted import parse_json
from ..formats import commit as _commit
from ..formats import integrity as _integrity
from ..formats import orbax as _orbax
from ..formats import pack as _pack
from ..formats.manifest import LATEST_TIME, ORBAX_LAYOUT, Manifest, Variable
from ..storage import deadlines as _limits
from ..storage import store as _storage
from ..storage import tokens as _tokens
from . import background as _background
from . import directory as _directory

log = logging.getLogger("jstate")

# Orbax numbers each async save with a process-wide operation id that its background threads
# wait on: two saves started at once from different threads can take the same id, and one
# then waits (5 minutes) for a signal that never comes. Starting saves one at a time keeps
# their ids apart; the writing itself still overlaps.
_orbax_start = threading.Lock()


class Writer:
    """Writes jstate checkpoints one at a time; a background save's error is kept for `wait`.

    Args:
      compression: zstd-compress arrays.
      timeout: seconds that processes of a multi-process save wait for each other.
      pack: variables of at most this many bytes are packed together (`formats.pack`); 0 packs none.
      layout: "jstate", or "orbax": the arrays in the tree a save's `nest` gives, in the fixed
        directory a CheckpointManager reads (`orbax_layout`), each checkpoint written once.

    >>> writer = Writer(compression=False, timeout=60.0)
    >>> writer.save({"w": jnp.ones(3)}, Path("ckpt/model-1"), 1, "model", blocking=False)
    >>> writer.wait()
    >>> jstate.list_variables("ckpt/model-1")
    [('w', (3,), dtype('float32'))]
    """

    def __init__(self, compression: bool, timeout: float, pack: int = _pack.THRESHOLD, layout: str = "jstate"):
        self._compression = compression
        self._timeout = timeout
        self._pack = pack
        self._layout = layout
        self._orbax: _orbax.Writer | None = None
        self._saves = 0
        self._pending: _background.Background | None = None

    def save(
        self,
        arrays: dict[str, jax.Array],
        final: Path,
        step: int | None,
        prefix: str | None,
        *,
        blocking: bool,
        committed: Callable[[Manifest], None] = lambda manifest: None,
        stamp: Callable[[Manifest], Manifest] = lambda manifest: manifest,
        progress: bool = False,
        nest: Callable[[dict[str, jax.Array]], Any] | None = None,
    ) -> None:
        """Write `arrays` as the checkpoint `final`; call `committed` (process 0) once it is.

        Returns once the values are copied off the device. With ``blocking=False`` the rest
        happens in a background thread, which `wait` (or the interpreter's exit) finishes.
        A save that takes over 2 s is logged at INFO; `progress` shows a bar as its arrays are
        packed and written.

        Args:
          arrays: the arrays to save, by checkpoint name.
          final: the checkpoint's path.
          step: its step, if any.
          prefix: the name the Saver was given, when it saved with a step (for retention).
          blocking: finish before returning (False: in a background thread).
          committed: called with the manifest once the checkpoint is committed (process 0 only).
          stamp: called with the manifest about to be committed (its time and order set);
            returns it with what the caller records in it (retention's decision).
          progress: show a progress bar.
          nest: in the Orbax layout, the tree Orbax writes, from the arrays it stores by name
            (None: nested dicts split at "/").

        Raises:
          CheckpointError: the save failed (or an earlier background one did); earlier
            checkpoints are intact.

        >>> Writer(False, 60.0).save({"w": jnp.ones(3)}, Path("ckpt/w"), None, None, blocking=True)
        >>> jstate.open_checkpoint("ckpt/w").entries["w"].shape
        (3,)
        """
        with _limits.timeout(self._timeout):  # no request to an object store waits longer
            self._save(arrays, final, step, prefix, blocking, committed, stamp, progress, nest)

    def _save(self, arrays, final, step, prefix, blocking, committed, stamp, progress, nest) -> None:
        self.wait()
        self._saves += 1
        name = f"jstate-save-{self._saves}-{final}"
        barrier = functools.partial(_orbax.barrier, name, self._timeout)
        _orbax.check_store(final)  # before anything is written
        token, created = None, False
        total = sum(a.nbytes for a in arrays.values())
        tracker = _progress.Progress("Saved", final, total, len(arrays), bar=progress)
        try:
            # Known before `prepare` makes it: an interrupt may land right after.
            with _limits.deadline(self._timeout):
                created = jax.process_index() == 0 and not _storage.exists(final)
                if self._layout == ORBAX_LAYOUT and not created and jax.process_index() == 0 and _commit.is_ours(final):
                    # Its arrays' directory has no token in its name: what a dead save left there goes
                    # now, while no live marker of ours makes it look like a save in flight.
                    _commit.clean_checkpoint(final)
            token = _orbax.share(f"{name}:token", _tokens.token, self._timeout)
            _tokens.begin(token)
            if jax.process_index() == 0:
                with _limits.deadline(self._timeout):  # all of it: each request alone may be slow but not stuck
                    _commit.prepare(final, token)
            barrier("start")
            # PRNG keys are stored as their key data, with the implementation in the manifest.
            keys = {n: str(jax.random.key_impl(a)) for n, a in arrays.items() if _is_key(a)}
            arrays = {n: jax.random.key_data(a) if n in keys else a for n, a in arrays.items()}
            # Orbax cannot store zero-size arrays; their shape and dtype in the manifest are all
            # of them. Small arrays are packed (`_pack`), the others stored under their names.
            stored = {n: a for n, a in arrays.items() if a.size}
            small = {n: a for n, a in stored.items() if _pack.packable(a, self._pack)}
            large = {n: a for n, a in stored.items() if n not in small}
            packed, slots = _pack.pack(small) if small else ({}, {})
            digests = {  # each packed variable checksummed alone, as stored
                n: _integrity.whole_digest(_pack.unpack(packed[slot.array], slot, tuple(arrays[n].shape)))
                for n, slot in slots.items()
            }
            if self._layout == ORBAX_LAYOUT:
                tree = (nest or _tree.unflatten)(large)
                data = final / _commit.ORBAX_ARRAYS
                _check_holds(tree, large, final)
            else:
                tree = large | ({_pack.KEY: packed} if packed else {})
                data = _commit.data_dir(final, token)
            if self._orbax is None:
                self._orbax = _orbax.Writer(self._compression, self._timeout)
            if not _storage.store_for(final).round_trips:  # (on an object store, a listing each time: not for a bar)
                tracker.watch(functools.partial(_written, final, data.name))
            if large or packed:  # (not the tree's truth: a user's pytree node may define its own)
                with _orbax_start:
                    self._orbax.save(data, tree)
            # Taken while Orbax writes in its own threads (crc32c releases the GIL), from the
            # arrays themselves, which the caller holds until `save` returns: the values at call time.
            digests |= {n: _integrity.array_digests(a) for n, a in large.items()}
            # The manifest but for what only the end of the save knows: the files written, the
            # time of the commit, and the digests of the other processes' shards.
            draft = Manifest(
                {
                    n: Variable(tuple(a.shape), a.dtype, digests.get(n, {}), keys.get(n), slots.get(n))
                    for n, a in arrays.items()
                },
                step,
                arrays=data.name,
                prefix=prefix,
                packed={a: Variable(v.shape, v.dtype) for a, v in packed.items()},
                layout=self._layout,
            )
            finish = functools.partial(self._finish, final, data, token, draft, barrier, committed, stamp, tracker)
            if blocking:
                finish()
        except BaseException as e:
            tracker.close(ok=False)
            self._failed(final, token, created)
            if isinstance(e, Exception):
                raise save_failed(final, e) from e
            raise  # KeyboardInterrupt, SystemExit: as they are, after cleaning up
        if not blocking:  # in a thread of its own, which the request timeout does not reach by itself
            failed = functools.partial(self._failed, final, token, created)
            _background.Background(
                self._track, final, functools.partial(self._bounded, finish), functools.partial(self._bounded, failed)
            )

    def _bounded(self, work: Callable[[], None]) -> None:
        with _limits.timeout(self._timeout):
            work()

    def _track(self, background: _background.Background) -> None:
        self._pending = background
        _background.unfinished.add(self)

    @property
    def pending(self) -> _background.Background | None:
        """The background save in flight, or done but not yet waited for (None if none)."""
        return self._pending

    def _finish(self, final, data, token, draft, barrier, committed, stamp, tracker) -> None:
        try:
            self._write_and_commit(final, data, token, draft, barrier, committed, stamp, tracker)
        except BaseException:
            tracker.close(ok=False)
            raise
        tracker.close()

    def _write_and_commit(self, final, data, token, draft, barrier, committed, stamp, tracker):
        if self._orbax is not None:
            self._orbax.wait()
        tracker.advance(tracker.total - tracker.done)
        process = jax.process_index()
        if jax.process_count() > 1:
            digests = {n: v.digests for n, v in draft.variables.items() if v.digests}
            _storage.write_bytes(final / f".digests-{process}.{token}.tmp", json.dumps(digests).encode())
        barrier("written")
        if process == 0:
            with _limits.deadline(self._timeout):  # from here: the commit and retention, metadata only
                self._publish(final, data, token, draft, committed, stamp)
        barrier("committed")  # every process sees the new checkpoint once `save` returns
        _tokens.end(token)

    def _publish(self, final, data, token, draft, committed, stamp) -> None:
        """Process 0's part once every process has written: the manifest (the commit), then retention."""
        others: dict[str, dict[str, int]] = {}  # the digests of regions only other processes hold
        for other in range(1, jax.process_count()):
            part = final / f".digests-{other}.{token}.tmp"
            for n, regions in parse_json(_storage.read_bytes(part)).items():
                others.setdefault(n, {}).update(regions)
            _storage.unlink(part)
        # Only variables with regions elsewhere are made again: a one-process save makes each once.
        variables = draft.variables | {
            n: dataclasses.replace(draft.variables[n], digests=draft.variables[n].digests | regions)
            for n, regions in others.items()
        }
        files = {}
        if _storage.exists(data):
            # The flush waits on the disk, the file checksums on the CPU: both at once.
            with ThreadPoolExecutor(max_workers=1) as flusher:
                synced = flusher.submit(_storage.sync_tree, data)
                files = _integrity.file_records(data, _checksummed(data))
                synced.result()
        created = time.time()
        manifest = dataclasses.replace(
            draft, variables=variables, created=created, order=_order_after(final.parent, created), files=files
        )
        manifest = stamp(manifest)
        _commit.commit(final, manifest, token)
        committed(manifest)

    def _failed(self, final: Path, token: str | None, created: bool) -> None:
        """After a failed or interrupted save: its files are a dead writer's (removed now, or
        by the next save), `final` too if this save `created` it, and Orbax's writer, which
        keeps an async error, is replaced."""
        if self._orbax is not None:
            with contextlib.suppress(BaseException):  # let Orbax's own thread stop writing first
                self._orbax.wait()
        if token is not None:
            _tokens.end(token)
        self._orbax = None
        if jax.process_index() == 0:
            with contextlib.suppress(Exception), _limits.deadline(self._timeout):
                _commit.clean_checkpoint(final)
                if created:  # stopped before Orbax wrote into it: nothing else removes it
                    _storage.remove_empty_dir(final)

    def wait(self) -> None:
        """Block until a background save is on disk; re-raise its error, if any.

        Interrupted (Ctrl-C), the save goes on, and the interpreter finishes it at exit.

        Raises:
          CheckpointError: the background save failed or was interrupted.

        >>> writer = Writer(False, 60.0)
        >>> writer.wait()  # no save in flight: returns at once
        """
        pending = self._pending
        if pending is None:
            return
        pending.done.wait()
        self._pending = None
        _background.unfinished.discard(self)
        if pending.error is not None:
            if isinstance(pending.error, Exception):
                raise save_failed(pending.path, pending.error) from pending.error
            raise CheckpointError(f"Saving checkpoint {pending.path} was interrupted; earlier checkpoints are intact.")

    def join(self) -> None:
        """Block until a background save is done, keeping its error for `wait` (a restore waits
        for a save in flight, and leaves reporting its failure to the save's own caller).

        >>> writer = Writer(False, 60.0)
        >>> writer.save({"w": jnp.ones(3)}, Path("ckpt/w"), None, None, blocking=False)
        >>> writer.join(); writer.wait()
        """
        if self._pending is not None:
            self._pending.done.wait()

    def finish_at_exit(self) -> None:
        """Finish a background save as the interpreter exits; a failure is one line on stderr
        (and a record of the `jstate` logger).

        >>> Writer(False, 60.0).finish_at_exit()  # nothing in flight: nothing to say
        """
        try:
            self.wait()
        except CheckpointError as e:
            log.error("%s", e)
            if not _background.logged_to_stderr(log, logging.ERROR):  # one line, not the same twice
                print(f"jstate: {e}", file=sys.stderr)


def _checksummed(data: Path) -> Callable[[str], bool]:
    """Which files of a save's arrays get a CRC32C in the manifest: all of them locally; on an
    object store only the metadata, since hashing the data would download it all again (the
    array digests already cover every byte of it)."""
    if _storage.store_for(data).round_trips:
        return lambda rel: not _orbax.is_data_file(rel)
    return lambda rel: True


def _written(final: Path, data: str) -> int:
    """The bytes Orbax has written so far for a save's arrays `data` in checkpoint `final`
    (under Orbax's temporary name while it writes): how far a save is, for its bar."""
    return sum(f.size for f in _storage.files(final, data).values())


def _order_after(directory: Path, created: float) -> float:
    """The commit order of a checkpoint committed at `created` into `directory`: after every
    checkpoint there, whatever this machine's clock says (set back, a restarted job on another
    machine), so that the checkpoint just saved is the latest. Where the store dates its
    objects by one clock for all writers (an object store, whose listings rank checkpoints),
    the store's clock orders them and nothing is read here."""
    if _storage.store_for(directory).round_trips:
        return created
    newest = _directory.newest_order(directory)  # at most `LATEST_TIME`: a manifest recording more is not read
    # (At `LATEST_TIME` itself, a tie, which `created` breaks: the order must stay one the reader takes.)
    return created if newest < created else min(math.nextafter(newest, math.inf), LATEST_TIME)


def _check_holds(tree: Any, large: dict[str, jax.Array], final: Path) -> None:
    """Raise unless the Orbax layout's `tree` holds every array to store, and at least one: the
    manifest lists them all, and a checkpoint whose item is missing or short never restores.
    (`orbax_layout.nesting` refuses what the layout cannot hold before a save begins; this keeps
    a tree that lost arrays anyway from being committed, and retention from acting on it.)"""
    held = len(jax.tree_util.tree_leaves(tree))
    if not large or held != len(large):
        raise CheckpointError(
            f"Saving checkpoint {final} failed: the Orbax layout's tree holds {held} of the {len(large)} "
            "arrays to store (a jstate bug; please report it). Earlier checkpoints are intact, and nothing "
            "of this save is listed."
        )


def _is_key(array: jax.Array) -> bool:
    return jax.dtypes.issubdtype(array.dtype, jax.dtypes.prng_key)


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def save_failed(path: Path | None, error: BaseException) -> CheckpointError:
    """One short error for a failed save that keeps the OS's reason whole; Orbax's own messages
    can hold whole arrays, so only their first line is kept.

    Args:
      path: the checkpoint that was being saved.
      error: what the save raised.

    Returns:
      A CheckpointError (a `StoreError` where a store's error caused it, so that
      ``except TimeoutError`` still works), or `error` itself if it is a CheckpointError already.

    >>> save_failed(Path("ckpt/model"), OSError(28, "No space left on device"))
    CheckpointError('Saving checkpoint ckpt/model failed (OSError: [Errno 28] No space left on device). Earlier checkpoints are intact, and nothing of this save is listed.')
    """
    if isinstance(error, CheckpointError) and not isinstance(error, StoreError):
        return error  # (a store's error says what failed, not that the save did: kept whole below)
    os_error = next((e for e in _causes(error) if isinstance(e, OSError)), None)
    if os_error is not None:
        detail = f"{type(os_error).__name__}: {str(os_error).rstrip('.')}"
    else:
        detail = str(error).splitlines()[0] if str(error) else ""
        # Long ones are cut in the middle: TensorStore's end with the OS's reason, which must stay
        # whole ("... No space left on device [os_error_code='28']"). Some put the array's whole
        # spec between the two: then the reason is spelled out from the error code.
        if len(detail) > 300:
            detail = detail[:200] + " ... " + detail[-100:]
        code = re.search(r"os_error_code='(\d+)'", str(error))
        if code and os.strerror(int(code.group(1))) not in detail:
            detail = f"{detail[:200]} ... {os.strerror(int(code.group(1)))} [os_error_code={code.group(1)}]"
        detail = f"{type(error).__name__}: {detail}"
    kind = type(os_error) if isinstance(os_error, StoreError) else CheckpointError  # `except TimeoutError` still works
    return kind(
        f"Saving checkpoint {path} failed ({detail}). Earlier checkpoints are intact, and nothing of this "
        "save is listed."
    )
