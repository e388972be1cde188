"""Long saves, restores and imports say so: an INFO record at the end, a bar when asked."""

import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jstate
from jstate.core import progress as _progress
from jstate.formats import base as _reader


def make_state():
    return jstate.State(
        {f"layer{i}/w": jnp.full((256, 256), i, jnp.float32) for i in range(4)} | {"step": jnp.int32(3)}
    )


def target(state):
    return jstate.State.from_tree({n: jax.ShapeDtypeStruct(v.shape, v.dtype) for n, v in state.items()}, flat=True)


def records(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "jstate" and r.levelno == logging.INFO]


def test_short_work_is_silent(tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO, logger="jstate")
    state = make_state()
    path = jstate.Saver().save(state, tmp_path / "m")
    jstate.Saver().restore(path, target(state))
    assert records(caplog) == []
    assert capsys.readouterr().err == ""


def test_slow_saves_and_restores_log_bytes_arrays_and_throughput(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(_progress, "SLOW", 0.0)  # every save counts as slow
    caplog.set_level(logging.INFO, logger="jstate")
    state = make_state()
    path = jstate.Saver().save(state, tmp_path / "m", step=1)
    restored = jstate.Saver().restore(path, target(state))
    np.testing.assert_array_equal(restored["layer3/w"], state["layer3/w"])
    saved, read = records(caplog)
    assert saved.startswith(f"Saved {path}: 1.0 MiB in 5 arrays in ") and saved.endswith("/s)")
    assert read.startswith(f"Restored {path}: 1.0 MiB in 5 arrays in ")


def test_background_saves_log_when_they_finish(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(_progress, "SLOW", 0.0)
    caplog.set_level(logging.INFO, logger="jstate")
    saver = jstate.Saver()
    path = saver.save(make_state(), tmp_path / "m", blocking=False)
    saver.wait()
    assert [m for m in records(caplog) if m.startswith(f"Saved {path}")]


def test_a_failed_save_logs_no_success(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(_progress, "SLOW", 0.0)
    caplog.set_level(logging.INFO, logger="jstate")
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(jstate.CheckpointError):
        jstate.Saver().save(make_state(), tmp_path / "file" / "m", progress=True)
    assert records(caplog) == []


def test_progress_bars_on_request(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tqdm")
    state = make_state()
    path = jstate.Saver(progress=True).save(state, tmp_path / "m")
    assert f"Saving {path}" in capsys.readouterr().err
    jstate.Saver().save(state, tmp_path / "quiet", progress=False)  # the call overrides the Saver
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(_reader, "_GROUP_BYTES", 300_000)  # several groups of reads, one bar
    ckpt = jstate.open_checkpoint(path)
    wanted = {n: jax.ShapeDtypeStruct(v.shape, v.dtype) for n, v in state.items()}
    restored = ckpt.read(wanted, progress=True)
    assert f"Restoring {path}" in capsys.readouterr().err
    for name in state:
        np.testing.assert_array_equal(restored[name], state[name])


def test_a_bar_without_tqdm_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as if tqdm were not installed
    with pytest.raises(ImportError, match=r"pip install jstate\[progress\]"):
        jstate.Saver(progress=True).save(make_state(), tmp_path / "m")
    assert jstate.latest_checkpoint(tmp_path) is None


def test_imports_of_other_formats_log_too(tmp_path, caplog, monkeypatch):
    pytest.importorskip("safetensors")
    monkeypatch.setattr(_progress, "SLOW", 0.0)
    caplog.set_level(logging.INFO, logger="jstate")
    state = make_state()
    path = jstate.save_safetensors(state, tmp_path / "m.safetensors")
    jstate.Saver().restore(path, target(state))
    assert [m for m in records(caplog) if m.startswith(f"Restored {path}: 1.0 MiB in 5 arrays")]


def test_saver_restore_shows_a_bar_when_asked(tmp_path, capsys):
    pytest.importorskip("tqdm")
    state = make_state()
    path = jstate.Saver().save(state, tmp_path / "m")
    target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), dict(state))
    jstate.Saver().restore(path, target)
    assert capsys.readouterr().err == ""
    restored = jstate.Saver(progress=True).restore(path, target)
    assert f"Restoring {path}" in capsys.readouterr().err
    jstate.Saver(progress=True).restore(path, target, progress=False)  # the call overrides the Saver
    assert capsys.readouterr().err == ""
    for name in state:
        np.testing.assert_array_equal(restored[name], state[name])
