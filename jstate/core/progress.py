"""Saying how long checkpoint work takes: a `logging` record at the end of a long save, restore
or import, and a progress bar when the user asks for one.

Silent by default: a record is logged (logger ``jstate``, level INFO) only for work that took
more than `SLOW` seconds, and Python's logging shows INFO records only when the program asked
for them (``logging.basicConfig(level=logging.INFO)``). The bar is tqdm's, which renders in
terminals and in Jupyter (``tqdm.auto``); it is an optional dependency (``jstate[progress]``),
imported only when a bar is asked for.
"""

from __future__ import annotations

import logging
import time
from types import TracebackType
from typing import Any

from .table import human_bytes

log = logging.getLogger("jstate")

SLOW = 2.0  # seconds: work shorter than this is not logged


class Progress:
    """Tracks one save, restore or import of `total` bytes in `arrays` arrays.

    Use it as a context manager and call `advance` as bytes are done; on a normal exit it logs
    one INFO record (bytes, arrays, seconds, throughput) if the work took more than `SLOW`
    seconds, and closes the bar.

    Args:
      what: what is done, for the record and the bar ("Saved", "Restored").
      where: the checkpoint's path.
      total: bytes the work moves.
      arrays: how many arrays.
      bar: show a tqdm progress bar.

    >>> with Progress("Saved", "ckpt/model", total=3 * 2**20, arrays=2) as p:
    ...     p.advance(3 * 2**20)
    >>> p.done
    3145728
    """

    def __init__(self, what: str, where: Any, total: int, arrays: int, *, bar: bool = False):
        self.what, self.where, self.total, self.arrays = what, where, total, arrays
        self.done = 0
        self._closed = False
        self._bar = _bar(what, where, total) if bar else None
        self._start = time.perf_counter()

    def advance(self, nbytes: int) -> None:
        """Count `nbytes` more as done (see the class example)."""
        self.done += nbytes
        if self._bar is not None:
            self._bar.update(nbytes)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close(ok=kind is None)

    def close(self, ok: bool = True) -> None:
        """Close the bar and, if the work succeeded (`ok`) and was slow, log it.

        Only the first call does anything; leaving the ``with`` block calls it.

        >>> p = Progress("Read", "ckpt/model", total=0, arrays=0)
        >>> p.close(); p.close()
        """
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        seconds = time.perf_counter() - self._start
        if ok and seconds > SLOW:
            log.info(
                "%s %s: %s in %d arrays in %.1f s (%s/s)",
                self.what,
                self.where,
                human_bytes(self.total),
                self.arrays,
                seconds,
                human_bytes(self.total / seconds),
            )


def _bar(what: str, where: Any, total: int) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError(
            "A progress bar (`progress=True`) needs tqdm: `pip install jstate[progress]` (or `pip install tqdm`)."
        ) from None
    verb = {"Saved": "Saving", "Restored": "Restoring", "Read": "Reading"}.get(what, what)
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"{verb} {where}", leave=False)
