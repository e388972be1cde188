"""Initializers ``init(key, shape, dtype) -> array`` that take TensorFlow's arguments.

``zeros`` and ``ones`` are initializers themselves; the others build one: ``normal(stddev=0.35)``,
``glorot_uniform()``. Any function with that signature works as well (all of
`jax.nn.initializers`, or your own). The work is `jax.nn.initializers`'; these add only what it
lacks (a mean, a lower bound), and for the arguments it shares they return its initializers
unchanged, so their values are exactly `jax.nn.initializers`'.

  jstate.initializers                       TensorFlow 1
  zeros, ones                               tf.zeros_initializer(), tf.ones_initializer()
  constant(value)                           tf.constant_initializer(value)
  normal(stddev=1.0, mean=0.0)              tf.random_normal_initializer(mean, stddev)
  truncated_normal(stddev=1.0, mean=0.0)    tf.truncated_normal_initializer(mean, stddev)
  uniform(minval=0.0, maxval=1.0)           tf.random_uniform_initializer(minval, maxval)
  variance_scaling(scale, mode, distribution)  tf.variance_scaling_initializer(...)
  glorot_uniform(), glorot_normal()         tf.glorot_uniform_initializer(), tf.glorot_normal_initializer()
  he_uniform(), he_normal()                 tf.initializers.he_uniform(), tf.initializers.he_normal()
  lecun_uniform(), lecun_normal()           tf.initializers.lecun_uniform(), tf.initializers.lecun_normal()
  orthogonal(scale=1.0)                     tf.orthogonal_initializer(gain)
  delta_orthogonal(scale=1.0)               tf.initializers.convolutional_delta_orthogonal(gain)

``xavier_uniform``/``xavier_normal`` are ``glorot_uniform``/``glorot_normal``, and
``kaiming_uniform``/``kaiming_normal`` are ``he_uniform``/``he_normal``, as in JAX.

Defaults are TensorFlow's (``stddev=1.0``, ``maxval=1.0``), not `jax.nn.initializers`' (0.01).
Positional arguments keep JAX's order (``normal(0.35)`` is a standard deviation, ``uniform(0.3)``
an upper bound); ``mean`` and ``minval`` are keyword-only, because TF's positional order
(``mean`` first) and JAX's (``dtype`` second) disagree.

Each initializer is a closure over plain values (floats, strings, dtypes), so two calls with the
same arguments share one compiled init program (`jstate.init` keys programs by them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.nn import initializers as _jax

__all__ = [
    "constant",
    "delta_orthogonal",
    "glorot_normal",
    "glorot_uniform",
    "he_normal",
    "he_uniform",
    "kaiming_normal",
    "kaiming_uniform",
    "lecun_normal",
    "lecun_uniform",
    "normal",
    "ones",
    "orthogonal",
    "truncated_normal",
    "uniform",
    "variance_scaling",
    "xavier_normal",
    "xavier_uniform",
    "zeros",
]

Initializer = Callable[..., jax.Array]
Axes = int | Sequence[int]


def zeros(key: jax.Array, shape: Sequence[int], dtype: Any = None) -> jax.Array:
    """Zeros (TF's ``tf.zeros_initializer()``); an initializer itself, no call needed.

    >>> jstate.initializers.zeros(jax.random.key(0), (2,), jnp.float32)
    Array([0., 0.], dtype=float32)
    """
    return _jax.zeros(key, shape, dtype)


def ones(key: jax.Array, shape: Sequence[int], dtype: Any = None) -> jax.Array:
    """Ones (TF's ``tf.ones_initializer()``); an initializer itself, no call needed.

    >>> jstate.initializers.ones(jax.random.key(0), (2,), jnp.int32)
    Array([1, 1], dtype=int32)
    """
    return _jax.ones(key, shape, dtype)


def constant(value: Any = 0.0, dtype: Any = None) -> Initializer:
    """Every element `value` (TF's ``tf.constant_initializer(value)``).

    >>> jstate.initializers.constant(-7)(jax.random.key(0), (2,), jnp.float32)
    Array([-7., -7.], dtype=float32)
    """
    return _jax.constant(value, dtype)


def normal(stddev: float = 1.0, dtype: Any = None, *, mean: float = 0.0) -> Initializer:
    """Normally distributed values (TF's ``tf.random_normal_initializer(mean, stddev)``).

    Args:
      stddev: the standard deviation (the first positional argument, as in JAX).
      dtype: the dtype used when the initializer is called without one.
      mean: the mean (keyword-only).

    >>> init = jstate.initializers.normal(stddev=0.35, mean=1.0)
    >>> x = init(jax.random.key(0), (10_000,), jnp.float32)
    >>> round(float(x.mean()), 1), round(float(x.std()), 2)
    (1.0, 0.35)
    """
    _check_dtype("normal", dtype, "normal(stddev=..., mean=...)")
    if mean == 0.0:
        return _jax.normal(stddev, dtype)

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = dtype) -> jax.Array:
        # `jax.nn.initializers.normal` has no mean; TF's adds one to the scaled samples.
        value = _jax.normal(stddev)(key, shape, dtype)
        return value + jnp.asarray(mean, value.dtype)

    return init


def truncated_normal(
    stddev: float = 1.0, dtype: Any = None, lower: float = -2.0, upper: float = 2.0, *, mean: float = 0.0
) -> Initializer:
    """Normal values within 2 standard deviations of the mean (TF's
    ``tf.truncated_normal_initializer(mean, stddev)``).

    As in TF (and JAX), `stddev` is the standard deviation before truncation; samples outside
    ``mean + [lower, upper] * stddev`` are redrawn.

    >>> x = jstate.initializers.truncated_normal(0.5, mean=3.0)(jax.random.key(0), (1000,), jnp.float32)
    >>> bool((x >= 2.0).all() and (x <= 4.0).all())
    True
    """
    _check_dtype("truncated_normal", dtype, "truncated_normal(stddev=..., mean=...)")
    if mean == 0.0:
        return _jax.truncated_normal(stddev, dtype, lower, upper)

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = dtype) -> jax.Array:
        # `jax.nn.initializers.truncated_normal` has no mean; TF's adds one after scaling.
        value = _jax.truncated_normal(stddev, None, lower, upper)(key, shape, dtype)
        return value + jnp.asarray(mean, value.dtype)

    return init


def uniform(
    scale: float | None = None, dtype: Any = None, *, minval: float = 0.0, maxval: float | None = None
) -> Initializer:
    """Uniformly distributed values in ``[minval, maxval)`` (TF's
    ``tf.random_uniform_initializer(minval, maxval)``).

    Args:
      scale: the upper bound, as JAX's ``uniform(scale)``; the same as `maxval`.
      dtype: the dtype used when the initializer is called without one.
      minval: the lower bound (keyword-only).
      maxval: the upper bound; 1.0 when neither it nor `scale` is given.

    Raises:
      ValueError: both `scale` and `maxval` are given.

    >>> x = jstate.initializers.uniform(minval=-1.0, maxval=1.0)(jax.random.key(0), (1000,), jnp.float32)
    >>> bool((x >= -1.0).all() and (x < 1.0).all() and (x < 0).any())
    True
    """
    _check_dtype("uniform", dtype, "uniform(minval=..., maxval=...)")
    if scale is not None and maxval is not None:
        raise ValueError(f"`uniform` takes `scale` ({scale}) or `maxval` ({maxval}), the same bound, not both.")
    maxval = 1.0 if scale is None and maxval is None else (scale if maxval is None else maxval)
    if minval == 0.0:
        return _jax.uniform(maxval, dtype)

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = dtype) -> jax.Array:
        # `jax.nn.initializers.uniform` starts at 0; TF's takes a lower bound.
        dtype = jax.dtypes.canonicalize_dtype(jnp.float_) if dtype is None else dtype
        return jax.random.uniform(key, shape, dtype, minval, maxval)

    return init


def variance_scaling(
    scale: float = 1.0,
    mode: str = "fan_in",
    distribution: str = "truncated_normal",
    in_axis: Axes = -2,
    out_axis: Axes = -1,
    batch_axis: Axes = (),
    dtype: Any = None,
) -> Initializer:
    """Values with variance ``scale / n``, `n` from the shape (TF's ``tf.variance_scaling_initializer``).

    Args:
      scale: the variance's numerator.
      mode: ``"fan_in"``, ``"fan_out"``, ``"fan_avg"`` or ``"fan_geo_avg"``: which of the
        kernel's input and output sizes is `n`.
      distribution: ``"truncated_normal"`` (TF's default; the standard deviation after
        truncation is ``sqrt(scale / n)``), ``"normal"`` or its TF name ``"untruncated_normal"``
        (not truncated; TF1's deprecated ``"normal"`` meant truncated), or ``"uniform"``.
      in_axis, out_axis, batch_axis: which axes of the shape are inputs, outputs and batch.
      dtype: the dtype used when the initializer is called without one.

    >>> init = jstate.initializers.variance_scaling(2.0, "fan_in", "uniform")
    >>> x = init(jax.random.key(0), (50, 3), jnp.float32)
    >>> bool((abs(x) <= (3 * 2.0 / 50) ** 0.5).all())
    True
    """
    if distribution == "untruncated_normal":
        distribution = "normal"
    return _jax.variance_scaling(scale, mode, distribution, in_axis, out_axis, batch_axis, dtype)


def glorot_uniform(in_axis: Axes = -2, out_axis: Axes = -1, batch_axis: Axes = (), dtype: Any = None) -> Initializer:
    """Glorot (Xavier) uniform: ``variance_scaling(1.0, "fan_avg", "uniform")`` (TF's
    ``tf.glorot_uniform_initializer()``).

    >>> jstate.initializers.glorot_uniform()(jax.random.key(0), (784, 200), jnp.float32).shape
    (784, 200)
    """
    return _jax.glorot_uniform(in_axis, out_axis, batch_axis, dtype)


def glorot_normal(in_axis: Axes = -2, out_axis: Axes = -1, batch_axis: Axes = (), dtype: Any = None) -> Initializer:
    """Glorot (Xavier) normal: ``variance_scaling(1.0, "fan_avg", "truncated_normal")`` (TF's
    ``tf.glorot_normal_initializer()``).

    >>> jstate.initializers.glorot_normal()(jax.random.key(0), (3, 2), jnp.bfloat16).dtype
    dtype(bfloat16)
    """
    return _jax.glorot_normal(in_axis, out_axis, batch_axis, dtype)


def he_uniform(in_axis: Axes = -2, out_axis: Axes = -1, batch_axis: Axes = (), dtype: Any = None) -> Initializer:
    """He (Kaiming) uniform: ``variance_scaling(2.0, "fan_in", "uniform")`` (TF's
    ``tf.initializers.he_uniform()``).

    >>> jstate.initializers.he_uniform()(jax.random.key(0), (3, 3, 16, 32), jnp.float32).shape
    (3, 3, 16, 32)
    """
    return _jax.he_uniform(in_axis, out_axis, batch_axis, dtype)


def he_normal(in_axis: Axes = -2, out_axis: Axes = -1, batch_axis: Axes = (), dtype: Any = None) -> Initializer:
    """He (Kaiming) normal: ``variance_scaling(2.0, "fan_in", "truncated_normal")`` (TF's
    ``tf.initializers.he_normal()``).

    >>> jstate.initializers.he_normal()(jax.random.key(0), (64, 32), jnp.float32).shape
    (64, 32)
    """
    return _jax.he_normal(in_axis, out_axis, batch_axis, dtype)


def lecun_uniform(in_axis: Axes = -2, out_axis: Axes = -1, batch_axis: Axes = (), dtype: Any = None) -> Initializer:
    """LeCun uniform: ``variance_scaling(1.0, "fan_in", "uniform")`` (TF's
    ``tf.initializers.lecun_uniform()``).

    >>> jstate.initializers.lecun_uniform()(jax.random.key(0), (64, 32), jnp.float32).shape
    (64, 32)
    """
    return _jax.lecun_uniform(in_axis, out_axis, batch_axis, dtype)


def lecun_normal(in_axis: Axes = -2, out_axis: Axes = -1, batch_axis: Axes = (), dtype: Any = None) -> Initializer:
    """LeCun normal: ``variance_scaling(1.0, "fan_in", "truncated_normal")`` (TF's
    ``tf.initializers.lecun_normal()``).

    >>> jstate.initializers.lecun_normal()(jax.random.key(0), (64, 32), jnp.float32).shape
    (64, 32)
    """
    return _jax.lecun_normal(in_axis, out_axis, batch_axis, dtype)


xavier_uniform = glorot_uniform
xavier_normal = glorot_normal
kaiming_uniform = he_uniform
kaiming_normal = he_normal


def orthogonal(scale: float = 1.0, column_axis: int = -1, dtype: Any = None) -> Initializer:
    """A random orthogonal matrix times `scale` (TF's ``tf.orthogonal_initializer(gain)``).

    >>> q = jstate.initializers.orthogonal()(jax.random.key(0), (3, 3), jnp.float32)
    >>> bool(jnp.allclose(q @ q.T, jnp.eye(3), atol=1e-5))
    True
    """
    return _jax.orthogonal(scale, column_axis, dtype)


def delta_orthogonal(scale: float = 1.0, column_axis: int = -1, dtype: Any = None) -> Initializer:
    """A convolution kernel that is an orthogonal matrix at its center and zero elsewhere (TF's
    ``tf.initializers.convolutional_delta_orthogonal(gain)``); the shape must be 3-D to 5-D.

    >>> k = jstate.initializers.delta_orthogonal()(jax.random.key(0), (3, 4, 4), jnp.float32)
    >>> bool((k[0] == 0).all() and jnp.allclose(k[1] @ k[1].T, jnp.eye(4), atol=1e-5))
    True
    """
    return _jax.delta_orthogonal(scale, column_axis, dtype)


def _check_dtype(name: str, dtype: Any, keywords: str) -> None:
    """TF's initializers take (mean, stddev) and (minval, maxval) positionally; JAX's, which these
    extend, take (stddev, dtype) and (scale, dtype). A number where the dtype goes is TF's order:
    refuse it rather than compute other values."""
    if isinstance(dtype, (int, float)) and not isinstance(dtype, bool):
        raise TypeError(
            f"`{name}`'s second argument is a dtype (JAX's order), got the number {dtype!r}. For TensorFlow's "
            f"arguments, name them: `jstate.initializers.{keywords}`."
        )
