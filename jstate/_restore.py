"""Restoring a State from a checkpoint: match the Saver's names against what the checkpoint
holds, check every shape and dtype before anything is read, then read just those arrays."""

from __future__ import annotations

import jax

from ._errors import CheckpointError, SpecMismatchError, closest, shorten
from ._mapping import NameMap
from ._placement import uncommitted
from ._reader import Checkpoint
from ._state import State


def plan(
    ckpt: Checkpoint, names: dict[str, str], target: State, *, cast: bool, strict: bool
) -> dict[str, jax.ShapeDtypeStruct]:
    """``{checkpoint name: target struct}`` for restoring ``{State name: checkpoint name}``.

    Raises:
      CheckpointError: a name the checkpoint lacks (with the closest ones) or cannot read; with
        `strict`, checkpoint entries that nothing restores.
      SpecMismatchError: a shape (or, without `cast`, dtype) that differs from the declaration.
    """
    missing = {n: c for n, c in names.items() if c not in ckpt.entries}
    unreadable = {c: ckpt.skipped[c] for c in missing.values() if c in ckpt.skipped}
    if unreadable:
        name, why = next(iter(unreadable.items()))
        raise CheckpointError(
            f"Checkpoint {ckpt.path}: jstate cannot read '{name}' ({why}). Leave it out of the Saver."
        )
    if missing:
        first = next(iter(missing.values()))
        shown = shorten(f"{c}" if c == n else f"{c} (for '{n}')" for n, c in missing.items())
        raise CheckpointError(
            f"Checkpoint {ckpt.path} lacks {len(missing)} variable(s) the Saver restores: {shown}."
            f"{closest(first, ckpt.entries)} Restore a subset with `Saver([...])`, or map names with "
            "`Saver({checkpoint_name: state_name})`."
        )
    if strict:
        extra = sorted(set(ckpt.entries) - set(names.values()))
        if extra:
            raise CheckpointError(
                f"Checkpoint {ckpt.path} holds {len(extra)} variable(s) that the Saver does not restore: "
                f"{shorten(extra)}. Pass `strict=False` to ignore them."
            )
    wanted = {}
    for n, c in names.items():
        spec, entry = target.spec(n), ckpt.entries[c]
        if entry.shape != spec.shape or (entry.dtype != spec.dtype and not cast):
            raise SpecMismatchError(
                f"Checkpoint {ckpt.path}: variable '{c}' has shape {entry.shape} and dtype "
                f"{entry.dtype.name}, but '{n}' is declared with shape {spec.shape} and dtype "
                f"{spec.dtype.name}." + (" Pass `cast=True` to convert the dtype." if entry.shape == spec.shape else "")
            )
        wanted[c] = spec.struct()
    return wanted


def restore(ckpt: Checkpoint, name_map: NameMap, target: State, *, cast: bool, strict: bool, verify: bool) -> State:
    """`target` with the variables `name_map` selects read from `ckpt` (see `Saver.restore`)."""
    names = name_map.resolve(target.specs, "the target State")
    arrays = ckpt.read(plan(ckpt, names, target, cast=cast, strict=strict), verify=verify)
    values = {n: arrays[c] for n, c in names.items()}
    # A variable with no placement is left uncommitted, as `init` leaves it (jit may move it).
    values = {n: v if target.spec(n).sharding is not None else uncommitted(v) for n, v in values.items()}
    return target._replace_values(values)
