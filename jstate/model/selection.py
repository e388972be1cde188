"""Which variables a State holds, and under which names: the work behind `State.subset`,
`trainable`, `non_trainable` and `rename`.

These work on a State's parts (``{name: VariableSpec}`` and ``{name: value}``) and return new
ones, as `updates` does for what the values may become; `State` puts the parts together again.
A variable keeps its declaration (placement, `trainable` flag, options) through all of them;
`rename` changes only its name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from ..core import names as _names
from ..core.errors import InvalidNameError, unknown_names
from .spec import VariableSpec

Parts = tuple[dict[str, VariableSpec], dict[str, Any]]


def subset(specs: Mapping[str, VariableSpec], values: Mapping[str, Any], names: Iterable[str]) -> Parts:
    """The declarations and values of the variables `names` only.

    Args:
      specs: every declared variable of the State.
      values: the State's values by name.
      names: variable names; one ending in "/" selects every variable in that scope.

    Returns:
      ``(specs, values)`` of the selected variables, initialized or not.

    Raises:
      UnknownVariableError: a name is not declared.

    >>> specs, values = subset(state.specs, dict(state), ["layer1/"])
    >>> list(specs), list(values)
    (['layer1/kernel'], ['layer1/kernel'])
    """
    chosen = {n: specs[n] for n in _names.select(names, specs, "`subset`")}
    return chosen, {n: values[n] for n in chosen if n in values}


def trainable(specs: Mapping[str, VariableSpec], values: Mapping[str, Any], flag: bool = True) -> Parts:
    """The declarations and values of the variables declared ``trainable=flag``.

    >>> list(trainable(state.specs, dict(state), flag=False)[0])
    []
    """
    return subset(specs, values, [n for n, s in specs.items() if s.trainable == flag])


def rename(specs: Mapping[str, VariableSpec], values: Mapping[str, Any], mapping: Mapping[str, str]) -> Parts:
    """The declarations and values with variables renamed by ``{old: new}``; others keep their names.

    Args:
      specs: every declared variable of the State.
      values: the State's values by name.
      mapping: ``{old name: new name}``.

    Returns:
      ``(specs, values)`` under the new names, each spec's `name` changed to match.

    Raises:
      UnknownVariableError: an old name is not declared.
      InvalidNameError: a new name is malformed, or two variables would share one.

    >>> specs, values = rename(state.specs, dict(state), {"w2": "copy/w2"})
    >>> specs["copy/w2"].name, "w2" in values
    ('copy/w2', False)
    """
    missing = [n for n in mapping if n not in specs]
    if missing:
        raise unknown_names("Cannot rename: variable", missing, specs, "")
    new_specs, new_values = {}, {}
    for n, spec in specs.items():
        new = _names.check_name(mapping.get(n, n))
        if new in new_specs:
            raise InvalidNameError(f"Cannot rename: two variables would be named '{new}'.")
        new_specs[new] = dataclasses.replace(spec, name=new)
        if n in values:
            new_values[new] = values[n]
    return new_specs, new_values
