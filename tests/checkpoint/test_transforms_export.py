"""Saving through restore-time transforms: a Saver built with transforms writes each checkpoint entry
back in its original name and layout (negative axes and indices included), and refuses, naming the
variables, where one entry would get two different values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jstate
from jstate import transforms as T

S = jax.ShapeDtypeStruct


def test_export_through_transpose_with_negative_axes_writes_the_original_layout(tmp_path, monkeypatch):
    """A transpose with negative axes, `T.transpose(x, (-1, 0))`, restores x.T as NumPy reads the
    axes, and saving through it writes the (2, 3) entry back in its own layout."""
    monkeypatch.chdir(tmp_path)
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = jstate.Saver().save({"w": w}, "torch")
    saver = jstate.Saver([("k", T.transpose("w", (-1, 0)))])
    restored = saver.restore(path, {"k": S((3, 2), jnp.float32)})
    np.testing.assert_array_equal(restored["k"], w.T)
    back = saver.save(restored, "back")
    assert jstate.list_variables(back) == [("w", (2, 3), np.dtype("float32"))]
    np.testing.assert_array_equal(jstate.load_variable(back, "w"), w)


def test_export_through_transpose_with_negative_axes_3d(tmp_path):
    """The same in three dimensions: `(0, -1, 1)` restores and saves back exactly."""
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    path = jstate.Saver().save({"x": x}, tmp_path / "x")
    saver = jstate.Saver([("y", T.transpose("x", (0, -1, 1)))])  # (2, 4, 3)
    restored = saver.restore(path, {"y": S((2, 4, 3), jnp.float32)})
    np.testing.assert_array_equal(restored["y"], x.transpose(0, 2, 1))
    back = saver.save(restored, tmp_path / "back")
    np.testing.assert_array_equal(jstate.load_variable(back, "x"), x)


def test_saving_through_split_parts_taken_with_negative_indices(tmp_path):
    """`split(...)[-1]` is the last part: parts taken as 0, 1 and -1 restore, and saving
    through them counts them as the whole entry and writes it back."""
    qkv = np.arange(12, dtype=np.float32).reshape(2, 6)
    path = jstate.Saver().save({"qkv": qkv}, tmp_path / "qkv")
    parts = T.split("qkv", 3, axis=1)
    saver = jstate.Saver([("q", parts[0]), ("k", parts[1]), ("v", parts[-1])])
    restored = saver.restore(path, {n: S((2, 2), jnp.float32) for n in "qkv"})
    np.testing.assert_array_equal(restored["v"], qkv[:, 4:])
    back = saver.save(restored, tmp_path / "back")
    np.testing.assert_array_equal(jstate.load_variable(back, "qkv"), qkv)


def test_two_variables_from_one_split_part_do_not_save_one_of_them_silently(tmp_path):
    """Two variables restored from one split part restore alike; saving them back once they
    differ is refused naming them (one part cannot hold two values), and nothing is written."""
    qkv = np.arange(12, dtype=np.float32).reshape(2, 6)
    path = jstate.Saver().save({"qkv": qkv}, tmp_path / "qkv")
    parts = T.split("qkv", 3, axis=1)
    saver = jstate.Saver([("q", parts[0]), ("q_copy", parts[0]), ("k", parts[1]), ("v", parts[2])])
    restored = saver.restore(path, {n: S((2, 2), jnp.float32) for n in ("q", "q_copy", "k", "v")})
    restored = {**restored, "q_copy": restored["q_copy"] + 100}
    with pytest.raises(jstate.MappingError, match="q_copy"):
        saver.save(restored, tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_two_transforms_writing_one_entry_name_both_variables(tmp_path):
    """Two transforms that would both write entry 'qkv' are refused, and the message names both
    variables."""
    qkv = np.arange(12, dtype=np.float32).reshape(2, 6)
    path = jstate.Saver().save({"qkv": qkv}, tmp_path / "qkv")
    saver = jstate.Saver([("a", T.transpose("qkv")), ("b", T.cast("qkv", "bfloat16"))])
    restored = saver.restore(path, {"a": S((6, 2), jnp.float32), "b": S((2, 6), jnp.bfloat16)})
    with pytest.raises(jstate.MappingError, match=r"'a'.*'b'|'b'.*'a'"):
        saver.save(restored, tmp_path / "back")


def test_restoring_a_shared_entry_by_name_and_through_transforms(tmp_path):
    """One entry read by name, by a transpose, a cast and a split: all restore; saving back
    refuses, since one entry would have several sources."""
    qkv = np.arange(12, dtype=np.float32).reshape(2, 6)
    path = jstate.Saver().save({"qkv": qkv, "w": np.ones(3, np.float32)}, tmp_path / "m")
    saver = jstate.Saver(
        [
            "qkv",
            ("a", T.transpose("qkv")),
            ("b", T.cast("qkv", "bfloat16")),
            (("q", "k", "v"), T.split("qkv", 3, axis=1)),
        ]
    )
    target = {
        "qkv": S((2, 6), jnp.float32),
        "a": S((6, 2), jnp.float32),
        "b": S((2, 6), jnp.bfloat16),
        **{n: S((2, 2), jnp.float32) for n in "qkv"},
    }
    plan = saver.plan(path, target, strict=True)
    assert [type(p) for p in plan.problems] == [jstate.CheckpointError] and "'w'" in str(plan.problems[0])
    got = saver.restore(path, target)
    np.testing.assert_array_equal(got["a"], qkv.T)
    np.testing.assert_array_equal(got["v"], qkv[:, 4:])
    with pytest.raises(jstate.MappingError):
        saver.save(got, tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_saving_through_unstack_parts_named_one_by_one_writes_every_part_or_names_the_missing(tmp_path):
    """An unstack's parts named one by one restore a subset of a 4-layer stack; saving them back
    would write a 2-layer entry, so it is a MappingError: with `parts=` it names the missing
    parts, without it it says the count is unknown and how to give it. A split's parts the
    same. Every part named writes the whole entry back."""
    layers = np.arange(24, dtype=np.float32).reshape(4, 2, 3)
    path = jstate.Saver().save({"layers": layers}, tmp_path / "stack")
    target = {f"b{i}": S((2, 3), jnp.float32) for i in range(4)}
    for unstack in (T.unstack("layers"), T.unstack("layers", parts=4)):
        two = jstate.Saver([("b0", unstack[0]), ("b1", unstack[1])])
        restored = two.restore(path, {n: target[n] for n in ("b0", "b1")})
        np.testing.assert_array_equal(restored["b1"], layers[1])
        missing = r"part\(s\) \[2, 3\] of 4 missing" if unstack.args[1] else r"known only from a checkpoint.*parts=N"
        with pytest.raises(jstate.MappingError, match=r"\[0\] from 'b0', \[1\] from 'b1'.*" + missing):
            two.save(restored, tmp_path / "back")
        assert not (tmp_path / "back").exists()
    with pytest.raises(jstate.MappingError, match=r"part\(s\) \[2\] of 3 missing"):
        jstate.Saver([("q", T.split("qkv", 3)[0]), ("k", T.split("qkv", 3)[1])]).save(
            {"q": np.ones(2), "k": np.ones(2)}, tmp_path / "qkv"
        )
    every = jstate.Saver([(f"b{i}", T.unstack("layers", parts=4)[i]) for i in range(4)])
    back = every.save(every.restore(path, target), tmp_path / "every")
    np.testing.assert_array_equal(jstate.load_variable(back, "layers"), layers)
    with pytest.raises(jstate.MappingError, match=r"expects 5 parts, and its input has 4"):
        jstate.Saver([(f"b{i}", T.unstack("layers", parts=5)[i]) for i in range(4)]).restore(path, target)
