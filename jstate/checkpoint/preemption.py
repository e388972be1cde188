"""`Preemption`: save at the next step boundary when the job is being preempted, then stop.

Spot GPUs, TPU pods and batch schedulers (Kubernetes, Slurm) send SIGTERM and kill the job a grace
period later. One object owns that moment for a training loop: it catches the notice, makes every
process of the job save the same step, and bounds how long the notice is held back.

Where the notice comes from, chosen once when the ``with`` block starts:

  one process, no ``jax.distributed``    jstate's handler for `signals`
  ``jax.distributed`` with JAX's         JAX's own SIGTERM handler (installed by
  preemption service (the default)       ``jax.distributed.initialize``); every process saves
                                         at ``multihost_utils.reached_preemption_sync_point``
  ``jax.distributed`` without it         jstate's handler; the processes agree on the step
                                         through the coordinator's key-value store
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Iterable
from typing import Any

import jax

from ..core.arguments import positive
from ..core.errors import ArgumentError, CheckpointError
from ..storage.deadlines import LONGEST
from .saver import Saver

log = logging.getLogger("jstate")

# Keys of one `with` block in the coordinator's key-value store: blocks are entered in the same
# order on every process of an SPMD job, so a per-process count names the same block everywhere.
_blocks = itertools.count()

_NOT_MAIN_THREAD = "`jstate.Preemption` must be entered in the main thread: Python runs signal handlers there only."
_ONLY_SIGTERM = (
    "`jstate.Preemption(signals={signals})`: JAX's preemption service is on (``jax.distributed.initialize`` "
    "enables it), and it listens for SIGTERM only. Leave `signals` at its default, or disable the service "
    "with `jax.config.update('jax_enable_preemption_service', False)` before `jax.distributed.initialize` "
    "(the processes then agree on the step through the coordinator)."
)


class Preemption:
    """Save once, at the next step boundary after a preemption notice, and tell the loop to stop.

    A context manager around a training loop. A notice (SIGTERM by default, or JAX's preemption
    notice where ``jax.distributed`` runs its preemption service) is not acted on at once: the
    loop's next call of `save_if_preempted` saves the state it is given (blocking: committed when
    it returns) and returns the checkpoint's path, and the loop breaks. In a job of several
    processes every process saves the same step, wherever the signal landed: JAX's
    ``reached_preemption_sync_point`` names it, or, with JAX's service off, the processes agree
    on it through the coordinator's key-value store.

    The notice is held back at most `grace` seconds: if the save has not returned by then (a step
    or a save that hangs), the signal takes the effect it would have had without jstate (by
    default the process ends; a checkpoint cut short is never listed). A second signal is never
    caught: it takes that effect at once. A notice the loop never acted on takes it when the
    ``with`` block ends. Leaving the block restores the handlers it replaced.

    `save_if_preempted` must be called at every step, with the same step numbers on every process
    (JAX's sync point needs each step; the agreement is on a step number). Without a notice it
    costs a flag check, or one local call to JAX's sync manager; with JAX's service off, a thread
    asks the coordinator for notices five times a second.

    Under JAX's service, JAX's handler (installed by ``jax.distributed.initialize``, whether or not
    a `Preemption` is used) catches SIGTERM and tells every process within about a second; the
    grace runs from the sync point, where jstate gives SIGTERM its default action, so that a
    second one ends the process (JAX's handler is not put back: its notice has been given).

    A method of its own, rather than a flag the loop reads, so that the step everyone saves, the
    save and the grace period are decided in one place; the loop only breaks.

    Args:
      saver: the Saver that saves; its `var_list` and retention apply.
      path: where to save: ``<path>-<step>``, as `Saver.save` with a step.
      grace: seconds a notice is held back at most (less than the scheduler's own grace period,
        after which it kills the job: 30 s on GCE spot VMs and by default on Kubernetes).
      signals: the signals that are a notice (SIGTERM; Slurm's ``--signal`` may choose another).

    Raises:
      ArgumentError: for a `saver` that is no Saver, a `grace` that is not a finite positive
        number of seconds (one over `deadlines.LONGEST`, ~31 years, is taken as that long), an
        empty `signals` or one that cannot be caught.
      ValueError: other `signals` than SIGTERM while JAX's preemption service is on.
      RuntimeError: when entered outside the main thread, or entered twice.

    >>> import os, signal
    >>> saver = jstate.Saver(max_to_keep=3)
    >>> with jstate.Preemption(saver, "ckpt/model", grace=20) as preemption:
    ...     for step in range(1000):
    ...         state = state  # ... one training step ...
    ...         if step == 3:
    ...             os.kill(os.getpid(), signal.SIGTERM)  # what the scheduler sends
    ...         if preemption.save_if_preempted(state, step):
    ...             break
    >>> step, jstate.latest_checkpoint("ckpt")
    (3, 'ckpt/model-3')
    """

    def __init__(
        self,
        saver: Saver,
        path: str | os.PathLike,
        *,
        grace: float,
        signals: Iterable[int] = (signal.SIGTERM,),
    ):
        if not isinstance(saver, Saver):
            raise ArgumentError(f"`jstate.Preemption` takes a `jstate.Saver` first, got {type(saver).__name__}.")
        grace = positive(grace, "jstate.Preemption(grace=...)", "a positive number of seconds (finite)")
        self._signals = tuple(signal.Signals(s) for s in signals)
        if not self._signals:
            raise ArgumentError("`jstate.Preemption(signals=...)` needs at least one signal, e.g. `signal.SIGTERM`.")
        uncatchable = [s.name for s in self._signals if s in (signal.SIGKILL, signal.SIGSTOP)]
        if uncatchable:
            raise ArgumentError(f"`jstate.Preemption(signals=...)`: {uncatchable[0]} cannot be caught; use SIGTERM.")
        # The watchdog's `threading.Timer` overflows past `threading.TIMEOUT_MAX` (~292 years) and
        # its thread dies, leaving a hung save uncut: a longer grace (meaning "forever") is `LONGEST`.
        self._saver, self._path, self._grace = saver, path, min(grace, LONGEST)
        self._previous: dict[signal.Signals, Any] = {}
        self._entered = False
        self._mode = "local"
        self._notice: tuple[signal.Signals, float] | None = None  # (signal, time.monotonic()) once noticed
        self._agreement: _Agreement | None = None  # coordinator mode
        self._saved: str | None = None
        self._watchdog: threading.Timer | None = None
        self._settling, self._settled = threading.Lock(), False  # the notice saved for, or delivered

    # -- the block -----------------------------------------------------------------------------
    def __enter__(self) -> Preemption:
        if self._entered:
            raise RuntimeError("This `jstate.Preemption` is already in use: make one per `with` block.")
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(_NOT_MAIN_THREAD)
        runtime = _distributed()
        if runtime is not None and runtime.preemption_sync_manager is not None:
            if self._signals != (signal.SIGTERM,):
                raise ValueError(_ONLY_SIGTERM.format(signals=[s.name for s in self._signals]))
            self._mode = "jax"  # JAX's C++ handler owns SIGTERM: replacing it would blind its service
        else:
            self._mode = "local" if runtime is None else "coordinator"
            for sig in self._signals:
                previous = signal.getsignal(sig)
                if previous is None:  # set outside Python: `signal.signal` could not put it back
                    raise RuntimeError(
                        f"{sig.name} has a handler installed outside Python (by a C extension), which jstate "
                        f"could not restore afterwards. Pass other `signals=`, or leave {sig.name} to that handler."
                    )
                self._previous[sig] = previous
            for sig in self._signals:
                signal.signal(sig, self._on_signal)
        if self._mode == "coordinator":
            self._agreement = _Agreement(f"jstate/preemption/{next(_blocks)}", self._grace)
        self._entered = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._agreement is not None:
            self._agreement.close()
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) == self._on_signal:  # a handler the user set since is theirs
                signal.signal(sig, previous)
        if self._notice is not None and self._saved is None and exc_type is None:
            # The notice stands: deferred, never swallowed. (Leaving by an exception, the exception
            # reports first; the watchdog still lets the signal act at the grace's end.)
            self._deliver(f"the loop ended without saving after {self._notice[0].name}")

    # -- the step boundary ---------------------------------------------------------------------
    def save_if_preempted(self, state: Any, step: int) -> str | None:
        """At a step boundary: save `state` if the job is being preempted, and say so.

        Args:
          state: what `Saver.save` takes (a State or any pytree a training loop holds).
          step: this step's number, the same on every process; the checkpoint is ``<path>-<step>``.

        Returns:
          The checkpoint's path once saved (committed: the loop should stop now; later calls
          return it again without saving), or None while there is no notice.

        Raises:
          CheckpointError: the save failed, or the processes did not all reach a step boundary
            within the grace period.
          RuntimeError: called outside the ``with`` block.

        >>> import signal
        >>> with jstate.Preemption(jstate.Saver(), "ckpt/model", grace=20) as preemption:
        ...     print(preemption.save_if_preempted(state, step=0))  # no notice yet
        ...     signal.raise_signal(signal.SIGTERM)
        ...     print(preemption.save_if_preempted(state, step=1))
        None
        ckpt/model-1
        """
        if not self._entered:
            raise RuntimeError("Call `save_if_preempted` inside `with jstate.Preemption(...) as preemption:`.")
        if self._saved is not None:
            return self._saved
        if not self._reached(step):
            return None
        path = self._saver.save(state, self._path, step=step)
        with self._settling:
            self._saved, self._settled = path, True
        if self._watchdog is not None:
            self._watchdog.cancel()
        log.warning("Preempted: saved %s.", self._saved)
        return self._saved

    @property
    def noticed(self) -> bool:
        """Whether this process has seen a notice (always False where JAX's service holds it:
        JAX tells only at the sync point)."""
        return self._notice is not None

    def _reached(self, step: int) -> bool:
        if self._mode == "jax":
            from jax.experimental import multihost_utils

            if not multihost_utils.reached_preemption_sync_point(step):
                return False
            self._noticed(signal.SIGTERM)  # the grace runs from here: JAX does not say when its notice came
            return True
        if self._mode == "local":
            return self._notice is not None
        reached = self._agreement.reached(step)
        if self._agreement.noticed_at is not None:
            self._noticed(self._signals[0])  # another process's notice, maybe: the grace runs from here
        return reached

    # -- the notice ----------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        sig = signal.Signals(signum)
        log.warning("%s received: saving at the next step boundary (grace %gs).", sig.name, self._grace)
        self._noticed(sig)
        if self._agreement is not None:
            self._agreement.notice()

    def _noticed(self, sig: signal.Signals) -> None:
        """Record the notice (on the main thread: in the handler, or at a step boundary) and give
        the signals back to their previous handlers, so that the next one takes its usual effect
        at once and the watchdog's takes it at the grace's end."""
        if self._notice is not None:
            return
        self._notice = (sig, time.monotonic())
        for other, previous in self._previous.items():
            signal.signal(other, previous)
        if self._mode == "jax":  # JAX's notifier has told its service; a second SIGTERM now ends the process
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        self._watchdog = threading.Timer(self._grace, self._deliver, (f"no save returned within {self._grace:g}s",))
        self._watchdog.name, self._watchdog.daemon = "jstate-preemption-watchdog", True  # never keeps a process alive
        self._watchdog.start()

    def _deliver(self, why: str) -> None:
        """Let the held-back signal take the effect it would have had without jstate (from the
        watchdog's thread too: the disposition is the process's, restored by `_noticed`)."""
        with self._settling:
            if self._settled:  # saved, or delivered already: once only
                return
            self._settled = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        sig = self._notice[0]
        log.warning("Preemption: %s; letting %s take its usual effect.", why, sig.name)
        os.kill(os.getpid(), sig)


class _Agreement:
    """The step every process saves, agreed through the coordinator's key-value store (with JAX's
    preemption service off), the way JAX's sync manager agrees on it.

    A thread per process watches for any process's notice. It then holds the step boundary (a
    lock the loop takes there), publishes the last boundary this process passed, waits for every
    process's, and names the step after the largest: no process has passed it, and each reaches
    it. The waiting is in the thread, never in the loop: a process held at a boundary while
    another is inside the next step's all-reduce would deadlock both.
    """

    def __init__(self, key: str, grace: float):
        self._client = _distributed().client
        self._key, self._grace = key, grace
        self._lock = threading.Lock()
        self._passed = -1
        self._local, self._closed = threading.Event(), threading.Event()
        self.stop_at: int | None = None
        self.noticed_at: float | None = None  # time.monotonic() when this process learned of a notice
        self._error: str | None = None
        self._thread = threading.Thread(target=self._watch, name="jstate-preemption", daemon=True)
        self._thread.start()

    def notice(self) -> None:
        """This process got the signal (called from its handler)."""
        self._local.set()

    def reached(self, step: int) -> bool:
        with self._lock:  # held by the thread while the processes agree
            self._passed = step
            if self._error is not None:
                raise CheckpointError(self._error)
            return self.stop_at is not None and step >= self.stop_at

    def close(self) -> None:
        self._closed.set()
        self._local.set()
        self._thread.join(timeout=self._grace)

    def _watch(self) -> None:
        notices = f"{self._key}/notice/"
        try:
            while True:  # a notice here, or one of another process's (polled: cheap for the coordinator)
                if self._local.wait(0.2):
                    if self._closed.is_set():
                        return
                    self._client.key_value_set(f"{notices}{jax.process_index()}", "1", allow_overwrite=True)
                    break
                if self._client.key_value_dir_get(notices):
                    break
            with self._lock:
                self.noticed_at = time.monotonic()
                self._client.key_value_set(f"{self._key}/step/{jax.process_index()}", str(self._passed))
                steps = []
                for other in range(jax.process_count()):
                    left = self.noticed_at + self._grace - time.monotonic()
                    try:
                        value = self._client.blocking_key_value_get(
                            f"{self._key}/step/{other}", max(1, int(left * 1e3))
                        )
                    except Exception as e:  # JAX raises its runtime error type for a deadline
                        self._error = (
                            f"The job is being preempted, but process {other} did not reach a step boundary within "
                            f"grace={self._grace:g}s ({type(e).__name__}: {e}). Nothing was saved for the preemption."
                        )
                        return
                    steps.append(int(value))
                self.stop_at = max(steps) + 1
        except Exception as e:  # the coordinator is gone: say so at the next step boundary
            self._error = f"The processes could not agree on a step to save at for the preemption: {e}"


def _distributed() -> Any:
    """JAX's distributed runtime state where ``jax.distributed.initialize`` ran, else None.

    JAX has no public accessor for its client or preemption sync manager; Orbax reads the same
    object (``orbax.checkpoint.multihost.get_jax_distributed_client``)."""
    from jax._src import distributed

    return distributed.global_state if distributed.global_state.client is not None else None
