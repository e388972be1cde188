"""Compiled initializer programs: many variables per program, all their random bits in one draw.

Cost model. XLA's compile time grows with the number of random ops in a program (each threefry
is a large fused loop of its own), not with the number of outputs: on a 2-core machine one
program of 100 distinct shapes with a random op each compiled in 21.6 s, one drawing a single
stream and slicing it in 1.3 s. So each initializer is traced once to a jaxpr (``key ->
value``), and the variables of a model are initialized by a few *pooled* programs: one threefry
op draws the random bits of every variable in the program (each from the variable's own key and
counters, exactly the bits ``jax.random.bits(key, shape)`` gives it under JAX's partitionable
threefry), and each initializer's jaxpr then runs on its slice of that pool. Values are
bit-for-bit those of calling the initializer on the variable's own key, so they depend on the
variable's name, shape and dtype only, never on which other variables share its program.

Variables too large for a pool (their bits would be a large temporary on every device), with a
non-threefry key, or whose initializer does more with its key than draw bits (``split``, ...)
get a program of their own, shared by equal initializers, shapes, dtypes and shardings.

Programs are cached by what their trace produced (the jaxpr's text and constants), not by the
initializer's identity, so an initializer reading a global that changed is traced and compiled
anew, and equal initializers built afresh (``normal(0.02)`` inline) share their program.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import inspect
import math
import threading
import types
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal, Var
from jax.extend.random import threefry2x32_p
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ..core.errors import InitializerError

# A variable of up to `POOL_MAX` elements joins a pool; a pool holds up to `CHUNK_VARIABLES`
# variables and `CHUNK_ELEMENTS` random words (64 MiB of uint32 temporaries on each device of
# the pool's mesh). Bigger variables amortize their own compile; smaller chunks keep XLA's
# compile time linear and let equal chunks (1,000 equal layers) share one program.
POOL_MAX = 1 << 22
CHUNK_VARIABLES = 256
CHUNK_ELEMENTS = 1 << 24
_ROW = 128  # a pool is (rows, _ROW) words; a variable's bits start on a row of their own

_CACHE_SIZE = 4096
_lock = threading.Lock()
_programs: collections.OrderedDict[Hashable, Callable] = collections.OrderedDict()
_CALLS = ("jit", "pjit", "closed_call", "core_call")


@dataclasses.dataclass(frozen=True, eq=False)
class Traced:
    """An initializer traced for one shape and dtype: ``jaxpr(key) -> value``.

    Attributes:
      jaxpr: the trace, taking the variable's own (name-derived) key.
      fingerprint: equal for traces that compute the same thing (text, constants, callables).
      draws: the ``(bit_width, shape)`` of each ``random_bits`` the trace takes from its key,
        in evaluation order; None if it uses the key otherwise (it cannot join a pool).
    """

    jaxpr: ClosedJaxpr
    fingerprint: Hashable
    draws: tuple[tuple[int, tuple[int, ...]], ...] | None

    @property
    def size(self) -> int:
        return math.prod(self.jaxpr.out_avals[0].shape)

    @property
    def words(self) -> int:
        """Random 32-bit words this initializer draws."""
        return sum(math.prod(shape) for _, shape in self.draws or ())


def trace(initializer: Callable, shape: tuple[int, ...], dtype: np.dtype, key_type: Any) -> Traced:
    """Trace ``initializer(key, shape, dtype)`` for a key of `key_type`.

    Raises:
      InitializerError: the initializer returned another shape or dtype.
    """

    def run(key):
        value = jnp.asarray(initializer(key, shape, dtype))
        if value.shape != shape or value.dtype != dtype:
            raise InitializerError(
                f"the initializer returned shape {value.shape} and dtype {value.dtype.name}; the "
                f"declaration asks for shape {shape} and dtype {dtype.name}."
            )
        return value

    closed = jax.make_jaxpr(run)(key_type)
    j = closed.jaxpr
    draws = _draws(j, {j.invars[0]})
    return Traced(closed, _fingerprint(closed), None if draws is None else tuple(draws))


def fold(key: jax.Array, words: jax.Array) -> jax.Array:
    """A variable's own key: init's `key` with the two words of its name hash folded in."""
    return jax.random.fold_in(jax.random.fold_in(key, words[0]), words[1])


def evaluate(traced: Traced, key: jax.Array, draw: Callable | None = None) -> jax.Array:
    """The value `traced` computes from `key`; with `draw`, its random bits come from
    ``draw(key, bit_width, shape)`` instead of from the key."""
    return _eval(traced.jaxpr.jaxpr, traced.jaxpr.consts, [key], draw)[0]


def single_program(traced: Traced, sharding: Any) -> Callable:
    """A jitted ``program(key, key_words) -> value`` for one variable, created on `sharding`."""
    cache_key = ("single", traced.fingerprint, sharding)
    return _cached(
        cache_key, lambda: jax.jit(lambda key, words: evaluate(traced, fold(key, words)), out_shardings=sharding)
    )


def initializer_program(initializer: Callable, shape: tuple[int, ...], dtype: Any, sharding: Any) -> Callable:
    """The program of one variable of this initializer, shape, dtype and sharding, for a typed
    key (what a variable too large for a pool runs): ``program(key, key_words) -> value``.

    >>> program = initializer_program(jstate.initializers.ones, (2,), jnp.float32, None)
    >>> program(jax.random.key(0), np.zeros(2, np.uint32))
    Array([1., 1.], dtype=float32)
    """
    key_type = jax.eval_shape(lambda: jax.random.key(0))
    return single_program(trace(initializer, tuple(shape), np.dtype(dtype), key_type), sharding)


def pooled_program(traceds: Sequence[Traced], shardings: Sequence[Any]) -> Callable:
    """A jitted ``program(key, key_words[n, 2]) -> [value, ...]`` for n poolable variables.

    One threefry op draws every variable's bits, then each initializer runs on its own slice.
    """
    cache_key = ("pooled", tuple(t.fingerprint for t in traceds), tuple(shardings))
    traceds = tuple(traceds)
    mesh = mesh_of(shardings)
    out = None if all(s is None for s in shardings) else list(shardings)
    return _cached(cache_key, lambda: jax.jit(functools.partial(_pooled, traceds, mesh), out_shardings=out))


def mesh_of(shardings: Sequence[Any]) -> Any:
    """The mesh a program's pool is spread over: that of its first `NamedSharding` output."""
    return next((s.mesh for s in shardings if isinstance(s, NamedSharding)), None)


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


def _pooled(traceds: tuple[Traced, ...], mesh: Any, key: jax.Array, words: jax.Array) -> list[jax.Array]:
    keys = jax.vmap(fold, in_axes=(None, 0))(key, words)
    owners = [i for i, t in enumerate(traceds) for _ in t.draws]
    shapes = [shape for t in traceds for _, shape in t.draws]
    data = jax.random.key_data(keys)[np.asarray(owners, dtype=np.int32)] if owners else None
    slices = iter(_pool(data, shapes, mesh))
    draw = lambda key, bit_width, shape: _as_bits(next(slices), bit_width, shape)  # noqa: E731
    return [evaluate(t, keys[i], draw) for i, t in enumerate(traceds)]


def pooled_trace(run: Callable[[Callable | None], Any], mesh: Any = None) -> Any:
    """``run(draw)`` with every random draw it makes from a scalar threefry key taken from one pool.

    `run` evaluates a jaxpr with `evaluate_all`. It runs twice inside the caller's trace: first
    to learn each draw's key and shape (the values of that run are dropped, and XLA removes
    them), then with every draw sliced from one threefry op over all of them.
    """
    requests: list[tuple[Any, int, tuple[int, ...]]] = []

    def record(key, bit_width, shape):
        requests.append((key, bit_width, shape))
        return jnp.zeros(shape, np.dtype(f"uint{bit_width}"))

    run(record)
    # Large draws stay draws of their own (threefry is partitionable: each device then computes
    # just its shards); the small ones share pools of bounded size.
    pooled = [i for i, (_, _, shape) in enumerate(requests) if math.prod(shape) <= POOL_MAX]
    if not pooled:
        return run(None)
    slices: dict[int, jax.Array] = {}
    for part in chunk(pooled, [math.prod(requests[i][2]) for i in pooled]):
        data = jnp.stack([jax.random.key_data(requests[i][0]) for i in part])
        slices.update(zip(part, _pool(data, [requests[i][2] for i in part], mesh)))
    counter = iter(range(len(requests)))

    def take(key, bit_width, shape):
        i = next(counter)
        return _as_bits(slices[i], bit_width, shape) if i in slices else None

    return run(take)


def chunk(items: list[int], sizes: list[int]) -> list[list[int]]:
    """`items` in order, cut into runs of at most CHUNK_VARIABLES items and CHUNK_ELEMENTS words."""
    chunks: list[list[int]] = [[]]
    total = 0
    for item, n in zip(items, sizes):
        if chunks[-1] and (len(chunks[-1]) >= CHUNK_VARIABLES or total + n > CHUNK_ELEMENTS):
            chunks.append([])
            total = 0
        chunks[-1].append(item)
        total += n
    return [c for c in chunks if c]


def _pool(data: jax.Array | None, shapes: list[tuple[int, ...]], mesh: Any = None) -> list[jax.Array]:
    """Flat 32-bit random words for each shape, drawn with key ``data[i]`` (two uint32 words)
    in one threefry op: the words `jax.random.bits` gives that key and shape. On a `mesh`, each
    device draws its share of the rows (as `jax.random.bits` does under `out_shardings`: drawing
    every word on every device costs as many times more as the mesh has devices)."""
    sizes = [math.prod(shape) for shape in shapes]
    rows = [-(-n // _ROW) for n in sizes]
    if not sum(rows):
        return [jnp.zeros((0,), np.uint32) for _ in sizes]
    # Row r holds counters base[r] .. base[r] + _ROW - 1 of its draw's key: the flat indices
    # `jax.random.bits` gives the draw's elements (the high word is 0: fewer than 2**32 words).
    owner = np.repeat(np.arange(len(sizes)), rows)
    base = np.concatenate([np.arange(r, dtype=np.uint32) * _ROW for r in rows])
    ways = 1 if mesh is None else mesh.size
    if ways > 1 and len(base) % ways:  # whole rows on every device (the extra rows are dropped)
        extra = ways - len(base) % ways
        owner, base = (
            np.concatenate([owner, np.zeros(extra, owner.dtype)]),
            np.concatenate([base, np.zeros(extra, base.dtype)]),
        )
    data = data[owner]
    counters = jnp.asarray(base)[:, None] + jax.lax.iota(np.uint32, _ROW)[None, :]
    if ways > 1:
        # (over the same devices with Auto axes: a constraint may not name Explicit ones)
        auto = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
        rows_spread = NamedSharding(auto, PartitionSpec(tuple(mesh.axis_names)))
        counters = jax.lax.with_sharding_constraint(counters, rows_spread)
        data = jax.lax.with_sharding_constraint(data, rows_spread)
    k1 = jnp.broadcast_to(data[:, :1], counters.shape)
    k2 = jnp.broadcast_to(data[:, 1:], counters.shape)
    b1, b2 = threefry2x32_p.bind(k1, k2, jnp.zeros_like(counters), counters)
    # The barrier keeps XLA from fusing the threefry into every slice (one copy per variable).
    pool = jax.lax.optimization_barrier(b1 ^ b2).reshape(-1)
    starts = np.concatenate([[0], np.cumsum(rows)[:-1]]) * _ROW
    return [jax.lax.slice(pool, (int(s),), (int(s) + n,)) for s, n in zip(starts, sizes)]


def _as_bits(words: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
    bits = words.reshape(shape)
    # As `jax.random.bits` does for 8 and 16 bits under partitionable threefry.
    return bits if bit_width == 32 else jax.lax.convert_element_type(bits, np.dtype(f"uint{bit_width}"))


def _draws(jaxpr: Jaxpr, keys: set) -> list | None:
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
            sub = _draws(inner, {iv for iv, v in zip(inner.invars, eqn.invars) if isinstance(v, Var) and v in keys})
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


def evaluate_all(jaxpr: Jaxpr, consts: Sequence[Any], args: Sequence[Any], draw: Callable | None) -> list[Any]:
    """Evaluate `jaxpr`; with `draw`, every 8-, 16- or 32-bit draw from a scalar threefry key
    comes from ``draw(key, bit_width, shape)`` (see `pooled_trace`)."""
    return _eval(jaxpr, consts, args, draw, ANY_KEY)


def _eval(jaxpr: Jaxpr, consts: Sequence[Any], args: Sequence[Any], draw: Callable | None, keys: Any = ()) -> list:
    """Evaluate `jaxpr` (the interpreter of JAX's "Writing custom interpreters"); with `draw`,
    the random_bits of the key (its first argument, the variables in `keys`, or any scalar
    threefry key with `ANY_KEY`) come from ``draw(key, bit_width, shape)``."""
    env: dict[Var, Any] = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    if keys == ():
        keys = {jaxpr.invars[0]} if draw is not None and jaxpr.invars else set()
    run_eqns(jaxpr.eqns, env, draw, keys)
    return [v.val if isinstance(v, Literal) else env[v] for v in jaxpr.outvars]


def run_eqns(eqns: Sequence[Any], env: dict, draw: Callable | None = None, keys: Any = ANY_KEY) -> None:
    """Evaluate `eqns` in order, reading and writing their variables in `env` (see `_eval`)."""
    read = lambda v: v.val if isinstance(v, Literal) else env[v]  # noqa: E731
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
            out = _eval(sub, sub_consts, args_in, draw, sub_keys)
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


def _fingerprint(closed: ClosedJaxpr) -> Hashable:
    """Equal for traces that compute the same thing: the jaxpr's text (primitives, shapes,
    literals), its constants' bytes, and the identity of any function-valued parameter (a
    custom_jvp rule prints by name only)."""
    consts = []
    for c in closed.consts:
        try:
            a = np.asarray(c)
            consts.append((a.shape, str(a.dtype), hashlib.blake2b(a.tobytes(), digest_size=16).digest()))
        except Exception:  # e.g. a PRNG key constant
            consts.append(_ByIdentity(c))
    return (str(closed.jaxpr), tuple(consts), tuple(_ByIdentity(f) for f in _callables(closed.jaxpr)))


def _callables(jaxpr: Jaxpr) -> list:
    out = []
    for eqn in jaxpr.eqns:
        for p in eqn.params.values():
            if isinstance(p, (ClosedJaxpr, Jaxpr)):
                out += _callables(p.jaxpr if isinstance(p, ClosedJaxpr) else p)
            elif callable(p) and not isinstance(p, (type, np.dtype)):
                out.append(p)
    return out


def _cached(cache_key: Hashable, make: Callable[[], Callable]) -> Callable:
    with _lock:
        program = _programs.get(cache_key)
        if program is not None:
            _programs.move_to_end(cache_key)
            return program
    program = make()  # outside the lock: `jax.jit` traces nothing yet, but keep it cheap
    with _lock:
        program = _programs.setdefault(cache_key, program)
        if len(_programs) > _CACHE_SIZE:
            _programs.popitem(last=False)
    return program


def initializer_identity(fn: Callable) -> Hashable:
    """A hashable key under which equal initializers are traced once within one model trace.

    `jax.nn.initializers.normal(0.35)` returns a new closure on every call, so a model that builds
    its initializers inline would trace each anew if keyed by object identity. Closures are keyed
    by their code and captured values instead (when those are hashable); `functools.partial` by
    its function and arguments; anything else by itself. (Only within one trace of a model: the
    globals an initializer reads cannot change there. Compiled programs are keyed by the trace.)
    """
    if inspect.ismethod(fn):  # the bound object is part of what the method computes
        self_key = fn.__self__
        try:
            hash(self_key)
        except TypeError:
            self_key = _ByIdentity(self_key)
        return ("method", initializer_identity(fn.__func__), self_key)
    if isinstance(fn, functools.partial):
        try:
            key = ("partial", initializer_identity(fn.func), _exact(fn.args), _exact(sorted(fn.keywords.items())))
            hash(key)
            return key
        except TypeError:
            return _ByIdentity(fn)
    code = getattr(fn, "__code__", None)
    if code is not None:
        cells = tuple(c.cell_contents for c in (fn.__closure__ or ()))
        key = (
            "code",
            code,
            _exact(cells),
            _exact(fn.__defaults__ or ()),
            _exact(sorted((fn.__kwdefaults__ or {}).items())),
        )
        try:
            hash(key)
            return key
        except TypeError:
            return _ByIdentity(fn)
    try:
        hash(fn)
        return fn
    except TypeError:
        return _ByIdentity(fn)


def _exact(values) -> tuple:
    """Values keyed so that only equal-and-same values match: ``0.0`` and ``-0.0``, ``1`` and
    ``True`` and ``1.0`` compare equal in Python but may initialize differently."""
    out = []
    for v in values:
        if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str):
            out.append((v[0], *_exact([v[1]])))  # a (keyword, value) pair
        elif isinstance(v, float):
            out.append(("float", v.hex()))
        elif isinstance(v, (bool, int, complex, np.generic)):
            out.append((type(v).__name__, repr(v)))
        else:
            out.append(v)
    return tuple(out)


class _ByIdentity:
    """Hashes an object by identity, keeping it alive so its id is never reused."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ByIdentity) and other.obj is self.obj
