"""The package's structure: imports flow one way, Orbax stays behind one module, and
`import jstate` loads nothing a program that only initializes a model does not need."""

import ast
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import jstate
from jstate.checkpoint import directory as _directory
from jstate.formats import base as _reader
from jstate.formats import native as _native
from jstate.formats import orbax as _orbax
from jstate.formats import safetensors as _safetensors
from jstate.formats import tensorflow as _tensorflow

PACKAGE = Path(jstate.__file__).parent
FOLDERS = ("core", "storage", "model", "formats", "checkpoint")


def imported_packages(path: Path) -> set[str]:
    """The top-level packages other than jstate that `path` imports anywhere, annotations included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
    return found - {"jstate"}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


MODULES = {module_name(p): imported_packages(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_imports_follow_the_one_dependency_rule():
    """The rule lives in pyproject.toml ([tool.importlinter]); `lint-imports` counts every import,
    those under ``if TYPE_CHECKING:`` included."""
    lint = Path(sys.executable).parent / "lint-imports"
    run = subprocess.run([str(lint)], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def test_the_package_is_folders_of_the_nouns_and_public_modules():
    top = sorted(p.name for p in PACKAGE.iterdir() if not p.name.startswith((".", "__pycache__")))
    assert [f for f in top if (PACKAGE / f).is_dir()] == sorted(FOLDERS)
    assert [f for f in top if f.endswith(".py")] == [
        "__init__.py",
        "__main__.py",
        "_tour.py",
        "initializers.py",
        "transforms.py",
    ]
    assert all(len(p.relative_to(PACKAGE).parts) <= 2 for p in PACKAGE.rglob("*.py"))


def test_only_the_orbax_modules_import_orbax():
    """Orbax I/O (`formats.orbax`) and its s3:// adaptation (`formats.orbax_s3`), nothing else."""
    assert sorted(m for m, other in MODULES.items() if "orbax" in other) == [
        "jstate.formats.orbax",
        "jstate.formats.orbax_s3",
    ]


@pytest.mark.slow  # a fresh Python process
def test_import_jstate_loads_neither_orbax_nor_flax_nor_optional_packages():
    code = (
        "import sys, jstate; print(sorted({m.split('.')[0] for m in sys.modules} & {'orbax', 'safetensors', 'flax'}))"
    )
    code += "; print('tensorstore' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "False"]


@pytest.mark.parametrize("module", [_native, _orbax, _tensorflow, _safetensors])
def test_every_format_module_has_a_loader_and_a_checkpoint_class(module):
    assert module.load in _directory._FORMATS
    classes = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, _reader.Checkpoint)]
    assert [c for c in classes if c is not _reader.Checkpoint and c.__module__ == module.__name__]


def test_placement_sources_are_an_enum():
    state = jstate.init(lambda s: s.variable("v", jstate.initializers.zeros, (2,), device="cpu:0"), jax.random.key(0))
    assert state.placement("v").origin is jstate.Origin.DEVICE
    assert state.placement("v").source == "device="
