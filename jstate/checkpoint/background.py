"""Saves finishing in a background thread, and the interpreter finishing them at exit.

A `Writer` (`writer`) with ``blocking=False`` hands the rest of a save to a `Background`; the
writer is `unfinished` until its `Writer.wait` has reported the result. At exit the interpreter
finishes every unfinished save (a Ctrl-C abandons it, and says so), before `concurrent.futures`
stops taking work, which Orbax needs to finish.
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401  (registers its exit hook, which must come before ours)
import logging
import sys
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

# Writers with a background save in flight (each with a `pending` save and `finish_at_exit`): the
# interpreter finishes them at exit, before concurrent.futures stops taking work (Orbax needs it). threading's own exit hooks run first,
# newest first, and this one is registered after concurrent.futures'.
unfinished: weakref.WeakSet = weakref.WeakSet()


def _finish_at_exit() -> None:
    for writer in list(unfinished):
        pending = writer.pending
        try:
            if pending is not None and not pending.done.wait(1.0):  # a long one: say why the exit waits
                print(f"jstate: finishing the background save of {pending.path} (Ctrl-C abandons it)", file=sys.stderr)
            writer.finish_at_exit()
        except KeyboardInterrupt:  # a second Ctrl-C: give up on it, say so, and let the exit go on
            where = pending.path if pending is not None else "a checkpoint"
            print(f"jstate: abandoned the background save of {where}; earlier checkpoints are intact.", file=sys.stderr)


getattr(threading, "_register_atexit", atexit.register)(_finish_at_exit)


class Background:
    """One save finishing in a background thread. Completion is an Event, not `Thread.join`:
    a join interrupted by Ctrl-C can return at once ever after (CPython gh-90882), which would
    let the interpreter exit mid-save. The thread makes itself its writer's pending save: a
    Ctrl-C landing in `Thread.start` (after the thread exists) cannot leave the save untracked,
    neither waited for by `wait` nor finished at exit.

    Args:
      track: the writer's, called first in the thread with this save (it makes it the writer's
        pending save and adds the writer to `unfinished`).
      path: the checkpoint being saved, for messages.
      finish: the rest of the save.
      failed: the clean-up after `finish` raised (the error is kept in `error`).

    >>> done = Background(lambda save: None, Path("ckpt/w"), lambda: None, lambda: None).done
    >>> done.wait(60.0)
    True
    """

    def __init__(
        self,
        track: Callable[[Background], None],
        path: Path,
        finish: Callable[[], None],
        failed: Callable[[], None],
    ):
        self.path = path
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._track, self._tracked = track, threading.Event()
        self._finish, self._failed = finish, failed
        threading.Thread(target=self._run, name=f"jstate save {path}", daemon=True).start()
        self._tracked.wait()

    def _run(self) -> None:
        self._track(self)
        self._tracked.set()
        try:
            self._finish()
        except BaseException as e:  # reported by `Writer.wait`
            self.error = e
            self._failed()
        finally:
            self.done.set()


def logged_to_stderr(logger: logging.Logger, level: int) -> bool:
    """Whether a record of `level` on `logger` reaches stderr: through a handler of it or of an
    ancestor it propagates to (importing Orbax calls `logging.basicConfig`), or through
    logging's last resort when there is no handler at all.

    >>> logged_to_stderr(logging.getLogger("jstate.doctest"), logging.DEBUG)  # not enabled
    False
    """
    if not logger.isEnabledFor(level):
        return False
    handlers = []
    node: logging.Logger | None = logger
    while node is not None:
        handlers += node.handlers
        node = node.parent if node.propagate else None
    if not handlers:
        return logging.lastResort is not None and level >= logging.lastResort.level
    return any(
        isinstance(h, logging.StreamHandler) and h.stream in (sys.stderr, sys.__stderr__) and level >= h.level
        for h in handlers
    )
