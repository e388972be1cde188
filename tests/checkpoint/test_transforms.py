"""Restore-time transforms (`jstate.transforms`) and `Saver.plan`: real checkpoints on disk,
real shardings over the 8 CPU devices."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jstate
from jstate import transforms as T
from jstate.formats.native import NativeCheckpoint

S = jax.ShapeDtypeStruct
LAYERS, D = 4, 8
# 24 TF1 dense blocks and a head fitted with Adam: 153 entries (tests/data/tensorflow/make_fixtures.py)
ENCODER, BLOCKS = Path(__file__).parents[1] / "data" / "tensorflow" / "encoder" / "model.ckpt-5", 24


def per_layer(s):
    for i in range(LAYERS):
        s.variable(f"layers_{i}/kernel", jstate.initializers.normal(), (D, 2 * D))
    s.variable("attn/qkv", jstate.initializers.normal(), (D, 3 * D))
    s.variable("linear/weight", jstate.initializers.normal(), (2 * D, D))  # PyTorch's (out, in)
    s.variable("step", jnp.array(7, jnp.int32))


def stacked(s):
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    s.variable(
        "layers/kernel",
        jstate.initializers.zeros,
        (LAYERS, D, 2 * D),
        sharding=NamedSharding(mesh, P(None, "data", "model")),
    )
    for name in ("q", "k", "v"):
        s.variable(f"attn/{name}", jstate.initializers.zeros, (D, D))
    s.variable("dense/kernel", jstate.initializers.zeros, (D, 2 * D), jnp.bfloat16)
    s.variable("step", jnp.array(0, jnp.int32))


RULES = [
    ("layers/kernel", T.stack([f"layers_{i}/kernel" for i in range(LAYERS)])),
    (("attn/q", "attn/k", "attn/v"), T.split("attn/qkv", 3, axis=-1)),
    ("dense/kernel", T.cast(T.transpose("linear/weight"), "bfloat16")),
    "step",
]


@pytest.fixture
def old(tmp_path):
    state = jstate.init(per_layer, jax.random.key(0))
    return state, jstate.Saver().save(state, tmp_path / "old")


def test_stack_split_transpose_and_cast_restore_onto_the_new_layout(old):
    state, path = old
    new = jstate.Saver(RULES).restore(path, jstate.abstract(stacked))
    expected = np.stack([state[f"layers_{i}/kernel"] for i in range(LAYERS)])
    np.testing.assert_array_equal(new["layers/kernel"], expected)
    q, k, v = np.split(np.asarray(state["attn/qkv"]), 3, axis=-1)
    for name, part in zip("qkv", (q, k, v)):
        np.testing.assert_array_equal(new[f"attn/{name}"], part)
    np.testing.assert_array_equal(new["dense/kernel"], np.asarray(state["linear/weight"]).T.astype(jnp.bfloat16))
    assert new["dense/kernel"].dtype == jnp.bfloat16
    assert int(new["step"]) == 7
    # each result lands on its declared sharding, not where the host put it
    assert new["layers/kernel"].sharding == new.spec("layers/kernel").sharding
    assert len(new["layers/kernel"].addressable_shards) == 8


def test_saving_through_the_same_rules_writes_the_old_layout_back(old, tmp_path):
    state, path = old
    saver = jstate.Saver(RULES)
    new = saver.restore(path, jstate.abstract(stacked))
    again = saver.save(new, tmp_path / "exported")
    names = dict((n, s) for n, s, _ in jstate.list_variables(again))
    assert names["layers_3/kernel"] == (D, 2 * D) and names["attn/qkv"] == (D, 3 * D)
    assert names["linear/weight"] == (2 * D, D)
    for i in range(LAYERS):
        np.testing.assert_array_equal(jstate.load_variable(again, f"layers_{i}/kernel"), state[f"layers_{i}/kernel"])
    np.testing.assert_array_equal(jstate.load_variable(again, "attn/qkv"), state["attn/qkv"])
    # the cast saves the State's dtype (bfloat16): the round trip is exact in it
    assert jstate.load_variable(again, "linear/weight").dtype == jnp.bfloat16
    # and restoring the export through the same rules gives the same State
    back = saver.restore(again, jstate.abstract(stacked))
    for name in new:
        np.testing.assert_array_equal(back[name], new[name])


@pytest.mark.slow  # seconds of checkpoints and compiles
def test_unstack_and_concat_go_the_other_way(tmp_path):
    def model(s):
        s.variable("layers/kernel", jstate.initializers.normal(), (3, D, D))
        s.variable("qkv", jstate.initializers.normal(), (D, 3 * D))

    state = jstate.init(model, jax.random.key(1))
    path = jstate.Saver().save(state, tmp_path / "scanned")

    def unrolled(s):
        for i in range(3):
            s.variable(f"block{i}/kernel", jstate.initializers.zeros, (D, D))
        s.variable("fused", jstate.initializers.zeros, (D, 3 * D))

    saver = jstate.Saver(
        [
            ([f"block{i}/kernel" for i in range(3)], T.unstack("layers/kernel")),
            ("fused", T.concat([T.split("qkv", 3, axis=1)[i] for i in (2, 1, 0)], axis=1, sizes=[D, D, D])),
        ]
    )
    new = saver.restore(path, jstate.abstract(unrolled))
    for i in range(3):
        np.testing.assert_array_equal(new[f"block{i}/kernel"], state["layers/kernel"][i])
    q, k, v = np.split(np.asarray(state["qkv"]), 3, axis=1)
    np.testing.assert_array_equal(new["fused"], np.concatenate([v, k, q], axis=1))
    # exported back, then read by name: the original layout
    again = saver.save(new, tmp_path / "again")
    np.testing.assert_array_equal(jstate.load_variable(again, "layers/kernel"), state["layers/kernel"])
    np.testing.assert_array_equal(jstate.load_variable(again, "qkv"), state["qkv"])


def test_reshape_and_a_pytree_target_from_eval_shape(tmp_path):
    flat = {"conv": {"kernel": jnp.arange(3 * 3 * 4 * 8, dtype=jnp.float32).reshape(3, 3, 4, 8)}}
    path = jstate.Saver().save(flat, tmp_path / "conv")
    target = jax.eval_shape(lambda: {"dense": {"kernel": jnp.zeros((36, 8))}})
    saver = jstate.Saver([("dense/kernel", T.reshape("conv/kernel", (-1, 8), saved_shape=(3, 3, 4, 8)))])
    restored = saver.restore(path, target)
    np.testing.assert_array_equal(restored["dense"]["kernel"], np.asarray(flat["conv"]["kernel"]).reshape(36, 8))
    again = saver.save(restored, tmp_path / "back")
    np.testing.assert_array_equal(jstate.load_variable(again, "conv/kernel"), flat["conv"]["kernel"])


def test_a_missing_transform_input_fails_before_reading_naming_it(old, no_reads):
    _, path = old
    saver = jstate.Saver([("layers/kernel", T.stack([f"layers_{i}/kernel" for i in range(LAYERS + 1)]))])
    with pytest.raises(
        jstate.CheckpointError, match=r"lacks 'layers_4/kernel', read by stack\(.*\) to fill 'layers/kernel'"
    ):
        saver.restore(path, jstate.abstract(stacked))


def test_a_wrong_shape_or_dtype_fails_before_reading(old, no_reads):
    _, path = old
    target = jstate.abstract(stacked)
    with pytest.raises(
        jstate.SpecMismatchError, match=r"gives shape \(16, 8\) .* 'dense/kernel' is declared with shape \(8, 16\)"
    ):
        jstate.Saver([("dense/kernel", T.cast("linear/weight", "bfloat16"))]).restore(path, target)
    with pytest.raises(
        jstate.SpecMismatchError, match=r"dtype float32, but 'dense/kernel' .* dtype bfloat16. Pass `cast=True`"
    ):
        jstate.Saver([("dense/kernel", T.transpose("linear/weight"))]).restore(path, target)
    with pytest.raises(
        jstate.MappingError, match=r"Saver rule for 'dense/kernel': reshape\('linear/weight', \(5, 5\)\) does not apply"
    ):
        jstate.Saver([("dense/kernel", T.reshape("linear/weight", (5, 5)))]).restore(path, target)


def test_cast_true_converts_a_transforms_result(old):
    state, path = old
    new = jstate.Saver([("dense/kernel", T.transpose("linear/weight"))]).restore(
        path, jstate.abstract(stacked), cast=True
    )
    assert new["dense/kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(new["dense/kernel"], np.asarray(state["linear/weight"]).T.astype(jnp.bfloat16))


def test_one_group_of_inputs_is_read_at_a_time(old, monkeypatch):
    """Host memory stays about one variable above the State: each read_host call holds the
    inputs of one target (or of the parts of one split), never everything at once."""
    _, path = old
    calls = []
    real = NativeCheckpoint.read_host

    def spy(self, names, **kwargs):
        calls.append(sorted(names))
        return real(self, names, **kwargs)

    monkeypatch.setattr(NativeCheckpoint, "read_host", spy)
    jstate.Saver(RULES).restore(path, jstate.abstract(stacked))
    assert sorted(calls) == sorted([[f"layers_{i}/kernel" for i in range(LAYERS)], ["attn/qkv"], ["linear/weight"]])


def test_plan_lists_sources_transforms_unfilled_and_unused(old):
    _, path = old
    saver = jstate.Saver(RULES[:2])
    plan = saver.plan(path, jstate.abstract(stacked))
    rows = {row[0]: row for row in plan.table()}
    assert set(rows) == {"layers/kernel", "attn/q", "attn/k", "attn/v"}
    # each entry read said once, in "from" (a numbered run as a range with its count), the
    # transform's operations in "transform"
    assert rows["layers/kernel"][1] == f"layers_{{0..{LAYERS - 1}}}/kernel ({LAYERS})"
    assert rows["layers/kernel"][2] == "stack(axis=0)"
    assert plan.transforms["layers/kernel"].entries() == [f"layers_{i}/kernel" for i in range(LAYERS)]
    assert rows["attn/k"][1] == "attn/qkv" and rows["attn/k"][2] == "split(3, axis=-1)[1]"
    assert rows["attn/k"][3] == (D, D)
    assert plan.kept == ["dense/kernel", "step"]
    assert plan.unused == ["linear/weight", "step"]
    assert plan.problems == []
    text, page = str(plan), plan._repr_html_()
    assert "Left as in the target (nothing fills them): 'dense/kernel', 'step'" in text
    assert "<table>" in page and "Checkpoint entries nothing uses" in page


def test_plan_reports_what_restore_would_raise(old):
    _, path = old
    saver = jstate.Saver(
        [("layers/kernel", T.stack(["layers_0/kernel", "nope"])), ("dense/kernel", T.transpose("linear/weight"))]
    )
    plan = saver.plan(path, jstate.abstract(stacked), strict=True)
    kinds = [type(p).__name__ for p in plan.problems]
    assert kinds == ["CheckpointError", "CheckpointError", "SpecMismatchError"]
    assert "lacks 'nope'" in str(plan.problems[0]) and "does not restore" in str(plan.problems[1])
    assert "Problem: " in str(plan)
    with pytest.raises(jstate.CheckpointError, match="lacks 'nope'"):
        saver.restore(path, jstate.abstract(stacked))


def test_mapping_errors_name_the_rule():
    with pytest.raises(jstate.MappingError, match=r"has 3 parts, and the rule names 2 State variables"):
        jstate.Saver([(("q", "k"), T.split("qkv", 3))])
    with pytest.raises(jstate.MappingError, match=r"has several parts. Give a tuple of State names"):
        jstate.Saver([("q", T.split("qkv", 3))])
    with pytest.raises(jstate.MappingError, match=r"has one output"):
        jstate.Saver([(("q", "k"), T.transpose("qkv"))])
    with pytest.raises(jstate.MappingError, match=r"names State variable 'q' twice"):
        jstate.Saver(["q", ("q", T.transpose("qkv"))])
    with pytest.raises(TypeError, match="has several outputs"):
        T.transpose(T.split("qkv", 3))
    with pytest.raises(TypeError, match="non-empty list"):
        T.stack("layers_0/kernel")


def test_saving_through_a_transform_that_cannot_be_inverted_says_what_it_needs(old, tmp_path):
    state, _ = old

    def model(s):
        s.variable("w", jnp.ones((4, 4)))
        s.variable("q", jnp.ones((2, 2)))

    new = jstate.init(model, jax.random.key(0))
    with pytest.raises(jstate.MappingError, match=r"needs the saved shape: reshape\(..., saved_shape=...\)"):
        jstate.Saver([("w", T.reshape("flat", (4, 4)))]).save(new, tmp_path / "x")
    with pytest.raises(jstate.MappingError, match=r"needs all its parts, and got only parts \[0\]"):
        jstate.Saver([("q", T.split("qkv", 3)[0])]).save(new, tmp_path / "x")
    with pytest.raises(jstate.MappingError, match="would hold both a variable saved by name and one saved through"):
        jstate.Saver([("w", T.transpose("q")), "q"]).save(new, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_prng_keys_are_not_transformed(tmp_path, no_reads):
    path = jstate.Saver().save({"key": jax.random.key(0)}, tmp_path / "k")
    with pytest.raises(jstate.MappingError, match="reads PRNG key 'key'"):
        jstate.Saver([("k2", T.transpose("key"))]).restore(path, {"k2": jax.random.key(1)})


@pytest.mark.slow  # seconds of checkpoints and compiles
def test_the_layouts_guide_example_runs(tmp_path, monkeypatch, capsys):
    guide = Path(__file__).parents[2] / "docs" / "guides" / "layouts.md"
    code = re.search(r"```\{code-cell\}[^\n]*\n(.*?)```", guide.read_text(), flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, str(guide), "exec"), scope)
    out = capsys.readouterr().out
    assert re.search(r"layers/kernel +layers_\{0\.\.3\}/kernel \(4\) +stack\(axis=0\) +\(4, 64, 64\)", out), out
    assert max(len(line) for line in out.splitlines()) <= 120
    assert jstate.list_variables("ckpt/exported") == jstate.list_variables("ckpt/old")
    np.testing.assert_array_equal(
        jstate.load_variable("ckpt/exported", "attn/qkv"), jstate.load_variable("ckpt/old", "attn/qkv")
    )


def test_a_transform_target_is_not_also_read_by_an_earlier_scope_or_regex_rule(old):
    state, path = old
    saver = jstate.Saver([(r"^attn/(.*)$", r"attn/\1"), ("attn/q", T.split("attn/qkv", 3, axis=-1)[0])])
    plan = saver.plan(path, jstate.abstract(stacked))
    assert "attn/q" not in plan.names and list(plan.transforms) == ["attn/q"]
    assert [row[0] for row in plan.table()].count("attn/q") == 1


def test_plan_shows_a_rule_for_an_undeclared_variable_and_a_failing_transform(old):
    _, path = old
    plan = jstate.Saver([("zz", T.transpose("linear/weight"))]).plan(path, jstate.abstract(stacked))
    assert len(plan.problems) == 1 and "'zz'" in str(plan.problems[0]) and len(plan.table()) == 0
    plan = jstate.Saver([("dense/kernel", T.reshape("linear/weight", (5, 5)))]).plan(path, jstate.abstract(stacked))
    assert [row[0] for row in plan.table()] == ["dense/kernel"] and plan.table().rows[0][3] == "?"


def test_64_bit_targets_without_x64_are_refused_before_reading(old, no_reads):
    _, path = old
    with pytest.raises(jstate.SpecMismatchError, match="declared int64, but JAX's 64-bit mode is off"):
        jstate.Saver(["step"]).restore(path, {"step": jax.ShapeDtypeStruct((), jnp.int64)})


def test_unstack_into_fewer_names_than_slices_is_a_problem_not_a_silent_truncation(tmp_path, no_reads):
    """A tuple of names takes every part of an unstack: 2 names for a 4-layer stack are a plan
    problem naming the entry and its 4 slices, and a restore raises MappingError before reading
    (never layers 0-1 restored and 2-3 dropped)."""
    path = jstate.Saver().save({"layers": np.zeros((4, 2, 3), np.float32)}, tmp_path / "stk")
    saver = jstate.Saver([(("b0", "b1"), T.unstack("layers"))])
    target = {f"b{i}": S((2, 3), jnp.float32) for i in range(2)}
    plan = saver.plan(path, target)
    assert plan.problems, "an unstack of 4 slices into 2 names should be reported"
    assert "4" in str(plan.problems[0]) and "'layers'" in str(plan.problems[0])
    with pytest.raises(jstate.MappingError):
        saver.restore(path, target)


def test_int64_values_are_not_truncated_without_x64(tmp_path):
    """Without jax_enable_x64, a target declared int64 (a `jax.ShapeDtypeStruct` keeps it) is
    refused, by name and through a transform: JAX would place 2**40 + 5 as the int32 5."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    assert not jax.config.jax_enable_x64
    path = str(tmp_path / "big.safetensors")
    safetensors_numpy.save_file({"big": np.array([2**40 + 5, 7], np.int64)}, path)
    with pytest.raises(jstate.JStateError):
        jstate.Saver().restore(path, {"big": S((2,), jnp.int64)})
    with pytest.raises(jstate.JStateError):
        jstate.Saver([("b", T.reshape("big", (2, 1)))]).restore(path, {"b": S((2, 1), jnp.int64)})


def test_a_huge_split_index_is_a_plan_problem(tmp_path):
    """A split index too large for a C long is a plan problem (a MappingError), like any other
    index that does not apply."""
    path = jstate.Saver().save({"x": np.arange(10, dtype=np.float32)}, tmp_path / "x")
    saver = jstate.Saver([(("a", "b"), T.split("x", [10**20]))])
    plan = saver.plan(path, {"a": S((10,), jnp.float32), "b": S((0,), jnp.float32)})
    assert plan.problems and isinstance(plan.problems[0], jstate.MappingError)


def test_split_at_negative_or_decreasing_indices_is_refused_when_written():
    """jnp.split (which computes the plan's shapes) refuses negative indices that numpy.split
    takes; `split` refuses them where they are written, so the plan and the values never differ."""
    with pytest.raises(ValueError, match=r"indices must be >= 0 and increasing, got \[-3\]"):
        T.split("x", [-3])
    with pytest.raises(ValueError, match="increasing"):
        T.split("x", [5, 2])


def test_split_sections_may_be_a_numpy_integer():
    """`T.split("qkv", np.int64(3))` (heads from a config array) is the same as
    `T.split("qkv", 3)`: any integer counts as a number of sections."""
    assert T.split("qkv", np.int64(3)) == T.split("qkv", 3)


def test_a_transform_result_that_its_sharding_cannot_hold_is_a_jstate_error(tmp_path, mesh):
    """A target whose sharding does not divide its shape is a PlacementError naming the
    variable, read by name or through a transform (README: "Every failure is one
    jstate.CheckpointError")."""
    path = jstate.Saver().save({"w": np.ones((2, 3), np.float32)}, tmp_path / "m")
    bad = S((2, 3), jnp.float32, sharding=NamedSharding(mesh, P(None, "model")))
    with pytest.raises(jstate.PlacementError, match=r"'w' of shape \(2, 3\) .* axis 1 is partitioned 2 times"):
        jstate.Saver().restore(path, {"w": bad})
    with pytest.raises(jstate.PlacementError, match="'k'"):
        jstate.Saver([("k", T.reshape("w", (2, 3)))]).restore(path, {"k": bad})


def test_a_plan_made_before_a_resave_does_not_bind_the_restore(tmp_path):
    """A restore checks the checkpoint as it is now: re-saved with new shapes after a plan, the
    old target is refused and the new one restores."""
    path = jstate.Saver().save({"w": np.zeros((2, 3), np.float32)}, tmp_path / "m")
    saver = jstate.Saver([("k", T.transpose("w"))])
    assert saver.plan(path, {"k": S((3, 2), jnp.float32)}).problems == []
    jstate.Saver().save({"w": np.ones((4, 5), np.float32)}, tmp_path / "m")  # re-saved in place
    with pytest.raises(jstate.SpecMismatchError, match=r"gives shape \(5, 4\).*declared with shape \(3, 2\)"):
        saver.restore(path, {"k": S((3, 2), jnp.float32)})
    assert (saver.restore(path, {"k": S((5, 4), jnp.float32)})["k"] == 1).all()


def test_a_plan_of_stacked_transforms_over_many_layers_fits_120_columns(tmp_path):
    """Each row says the entries once (a numbered run as a range with its count, other lists by
    their first and a count) and the transform's operations once, so 24 stacked layers fit as
    they are; names too long for 120 columns are shortened in their middle, never past it."""
    layers, names = 24, ("attn/q", "attn/k", "mlp/w")
    source = {f"encoder/layers_{i}/{n}": np.zeros((4, 2), np.float32) for i in range(layers) for n in names}
    source |= {f"odd/{c}": np.zeros((2,), np.float32) for c in "xyzw"}
    path = jstate.Saver().save(source, tmp_path / "per_layer")
    stacked_rules = [
        (f"model/layers/{n}", T.transpose(T.stack([f"encoder/layers_{i}/{n}" for i in range(layers)]), (1, 0, 2)))
        for n in names
    ]
    rules = [*stacked_rules, ("model/odd", T.concat([f"odd/{c}" for c in "xyzw"]))]
    target = {f"model/layers/{n}": S((4, layers, 2), jnp.float32) for n in names} | {"model/odd": S((8,), jnp.float32)}
    plan = jstate.Saver(rules).plan(path, target)
    assert plan.problems == []
    text = str(plan.table())
    assert max(map(len, text.splitlines())) <= 120, text
    rows = {row[0]: row for row in plan.table()}
    query = rows["model/layers/attn/q"]
    assert query[1] == f"encoder/layers_{{0..{layers - 1}}}/attn/q ({layers})"
    assert query[2] == "transpose(stack(axis=0), axes=(1, 0, 2))"
    assert rows["model/odd"][1] == "odd/x, ... 4 entries" and rows["model/odd"][2] == "concat(axis=0)"
    assert text.count("encoder/layers_") == 3  # once per row, never twice
    # names of 60 and more characters: shortened in their middle, their ends kept
    long = "model/" + "a_very_long_variable_name_" * 3 + "kernel"
    rules = [(long, T.cast(T.reshape(f"encoder/layers_0/{names[2]}", (8,), saved_shape=(4, 2)), "bfloat16"))]
    rules += [(n.replace("model/layers/", "model/stacked_encoder_transformer_layers/"), t) for n, t in stacked_rules]
    target = {n.replace("model/layers/", "model/stacked_encoder_transformer_layers/"): s for n, s in target.items()}
    plan = jstate.Saver(rules).plan(path, target | {long: S((8,), jnp.bfloat16)})
    text = str(plan.table())
    assert plan.problems == [] and max(map(len, text.splitlines())) <= 120, text
    cut = [row[0] for row in plan.table() if "..." in row[0]]
    assert cut and all(c.startswith("model/") and len(c) >= 40 for c in cut) and any(c.endswith("kernel") for c in cut)


def _widths(text: str) -> list[int]:
    return [len(line) for line in text.splitlines()]


def test_every_line_of_a_plan_over_24_stacked_tf1_layers_fits_120_columns():
    """Table, notes and problems of a plan stacking 24 TF1 blocks (their Adam slots too) fit 120
    columns: the notes wrap; a cell too long gives up the scopes its rows share, never the leaf,
    the count or a run's range cut through; a transform too long its parameters, never an op."""
    kernels = [f"encoder/block_{i}/dense/kernel" for i in range(BLOCKS)]
    cast = T.cast(T.transpose(T.stack(kernels), (0, 2, 1)), "bfloat16", saved_dtype="float32")
    rules = [
        ("encoder/layers/dense/kernel_transposed_in_bfloat16", cast),
        ("encoder/layers/dense/bias", T.stack([f"encoder/block_{i}/dense/bias" for i in range(BLOCKS)])),
        ("encoder/layers/dense/adam_first_moment_of_the_kernel", T.stack([f"{n}/Adam" for n in kernels])),
        ("head/kernel", T.transpose("head/kernel")),
    ]
    target = {
        "encoder/layers/dense/kernel_transposed_in_bfloat16": S((BLOCKS, 4, 5), jnp.bfloat16),  # 5: wrong
        "encoder/layers/dense/bias": S((BLOCKS, 4), jnp.float32),
        "encoder/layers/dense/adam_first_moment_of_the_kernel": S((BLOCKS, 4, 4), jnp.float32),
        "head/kernel": S((1, 4), jnp.float32),
        "not_in_checkpoint/a/very/long/variable/name/that/nothing/in/the/checkpoint/fills/at/all": S((3,), jnp.float32),
    }
    saver = jstate.Saver(rules)
    plan = saver.plan(ENCODER, target, strict=True, ignore=[r"/Adam(_1)?$"])
    text = str(plan)
    assert max(_widths(text)) <= 120, text
    assert [type(p).__name__ for p in plan.problems] == ["CheckpointError", "SpecMismatchError"]
    assert "Problem: " in text and "Ignored (`ignore=`): */Adam (26: " in text
    adam, bias, kernel, head = plan.table()  # by variable name
    # what tells the rows apart stays: the leaf, the slot, the count; a run's range whole or given up whole
    assert [adam[1].rsplit("/", 2)[-2:], bias[1].rsplit("/", 1)[-1], kernel[1].rsplit("/", 1)[-1]] == [
        ["kernel", "Adam (24)"],
        "bias (24)",
        "kernel (24)",
    ]
    for row in (adam, bias, kernel):
        assert row[1].startswith("encoder/") and ("{0.." not in row[1] or "{0..23}" in row[1]), row
    assert adam[0].endswith("of_the_kernel") and kernel[0].endswith("in_bfloat16"), (adam, kernel)
    assert bias[2] == "stack(axis=0)" and kernel[2].startswith("cast(transpose(stack") and head[2] == "transpose"
    # the problem names the transform's 24 inputs once, as their run, in the plan and in restore's error
    mismatch = str(plan.problems[1])
    assert mismatch.count("encoder/block_") == 1 and len(mismatch) < 400, mismatch
    assert "of encoder/block_{0..23}/dense/kernel (24) gives shape (24, 4, 4)" in mismatch
    with pytest.raises(
        jstate.SpecMismatchError, match=r"axes=\(0, 2, 1\)\), 'bfloat16', saved_dtype='float32'\) of "
    ) as e:
        saver.restore(ENCODER, target)
    assert str(e.value) == mismatch


def test_a_plan_over_a_tf1_adam_checkpoint_groups_its_hundred_and_more_unused_entries_within_120_columns():
    """Restoring the head alone of a 24-block TF1 Adam checkpoint leaves 151 entries unused: the
    note groups them by their last name, as the strict error does, each numbered run said once,
    and wraps at 120 columns, strict or not."""
    target = {"head/kernel": S((4, 1), jnp.float32), "head/bias": S((1,), jnp.float32)}
    saver = jstate.Saver(["head/kernel", "head/bias"])
    loose, strict = saver.plan(ENCODER, target), saver.plan(ENCODER, target, strict=True)
    assert len(loose.unused) == 151 and loose.problems == []
    for text in (str(loose), str(strict)):
        assert max(_widths(text)) <= 120, text
        flat = " ".join(text.split())  # the notes as one line again, their wrapping undone
        assert "Checkpoint entries nothing uses: encoder/block_{0..23}/dense/bias (24), */Adam (50: " in flat
        assert "encoder/block_{0..23}/dense/kernel/Adam (24) and 2 more)" in flat
        assert flat.count("encoder/block_0/") == 0  # runs, not their first names
    error = str(strict.problems[0])
    assert "holds 151 variable(s) that the Saver does not restore: encoder/block_{0..23}/dense/bias (24), " in error
    assert len(error) < 800, error


def test_a_narrow_from_column_gives_up_the_scopes_rows_share_and_keeps_what_differs():
    """Two stacks of the halves of 24 blocks differ in their ranges alone: shortened, each keeps
    its range and its leaf, and gives up the scopes both rows hold."""
    from jstate.checkpoint.plan_text import fit

    halves = [(0, 11), (12, 23)]
    rows = [
        (f"model/half_{a}", f"encoder/block_{{{a}..{b}}}/dense/kernel (12)", "", (12, 4), "float32") for a, b in halves
    ]
    assert [row[1] for row in fit(rows, 82)] == [
        "encoder/block_{0..11}/.../kernel (12)",
        "encoder/block_{12..23}/.../kernel (12)",
    ]
