"""Which variables a Saver handles, and under which names they appear in a checkpoint.

Pure functions over flat "a/b/c" names; no Orbax here. Valid forms of ``var_list``:

  None                                   every variable, under its own name
  ["weights", "biases"]                  these variables, under their own names
  ["encoder/"]                           every variable in scope "encoder", under its own name
  {"my_v2": "v2"}                        State variable "v2", named "my_v2" in the checkpoint
  {"encoder/": "model/encoder/"}         State scope "model/encoder/" as checkpoint scope "encoder/"
  [(r"^model/(.*)$", r"enc/\\1")]         regex over State names -> checkpoint name template, first
                                         match wins (t5x-style); a None template skips the variable

Dicts go from checkpoint name to State name, like TensorFlow's ``Saver({"my_v2": v2})`` and
``assignment_map``; list items can mix names, scopes and regex rules.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

from ._errors import MappingError, unknown_names
from ._names import check_name
from ._state import State

VarList = None | Iterable[Any] | Mapping[str, str]


@dataclasses.dataclass(frozen=True)
class _Rule:
    kind: str  # "name", "scope" or "regex"
    state: Any  # State name, State scope prefix, or compiled regex over State names
    checkpoint: str | None  # checkpoint name, scope prefix, or template (None: skip)


@dataclasses.dataclass(frozen=True)
class NameMap:
    """A compiled ``var_list``: maps State names to checkpoint names."""

    rules: tuple[_Rule, ...] | None  # None: every variable under its own name

    def resolve(self, names: Iterable[str], what: str = "the State") -> dict[str, str]:
        """``{State name: checkpoint name}`` for the `names` this map handles.

        Raises:
          MappingError: a name or scope the map mentions is not among `names`, or two
            variables would share one checkpoint name.
        """
        names = sorted(names)
        if self.rules is None:
            return {n: n for n in names}
        declared = set(names)
        for rule in self.rules:
            if rule.kind == "name" and rule.state not in declared:
                raise unknown_names("The Saver names variable", [rule.state], declared, f"(looked in {what})")
            if rule.kind == "scope" and not any(n.startswith(rule.state) for n in names):
                raise MappingError(f"The Saver's scope '{rule.state}' matches no variable of {what}.")
        out: dict[str, str] = {}
        for n in names:
            target = self._apply(n)
            if target is not None:
                out[n] = target
        _check_one_to_one(out)
        return out

    def _apply(self, name: str) -> str | None:
        for rule in self.rules:
            if rule.kind == "name" and rule.state == name:
                return rule.checkpoint
            if rule.kind == "scope" and name.startswith(rule.state):
                return rule.checkpoint + name[len(rule.state) :]
            if rule.kind == "regex" and rule.state.search(name):
                return None if rule.checkpoint is None else rule.state.sub(rule.checkpoint, name, count=1)
        return None


def compile_var_list(var_list: VarList) -> NameMap:
    """Check a ``var_list`` (see the module docstring) and compile it into a `NameMap`."""
    if var_list is None:
        return NameMap(None)
    if isinstance(var_list, str):
        raise MappingError(f"`var_list` is the string {var_list!r}; pass a list of names: [{var_list!r}].")
    if isinstance(var_list, State):  # a Mapping too, of names to arrays
        raise MappingError(_STATE_AS_VAR_LIST)
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
        rules = [_item(item) for item in var_list]
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


def _item(item: Any) -> _Rule:
    if isinstance(item, str):
        return _pair(item, item)
    if isinstance(item, tuple) and len(item) == 2:
        pattern, template = item
        try:
            return _Rule("regex", re.compile(pattern), template)
        except (re.error, TypeError) as e:
            raise MappingError(f"Saver rule {item!r}: the pattern does not compile ({e}).") from None
    raise MappingError(
        f"Saver `var_list` item {_what(item)} is not a name, a scope ending in '/', or a (regex, template) pair."
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
