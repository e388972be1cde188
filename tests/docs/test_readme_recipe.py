"""The README's Flax and optax training recipe (its second python block) runs as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).parents[2] / "README.md"


@pytest.mark.slow  # trains a Flax model
def test_readme_training_recipe_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "README.md has no training recipe after its example"
    recipe = blocks[1]
    assert "jstate.shardings" in recipe and "blocking=False" in recipe and "latest_checkpoint" in recipe
    monkeypatch.chdir(tmp_path)  # the recipe writes to ckpt/
    namespace: dict = {}
    exec(compile(recipe, str(README), "exec"), namespace)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["train-100", "train-50", "train-75"]
    assert namespace["losses"][-1] < namespace["losses"][0]
