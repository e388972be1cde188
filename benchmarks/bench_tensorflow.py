"""Reading a TensorFlow checkpoint with jstate (no TensorFlow) against reading the same bytes with numpy.

    python benchmarks/bench_tensorflow.py [--quick] [--workdir DIR] [--rounds N]

The script writes a TensorFlow "tensor bundle" (the V2 format of ``tf.compat.v1.train.Saver``
and ``tf.train.Checkpoint``) itself, with the minimal writer below, so it runs without
TensorFlow; it first checks that jstate reads back what it wrote.

  full:    64 float32 tensors of 4 Mi elements (1 GiB) in 2 data files
  --quick: 8 float32 tensors of 256 Ki elements (8 MiB) in 2 data files

Two ways to read every tensor into host memory, run side by side in a rotating order:

  jstate  ``jstate.formats.tensorflow.read(prefix, names)``: parses the index, opens each data file
          once, reads each tensor into a new array and checks its CRC32C.
  numpy   ``np.fromfile(data_file, dtype, count, offset=...)`` per tensor, offsets known in
          advance, into a dict: the floor for reading the bytes, with no index and no checksums.

Both return every array, alive together, as a restore does (dropping each array as soon as it
is read would let malloc reuse its memory, which a restore cannot).

Target (full run): read time, jstate / numpy (warm page cache) <= 2. The ratio is the median of
per-round ratios. Both read files just written, so from the page cache ("warm").
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import tempfile
from pathlib import Path

import _harness as h

h.use_cpu_devices(1)

import crc32c  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from jstate.formats import tensorflow as _tensorflow  # noqa: E402
from jstate.formats import tf_table as _sstable  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    count: int  # tensors
    size: int  # float32 elements per tensor
    shards: int  # data files
    rounds: int  # counted rounds (after one warm-up)


FULL = Config(count=64, size=4 * 2**20, shards=2, rounds=7)
QUICK = Config(count=8, size=256 * 2**10, shards=2, rounds=2)


# -- a minimal tensor bundle writer -----------------------------------------------------------
_DT_FLOAT = 1
_BLOCK_SIZE = 256 * 1024  # TensorFlow's default for bundle indexes
_RESTART_INTERVAL = 16


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, value: int | bytes) -> bytes:
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    return _varint(number << 3) + _varint(value)


def _entry_proto(shape: tuple[int, ...], shard: int, offset: int, size: int, crc: int) -> bytes:
    shape_proto = b"".join(_field(2, _field(1, d)) for d in shape)
    return (
        _field(1, _DT_FLOAT)
        + _field(2, shape_proto)
        + (_field(3, shard) if shard else b"")
        + _field(4, offset)
        + _field(5, size)
        + _varint(6 << 3 | 5)
        + crc.to_bytes(4, "little")
    )


def _block(items: list[tuple[bytes, bytes]]) -> bytes:
    out, restarts, previous = bytearray(), [], b""
    for i, (key, value) in enumerate(items):
        shared = 0
        if i % _RESTART_INTERVAL == 0:
            restarts.append(len(out))
        else:
            while shared < min(len(key), len(previous)) and key[shared] == previous[shared]:
                shared += 1
        out += _varint(shared) + _varint(len(key) - shared) + _varint(len(value)) + key[shared:] + value
        previous = key
    restarts = restarts or [0]
    for r in restarts:
        out += r.to_bytes(4, "little")
    return bytes(out + len(restarts).to_bytes(4, "little"))


def _write_block(f, contents: bytes) -> bytes:
    """Append a block and its trailer; its BlockHandle."""
    handle = _varint(f.tell()) + _varint(len(contents))
    f.write(contents + b"\x00" + _sstable.mask(crc32c.crc32c(contents + b"\x00")).to_bytes(4, "little"))
    return handle


def write_bundle(prefix: Path, arrays: dict[str, np.ndarray], shards: int) -> None:
    """Write float32 `arrays` as a TensorFlow checkpoint, spread over `shards` data files."""
    entries = {}
    names = sorted(arrays)
    for shard in range(shards):
        with open(f"{prefix}.data-{shard:05d}-of-{shards:05d}", "wb") as f:
            for name in names[shard::shards]:
                data = memoryview(np.ascontiguousarray(arrays[name], np.float32).reshape(-1).view(np.uint8))
                crc = _sstable.mask(crc32c.crc32c(data))
                entries[name] = _entry_proto(arrays[name].shape, shard, f.tell(), data.nbytes, crc)
                f.write(data)
    header = _field(1, shards) + _field(3, _field(1, 1))  # num_shards, version {producer: 1}
    items = [(b"", header)] + [(n.encode(), entries[n]) for n in names]
    with open(f"{prefix}.index", "wb") as f:
        index, block = [], []
        for key, value in items:
            block.append((key, value))
            if sum(len(k) + len(v) for k, v in block) >= _BLOCK_SIZE:
                index.append((key, _write_block(f, _block(block))))
                block = []
        if block:
            index.append((block[-1][0], _write_block(f, _block(block))))
        metaindex = _write_block(f, _block([]))
        index_handle = _write_block(f, _block(index))
        footer = (metaindex + index_handle).ljust(40, b"\x00")
        f.write(footer + (0xDB4775248B80FB57).to_bytes(8, "little"))


# -- the benchmark ----------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 MiB, 2 rounds: a smoke test")
    parser.add_argument("--workdir", help="where to write the checkpoint (default: a temporary directory)")
    parser.add_argument("--rounds", type=int, help="counted rounds (default: 7, or 2 with --quick)")
    args = parser.parse_args()
    config = QUICK if args.quick else FULL
    rounds = args.rounds or config.rounds
    h.print_header("TensorFlow checkpoint read: jstate vs numpy", args.quick, jax)
    workdir = Path(tempfile.mkdtemp(prefix="bench_tf_", dir=args.workdir))
    try:
        run(config, rounds, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run(config: Config, rounds: int, workdir: Path) -> None:
    rng = np.random.default_rng(0)
    width = len(str(config.count - 1))
    arrays = {f"layer{i:0{width}d}/kernel": rng.random(config.size, dtype=np.float32) for i in range(config.count)}
    prefix = workdir / "model.ckpt"
    write_bundle(prefix, arrays, config.shards)
    total = sum(a.nbytes for a in arrays.values())
    print(f"wrote {len(arrays)} tensors, {total / 2**30:.3f} GiB, in {config.shards} data files under {workdir}")

    # The writer must produce what the reader expects, or the timings mean nothing.
    names = sorted(arrays)
    entries = _tensorflow.TensorFlowCheckpoint(prefix).entries
    assert {n: (e.shape, e.dtype) for n, e in entries.items()} == {n: (a.shape, a.dtype) for n, a in arrays.items()}
    for name, value in _tensorflow.read(prefix, names[:2] + names[-1:]).items():
        np.testing.assert_array_equal(value, arrays[name])
    locations = _locations(prefix, names)
    del arrays

    def jstate_read():
        return _tensorflow.read(prefix, names)

    def numpy_read():  # all arrays alive at the end, as after a restore (memory reuse differs otherwise)
        return {
            name: np.fromfile(path, np.float32, count, offset=offset)
            for name, (path, offset, count) in zip(names, locations)
        }

    times = h.interleave({"jstate": jstate_read, "numpy": numpy_read}, rounds)
    seconds = {name: h.median(t) for name, t in times.items()}
    h.print_rows(
        f"Reading all {len(names)} tensors ({total / 2**30:.3f} GiB), warm page cache, {rounds} rounds:",
        [
            h.Row("read time, jstate / numpy", h.median_ratio(times["jstate"], times["numpy"]), at_most=2),
            h.Row("jstate read time", seconds["jstate"], "s"),
            h.Row("numpy read time", seconds["numpy"], "s"),
            h.Row("jstate throughput, GiB/s", total / 2**30 / seconds["jstate"]),
            h.Row("numpy throughput, GiB/s", total / 2**30 / seconds["numpy"]),
        ],
    )


def _locations(prefix: Path, names: list[str]) -> list[tuple[Path, int, int]]:
    """(data file, offset, element count) of each tensor: what numpy needs, known in advance."""
    bundle = _tensorflow._read_index(prefix)
    out = []
    for name in names:
        t = bundle.tensors[name]
        path = prefix.with_name(f"{prefix.name}.data-{t.shard:05d}-of-{bundle.num_shards:05d}")
        out.append((path, t.offset, math.prod(t.shape)))
    return out


if __name__ == "__main__":
    main()
