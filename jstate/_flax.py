"""Flax interop: a linen Module as a jstate model. (NNX states convert in `_tree`.)"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ._scope import Scope
from ._tree import flatten


def flax_model(module: Any, *args: Any, method: str | None = None, **kwargs: Any) -> Callable[[Scope], None]:
    """A jstate model declaring the variables of a Flax linen `module`, named by their paths.

    ``module.init`` runs inside the model (traced like the rest of it) with a key from
    ``s.make_rng("flax")``; every variable it creates becomes a jstate variable named by its
    path, e.g. ``"params/Dense_0/kernel"``, so Saver mappings, placement rules and ``only=``
    work on them. `args` are example inputs (arrays or `jax.ShapeDtypeStruct`s).

    The values are computed on the default device and then moved to their shardings (they are
    array values to jstate, not initializer calls), so a model too large for one device should
    be restored from a checkpoint rather than initialized this way.

    >>> from flax import linen as nn
    >>> model = jstate.flax_model(nn.Dense(3), jnp.ones((1, 4)))
    >>> state = jstate.init(model, jax.random.key(0))
    >>> list(state), nn.Dense(3).apply(state.tree(), jnp.ones((1, 4))).shape
    (['params/bias', 'params/kernel'], (1, 3))
    """

    def model(s: Scope) -> None:
        inputs = [jnp.zeros(a.shape, a.dtype) if isinstance(a, jax.ShapeDtypeStruct) else a for a in args]
        init_kwargs = {"method": method} if method is not None else {}
        variables = module.init(s.make_rng("flax"), *inputs, **kwargs, **init_kwargs)
        for name, value in flatten(dict(variables)).items():
            s.variable(name, value)

    model.__qualname__ = f"flax_model({type(module).__name__})"
    return model
