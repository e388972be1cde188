"""Fixtures shared by the tests. The tests' settings (8 CPU devices) are in the repository's root
conftest.py, shared with the docstring examples."""

import pytest


@pytest.fixture
def mesh():
    """The 8 CPU devices as a 4 x 2 mesh with axes "data" and "model"."""
    import jax

    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


@pytest.fixture
def no_reads(monkeypatch):
    """Reading any array from a jstate or TensorFlow checkpoint fails the test: for errors that
    must come before anything is read."""
    from jstate.formats.native import NativeCheckpoint
    from jstate.formats.tensorflow import TensorFlowCheckpoint

    def fail(*args, **kwargs):
        raise AssertionError("an array was read")

    for cls in (NativeCheckpoint, TensorFlowCheckpoint):
        monkeypatch.setattr(cls, "_read", fail)
        monkeypatch.setattr(cls, "_read_host", fail)


@pytest.fixture
def array_reads(monkeypatch):
    """The arrays read from checkpoints during the test, whichever way they are read (by Orbax,
    or from their files by `_ocdbt`), by Orbax's name for each (its tree path joined by ".");
    `name[start:stop]` for part of a packed array."""
    from jstate.formats import ocdbt as _ocdbt
    from jstate.formats import orbax as _orbax

    seen: list[str] = []

    def spy(fn, names):
        def reading(*args, **kwargs):
            seen.extend(names(*args, **kwargs))
            return fn(*args, **kwargs)

        return reading

    def keys(wanted, item=lambda value: value):
        return [".".join(item(value).keypath) for value in wanted.values()]

    monkeypatch.setattr(_orbax, "read", spy(_orbax.read, lambda d, wanted, tree=None: keys(wanted, lambda v: v[0])))
    monkeypatch.setattr(_orbax, "read_host", spy(_orbax.read_host, lambda d, wanted, tree=None: keys(wanted)))
    monkeypatch.setattr(_ocdbt.Located, "read", spy(_ocdbt.Located.read, lambda self, feed=None: [self.name]))
    monkeypatch.setattr(
        _ocdbt.Located,
        "read_slices",
        spy(_ocdbt.Located.read_slices, lambda self, slices: [f"{self.name}[{a}:{b}]" for a, b in slices]),
    )
    return seen
