"""Every notebook in notebooks/ runs from top to bottom, and is committed without outputs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel", reason="the notebooks run in an IPython kernel")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))
KERNEL = "python3"


@pytest.fixture
def kernel_env(tmp_path_factory, monkeypatch) -> dict[str, str]:
    """The environment for a kernel that runs this interpreter, with the notebooks' own devices.

    A kernelspec on `JUPYTER_PATH` (searched before the user's and the system's) names
    `sys.executable` outright, so a `python3` kernelspec installed elsewhere on the machine,
    perhaps for another Python, cannot take over.
    """
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "jstate tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, [str(root), os.environ.get("JUPYTER_PATH")])))
    env = dict(os.environ)
    # conftest.py gives this process 8 CPU devices; each notebook chooses its own, as for a reader.
    env.pop("XLA_FLAGS", None)
    return env


def execute(nb, cwd: Path, env: dict[str, str]):
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=300, resources={"metadata": {"path": str(cwd)}})
    return client.execute(env=env)


@pytest.mark.slow  # a Jupyter kernel
def test_kernel_runs_this_interpreter(tmp_path, kernel_env):
    source = "import os, sys\nprint(sys.executable)\nprint(os.getcwd())"
    out = execute(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)]), tmp_path, kernel_env)
    executable, cwd = out.cells[0].outputs[0].text.splitlines()
    assert executable == sys.executable
    assert Path(cwd).resolve() == tmp_path.resolve()


@pytest.mark.slow  # a Jupyter kernel per notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_without_error(path, tmp_path, kernel_env):
    # The working directory is a temporary one, so anything a notebook writes lands there.
    nb = nbformat.read(path, as_version=4)
    try:
        execute(nb, tmp_path, kernel_env)
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell failed:\n{e}", pytrace=False)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count is not None)
    ]
    assert dirty == [], f"{path.name}: cells {dirty} have outputs or execution counts; clear them before committing."
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert cells and "assert" in cells[-1].source, f"{path.name} should end in a cell that asserts what it showed."
