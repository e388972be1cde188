"""How long jstate waits on an object store (gs://, s3://).

The storage clients retry a store that is down or frozen for minutes (gcsfs: 6 tries, backing
off to 32 s; one lookup on a store that accepts connections and never answers was measured
waiting over 290 s). Two limits bound the requests jstate makes (`_storage`), each set for a
block of code:

  timeout(seconds)    each request may take this long (a restore's reads: the whole restore
                      takes as long as the checkpoint is large)
  deadline(seconds)   every request must be over this long after the block began (finding a
                      checkpoint, preparing or committing a save: small, fixed work)

A request past either fails with `StoreTimeoutError`. Neither reaches what Orbax and tensorstore
ask of the store themselves: `within` bounds a whole call that only reads, whatever it waits on,
by running it in a thread that it stops waiting for.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from ..core.arguments import positive
from ..core.errors import StoreTimeoutError

T = TypeVar("T")

TIMED_OUT = (
    "{where}: the object store did not answer within {seconds:g} s. Check that it is reachable (its endpoint, "
    "the network, the credentials), or allow more time with a larger `timeout`; None waits as long as the "
    "storage client retries, which can be many minutes."
)


@dataclasses.dataclass(frozen=True)
class _Limits:
    request: float | None = None  # seconds one request may take
    deadline: float | None = None  # `time.monotonic()` by which every request must be over
    allowed: float | None = None  # the seconds that set `deadline`, for messages


# (A frozen dataclass: the default is never mutated.)
_limits: contextvars.ContextVar[_Limits] = contextvars.ContextVar("jstate_limits", default=_Limits())  # noqa: B039


@contextlib.contextmanager
def _set(limits: _Limits) -> Iterator[None]:
    token = _limits.set(limits)
    try:
        yield
    finally:
        _limits.reset(token)


def timeout(seconds: float | None) -> contextlib.AbstractContextManager[None]:
    """Within the block (in this thread), each request to an object store may take `seconds`
    (None: as long as the client retries)."""
    return _set(dataclasses.replace(_limits.get(), request=seconds))


def deadline(seconds: float | None) -> contextlib.AbstractContextManager[None]:
    """Within the block (in this thread), every request to an object store must be over
    `seconds` from now; an enclosing deadline that ends sooner still holds."""
    limits = _limits.get()
    if seconds is None:
        return _set(limits)
    end = time.monotonic() + seconds
    if limits.deadline is not None and limits.deadline <= end:
        return _set(limits)
    return _set(dataclasses.replace(limits, deadline=end, allowed=seconds))


def left() -> tuple[float | None, float | None]:
    """Seconds the next request may take (None: no limit; 0 or less: none left), and the
    limit that sets them, for a message."""
    limits = _limits.get()
    if limits.deadline is None:
        return limits.request, limits.request
    remaining = limits.deadline - time.monotonic()
    if limits.request is not None and limits.request < remaining:
        return limits.request, limits.request
    return remaining, limits.allowed


def bounded(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn`, to run in a worker thread under this thread's limits (threads do not inherit them)."""
    limits = _limits.get()

    def run(*args: Any) -> T:
        with _set(limits):
            return fn(*args)

    return run


_LATE = object()

# The longest wait taken as given, ~31 years: a longer one (``timeout=1e12``, meaning "forever")
# overflows the clocks it is handed to (`threading`'s waits, at ~292 years; the `datetime`
# deadline of Orbax's background saves, at the year 9999), so it is taken as this long.
LONGEST = 1e9


def seconds(value: Any, name: str = "timeout") -> float | None:
    """A user's `timeout`: None, or seconds > 0 (an infinite one is None: no limit; one over
    `LONGEST` is `LONGEST`).

    Raises:
      ArgumentError: `value` is no number > 0 (a bool, a string, 0, -1, NaN), naming `name`.

    >>> seconds(2), seconds(float("inf")), seconds(1e12)
    (2.0, None, 1000000000.0)
    >>> seconds("5", "latest_checkpoint(timeout=...)")
    Traceback (most recent call last):
    ...
    jstate.core.errors.ArgumentError: `latest_checkpoint(timeout=...)` takes seconds as a number > 0, or None for no
    limit; got str '5'.
    """
    if value is None:
        return None
    given = positive(value, name, "seconds as a number > 0, or None for no limit", finite=False)
    return None if given == math.inf else min(given, LONGEST)


def within(seconds: float | None, fn: Callable[[], T], where: str) -> T:
    """``fn()``, which only reads, given `seconds` in all: it runs in a thread of its own under
    that `deadline`, and past it the caller gets `StoreTimeoutError` naming `where`, while the
    thread, whose requests now fail at once, ends by itself. Its result is then dropped: so is
    one that came after a request of it timed out, since a lookup may read a timed-out request
    as "nothing there" (an older checkpoint would pass for the latest)."""
    if seconds is None:
        return fn()
    outcome: list = []  # [(value, error)], or [_LATE]
    done = threading.Event()

    def run() -> None:
        try:
            with deadline(seconds):
                end = _limits.get().deadline
                try:
                    outcome.append((fn(), None))
                except BaseException as e:  # handed to the caller, if it still waits
                    outcome.append((None, e))
                if time.monotonic() >= end:
                    outcome[-1] = _LATE
        finally:
            done.set()

    context = contextvars.copy_context()  # the caller's own limits hold in the thread too
    threading.Thread(target=context.run, args=(run,), name=f"jstate: {where}", daemon=True).start()
    if not done.wait(seconds) or outcome[-1] is _LATE:
        raise StoreTimeoutError(TIMED_OUT.format(where=where, seconds=seconds) + " Nothing was changed.")
    value, error = outcome[-1]
    if error is not None:
        raise error
    return value
