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
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal, Var
from jax.sharding import AxisType, NamedSharding, PartitionSpec, SingleDeviceSharding

from ..core.errors import InitializerError
from . import draws as _draws
from . import ensembles as _ensembles

_CACHE_SIZE = 4096
_lock = threading.Lock()
_programs: collections.OrderedDict[Hashable, Callable] = collections.OrderedDict()


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
    draws = _draws.draws_of(j, {j.invars[0]})
    return Traced(closed, _fingerprint(closed), None if draws is None else tuple(draws))


# A variable filled with one constant (zeros, ones, ``constant(c)``: biases, norm scales) of up
# to this many bytes is made on the host and put on its sharding (each device receives just its
# shards), not computed by a program: each output of a compiled program costs XLA a kernel of its
# own to compile (10-20 ms on a CPU), and a model has as many biases as kernels. Larger ones are
# computed in place, so no host holds a model's worth of zeros.
FILL_MAX = 1 << 22


def fills(jaxpr: Jaxpr, outs: Sequence[Any]) -> list[np.ndarray | None]:
    """For each of `outs` (outputs of `jaxpr`), the one scalar it is filled with where it is a
    broadcast of a constant (``jnp.zeros``, ``jnp.full``, then reshaped or cast exactly) of at
    most `FILL_MAX` bytes, else None. None for all where `jaxpr` has effects (``jax.debug.print``
    in an initializer): a program runs them, a fill would not."""
    if jaxpr.effects:
        return [None] * len(outs)
    value: dict[Var, np.ndarray] = {}  # the variables of `jaxpr` that hold one scalar everywhere
    for eqn in jaxpr.eqns:
        name, operand = eqn.primitive.name, eqn.invars[0] if eqn.invars else None
        if isinstance(operand, Literal) and operand.aval.shape == () and name == "broadcast_in_dim":
            v = np.asarray(operand.val, dtype=operand.aval.dtype)
        elif isinstance(operand, Var) and operand in value and name in _SAME_VALUES and len(eqn.invars) == 1:
            v = value[operand]
        elif isinstance(operand, Var) and operand in value and name == "convert_element_type":
            v = _exact_cast(value[operand], eqn.outvars[0].aval.dtype)
            if v is None:
                continue
        else:
            continue
        value[eqn.outvars[0]] = v
    found = []
    for out in outs:
        if isinstance(out, Literal):  # (a scalar: `jnp.ones(())`)
            found.append(np.asarray(out.val, dtype=out.aval.dtype))
        elif out in value and out.aval.size * out.aval.dtype.itemsize <= FILL_MAX:
            found.append(value[out])
        else:
            found.append(None)
    return found


def _exact_cast(value: np.ndarray, dtype: np.dtype) -> np.ndarray | None:
    """`value` cast to `dtype` where the cast loses nothing, else None: numpy's rounding is not
    XLA's, nor are its overflows, NaN to int, or complex to real casts (where numpy warns)."""
    if np.iscomplexobj(value) and not np.issubdtype(dtype, np.complexfloating):
        if value.imag != 0:
            return None
        value = value.real  # (what XLA's cast keeps)
    with np.errstate(all="ignore"):
        cast = value.astype(dtype)
        return cast if cast.astype(value.dtype) == value else None


_SAME_VALUES = ("broadcast_in_dim", "reshape", "squeeze", "expand_dims", "transpose", "copy", "copy_p")


def filled(value: np.ndarray, shape: tuple[int, ...], sharding: Any, ensemble: int = 0) -> jax.Array:
    """A new array of `shape` (with `ensemble`, of n members) holding `value` everywhere, put on
    `sharding` (None: the default device)."""
    if ensemble:
        shape, sharding = (ensemble, *shape), _ensembles.batched_sharding(sharding)
    out = jax.device_put(np.full(shape, value, value.dtype), sharding)
    if isinstance(out, jax.core.Tracer):
        # init traced with a constant key (`jax.jit` of a function that closes over it): there a
        # constant's `device_put` keeps no sharding, so it is a broadcast made on its own, in
        # the caller's program (as a program's output, on any mesh: Explicit axes too)
        out = jax.jit(lambda: jnp.full(shape, value, value.dtype), out_shardings=sharding)()
    return out


def fold(key: jax.Array, words: jax.Array) -> jax.Array:
    """A variable's own key: init's `key` with the two words of its name hash folded in."""
    return jax.random.fold_in(jax.random.fold_in(key, words[0]), words[1])


def own_keys(key: jax.Array, words: jax.Array, folded: bool) -> jax.Array:
    """The variables' own keys, for rows of `words`: their name hashes, folded into `key` here,
    or with `folded`, their own keys' words, folded on the host (`threefry.fold_names`): then
    the program compiles no `fold_in` (a threefry loop each, 0.2-0.3 s of a program's compile)."""
    if folded:
        return jax.random.wrap_key_data(words, impl=jax.random.key_impl(key))
    return fold(key, words) if words.ndim == 1 else jax.vmap(fold, in_axes=(None, 0))(key, words)


def evaluate(traced: Traced, key: jax.Array, draw: Callable | None = None) -> jax.Array:
    """The value `traced` computes from `key`; with `draw`, its random bits come from
    ``draw(key, bit_width, shape)`` instead of from the key."""
    return _draws.eval_jaxpr(traced.jaxpr.jaxpr, traced.jaxpr.consts, [key], draw)[0]


def single_program(traced: Traced, sharding: Any, ensemble: int = 0, folded: bool = False) -> Callable:
    """A jitted ``program(key, key_words) -> value`` for one variable, created on `sharding`;
    with `ensemble`, for a batch of keys (each member's value is the one its own key gives).
    `key_words` is the variable's name hash, or with `folded` its own key's words (`own_keys`)."""
    cache_key = ("single", traced.fingerprint, sharding, ensemble, folded)
    run = lambda key, words: evaluate(traced, own_keys(key, words, folded))  # noqa: E731
    return _cached(cache_key, lambda: jit(run, sharding, ensemble))


# Equal variables too large for a pool are computed up to this many per program, and up to
# `SIDE_BY_SIDE_BYTES` of them (each has temporaries of its own size while it is drawn, so the
# bytes bound what a program adds above its outputs): XLA runs the independent draws of one
# program side by side, not those of separate programs (8 x 2048^2 glorot_normal on 2 cores:
# 415 ms one program each, 313 ms four per program, 328 ms eight).
SIDE_BY_SIDE = 4
SIDE_BY_SIDE_BYTES = 1 << 28


def side_by_side(nbytes: int) -> int:
    """How many equal variables of `nbytes` each one program computes."""
    return max(1, min(SIDE_BY_SIDE, SIDE_BY_SIDE_BYTES // max(nbytes, 1)))


def equal_program(traced: Traced, sharding: Any, count: int, ensemble: int = 0, folded: bool = False) -> Callable:
    """A jitted ``program(key, key_words[count, 2]) -> [value, ...]`` for `count` variables of
    one initializer, shape and sharding, each drawn from its own key as `single_program` draws it."""

    def run(key, words):
        return [evaluate(traced, own_keys(key, words[i], folded)) for i in range(count)]

    out = None if sharding is None else [sharding] * count
    cache_key = ("equal", traced.fingerprint, sharding, count, ensemble, folded)
    return _cached(cache_key, lambda: jit(run, out, ensemble))


def initializer_program(initializer: Callable, shape: tuple[int, ...], dtype: Any, sharding: Any) -> Callable:
    """The program of one variable of this initializer, shape, dtype and sharding, for a typed
    key (what a variable too large for a pool runs): ``program(key, key_words) -> value``.

    >>> program = initializer_program(jstate.initializers.ones, (2,), jnp.float32, None)
    >>> program(jax.random.key(0), np.zeros(2, np.uint32))
    Array([1., 1.], dtype=float32)
    """
    key_type = jax.eval_shape(lambda: jax.random.key(0))
    return single_program(trace(initializer, tuple(shape), np.dtype(dtype), key_type), sharding)


def pooled_program(
    traceds: Sequence[Traced], shardings: Sequence[Any], ensemble: int = 0, folded: bool = False
) -> Callable:
    """A jitted ``program(key, key_words[n, 2]) -> [value, ...]`` for n poolable variables
    (with `ensemble`, for a batch of keys; `folded`: see `own_keys`).

    One threefry op draws every variable's bits, then each initializer runs on its own slice.
    """
    cache_key = ("pooled", tuple(t.fingerprint for t in traceds), tuple(shardings), ensemble, folded)
    traceds = tuple(traceds)
    mesh, gather = _draws.mesh_of(shardings), _draws.replicated(shardings)
    out = None if all(s is None for s in shardings) else list(shardings)
    run = functools.partial(_pooled, traceds, mesh, gather, folded)
    return _cached(cache_key, lambda: jit(run, out, ensemble))


def jit(fn: Callable, shardings: Any, ensemble: int, in_axes: Any = (0, None), one_device: bool = False) -> Callable:
    """``jax.jit(fn)`` creating its outputs on `shardings`; with `ensemble`, of ``jax.vmap(fn)``
    over a batch of keys, every output with a leading, unsharded ensemble axis. (Threefry draws
    each element from its own key and counter, so each member gets the bits its key gives alone.)

    With `one_device`, where every output is replicated over a mesh (`replica_device`), the
    program is compiled for one of its devices and its outputs are then copied to the others:
    partitioned over the mesh, XLA computes every replicated value on every device. Worth it for
    costly values (a Flax model's truncated normals: the transformer LM of
    ``benchmarks/bench_init_scale.py`` on 8 CPU devices, later calls 0.41 s -> 0.28 s), not for
    pools of cheap ones (the 100-shape model's glorot pools, gathered once then cut on every
    device, ran 1.2x slower copied). Each device still holds just its replicas, plus temporaries
    on one.
    """
    if ensemble:
        fn = jax.vmap(fn, in_axes=in_axes)
        shardings = jax.tree.map(_ensembles.batched_sharding, shardings)
    device = replica_device(shardings) if one_device else None
    # (outputs without a placement go where init's key is, also those that do not read it; placed
    # ones need not read a key committed elsewhere, which a program that kept it would refuse)
    program = jax.jit(fn, out_shardings=shardings, keep_unused=not jax.tree.leaves(shardings))
    home = replicated_home(shardings)
    if device is None and home is None:
        return program
    one = None if device is None else jax.jit(fn, out_shardings=SingleDeviceSharding(device))

    def run(*args: Any) -> Any:
        if one is None or any(isinstance(a, jax.core.Tracer) or _typed_by_mesh(a) for a in jax.tree.leaves(args)):
            # init under `jax.jit` or `jax.vmap` (placed by the caller's program), or inputs whose
            # type holds their mesh (Explicit axes), which a one-device program cannot take
            return program(*onto(args, home))
        return jax.device_put(one(*jax.device_put(args, device)), shardings)

    run.lower = program.lower if one is None else one.lower  # (what runs, for XLA's text and memory analysis)
    return run


def replicated_home(shardings: Any) -> Any:
    """A replicated sharding over the devices of a program's outputs, where they are all placed
    on one set of devices, else None."""
    leaves = jax.tree.leaves(shardings)
    if not leaves or len({frozenset(s.device_set) for s in leaves}) != 1:
        return None
    first = leaves[0]
    if isinstance(first, NamedSharding):  # (Auto axes: a key typed by an Explicit mesh meets a pool's Auto one)
        return NamedSharding(_draws.auto_axes(first.mesh), PartitionSpec())
    return SingleDeviceSharding(next(iter(first.device_set))) if len(first.device_set) == 1 else None


def onto(args: Any, home: Any) -> Any:
    """`args` with each committed array on other devices than `home`'s (init's key committed to
    one device, the keys derived from it) put there: JAX refuses to compile a committed argument
    on other devices than the outputs. (A key is a few bytes.)"""
    if home is None:
        return args

    def move(a: Any) -> Any:
        if not isinstance(a, jax.Array) or isinstance(a, jax.core.Tracer) or not a.committed:
            return a
        elsewhere = a.sharding.device_set != home.device_set
        # (also an ensemble's keys replicated over a mesh of Explicit axes, typed by that mesh:
        # JAX compiles no program of them and outputs on its Auto copy. Keys only: a value's
        # placement is kept.)
        key = jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
        retyped = key and _typed_by_mesh(a) and not _typed_by_mesh_sharding(home)
        return jax.device_put(a, home) if elsewhere or retyped else a

    return jax.tree.map(move, args)


def _typed_by_mesh(value: Any) -> bool:
    return _typed_by_mesh_sharding(getattr(value, "sharding", None))


def _typed_by_mesh_sharding(sharding: Any) -> bool:
    return isinstance(sharding, NamedSharding) and AxisType.Explicit in sharding.mesh.axis_types


def replica_device(shardings: Any) -> Any:
    """The device that computes a program's outputs when all of them are replicated over one
    mesh of several devices (its first device), else None."""
    leaves = jax.tree.leaves(shardings)
    if not leaves or not all(isinstance(s, NamedSharding) and s.is_fully_replicated for s in leaves):
        return None
    devices = {tuple(s.mesh.devices.flat) for s in leaves}
    return next(iter(devices))[0] if len(devices) == 1 and len(next(iter(devices))) > 1 else None


def _pooled(
    traceds: tuple[Traced, ...], mesh: Any, gather: bool, folded: bool, key: jax.Array, words: jax.Array
) -> list[jax.Array]:
    keys = own_keys(key, words, folded)
    owners = [i for i, t in enumerate(traceds) for _ in t.draws]
    shapes = [shape for t in traceds for _, shape in t.draws]
    data = jax.random.key_data(keys)[np.asarray(owners, dtype=np.int32)] if owners else None
    slices = iter(_draws.pool(data, shapes, mesh, gather))
    draw = lambda key, bit_width, shape: _draws.as_bits(next(slices), bit_width, shape)  # noqa: E731
    return [evaluate(t, keys[i], draw) for i, t in enumerate(traceds)]


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


def _cached(cache_key: tuple, make: Callable[[], Callable]) -> Callable:
    # (per setting of `jax_threefry_partitionable`: a program evaluates a plan's traced jaxprs,
    # which draw the bits of the setting they were traced under, see `init._plan`)
    cache_key = (*cache_key, bool(jax.config.jax_threefry_partitionable))
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
