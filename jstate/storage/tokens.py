"""Writer tokens: the names that tell a live writer's files from a dead one's.

Every write jstate makes (a save, a deletion, one atomic file) takes a token no other write, in
any process on any host, uses, ``<time>_<pid>_<random>_<host>``, and puts it in the names of what
it writes: ``.<name>.<token>.tmp`` for a temporary file, a marker or a taken manifest, and
``<prefix><token>`` for a save's arrays. Whoever cleans up leftovers reads the token back out of
a name (`token_in`) and removes the file only once its writer is gone (`alive`).

Nothing here knows what a checkpoint looks like; that is `formats.commit`'s.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator

# Other hosts' leftovers are removed only when they are this old: a live writer on another
# host cannot be asked whether it is alive.
STALE_AFTER = 24 * 3600.0
_HOST = socket.gethostname().replace("_", "-").replace(".", "-")[:32] or "host"  # no "_" or "." in tokens
# Tokens of this process's writes in flight: its other tokens are leftovers of its own
# interrupted or failed saves.
_active: set[str] = set()
_mine: set[str] = set()  # every token this process began, in flight or not
_active_lock = threading.Lock()


def token() -> str:
    """A name no other write, in any process on any host, uses: ``<time>_<pid>_<random>_<host>``.

    >>> len(token().split("_"))
    4
    """
    return f"{int(time.time()):x}_{os.getpid()}_{secrets.token_hex(4)}_{_HOST}"


def token_in(name: str, prefix: str | None = None) -> str | None:
    """The writer token in file name `name`, or None if `name` holds none.

    Valid forms:
      ``.<anything>.<token>.tmp``   a temporary file, a marker, a taken manifest (no `prefix`)
      ``<prefix><token>[.<suffix>]`` a directory a write names after its token (with `prefix`);
                                    a suffix another library adds while it writes is not part
                                    of the token (tokens hold no ".")

    >>> token_in(".jstate.json.65f0_12_ab12cd34_host.tmp"), token_in("arrays-65f0_12_ab12cd34_host.x", "arrays-")
    ('65f0_12_ab12cd34_host', '65f0_12_ab12cd34_host')
    >>> token_in("model-1") is None
    True
    """
    if prefix is not None and name.startswith(prefix):
        # (Read as part of the host, a suffix would make a killed save's files another host's, kept a day.)
        return name[len(prefix) :].split(".", 1)[0]
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    parts = name[:-4].rsplit(".", 1)
    return parts[1] if len(parts) == 2 else None


def begin(name: str) -> None:
    """Mark token `name` as a write in flight of this process, until `end`."""
    with _active_lock:
        _active.add(name)
        _mine.add(name)


def end(name: str) -> None:
    """Mark token `name` as no longer in flight (see `begin`)."""
    with _active_lock:
        _active.discard(name)


@contextlib.contextmanager
def writing(name: str) -> Iterator[None]:
    """Mark token `name` as a write in flight of this process while the block runs.

    >>> name = token()
    >>> with writing(name):
    ...     alive(name)
    True
    >>> alive(name)
    False
    """
    begin(name)
    try:
        yield
    finally:
        end(name)


def alive(name: str, now: float | None = None, *, shared: bool = False) -> bool:
    """Whether the writer of token `name` may still be writing.

    This process's tokens are alive while `writing`; another process on this host while it
    runs; another host's until `STALE_AFTER` seconds after the token was made. A name that is
    no token is alive: what jstate does not recognize, it never deletes.

    With `shared` (files on a store that processes of many machines write: `Store.shared`),
    only this process's own tokens are judged by its bookkeeping; every other writer's by age
    alone: a pid names a process on one machine, and host names can repeat across machines
    (containers), so a pid looked up here could be anyone's.

    Args:
      name: a token (`token`), or any name.
      now: the time to judge ages at (seconds since the epoch); default: now.
      shared: whether the files are on a store that many machines write.

    Returns:
      False only for a token whose writer is known to be gone.

    >>> alive("not-a-token")
    True
    """
    try:
        started, pid, _, host = name.split("_", 3)
        started, pid = int(started, 16), int(pid)
    except ValueError:
        return True
    if shared and name in _mine:  # (another machine's writer may have our pid and host name)
        with _active_lock:
            return name in _active
    if shared or host != _HOST:
        return (time.time() if now is None else now) - started < STALE_AFTER
    if pid == os.getpid():
        with _active_lock:
            return name in _active
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # a process we may not signal is alive
    return True
