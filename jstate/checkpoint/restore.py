"""Restoring a State from a checkpoint: match the Saver's names and transforms against what the
checkpoint holds, check every input, shape and dtype before anything is read (`plan`), then
read just those arrays (`restore`)."""

from __future__ import annotations

import dataclasses
import html
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from .. import transforms as T
from ..core.errors import (
    CheckpointError,
    JStateError,
    MappingError,
    PlacementError,
    SpecMismatchError,
    closest,
    shorten,
)
from ..core.names import abbreviated
from ..core.table import Table
from ..formats.base import Checkpoint, from_host
from ..model.placement import uncommitted
from ..model.state import State
from . import narrowing
from . import transforming as _transforming
from .mapping import NameMap
from .plan_text import HEAD, WIDTH, fit, grouped, stray, wrap


@dataclasses.dataclass
class RestorePlan:
    """What a restore would do, found from metadata alone (`Saver.plan` returns one).

    (Named for what it plans: `model.init` has a plan of its own, for initialization.)

    Prints as a table (and renders as one in Jupyter): each variable the restore fills, the
    checkpoint entries it comes from, the transform and the dtype conversion; then the target's
    variables that nothing fills, the checkpoint entries that nothing uses, and the problems that
    would make the restore fail.

    Attributes:
      checkpoint: the checkpoint it reads.
      names: ``{State name: checkpoint name}`` of the variables read as they are.
      transforms: ``{State name: transform}`` of the variables computed from entries.
      kept: target variables that nothing fills: the restore leaves them as they are.
      unused: checkpoint entries that nothing reads (fine: a partial restore), ignored ones too.
      problems: what makes the restore fail, in the order it would report them (empty: none).
      ignored: the unused entries an ``ignore`` pattern matches (`strict` lets them be).
      narrowed: ``{State name: checkpoint name}`` of the 64-bit entries read into the 32-bit
        variables JAX holds with its 64-bit mode off: checked value by value when read.

    >>> path = jstate.Saver().save(state, "ckpt/model")
    >>> found = jstate.Saver({"biases": "b"}).plan(path, jstate.abstract(lambda s: s.variable("b", jstate.initializers.zeros, (200,))))
    >>> found.names, found.unused
    ({'b': 'biases'}, ['layer1/kernel', 'w2', 'weights'])
    """

    checkpoint: Checkpoint
    names: dict[str, str]
    transforms: dict[str, T.Transform]
    kept: list[str]
    unused: list[str]
    problems: list[JStateError]
    ignored: list[str] = dataclasses.field(default_factory=list)
    narrowed: dict[str, str] = dataclasses.field(default_factory=dict)
    _rows: list[tuple] = dataclasses.field(default_factory=list, repr=False)
    _wanted: dict[str, jax.ShapeDtypeStruct] = dataclasses.field(default_factory=dict, repr=False)
    _loose: frozenset[str] = dataclasses.field(default=frozenset(), repr=False)

    def check(self) -> None:
        """Raise the first problem, if any: before a restore reads anything.

        Raises:
          JStateError: the first of `problems` (a `CheckpointError`, `SpecMismatchError`,
            `MappingError` or `PlacementError`).

        >>> path = jstate.Saver(["biases"]).save(state, "ckpt/model")
        >>> jstate.Saver(["biases"]).plan(path, jstate.abstract(model), strict=True).check()  # no problem
        >>> jstate.Saver(["weights"]).plan(path, jstate.abstract(model)).check()
        Traceback (most recent call last):
        ...
        jstate.core.errors.CheckpointError: Checkpoint ckpt/model lacks 1 variable(s) the Saver restores: 'weights'. ...
        """
        if self.problems:
            raise self.problems[0]

    def table(self) -> Table:
        """The variables filled, one row each: variable, from, transform, shape, dtype; within
        `WIDTH` columns (the entries read said once, a long list of them by count; a cell too long
        for the rest shortened where it tells its row apart least, as `plan_text.fit` says).

        >>> path = jstate.Saver(["biases"]).save(state, "ckpt/model")
        >>> print(jstate.Saver(["biases"]).plan(path, jstate.abstract(model)).table())
        Restore from ckpt/model (jstate): 1 variable
        variable  from    transform  shape   dtype
        --------  ------  ---------  ------  -------
        biases    biases             (200,)  float32
        """
        n = len(self._rows)
        title = f"Restore from {self.checkpoint.path} ({self.checkpoint.writer}): {n} variable{'s' * (n != 1)}"
        return Table(HEAD, fit(self._rows, WIDTH), title)

    def _notes(self) -> list[tuple[str, str]]:
        notes = []
        if self.kept:
            notes.append(("Left as in the target (nothing fills them)", shorten(self.kept, 20)))
        ignored = set(self.ignored)
        unused = [e for e in self.unused if e not in ignored]
        if unused:
            notes.append(("Checkpoint entries nothing uses", grouped(unused)))
        if self.ignored:
            notes.append(("Ignored (`ignore=`)", grouped(self.ignored)))
        if self.narrowed:
            notes.append(("Stored in 64 bits, read into 32 if every value fits", shorten(self.narrowed, 20)))
        for problem in self.problems:
            notes.append(("Problem", str(problem)))
        return notes

    def __str__(self) -> str:
        return "\n".join([str(self.table())] + [wrap(f"{head}: {text}", WIDTH) for head, text in self._notes()])

    __repr__ = __str__

    def _repr_html_(self) -> str:
        notes = "".join(f"<p><b>{html.escape(h)}:</b> {html.escape(t)}</p>" for h, t in self._notes())
        return self.table()._repr_html_() + notes


def plan(
    ckpt: Checkpoint,
    name_map: NameMap,
    target: State,
    *,
    cast: bool,
    strict: bool,
    ignore: Sequence[re.Pattern] = (),
    loose: frozenset[str] = frozenset(),
) -> RestorePlan:
    """The `RestorePlan` for restoring `target` from `ckpt` through `name_map` (`Saver.plan`).

    Problems are collected in the plan, not raised: a rule naming variables `target` does not
    declare is one too.

    Args:
      ckpt: the checkpoint to read.
      name_map: the Saver's names and transforms.
      target: the flat State to restore into.
      cast: allow stored dtypes that differ from the declared ones.
      strict: count checkpoint entries nothing reads and no `ignore` pattern matches as a problem.
      ignore: patterns (`re.search`) of checkpoint entries `strict` lets be (`compile_ignore`).
      loose: variables that were Python numbers in the target: a 64-bit float narrowed into one
        may round (as Python's float would hold it), not overflow.

    Returns:
      The plan: what each variable is read from, and every problem.

    >>> from jstate.checkpoint.mapping import compile_var_list
    >>> ckpt = jstate.open_checkpoint(jstate.Saver().save(state, "ckpt/model"))
    >>> found = plan(ckpt, compile_var_list(["biases"]), jstate.abstract(model), cast=False, strict=False)
    >>> found.names, found.problems
    ({'biases': 'biases'}, [])
    """
    declared = list(target.specs)
    try:
        names = name_map.resolve(declared, "the target State")
    except JStateError as e:  # a rule naming what the target lacks: the plan shows it
        return RestorePlan(ckpt, {}, {}, sorted(declared), sorted(ckpt.entries), [e])
    transforms = name_map.transforms()
    used = set(names.values()) | {e for t in transforms.values() for e in t.entries()}
    kept = sorted(set(declared) - set(names) - set(transforms))
    unused = sorted(set(ckpt.entries) - used)
    ignored = [e for e in unused if any(p.search(e) for p in ignore)]
    out = RestorePlan(ckpt, names, transforms, kept, unused, [], ignored, _loose=frozenset(loose))
    out.problems += _missing(ckpt, names, transforms)
    unread = sorted(set(unused) - set(ignored))
    if strict and unread:
        out.problems.append(stray(ckpt.path, unread))
    for n in [*names, *transforms]:
        out.problems += _placeable(n, target)
    for n, c in names.items():
        if c in ckpt.entries:
            spec, entry = target.spec(n), ckpt.entries[c]
            out._rows.append((n, c, "", spec.shape, _dtypes(entry.dtype, spec.dtype)))
            if entry.shape == spec.shape and not cast and narrowing.narrows(entry.dtype, spec.dtype):
                out.narrowed[n] = c  # read through the host and checked value by value (`narrowing`)
                continue
            out._wanted[c] = _struct(target, n)
            if entry.shape != spec.shape or (entry.dtype != spec.dtype and not cast):
                out.problems.append(
                    SpecMismatchError(
                        f"Checkpoint {ckpt.path}: variable '{c}' has shape {entry.shape} and dtype "
                        f"{entry.dtype.name}, but '{n}' is declared with shape {spec.shape} and dtype "
                        f"{spec.dtype.name}."
                        + (" Pass `cast=True` to convert the dtype." if entry.shape == spec.shape else "")
                    )
                )
    memo: dict = {}
    for n, t in transforms.items():
        if all(e in ckpt.entries for e in t.entries()):
            out.problems += _check_transform(ckpt, n, t, target, cast, memo, out._rows)
    out._rows.sort(key=lambda row: row[0])
    return out


def _missing(ckpt: Checkpoint, names: dict[str, str], transforms: dict[str, T.Transform]) -> list[JStateError]:
    """Problems with entries the map reads that the checkpoint lacks or jstate cannot read."""
    wanted = list(names.values()) + [e for t in transforms.values() for e in t.entries()]
    unreadable = [c for c in wanted if c in ckpt.skipped]
    if unreadable:
        c = unreadable[0]
        return [
            CheckpointError(
                f"Checkpoint {ckpt.path}: jstate cannot read '{c}' ({ckpt.skipped[c]}). Leave it out of the Saver."
            )
        ]
    problems: list[JStateError] = []
    missing = {n: c for n, c in names.items() if c not in ckpt.entries}
    if missing:
        first = next(iter(missing.values()))
        # each name quoted once: 'model/attn/k' (for 'encoder/attn/k'), never quotes within quotes
        named = [f"'{c}'" if c == n else f"'{c}' (for '{n}')" for n, c in missing.items()]
        shown = ", ".join(named[:8]) + (f" and {len(named) - 8} more" if len(named) > 8 else "")
        problems.append(
            CheckpointError(
                f"Checkpoint {ckpt.path} lacks {len(missing)} variable(s) the Saver restores: {shown}."
                f"{closest(first, ckpt.entries)}{_unread(ckpt)} Restore a subset with `Saver([...])`, or map "
                "names with `Saver({checkpoint_name: state_name})`."
            )
        )
    for n, t in transforms.items():
        absent = [e for e in t.entries() if e not in ckpt.entries]
        if absent:
            problems.append(
                CheckpointError(
                    f"Checkpoint {ckpt.path} lacks {shorten(absent)}, read by {T.brief(t)} to fill '{n}'."
                    f"{closest(absent[0], ckpt.entries)} `jstate.list_variables(path)` lists what it holds."
                )
            )
    return problems


def _unread(ckpt: Checkpoint) -> str:
    """What `ckpt` holds that jstate does not read (an Orbax item of another handler), for an
    error about what it lacks: the variable may be in there."""
    if not ckpt.skipped:
        return ""
    items = [f"'{name}' ({why})" for name, why in sorted(ckpt.skipped.items())]
    more = f" and {len(items) - 3} more" if len(items) > 3 else ""
    return f" It also holds what jstate does not read: {'; '.join(items[:3])}{more}."


def _struct(target: State, name: str) -> jax.ShapeDtypeStruct:
    """What `name` is restored as: its declared shape and dtype, on the sharding of the target's
    own value for it where that asks for one (`_asked`), else on its declared sharding."""
    spec = target.spec(name)
    return jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=_asked(target.get(name)) or spec.sharding)


def _asked(value: Any) -> jax.sharding.Sharding | None:
    """The sharding a target's value asks its variable to be restored onto: a committed array's,
    or a `jax.ShapeDtypeStruct`'s (``jax.eval_shape`` output given new shardings). None where it
    says nothing: an uncommitted array, a struct without one, or one over an abstract mesh only
    (what ``jax.eval_shape`` gives for the State's own shardings)."""
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, jax.Array):
        return value.sharding if value.committed else None
    sharding = getattr(value, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and isinstance(sharding.mesh, jax.sharding.AbstractMesh):
        return None
    return sharding


def _placeable(name: str, target: State) -> list[JStateError]:
    """Problems with putting a value of `name`'s declared shape and dtype where it is declared:
    a 64-bit dtype that JAX would narrow (64-bit mode off), a sharding that cannot divide it."""
    spec, sharding = target.spec(name), _struct(target, name).sharding
    narrow = jax.dtypes.canonicalize_dtype(spec.dtype, allow_extended_dtype=True)
    if narrow != spec.dtype:
        return [
            SpecMismatchError(
                f"Variable '{name}' is declared {spec.dtype.name}, but JAX's 64-bit mode is off: its values would "
                f"be truncated to {narrow.name}. Enable it (`jax.config.update('jax_enable_x64', True)`), or "
                f"declare {narrow.name} and pass `cast=True`."
            )
        ]
    if sharding is not None and hasattr(sharding, "shard_shape"):
        try:
            sharding.shard_shape(spec.shape)
        except Exception as e:  # JAX's IndivisibleError is no ValueError
            reason = str(e).split("implies that ")[-1].split(" (full shape")[0].splitlines()[0][:200]
            return [
                PlacementError(
                    f"Variable '{name}' of shape {spec.shape} cannot be placed on its target's sharding "
                    f"{getattr(sharding, 'spec', sharding)}: {reason}. Give the target a sharding that "
                    "divides its shape."
                )
            ]
    return []


def _check_transform(
    ckpt: Checkpoint, name: str, t: T.Transform, target: State, cast: bool, memo: dict, rows: list
) -> list[JStateError]:
    """Problems with filling `name` through `t`; its row of the plan."""
    keys = [e for e in t.entries() if jax.dtypes.issubdtype(ckpt.entries[e].dtype, jax.dtypes.prng_key)]
    if keys:
        return [
            MappingError(
                f"Saver rule for '{name}': {T.brief(t)} reads PRNG key '{keys[0]}'; keys are restored by name only."
            )
        ]
    entries = {e: jax.ShapeDtypeStruct(ckpt.entries[e].shape, ckpt.entries[e].dtype) for e in t.entries()}
    spec = target.spec(name)
    try:
        got = _transforming.struct(t, entries, memo)
    except (TypeError, ValueError, IndexError, OverflowError) as e:
        rows.append((name, abbreviated(list(entries)), t, "?", "?"))
        # the entries are named once, by `brief`; here only their shapes, one where all share it
        shapes = {s.shape for s in entries.values()}
        held = [f"'{n}' {s.shape}" for n, s in entries.items()]
        if len(held) > 1 and len(shapes) == 1:
            held = [f"each {shapes.pop()}"]
        shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        return [
            MappingError(
                f"Saver rule for '{name}': {T.brief(t)} does not apply to checkpoint {ckpt.path} ({shown}): {e}"
            )
        ]
    rows.append((name, abbreviated(list(entries)), t, spec.shape, _dtypes(got.dtype, spec.dtype)))
    if got.shape != spec.shape or (got.dtype != spec.dtype and not cast):
        hint = " Pass `cast=True`, or add a `transforms.cast`." if got.shape == spec.shape else ""
        return [
            SpecMismatchError(
                f"Checkpoint {ckpt.path}: {T.brief(t)} gives shape {got.shape} and dtype {got.dtype.name}, but '{name}' "
                f"is declared with shape {spec.shape} and dtype {spec.dtype.name}.{hint}"
            )
        ]
    return []


def _dtypes(stored: np.dtype, declared: np.dtype) -> str:
    return declared.name if stored == declared else f"{stored.name} -> {declared.name}"


def restore(
    ckpt: Checkpoint,
    name_map: NameMap,
    target: State,
    *,
    cast: bool,
    strict: bool,
    verify: bool,
    progress: bool = False,
    ignore: Sequence[re.Pattern] = (),
    loose: frozenset[str] = frozenset(),
    exact: dict[str, np.ndarray] | None = None,
) -> State:
    """`target` with the variables `name_map` selects read from `ckpt` (see `Saver.restore`).

    Args:
      ckpt: the checkpoint to read.
      name_map: the Saver's names and transforms.
      target: the flat State to restore into; it is left unchanged.
      cast, strict, ignore, loose: as `plan`.
      verify: check what is read against the checkpoint's checksums.
      progress: show a progress bar.
      exact: filled, where given, with the values of the variables narrowed from 64 bits as
        stored (``{State name: host array}``): what a Python number in the target gets back.

    Returns:
      A new State: `target` with the variables the map fills.

    Raises:
      JStateError: the plan's first problem (before anything is read), or a failed read.
      SpecMismatchError: a 64-bit value that its 32-bit variable cannot hold (before the other
        arrays are read).

    >>> from jstate.checkpoint.mapping import compile_var_list
    >>> ckpt = jstate.open_checkpoint(jstate.Saver().save(state, "ckpt/model"))
    >>> list(restore(ckpt, compile_var_list(["biases"]), jstate.abstract(model), cast=False, strict=False, verify=True))
    ['biases']
    """
    found = plan(ckpt, name_map, target, cast=cast, strict=strict, ignore=ignore, loose=loose)
    found.check()
    narrowed = {n: _struct(target, n) for n in found.narrowed}
    exact = {} if exact is None else exact
    values = narrowing.read(ckpt, found.narrowed, narrowed, found._loose, verify, exact)  # small: checked first
    arrays = ckpt.read(found._wanted, verify=verify, progress=progress) if found._wanted else {}
    values |= {n: arrays[c] for n, c in found.names.items() if n not in found.narrowed}
    values |= _transformed(ckpt, found.transforms, target, verify)
    # A variable with no placement is left uncommitted, as `init` leaves it (jit may move it).
    values = {n: v if _struct(target, n).sharding is not None else uncommitted(v) for n, v in values.items()}
    return target._replace_values(values)


def _transformed(ckpt: Checkpoint, transforms: dict[str, T.Transform], target: State, verify: bool) -> dict:
    """The variables filled through transforms, a group at a time (those sharing entries: the
    parts of one split): its entries read to the host and verified, the transforms applied with
    NumPy, each result placed on its variable's sharding, then the host copies dropped."""
    out = {}
    for group in _groups(transforms):
        host = ckpt.read_host(sorted({e for n in group for e in transforms[n].entries()}), verify=verify)
        memo: dict = {}
        for n in group:
            value = _transforming.evaluate(transforms[n], host.__getitem__, np, memo)
            out[n] = from_host(np.asarray(value), _struct(target, n))
        del host, memo
    return out


def _groups(transforms: dict[str, T.Transform]) -> list[list[str]]:
    """The variables of `transforms` in groups that share no checkpoint entry with each other."""
    groups: list[tuple[set[str], list[str]]] = []
    for name, t in transforms.items():
        entries, names = set(t.entries()), [name]
        for group in [g for g in groups if g[0] & entries]:
            groups.remove(group)
            entries |= group[0]
            names = group[1] + names
        groups.append((entries, names))
    return [names for _, names in groups]
