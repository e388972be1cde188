"""Saying how long checkpoint work takes: a `logging` record at the end of a long save, restore
or import, and a progress bar when the user asks for one.

Silent by default: a record is logged (logger ``jstate``, level INFO) only for work that took
more than `SLOW` seconds, and Python's logging shows INFO records only when the program asked
for them (``logging.basicConfig(level=logging.INFO)``).

A bar (asked for with ``progress=True``) is tqdm's, an optional dependency (``jstate[progress]``,
which brings ipywidgets for Jupyter's bar too), imported only then. Where it goes:

  Jupyter kernel           tqdm's notebook widget (tqdm's text bar if ipywidgets is missing)
  terminal (a tty)         tqdm's text bar, redrawn at least every `REFRESH` seconds
  file or pipe             no bar: nothing is redrawn with ``\\r`` into a log

and when the work is done, the bar gives way to one summary line (bytes, arrays, time,
throughput) in all three.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

from .table import human_bytes

log = logging.getLogger("jstate")

SLOW = 2.0  # seconds: work shorter than this is not logged
REFRESH = 0.5  # seconds: a shown bar is redrawn at least this often, bytes moving or not


class Progress:
    """Tracks one save, restore or import of `total` bytes in `arrays` arrays.

    Use it as a context manager and call `advance` as bytes are done (or give `watch` a way to
    count them); on a normal exit it logs one INFO record (bytes, arrays, seconds, throughput)
    if the work took more than `SLOW` seconds, and a bar, if shown, leaves that as one line.

    Args:
      what: what is done, for the record and the bar ("Saved", "Restored").
      where: the checkpoint's path.
      total: bytes the work moves.
      arrays: how many arrays.
      bar: show a progress bar (tqdm), on `stream`.
      stream: where the bar and its summary line go (None: ``sys.stderr`` at the time).

    Raises:
      ImportError: `bar` without tqdm installed (saying what to install).

    >>> with Progress("Saved", "ckpt/model", total=3 * 2**20, arrays=2) as p:
    ...     p.advance(3 * 2**20)
    >>> p.done
    3145728
    """

    def __init__(
        self, what: str, where: Any, total: int, arrays: int, *, bar: bool = False, stream: TextIO | None = None
    ):
        self.what, self.where, self.total, self.arrays = what, where, total, arrays
        self.done = 0
        self._closed = False
        self._lock = threading.Lock()  # the ticker's thread and the worker's both move the bar
        self._count: Callable[[], int] | None = None
        self._stream = (stream or sys.stderr) if bar else None
        self._bar = _bar(what, where, total, self._stream) if bar else None
        self._stop = threading.Event()
        if self._bar is not None:  # bars in a file or pipe are None: nothing to redraw
            threading.Thread(target=self._tick, name=f"jstate progress {where}", daemon=True).start()
        self._start = time.perf_counter()

    def advance(self, nbytes: int) -> None:
        """Count `nbytes` more as done (see the class example)."""
        with self._lock:
            self.done += nbytes
            if self._bar is not None:
                self._bar.update(max(min(self.done, self.total) - self._bar.n, 0))

    def watch(self, count: Callable[[], int]) -> None:
        """Have a shown bar follow `count()`, the bytes done so far as measured elsewhere (the
        files a library writes in its own threads), until the work reports its own `advance`.

        >>> p = Progress("Saved", "ckpt/model", total=100, arrays=1)
        >>> p.watch(lambda: 40); p.close()
        """
        self._count = count

    def _tick(self) -> None:
        """Redraw the bar every `REFRESH` seconds: the time and rate move even when no bytes do."""
        while not self._stop.wait(REFRESH):
            count = self._count
            measured = 0
            if count is not None:
                try:
                    measured = count()
                except Exception:  # files appearing and going while listed: the next tick counts again
                    measured = 0
            with self._lock:
                if self._closed:
                    return
                shown = max(self.done, min(measured, self.total))
                if shown > self._bar.n:
                    self._bar.update(shown - self._bar.n)
                else:
                    self._bar.refresh()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close(ok=kind is None)

    def close(self, ok: bool = True) -> None:
        """Close the bar and, if the work succeeded (`ok`), say so: one summary line where a bar
        was asked for, and an INFO record if the work was slow.

        Only the first call does anything; leaving the ``with`` block calls it.

        >>> p = Progress("Read", "ckpt/model", total=0, arrays=0)
        >>> p.close(); p.close()
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop.set()
            if self._bar is not None:
                self._bar.close()
        seconds = time.perf_counter() - self._start
        if ok and self._stream is not None:
            print(self.summary(seconds), file=sys.stdout if _in_notebook() else self._stream, flush=True)
        if ok and seconds > SLOW:
            log.info("%s", self.summary(seconds))

    def summary(self, seconds: float) -> str:
        """The work in one line: what, where, bytes, arrays, time and throughput.

        >>> Progress("Saved", "ckpt/model-7", total=3 * 2**30, arrays=12).summary(2.0)
        'Saved ckpt/model-7: 3.0 GiB in 12 arrays in 2.0 s (1.5 GiB/s)'
        """
        rate = human_bytes(self.total / seconds) if seconds > 0 else human_bytes(self.total)
        return (
            f"{self.what} {self.where}: {human_bytes(self.total)} in {self.arrays} arrays in {seconds:.1f} s ({rate}/s)"
        )


def _in_notebook() -> bool:
    """Whether this is a Jupyter kernel (as tqdm's `autonotebook` judges it), without importing IPython."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _bar(what: str, where: Any, total: int, stream: TextIO) -> Any:
    """A tqdm bar for the work, or None where it would only write redraws into a file or pipe."""
    try:
        from tqdm.std import tqdm
    except ImportError:
        raise ImportError(
            "A progress bar (`progress=True`) needs tqdm: `pip install jstate[progress]` (or `pip install tqdm`)."
        ) from None
    verb = {"Saved": "Saving", "Restored": "Restoring", "Read": "Reading"}.get(what, what)
    options = dict(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"{verb} {where}", leave=False)
    if _in_notebook():
        # Not `tqdm.auto`: without ipywidgets it warns ("IProgress not found") on import. The
        # text bar then works too: Jupyter draws `\r` redraws in place.
        from tqdm import notebook

        if notebook.IProgress is not None:
            return notebook.tqdm(**options)
        return tqdm(file=stream, **options)
    if not getattr(stream, "isatty", lambda: False)():
        return None
    return tqdm(file=stream, mininterval=0.1, **options)
