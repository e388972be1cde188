"""`Saver`: TensorFlow's ``tf.train.Saver`` on top of Orbax, with name mapping and retention.

The Saver chooses what to save under which names (`mapping`) and what to delete
(`retention`); a pytree becomes the State it saves or restores in `adapters`, writing is
`writer`'s, restoring `restore`'s, finding checkpoints `lookup`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from pathlib import Path
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

from ..core.arguments import bad, integer, positive
from ..core.errors import ArgumentError, CheckpointError, MappingError, UninitializedError, shorten
from ..core.names import check_name
from ..formats import commit as _commit
from ..formats import pack as _pack
from ..formats.base import Checkpoint
from ..formats.manifest import Manifest
from ..formats.native import NativeCheckpoint
from ..model.state import State
from ..storage import deadlines as _limits
from ..storage import store as _storage
from ..storage.store import as_path
from . import directory as _directory
from . import lookup as _checkpoint
from . import orbax_layout as _orbax_layout
from . import restore as _restore
from . import retention as _retention
from . import transforming as _transforming
from .adapters import LEAF, as_state, is_one_leaf, like, python_numbers
from .mapping import NameMap, VarList, compile_ignore, compile_var_list, one_name
from .writer import Writer

T = TypeVar("T")
log = logging.getLogger("jstate")

_RETENTION_FAILED = (
    "Retention could not delete the old checkpoint(s) %s after saving %s (%s). The save succeeded and is the "
    "latest; what could not be deleted stays on disk, and the next save tries again (or delete it yourself)."
)

_STEP = "an integer >= 0, or None (`step` must be an integer: it names the checkpoint `<path>-<step>`)"


class Saver:
    """Saves and restores a State's variables, all or some, under chosen names.

    Checkpoints are Orbax PyTree checkpoints (arrays keyed by checkpoint name, in
    ``arrays-<token>/``, `Checkpoint.arrays`) plus a small ``jstate.json`` manifest, whose
    writing commits the save; plain Orbax can restore the arrays. A Saver holds only its
    settings and the prefixes it saved to (for retention); `save` and `restore` never change
    the State they are given.

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
        pack: bool | int = True,
        layout: str = "jstate",
        progress: bool = False,
        timeout: float = 600.0,
        keep_checkpoint_every_n_hours: float | None = None,
    ):
        """A Saver of the variables `var_list` names, keeping the checkpoints retention allows.

        Valid forms of `var_list` (see `checkpoint.mapping` for details):

          Saver()                                 every initialized variable, under its own name
          Saver(["weights", "biases"])            a subset; ``"encoder/"`` names a whole scope
          Saver({"my_v2": "v2"})                  checkpoint name -> State name
          Saver({"encoder/": "model/encoder/"})   checkpoint scope -> State scope
          Saver([(r"^model/(.*)$", r"\\1")])        regex over State names -> checkpoint name

        Args:
          var_list: which variables, under which names.
          max_to_keep: keep only the newest N checkpoints of a prefix (None or 0 keeps all).
          keep_every_n_hours: also keep, for good, one checkpoint per N hours.
          keep_every_n_steps: also keep, for good, checkpoints whose step is a multiple of N.
          compression: zstd-compress arrays (Orbax's default; ~8% smaller float data, ~2x slower).
          pack: store variables of at most 1 MiB (True), or of at most this many bytes (an int),
            packed into a few flat arrays per dtype: Orbax's cost of ~2.5 ms per array is paid per
            16 MiB instead of per variable. False (or 0) stores every variable under its own name,
            as plain Orbax would (docs/guides/checkpoints.md, "Packed small variables"). The Orbax
            layout packs nothing.
          layout: "jstate" (the default), or "orbax": checkpoints plain Orbax reads as its own,
            named ``<path>_<step>`` as a CheckpointManager with ``step_prefix=<path's name>`` names
            its steps, holding the tree that was saved (nested, unpacked) in ``default/``, which
            ``ocp.StandardCheckpointer().restore(f"{path}/default", target)`` restores
            (docs/guides/foreign.md, "Back to plain Orbax"). jstate reads them with the same checks.
            Each is written once, as Orbax writes a step: saving over one is refused.
          progress: show a progress bar (tqdm: the ``progress`` extra) for saves and restores; `save`
            and `restore` take it per call too. Those over 2 s are logged at INFO (logger ``jstate``)
            either way.
          timeout: seconds that processes of a multi-process save wait for each other, and that
            jstate waits on an object store (gs://, s3://) before a save or restore fails: for all
            of each step that only reads or writes metadata (preparing a save, committing it with
            retention, finding the checkpoint to restore), and for each request while arrays are
            read. (Orbax and tensorstore write and read the arrays under their own retry policies.)
          keep_checkpoint_every_n_hours: TensorFlow's name for `keep_every_n_hours`.

        Raises:
          MappingError: a `var_list` of no valid form (a string, a State, a regex that does not
            compile); names it gives are checked against a State when it is saved or restored.
          ArgumentError: any other argument of the wrong type or value (a `max_to_keep` that is no
            integer >= 0, a NaN period, a `timeout` that is no finite positive number of seconds,
            an unknown `layout`, both `keep_every_n_hours` and `keep_checkpoint_every_n_hours`).
            It is a `ValueError` and a `TypeError`.

        >>> jstate.Saver(["weights", "biases"], max_to_keep=5, keep_every_n_steps=10_000)
        Saver(max_to_keep=5, compression=False)
        """
        if keep_checkpoint_every_n_hours is not None:  # TensorFlow's name for it
            if keep_every_n_hours is not None:
                raise ArgumentError(
                    "Saver: give `keep_every_n_hours` or TF's `keep_checkpoint_every_n_hours`, not both."
                )
            keep_every_n_hours = positive(  # checked here to name the argument given
                keep_checkpoint_every_n_hours, "Saver(keep_checkpoint_every_n_hours=...)", _retention.EVERY_N_HOURS
            )
        self._names = compile_var_list(var_list)
        self._prefixes: dict[Path, None] = {}  # where this Saver saved with a step, in order
        self._policy = _retention.Policy(max_to_keep, keep_every_n_hours, keep_every_n_steps)
        self._started = time.time()  # TensorFlow's Saver starts the `keep_every_n_hours` clock here
        self._clocks: dict[Path, float] = {}  # per prefix: when that clock last started
        if _limits.seconds(timeout, "Saver(timeout=...)") is None:
            raise bad(
                "Saver(timeout=...)", timeout, "a finite number of seconds > 0: processes of a save wait that long"
            )
        self._compression, self._timeout = compression, _limits.seconds(timeout)  # (`LONGEST` at most)
        self._layout = layout
        pack = _orbax_layout.check_layout(layout, pack)
        self._writer = Writer(compression, self._timeout, _pack.threshold(pack), layout)
        self._progress = progress

    # -- saving ------------------------------------------------------------------------------
    def save(
        self,
        state: Any,
        path: str | os.PathLike,
        step: int | None = None,
        *,
        blocking: bool = True,
        progress: bool | None = None,
    ) -> str:
        """Write this Saver's variables of `state` to ``<path>-<step>`` (or `path`).

        `state` is a State or any pytree a training loop holds: a dict of States, an optax
        state, a Flax ``TrainState``, an NNX state, with jax or NumPy arrays, Python numbers and
        PRNG keys as leaves. Leaves are named by their tree path joined with "/" (a State inside
        contributes its own names under its key: ``{"model": state}`` saves ``"model/weights"``),
        and the Saver's `var_list` applies to those names. A bare array or number (a tree of one
        leaf) is saved as the one entry ``"value"``, and restores into a bare array target (as
        does the one entry of any checkpoint holding one: Orbax's own bare arrays).

        Returns the checkpoint's path. With ``blocking=False`` it returns as soon as the values
        are copied off the device (donating `state` right after is safe); `wait` finishes it, and
        so does the interpreter's exit. A save killed at any moment leaves earlier checkpoints
        intact and is never listed. `path` may be an earlier checkpoint of this name (it is
        replaced), never another directory; it may be local or ``gs://bucket/...`` or
        ``s3://bucket/...`` (docs/guides/object_storage.md). A Saver is used from one thread at a time.
        ``progress=True`` shows a progress bar (None: the Saver's `progress`).

        Raises:
          CheckpointError: the save failed (or an earlier ``blocking=False`` one did).
          ArgumentError: a `step` that is no integer >= 0 (a bool, 1.5, "7"); nothing is written.

        >>> saver = jstate.Saver(["weights", "biases"], max_to_keep=5)
        >>> saver.save(state, "ckpt/model", step=1000)
        'ckpt/model-1000'
        """
        if step is not None:  # 3.5 would share `model-3` with step 3
            step = integer(step, "Saver.save(step=...)", _STEP)
        self._writer.wait()
        saved, state = state, as_state(state)
        arrays, names = self._arrays(state)
        if not arrays:
            raise CheckpointError(
                f"Nothing to save to {path}: the Saver selects no initialized variable of the State "
                f"({len(state.specs)} declared, {len(state)} initialized). Check its `var_list`, or initialize or restore them first."
            )
        named, path = path, as_path(path)
        if step is not None:
            _check_stepped(named, path, step)
        if _storage.is_bucket(path):  # `with_name` would make gs://bucket-1: another bucket
            raise CheckpointError(
                f"{path}: a bucket alone is not a checkpoint path; name one inside it, e.g. {path}/model. "
                "Nothing was written."
            )
        separator = _orbax_layout.STEP_SEPARATOR if self._layout == "orbax" else "-"
        final = path if step is None else path.with_name(f"{path.name}{separator}{step}")
        nest = None
        if self._layout == "orbax":
            nest = _orbax_layout.nesting(saved, names, arrays)
            self._refuse_resave(final)
        prefix = None if step is None else path.name
        retire = functools.partial(self._retire, final) if step is not None else (lambda manifest: None)
        stamp = functools.partial(self._stamp, path) if step is not None else (lambda manifest: manifest)
        if step is not None:
            self._prefixes[path] = None
        progress = self._progress if progress is None else progress  # a bar: the Saver's choice unless given
        self._writer.save(
            arrays, final, step, prefix, blocking=blocking, committed=retire, stamp=stamp, progress=progress, nest=nest
        )
        return str(final)

    def _refuse_resave(self, final: Path) -> None:
        """The Orbax layout's arrays live in a directory without a token (the one a
        CheckpointManager reads): replacing them in place could not be atomic, so a checkpoint
        of that layout is written once, as Orbax's CheckpointManager writes a step once."""
        with _limits.deadline(self._timeout):
            try:
                found = Manifest.read(final) is not None
            except CheckpointError:
                found = True  # a damaged one: not ours to replace either
        if found:
            raise CheckpointError(
                f"Cannot save to {final}: it holds a checkpoint, and a Saver(layout='orbax') writes each "
                "checkpoint once (as Orbax's CheckpointManager writes a step once). Save another step, or "
                "delete it first. Nothing was written."
            )

    def _arrays(self, state: State) -> tuple[dict[str, jax.Array], dict[str, str]]:
        """The arrays to save by checkpoint name, and ``{State name: checkpoint name}`` of those
        saved by name."""
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
        # numpy values too (`jnp.asarray` costs ~30 us even on a jax.Array: 30 ms per 1,000 arrays)
        arrays = {ckpt: v if isinstance(v := state[n], jax.Array) else jnp.asarray(v) for n, ckpt in names.items()}
        arrays |= self._exported(state, set(arrays))
        for ckpt in arrays:
            check_name(ckpt)  # "." would let two names share storage in Orbax's files
        return arrays, dict(names)

    def _exported(self, state: State, taken: set[str]) -> dict[str, jax.Array]:
        """The checkpoint entries that restoring through this Saver's transforms turns into the
        State's values: the inverse layout (`jstate.transforms`)."""
        transforms = self._names.transforms()
        if not transforms:
            return {}
        empty = [n for n in transforms if not state.is_initialized(n)]
        if empty:
            raise UninitializedError(
                f"Cannot save: variable {shorten(empty)} (saved through a transform) is not initialized."
            )
        try:
            arrays = _transforming.invert({n: (t, jnp.asarray(state[n])) for n, t in transforms.items()})
        except _transforming.NotInvertible as e:
            raise MappingError(f"Cannot save through the Saver's transforms: {e}.") from None
        twice = sorted(taken & set(arrays))
        if twice:
            raise MappingError(
                f"Cannot save: checkpoint entry '{twice[0]}' would hold both a variable saved by name and one "
                "saved through a transform. Give each checkpoint entry one source."
            )
        return arrays

    def wait(self) -> None:
        """Block until a ``blocking=False`` save is on disk; re-raise its error, if any.

        >>> saver = jstate.Saver()
        >>> path = saver.save(state, "ckpt/model", step=1, blocking=False)  # returns before the write ends
        >>> saver.wait()
        >>> jstate.latest_checkpoint("ckpt")
        'ckpt/model-1'
        """
        self._writer.wait()

    @property
    def last_checkpoints(self) -> list[str]:
        """The checkpoints still subject to `max_to_keep`, oldest first (TF's
        ``saver.last_checkpoints``): the newest `max_to_keep` of each prefix this Saver saved to
        with a step, found in their directories (all of them where `max_to_keep` is None). Those
        kept for good (`keep_every_n_hours`, `keep_every_n_steps`) leave the list as they leave
        that window, as in TensorFlow; they stay on disk and in `jstate.list_checkpoints`.

        >>> saver = jstate.Saver(max_to_keep=2)
        >>> for step in (10, 20, 30):
        ...     _ = saver.save(state, "ckpt/model", step=step)
        >>> saver.last_checkpoints
        ['ckpt/model-20', 'ckpt/model-30']
        """
        found: dict[Path, NativeCheckpoint] = {}
        for prefix in self._prefixes:
            own = _checkpoint.lookup(prefix, self._timeout, "Saver.last_checkpoints", functools.partial(_own, prefix))
            found |= {c.path: c for c in _retention.rotating(self._policy, own) if c.path not in found}
        return [str(c.path) for c in sorted(found.values(), key=lambda c: c.order)]

    def _stamp(self, prefix: Path, manifest: Manifest) -> Manifest:
        """`manifest`, about to be committed, with retention's decision: whether it is kept for
        good, and the `keep_every_n_hours` clock after it (recovered from the prefix's newest
        checkpoint at this Saver's first save there, as TensorFlow's CheckpointManager does)."""
        since = self._clocks.get(prefix)
        if since is None and self._policy.keep_every_n_hours is not None:
            recorded = [c.manifest.clock for c in _own(prefix) if c.manifest.clock is not None]
            since = _retention.clock(recorded[-1] if recorded else None, self._started, manifest.created)
        kept, since = _retention.keeps(
            self._policy, manifest.step, manifest.created, self._started if since is None else since
        )
        clock = since if self._policy.keep_every_n_hours is not None else None
        return dataclasses.replace(manifest, kept=kept, clock=clock)

    def _retire(self, final: Path, manifest: Manifest) -> None:
        """After a commit: remember the retention clock it recorded, then delete the checkpoints
        of its prefix that the retention policy lets go: only those a Saver saved with this
        exact prefix, never the one just written.

        The save has succeeded by now (its manifest is committed, and it is the latest): a
        retention that fails (a read-only directory or mount, a lost permission, a timeout) is
        logged as a WARNING naming what stays and why, never raised, and the next save tries again.
        """
        if manifest.clock is not None:
            self._clocks[final.parent / manifest.prefix] = manifest.clock
        if self._policy.max_to_keep is None:
            return
        try:
            listed = _own(final.parent / manifest.prefix)  # in commit order, the one just written among them
        except Exception as e:
            log.warning(_RETENTION_FAILED, final.parent / f"{manifest.prefix}-*", final, f"{type(e).__name__}: {e}")
            return
        newest = next((c for c in listed if c.path == final), None) or NativeCheckpoint(final, manifest)
        for ckpt in _retention.to_delete(self._policy, listed, newest):
            try:
                _commit.delete(ckpt.path, expected=ckpt.manifest)
            except Exception as e:  # the others may still go
                log.warning(_RETENTION_FAILED, ckpt.path, final, f"{type(e).__name__}: {e}")

    # -- restoring ---------------------------------------------------------------------------
    def restore(
        self,
        path: str | os.PathLike,
        target: T,
        *,
        cast: bool = False,
        strict: bool = False,
        ignore: list[str] | None = None,
        verify: bool = True,
        progress: bool | None = None,
    ) -> T:
        """A new State: `target` with this Saver's variables read from the checkpoint at `path`.

        `target` may also be any pytree (as `save` takes): the result has its structure, each leaf
        read onto the sharding of the target's leaf (an array's, a `jax.ShapeDtypeStruct`'s, or
        an abstract State's variables'), so ``jax.eval_shape`` output is a target too.

        `target` may be abstract (`jstate.abstract(model)`): no initialization is needed first.
        Variables outside this Saver stay as they are in `target`, initialized or not. Only the
        arrays needed are read, each straight onto the target variable's sharding or device.
        `path` may also be a directory of checkpoints: its latest complete one is read.

        With JAX's 64-bit mode off (its default), an int64, uint64 or float64 entry restores into
        the int32, uint32 or float32 variable JAX holds it in without `cast`, when every value
        converts exactly (a float: its float32 value is the same number; into a Python float, any
        that float32 does not overflow), logged once at INFO; a value that does not fit is a
        `SpecMismatchError`. A Python number in the target comes back as one, as Orbax returns it.

        Args:
          path: a checkpoint, or a directory of them.
          target: the State to restore into; it is left unchanged.
          cast: allow a checkpoint dtype that differs from the declaration (converted).
          strict: fail if the checkpoint holds variables this Saver does not restore (and no
            `ignore` pattern matches); the error lists them grouped (``*/Adam (4: ...)``).
          ignore: regular expressions searched in checkpoint names (as the Saver's regex rules
            search State names): the entries `strict` lets be, such as a TF1 optimizer's slots,
            ``ignore=[r"/Adam(_1)?$", "^beta[12]_power$"]``.
          verify: check each array against the checksums recorded when it was saved.
          progress: show a progress bar (None: the Saver's `progress`). Restores over 2 s are
            logged at INFO either way.

        Raises:
          CheckpointNotFoundError, CorruptCheckpointError: for a missing or damaged checkpoint.
          CheckpointError: for variables missing from the checkpoint (with the closest names).
          SpecMismatchError: for a shape (or, without `cast`, dtype) that differs.
          MappingError: for a malformed `ignore`.
          TypeError: for a model function as `target` (`jstate.abstract(model)` belongs there).

        >>> _ = jstate.Saver().save(state, "ckpt/model", step=1000)
        >>> restored = jstate.Saver(["biases"]).restore("ckpt", jstate.abstract(model))  # the latest in ckpt/
        >>> list(restored), restored.uninitialized()
        (['biases'], ['layer1/kernel', 'w2', 'weights'])
        """
        self._writer.join()  # a failed background save is reported by `wait` or the next `save`, not here
        flat, patterns, loose = as_state(target), compile_ignore(ignore), python_numbers(target)
        bar = self._progress if progress is None else progress
        exact: dict = {}  # 64-bit values as stored: a Python float target gets its float64 back

        def read(ckpt: Checkpoint) -> State:
            exact.clear()  # a retry of a checkpoint replaced meanwhile starts again
            return _restore.restore(
                ckpt, self._names_for(target, ckpt), flat, cast=cast, strict=strict, verify=verify, progress=bar,
                ignore=patterns, loose=loose, exact=exact,
            )  # fmt: skip

        with _limits.timeout(self._timeout):  # no request to an object store waits longer
            restored = _checkpoint.reading(path, read, self._timeout, "Saver.restore")
        return restored if isinstance(target, State) else like(target, restored, exact)

    def plan(
        self,
        path: str | os.PathLike,
        target: Any,
        *,
        cast: bool = False,
        strict: bool = False,
        ignore: list[str] | None = None,
    ) -> _restore.RestorePlan:
        """What `restore` would do, from the checkpoint's metadata alone: a table of each variable
        it fills, the entries it comes from, the transform and dtype conversion applied; then the
        target's variables nothing fills, the checkpoint entries nothing uses, and every problem
        that would make the restore fail (which it reports before reading anything). `cast`,
        `strict` and `ignore` as `restore` takes them. The table fits 120 columns: a transform's
        entries are in "from" (a numbered run of them as ``layers_{0..23}/kernel (24)``), its
        operations in "transform".

        >>> from jstate import transforms as T
        >>> torch_layout = jstate.Saver(["biases", ("weights", T.transpose("linear/weight"))])
        >>> path = torch_layout.save(state, "ckpt/torch")  # saving writes the inverse: weights.T
        >>> jstate.list_variables(path)
        [('biases', (200,), dtype('float32')), ('linear/weight', (200, 784), dtype('float32'))]
        >>> print(torch_layout.plan(path, jstate.abstract(model)))
        Restore from ckpt/torch (jstate): 2 variables
        variable  from           transform  shape       dtype
        --------  -------------  ---------  ----------  -------
        biases    biases                    (200,)      float32
        weights   linear/weight  transpose  (784, 200)  float32
        Left as in the target (nothing fills them): 'layer1/kernel', 'w2'
        """
        self._writer.join()
        ckpt = _checkpoint.reading(path, lambda ckpt: ckpt, self._timeout, "Saver.plan")
        return _restore.plan(
            ckpt, self._names_for(target, ckpt), as_state(target), cast=cast, strict=strict, ignore=compile_ignore(ignore),
            loose=python_numbers(target),
        )  # fmt: skip

    def _names_for(self, target: Any, ckpt: Checkpoint) -> NameMap:
        """The Saver's names for restoring `target` from `ckpt`. A Saver of every variable
        restores a bare-leaf target from a checkpoint of one entry whatever its name: other
        writers name a bare array otherwise than jstate's `LEAF` (Orbax's PyTreeCheckpointer
        ``''``, its ArrayCheckpointHandler ``'checkpoint'``), and one entry into one leaf is
        unambiguous."""
        if self._names.rules is None and is_one_leaf(target) and len(ckpt.entries) == 1 and LEAF not in ckpt.entries:
            return one_name(next(iter(ckpt.entries)), LEAF)
        return self._names

    def __repr__(self) -> str:
        return f"Saver(max_to_keep={self._policy.max_to_keep}, compression={self._compression})"


def _check_stepped(named: str | os.PathLike, path: Path, step: int) -> None:
    """Refuse a `path` a step cannot be appended to: one that names a directory itself (``run/``,
    ``run/.``, ``/``, ``.``) rather than a name in it. `pathlib` reads ``run/`` as ``run``, so
    the step would make ``run-3`` beside the directory the user named; the checkpoint is written
    where the user's path says, or nowhere.

    >>> _check_stepped("ckpt/run/", Path("ckpt/run"), 3)
    Traceback (most recent call last):
    jstate.core.errors.CheckpointError: Cannot save to 'ckpt/run/' with step=3: ...
    """
    text = os.fsdecode(os.fspath(named))
    if text.endswith(("/", "/.")) or path.name in ("", ".", ".."):
        inside = text.rstrip("/").removesuffix("/.").rstrip("/")
        raise CheckpointError(
            f"Cannot save to {text!r} with step={step}: a step is appended to the path's last name, and this path "
            f"names a directory itself, not a name in it. Name the checkpoints inside it, e.g. "
            f"`saver.save(state, '{inside}/model', step={step})`, which writes model-{step} there. Nothing was written."
        )


def _own(prefix: Path) -> list[NativeCheckpoint]:
    """The checkpoints a Saver saved with this exact prefix and a step (``model-2``, saved
    with prefix ``model`` at step 2, is not one of prefix ``model-2``'s)."""
    return [
        c
        for c in _directory.checkpoints(prefix)
        if isinstance(c, NativeCheckpoint) and c.manifest.prefix == prefix.name and c.step is not None
    ]
