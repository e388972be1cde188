"""`State`: an immutable mapping from variable names to arrays, and a JAX pytree.

A State is its `StateDef` (the declarations: static, the pytree's aux data, `statedef`) and its
values (the leaves). The rules of an update live in `updates`, which variables a State holds and
under which names in `selection`, ensembles in `ensembles`, placement in `placement`, and the
pytree <-> name conversions (NNX's included) in `jstate.core.tree`; the methods here put them
together, and keep the docstrings users read.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ..core import names as _names
from ..core import tree as _tree
from ..core.errors import uninitialized, unknown_names
from ..core.table import Table
from . import display as _display
from . import ensembles as _ensembles
from . import placement as _placement
from . import selection as _selection
from . import updates as _updates
from .placement import Placement
from .spec import VariableSpec, spec_of
from .statedef import StateDef, register


@register
class State(Mapping[str, jax.Array]):
    """An immutable mapping from variable name to array, and a JAX pytree.

    A State is never mutated: `assign`, `assign_add`, `merge`, `Saver.restore` and friends
    return a new State and leave the original unchanged, so always use the return value. It holds
    every variable a model declared; those without a value yet are static metadata (not leaves),
    and reading one raises `UninitializedError`. Mapping operations (``state[name]``, ``in``,
    ``len``, iteration in name order, ``.items()``) cover the initialized variables.

    It passes through `jax.jit` (also donated), `jax.grad`, `jax.tree.map` and optax with its
    structure unchanged. An initialized variable's spec has the dtype of the value it holds, so
    after ``jax.tree.map(lambda x: x.astype(jnp.bfloat16), state)`` the specs say bfloat16 and
    `assign` takes bfloat16 values. Likewise its shapes follow values that gained or lost leading
    axes, as `jax.vmap` makes them (an ensemble: `member`); other shape changes need `redeclare`.

    >>> state = jstate.init(model, jax.random.key(0))
    >>> state = state.assign("biases", jnp.ones(200))   # a new State
    """

    __slots__ = ("_layout", "_values")

    def __init__(self, values: Mapping[str, Any] | None = None):
        """A State holding `values` (name -> array); prefer `jstate.init` or `State.from_tree`."""
        other = State.from_tree(values or {}, flat=True)
        self._layout, self._values = other._layout, other._values

    @classmethod
    def _make(cls, layout: StateDef, values: dict[str, Any]) -> State:
        """The State of `layout` holding `values`, in `layout.names` order (unchecked)."""
        state = object.__new__(cls)
        state._layout, state._values = layout, values
        return state

    @classmethod
    def _build(cls, specs: Mapping[str, VariableSpec], values: Mapping[str, Any]) -> State:
        """The State declaring `specs` and holding `values` (unchecked)."""
        values = dict(sorted(values.items()))
        return cls._make(StateDef(specs, values), values)

    def _holding(self, values: dict[str, Any]) -> State:
        """This State's declarations holding `values` (unchecked).

        `values` is `_values` updated in its order, then any newly initialized names; the
        `StateDef` is new only if the names changed."""
        if len(values) == len(self._values):
            return State._make(self._layout, values)
        return State._build(self._layout.specs, values)

    # -- reading ---------------------------------------------------------------------------
    def __getitem__(self, name: str) -> jax.Array:
        try:
            return self._values[name]
        except KeyError:
            raise self._missing(name) from None

    def _missing(self, name: str) -> KeyError:
        if name in self._layout.specs:
            return uninitialized(name)
        return unknown_names("Variable", [name], self._layout.specs, "`state.specs` lists every declared variable.")

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, name: object) -> bool:
        return name in self._values

    __eq__ = object.__eq__  # arrays have no single truth value; States compare by identity.
    __hash__ = object.__hash__

    @property
    def specs(self) -> Mapping[str, VariableSpec]:
        """Every declared variable's `VariableSpec`, initialized or not, by name.

        An initialized variable's dtype is its value's (see the class docstring).

        >>> list(jstate.abstract(model).specs)
        ['biases', 'layer1/kernel', 'w2', 'weights']
        """
        values = self._values
        return {n: _updates.current(s, values.get(n)) for n, s in self._layout.specs.items()}

    def spec(self, name: str) -> VariableSpec:
        """The declaration of variable `name` (shape, dtype, placement).

        Raises:
          UnknownVariableError: `name` is not declared (with the closest declared names).

        >>> state.spec("layer1/kernel").shape
        (200, 10)
        """
        try:
            return _updates.current(self._layout.specs[name], self._values.get(name))
        except KeyError:
            raise self._missing(name) from None

    def placement(self, name: str) -> Placement:
        """Where variable `name` lives and which declaration or rule put it there.

        >>> str(jstate.abstract(model, rules=[("kernel", "cpu:1")]).placement("layer1/kernel"))
        "cpu:1 (from rule 0 ('kernel'))"
        """
        return self.spec(name).placement

    def is_initialized(self, name: str) -> bool:
        """Whether declared variable `name` holds a value (an undeclared name raises).

        >>> state.is_initialized("weights"), jstate.abstract(model).is_initialized("weights")
        (True, False)
        """
        self.spec(name)  # undeclared names raise
        return name in self._values

    def uninitialized(self) -> list[str]:
        """Names of declared variables that hold no value, sorted.

        >>> jstate.init(model, jax.random.key(0), only=["biases"]).uninitialized()
        ['layer1/kernel', 'w2', 'weights']
        """
        return [n for n in self._layout.specs if n not in self._values]

    def structs(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Every declared variable as a `jax.ShapeDtypeStruct` carrying its sharding.

        >>> jstate.abstract(model).structs()["weights"]
        ShapeDtypeStruct(shape=(784, 200), dtype=float32)
        """
        return {n: s.struct() for n, s in self.specs.items()}

    def shardings(self, default: jax.sharding.Sharding | None = None) -> State:
        """Each initialized variable's declared sharding, as a State of the same structure.

        The ``in_shardings`` / ``out_shardings`` of a `jax.jit` step taking or returning this
        State, so that every call after the first reuses the compiled step (why: the
        `jstate.model.sharding` module docstring). `jstate.shardings` covers a whole training
        pytree, optax states too.

        Args:
          default: the sharding of variables with no placement; None is "unspecified" to
            `jax.jit`, which then lets XLA place them.

        Returns:
          A State of shardings (or `default`), with this State's declarations.

        >>> mesh = jax.make_mesh((8,), ("x",))
        >>> P = jax.sharding.PartitionSpec
        >>> placed = jstate.init(model, jax.random.key(0), mesh=mesh, rules=[("kernel", P("x")), (".*", P())])
        >>> step = jax.jit(lambda st: st.assign_add("biases", 1.0), out_shardings=placed.shardings())
        >>> step(placed)["layer1/kernel"].sharding == placed.spec("layer1/kernel").sharding
        True
        """
        specs = self._layout.specs
        shardings = {n: specs[n].sharding for n in self._values}
        return State._make(self._layout, {n: default if s is None else s for n, s in shardings.items()})

    def constrain(self) -> State:
        """A State whose every variable is on its declared sharding, eagerly or under `jax.jit`.

        Under `jax.jit`, ``return state.constrain()`` keeps each variable where it was declared
        (as `assign` does), so the next call does not compile again (why: the
        `jstate.model.sharding` module docstring); eagerly it moves values that are elsewhere.
        Variables with no placement are left where they are. The original State is unchanged;
        use the return value.

        >>> mesh = jax.make_mesh((8,), ("x",))
        >>> P = jax.sharding.PartitionSpec
        >>> placed = jstate.init(model, jax.random.key(0), mesh=mesh, rules=[("kernel", P("x")), (".*", P())])
        >>> step = jax.jit(lambda st: jax.tree.map(lambda v: v * 2, st).constrain())
        >>> step(placed)["layer1/kernel"].sharding == placed.spec("layer1/kernel").sharding
        True
        """
        specs = self._layout.specs
        return State._make(
            self._layout, {n: _placement.constrain(v, specs[n].sharding) for n, v in self._values.items()}
        )

    # -- functional updates -----------------------------------------------------------------
    def assign(self, name: str | Mapping[str, Any], value: Any = None) -> State:
        """A new State with `name` set to `value` (or each ``{name: value}`` of a dict).

        The value must have the declared shape and dtype; a Python scalar is broadcast if it
        keeps the dtype (``1`` into a float variable, not ``1.5`` into an int one). The result
        lives on the variable's device or sharding, eagerly and under `jax.jit`. Assigning an
        uninitialized variable initializes it. The original State is unchanged.

        Args:
          name: a variable's name, or a dict ``{name: value}`` of several updates.
          value: its new value (an array or Python scalar); None with a dict.

        Returns:
          A new State holding the new values.

        Raises:
          SpecMismatchError: for a wrong shape or dtype (names the variable, declared vs given).
          UnknownVariableError: for an undeclared name.

        >>> new = state.assign("biases", jnp.ones(200))
        >>> new["biases"][:3], state["biases"][:3]  # the original is unchanged
        (Array([1., 1., 1.], dtype=float32), Array([0., 0., 0.], dtype=float32))
        >>> new = state.assign({"biases": 0.5, "layer1/kernel": 0.0})  # scalars are broadcast
        """
        return self._update(name, value, None, "assign")

    def assign_add(self, name: str | Mapping[str, Any], value: Any = None) -> State:
        """A new State with `value` added to variable `name` (arguments and errors: see `assign`).

        A Python scalar or an array that broadcasts to the variable's shape is added, if it keeps
        the dtype. The variable must hold a value (`UninitializedError` otherwise).

        Args:
          name: a variable's name, or a dict ``{name: value}`` of several updates.
          value: what to add; None with a dict.

        >>> state.assign_add("biases", 2.0)["biases"][:3]
        Array([2., 2., 2.], dtype=float32)
        """
        return self._update(name, value, operator.add, "assign_add")

    def assign_sub(self, name: str | Mapping[str, Any], value: Any = None) -> State:
        """A new State with `value` subtracted from variable `name` (see `assign_add`).

        Args:
          name: a variable's name, or a dict ``{name: value}`` of several updates.
          value: what to subtract; None with a dict.

        >>> state.assign_sub("biases", jnp.full(200, 0.5))["biases"][:3]
        Array([-0.5, -0.5, -0.5], dtype=float32)
        """
        return self._update(name, value, operator.sub, "assign_sub")

    def _update(self, name: Any, value: Any, op: Callable | None, verb: str) -> State:
        if isinstance(name, Mapping):
            if value is not None:
                raise TypeError(f"`{verb}` takes a dict of updates or one name and value, not both.")
            updates = name
        else:
            updates = {name: value}
        return self._holding(_updates.assign(self._layout.specs, self._values, updates, op, verb))

    def _replace_values(self, updates: Mapping[str, jax.Array]) -> State:
        """A State with `updates` as values of declared variables, unchecked (for restores)."""
        return self._holding({**self._values, **updates})

    # -- whole-State operations -------------------------------------------------------------
    def subset(self, names: Iterable[str]) -> State:
        """A State with only the variables `names`, declared ones, initialized or not.

        Args:
          names: variable names; one ending in "/" selects every variable in that scope, as in a
            Saver's ``var_list``.

        Raises:
          UnknownVariableError: a name is not declared.

        >>> list(state.subset(["weights", "biases"]))
        ['biases', 'weights']
        >>> list(state.subset(["layer1/"]))
        ['layer1/kernel']
        """
        return State._build(*_selection.subset(self._layout.specs, self._values, names))

    def trainable(self) -> State:
        """The variables declared trainable (the default), as a State: what `jax.grad` takes.

        `non_trainable` holds the others (``s.variable(..., trainable=False)``); `merge` joins
        the two again, eagerly or under `jax.jit`.

        >>> def counted(s):
        ...     s.variable("w", jnp.ones(3))
        ...     s.variable("step", jnp.zeros((), jnp.int32), trainable=False)
        >>> st = jstate.init(counted, jax.random.key(0))
        >>> list(st.trainable()), list(st.non_trainable())
        (['w'], ['step'])
        >>> grads = jax.grad(lambda p: (p["w"] ** 2).sum())(st.trainable())
        >>> st = st.merge(jax.tree.map(lambda p, g: p - 0.1 * g, st.trainable(), grads)).assign_add("step", 1)
        """
        return State._build(*_selection.trainable(self._layout.specs, self._values))

    def non_trainable(self) -> State:
        """The variables declared with ``trainable=False``, as a State (see `trainable`).

        >>> list(jstate.State({"w": jnp.ones(2)}).non_trainable())
        []
        """
        return State._build(*_selection.trainable(self._layout.specs, self._values, flag=False))

    def member(self, index: int) -> State:
        """Member `index` of an ensemble State: every variable indexed along its first axis, as
        an ordinary State with the member's declarations (shapes without that axis, shardings
        without its ``None``).

        An ensemble is what ``jstate.init(model, keys)`` (or ``jax.vmap`` of `jstate.init`)
        returns for a batch of keys; any State whose variables all have a first axis of the same
        length works. Eagerly or under `jax.jit`; the original State is unchanged.

        Args:
          index: which member, ``0 <= index < n`` (negative counts from the end).

        Raises:
          SpecMismatchError: a variable has no first axis, or one of another length.
          IndexError: `index` is out of range.

        >>> ensemble = jstate.init(model, jax.random.split(jax.random.key(0), 3))
        >>> one = ensemble.member(1)
        >>> one.spec("weights").shape, bool((one["weights"] == ensemble["weights"][1]).all())
        ((784, 200), True)
        """
        return State._build(*_ensembles.select(self.specs, self._values, index))

    def redeclare(self, name: str, value: Any) -> State:
        """A new State in which variable `name` has `value`'s shape and dtype, and holds `value`.

        TF's reshaping of a ``validate_shape=False`` variable. `assign` never changes a shape or dtype: this is the one explicit way. The placement is
        derived again for the new shape: a PartitionSpec or sharding (declared, or from a rule)
        is checked against it, and a single device is kept. It works eagerly and under
        `jax.jit`. The original State is unchanged; use the return value.

        Args:
          name: a declared variable.
          value: its new value, of any shape and dtype.

        Raises:
          UnknownVariableError: `name` is not declared.
          PlacementError: its placement cannot hold the new shape (names the old and new shape).

        >>> wider = state.redeclare("biases", jnp.zeros(300))
        >>> wider.spec("biases").shape, state.spec("biases").shape
        ((300,), (200,))
        """
        spec, value = _updates.redeclare(self.spec(name), value)
        return State._build({**self._layout.specs, name: spec}, {**self._values, name: value})

    def merge(self, other: State) -> State:
        """A State with the variables of both; where both hold a value, `other`'s wins.

        Where both declare a variable, this State's declaration is kept (its placement,
        `trainable` flag and options) and `other`'s value is assigned to it, as `assign` would:
        moved onto (or, under `jax.jit`, constrained to) the declared sharding. So
        ``state.merge(jstate.State({"biases": b}))`` keeps ``"biases"`` where the model placed
        it. Variables only `other` declares keep `other`'s declaration.

        Args:
          other: any State (its variables may be uninitialized).

        Raises:
          SpecMismatchError: a variable both declare has another shape or dtype in each.

        >>> merged = state.merge(jstate.State({"biases": jnp.ones(200), "step": jnp.zeros((), jnp.int32)}))
        >>> list(merged), merged["biases"][:3]
        (['biases', 'layer1/kernel', 'step', 'w2', 'weights'], Array([1., 1., 1.], dtype=float32))
        """
        return State._build(*_updates.merge(self._layout.specs, self._values, other._layout.specs, other._values))

    def rename(self, mapping: Mapping[str, str]) -> State:
        """A State whose variables are renamed by ``{old: new}``; names not in `mapping` stay.

        Raises:
          UnknownVariableError: an old name is not declared.
          InvalidNameError: a new name is malformed, or two variables would share one.

        >>> list(state.rename({"w2": "copy/weights"}))
        ['biases', 'copy/weights', 'layer1/kernel', 'weights']
        """
        return State._build(*_selection.rename(self._layout.specs, self._values, mapping))

    def replace_placement(self, mesh: jax.sharding.Mesh | None = None, rules: Any = None) -> State:
        """A State re-placed for `mesh` and `rules`, values moved to their new shardings.

        Placements a model declared (``device=``, ``sharding=``, ``s.placement``) are kept, with
        PartitionSpecs re-bound to the new mesh; every other variable follows the new rules.

        Args:
          mesh: the mesh PartitionSpecs are bound to (None: no mesh).
          rules: ``[(regex, placement), ...]``, as `jstate.init` takes them.

        Raises:
          PlacementError: a placement does not fit its variable on the new mesh.

        >>> mesh = jax.make_mesh((8,), ("x",))
        >>> placed = state.replace_placement(mesh, rules=[("weights|w2", jax.sharding.PartitionSpec("x"))])
        >>> placed.placement("weights").source, len(placed["weights"].sharding.device_set)
        ("rule 0 ('weights|w2')", 8)
        """
        return State._build(*_placement.replace(self._layout.specs, self._values, mesh, rules))

    # -- conversions (the work is in `core.tree`, which knows nothing of States) ---------------
    def tree(self, like: Any = None) -> Any:
        """The initialized variables as a nested dict, flax-params style: ``{"layer1": {"kernel": x}}``.

        Args:
          like: any pytree (e.g. an optax state): the result has its structure instead, each
            leaf taken from the variable its path names; the inverse of `State.from_tree`.

        Raises:
          InvalidNameError: without `like`, a name is also the scope of another ("a", "a/b").

        >>> jstate.State({"a/b": jnp.ones(2)}).tree()
        {'a': {'b': Array([1., 1.], dtype=float32)}}
        """
        return _tree.unflatten(self, like)

    @classmethod
    def from_tree(cls, tree: Any, *, flat: bool = False) -> State:
        """A State from any pytree of arrays: nested dicts, lists, optax states, Flax variables.

        Tree paths joined by "/" become names (``{"a": {"b": x}}`` -> ``"a/b"``, list items by
        index, named tuples by field). A `jax.ShapeDtypeStruct` leaf declares an uninitialized
        variable (its sharding, if any, becomes the placement).

        Args:
          tree: the pytree (arrays, NumPy values, Python numbers, `jax.ShapeDtypeStruct`).
          flat: `tree` is ``{name: array}`` already.

        Raises:
          InvalidNameError: a name is malformed, or two leaves have the same name.

        >>> jstate.State.from_tree({"a": {"b": jnp.ones(2)}, "c": [jnp.zeros(())]}).specs.keys()
        dict_keys(['a/b', 'c/0'])
        """
        specs, values = {}, {}
        for name, leaf in (dict(tree) if flat else _tree.flatten(tree)).items():
            _names.check_name(name)
            if not isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
                leaf = jnp.asarray(leaf)
            specs[name] = spec_of(name, leaf)
            if isinstance(leaf, jax.Array):
                values[name] = leaf
        return State._build(specs, values)

    def to_nnx(self) -> Any:
        """The initialized variables as an `nnx.State`, for ``nnx.update(module, ...)``.

        The same as ``jstate.to_nnx(state)``, which does the work (`jstate.core.tree`).

        >>> state.to_nnx()["layer1"]["kernel"].shape
        (200, 10)
        """
        return _tree.to_nnx(self)

    @classmethod
    def from_nnx(cls, source: Any) -> State:
        """A State from an NNX module or `nnx.State`, its variables named by their paths.

        ``jstate.from_nnx`` is this method.

        >>> from flax import nnx
        >>> list(jstate.State.from_nnx(nnx.Linear(2, 3, rngs=nnx.Rngs(0))))
        ['bias', 'kernel']
        """
        return cls.from_tree(_tree.from_nnx(source), flat=True)

    # -- display ----------------------------------------------------------------------------
    def table(self) -> Table:
        """The State as a `Table` (name, shape, dtype, sharding, bytes, initialized).

        >>> print(state.subset(["biases"]).table())
        State: 1 variables, 1 initialized, 800 B
        name    shape   dtype    sharding  bytes  initialized
        ------  ------  -------  --------  -----  -----------
        biases  (200,)  float32  default   800 B  yes
        """
        return _display.state_table(self.specs, self)

    def __repr__(self) -> str:
        return str(self.table())

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()


def report_uninitialized(state: State) -> list[str]:
    """Names of the State's declared variables that hold no value, sorted.

    TF's ``report_uninitialized_variables``; the same as ``state.uninitialized()``.

    >>> jstate.report_uninitialized(jstate.abstract(lambda s: s.variable("w", jnp.zeros(2))))
    ['w']
    """
    return state.uninitialized()


# `jstate.from_nnx`: the same conversion as the method (and `jstate.to_nnx` is `core.tree.to_nnx`).
from_nnx = State.from_nnx
