"""The shardings of a training pytree, for `jax.jit`'s ``in_shardings`` and ``out_shardings``.

Why a training step needs them (the one place jstate says this): inside `jax.jit`, XLA
chooses the sharding of every value the program computes and of every result the shardings
are not given for. An optax update can hand back parameters and moments sharded unlike their
declaration, and a variable with no placement comes back wherever XLA put it (on a mesh
computation, usually replicated over the mesh); the next call, given those, compiles again.
Three ways keep every step after the first on the compiled program:

  ``out_shardings=jstate.shardings(train_state)``  a whole training pytree (optax states too)
  ``out_shardings=state.shardings()``              one State
  ``return state.constrain()`` inside the step     each variable constrained to its declaration

and for variables with no placement, a last rule ``(".*", P())`` or ``default=NamedSharding(mesh,
P())`` pins them too (None, "unspecified" to `jax.jit`, lets XLA choose).
"""

from __future__ import annotations

from typing import Any

import jax

from .state import State


def shardings(tree: Any, *, default: jax.sharding.Sharding | None = None) -> Any:
    """The sharding of every leaf of `tree`, in `tree`'s structure, for `jax.jit`.

    What `jax.jit` needs as ``in_shardings`` and ``out_shardings`` to keep a training state
    where it lives, step after step, with nothing compiled again (why: the
    `jstate.model.sharding` module docstring).

    Valid leaves, and what each gives:

      State                          its variables' declared shardings (`State.shardings`)
      committed jax.Array            its sharding
      jax.ShapeDtypeStruct           its sharding (``jax.eval_shape`` output: a restore target)
      anything else                  `default` (an uncommitted array, a Python number)

    and a State's variables with no placement get `default` too. None, the default, is
    "unspecified" to `jax.jit`; a sharding such as ``NamedSharding(mesh, P())`` (replicated)
    pins those leaves as well.

    Args:
      tree: any pytree: States, arrays, structs, optax states, Python numbers.
      default: the sharding of leaves that have none.

    Returns:
      A pytree of `tree`'s structure (a State gives a State) of shardings or `default`.

    >>> mesh = jax.make_mesh((8,), ("x",))
    >>> P, NamedSharding = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
    >>> params = jstate.init(model, jax.random.key(0), mesh=mesh, rules=[("kernel", P("x")), (".*", P())])
    >>> train_state = {"params": params, "step": jnp.zeros((), jnp.int32)}
    >>> placed = jstate.shardings(train_state, default=NamedSharding(mesh, P()))
    >>> step = jax.jit(lambda t: {**t, "step": t["step"] + 1}, in_shardings=(placed,), out_shardings=placed)
    >>> step(step(train_state))["step"].sharding == NamedSharding(mesh, P())
    True
    """

    def leaf(x: Any) -> Any:
        if isinstance(x, State):
            return x.shardings(default)
        if isinstance(x, jax.ShapeDtypeStruct):
            return default if x.sharding is None else x.sharding
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.committed:
            return x.sharding
        return default

    return jax.tree.map(leaf, tree, is_leaf=lambda x: isinstance(x, (State, jax.ShapeDtypeStruct)))
