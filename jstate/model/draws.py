"""Random draws from one pool: one threefry op for many ``random_bits``, and the jaxpr
interpreter that hands each draw its slice.

XLA's compile time grows with the number of random ops in a program (each threefry is a large
fused loop of its own), not with the number of outputs. A pool draws the words of many draws
at once: row r of a ``(rows, 128)`` array holds counters ``base[r] .. base[r] + 127`` of one
draw's key, the flat indices `jax.random.bits` gives its elements under JAX's partitionable
threefry, so each slice is exactly the bits that draw would have made on its own.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal, Var
from jax.extend.random import threefry2x32_p
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# A variable of up to `POOL_MAX` elements (4 MiB of float32) joins a pool; a pool holds up to
# `CHUNK_ELEMENTS` random words and `CHUNK_VARIABLES` equal variables or `CHUNK_DISTINCT` of
# several kinds (see `chunk`). XLA compiles at least one fusion per output (about 15-50 ms each
# on a CPU), so a pool's compile grows with its variables: small pools let equal runs of
# variables (1,000 equal layers) share one compiled program (measured: 256 equal 64x64
# variables in one pool compiled in 48 s, 32 in 4.7 s; for 1,000 such layers on 2 cores, pools
# of 16 gave a first call of 1.14 s and later ones of 92 ms, of 8 0.89 s and 102 ms, of 4 0.86 s
# and 165 ms: a call per pool costs too); a pool of distinct ones is a compile
# of its own whatever its size, whose fixed cost (the threefry loop) dominates. Bigger
# variables get programs of their own (equal ones a few per program, `programs.SIDE_BY_SIDE`):
# their compile is small next to their run time, and drawn alone each is as fast as
# `jax.random` (a pool of 8 x 2048^2 ran at 3x a plain jit). Inside a program computed on one
# device (a Flax model's replicated variables), large draws join its pools (`pooled_trace`).
POOL_MAX = 1 << 20
CHUNK_VARIABLES = 8
CHUNK_DISTINCT = 64
CHUNK_ELEMENTS = 1 << 24
_ROW = 128  # a pool is (rows, _ROW) words; a variable's bits start on a row of their own
_CALLS = ("jit", "pjit", "closed_call", "core_call")  # call primitives the interpreter enters


def mesh_of(shardings: Sequence[Any]) -> Any:
    """The mesh a program's pool is spread over: that of its first `NamedSharding` output."""
    return next((s.mesh for s in shardings if isinstance(s, NamedSharding)), None)


def replicated(shardings: Sequence[Any]) -> bool:
    """Whether every output of a pooled program is replicated over its mesh: its pool is then
    gathered whole, once, before it is cut (see `pool`)."""
    return all(s is None or s.is_fully_replicated for s in shardings)


def poolable_key(key: jax.Array) -> bool:
    """Whether variables initialized from `key` can draw from a pool: a single typed threefry
    key, with JAX's partitionable threefry (whose bits are a function of the flat index)."""
    return (
        key.shape == ()
        and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        and str(jax.random.key_impl(key)) == "threefry2x32"
        and bool(jax.config.jax_threefry_partitionable)
    )


def poolable_key_type(aval: Any) -> bool:
    """Whether a trace whose key has this type may pool its draws: a jaxpr of init's key
    draws from scalar threefry keys only if init's key is one (with partitionable threefry)."""
    return _pooled_draw(aval) and bool(jax.config.jax_threefry_partitionable)


def keys_from_draws_in(eqns: Sequence[Any]) -> bool:
    """`keys_from_draws` for a list of equations."""
    return keys_from_draws(types.SimpleNamespace(eqns=eqns))[0]


def pooled_trace(run: Callable[[Callable | None], Any], mesh: Any = None, gather: bool = False) -> Any:
    """``run(draw)`` with every random draw it makes from a scalar threefry key taken from one pool.

    `run` evaluates equations with `run_eqns`. It runs twice inside the caller's trace: first
    to learn each draw's key and shape (`recording`: `run_eqns` then evaluates only what the
    draws' keys need, and `run`'s result is dropped), then with every draw sliced from one
    threefry op over all of them.
    """
    requests: list[tuple[Any, int, tuple[int, ...]]] = []
    run(_Recorder(requests))
    # On a mesh, large draws stay draws of their own (threefry is partitionable: each device then
    # computes just its shards); the small ones share pools of bounded size. On one device, all
    # share pools: a large draw alone is one more threefry loop for XLA to compile.
    largest = POOL_MAX if mesh is not None else CHUNK_ELEMENTS
    pooled = [i for i, (_, _, shape) in enumerate(requests) if math.prod(shape) <= largest]
    if not pooled:
        return run(None)
    slices: dict[int, jax.Array] = {}
    for part in chunk(pooled, [math.prod(requests[i][2]) for i in pooled]):
        data = jnp.stack([jax.random.key_data(requests[i][0]) for i in part])
        slices.update(zip(part, pool(data, [requests[i][2] for i in part], mesh, gather)))
    counter = iter(range(len(requests)))

    def take(key, bit_width, shape):
        i = next(counter)
        return as_bits(slices[i], bit_width, shape) if i in slices else None

    return run(take)


def chunk(items: list[int], sizes: list[int], kinds: list[Any] | None = None) -> list[list[int]]:
    """`items` in order, cut into runs of at most CHUNK_ELEMENTS words and CHUNK_VARIABLES
    items of one kind (equal runs share one compiled program, and a smaller one compiles
    faster), or CHUNK_DISTINCT items of several (each such run is a compile of its own, whose
    fixed cost dominates: measured on the 100-shape model, first call 17 s in runs of 16, 10 s
    in runs of 32, the same in one run of 100, whose later calls were 5x slower; since its
    biases are fills, its 50 kernels in one run of 64 made a first call of 2.4-2.6 s against
    2.8-3.0 s in runs of 32, later calls 0.29 s against 0.23 s). Without `kinds`, every item is
    of its own kind."""
    chunks: list[list[int]] = [[]]
    total, kind = 0, None
    for i, (item, n) in enumerate(zip(items, sizes)):
        k = kinds[i] if kinds is not None else object()
        equal = kind is not None and k == kind
        limit = CHUNK_VARIABLES if equal or not chunks[-1] else CHUNK_DISTINCT
        if chunks[-1] and (len(chunks[-1]) >= limit or total + n > CHUNK_ELEMENTS):
            chunks.append([])
            total, kind = 0, k
        elif not chunks[-1]:
            kind = k
        elif not equal:
            kind = _MIXED
        chunks[-1].append(item)
        total += n
    return [c for c in chunks if c]


_MIXED = object()  # the kind of a run of several kinds


def auto_axes(mesh: Mesh) -> Mesh:
    """`mesh`'s devices and axis names with Auto axes: a sharding constraint may not name Explicit
    ones, and a pool's constraint meets arrays typed by the user's mesh."""
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def pool(
    data: jax.Array | None, shapes: list[tuple[int, ...]], mesh: Any = None, gather: bool = False
) -> list[jax.Array]:
    """Flat 32-bit random words for each shape, drawn with key ``data[i]`` (two uint32 words)
    in one threefry op: the words `jax.random.bits` gives that key and shape. On a `mesh`, each
    device draws its share of the rows (as `jax.random.bits` does under `out_shardings`: drawing
    every word on every device costs as many times more as the mesh has devices). With `gather`
    (every output replicated), the pool is then gathered whole in one collective: left spread,
    XLA gathers each variable's slice on its own, a collective per variable (measured: 65 in a
    program of 16 replicated variables of the 100-shape model, which compiled 2-4x as long)."""
    sizes = [math.prod(shape) for shape in shapes]
    rows = [-(-n // _ROW) for n in sizes]
    if not sum(rows):
        return [jnp.zeros((0,), np.uint32) for _ in sizes]
    # Row r holds counters base[r] .. base[r] + _ROW - 1 of its draw's key: the flat indices
    # `jax.random.bits` gives the draw's elements (the high word is 0: fewer than 2**32 words).
    # Each row's draw and base are computed from the draws' first rows, not embedded as constants
    # of a row each: constants that large made XLA's compile grow with the pool's size.
    first = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int32)
    total = sum(rows)
    ways = 1 if mesh is None else mesh.size
    total += -total % ways  # whole rows on every device (the extra rows are dropped)
    row = jax.lax.iota(np.int32, total)
    if ways > 1:
        # (over the same devices with Auto axes: a constraint may not name Explicit ones)
        auto = auto_axes(mesh)
        rows_spread = NamedSharding(auto, PartitionSpec(tuple(mesh.axis_names)))
        row = jax.lax.with_sharding_constraint(row, rows_spread)
    owner = (row[:, None] >= first[None, 1:]).sum(axis=1, dtype=np.int32) if len(first) > 1 else jnp.zeros_like(row)
    base = ((row - jnp.asarray(first)[owner]) * _ROW).astype(np.uint32)
    data = data[owner]
    counters = base[:, None] + jax.lax.iota(np.uint32, _ROW)[None, :]
    # Each row's key as a (rows, 1) column, which threefry broadcasts itself: broadcast to the
    # counters' shape beforehand, XLA's loop ran 1.6-2.5x slower on a CPU.
    b1, b2 = threefry2x32_p.bind(data[:, :1], data[:, 1:], jnp.zeros_like(counters), counters)
    bits = b1 ^ b2
    if ways > 1 and gather:
        bits = jax.lax.with_sharding_constraint(bits, NamedSharding(auto, PartitionSpec()))
    # The barrier keeps XLA from fusing the threefry into every slice (one copy per variable).
    pool = jax.lax.optimization_barrier(bits).reshape(-1)
    starts = np.concatenate([[0], np.cumsum(rows)[:-1]]) * _ROW
    return [jax.lax.slice(pool, (int(s),), (int(s) + n,)) for s, n in zip(starts, sizes)]


def as_bits(words: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
    bits = words.reshape(shape)
    # As `jax.random.bits` does for 8 and 16 bits under partitionable threefry.
    return bits if bit_width == 32 else jax.lax.convert_element_type(bits, np.dtype(f"uint{bit_width}"))


def draws_of(jaxpr: Jaxpr, keys: set) -> list | None:
    """The random_bits a jaxpr takes from its key (`keys` are the key's variables), or None
    if the key is used in any other way."""
    out = []
    for eqn in jaxpr.eqns:
        uses = [v for v in eqn.invars if isinstance(v, Var) and v in keys]
        name = eqn.primitive.name
        if name == "random_bits" and uses:
            if eqn.params["bit_width"] not in (8, 16, 32) or math.prod(eqn.params["shape"]) >= 2**32:
                return None
            out.append((eqn.params["bit_width"], tuple(eqn.params["shape"])))
        elif name in _CALLS and uses:
            inner = _inner(eqn)
            if inner is None or inner[1] or any(v in keys for v in eqn.outvars):
                return None
            inner = inner[0]
            sub = draws_of(inner, {iv for iv, v in zip(inner.invars, eqn.invars) if isinstance(v, Var) and v in keys})
            if sub is None:
                return None
            out += sub
        elif uses:
            return None
    if any(isinstance(v, Var) and v in keys for v in jaxpr.outvars):
        return None
    return out


def _inner(eqn) -> tuple[Jaxpr, Sequence[Any]] | None:
    inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if isinstance(inner, ClosedJaxpr):
        return inner.jaxpr, inner.consts
    return (inner, ()) if isinstance(inner, Jaxpr) else None


ANY_KEY = None  # `_eval`'s `keys` for "every scalar threefry key"


def _pooled_draw(aval: Any) -> bool:
    return aval.shape == () and str(aval.dtype) == "key<fry>"


def eval_jaxpr(
    jaxpr: Jaxpr, consts: Sequence[Any], args: Sequence[Any], draw: Callable | None, keys: Any = (), wanted: Any = ()
) -> list:
    """Evaluate `jaxpr` (the interpreter of JAX's "Writing custom interpreters"); with `draw`,
    the random_bits of the key (its first argument, the variables in `keys`, or any scalar
    threefry key with `ANY_KEY`) come from ``draw(key, bit_width, shape)``. Recording, only
    the outputs `wanted` are computed (the others are None)."""
    env: dict[Var, Any] = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    if keys == ():
        keys = {jaxpr.invars[0]} if draw is not None and jaxpr.invars else set()
    run_eqns(jaxpr.eqns, env, draw, keys, wanted)
    read = env.get if recording(draw) else env.__getitem__  # (recording computes only the outputs wanted)
    return [v.val if isinstance(v, Literal) else read(v) for v in jaxpr.outvars]


def _for_draws(eqns: Sequence[Any], wanted: Any) -> tuple[list, dict[int, set]]:
    """The equations of `eqns` that compute the `wanted` variables, the draws and their keys,
    in order; and for each call among them (by ``id``), the outputs of its jaxpr wanted. A call
    that draws is entered, one that does not is evaluated only where its outputs are wanted."""
    wanted = set(wanted)
    kept, inner_wanted = [], {}
    for eqn in reversed(eqns):
        out = [isinstance(v, Var) and v in wanted for v in eqn.outvars]
        inner = _inner(eqn) if eqn.primitive.name in _CALLS else None
        if eqn.primitive.name == "random_bits":
            needs = eqn.invars[:1]
        elif inner is not None and (any(out) or _draws_in(inner[0])):
            inner_wanted[id(eqn)] = {v for v, o in zip(inner[0].outvars, out) if o and isinstance(v, Var)}
            needs = eqn.invars  # (all its inputs: those of a Flax initializer's call are few)
        elif any(out):  # (not effects: a `jax.debug.print` prints once, in the second pass)
            needs = eqn.invars
        else:
            continue
        kept.append(eqn)
        wanted.update(v for v in needs if isinstance(v, Var))
    return kept[::-1], inner_wanted


def _draws_in(jaxpr: Jaxpr) -> bool:
    """Whether `jaxpr` makes a draw the interpreter may pool (outside loops and branches)."""
    return any(
        eqn.primitive.name == "random_bits"
        or (eqn.primitive.name in _CALLS and (inner := _inner(eqn)) is not None and _draws_in(inner[0]))
        for eqn in jaxpr.eqns
    )


class _Recorder:
    """The `draw` of `pooled_trace`'s first pass: notes each draw's key and shape."""

    def __init__(self, requests: list):
        self.requests = requests

    def __call__(self, key: Any, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
        self.requests.append((key, bit_width, shape))
        return jnp.zeros(shape, np.dtype(f"uint{bit_width}"))


def recording(draw: Callable | None) -> bool:
    """Whether `draw` is `pooled_trace`'s first pass, which `run_eqns` evaluates in part."""
    return isinstance(draw, _Recorder)


def run_eqns(
    eqns: Sequence[Any], env: dict, draw: Callable | None = None, keys: Any = ANY_KEY, wanted: Any = ()
) -> None:
    """Evaluate `eqns` in order, reading and writing their variables in `env` (see `_eval`).

    Recording (`pooled_trace`'s first pass), only the equations that the draws' keys and the
    `wanted` variables need are evaluated: tracing the rest (a Flax model's transforms of its
    bits, every `erf_inv` of its truncated normals) would only make dead code for XLA to drop.
    """
    read = lambda v: v.val if isinstance(v, Literal) else env[v]  # noqa: E731
    inner_wanted: dict[int, set] = {}
    if recording(draw):
        eqns, inner_wanted = _for_draws(eqns, wanted)
    for eqn in eqns:
        args_in = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        mine = keys is ANY_KEY or any(isinstance(v, Var) and v in keys for v in eqn.invars)
        touches = draw is not None and mine
        inner = _inner(eqn) if touches and name in _CALLS else None
        if (
            touches
            and name == "random_bits"
            and eqn.params["bit_width"] in (8, 16, 32)
            and (keys is not ANY_KEY or _pooled_draw(eqn.invars[0].aval))
        ):
            out = draw(args_in[0], eqn.params["bit_width"], tuple(eqn.params["shape"]))
            if out is None:  # not pooled: drawn here
                out = eqn.primitive.bind(*args_in, **eqn.params)
        elif inner is not None:
            sub, sub_consts = inner
            sub_keys = (
                keys
                if keys is ANY_KEY
                else {iv for iv, v in zip(sub.invars, eqn.invars) if isinstance(v, Var) and v in keys}
            )
            out = eval_jaxpr(sub, sub_consts, args_in, draw, sub_keys, inner_wanted.get(id(eqn), ()))
        else:
            params = eqn.primitive.get_bind_params(eqn.params)
            if isinstance(params, tuple):  # jax < 0.7 returned (subfuns, params)
                subfuns, params = params
                args_in = [*subfuns, *args_in]
            with eqn.ctx.manager:
                out = eqn.primitive.bind(*args_in, **params)
        env.update(zip(eqn.outvars, out if eqn.primitive.multiple_results else [out]))


def keys_from_draws(jaxpr: Jaxpr, tainted: set | None = None) -> tuple[bool, set]:
    """Whether any draw's key in `jaxpr` is computed from drawn bits (a pool cannot serve it:
    it needs every key before drawing), and the outputs computed from drawn bits."""
    tainted = set(tainted or ())
    for eqn in jaxpr.eqns:
        ins = [isinstance(v, Var) and v in tainted for v in eqn.invars]
        inner = _inner(eqn) if eqn.primitive.name in _CALLS else None
        if eqn.primitive.name == "random_bits":
            if ins[0]:
                return True, tainted
            tainted.update(eqn.outvars)
        elif inner is not None:
            sub = inner[0]
            bad, out = keys_from_draws(sub, {iv for iv, t in zip(sub.invars, ins) if t})
            if bad:
                return True, tainted
            tainted.update(o for o, so in zip(eqn.outvars, sub.outvars) if so in out)
        elif any(ins) or any(p for p in eqn.params.values() if isinstance(p, (ClosedJaxpr, Jaxpr))):
            tainted.update(eqn.outvars)  # (a loop or branch may draw: taken as drawn)
    return False, tainted
