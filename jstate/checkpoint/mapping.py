"""Which variables a Saver handles, and under which names they appear in a checkpoint.

Pure functions over flat "a/b/c" names; no Orbax here. Valid forms of ``var_list``:

  None                                   every variable, under its own name
  ["weights", "biases"]                  these variables, under their own names
  ["encoder/"]                           every variable in scope "encoder", under its own name
  {"my_v2": "v2"}                        State variable "v2", named "my_v2" in the checkpoint
  {"encoder/": "model/encoder/"}         State scope "model/encoder/" as checkpoint scope "encoder/"
  [(r"^model/(.*)$", r"enc/\\1")]         regex over State names -> checkpoint name template, first
                                         match wins (t5x-style); a None template skips the variable
  [("layers/kernel", T.stack([...]))]     State name <- a transform of checkpoint entries
  [(("q", "k", "v"), T.split("qkv", 3))]  State names <- the parts of a split or unstack
                                         (`jstate.transforms`: stack, split, transpose, ...)

Dicts go from checkpoint name to State name, like TensorFlow's ``Saver({"my_v2": v2})`` and
``assignment_map``; list items can mix names, scopes and regex rules.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
from collections.abc import Iterable, Mapping
from typing import Any

from ..core.errors import MappingError, unknown_names
from ..core.names import check_name
from ..model.state import State
from ..transforms import Transform, brief, count

VarList = None | Iterable[Any] | Mapping[str, str]

# A rule that matches nothing would restore nothing and say nothing (scope and name rules already
# refuse to); the usual cause is writing the rule checkpoint-side first, as the dict form is.
_REGEX_MATCHES_NOTHING = (
    "The Saver's rule r'{pattern}' matches no variable of {what}. A (regex, template) rule matches "
    "State names and makes checkpoint names (the State side comes first, unlike the dict form "
    "{{checkpoint_name: state_name}}); `saver.plan(path, target)` shows what each rule does."
)


@dataclasses.dataclass(frozen=True)
class _Rule:
    kind: str  # "name", "scope", "regex" or "transform"
    state: Any  # State name, State scope prefix, or compiled regex over State names
    checkpoint: Any  # checkpoint name, scope prefix, template (None: skip), or a Transform


@dataclasses.dataclass(frozen=True)
class NameMap:
    """A compiled ``var_list``: maps State names to checkpoint names (`compile_var_list` makes one).

    >>> compile_var_list({"encoder/": "model/encoder/"}).resolve(["model/encoder/w", "head/w"])
    {'model/encoder/w': 'encoder/w'}
    """

    rules: tuple[_Rule, ...] | None  # None: every variable under its own name

    def resolve(self, names: Iterable[str], what: str = "the State") -> dict[str, str]:
        """``{State name: checkpoint name}`` for the `names` this map handles by name (those it
        handles through a transform are `transforms`').

        Args:
          names: the State's variable names.
          what: what holds them, for messages.

        Raises:
          UnknownVariableError: a name the map mentions is not among `names`.
          MappingError: a scope the map mentions matches none of `names`, or two variables
            would share one checkpoint name.

        >>> compile_var_list([(r"^model/(.*)$", r"\\1")]).resolve(["model/w", "step"])
        {'model/w': 'w'}
        >>> compile_var_list(["wieghts"]).resolve(["weights"])
        Traceback (most recent call last):
        ...
        jstate.core.errors.UnknownVariableError: The Saver names variable 'wieghts' is not declared. Did you mean 'weights'? ...
        """
        names = sorted(names)
        if self.rules is None:
            return {n: n for n in names}
        declared = set(names)
        for rule in self.rules:
            if rule.kind in ("name", "transform") and rule.state not in declared:
                raise unknown_names("The Saver names variable", [rule.state], declared, f"(looked in {what})")
            if rule.kind == "scope" and not any(n.startswith(rule.state) for n in names):
                raise MappingError(f"The Saver's scope '{rule.state}' matches no variable of {what}.")
            if rule.kind == "regex" and not any(rule.state.search(n) for n in names):
                raise MappingError(_REGEX_MATCHES_NOTHING.format(pattern=rule.state.pattern, what=what))
        transformed = self.transforms()
        out: dict[str, str] = {}
        for n in names:
            target = None if n in transformed else self._apply(n)  # a transform's target is its alone
            if target is not None:
                out[n] = target
        _check_one_to_one(out)
        return out

    def transforms(self) -> dict[str, Transform]:
        """``{State name: transform of checkpoint entries}`` for the variables the map fills
        through a transform (`jstate.transforms`); `resolve` checks that they are declared.

        >>> compile_var_list([("weights", T.transpose("linear/weight"))]).transforms()
        {'weights': transpose('linear/weight')}
        """
        return {r.state: r.checkpoint for r in self.rules or () if r.kind == "transform"}

    def _apply(self, name: str) -> str | None:
        """The checkpoint name of the first rule that matches `name`, None if none does (or a
        regex rule with template None does)."""
        by_name, patterns = self._index
        named = by_name.get(name)  # (position, rule) of the first name rule for `name`
        for i, rule in patterns:  # scope and regex rules before it come first
            if named is not None and i > named[0]:
                break
            if rule.kind == "scope" and name.startswith(rule.state):
                return rule.checkpoint + name[len(rule.state) :]
            if rule.kind == "regex" and rule.state.search(name):
                return None if rule.checkpoint is None else rule.state.sub(rule.checkpoint, name, count=1)
        return None if named is None else named[1].checkpoint

    @functools.cached_property
    def _index(self) -> tuple[dict[str, tuple[int, _Rule]], list[tuple[int, _Rule]]]:
        """Name rules by name, and the scope and regex rules, each with its position: a Saver of
        1,000 names resolves a 1,000-variable State in 1,000 lookups, not a million comparisons."""
        by_name: dict[str, tuple[int, _Rule]] = {}
        for i, rule in enumerate(self.rules or ()):
            if rule.kind == "name":
                by_name.setdefault(rule.state, (i, rule))
        patterns = [(i, rule) for i, rule in enumerate(self.rules or ()) if rule.kind in ("scope", "regex")]
        return by_name, patterns


def one_name(checkpoint: str, state: str) -> NameMap:
    """A map filling the one variable `state` from the entry `checkpoint`, whatever that entry is
    named (an empty name too, as Orbax names a bare array: no checkpoint name check, as for
    other writers' names).

    >>> one_name("", "value").resolve(["value"])
    {'value': ''}
    """
    return NameMap((_Rule("name", state, checkpoint),))


def compile_var_list(var_list: VarList) -> NameMap:
    """Check a ``var_list`` (see the module docstring) and compile it into a `NameMap`.

    Raises:
      MappingError: a malformed ``var_list`` (a string, a State, a variable mapped twice, ...).

    >>> compile_var_list(None).resolve(["b", "a"])
    {'a': 'a', 'b': 'b'}
    >>> compile_var_list("weights")
    Traceback (most recent call last):
    ...
    jstate.core.errors.MappingError: `var_list` is the string 'weights'; pass a list of names: ['weights'].
    """
    if var_list is None:
        return NameMap(None)
    if isinstance(var_list, str):
        raise MappingError(f"`var_list` is the string {var_list!r}; pass a list of names: [{var_list!r}].")
    if isinstance(var_list, State):  # a Mapping too, of names to arrays
        raise MappingError(_STATE_AS_VAR_LIST)
    if not isinstance(var_list, Iterable):
        raise MappingError(
            f"`var_list` is {var_list!r}; pass None, a list of names, scopes and (regex, template) rules, "
            "or a dict {checkpoint_name: state_name}."
        )
    if isinstance(var_list, Mapping):
        rules = [_pair(ckpt, state) for ckpt, state in var_list.items()]
        seen: dict[str, str] = {}
        for rule in rules:
            if rule.state in seen:
                raise MappingError(
                    f"The Saver maps State variable '{rule.state}' to two checkpoint names, "
                    f"'{seen[rule.state]}' and '{rule.checkpoint}'; give each variable one name."
                )
            seen[rule.state] = rule.checkpoint
    else:
        rules = [rule for item in var_list for rule in _item(item)]
        transformed = collections.Counter(r.state for r in rules if r.kind == "transform")
        named = {r.state for r in rules if r.kind == "name"}
        twice = [n for n, count in transformed.items() if count > 1 or n in named]
        if twice:
            raise MappingError(
                f"The Saver's `var_list` names State variable '{twice[0]}' twice; give each variable one rule."
            )
    return NameMap(tuple(rules))


_STATE_AS_VAR_LIST = (
    "`jstate.Saver(state)`: a Saver's `var_list` takes variable names, not a State. The State goes "
    "to `saver.save(state, path)`; write `jstate.Saver()` for every variable, or "
    '`jstate.Saver(["weights", "layer1/"])` for some.'
)


def _pair(ckpt: Any, state: Any) -> _Rule:
    if hasattr(state, "shape") and hasattr(state, "dtype"):  # TF's Saver({"my_v2": v2}) took the variable
        raise MappingError(
            f"Saver entry {ckpt!r} maps to {_what(state)}; a Saver maps checkpoint names to variable "
            "names: TF's `Saver({'my_v2': v2})` is `jstate.Saver({'my_v2': 'v2'})`."
        )
    if not isinstance(ckpt, str) or not isinstance(state, str):
        raise MappingError(
            f"Saver dict entries map a checkpoint name to a State name (both str), got {ckpt!r}: {state!r}."
        )
    if ckpt.endswith("/") != state.endswith("/"):
        raise MappingError(f"Saver entry {ckpt!r}: {state!r}: a scope (ending in '/') must map to a scope.")
    # Checkpoint names are checked when a Saver writes them: other writers' checkpoints may use
    # names jstate would not write (TF2's "layer/kernel/.ATTRIBUTES/VARIABLE_VALUE").
    if not ckpt.strip("/"):
        raise MappingError(f"Saver entry {ckpt!r}: {state!r}: the checkpoint name is empty.")
    if ckpt.endswith("/"):
        check_name(state[:-1])
        return _Rule("scope", state, ckpt)
    return _Rule("name", check_name(state), ckpt)


def _item(item: Any) -> list[_Rule]:
    if isinstance(item, str):
        return [_pair(item, item)]
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Transform):
        return _transform(*item)
    if isinstance(item, tuple) and len(item) == 2:
        pattern, template = item
        try:
            return [_Rule("regex", re.compile(pattern), template)]
        except (re.error, TypeError) as e:
            raise MappingError(f"Saver rule {item!r}: the pattern does not compile ({e}).") from None
    raise MappingError(
        f"Saver `var_list` item {_what(item)} is not a name, a scope ending in '/', a (regex, template) pair, or a (State name, transform) pair."
    )


def _transform(state: Any, transform: Transform) -> list[_Rule]:
    """Rules for ``(State name, transform)`` or ``((State names...), split or unstack)``."""
    if isinstance(state, str):
        if transform.multi:
            raise MappingError(
                f"Saver rule for '{state}': {brief(transform)} has several parts. Give a tuple of State names, "
                f"one per part, or take one part: {brief(transform[0])}."
            )
        return [_Rule("transform", check_name(state), transform)]
    if isinstance(state, (tuple, list)) and state and all(isinstance(n, str) for n in state):
        if not transform.multi:
            raise MappingError(
                f"Saver rule for {tuple(state)}: {brief(transform)} has one output; a tuple of State names takes "
                "the parts of a split or unstack."
            )
        parts = count(transform)
        if parts is not None and parts != len(state):
            raise MappingError(
                f"Saver rule for {tuple(state)}: {brief(transform)} has {parts} parts, and the rule names "
                f"{len(state)} State variables; name one per part."
            )
        return [_Rule("transform", check_name(n), transform._part(i, len(state))) for i, n in enumerate(state)]
    raise MappingError(
        f"Saver rule ({state!r}, {brief(transform)}): the first item is a State name or a tuple of them."
    )


def _what(value: Any) -> str:
    """`value` for a message: arrays by shape and dtype, never their contents."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"an array of shape {tuple(value.shape)} and dtype {value.dtype}"
    return repr(value)


def _check_one_to_one(mapping: Mapping[str, str]) -> None:
    seen: dict[str, str] = {}
    for state_name, ckpt_name in mapping.items():
        if ckpt_name in seen:
            raise MappingError(
                f"The Saver maps both '{seen[ckpt_name]}' and '{state_name}' to checkpoint name "
                f"'{ckpt_name}'; each variable needs a name of its own."
            )
        seen[ckpt_name] = state_name


def compile_ignore(ignore: Iterable[str] | None) -> tuple[re.Pattern, ...]:
    """Check and compile a restore's ``ignore``: regular expressions searched in checkpoint
    names (as a Saver's regex rules search State names), for the entries ``strict=True`` lets be.

    Valid forms::

      None                          nothing ignored
      [r"/Adam(_1)?$"]              TF1's Adam slots: every 'layer/kernel/Adam', '.../Adam_1'
      [r"^opt_state/", "^step$"]    a whole scope, one entry

    Raises:
      MappingError: a string instead of a list, or a pattern that does not compile.

    >>> [p.pattern for p in compile_ignore([r"/Adam(_1)?$", "^global_step$"])]
    ['/Adam(_1)?$', '^global_step$']
    """
    if ignore is None:
        return ()
    if isinstance(ignore, (str, re.Pattern)):
        shown = ignore if isinstance(ignore, str) else ignore.pattern
        raise MappingError(f"`ignore` is the pattern {shown!r} alone; pass a list of patterns: [{shown!r}].")
    if not isinstance(ignore, Iterable):
        raise MappingError(f"`ignore` is {_what(ignore)}; pass a list of regular expressions over checkpoint names.")
    out = []
    for pattern in ignore:
        try:
            out.append(re.compile(pattern))
        except (re.error, TypeError) as e:
            raise MappingError(f"`ignore` pattern {pattern!r} does not compile ({e}).") from None
    return tuple(out)
