"""`init` and `abstract`: trace a model once, then compute only the variables asked for."""

from __future__ import annotations

import dataclasses
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend.core import ClosedJaxpr, Literal, Var
from jax.sharding import Mesh

from ..core.errors import (
    InitializerError,
    JStateError,
    ModelError,
    PlacementError,
    SpecMismatchError,
    shorten,
    unknown_names,
)
from ..core.table import Table
from . import draws as _draws
from . import ensembles as _ensembles
from . import freshness as _freshness
from . import placement as _placement
from . import programs as _programs
from . import scope as _scope
from . import threefry as _threefry
from .devices import describe
from .display import placement_table
from .scope import Record, Scope
from .spec import VariableSpec
from .state import State, StateDef

Model = Callable[[Scope], Any]


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One trace of a model: its declarations, and how to compute each initial value."""

    specs: tuple[VariableSpec, ...]  # declaration order
    steps: tuple[tuple[_programs.Traced, np.ndarray] | None, ...]  # (traced initializer, name hash) or None
    jaxpr: ClosedJaxpr  # key -> every initial value, for values computed from others
    layout: StateDef  # every variable declared, none initialized
    unused: tuple[tuple[int, str], ...]  # (index, pattern) of the rules that match no variable
    reads: _freshness.Reads  # the globals the model and its initializers read when traced
    eager: bool  # values computed from others are computed op by op (see `Record.eager`)
    fills: Mapping[int, np.ndarray]  # variables filled with one small constant, by index: its value
    # Compiled programs for values computed from others, by (derived, known) variable indices.
    derive: dict = dataclasses.field(default_factory=dict, compare=False)
    ensembles: dict = dataclasses.field(default_factory=dict, compare=False)  # n -> its `StateDef`


# Traces are cached per model function, like `jax.jit`'s: the model's Python runs once per
# model, mesh, rules, soft placement and key type, and again if a global that the model or one
# of its initializers read has been rebound since (unlike `jax.jit`, which keeps the old value).
_plans: weakref.WeakKeyDictionary[Callable, dict] = weakref.WeakKeyDictionary()
_plans_lock = threading.Lock()


def _plan(
    model: Model, key_type: jax.ShapeDtypeStruct, mesh: Mesh | None, rules: Any, soft: bool, unused_rules: str
) -> _Plan:
    if unused_rules not in _UNUSED_RULES:
        raise ValueError(f'`unused_rules=` is "error", "warn" or "ignore", got {unused_rules!r}.')
    compiled = _placement.compile_rules(rules)
    # A compiled regex's flags are part of it: `re.compile("w", re.I)` is not the rule "w".
    patterns = tuple((p.pattern, p.flags, t) for p, t in compiled)
    # (derived values pool their draws only under partitionable threefry: a plan made under one
    # setting of `jax_threefry_partitionable` gives the other's bits)
    partitionable = bool(jax.config.jax_threefry_partitionable)
    cache_key = (key_type.shape, key_type.dtype, mesh, patterns, bool(soft), partitionable)
    try:
        with _plans_lock:
            per_model = _plans.setdefault(model, {})
            plan = per_model.get(cache_key)
    except TypeError:  # a model that cannot be weakly referenced, or an unhashable rule target
        per_model, plan = None, None
    if plan is not None and not plan.reads.unchanged():
        plan = None
    if plan is None:  # traced outside any `except`, so a model's error is not chained to a KeyError
        # Traced outside the lock: threads tracing the same model at once each trace it (the
        # traces are equal), rather than one waiting on a model that may call `init` itself.
        plan = _trace(model, key_type, mesh, compiled, bool(soft))
        if per_model is not None:
            with _plans_lock:
                per_model[cache_key] = plan
    if plan.unused and unused_rules != "ignore":
        _unused_rules(model, plan, unused_rules)
    return plan


_UNUSED_RULES = ("error", "warn", "ignore")


def _unused_rules(model: Model, plan: _Plan, unused_rules: str) -> None:
    rules = " and ".join(f"{i} ({pattern!r})" for i, pattern in plan.unused)
    several = len(plan.unused) > 1
    message = (
        f"Placement rule{'s' if several else ''} {rules} match{'' if several else 'es'} no variable of model "
        f"`{getattr(model, '__qualname__', repr(model))}` (it declares {shorten(s.name for s in plan.specs)}). "
        'Fix the regex, or pass `unused_rules="warn"` (or "ignore") for rules shared with other models.'
    )
    if unused_rules == "error":
        raise PlacementError(message)
    warnings.warn(message, stacklevel=4)


def _trace(
    model: Model, key_type: jax.ShapeDtypeStruct, mesh: Mesh | None, rules: _placement.Rules, soft: bool
) -> _Plan:
    plan = _trace_once(model, key_type, Record(mesh, rules, soft))
    if not _placeholders_at_top(plan):
        # A variable declared inside `jax.jit` or `jax.checkpoint` (a helper of the model): its
        # placeholder is in their jaxpr, where `init` cannot replace it with its program's value.
        # Traced again with its initializer's call there instead (`Record.placeholders`).
        plan = _trace_once(model, key_type, Record(mesh, rules, soft, placeholders=False))
    return plan


def _placeholders_at_top(plan: _Plan) -> bool:
    """Whether every variable with an initializer is a placeholder of the model's own jaxpr
    (not one of a `jax.jit` or `jax.checkpoint` in it)."""
    j = plan.jaxpr.jaxpr
    made = {eqn.outvars[0]: eqn.params["index"] for eqn in j.eqns if eqn.primitive is _scope.declared_p}
    return all(
        step is None or (isinstance(out, Var) and made.get(out) == i)
        for i, (out, step) in enumerate(zip(j.outvars, plan.steps))
    )


def _trace_once(model: Model, key_type: jax.ShapeDtypeStruct, record: Record) -> _Plan:
    rules = record.rules

    def run(key):
        model(Scope(record, key))
        return list(record.values)

    try:
        jaxpr = jax.make_jaxpr(run)(key_type)
    except JStateError:
        raise
    except Exception as e:
        if record.declaring:
            where = f"while declaring variable '{record.declaring}'"
        elif record.last:
            where = f"after declaring variable '{record.last}' (the last one declared)"
        else:
            where = "before declaring any variable"
        name = getattr(model, "__qualname__", repr(model))
        raise ModelError(f"Model `{name}` failed {where}: {type(e).__name__}: {e}") from e
    specs = tuple(record.specs.values())
    unused = _placement.unused_rules(rules, [s.name for s in specs])
    reads = _freshness.Reads.of([model, *record.initializers])
    layout = StateDef({s.name: s for s in specs}, ())
    return _Plan(specs, tuple(record.steps), jaxpr, layout, unused, reads, record.eager, _fills(jaxpr, record.steps))


def _fills(jaxpr: ClosedJaxpr, steps: Sequence[Any]) -> dict[int, np.ndarray]:
    """The variables filled with one small constant (see `programs.FILL_MAX`), by index."""
    found = _programs.fills(jaxpr.jaxpr, jaxpr.jaxpr.outvars)
    for i, step in enumerate(steps):
        if step is not None:
            traced = step[0].jaxpr.jaxpr
            found[i] = _programs.fills(traced, traced.outvars)[0]
    return {i: value for i, value in enumerate(found) if value is not None}


def init(
    model: Model,
    key: jax.Array,
    *,
    only: Iterable[str] | None = None,
    state: State | None = None,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Any]] | None = None,
    soft_placement: bool = False,
    unused_rules: str = "error",
) -> State:
    """Initialize a model's variables with compiled XLA code (TF's ``global_variables_initializer``).

    Each variable's random key is derived from `key` and the variable's full name, so its initial
    value does not depend on which other variables exist, their order, `only`, `mesh` or `rules`.

    Args:
      model: a function ``model(s: Scope)`` that declares variables.
      key: a PRNG key (``jax.random.key(0)``; legacy uint32 keys work too), or a 1-D batch of
        n keys (``jax.random.split(key, n)``) for an ensemble of n models: every variable gets
        a leading axis of n, member i holding what ``init(model, keys[i])`` holds, and a
        sharding that leaves that axis unsharded (``P(None, *spec)``). `State.member` takes one
        out. ``jax.vmap(lambda k: jstate.init(model, k))(keys)`` gives the same State.
      only: initialize just these variables (TF's ``variables_initializer``); the rest stay
        declared but uninitialized. A scope (``"layer1"`` or ``"layer1/"``) names every
        variable in it. Variables they are computed from are evaluated, not kept.
      state: a State of this model; only its uninitialized variables are initialized, and its
        values are kept as they are (bit for bit).
      mesh: the `jax.sharding.Mesh` that PartitionSpecs refer to.
      rules: ``[(regex, spec), ...]``; a variable without its own placement takes the spec of
        the first regex that matches (``re.search``) its name. A spec may be
        `jstate.round_robin` (TF's ``replica_device_setter``).
      soft_placement: a device string that matches no device of this machine (``"/gpu:0"``
        on a CPU-only one) puts its variable on the default device, with a warning (when the
        model is traced), instead of raising (TF's ``allow_soft_placement``).
        `explain_placement` shows the fallback.
      unused_rules: what a rule whose regex matches no declared variable is: ``"error"``
        (the default: most often a typo), ``"warn"``, or ``"ignore"`` (rules shared by
        several models).

    Returns:
      A new State. Each variable is created directly on its device or sharding.

    Raises:
      UnknownVariableError: `only` names an undeclared variable.
      PlacementError: a device or sharding cannot hold a variable, or a rule matches none.
      ModelError, InitializerError, InvalidNameError: for a faulty model.

    >>> state = jstate.init(model, jax.random.key(0))
    >>> partial = jstate.init(model, jax.random.key(0), only=["w2"])
    >>> ensemble = jstate.init(model, jax.random.split(jax.random.key(0), 4))
    >>> ensemble.spec("layer1/kernel").shape, ensemble.member(2).spec("layer1/kernel").shape
    ((4, 200, 10), (200, 10))
    """
    if isinstance(only, str):
        raise TypeError(f"`only=` takes a list of names; got the string {only!r}. Write `only=[{only!r}]`.")
    if not hasattr(key, "dtype"):
        raise TypeError(f"`key` must be a PRNG key such as `jax.random.key(0)`, got {type(key).__name__} {key!r}.")
    ensemble = _ensemble_size(key)
    key_type = jax.ShapeDtypeStruct(key.shape[1:] if ensemble else key.shape, key.dtype)
    plan = _plan(model, key_type, mesh, rules, soft_placement, unused_rules)
    declared = _ensemble_layout(plan, ensemble).specs
    wanted = set(declared) if only is None else _only(only, declared)
    kept: dict[str, jax.Array] = {}
    if state is not None:
        _check_same_model(state, declared)
        kept = dict(state.items())
        wanted -= set(kept)

    values = _compute(plan, key, wanted, ensemble)
    values.update(kept)
    values = dict(sorted(values.items()))
    specs = declared if state is None else {**declared, **state._layout.specs}
    return State._make(StateDef(specs, values), values)


def abstract(
    model: Model,
    *,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Any]] | None = None,
    soft_placement: bool = False,
    unused_rules: str = "error",
    ensemble: int | None = None,
) -> State:
    """Every variable the model declares, none initialized, nothing computed.

    The result is a restore target: its specs carry shapes, dtypes and shardings. The
    arguments are `init`'s.

    Args:
      ensemble: n, for the declarations of ``jstate.init(model, keys)`` with n keys: every
        variable with a leading, unsharded axis of n.

    >>> abstract = jstate.abstract(model)
    >>> abstract.spec("weights").shape
    (784, 200)
    >>> jstate.abstract(model, ensemble=4).spec("weights").shape
    (4, 784, 200)
    """
    if ensemble is not None and (isinstance(ensemble, bool) or not isinstance(ensemble, int) or ensemble < 1):
        raise ValueError(f"`ensemble=` is the number of models, a positive int; got {ensemble!r}.")
    key_type = jax.eval_shape(lambda: jax.random.key(0))
    plan = _plan(model, key_type, mesh, rules, soft_placement, unused_rules)
    return State._make(_ensemble_layout(plan, ensemble or 0), {})


def _only(only: Iterable[str], declared: Mapping[str, VariableSpec]) -> set[str]:
    """The variables `only=` names: declared names, and scopes ("layer1" or "layer1/") for every
    variable in them, as TF's ``tf.compat.v1.get_collection(..., scope="layer1")``."""
    scopes = {n[:i] for n in declared for i, c in enumerate(n) if c == "/"}
    wanted, unknown = set(), []
    for name in only:
        if name in declared:
            wanted.add(name)
        elif isinstance(name, str) and name.rstrip("/") in scopes:
            prefix = name.rstrip("/") + "/"
            wanted.update(n for n in declared if n.startswith(prefix))
        else:
            unknown.append(name)
    if unknown:
        raise unknown_names(
            "`only=` variable",
            unknown,
            [*declared, *(f"{s}/" for s in scopes)],
            '`only=` takes declared names and scopes ("layer1" or "layer1/": every variable in it); '
            "`jstate.abstract(model).specs` lists the declared ones.",
        )
    return wanted


def _ensemble_size(key: jax.Array) -> int:
    """n for a 1-D batch of n keys (an ensemble), 0 for one key."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    axes = key.ndim - (0 if typed else 1)  # a legacy uint32 key is a (2,) array
    if axes <= 0:
        return 0
    if axes > 1:
        raise TypeError(
            f"`key` is one PRNG key or a 1-D batch of keys (an ensemble); got keys of shape "
            f"{key.shape if typed else key.shape[:-1]}. Flatten the batch: `keys.reshape(-1)`."
        )
    return key.shape[0]


def _ensemble_layout(plan: _Plan, ensemble: int) -> StateDef:
    """The plan's declarations, with a leading ensemble axis of `ensemble` (if not 0)."""
    if not ensemble:
        return plan.layout
    with _plans_lock:
        found = plan.ensembles.get(ensemble)
    if found is None:
        specs = {n: _ensembles.batched(s, (ensemble,)) for n, s in plan.layout.specs.items()}
        with _plans_lock:
            found = plan.ensembles.setdefault(ensemble, StateDef(specs, ()))
    return found


def explain_placement(
    model: Model,
    *,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Any]] | None = None,
    soft_placement: bool = False,
    unused_rules: str = "error",
) -> Table:
    """A table of where each variable would live: name, shape, sharding, bytes per device, and
    which declaration or rule placed it (with a round-robin or a soft-placement fallback, if
    one did). Nothing is computed; the arguments are `init`'s.

    >>> print(jstate.explain_placement(model, rules=[("kernel", "cpu:1")]))
    name           shape       dtype    sharding  bytes/device  source
    -------------  ----------  -------  --------  ------------  -----------------
    biases         (200,)      float32  default   800 B         default
    layer1/kernel  (200, 10)   float32  cpu:1     7.8 KiB       rule 0 ('kernel')
    w2             (784, 200)  float32  default   612.5 KiB     default
    weights        (784, 200)  float32  default   612.5 KiB     default
    """
    state = abstract(model, mesh=mesh, rules=rules, soft_placement=soft_placement, unused_rules=unused_rules)
    return placement_table(state.specs.values())


def _check_same_model(state: State, declared: dict[str, VariableSpec]) -> None:
    extra = [n for n in state.specs if n not in declared]
    if extra:
        raise unknown_names(
            "`state=` holds variable", extra, declared, "Pass a State of this model (e.g. from `jstate.abstract`)."
        )
    for n, spec in state.specs.items():
        d = declared[n]
        if (spec.shape, spec.dtype) != (d.shape, d.dtype):
            raise SpecMismatchError(
                f"`state=` holds variable '{n}' with shape {spec.shape} and dtype {spec.dtype.name}, "
                f"but the model declares shape {d.shape} and dtype {d.dtype.name}."
            )


def _compute(plan: _Plan, key: jax.Array, wanted: set[str], ensemble: int = 0) -> dict[str, jax.Array]:
    """Initial values of the `wanted` variables, each created on its own sharding (with
    `ensemble`, `key` is a batch of that many keys, and so is every value)."""
    values: dict[str, jax.Array] = {}
    derived: list[int] = []
    pools: dict[Any, list[int]] = {}  # poolable variables, by the devices they live on
    singles: dict[Any, list[int]] = {}  # the others, by initializer and sharding
    poolable = _draws.poolable_key(key) if not ensemble else _draws.poolable_key_type(plan.jaxpr.in_avals[0])
    traced_key = isinstance(key, jax.core.Tracer)  # (under `jax.jit` or `jax.vmap`: all in its program)
    # (a committed key's programs compute the variables without a placement where it is: so are their fills)
    placed_key = not traced_key and key.committed
    indices = [i for i, spec in enumerate(plan.specs) if spec.name in wanted]
    # (variables that wanted values are computed from: computed too, then dropped)
    inputs = _inputs(plan, [i for i in indices if plan.steps[i] is None]) - set(indices)
    for i in sorted([*indices, *inputs]):
        spec, step = plan.specs[i], plan.steps[i]
        # (an ensemble's fill is n members' bytes: past `FILL_MAX`, computed in place like any other)
        small = spec.nbytes * max(ensemble, 1) <= _programs.FILL_MAX
        if i in plan.fills and not traced_key and small and (spec.sharding is not None or not placed_key):
            values[spec.name] = _programs.filled(plan.fills[i], spec.shape, spec.sharding, ensemble)
            continue
        if step is None:
            derived.append(i)
            continue
        traced, key_words = step
        if poolable and traced.draws is not None and traced.size <= _draws.POOL_MAX:
            pools.setdefault((_devices(spec.sharding), bool(traced.draws)), []).append(i)
        else:
            singles.setdefault((traced.fingerprint, spec.sharding), []).append(i)
    own = None if ensemble else _threefry.words_of(key)
    folded = own is not None  # (`words` are then the variables' own keys', see `_key_words`)
    words = _key_words(plan, own, [i for group in (*singles.values(), *pools.values()) for i in group])
    for members in singles.values():
        per = _programs.side_by_side(plan.specs[members[0]].nbytes * max(ensemble, 1))
        for start in range(0, len(members), per):
            run = members[start : start + per]
            traced, sharding = plan.steps[run[0]][0], plan.specs[run[0]].sharding
            if len(run) == 1:
                program = _programs.single_program(traced, sharding, ensemble, folded)
                values[plan.specs[run[0]].name] = _run(plan, run, program, key, words[run[0]], ensemble)
                continue
            program = _programs.equal_program(traced, sharding, len(run), ensemble, folded)
            for i, value in zip(run, _run(plan, run, program, key, np.stack([words[i] for i in run]), ensemble)):
                values[plan.specs[i].name] = value
    for members in pools.values():
        for chunk in _padded(plan, _chunks(plan, members)):
            shardings = [plan.specs[i].sharding for i in chunk]
            program = _programs.pooled_program([plan.steps[i][0] for i in chunk], shardings, ensemble, folded)
            key_words = np.stack([words[i] for i in chunk])
            for i, value in zip(chunk, _run(plan, chunk, program, key, key_words, ensemble)):
                values[plan.specs[i].name] = value  # (a padding repeat computes its value again)
    if derived:
        _derive(plan, key, derived, values, ensemble)
    for i in inputs:
        del values[plan.specs[i].name]
    return values


def _inputs(plan: _Plan, derived: list[int]) -> set[int]:
    """The variables with initializers (by index) that the values of `derived` are computed from:
    the placeholders (`scope.declared_p`) their equations in the model's trace read."""
    if not derived:
        return set()
    j = plan.jaxpr.jaxpr
    needed = {j.outvars[i] for i in derived if isinstance(j.outvars[i], Var)}
    found = set()
    for eqn in reversed(j.eqns):
        if any(v in needed for v in eqn.outvars):
            if eqn.primitive is _scope.declared_p:
                found.add(eqn.params["index"])
            needed.update(v for v in eqn.invars if isinstance(v, Var))
    return found


def _key_words(plan: _Plan, key: np.ndarray | None, members: list[int]) -> dict[int, np.ndarray]:
    """What the programs of `members` take besides init's key: with the words of a `key` that
    can be folded here (`threefry.words_of`), each variable's own key's words (the programs then
    compile no `fold_in`), else its name hash, which they fold into init's key themselves."""
    names = [plan.steps[i][1] for i in members]
    if key is None or not members:
        return dict(zip(members, names))
    return dict(zip(members, _threefry.fold_names(key, np.stack(names))))


def _run(plan: _Plan, members: list[int], program: Callable, key: jax.Array, key_words: Any, ensemble: int) -> Any:
    """``program(key, key_words)``, where a failure of XLA's (an initializer that traces but does
    not compile, such as `orthogonal` in bfloat16 on a CPU) names the variable it comes from."""
    try:
        return program(key, key_words)
    except JStateError:
        raise
    except Exception as e:
        culprits = list(dict.fromkeys(members))
        if len(culprits) > 1:  # a pool: each compiled alone, to name the one that fails
            culprits = [i for i in culprits if not _compiles_alone(plan, i, key, ensemble)] or culprits
        spec = plan.specs[culprits[0]]
        what = (
            f"Variable '{spec.name}'"
            if len(culprits) == 1
            else f"Variables {shorten(plan.specs[i].name for i in culprits)}"
        )
        raise InitializerError(
            f"{what}: the initializer traced for shape {spec.shape} and dtype {spec.dtype.name}, but XLA could not "
            f"compile or run it: {type(e).__name__}: {e}. `jax.jit` of the initializer fails the same way; an "
            "initializer in a dtype the backend supports (float32, then `.astype`) may avoid it."
        ) from e


def _compiles_alone(plan: _Plan, i: int, key: jax.Array, ensemble: int) -> bool:
    traced, key_words = plan.steps[i]
    try:
        _programs.single_program(traced, plan.specs[i].sharding, ensemble).lower(key, key_words).compile()
    except Exception:
        return False
    return True


def _devices(sharding: Any) -> Any:
    """Variables of one pooled program live on one set of devices (or all on the default one)."""
    return None if sharding is None else tuple(sorted(d.id for d in sharding.device_set))


def _chunks(plan: _Plan, members: list[int]) -> list[list[int]]:
    """`members` in declaration order, cut into pools of bounded variables and random words."""
    sizes = [max(plan.steps[i][0].words, plan.steps[i][0].size) for i in members]
    return _draws.chunk(members, sizes, [(plan.steps[i][0].fingerprint, plan.specs[i].sharding) for i in members])


def _padded(plan: _Plan, chunks: list[list[int]]) -> list[list[int]]:
    """A last, short run of equal variables padded (with its last variable again) to the length
    of a full run of the same variables, so both share one compiled program (1,000 equal layers:
    one program, not two)."""

    def kind(chunk):
        found = {(plan.steps[i][0].fingerprint, plan.specs[i].sharding) for i in chunk}
        return found.pop() if len(found) == 1 else None

    full = {kind(c): len(c) for c in chunks if len(c) == _draws.CHUNK_VARIABLES}
    out = []
    for c in chunks:
        k = kind(c)
        out.append(c + [c[-1]] * (full[k] - len(c)) if k is not None and len(c) < full.get(k, 0) else c)
    return out


def _derive(plan: _Plan, key: jax.Array, derived: list[int], values: dict[str, jax.Array], ensemble: int) -> None:
    """Values computed from other values: one compiled program per set of devices, its outputs
    created on their declared shardings (so no device holds a whole sharded value)."""
    outvars = plan.jaxpr.jaxpr.outvars
    known = {
        outvars[i]: values[s.name] for i, s in enumerate(plan.specs) if s.name in values and isinstance(outvars[i], Var)
    }
    groups: dict[Any, list[int]] = {}
    for i in derived:
        groups.setdefault(_devices(plan.specs[i].sharding), []).append(i)
    for members in groups.values():
        program = None if plan.eager else _derive_program(plan, tuple(members), known, ensemble)
        if program is not None:
            program, inputs = program
            try:
                results = program(key, [known[v] for v in inputs])
            except ValueError as e:
                error = _mixed_devices(plan, members, known)
                if error is None:
                    raise
                raise error from e
            except JStateError:
                raise
            except Exception as e:  # (as `_run`, for one program of many values)
                raise InitializerError(
                    f"Variables {shorten(plan.specs[i].name for i in members)} traced, but XLA could not compile or "
                    f"run their program: {type(e).__name__}: {e}. `jax.jit` of the model's init fails the same way."
                ) from e
        else:
            results = _evaluate_eagerly(plan, key, members, known, ensemble)
        seen = {id(v) for v in values.values()}
        for i, value in zip(members, results):
            if not isinstance(value, jax.Array):  # a literal or constant of the jaxpr
                value = jax.numpy.asarray(value)
            elif id(value) in seen:  # `s.variable("w2", w)`: a leaf of its own, so donation works.
                value = value.copy()
            seen.add(id(value))
            values[plan.specs[i].name] = value


def _derive_program(plan: _Plan, members: tuple[int, ...], known: dict[Var, jax.Array], ensemble: int):
    """A jitted ``(key, inputs) -> values`` for the `members`, and the known variables it reads;
    None where its inputs and outputs do not share one set of devices (JAX cannot compile that)."""
    j = plan.jaxpr.jaxpr
    outputs = [j.outvars[i] for i in members]
    eqns, reads = _schedule(plan.jaxpr, outputs, set(known))
    inputs = tuple(v for v in reads if v in known)
    # (under `jax.vmap` or `jax.jit` of init, the inputs are tracers: placed by their programs)
    devices = {frozenset(known[v].sharding.device_set) for v in inputs if _committed(known[v])}
    shardings = [plan.specs[i].sharding for i in members]
    targets = {frozenset(s.device_set) for s in shardings if s is not None}
    if len(devices | targets) > 1:
        return None
    cache_key = (members, inputs, ensemble)
    program = plan.derive.get(cache_key)
    if program is None:
        consts = dict(zip(j.constvars, plan.jaxpr.consts))

        # One pool for every draw the values make (Flax's `module.init` draws once per
        # parameter), unless a key is computed from drawn bits.
        pool = _draws.poolable_key_type(j.invars[0].aval) and not _draws.keys_from_draws_in(eqns)
        # (replicated outputs are computed on one device, see `programs.jit`: its pool is not spread)
        mesh = None if _programs.replica_device(shardings) is not None else _draws.mesh_of(shardings)

        # The keys derived from init's key alone (Flax folds one in per module and parameter) are
        # computed before the program and passed to it as words: in it, each `fold_in` is a
        # threefry loop that XLA compiles on its own (33 in the transformer LM, most of its
        # compile). Folds of constants are hashed on the host (`threefry`: no program at all),
        # others op by op. (Integer arithmetic: the same bits either way.)
        before, rest, cut = _key_derivations(eqns, j.invars[0], outputs) if pool and not ensemble else ([], eqns, [])
        derivable = _threefry.derivable(before)

        def run(key, args, words):
            def once(draw):
                env = dict(consts)
                env.update(zip(j.invars, [key]))
                env.update(zip(inputs, args))
                if cut:
                    impl = jax.random.key_impl(key)
                    env.update(zip(cut, [jax.random.wrap_key_data(w, impl=impl) for w in words]))
                _draws.run_eqns(rest, env, draw)
                if _draws.recording(draw):  # (the pool's first pass computed the draws' keys only)
                    return []
                return [v.val if isinstance(v, Literal) else env[v] for v in outputs]

            return _draws.pooled_trace(once, mesh, _draws.replicated(shardings)) if pool else once(None)

        def keys_of(key):
            if not cut:
                return ()
            words = _threefry.words_of(key) if derivable else None
            if words is not None:
                return list(_threefry.derive(before, j.invars[0], words, cut))
            env = {j.invars[0]: key}
            _draws.run_eqns(before, env)
            return [jax.random.key_data(env[v]) for v in cut]

        out = None if all(s is None for s in shardings) else shardings
        jitted = _programs.jit(run, out, ensemble, in_axes=(0, 0, 0), one_device=True)
        # (unplaced values computed from committed ones are made where those are, as with an
        # uncommitted key: a key committed elsewhere is taken there)
        placed = [known[v].sharding for v in inputs if _committed(known[v])]
        home = _programs.replicated_home(placed) if placed and not targets else None
        program = lambda key, args: jitted(*_programs.onto((key, args, keys_of(key)), home))  # noqa: E731
        program.lower = lambda key, args: jitted.lower(key, args, keys_of(key))
        program = plan.derive.setdefault(cache_key, program)
    return program, inputs


def _key_derivations(eqns: list, key: Var, outputs: list) -> tuple[list, list, list]:
    """`eqns` split into those that derive keys from `key` alone (`fold_in` of a literal, `split`,
    and slicing the keys), the others, and the derived keys the others read."""
    keyed, before, rest = {key}, [], []
    for eqn in eqns:
        ins = [v for v in eqn.invars if isinstance(v, Var)]
        derives = (
            eqn.primitive.name in ("random_fold_in", "random_split", "slice", "squeeze", "reshape")
            and ins
            and all(v in keyed for v in ins)
            and all(jax.dtypes.issubdtype(v.aval.dtype, jax.dtypes.prng_key) for v in eqn.outvars)
        )
        if derives:
            before.append(eqn)
            keyed.update(eqn.outvars)
        else:
            rest.append(eqn)
    read = {v for eqn in rest for v in eqn.invars if isinstance(v, Var)} | {v for v in outputs if isinstance(v, Var)}
    # (in the order they are derived: a set's order differs between processes, and so would the
    # program's parameters, missing the persistent compilation cache)
    return before, rest, [v for eqn in before for v in eqn.outvars if v in read]


def _committed(value: Any) -> bool:
    return not isinstance(value, jax.core.Tracer) and value.committed


def _schedule(jaxpr: ClosedJaxpr, outputs: list[Any], known: set) -> tuple[list, list]:
    """The equations `outputs` need, in order, given the `known` variables; and every variable read."""
    j = jaxpr.jaxpr
    have = known | set(j.constvars) | set(j.invars)
    needed = {v for v in outputs if isinstance(v, Var) and v not in have}
    reads = [v for v in outputs if isinstance(v, Var) and v in known]
    schedule = []
    for eqn in reversed(j.eqns):
        if any(v in needed for v in eqn.outvars):
            schedule.append(eqn)
            for v in eqn.invars:
                if isinstance(v, Var):
                    if v in have:
                        reads.append(v)
                    else:
                        needed.add(v)
    return list(reversed(schedule)), list(dict.fromkeys(reads))


def _evaluate_eagerly(
    plan: _Plan, key: jax.Array, members: list[int], known: dict[Var, jax.Array], ensemble: int
) -> list[jax.Array]:
    """Values whose inputs live on other devices than they do: computed op by op where their
    inputs are, then moved (JAX compiles no program across device sets)."""
    outputs = [plan.jaxpr.jaxpr.outvars[i] for i in members]
    try:
        if ensemble:  # (each op batched over the members, still op by op)
            vars_ = list(known)
            run = lambda k, args: _evaluate(plan.jaxpr, k, outputs, dict(zip(vars_, args)))  # noqa: E731
            results = jax.vmap(run)(key, [known[v] for v in vars_])
        else:
            results = _evaluate(plan.jaxpr, key, outputs, known)
    except ValueError as e:
        error = _mixed_devices(plan, members, known)
        if error is None:
            raise
        raise error from e
    moved = []
    for i, value in zip(members, results):
        sharding = _ensembles.batched_sharding(plan.specs[i].sharding, 1 if ensemble else 0)
        moved.append(value if sharding is None or not isinstance(value, jax.Array) else jax.device_put(value, sharding))
    return moved


def _mixed_devices(plan: _Plan, derived: list[int], known: dict[Var, jax.Array]) -> PlacementError | None:
    """The error for the first derived variable computed from variables committed to different
    devices (JAX refuses to combine them), or None if no derived variable is."""
    j = plan.jaxpr.jaxpr
    names = {j.outvars[i]: s.name for i, s in enumerate(plan.specs)}
    for i in derived:
        needed, reads = {j.outvars[i]}, []
        for eqn in reversed(j.eqns):
            if any(v in needed for v in eqn.outvars):
                for v in eqn.invars:
                    if isinstance(v, Var) and v in known and v not in reads:
                        reads.append(v)
                    elif isinstance(v, Var):
                        needed.add(v)
        placed = {names[v]: known[v].sharding for v in reads if _committed(known[v])}
        if len({frozenset(s.device_set) for s in placed.values()}) > 1:
            shown = ", ".join(f"'{n}' on {describe(s)}" for n, s in sorted(placed.items()))
            return PlacementError(
                f"Cannot compute the initial value of variable '{plan.specs[i].name}': it is computed from "
                f"variables on different devices ({shown}), which JAX cannot combine in one computation. "
                "Place those variables on one device or mesh, or give it an initializer of its own."
            )
    return None


def _evaluate(jaxpr: ClosedJaxpr, key: jax.Array, outputs: list[Any], known: dict[Var, Any]) -> list[Any]:
    """Evaluate just the equations of `jaxpr` that `outputs` need, one dispatch each (for values
    computed from variables on other devices, which no one program can read)."""
    j = jaxpr.jaxpr
    env: dict[Var, Any] = dict(known)
    env.update(zip(j.constvars, jaxpr.consts))
    env.update(zip(j.invars, [key]))
    eqns, _ = _schedule(jaxpr, outputs, set(known))
    _draws.run_eqns(eqns, env)
    return [v.val if isinstance(v, Literal) else env[v] for v in outputs]
