"""`Scope`: what a model function receives, and the record of what it declares."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.sharding import Mesh

from ..core import names as _names
from ..core.errors import InitializerError, InvalidNameError, PlacementError
from . import placement as _placement
from . import programs as _programs
from .balance import Loads
from .spec import VariableSpec

_RNG_DOMAIN = 0x726E67  # "rng"
Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


@dataclasses.dataclass
class Record:
    """Everything one trace of a model declared, in declaration order."""

    mesh: Mesh | None
    rules: _placement.Rules
    soft: bool = False  # soft placement: a device that does not exist falls back to the default
    loads: Loads = dataclasses.field(default_factory=Loads)  # what round-robins placed so far
    specs: dict[str, VariableSpec] = dataclasses.field(default_factory=dict)
    values: list[jax.Array] = dataclasses.field(default_factory=list)
    # Per variable: (traced initializer, name hash) for initializer variables, None for array values.
    steps: list[tuple[_programs.Traced, np.ndarray] | None] = dataclasses.field(default_factory=list)
    # Initializers traced so far, by (identity, shape, dtype): equal ones are traced once.
    traced: dict[Any, _programs.Traced] = dataclasses.field(default_factory=dict)
    initializers: list[Callable] = dataclasses.field(default_factory=list)  # one of each traced
    blocks: list[Any] = dataclasses.field(default_factory=list)
    # Compute values from other values op by op, as eager JAX does (`flax_model(exact_init=True)`:
    # XLA's fusion of a whole program may round differently in the last bit).
    eager: bool = False
    # Declare variables with initializers as placeholders (`declared_p`); False: as jitted calls
    # of their initializers, for a model that declares one inside `jax.jit` or `jax.checkpoint`
    # (see `init._trace`).
    placeholders: bool = True
    calls: dict[Any, Callable] = dataclasses.field(default_factory=dict)  # those calls, by traced initializer
    declaring: str | None = None  # the variable whose declaration is running
    last: str | None = None  # the last variable fully declared

    def trace(self, init: Callable, shape: tuple[int, ...], dtype: np.dtype, key: jax.Array) -> _programs.Traced:
        """`init` traced for this shape and dtype."""
        cache_key = (_programs.initializer_identity(init), shape, dtype, key.shape, key.dtype)
        found = self.traced.get(cache_key)
        if found is None:
            self.initializers.append(init)
            found = _programs.trace(init, shape, dtype, jax.ShapeDtypeStruct(key.shape, key.dtype))
            self.traced[cache_key] = found
        return found

    def declare(
        self, traced: _programs.Traced, key: jax.Array, key_words: np.ndarray, shape: tuple[int, ...], dtype: np.dtype
    ) -> jax.Array:
        """A declared variable's value in the model's trace: a placeholder (`declared_p`), or
        without `placeholders` a jitted call of its initializer (JAX's own primitives only)."""
        if self.placeholders:
            return declared_p.bind(key, index=len(self.specs), shape=shape, dtype=dtype)
        call = self.calls.get(id(traced))
        if call is None:
            call = jax.jit(lambda k, words: _programs.evaluate(traced, _programs.fold(k, words)))
            self.calls[id(traced)] = call
        return call(key, key_words)


# In the model's trace, a variable with an initializer is a placeholder of its shape and dtype
# (`index`: its place in declaration order), read from init's key (so it is staged in the model's
# trace, also under `jax.ensure_compile_time_eval`): `init`'s programs compute its value, and a
# value computed from it is computed from theirs (`init._inputs`), so the trace need not hold how.
# Binding a jitted call of the initializer there cost 80-150 us a declaration, and more for
# each new shape (0.1-0.15 s of the first call of a model of 1,000 layers or 100 shapes).
declared_p = Primitive("jstate_declared")
declared_p.def_abstract_eval(lambda key, *, index, shape, dtype: jax.core.ShapedArray(shape, dtype))


@declared_p.def_impl
def _declared_impl(key: Any, *, index: int, shape: tuple[int, ...], dtype: np.dtype) -> jax.Array:
    raise AssertionError(f"jstate: the value of declared variable {index} is computed by `init`'s programs.")


class Scope:
    """Declares variables under a name prefix. Model functions receive the root Scope.

    A model is a function ``model(s: Scope) -> None`` (it may return anything; the result is
    ignored). It is traced like a `jax.jit` function: its Python code runs once per model, mesh and
    rules, and every `variable` call returns the variable's *initial value* as a traced array, so
    one variable can be initialized from another's (TensorFlow's ``initialized_value()``).

    >>> def model(s):
    ...     w = s.variable("w", jstate.initializers.normal(0.1), (3, 3))
    ...     s.scope("head").variable("b", w[0] * 0.0)
    """

    __slots__ = ("_record", "_key", "_prefix")

    def __init__(self, record: Record, key: jax.Array, prefix: str = ""):
        self._record, self._key, self._prefix = record, key, prefix

    @property
    def name(self) -> str:
        """This scope's full name ("" for the root)."""
        return self._prefix

    def scope(self, name: str) -> Scope:
        """A child scope: variables declared in it are named ``"<this scope>/<name>/..."``.

        >>> def model(s):
        ...     s.scope("layer1").scope("dense").variable("kernel", jnp.zeros((2, 3)))
        >>> list(jstate.abstract(model).specs)
        ['layer1/dense/kernel']
        """
        _names.check_part(name, f"Scope {name!r} under {self._prefix or 'the root'}")
        return Scope(self._record, self._key, _names.join(self._prefix, name))

    def make_rng(self, name: str) -> jax.Array:
        """A PRNG key for computing initial values by hand, derived from init's key and
        ``"<this scope>/<name>"`` (like a variable's own key, it ignores declaration order).

        >>> def model(s):
        ...     s.variable("noise", 0.1 * jax.random.normal(s.make_rng("noise"), (3,)))
        >>> jstate.init(model, jax.random.key(0))["noise"].shape
        (3,)
        """
        full = _names.join(self._prefix, name)
        words = _names.name_hash(full)
        key = jax.random.fold_in(jax.random.fold_in(self._key, words[0]), words[1])
        return jax.random.fold_in(key, _RNG_DOMAIN)  # one more fold: never a variable's own key

    @contextlib.contextmanager
    def placement(self, spec: Any) -> Iterator[None]:
        """Place every variable declared inside the block on `spec` (TF's ``with tf.device``).

        `spec` is any device spec (see `jstate.explain_placement`), or `jstate.round_robin`
        (TF's ``replica_device_setter``); a variable's own ``device=`` or ``sharding=`` still wins,
        and the innermost block wins over outer ones. ``s.placement(None)`` puts its variables on
        JAX's default device, clearing outer blocks and overriding the rules (TF's
        ``tf.device(None)``).

        >>> def model(s):
        ...     with s.placement("cpu:1"):
        ...         s.variable("w", jnp.zeros(2))
        >>> str(jstate.abstract(model).placement("w"))
        'cpu:1 (from placement block)'
        >>> def model(s):
        ...     with s.placement("cpu:1"), s.placement(None):
        ...         s.variable("w", jnp.zeros(2))
        >>> str(jstate.abstract(model, rules=[("w", "cpu:2")]).placement("w"))
        'default (from placement block)'
        """
        self._record.blocks.append(spec)
        try:
            yield
        finally:
            self._record.blocks.pop()

    def variable(
        self,
        name: str,
        init: Initializer | jax.typing.ArrayLike,
        shape: tuple[int, ...] | None = None,
        dtype: jax.typing.DTypeLike | None = None,
        *,
        device: Any = None,
        sharding: Any = None,
        trainable: bool = True,
        **options: Any,
    ) -> jax.Array:
        """Declare a variable and return its initial value.

        Args:
          name: the variable's name within this scope; the full name is ``"<scope>/<name>"``.
          init: an initializer ``init(key, shape, dtype) -> array`` (any of
            `jstate.initializers` or `jax.nn.initializers`), or an array value, which may be
            computed from other variables' initial values.
          shape: required with an initializer; inferred from an array value.
          dtype: defaults to float32 with an initializer, to the value's dtype otherwise.
          device: pin the variable to one device (e.g. "cpu:0", "/gpu:1", a `jax.Device`).
          sharding: a `jax.sharding.Sharding`, or a `PartitionSpec` over init's ``mesh=``.
          trainable: False leaves it out of `State.trainable` (TF's ``trainable=False``), e.g.
            a step counter; `State.non_trainable` holds it.
          **options: extra metadata kept in the variable's `VariableSpec.options`.

        Returns:
          The initial value (traced while the model is being traced).

        Raises:
          InvalidNameError: for a malformed or already declared name.
          InitializerError: for an initializer that fails or returns the wrong shape or dtype.
          PlacementError: for a device or sharding that cannot hold the variable.

        >>> def model(s):
        ...     w = s.variable("w", jstate.initializers.ones, (2, 3), jnp.bfloat16)
        ...     s.variable("w_t", w.T)  # computed from w's initial value
        >>> jstate.init(model, jax.random.key(0))["w_t"][:, 0]
        Array([1, 1, 1], dtype=bfloat16)
        """
        record = self._record
        full = _names.join(self._prefix, name) if isinstance(name, str) else name
        _names.check_name(full)
        if full in record.specs:
            raise InvalidNameError(f"Variable '{full}' is declared twice. Variable names must be unique.")
        if device is not None and sharding is not None:
            raise PlacementError(f"Variable '{full}': give `device=` or `sharding=`, not both.")
        record.declaring = full
        if not isinstance(trainable, bool):
            raise TypeError(f"Variable '{full}': `trainable` is True or False, got {trainable!r}.")
        own = None
        if device is not None:
            own = (_placement.Origin.DEVICE, device)
        elif sharding is not None:
            own = (_placement.Origin.SHARDING, sharding)
        block = record.blocks[-1] if record.blocks else _placement.NO_BLOCK

        if callable(init):
            shape, dtype = _check_shape(full, shape), np.dtype(dtype or jnp.float32)
            if _narrowed(dtype) != dtype:  # (the initializer would return another dtype)
                raise InitializerError(_X64.format(name=full, dtype=dtype.name, narrow=_narrowed(dtype).name))
            placement = self._place(full, shape, dtype, own, block)
            key_words = _names.name_hash(full)
            try:
                traced = record.trace(init, shape, dtype, self._key)
                value = record.declare(traced, self._key, key_words, shape, dtype)
            except InitializerError as e:
                raise InitializerError(f"Variable '{full}': {e}") from None
            except Exception as e:
                raise InitializerError(
                    f"Variable '{full}': initializer {_short(init)} failed when called as "
                    f"`init(key, shape={shape}, dtype={dtype.name})`: {type(e).__name__}: {e}"
                ) from e
            step = (traced, key_words)
        else:
            value = _as_value(full, init, shape, dtype)
            shape, dtype = value.shape, value.dtype
            placement = self._place(full, shape, dtype, own, block)
            step = None

        options = tuple(sorted(options.items()))
        record.specs[full] = VariableSpec(full, shape, dtype, placement, options, trainable)
        record.values.append(value)
        record.steps.append(step)
        record.declaring, record.last = None, full
        return value

    def _place(self, name: str, shape: tuple[int, ...], dtype: np.dtype, own: Any, block: Any) -> _placement.Placement:
        r = self._record
        nbytes = math.prod(shape) * dtype.itemsize  # (not np.dtype: PRNG key dtypes have an itemsize too)
        return _placement.choose(name, shape, own, block, r.rules, r.mesh, nbytes=nbytes, loads=r.loads, soft=r.soft)


def _check_shape(name: str, shape: Any) -> tuple[int, ...]:
    if shape is None:
        raise InitializerError(
            f"Variable '{name}': a shape is required with an initializer, e.g. "
            f"`s.variable({name.rsplit('/', 1)[-1]!r}, init, (784, 200))`."
        )
    if isinstance(shape, int):
        shape = (shape,)
    try:
        shape = tuple(int(d) for d in shape)
    except TypeError:
        raise InitializerError(f"Variable '{name}': shape must be a tuple of ints, got {shape!r}.") from None
    if any(d < 0 for d in shape):
        raise InitializerError(f"Variable '{name}': shape {shape} has a negative dimension.")
    return shape


def _as_value(name: str, init: Any, shape: Any, dtype: Any) -> jax.Array:
    try:
        value = jnp.asarray(init)
    except TypeError as e:
        raise InitializerError(
            f"Variable '{name}': `init` must be an initializer `init(key, shape, dtype)` or an array, "
            f"got {type(init).__name__}."
        ) from e
    # An explicit dtype casts; otherwise keep the value's, made strong so it stays fixed.
    if dtype is not None and _narrowed(np.dtype(dtype)) != np.dtype(dtype):
        dtype, wanted = _narrowed(np.dtype(dtype)), np.dtype(dtype)
        message = _X64.format(name=name, dtype=wanted.name, narrow=dtype.name)
        warnings.warn(f"{message} It is declared {dtype.name} now.", UserWarning, stacklevel=3)
    value = jax.lax.convert_element_type(value, np.dtype(dtype) if dtype is not None else value.dtype)
    if shape is not None and tuple(shape) != value.shape:
        raise InitializerError(
            f"Variable '{name}': declared shape {tuple(shape)} but its initial value has shape {value.shape}."
        )
    return value


_X64 = (
    "Variable '{name}' is declared {dtype}, but JAX's 64-bit types are off, so JAX makes it {narrow}. "
    'Turn them on at the start of the program, before any array is created: `jax.config.update("jax_enable_x64", '
    "True)` (or set the environment variable JAX_ENABLE_X64=1); or declare it {narrow}."
)


def _narrowed(dtype: np.dtype) -> np.dtype:
    """The dtype JAX gives arrays asked to be `dtype` (32-bit where 64-bit types are off)."""
    return np.dtype(jax.dtypes.canonicalize_dtype(dtype))


def _short(fn: Any) -> str:
    if isinstance(fn, functools.partial):
        return _short(fn.func)
    return getattr(fn, "__qualname__", None) or type(fn).__name__
