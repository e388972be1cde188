"""The package's structure: imports flow one way, Orbax stays behind one module, and
`import jstate` loads nothing a program that only initializes a model does not need."""

import ast
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import jstate
from jstate import _checkpoint, _native, _orbax, _reader, _safetensors, _tensorflow

PACKAGE = Path(jstate.__file__).parent


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(jstate modules, other top-level packages) that `path` imports anywhere, except under
    ``if TYPE_CHECKING:`` (annotations only)."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for n in ast.walk(node)
    }
    own, other = set(), set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.level:
            own.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom):
            other.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            other.update(a.name.split(".")[0] for a in node.names)
    return own, other


GRAPH = {p.stem: imports(p) for p in PACKAGE.glob("*.py")}


def test_private_modules_import_each_other_without_circles():
    graph = {m: {d for d in own if d in GRAPH} for m, (own, _) in GRAPH.items() if m.startswith("_")}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import circle: {' -> '.join(path[path.index(module) :] + (module,))}"
        if module in done:
            return
        for dep in graph.get(module, ()):
            visit(dep, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())


def test_only_the_orbax_module_imports_orbax():
    assert sorted(m for m, (_, other) in GRAPH.items() if "orbax" in other) == ["_orbax"]


def test_import_jstate_loads_neither_orbax_nor_flax_nor_optional_packages():
    code = (
        "import sys, jstate; print(sorted({m.split('.')[0] for m in sys.modules} & {'orbax', 'safetensors', 'flax'}))"
    )
    code += "; print('tensorstore' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "False"]


@pytest.mark.parametrize("module", [_native, _orbax, _tensorflow, _safetensors])
def test_every_format_module_has_a_loader_and_a_checkpoint_class(module):
    assert module.load in _checkpoint._FORMATS
    classes = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, _reader.Checkpoint)]
    assert [c for c in classes if c is not _reader.Checkpoint and c.__module__ == module.__name__]


def test_placement_sources_are_an_enum():
    state = jstate.init(lambda s: s.variable("v", jstate.initializers.zeros, (2,), device="cpu:0"), jax.random.key(0))
    assert state.placement("v").origin is jstate.Origin.DEVICE
    assert state.placement("v").source == "device="
