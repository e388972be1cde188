"""Nothing lost: checkpoints stay safe with many writers, resumed runs, interrupts and full disks.

Each test states one guarantee of the commit rule (`jstate/_commit.py`) and checks it the way a
user would meet it: real files, real subprocesses for several writers and for signals, and
failures injected at chosen points of a save (an `OSError` where the OS would raise one, a
signal where a user's Ctrl-C would land). Values are chosen so that a restore proves which save
it read: ``x`` is filled with the save's number and ``y`` is ``arange + number``, so a mix of two
saves cannot pass for either.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import jstate
from jstate.checkpoint import directory as _checkpoint
from jstate.formats import commit as _commit
from jstate.formats import integrity as _integrity
from jstate.formats.manifest import FILE, Manifest, Variable
from jstate.storage import local as _files
from jstate.storage import tokens as _tokens

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def make_state(value: int, n: int = 8) -> jstate.State:
    return jstate.State({"x": jnp.full((n, n), value, jnp.float32), "y": jnp.arange(16, dtype=jnp.int32) + value})


def value_of(restored: jstate.State) -> int:
    """The save number a restored State holds; fails on a mix of two saves."""
    x, y = np.asarray(restored["x"]), np.asarray(restored["y"])
    value = int(x.flat[0])
    assert (x == value).all() and (y == np.arange(16) + value).all(), f"a mix of saves: x={x.flat[:3]} y={y[:3]}"
    return value


def restored_value(path, n: int = 8) -> int:
    return value_of(jstate.Saver().restore(path, make_state(0, n)))


def listed(directory) -> dict[str, int]:
    """``{name: value}`` of every checkpoint listed in `directory`, each restored and checked."""
    return {c.path.name: restored_value(c.path) for c in _checkpoint.checkpoints(directory)}


def leftovers(directory) -> list[str]:
    """What saves left in `directory` that no committed checkpoint holds."""
    out = []
    for child in sorted(Path(directory).iterdir()):
        if not child.is_dir():
            continue
        manifest = Manifest.read(child)
        if manifest is None:
            out.append(str(child))
            continue
        out += [str(e) for e in child.iterdir() if e.name not in (FILE, manifest.arrays)]
    return out


# A child process: the same helpers, and a way to print a line the parent reads.
PRELUDE = textwrap.dedent(
    """
    import errno, json, os, random, signal, sys, threading, time
    from pathlib import Path
    import jax.numpy as jnp
    import numpy as np
    import jstate
    from jstate.checkpoint import directory as _checkpoint
    from jstate.formats import commit as _commit
    from jstate.storage import local as _files
    from jstate.formats import integrity as _integrity
    from jstate.formats import orbax as _orbax
    from jstate.checkpoint import writer as _writer
    from jstate.formats.manifest import FILE, Manifest

    def make_state(value, n=8):
        return jstate.State({"x": jnp.full((n, n), value, jnp.float32), "y": jnp.arange(16, dtype=jnp.int32) + value})

    def restored_value(path, n=8):
        r = jstate.Saver().restore(path, make_state(0, n))
        x, y = np.asarray(r["x"]), np.asarray(r["y"])
        v = int(x.flat[0])
        assert (x == v).all() and (y == np.arange(16) + v).all(), "a mix of saves"
        return v

    def listed(directory):
        return {c.path.name: restored_value(c.path) for c in _checkpoint.checkpoints(directory)}

    def leftovers(directory):
        out = []
        for child in sorted(Path(directory).iterdir()):
            if child.is_dir():
                m = Manifest.read(child)
                out += [str(child)] if m is None else [str(e) for e in child.iterdir() if e.name not in (FILE, m.arrays)]
        return out

    def say(*parts):  # one write: a line is whole or missing, even when a signal lands
        os.write(1, (" ".join(map(str, parts)) + "\\n").encode())
    """
)


def run_child(code: str, *args, cwd=None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code), *map(str, args)],
        env=ENV,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def spawn_child(code: str, *args, cwd=None, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code), *map(str, args)],
        env=ENV,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def last_json(out: str):
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, out
    return json.loads(lines[-1])


# -- 1. Retention by save order, per exact prefix ------------------------------------------------
def test_a_resumed_run_keeps_its_checkpoint_whatever_its_step(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths, as users pass them
    first = jstate.Saver(max_to_keep=2)
    first.save(make_state(1000), "ckpt/model", step=1000)
    first.save(make_state(2000), "ckpt/model", step=2000)

    resumed = jstate.Saver(max_to_keep=2)  # a new run, resumed from an earlier step
    assert resumed.save(make_state(10), "ckpt/model", step=10) == os.path.join("ckpt", "model-10")
    assert listed("ckpt") == {"model-2000": 2000, "model-10": 10}
    assert jstate.latest_checkpoint("ckpt") == os.path.join("ckpt", "model-10")
    resumed.save(make_state(20), "ckpt/model", step=20)
    assert listed("ckpt") == {"model-10": 10, "model-20": 20}


def test_a_new_saver_recovers_what_to_delete_from_the_directory(tmp_path):
    keep_all = jstate.Saver()
    for step in (1, 2, 3):
        keep_all.save(make_state(step), tmp_path / "model", step=step)
    jstate.Saver(max_to_keep=2).save(make_state(4), tmp_path / "model", step=4)
    assert listed(tmp_path) == {"model-3": 3, "model-4": 4}


def test_resaving_a_path_makes_it_the_newest(tmp_path):
    saver = jstate.Saver(max_to_keep=2)
    saver.save(make_state(1), tmp_path / "model", step=1)
    saver.save(make_state(2), tmp_path / "model", step=2)
    saver.save(make_state(11), tmp_path / "model", step=1)  # re-saved: now the newest
    assert listed(tmp_path) == {"model-1": 11, "model-2": 2}
    assert jstate.latest_checkpoint(tmp_path) == str(tmp_path / "model-1")
    saver.save(make_state(3), tmp_path / "model", step=3)  # deletes model-2, saved before model-1
    assert listed(tmp_path) == {"model-1": 11, "model-3": 3}


def test_retention_only_deletes_checkpoints_of_its_exact_prefix(tmp_path):
    jstate.Saver().save(make_state(2), tmp_path / "model", step=2)  # model-2, prefix "model"
    jstate.Saver().save(make_state(7), tmp_path / "model-7")  # no step: never retired
    narrow = jstate.Saver(max_to_keep=1)  # prefix "model-2"
    for step in (1, 2, 3):
        narrow.save(make_state(20 + step), tmp_path / "model-2", step=step)
    assert listed(tmp_path) == {"model-2": 2, "model-7": 7, "model-2-3": 23}

    jstate.Saver(max_to_keep=1).save(make_state(5), tmp_path / "model", step=5)  # prefix "model"
    assert listed(tmp_path) == {"model-7": 7, "model-2-3": 23, "model-5": 5}


def test_two_savers_of_one_prefix_keep_the_most_recently_saved(tmp_path, monkeypatch):
    """Two writers with max_to_keep=1 commit one after the other while the first is still
    choosing what to delete: the checkpoint saved last is kept (it is the most recently saved),
    not deleted by the writer that committed before it."""
    a, b = jstate.Saver(max_to_keep=1), jstate.Saver(max_to_keep=1)
    a.save(make_state(1), tmp_path / "model", step=1)
    real = _checkpoint.checkpoints
    hooked = []

    def b_commits_meanwhile(path):
        if not hooked:
            hooked.append(True)
            b.save(make_state(3), tmp_path / "model", step=3)
        return real(path)

    monkeypatch.setattr(_checkpoint, "checkpoints", b_commits_meanwhile)
    a.save(make_state(2), tmp_path / "model", step=2)
    monkeypatch.setattr(_checkpoint, "checkpoints", real)
    assert "model-3" in listed(tmp_path)


# -- 2. latest_checkpoint ----------------------------------------------------------------------
def test_latest_is_the_most_recently_committed_across_prefixes(tmp_path):
    saver = jstate.Saver()
    saver.save(make_state(1000), tmp_path / "model", step=1000)
    saver.save(make_state(5), tmp_path / "other", step=5)
    assert jstate.latest_checkpoint(tmp_path) == str(tmp_path / "other-5")
    saver.save(make_state(10), tmp_path / "model", step=10)
    assert jstate.latest_checkpoint(tmp_path) == str(tmp_path / "model-10")
    assert jstate.latest_checkpoint(tmp_path / "other") == str(tmp_path / "other-5")


def test_latest_never_returns_a_checkpoint_being_deleted(tmp_path, monkeypatch):
    saver = jstate.Saver(max_to_keep=1)
    saver.save(make_state(1), tmp_path / "model", step=1)
    seen = []
    real = _files.sync_dir

    def look_while_deleting(directory):
        if any(".deleting" in name for name in os.listdir(directory)):  # the manifest is taken
            seen.append((Path(directory).name, jstate.latest_checkpoint(tmp_path), restored_value(tmp_path)))
        real(directory)

    monkeypatch.setattr(_files, "sync_dir", look_while_deleting)
    saver.save(make_state(2), tmp_path / "model", step=2)
    assert seen, "the deletion was not observed"
    for deleting, latest, value in seen:
        assert deleting == "model-1"
        assert latest == str(tmp_path / "model-2") and value == 2


def test_latest_looks_again_when_a_writer_replaces_the_only_checkpoint_it_listed(tmp_path, monkeypatch):
    """A reader lists the directory (model-1 only), then is descheduled while a writer keeping
    one saves model-2 and deletes model-1: it must find model-2, not come back empty."""
    writer = jstate.Saver(max_to_keep=1)
    writer.save(make_state(1), tmp_path / "model", step=1)
    real, events = _checkpoint._open_quietly, []

    def slow_reader(path):
        if not events:
            events.append(path.name)
            writer.save(make_state(2), tmp_path / "model", step=2)
        return real(path)

    monkeypatch.setattr(_checkpoint, "_open_quietly", slow_reader)
    assert jstate.latest_checkpoint(tmp_path) == str(tmp_path / "model-2")
    assert events == ["model-1"]


def test_restore_of_a_directory_reads_again_when_its_checkpoint_is_deleted_under_it(tmp_path, monkeypatch):
    from jstate.formats.native import NativeCheckpoint

    writer = jstate.Saver(max_to_keep=1)
    writer.save(make_state(1), tmp_path / "model", step=1)
    real, events = NativeCheckpoint._read, []

    def read(self, wanted, verify):
        if not events:
            events.append(self.path.name)
            writer.save(make_state(2), tmp_path / "model", step=2)  # deletes model-1, being read
        return real(self, wanted, verify)

    monkeypatch.setattr(NativeCheckpoint, "_read", read)
    assert restored_value(tmp_path) == 2
    assert events == ["model-1"]


@pytest.mark.parametrize("when", ["before-delete", "before-take"])
def test_a_resave_while_retention_deletes_that_path_is_kept(tmp_path, monkeypatch, when):
    """Retention chose model-1 for deletion; another writer re-saves model-1 before the deletion
    starts, or between its check and its taking the manifest; and a third writer's failed save
    to model-1 cleans up meanwhile. The re-save returned: it stays listed and restorable."""
    retiring, resaver, failing = jstate.Saver(max_to_keep=1), jstate.Saver(), jstate.Saver()
    retiring.save(make_state(1), tmp_path / "model", step=1)
    real_delete, real_records, real_read, real_rename = (
        _commit.delete,
        _integrity.file_records,
        Manifest.read_file,
        os.rename,
    )
    events = []

    def resave():
        events.append("resaved")
        resaver.save(make_state(11), tmp_path / "model", step=1)

    def records(directory, *args):
        if "failing" in events:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(directory))
        return real_records(directory, *args)

    def read_file(path, where):  # inside `delete`, after it took the manifest
        if ".deleting" in Path(path).name and "failing" not in events:
            events.append("failing")
            with pytest.raises(jstate.CheckpointError):
                failing.save(make_state(99), tmp_path / "model", step=1)
        return real_read(path, where)

    def rename(src, dst):
        if ".deleting" in str(dst) and when == "before-take" and "resaved" not in events:
            resave()
        return real_rename(src, dst)

    def delete(path, expected=None):
        if when == "before-delete":
            resave()
        return real_delete(path, expected)

    monkeypatch.setattr(_integrity, "file_records", records)
    monkeypatch.setattr(Manifest, "read_file", staticmethod(read_file))
    monkeypatch.setattr(_commit, "delete", delete)
    monkeypatch.setattr(os, "rename", rename)
    retiring.save(make_state(2), tmp_path / "model", step=2)
    monkeypatch.undo()
    assert "resaved" in events
    assert listed(tmp_path) == {"model-1": 11, "model-2": 2}


# -- 6. Durability ------------------------------------------------------------------------------
@pytest.mark.parametrize("blocking", [True, False])
def test_every_directory_and_file_a_save_creates_is_flushed(tmp_path, monkeypatch, blocking):
    synced_dirs: list[tuple[Path, set[str]]] = []
    synced_files: set[Path] = set()
    real_sync_file = _files.sync_file

    def sync_file(path):
        synced_files.add(Path(path).resolve())
        real_sync_file(path)

    def sync_dir(directory):  # what the directory holds when it is flushed
        synced_dirs.append((Path(directory).resolve(), set(os.listdir(directory))))
        real_sync_file(directory)

    monkeypatch.setattr(_files, "sync_file", sync_file)
    monkeypatch.setattr(_files, "sync_dir", sync_dir)
    root = tmp_path / "runs"
    saver = jstate.Saver(max_to_keep=1)
    for step in (1, 1, 2):  # a new path in new directories, a re-save, a save that retires one
        before = set(root.rglob("*")) if root.exists() else set()
        saver.save(make_state(step), root / "a" / "b" / "model", step=step, blocking=blocking)
        saver.wait()
        created = [p for p in root.rglob("*") if p not in before] + ([root] if not before else [])
        assert created
        for path in created:
            parent = path.resolve().parent
            assert any(d == parent and path.name in names for d, names in synced_dirs), f"{path} not flushed"
            if path.is_file() and path.parent.name.startswith("arrays-"):
                assert path.resolve() in synced_files, f"{path} not flushed"
        synced_dirs.clear()


# -- 7. Hostile files -----------------------------------------------------------------------------
def _rewrite_manifest(path: Path, **variables: Variable) -> None:
    manifest = Manifest.read(path)
    dataclasses.replace(manifest, variables={**manifest.variables, **variables}).write(path)


F32, I32 = np.dtype("float32"), np.dtype("int32")
# Manifests that disagree with the Orbax checkpoint beside them: (variable, what the manifest says).
DISAGREEING = {
    "variable-orbax-lacks": ("ghost", Variable((8, 8), F32, {})),
    "variable-orbax-lacks-with-digest": ("ghost", Variable((8, 8), F32, {"0:8,0:8": 12345})),
    "larger-shape": ("x", Variable((16, 16), F32, {})),
    "smaller-shape": ("x", Variable((4, 4), F32, {})),
    "other-dtype": ("x", Variable((8, 8), I32, {})),
}


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
@pytest.mark.parametrize("case", sorted(DISAGREEING))
def test_a_manifest_that_disagrees_with_orbax_is_a_corrupt_checkpoint(tmp_path, case, verify):
    path = Path(jstate.Saver().save(make_state(3), tmp_path / "model"))
    name, variable = DISAGREEING[case]
    _rewrite_manifest(path, **{name: variable})
    values = {"x": jnp.zeros((8, 8)), "y": jnp.zeros(16, jnp.int32)}
    values[name] = jnp.zeros(variable.shape, variable.dtype)
    with pytest.raises(jstate.CorruptCheckpointError, match=f"'{name}'"):
        jstate.Saver().restore(path, jstate.State(values), verify=verify)
    with pytest.raises(jstate.CorruptCheckpointError, match=f"'{name}'"):
        jstate.load_variable(path, name, verify=verify)


def _arrays(path: Path) -> Path:
    return path / Manifest.read(path).arrays


def _data_files(path: Path) -> list[Path]:
    arrays = _arrays(path)
    return sorted(f for f in arrays.rglob("*") if f.is_file() and "d" in f.relative_to(arrays).parts[:-1])


def _link_outside(target: Path, outside: Path) -> None:
    """Replace `target` (a file or directory) by a symbolic link to an identical copy outside."""
    if target.is_dir():
        shutil.copytree(target, outside)
        shutil.rmtree(target)
    else:
        shutil.copy(target, outside)
        target.unlink()
    target.symlink_to(outside.resolve())


def _refused(path: Path) -> None:
    with pytest.raises(jstate.CheckpointError, match="outside"):
        jstate.Saver().restore(path, make_state(0))


def test_a_metadata_file_linked_outside_the_checkpoint_is_refused(tmp_path):
    path = Path(jstate.Saver().save(make_state(3), tmp_path / "ckpt" / "model"))
    _link_outside(_arrays(path) / "_METADATA", tmp_path / "elsewhere")
    _refused(path)


@pytest.mark.parametrize("what", ["data-file", "arrays-dir", "manifest"])
def test_a_file_linked_outside_the_checkpoint_is_refused(tmp_path, what):
    path = Path(jstate.Saver().save(make_state(3), tmp_path / "ckpt" / "model"))
    target = {
        "data-file": lambda: _data_files(path)[0],
        "arrays-dir": lambda: _arrays(path),
        "manifest": lambda: path / FILE,
    }
    _link_outside(target[what](), tmp_path / "elsewhere")
    _refused(path)


def test_a_link_inside_the_checkpoint_reads_the_same_values(tmp_path):
    path = Path(jstate.Saver().save(make_state(3), tmp_path / "model"))
    data = _data_files(path)[0]
    shutil.copy(data, path / "copy")
    data.unlink()
    data.symlink_to((path / "copy").resolve())
    assert restored_value(path) == 3


def test_cleaning_and_retention_never_follow_links_out_of_a_checkpoint(tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "data").write_text("keep me")
    dead = f"{int(time.time()):x}_999999999_deadbeef_{_tokens._HOST}"  # a token of no live process
    saver = jstate.Saver(max_to_keep=1)
    first = Path(saver.save(make_state(1), tmp_path / "ckpt" / "model", step=1))
    (first / f"arrays-{dead}").symlink_to(outside.resolve(), target_is_directory=True)
    saver.save(make_state(1), tmp_path / "ckpt" / "model", step=1)  # cleans model-1
    saver.save(make_state(2), tmp_path / "ckpt" / "model", step=2)  # deletes model-1
    assert (outside / "data").read_text() == "keep me"
    assert listed(tmp_path / "ckpt") == {"model-2": 2}


def _dead_token() -> str:
    return f"{int(time.time()):x}_999999999_deadbeef_{_tokens._HOST}"  # a token of no live process


def _tree(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (links not followed) with its bytes: to prove it untouched."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_retention_removes_a_retired_checkpoint_whose_writer_still_runs(tmp_path, monkeypatch):
    """Two processes saving one prefix: the checkpoint one of them wrote, retired by the other's
    `max_to_keep`, goes whole, arrays included, although its writer is alive (its save is done:
    the manifest that named the arrays committed it), and nothing of it stays after both exit."""
    first = Path(jstate.Saver().save(make_state(1), tmp_path / "model", step=1))
    token = Path(jstate.open_checkpoint(first).arrays).name.split("arrays-", 1)[1]
    real_alive = _tokens.alive
    # The writer of `first` still runs (in another process, as far as this one can tell).
    monkeypatch.setattr(_tokens, "alive", lambda name, *a, **k: name == token or real_alive(name, *a, **k))
    jstate.Saver(max_to_keep=1).save(make_state(2), tmp_path / "model", step=2)
    assert sorted(os.listdir(tmp_path)) == ["model-2"]


def test_retention_removes_a_linked_checkpoint_s_link_never_its_target(tmp_path):
    """A run resumed from another run's checkpoint by linking it into its own directory: when
    `max_to_keep` retires that name, only the link goes; the other run's checkpoint (and a
    killed save's leftovers in it, which are that run's to clean) stay as they were."""
    other = Path(jstate.Saver().save(make_state(7), tmp_path / "run1" / "model", step=1000))
    (other / f"arrays-{_dead_token()}").mkdir()  # a killed save of run1's, in run1's checkpoint
    before = _tree(tmp_path / "run1")
    run2 = tmp_path / "run2"
    run2.mkdir()
    (run2 / "model-1000").symlink_to(other.resolve(), target_is_directory=True)
    assert restored_value(run2) == 7  # resumed from it
    saver = jstate.Saver(max_to_keep=2)
    for step in (1100, 1200, 1300):
        saver.save(make_state(step), run2 / "model", step=step)
    assert sorted(os.listdir(run2)) == ["model-1200", "model-1300"]
    assert _tree(tmp_path / "run1") == before
    assert restored_value(other) == 7


def test_links_out_of_the_directory_and_dangling_links_are_never_followed(tmp_path):
    outside = tmp_path / "outside"
    (outside / "arrays").mkdir(parents=True)
    (outside / "arrays" / "data").write_text("keep me")
    (outside / "jstate.json").write_text("not a manifest")
    before = _tree(outside)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model-1").symlink_to(outside.resolve(), target_is_directory=True)  # named as a checkpoint
    (ckpt / f".model-2.{_dead_token()}.tmp").symlink_to(outside.resolve())  # named as a dead save's leftover
    (ckpt / "model-3").symlink_to(tmp_path / "nowhere")  # dangling
    (ckpt / f".model-4.{_dead_token()}.tmp").symlink_to(tmp_path / "nowhere")  # dangling leftover
    saver = jstate.Saver(max_to_keep=1)
    for step in (5, 6, 7):
        saver.save(make_state(step), ckpt / "model", step=step)
    assert _tree(outside) == before
    assert sorted(os.listdir(ckpt)) == ["model-1", "model-3", "model-7"]  # leftover links removed, as links
    assert os.readlink(ckpt / "model-3") == str(tmp_path / "nowhere")
    assert jstate.latest_checkpoint(ckpt) == str(ckpt / "model-7")


def test_a_failed_save_to_a_linked_checkpoint_cleans_nothing_through_the_link(tmp_path):
    other = Path(jstate.Saver().save(make_state(7), tmp_path / "run1" / "model-1"))
    (other / f"arrays-{_dead_token()}").mkdir()
    (other / f".saving.{_dead_token()}.tmp").touch()
    before = _tree(tmp_path / "run1")
    link = tmp_path / "run2" / "model-1"
    link.parent.mkdir()
    link.symlink_to(other.resolve(), target_is_directory=True)
    with pytest.raises(jstate.CheckpointError, match="not a jstate checkpoint"):
        jstate.Saver().save(make_state(8), link)
    assert _tree(tmp_path / "run1") == before and link.is_symlink()


@pytest.fixture(params=["bind-mount", "simulated"])
def mount(request, monkeypatch):
    """`mount(source, target)`: `source` mounted at `target` (made here). "bind-mount" is the real
    thing (skipped where it is not allowed); "simulated" copies `source` to `target` and adds
    `target` to the mount table the store reads, so the rule is tested everywhere."""
    mounted = []

    def mount(source: Path, target: Path) -> None:
        if request.param == "simulated":
            shutil.copytree(source, target)
            table = _files.mount_points() | {os.path.realpath(target)}
            monkeypatch.setattr(_files, "mount_points", lambda: table)
            return
        if os.geteuid() != 0:
            pytest.skip("`mount --bind` needs root")
        target.mkdir(parents=True)
        done = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"`mount --bind` is not allowed here: {done.stderr.strip()}")
        mounted.append(target)

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", str(target)], check=True)


def test_a_mounted_checkpoint_is_never_deleted_through(tmp_path, mount):
    """Another run's checkpoint mounted into this run's directory to resume from (a volume in a
    container): `max_to_keep` retires it, but a mount point cannot be removed as a link can,
    so it stays, mounted and intact, and so do the other run's leftovers in it; a save to its
    name is refused; a dead save's leftover holding a mount is left alone too."""
    other = Path(jstate.Saver().save(make_state(7), tmp_path / "run1" / "model", step=1000))
    (other / f"arrays-{_dead_token()}").mkdir()  # a killed save of run1's, in run1's checkpoint
    (other / f"arrays-{_dead_token()}" / "data").write_text("run1's to clean")
    run2 = tmp_path / "run2"
    mount(other, run2 / "model-1000")
    outside = tmp_path / "outside"
    (outside / "deeper").mkdir(parents=True)
    (outside / "deeper" / "data").write_text("keep me")
    leftover = f".model-5.{_dead_token()}.tmp"
    mount(outside, run2 / leftover / "volume")  # inside a dead save's leftover
    before = {d: _tree(d) for d in (tmp_path / "run1", run2 / "model-1000", outside)}
    assert restored_value(run2) == 7  # resumed from it
    saver = jstate.Saver(max_to_keep=2)
    for step in (1100, 1200, 1300):
        saver.save(make_state(step), run2 / "model", step=step)
    assert {d: _tree(d) for d in before} == before
    assert sorted(os.listdir(run2)) == [leftover, "model-1000", "model-1200", "model-1300"]
    with pytest.raises(jstate.CheckpointError, match=r"model-1000: .*it is a mount point.*Nothing was written"):
        jstate.Saver().save(make_state(8), run2 / "model-1000")
    assert {d: _tree(d) for d in before} == before
    assert restored_value(run2 / "model-1000") == 7


# -- 5. OS errors ---------------------------------------------------------------------------------
def _refuse(exc_errno: int, where: Path, condition=lambda *args: True):
    """A function that raises the OS's error `exc_errno` for paths under `where` (when
    `condition` holds), as a read-only or full file system would, and else calls `real`."""

    def make(real):
        def refusing(*args, **kwargs):
            path = Path(args[0]) if args else None
            if path is not None and str(path.resolve()).startswith(str(where.resolve())) and condition(*args):
                raise OSError(exc_errno, os.strerror(exc_errno), str(path))
            return real(*args, **kwargs)

        return refusing

    return make


# (what fails, errno, where): each is what the OS does on a read-only or full disk, or a bad one.
FAILURES = {
    "mkdir-read-only": (os, "mkdir", errno.EROFS, lambda p, *a: "orbax-checkpoint-tmp" not in str(p)),
    "manifest-fsync-full": (_files, "sync_file", errno.ENOSPC, lambda p: Path(p).name.startswith(".jstate.json")),
    "manifest-rename-read-only": (os, "replace", errno.EROFS, lambda src, dst: Path(dst).name == FILE),
    "array-files-unreadable": (_integrity, "file_records", errno.EIO, lambda *a: True),
    "directory-fsync-io-error": (_files, "sync_tree", errno.EIO, lambda *a: True),
}


# A re-save's directory exists: there the first mkdir to fail is Orbax's, which is tested in a
# subprocess (test_orbax_failing_to_create_its_directory_costs_nothing): it leaves a thread behind.
@pytest.mark.parametrize(
    ("failure", "resave"),
    [(f, r) for f in sorted(FAILURES) for r in (False, True) if (f, r) != ("mkdir-read-only", True)],
)
def test_an_os_error_is_one_checkpoint_error_and_costs_nothing(tmp_path, monkeypatch, failure, resave):
    ckpt = tmp_path / "ckpt"
    saver = jstate.Saver(max_to_keep=2)
    saver.save(make_state(1), ckpt / "model", step=1)
    saver.save(make_state(2), ckpt / "model", step=2)
    before = listed(ckpt)
    final = ckpt / "model-2" if resave else ckpt / "deeper" / "model-3"
    owner, name, code, condition = FAILURES[failure]
    monkeypatch.setattr(owner, name, _refuse(code, ckpt, condition)(getattr(owner, name)))
    with pytest.raises(jstate.CheckpointError) as caught:
        saver.save(make_state(20), final.parent / "model", step=int(final.name.split("-")[1]))
    monkeypatch.undo()
    message = str(caught.value)
    assert str(final) in message and os.strerror(code) in message, message
    assert listed(ckpt) == before  # a re-saved path keeps its earlier version
    assert set(leftovers(ckpt)) <= {str(ckpt / "deeper")}  # the user's directory may stay (empty),
    assert resave or not final.exists()  # the checkpoint's may not
    saver.save(make_state(30), final.parent / "model", step=int(final.name.split("-")[1]))  # the cause is fixed
    assert restored_value(final) == 30


def test_retention_failing_after_the_commit_warns_and_the_save_stands(tmp_path, monkeypatch, caplog):
    """The manifest is committed before retention runs: the save has succeeded then, and an old
    checkpoint that cannot be deleted (a read-only directory or mount) is a warning naming it,
    for this save and the next, never an error that says the save failed."""
    jstate.Saver().save(make_state(1), tmp_path / "model", step=1)
    stuck = tmp_path / "model-1"
    refused = _refuse(errno.EROFS, stuck, lambda src, dst: Path(src).name == FILE)
    monkeypatch.setattr(os, "rename", refused(os.rename))  # retention unlists by renaming the manifest away
    saver = jstate.Saver(max_to_keep=1)
    for step in (2, 3):
        with caplog.at_level("WARNING", logger="jstate"):
            assert saver.save(make_state(step), tmp_path / "model", step=step) == str(tmp_path / f"model-{step}")
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert any(str(stuck) in m and os.strerror(errno.EROFS) in m for m in warned), warned
        assert jstate.latest_checkpoint(tmp_path) == str(tmp_path / f"model-{step}")
        assert restored_value(tmp_path) == step
        caplog.clear()
    assert listed(tmp_path) == {"model-1": 1, "model-3": 3}  # model-2 went; model-1 stays, unharmed
    monkeypatch.undo()
    saver.save(make_state(4), tmp_path / "model", step=4)  # the cause is fixed: retention catches up
    assert listed(tmp_path) == {"model-4": 4}


def test_a_file_where_a_directory_should_be(tmp_path):
    saver = jstate.Saver()
    saver.save(make_state(1), tmp_path / "model", step=1)
    (tmp_path / "runs").write_text("not a directory")
    with pytest.raises(jstate.CheckpointError, match=r"runs/model-2.*Not a directory"):
        saver.save(make_state(2), tmp_path / "runs" / "model", step=2)
    (tmp_path / "model-5").write_text("a file in the checkpoint's place")
    with pytest.raises(jstate.CheckpointError, match=r"model-5.*not a jstate checkpoint"):
        saver.save(make_state(5), tmp_path / "model", step=5)
    assert (tmp_path / "model-5").read_text() == "a file in the checkpoint's place"
    assert (tmp_path / "runs").read_text() == "not a directory"
    assert listed(tmp_path) == {"model-1": 1}
    (tmp_path / "runs").unlink()
    assert restored_value(saver.save(make_state(2), tmp_path / "runs" / "model", step=2)) == 2


@pytest.mark.parametrize(
    "path",
    [
        "m" * 256,  # the checkpoint's own name
        "new/" + "d" * 300 + "/model",  # a directory it would create
        "p" * 251 + "-" + "0",  # fits alone, not with its step: given as a prefix below
        "é" * 128,  # 128 characters, 256 bytes
    ],
)
def test_a_name_too_long_is_refused_before_anything_is_written(tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    jstate.Saver().save(make_state(1), "ckpt/ok")
    before = sorted(p for p in tmp_path.rglob("*"))
    prefix, step = (path[:-2], 1000) if path.endswith("-0") else (path, None)
    with pytest.raises(jstate.CheckpointError, match="File name too long") as caught:
        jstate.Saver().save(make_state(2), os.path.join("ckpt", prefix), step=step)
    assert "ckpt" in str(caught.value)
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert listed("ckpt") == {"ok": 1}


def test_a_name_at_the_file_systems_limit_saves(tmp_path):
    name = "m" * 250
    path = jstate.Saver(max_to_keep=1).save(make_state(7), tmp_path / name, step=1000)  # 255 bytes
    assert restored_value(path) == 7 and jstate.latest_checkpoint(tmp_path) == path


MOUNTED = """
import subprocess
root = Path(sys.argv[1])
def mount(*options):
    subprocess.run(["mount", *options, str(root)], check=True)
mount("-t", "tmpfs", "-o", "size=1m", "tmpfs")
out = {}
def attempt(label, step, n=8, value=None):
    try:
        saver.save(make_state(step if value is None else value, n), root / "model", step=step)
        out[label] = "saved"
    except jstate.CheckpointError as e:
        out[label] = str(e)
    out[label + ":listed"] = listed(root)
    out[label + ":leftovers"] = leftovers(root)
saver = jstate.Saver()
saver.save(make_state(1), root / "model", step=1)
used = lambda: os.statvfs(root).f_blocks - os.statvfs(root).f_bfree
out["used-before"] = used()
attempt("full-new", 2, n=512)  # 1 MiB of float32 on a 1 MiB disk
attempt("full-resave", 1, n=512, value=11)  # the earlier version stays
out["used-after"] = used()
attempt("after-full", 3)
mount("-o", "remount,ro")
attempt("read-only-new", 4)
attempt("read-only-resave", 1, value=12)
mount("-o", "remount,rw")
attempt("after-read-only", 4)
say(json.dumps(out))
# Exit without waiting for Orbax's threads: see test_no_thread_outlives_a_save_that_failed_to_create_its_directory.
os._exit(0)
"""


def _can_mount() -> bool:
    try:
        probe = "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d && rmdir $d"
        return subprocess.run(["unshare", "-m", "sh", "-c", probe], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount(), reason="needs `unshare -m` and `mount` (root in a mount namespace)")
def test_a_real_full_disk_and_read_only_mount(tmp_path):
    """A 1 MiB tmpfs in a private mount namespace: a save that does not fit, then a read-only
    remount. Earlier checkpoints stay, leftovers go, and saves work again once the cause is gone."""
    (tmp_path / "disk").mkdir()
    code = PRELUDE + textwrap.dedent(MOUNTED)
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", sys.executable, "-c", code, str(tmp_path / "disk")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = last_json(done.stdout)
    one = {"model-1": 1}
    for label, errno_text, listing in [
        ("full-new", "No space left on device", one),
        ("full-resave", "No space left on device", one),
        ("read-only-new", "Read-only file system", {"model-1": 1, "model-3": 3}),
        ("read-only-resave", "Read-only file system", {"model-1": 1, "model-3": 3}),
    ]:
        assert errno_text in out[label] and "model-" in out[label], (label, out[label])
        assert out[label + ":listed"] == listing, label
        assert out[label + ":leftovers"] == [], label
    assert out["used-after"] <= out["used-before"] + 2, out  # the failed saves' blocks are freed
    assert out["after-full"] == "saved" and out["after-full:listed"] == {"model-1": 1, "model-3": 3}
    assert out["after-read-only"] == "saved"
    assert out["after-read-only:listed"] == {"model-1": 1, "model-3": 3, "model-4": 4}
    assert out["after-read-only:leftovers"] == []


ORBAX_MKDIR_FAILS = """
root = Path(sys.argv[1])
saver = jstate.Saver()
saver.save(make_state(1), root / "model", step=1)
# Orbax cannot create its directory (a read-only disk, or a full one): each save fails.
real_mkdir = os.mkdir
def mkdir(path, *args, **kwargs):
    if "orbax-checkpoint-tmp" in str(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    return real_mkdir(path, *args, **kwargs)
os.mkdir = mkdir
out = {}
for label, step in (("new", 2), ("resave", 1)):
    try:
        saver.save(make_state(10 + step), root / "model", step=step)
        out[label] = "saved"
    except jstate.CheckpointError as e:
        out[label] = str(e)
    out[label + ":listed"], out[label + ":leftovers"] = listed(root), leftovers(root)
os.mkdir = real_mkdir
saver.save(make_state(3), root / "model", step=3)
out["after"] = listed(root)
say(json.dumps(out))
os._exit(0)  # not waiting for those threads (up to `timeout`, 600 s)
"""


@pytest.mark.slow
def test_orbax_failing_to_create_its_directory_costs_nothing(tmp_path):
    done = run_child(ORBAX_MKDIR_FAILS, tmp_path, timeout=60)
    out = last_json(done.stdout)
    for label, step in (("new", 2), ("resave", 1)):
        assert f"model-{step} failed" in out[label] and "Read-only file system" in out[label], out[label]
        assert out[label + ":listed"] == {"model-1": 1} and out[label + ":leftovers"] == [], out
    assert out["after"] == {"model-1": 1, "model-3": 3}


SAVES_AND_EXITS = """
root = Path(sys.argv[1])
saver = jstate.Saver()
for step in (1, 2, 1, 3):
    saver.save(make_state(step), root / "model", step=step)
say(json.dumps({"after": listed(root)}))
"""


@pytest.mark.slow
def test_a_process_exits_promptly_after_a_save_that_failed_to_create_its_directory(tmp_path):
    """No os._exit: the interpreter does not wait on an Orbax thread (for its `timeout`, 600 s)
    after saves that failed. Promptly: within 45 s, or 4 times what the same process takes
    with saves that succeed, measured here."""
    for name in ("ok", "failing"):
        (tmp_path / name).mkdir()
    started = time.monotonic()
    done = run_child(SAVES_AND_EXITS, tmp_path / "ok", timeout=600)
    assert last_json(done.stdout)["after"] == {"model-1": 1, "model-2": 2, "model-3": 3}, done.stderr[-3000:]
    limit = max(45, 4 * (time.monotonic() - started))
    code = ORBAX_MKDIR_FAILS.replace("os._exit(0)", "")
    started = time.monotonic()
    done = run_child(code, tmp_path / "failing", timeout=limit + 60)
    assert last_json(done.stdout)["after"] == {"model-1": 1, "model-3": 3}
    assert time.monotonic() - started < limit


# -- 4. Interrupts and exit -------------------------------------------------------------------------
# Each point of a save, hooked: when armed, the hook sends the process the signal there (Ctrl-C is
# SIGINT; a SIGTERM handler that raises is the other common case). In the main thread the
# handler raises inside the hook; in a background save's thread, the main thread (in `wait`)
# gets it while the save is at that point.
INTERRUPTS = """
root, sig, mode = Path(sys.argv[1]), getattr(signal, sys.argv[2]), sys.argv[3]
interrupted = threading.Event()  # set by the handler, in the main thread, as it raises
looked = threading.Event()  # set once the main thread has listed the directory after the interrupt
def on_signal(signum, frame):
    interrupted.set()
    if signum == signal.SIGTERM:
        raise SystemExit(143)
    raise KeyboardInterrupt
signal.signal(sig, on_signal)
armed = []

def hook(owner, name, point, after=True, when=lambda *a: True):
    real = getattr(owner, name)
    def hooked(*args, **kwargs):
        result = real(*args, **kwargs) if after else None
        if armed == [point] and when(*args):
            armed.clear()
            interrupted.clear()
            os.kill(os.getpid(), sig)
            if threading.current_thread() is threading.main_thread():
                interrupted.wait(60)  # the signal is pending: the handler raises here
                raise AssertionError("no interrupt")
            interrupted.wait(60)  # the main thread is interrupted, and lists the directory,
            looked.wait(60)  # while this save is held here
        return result if after else real(*args, **kwargs)
    setattr(owner, name, hooked)

hook(_commit, "prepare", "prepare")
hook(_orbax.Writer, "save", "orbax-save")
hook(_orbax.Writer, "wait", "orbax-wait", after=False)
hook(_files, "sync_tree", "sync-tree")
hook(_integrity, "file_records", "file-records")
hook(_files, "sync_file", "manifest-written", when=lambda p: Path(p).name.startswith(".jstate.json"))
hook(_commit, "commit", "committed")
hook(_commit, "delete", "retiring", after=False)
hook(_files, "sync_dir", "deleting", when=lambda d: any(".deleting" in n for n in os.listdir(d)))
points = ["prepare", "orbax-save", "orbax-wait", "sync-tree", "file-records", "manifest-written", "committed",
          "retiring", "deleting"]
results = {}
for point in points:
    d = root / point
    saver = jstate.Saver(max_to_keep=2)
    saver.save(make_state(1), d / "model", step=1)
    saver.save(make_state(2), d / "model", step=2)
    r = results[point] = {}
    armed[:] = [point]
    looked.clear()
    try:
        saver.save(make_state(3), d / "model", step=3, blocking=mode == "blocking")
        saver.wait()
        r["interrupted"] = None
    except BaseException as e:
        r["interrupted"] = type(e).__name__
        import traceback
        r["where"] = [f.name for f in traceback.extract_tb(e.__traceback__)][-4:]
    r["fired"] = not armed
    armed.clear()
    r["listed-now"] = listed(d)
    looked.set()
    try:
        saver.wait()  # a background save goes on after an interrupted `wait`
        r["wait"] = "ok"
    except BaseException as e:
        r["wait"] = f"{type(e).__name__}: {e}"
    saver.save(make_state(4), d / "model", step=4)  # the next save works
    r["listed-after"] = listed(d)
    r["leftovers"] = leftovers(d)
say(json.dumps(results))
"""
COMMITTED = {"committed", "retiring", "deleting"}  # points after the new checkpoint's commit
IN_BACKGROUND = {"orbax-wait", "sync-tree", "file-records", "manifest-written", "committed", "retiring", "deleting"}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["blocking", "async"])
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupt_at_any_point_of_a_save_loses_nothing(tmp_path, sig, mode):
    done = run_child(INTERRUPTS, tmp_path, sig, mode, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = "KeyboardInterrupt" if sig == "SIGINT" else "SystemExit"
    for point, r in last_json(done.stdout).items():
        background = mode == "async" and point in IN_BACKGROUND
        assert r["fired"] and r["interrupted"] == expected, (point, r)
        assert r["wait"] == "ok", (point, r)
        now = r["listed-now"]
        assert now.get("model-2") == 2 and set(now) <= {"model-1", "model-2", "model-3"}, (point, now)
        assert now.get("model-1", 1) == 1 and now.get("model-3", 3) == 3, (point, now)
        if not background:
            assert ("model-3" in now) == (point in COMMITTED), (point, now)
        committed = background or point in COMMITTED
        assert r["listed-after"] == ({"model-3": 3, "model-4": 4} if committed else {"model-2": 2, "model-4": 4}), (
            point,
            r,
        )
        assert r["leftovers"] == [], (point, r)


PENDING_AT_EXIT = """
# A background save held until the main thread is interrupted, so that the signal lands while it
# is pending, and the main thread waits for it.
interrupted = threading.Event()
def on_signal(signum, frame):
    interrupted.set()
    if signum == signal.SIGTERM:
        raise SystemExit(143)
    raise KeyboardInterrupt
signal.signal(getattr(signal, sys.argv[2]), on_signal)
real_sync_tree = _files.sync_tree
def held_sync_tree(path):
    interrupted.wait(60)
    real_sync_tree(path)
_files.sync_tree = held_sync_tree
saver = jstate.Saver()
saver.save(make_state(5), sys.argv[1] + "/model", step=5, blocking=False)
say("waiting")
saver.wait()
say("not interrupted")
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_pending_background_save_finishes_at_exit_after_an_interrupted_wait(tmp_path, sig):
    child = spawn_child(PENDING_AT_EXIT, tmp_path, sig)
    try:
        assert child.stdout.readline().strip() == "waiting"  # its save is pending, held
        child.send_signal(getattr(signal, sig))
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert "not interrupted" not in out
    assert ("KeyboardInterrupt" in err) if sig == "SIGINT" else (child.returncode == 143), err[-2000:]
    assert listed(tmp_path) == {"model-5": 5}
    assert leftovers(tmp_path) == []


FAILING_AT_EXIT = """
real_commit = _commit.commit
def commit(final, manifest, token):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(final / FILE))
_commit.commit = commit
saver = jstate.Saver()
saver.save(make_state(1), sys.argv[1] + "/model", step=1, blocking=False)
say("exiting")
"""


@pytest.mark.slow
def test_a_background_save_failing_at_exit_prints_one_line(tmp_path):
    done = run_child(FAILING_AT_EXIT, tmp_path, timeout=60)
    assert done.stdout.strip() == "exiting"
    path = str(tmp_path / "model-1")
    lines = [line for line in done.stderr.splitlines() if path in line]
    assert len(lines) == 1, done.stderr[-3000:]
    assert "No space left on device" in lines[0]
    assert listed(tmp_path) == {} and leftovers(tmp_path) == []


SAVING_IN_A_LOOP = """
saver = jstate.Saver(max_to_keep=3)
step = 0
while True:
    try:  # around the whole loop: a SIGINT is caught wherever it lands, between saves too
        while True:
            step += 1
            saver.save(make_state(step), sys.argv[1] + "/model", step=step, blocking=step % 2 == 0)
            saver.wait()
            say("saved", step)
    except KeyboardInterrupt:
        say("interrupted", step)
"""


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2))
def test_real_signals_at_random_moments_of_a_save_loop(tmp_path, seed):
    """SIGINTs as the saves go by (each caught, the loop goes on saving), then the default
    SIGTERM: every save reported is listed or retired, and every listed one restores. The
    parent signals after a random number of the child's reports: where each signal lands in a
    save is up to the two processes' scheduling."""
    rng = random.Random(seed)
    child = spawn_child(SAVING_IN_A_LOOP, tmp_path)
    lines: list[str] = []
    said: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in child.stdout:
            lines.append(line)
            said.put(line)
        said.put("")  # the child has exited

    def saves_go_by(count: int) -> None:
        """Wait until the child has reported `count` more saves (or has exited)."""
        while count > 0 and (line := said.get(timeout=120)):
            count -= line.startswith("saved")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        saves_go_by(1)
        for _ in range(6):
            saves_go_by(rng.randrange(1, 3))
            child.send_signal(signal.SIGINT)
        saves_go_by(1)
        child.send_signal(signal.SIGTERM)  # default: dies at once, mid-save or not
        child.wait(timeout=30)
        reader.join(timeout=10)
    finally:
        child.kill()
    saved = [int(line.split()[1]) for line in lines if re.fullmatch(r"saved \d+\n", line)]
    assert len(saved) >= 2 and any(line.startswith("interrupted") for line in lines), lines
    found = listed(tmp_path)  # every listed checkpoint restores whole
    steps = {int(name.split("-")[1]) for name in found}
    assert all(found[f"model-{s}"] == s for s in steps)
    for s in saved:  # a reported save is listed, or retired by max_to_keep=3: three newer ones are
        assert s in steps or len([t for t in steps if t > s]) >= 3, (s, sorted(steps), lines)
    jstate.Saver().save(make_state(0), tmp_path / "other")  # the next save into the directory cleans
    left = leftovers(tmp_path)
    assert left == [], {p: sorted(os.listdir(p)) if os.path.isdir(p) else "file" for p in left}


# -- SIGKILL at chosen points: nothing half-written is listed, and the next save cleans up -------
KILLED_AT = """
root, point = Path(sys.argv[1]), sys.argv[2]
armed = []
def hook(owner, name, here, after=True, when=lambda *a: True):
    real = getattr(owner, name)
    def hooked(*args, **kwargs):
        result = real(*args, **kwargs) if after else None
        if armed and here == point and when(*args):
            os.kill(os.getpid(), signal.SIGKILL)
        return result if after else real(*args, **kwargs)
    setattr(owner, name, hooked)
hook(_commit, "prepare", "prepared")
hook(_orbax.Writer, "save", "orbax-writing")
hook(_files, "sync_tree", "arrays-written", after=False)
hook(_files, "sync_file", "manifest-written", when=lambda p: Path(p).name.startswith(".jstate.json"))
hook(_commit, "commit", "committed")
hook(_files, "sync_dir", "deleting", when=lambda d: any(".deleting" in n for n in os.listdir(d)))
saver = jstate.Saver(max_to_keep=2)
saver.save(make_state(1), root / "model", step=1)
saver.save(make_state(2), root / "model", step=2)
armed.append(True)
saver.save(make_state(3), root / "model", step=3)
say("not killed")
"""
KILL_POINTS = ["prepared", "orbax-writing", "arrays-written", "manifest-written", "committed", "deleting"]


@pytest.mark.slow
def test_a_save_killed_at_any_point_leaves_nothing_listed_and_the_next_save_cleans_up(tmp_path):
    children = {point: spawn_child(KILLED_AT, tmp_path / point, point) for point in KILL_POINTS}
    for point, child in children.items():
        out, err = child.communicate(timeout=90)
        assert child.returncode == -signal.SIGKILL, (point, out, err[-2000:])
    for point in KILL_POINTS:
        directory = tmp_path / point
        found = listed(directory)  # each listed one restores whole
        expected = {"model-1": 1, "model-2": 2} | ({"model-3": 3} if point in ("committed", "deleting") else {})
        if point == "deleting":
            del expected["model-1"]  # its manifest was taken: deleted, though its files remain
        assert found == expected, point
        assert jstate.latest_checkpoint(directory) == str(directory / max(expected, key=lambda n: int(n[6:])))
        jstate.Saver().save(make_state(9), directory / "other")  # a save into the directory
        # Killed right after creating its directory, a save has marked it with its token: removed too.
        assert leftovers(directory) == [], point
        assert listed(directory) == expected | {"other": 9}


# -- 3. Many writers ------------------------------------------------------------------------------
WRITER = """
index, rounds = int(sys.argv[1]), int(sys.argv[2])
shared = jstate.Saver()  # every process saves shared-0..2: the same paths at the same time
own = jstate.Saver(max_to_keep=2)  # own<index>-<i>: retention of its own prefix only
for i in range(rounds):
    for saver, prefix, step, blocking in ((shared, "shared", i % 3, i % 2 == 0), (own, f"own{index}", i, i % 2 == 1)):
        value = 1000 * index + 10 * i + (prefix == "shared")
        say("begin", os.path.join("ckpt", f"{prefix}-{step}"), value)
        path = saver.save(make_state(value), os.path.join("ckpt", prefix), step=step, blocking=blocking)
        saver.wait()
        say("saved", path, value)
"""
READER = """
stop, reads, problems = Path(sys.argv[1]), 0, []
while not stop.exists():
    try:
        if jstate.latest_checkpoint("ckpt") is None:
            problems.append("latest_checkpoint returned None")
        jstate.open_checkpoint("ckpt")
        restored_value("ckpt")  # a whole checkpoint, never a mix; looked for again if deleted
    except Exception as e:
        problems.append(f"{type(e).__name__}: {e}")
    reads += 1
say(json.dumps({"reads": reads, "problems": problems[:5], "count": len(problems)}))
"""


def _parse(lines):
    begun, saved = {}, []
    for line in lines:
        parts = line.split()
        if len(parts) == 3 and parts[0] in ("begin", "saved"):
            if parts[0] == "begin":
                begun.setdefault(Path(parts[1]).name, set()).add(int(parts[2]))
            else:
                saved.append((Path(parts[1]).name, int(parts[2])))
    return begun, saved


@pytest.mark.slow
def test_many_processes_and_savers_save_into_one_directory_at_once(tmp_path):
    jstate.Saver().save(make_state(7), tmp_path / "ckpt" / "base")  # so a reader never rightly sees none
    stop = tmp_path / "stop"
    reader = spawn_child(READER, stop, cwd=tmp_path)
    writers = [spawn_child(WRITER, index, 4, cwd=tmp_path) for index in range(3)]
    try:
        outputs = [w.communicate(timeout=120) for w in writers]
    finally:
        stop.touch()
        read_out, read_err = reader.communicate(timeout=60)
    for w, (_, err) in zip(writers, outputs):
        assert w.returncode == 0, err[-3000:]
    begun, saved = _parse(line for out, _ in outputs for line in out.splitlines())
    assert len(saved) == 3 * 4 * 2
    found = listed(tmp_path / "ckpt")
    assert found.get("base") == 7
    for name, _ in saved:  # no retention of their prefix: every one stays, whole
        if name.startswith("shared"):
            assert found[name] in begun[name], name
    for index in range(3):  # retention of its own prefix: its two most recent saves
        own = [(n, v) for n, v in saved if n.startswith(f"own{index}-")]
        assert {n: found[n] for n in found if n.startswith(f"own{index}-")} == dict(own[-2:])
    read = last_json(read_out)
    assert read["count"] == 0 and read["reads"] > 10, (read, read_err[-2000:])
    jstate.Saver().save(make_state(8), tmp_path / "ckpt" / "after")  # every writer is gone: all is cleaned
    assert leftovers(tmp_path / "ckpt") == []


@pytest.mark.slow  # many savers in threads
def test_savers_in_threads_of_one_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    jstate.Saver().save(make_state(7), "ckpt/base")
    begun: dict[str, set[int]] = {}
    saved: list[tuple[str, int]] = []
    problems: list[str] = []
    lock, stop = threading.Lock(), threading.Event()

    def write(index):
        try:
            shared, own = jstate.Saver(), jstate.Saver(max_to_keep=1)
            for i in range(4):
                for saver, prefix, step in ((shared, "shared", i % 2), (own, f"own{index}", i)):
                    value = 1000 * index + 10 * i + (prefix == "shared")
                    with lock:
                        begun.setdefault(f"{prefix}-{step}", set()).add(value)
                    saver.save(make_state(value), f"ckpt/{prefix}", step=step, blocking=(i + index) % 2 == 0)
                    saver.wait()
                    with lock:
                        saved.append((f"{prefix}-{step}", value))
        except Exception as e:
            problems.append(f"writer {index}: {type(e).__name__}: {e}")

    def read():
        while not stop.is_set():
            try:
                assert jstate.latest_checkpoint("ckpt") is not None
                restored_value("ckpt")
            except Exception as e:
                problems.append(f"reader: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=write, args=(i,)) for i in range(3)]
    reader = threading.Thread(target=read)
    for t in [*threads, reader]:
        t.start()
    for t in threads:
        t.join(timeout=120)
    stop.set()
    reader.join(timeout=60)
    assert not problems, problems[:5]
    found = listed("ckpt")
    assert found["base"] == 7
    for name, _ in saved:
        if name.startswith("shared"):
            assert found[name] in begun[name]
    for index in range(3):
        own = [(n, v) for n, v in saved if n.startswith(f"own{index}-")]
        assert {n: found[n] for n in found if n.startswith(f"own{index}-")} == dict(own[-1:])
    assert leftovers("ckpt") == []


LOOPING_WRITER = """
saver = jstate.Saver(max_to_keep=1)
for step in range(1, int(sys.argv[2]) + 1):
    saver.save(make_state(step), os.path.join(sys.argv[1], "model"), step=step, blocking=step % 2 == 0)
    saver.wait()
    say("saved", step)
"""


@pytest.mark.slow
@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_readers_beside_a_writer_keeping_one_never_see_none_or_a_mix(tmp_path, relative):
    directory = "ckpt" if relative else str(tmp_path / "ckpt")
    writer = spawn_child(LOOPING_WRITER, directory, 16, cwd=tmp_path)
    try:
        assert writer.stdout.readline().split() == ["saved", "1"]
        path = tmp_path / "ckpt"
        reads, seen = 0, set()
        while writer.poll() is None:
            latest = jstate.latest_checkpoint(path)
            assert latest is not None
            assert jstate.open_checkpoint(path).step >= 1
            value = restored_value(path)  # whole, and from one of the saves
            assert 1 <= value <= 16
            seen.add(value)
            reads += 1
        out, err = writer.communicate(timeout=60)
    finally:
        writer.kill()
    assert writer.returncode == 0, err[-2000:]
    assert reads > 20 and len(seen) > 3, (reads, seen)
    assert listed(tmp_path / "ckpt") == {"model-16": 16}


RESAVING_ONE_PATH = """
for i in range(int(sys.argv[3])):
    jstate.Saver().save(make_state(int(sys.argv[2]) + i), sys.argv[1], blocking=i % 2 == 0)
    say("saved", int(sys.argv[2]) + i)
"""


@pytest.mark.slow
def test_two_processes_resaving_one_path_readers_see_one_save_or_the_other(tmp_path):
    path = tmp_path / "ckpt" / "model"
    jstate.Saver().save(make_state(1), path)
    writers = [spawn_child(RESAVING_ONE_PATH, path, base, 8) for base in (100, 200)]
    try:
        reads = 0
        while any(w.poll() is None for w in writers):
            assert restored_value(path) in {1} | set(range(100, 108)) | set(range(200, 208))
            reads += 1
        outputs = [w.communicate(timeout=60) for w in writers]
    finally:
        for w in writers:
            w.kill()
    assert all(w.returncode == 0 for w in writers), [err[-2000:] for _, err in outputs]
    assert reads > 10
    assert restored_value(path) in (107, 207)
    jstate.Saver().save(make_state(5), tmp_path / "ckpt" / "other")
    assert leftovers(tmp_path / "ckpt") == []


@pytest.mark.parametrize("moment", ["staging made", "marker made"])
def test_a_save_stopped_while_making_its_directory_leaves_nothing_behind(tmp_path, monkeypatch, moment):
    """The checkpoint directory appears already holding its marker (made beside it, then renamed
    into place): stopped at any moment, a save leaves nothing or a marked directory, which the
    next save removes; never an empty directory that nothing would remove (CI saw one)."""
    from jstate.formats import commit as _commit
    from jstate.storage import tokens as _tokens

    real_mkdir, real_touch = Path.mkdir, Path.touch

    def stop_after(real, wanted):
        def hooked(self, *args, **kwargs):
            real(self, *args, **kwargs)
            if moment == wanted:
                raise KeyboardInterrupt  # as a signal landing right here

        return hooked

    monkeypatch.setattr(Path, "mkdir", stop_after(real_mkdir, "staging made"))
    monkeypatch.setattr(Path, "touch", stop_after(real_touch, "marker made"))
    with pytest.raises(KeyboardInterrupt):
        _commit.prepare(tmp_path / "model-1", _tokens.token())  # a token of no save in flight: dead
    monkeypatch.undo()
    assert not (tmp_path / "model-1").exists() or os.listdir(tmp_path / "model-1")
    jstate.Saver().save(make_state(0), tmp_path / "other")  # the next save into the directory cleans
    assert sorted(os.listdir(tmp_path)) == ["other"]
