"""Long saves, restores and imports say so: an INFO record at the end, a bar when asked."""

import io
import logging
import re
import sys
import threading
import warnings

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


def summary_only(err: str, what: str, path) -> None:
    """A bar asked for where stderr is a file or pipe (as under capsys): one summary line, no redraws."""
    assert "\r" not in err and err.count("\n") == 1, repr(err)
    assert re.fullmatch(
        rf"{what} {re.escape(str(path))}: 1.0 MiB in 5 arrays in [0-9.]+ s \([0-9.]+ [KMG]?i?B/s\)\n", err
    )


def test_progress_bars_on_request(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tqdm")
    state = make_state()
    path = jstate.Saver(progress=True).save(state, tmp_path / "m")
    summary_only(capsys.readouterr().err, "Saved", path)
    jstate.Saver().save(state, tmp_path / "quiet", progress=False)  # the call overrides the Saver
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(_reader, "_GROUP_BYTES", 300_000)  # several groups of reads, one bar
    ckpt = jstate.open_checkpoint(path)
    wanted = {n: jax.ShapeDtypeStruct(v.shape, v.dtype) for n, v in state.items()}
    restored = ckpt.read(wanted, progress=True)
    summary_only(capsys.readouterr().err, "Restored", path)
    for name in state:
        np.testing.assert_array_equal(restored[name], state[name])


def test_a_bar_without_tqdm_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.std", None)  # as if tqdm were not installed
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
    summary_only(capsys.readouterr().err, "Restored", path)
    jstate.Saver(progress=True).restore(path, target, progress=False)  # the call overrides the Saver
    assert capsys.readouterr().err == ""
    for name in state:
        np.testing.assert_array_equal(restored[name], state[name])


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as a user's stderr does."""

    def isatty(self) -> bool:
        return True


def test_a_bar_in_a_terminal_is_redrawn_then_leaves_one_summary_line(tmp_path, monkeypatch):
    pytest.importorskip("tqdm")
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    path = jstate.Saver(progress=True).save(make_state(), tmp_path / "m")
    redraws, last = terminal.getvalue().rsplit("\r", 1)  # the bar, drawn in place, then cleared
    assert f"Saving {path}" in redraws
    assert re.fullmatch(rf"Saved {re.escape(path)}: 1.0 MiB in 5 arrays in [0-9.]+ s \(.+/s\)\n", last)


def test_a_shown_bar_follows_the_bytes_measured_while_a_library_writes(monkeypatch):
    """Orbax writes in its own threads: the bar follows the bytes its files hold, redrawn every
    `REFRESH` seconds, not only when the save reports them at the end."""
    pytest.importorskip("tqdm")
    monkeypatch.setattr(_progress, "REFRESH", 0.01)
    asked = threading.Event()
    calls = []

    def written() -> int:
        calls.append(1)
        if len(calls) >= 2:  # the first answer has been drawn
            asked.set()
        return 400

    terminal = Terminal()
    tracker = _progress.Progress("Saved", "ckpt/m", total=1000, arrays=1, bar=True, stream=terminal)
    tracker.watch(written)
    assert asked.wait(30)
    assert tracker._bar.n == 400 and "40%" in terminal.getvalue()
    tracker.advance(1000)
    tracker.close()
    assert re.fullmatch(
        r"Saved ckpt/m: 1000 B in 1 arrays in [0-9.]+ s \(.+/s\)\n", terminal.getvalue().rsplit("\r", 1)[1]
    )


def test_in_jupyter_the_bar_is_the_notebook_widget_without_warnings(monkeypatch, capsys):
    pytest.importorskip("tqdm")
    from tqdm import notebook

    monkeypatch.setattr(_progress, "_in_notebook", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tqdm's "IProgress not found" would fail the test
        if notebook.IProgress is not None:  # ipywidgets, as the `progress` extra installs it
            with _progress.Progress("Saved", "ckpt/m", total=10, arrays=1, bar=True) as tracker:
                assert isinstance(tracker._bar, notebook.tqdm)
                tracker.advance(10)
        monkeypatch.setattr(notebook, "IProgress", None)  # without ipywidgets: the text bar, no warning
        with _progress.Progress("Saved", "ckpt/m", total=10, arrays=1, bar=True) as tracker:
            assert not isinstance(tracker._bar, notebook.tqdm)
            tracker.advance(10)
    assert capsys.readouterr().out.splitlines()[-1].startswith("Saved ckpt/m: 10 B in 1 arrays in ")


def test_a_save_s_bar_measures_the_files_orbax_writes(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tqdm")
    measures = []
    monkeypatch.setattr(_progress.Progress, "watch", lambda self, count: measures.append(count))
    state = make_state()
    jstate.Saver(progress=True, pack=False).save(state, tmp_path / "m")
    (count,) = measures
    assert count() >= sum(v.nbytes for v in state.values())  # what Orbax wrote, found where it writes
