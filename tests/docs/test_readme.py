"""The README runs as written: its example, and the commands it names."""

import re
import tempfile
from pathlib import Path

import pytest

README = Path(__file__).parents[2] / "README.md"


@pytest.mark.slow  # the whole README example
def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    code = blocks[0].replace("/tmp/jstate-readme", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {})
    assert "('biases', (200,)" in capsys.readouterr().out


def test_readme_plain_orbax_example_runs(tmp_path, monkeypatch):
    """The README's way back: plain Orbax reads a `Saver(layout="orbax")` checkpoint into the tree saved."""
    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "ocp." in b)
    assert 'layout="orbax"' in block and "StandardCheckpointer().restore" in block and "all_steps()" in block
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # its mkdtemp() inside the test's directory
    for _ in range(2):  # as a reader runs it, twice: a fresh directory each time
        scope: dict = {}
        exec(compile(block, str(README), "exec"), scope)
        assert Path(scope["path"]).parent.parent == tmp_path and (Path(scope["path"]) / "default").is_dir()


def test_readme_names_the_commands_ci_runs():
    text = README.read_text()
    assert 'pip install -e ".[dev]" && python -m jstate tour' in text
    assert 'pip install -e ".[dev]" && pytest' in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install -e ".[dev]"' in ci and "\npytest" in ci


def test_the_tour_the_readme_names_runs(capsys):
    """``python -m jstate tour``, the README's first command, walks the guide section by section."""
    from jstate.__main__ import main

    assert main(["tour"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n== ") == 10 and "== Inspecting a checkpoint ==" in out, out[-2000:]
