"""Every public name of jstate has a docstring example that ``pytest --doctest-modules jstate`` runs."""

import doctest
import importlib
import inspect

import jstate


def _public_objects():
    """``(doctest name, object)`` for every public function, class and method reachable from
    `jstate`'s exports and defined in a jstate module. Properties, names inherited from builtins,
    `Mapping` or `Exception`, dataclass-generated methods (all dunders) and the
    `jstate.initializers` re-exports of `jax.nn.initializers` are left out."""
    found = {}
    for export, obj in vars(jstate).items():
        if export.startswith("_") or inspect.ismodule(obj):
            continue
        assert obj.__module__.startswith("jstate."), f"jstate.{export} is not defined in jstate"
        found[f"{obj.__module__}.{obj.__qualname__}"] = obj
        if not inspect.isclass(obj):
            continue
        for klass in obj.__mro__:
            if not klass.__module__.startswith("jstate."):
                continue  # builtins, Mapping, Exception, Enum, ABC
            for attr, member in vars(klass).items():
                if attr.startswith("_"):
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if inspect.isfunction(member):
                    found[f"{klass.__module__}.{klass.__qualname__}.{attr}"] = member
    return found


def _doctests():
    """Names of the docstrings in jstate's modules that hold at least one example, as doctest
    (and so ``pytest --doctest-modules``) finds them."""
    finder = doctest.DocTestFinder()
    names = set()
    for module_name in {obj.__module__ for obj in _public_objects().values()}:
        module = importlib.import_module(module_name)
        names.update(t.name for t in finder.find(module) if t.examples)
    return names


def test_every_public_name_has_a_runnable_example():
    objects = _public_objects()
    assert "jstate.model.state.State.assign" in objects and "jstate.model.scope.Scope.variable" in objects
    missing = sorted(set(objects) - _doctests())
    assert not missing, (
        f"{len(missing)} public names have no `>>>` example in their docstring: {', '.join(missing)}. "
        "Add a short runnable one (see the root conftest.py for the names examples can use)."
    )
