"""Packing small variables: many small arrays stored as a few large ones.

Orbax 0.12.8 spends about 2.5 ms per array to save and 2 ms to restore, whatever its size (its
``SaveArgs.aggregate`` is ignored), so a training state of 1,000 small arrays (biases, norms,
optimizer moments) spends seconds on bookkeeping for a few megabytes. jstate therefore stores
every variable of at most `THRESHOLD` bytes concatenated, per dtype, into flat 1-D arrays of at
most `CHUNK` bytes, saved by Orbax under the key `KEY`:

  {"jstate.packed": {"float32-0": f32[n], "float32-1": ..., "int32-0": ...}, "big/kernel": ...}

The manifest records, for each packed variable, its array and offset (`Slot`), and a CRC32C of
its own bytes, so a packed variable is verified, and damage is reported, by its own name.

Why these numbers: at this machine's 1-2 GB/s, 2.5 ms is the time to write 2.5-5 MB; a variable
of up to 1 MiB spends most of its save on Orbax's per-array cost, and packing it costs one copy
of its bytes each way. Larger variables gain little, and would make partial restores (which read
whole packed arrays) read more than they need. Chunks of 16 MiB keep that bound small while
costing Orbax's per-array time once per 16 MiB; variables are packed in name order, so a scope's
variables share chunks and a restore of one scope reads few of them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import numpy as np

from ..core.arguments import integer

KEY = "jstate.packed"  # no variable name holds a "." (`_names.check_name`): this key is free
THRESHOLD = 1024 * 1024  # bytes: variables up to this size are packed by default
CHUNK = 16 * 1024 * 1024  # bytes: a packed array holds at most this much (or one variable)


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where a packed variable lives: ``KEY/<array>``, from element `offset` on.

    >>> Slot("float32-0", 12)
    Slot(array='float32-0', offset=12)
    """

    array: str
    offset: int


def threshold(pack: bool | int) -> int:
    """The largest variable, in bytes, that `Saver(pack=...)` packs: True is `THRESHOLD`,
    False or 0 packs nothing, an integer is the threshold itself.

    >>> threshold(True), threshold(False), threshold(4096)
    (1048576, 0, 4096)
    """
    if isinstance(pack, bool):
        return THRESHOLD if pack else 0
    return integer(pack, "pack", "True, False or a size in bytes >= 0")


def packable(array: jax.Array, limit: int) -> bool:
    """Whether `array` is packed: not empty, at most `limit` bytes, and whole in this process.

    Packing gathers a variable's value on the host. With one process every array is whole
    here; with several, only a fully replicated one is the same whole value in every process
    (so every process packs it alike, and process 0 writes it). Others are stored by name.

    >>> packable(jnp.ones(4), THRESHOLD), packable(jnp.ones(0), THRESHOLD), packable(jnp.ones(4), 8)
    (True, False, False)
    """
    if not 0 < array.nbytes <= limit:
        return False
    return array.is_fully_addressable if jax.process_count() == 1 else array.is_fully_replicated


def pack(arrays: Mapping[str, jax.Array]) -> tuple[dict[str, np.ndarray], dict[str, Slot]]:
    """Copy `arrays` (all `packable`) into flat host arrays, per dtype, in name order.

    Returns ``({array name: flat values}, {variable name: Slot})``.

    >>> packed, slots = pack({"b": jnp.ones(2), "a": jnp.zeros(3), "n": jnp.arange(2)})
    >>> {k: v.tolist() for k, v in packed.items()}, slots["b"]
    ({'float32-0': [0.0, 0.0, 0.0, 1.0, 1.0], 'int32-0': [0, 1]}, Slot(array='float32-0', offset=3))
    """
    for array in arrays.values():  # start every device-to-host copy before waiting on the first
        array.copy_to_host_async()
    layout = _layout({n: (a.dtype, a.size) for n, a in arrays.items()})
    packed = {name: np.empty(size, dtype) for name, (dtype, size) in _sizes(layout, arrays).items()}
    for name, slot in layout.items():
        flat = _host(arrays[name]).reshape(-1)
        packed[slot.array][slot.offset : slot.offset + flat.size] = flat
    return packed, layout


def unpack(packed: np.ndarray, slot: Slot, shape: tuple[int, ...]) -> np.ndarray:
    """The variable at `slot` of `packed`, in its `shape`: a view, no copy.

    >>> unpack(np.arange(6.0), Slot("float64-0", 2), (2, 2)).tolist()
    [[2.0, 3.0], [4.0, 5.0]]
    """
    return packed[slot.offset : slot.offset + math.prod(shape)].reshape(shape)


def _layout(arrays: Mapping[str, tuple[np.dtype, int]]) -> dict[str, Slot]:
    """Each variable's slot: per dtype in name order, a new chunk once one would pass `CHUNK`."""
    dtypes = {n: np.dtype(dtype) for n, (dtype, _) in arrays.items()}
    names = {dtype: dtype.name for dtype in set(dtypes.values())}  # `.name` costs microseconds
    layout: dict[str, Slot] = {}
    filled: dict[str, tuple[int, int]] = {}  # dtype name -> (chunk, elements in it)
    for kind, name in sorted((names[dtypes[n]], n) for n in arrays):
        size, itemsize = arrays[name][1], dtypes[name].itemsize
        chunk, used = filled.get(kind, (0, 0))
        if used and (used + size) * itemsize > CHUNK:
            chunk, used = chunk + 1, 0
        layout[name] = Slot(f"{kind}-{chunk}", used)
        filled[kind] = (chunk, used + size)
    return layout


def _sizes(layout: Mapping[str, Slot], arrays: Mapping[str, jax.Array]) -> dict[str, tuple[np.dtype, int]]:
    """Each packed array's dtype and length."""
    sizes: dict[str, tuple[np.dtype, int]] = {}
    for name, slot in layout.items():
        end = slot.offset + arrays[name].size
        if end > sizes.get(slot.array, (None, 0))[1]:
            sizes[slot.array] = (arrays[name].dtype, end)
    return sizes


def _host(array: jax.Array) -> np.ndarray:
    """The whole value of a `packable` array on the host (with several processes, it is fully
    replicated: this process's first copy is all of it)."""
    return np.asarray(array if array.is_fully_addressable else array.addressable_data(0))
