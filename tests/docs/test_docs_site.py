"""The documentation site (docs/): the API reference is complete, and the guides' code runs.

Sphinx builds the site with warnings as errors (`.ci/run`), and executes every guide and notebook
as it does; these tests check what the build cannot see, and run the training recipe in the
ordinary `pytest` loop.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import jstate

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
# `.. autoclass:: jstate.Saver` and its indented options (`:members:`).
DIRECTIVE = re.compile(r"^\.\. auto(class|function|exception|module)::\s*(\S+)[ \t]*\n((?:[ \t]+:.*\n)*)", re.M)
CODE_CELL = re.compile(r"```\{code-cell\}[^\n]*\n(?::.*\n)*(.*?)```", re.S)


def _members(cls: type, inherited: bool = True) -> dict[str, object]:
    """The public methods and properties a jstate class defines, and with `inherited` those it
    inherits from jstate classes (not from builtins, `Mapping` or `Exception`). autodoc's
    ``:members:`` shows the first; ``:inherited-members:`` adds the second."""
    found = {}
    for klass in reversed(cls.__mro__) if inherited else [cls]:
        if not klass.__module__.startswith("jstate"):
            continue
        for attr, member in vars(klass).items():
            if attr.startswith("_"):
                continue
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if inspect.isfunction(member) or isinstance(member, property):
                found[attr] = member
    return found


def _public() -> dict[str, object]:
    """Every public name, as users spell it: ``jstate.X``, ``jstate.X.method``,
    ``jstate.initializers.x`` and ``jstate.transforms.x``."""
    names: dict[str, object] = {}
    exports = [(f"jstate.{n}", getattr(jstate, n)) for n in jstate.__all__ if not inspect.ismodule(getattr(jstate, n))]
    for module in (jstate.initializers, jstate.transforms):
        exports += [(f"{module.__name__}.{n}", getattr(module, n)) for n in module.__all__]
    for name, obj in exports:
        names[name] = obj
        if inspect.isclass(obj):
            names.update({f"{name}.{attr}": member for attr, member in _members(obj).items()})
    return names


def _documented() -> dict[str, set[str]]:
    """What docs/api/*.rst asks autodoc for: each target (with its members where `:members:` is
    given, and a module's ``__all__``) mapped to the pages that document it."""
    pages: dict[str, set[str]] = {}
    for page in sorted((DOCS / "api").glob("*.rst")):
        for kind, target, options in DIRECTIVE.findall(page.read_text()):
            members = ":members:" in options
            inherited = ":inherited-members:" in options
            if kind == "module":
                module = __import__(target, fromlist=["_"])
                targets = [f"{target}.{n}" for n in module.__all__] if members else []
            else:
                targets = [target]
            for name in targets:
                pages.setdefault(name, set()).add(page.name)
                obj = _public().get(name)
                if members and inspect.isclass(obj):
                    for attr in _members(obj, inherited):
                        pages.setdefault(f"{name}.{attr}", set()).add(page.name)
    return pages


def test_every_public_name_is_in_the_api_reference():
    documented = _documented()
    assert "jstate.Saver.restore" in documented and "jstate.initializers.glorot_uniform" in documented
    missing = sorted(set(_public()) - set(documented))
    assert not missing, (
        f"{len(missing)} public names are missing from the API reference: {', '.join(missing)}. "
        "Add an `.. autofunction::` or `.. autoclass:: ... :members:` line to the page of docs/api/ "
        "for its group."
    )
    twice = sorted(name for name, pages in documented.items() if len(pages) > 1)
    assert not twice, f"documented on several pages of docs/api/: {twice}"


def test_dunder_all_is_every_public_name_and_the_api_reference_its_top_level():
    assert len(set(jstate.__all__)) == len(jstate.__all__), "a name is listed twice in jstate.__all__"
    imported = {n for n, o in vars(jstate).items() if not n.startswith("_") and not inspect.ismodule(o)}
    listed = {n for n in jstate.__all__ if not inspect.ismodule(getattr(jstate, n))}
    assert listed == imported, f"jstate.__all__ lacks {sorted(imported - listed)}, or lists {sorted(listed - imported)}"
    top = {
        target.removeprefix("jstate.")
        for page in (DOCS / "api").glob("*.rst")
        for _, target, _ in DIRECTIVE.findall(page.read_text())
    }
    assert set(jstate.__all__) == top, (
        f"only in __all__: {sorted(set(jstate.__all__) - top)}; only in docs/api: {sorted(top - set(jstate.__all__))}"
    )
    namespace: dict = {}
    exec("from jstate import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(jstate.__all__)


def test_every_documented_member_has_a_docstring():
    # autodoc's `:members:` leaves out members without a docstring, silently.
    bare = sorted(name for name, obj in _public().items() if not inspect.getdoc(obj))
    assert not bare, f"public names without a docstring (the API reference would leave them out): {bare}"


@pytest.mark.slow  # seconds of compiles: in CI, not the fast loop
def test_the_flax_guide_runs(tmp_path, monkeypatch):
    """The training recipe (moved from the README to docs/guides/flax.md), a crash and a resume."""
    cells = CODE_CELL.findall((DOCS / "guides" / "flax.md").read_text())
    recipe = cells[0]
    assert "jstate.shardings" in recipe and "blocking=False" in recipe and "latest_checkpoint" in recipe
    monkeypatch.chdir(tmp_path)  # the recipe writes to ckpt/
    namespace: dict = {}
    for cell in cells:
        exec(compile(cell, "docs/guides/flax.md", "exec"), namespace)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["train-100", "train-50", "train-75"]
    assert namespace["losses"][-1] < namespace["losses"][0]
    assert namespace["after_resume"] == namespace["uninterrupted"]


def test_the_readme_example_opens_the_getting_started_guide():
    # The README shows one example; the site starts from the same code, executed at build.
    readme = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)[0]
    first = CODE_CELL.findall((DOCS / "guides" / "getting_started.md").read_text())[0]
    assert readme == first


def test_the_readme_is_short_and_links_into_the_site():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 125, f"README.md has {len(lines)} lines; move the detail to a page of docs/"
    assert any("guides/getting_started" in line for line in lines)


def test_the_version_lives_in_one_place():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'version = { attr = "jstate.__version__" }' in pyproject
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{jstate.__version__}]" in changelog, "CHANGELOG.md has no section for jstate.__version__"


def test_ci_builds_the_site_with_the_command_the_readme_names():
    command = "sphinx-build -W --keep-going -n -b html docs docs/_build/html"
    assert command in (ROOT / "README.md").read_text().replace("\n", " ")
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"\n{command}\n" in ci and "\npython -m build\n" in ci and "twine check" in ci
    assert "\nruff check jstate tests benchmarks\n" in ci and "\nruff format --check jstate tests benchmarks\n" in ci
