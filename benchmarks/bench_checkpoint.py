"""Benchmarks of jstate checkpoints (save, restore, 10% restore, list_variables) against Orbax and numpy.

    python benchmarks/bench_checkpoint.py [--quick] [--workdir DIR] [--malloc {inherit,glibc,tuned,both}]
        [--no-cold] [--no-pretouch] [--only {big,many}]

Two States, random float32 data, on the default (CPU) device:

  big:  64 arrays of 4 Mi floats (1 GiB)         --quick: 8 arrays of 256 Ki floats (8 MiB)
  many: 1,000 arrays of 2,560 floats (10 KB each) --quick: 200 of them

Three ways to checkpoint each, run side by side:

  jstate  ``jstate.Saver()`` with its defaults (blocking save; OCDBT, no compression, 256 MiB
          data files; the "many" case's arrays are packed, see bench_pack.py), restored into an
          abstract State; ``Saver(subset)`` for the 10% restore;
          ``jstate.list_variables`` to inspect.
  orbax   ``ocp.StandardCheckpointer()`` with its defaults (OCDBT, zstd, 2 GiB data files) saving
          the flat ``{name: array}`` dict (``save`` + ``wait_until_finished``), restoring with
          ``ShapeDtypeStruct`` targets on the same device; the 10% restore is the PyTree handler's
          ``partial_restore`` (StandardCheckpointer refuses a partial target); inspect is
          ``StandardCheckpointer.metadata(path)`` turned into the same (name, shape, dtype) list.
  numpy   one ``np.save`` file per array, each fsync'ed, then the directory fsync'ed; ``np.load``
          of the files (numpy arrays, not jax: the floor for reading the bytes); inspect reads
          every file's .npy header.

Targets (full run; --quick only smoke-tests the script):

  save throughput, jstate / orbax ............................ >= 2
  restore throughput, jstate / orbax (warm page cache) ....... >= 1.5
  10% restore time / full restore time, jstate (warm) ........ <= 0.15
  list_variables, 1,000-array checkpoint ..................... <= 50 ms
  list_variables, 1 GiB checkpoint ........................... <= 20 ms

Each round saves with every variant (in a rotating order: A B C, B C A, ...), then inspects,
restores and partially restores each fresh checkpoint, then deletes the checkpoints (untimed) and
``sync``s. Ratios are medians of the per-round ratios; absolute times are medians over rounds.
A first round is a warm-up and is not counted. "warm" restores read checkpoints just written
(in the page cache); "cold" restores first evict the checkpoint's files from the page cache with
``posix_fadvise(DONTNEED)`` (they are clean after the fsyncs, so this drops them; no root needed).
Every timed call blocks until its arrays are ready (``jax.block_until_ready``) and follows a
garbage collection. Before the saves and again before the restores of each round, 2x the
checkpoint's size of memory is touched and freed, untimed (``--no-pretouch`` skips it): on these
VMs fresh memory is slow to touch the first time, and without this the first restore after the
saves paid for it, whichever variant it was.

glibc's malloc settings change restore times a lot on these machines (shared/BENCHMARKING.md):
the header prints the setting in force; ``--malloc tuned|glibc`` re-runs the script under that
setting, ``--malloc both`` runs it once under each.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import _harness as h

h.use_cpu_devices(1)

import jax  # noqa: E402  (after the device setup above)
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

import jstate  # noqa: E402

VARIANTS = ("jstate", "orbax", "numpy")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    count: int  # arrays
    size: int  # float32 elements per array
    inspect_target: float  # seconds, list_variables


@dataclasses.dataclass(frozen=True)
class Config:
    cases: tuple[Case, ...]
    rounds: int  # counted rounds (after one warm-up round)
    inspect_calls: int  # inspect calls per round, at most (fewer past ~1 s); their median counts


FULL = Config(
    cases=(Case("big", 64, 4 * 2**20, 0.020), Case("many", 1000, 2560, 0.050)),
    rounds=3,
    inspect_calls=15,
)
QUICK = Config(
    cases=(Case("big", 8, 256 * 2**10, 0.020), Case("many", 200, 2560, 0.050)),
    rounds=1,
    inspect_calls=5,
)


# -- a report row with a lower or an upper bound ------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Row:
    what: str
    value: float
    unit: str = "x"  # "x" for a ratio, "s", "ms", or "GiB/s"
    at_least: float | None = None
    at_most: float | None = None

    def cells(self) -> tuple[str, str, str, str]:
        target, verdict = "", ""
        if self.at_least is not None:
            target, verdict = f">= {_number(self.at_least, self.unit, True)}", self.value >= self.at_least
        elif self.at_most is not None:
            target, verdict = f"<= {_number(self.at_most, self.unit, True)}", self.value <= self.at_most
        return self.what, _number(self.value, self.unit), target, "" if target == "" else "ok" if verdict else "MISSED"


def _number(value: float, unit: str, exact: bool = False) -> str:
    shown = value * {"x": 1, "s": 1, "ms": 1e3, "GiB/s": 1}[unit]
    text = f"{shown:g}" if exact else f"{shown:.3f}" if shown < 10 else f"{shown:.1f}"
    return text + ("" if unit == "x" else f" {unit}")


def print_rows(title: str, rows: list[Row]) -> None:
    cells = [("measurement", "value", "target", "verdict")] + [row.cells() for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    print(title, *lines, "", sep="\n", flush=True)


# -- the data -------------------------------------------------------------------------------
def make_arrays(case: Case) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    width = len(str(case.count - 1))
    device = jax.devices()[0]
    arrays = {}
    for i in range(case.count):
        arrays[f"v{i:0{width}d}"] = jax.device_put(rng.random(case.size, dtype=np.float32), device)
    return jax.block_until_ready(arrays)


def subset(names: list[str]) -> list[str]:
    """About 10% of `names`, spread evenly."""
    k = max(1, round(len(names) / 10))
    return [names[i * len(names) // k] for i in range(k)]


def structs(arrays: dict[str, jax.Array], names: list[str]) -> dict[str, jax.ShapeDtypeStruct]:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return {n: jax.ShapeDtypeStruct(arrays[n].shape, arrays[n].dtype, sharding=sharding) for n in names}


# -- the variants: save(dir) -> path, restore(path), restore_some(path), inspect(path) ----------
@dataclasses.dataclass
class Variant:
    save: Callable[[Path], Path]
    restore: Callable[[Path], object]
    restore_some: Callable[[Path], object]
    inspect: Callable[[Path], list]
    restore_unverified: Callable[[Path], object] | None = None  # jstate only: `verify=False`


def jstate_variant(arrays: dict[str, jax.Array], some: list[str]) -> Variant:
    state = jstate.State.from_tree(arrays, flat=True)
    target = jstate.State.from_tree(structs(arrays, list(arrays)), flat=True)
    saver, some_saver = jstate.Saver(), jstate.Saver(some)
    return Variant(
        save=lambda d: Path(saver.save(state, d / "model")),
        restore=lambda p: jax.block_until_ready(saver.restore(p, target)),
        restore_some=lambda p: jax.block_until_ready(some_saver.restore(p, target)),
        inspect=lambda p: jstate.list_variables(p),
        restore_unverified=lambda p: jax.block_until_ready(saver.restore(p, target, verify=False)),
    )


def orbax_variant(arrays: dict[str, jax.Array], some: list[str]) -> Variant:
    checkpointer = ocp.StandardCheckpointer()
    target = structs(arrays, list(arrays))
    some_item = structs(arrays, some)
    some_args = {
        n: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype) for n, s in some_item.items()
    }
    partial = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())

    def save(d: Path) -> Path:
        path = d / "model"
        checkpointer.save(path, arrays)
        checkpointer.wait_until_finished()
        return path

    def restore_some(p: Path):
        args = ocp.args.PyTreeRestore(item=some_item, restore_args=some_args, partial_restore=True)
        return jax.block_until_ready(partial.restore(p, args=args))

    def inspect(p: Path) -> list:
        tree = checkpointer.metadata(p).item_metadata.tree
        return sorted((n, tuple(m.shape), np.dtype(m.dtype)) for n, m in tree.items())

    return Variant(save, lambda p: jax.block_until_ready(checkpointer.restore(p, target)), restore_some, inspect)


def numpy_variant(arrays: dict[str, jax.Array], some: list[str]) -> Variant:
    def save(d: Path) -> Path:
        path = d / "model"
        path.mkdir()
        for name, value in arrays.items():
            with open(path / f"{name}.npy", "wb") as f:
                np.save(f, np.asarray(value))
                f.flush()
                os.fsync(f.fileno())
        _fsync_dir(path)
        _fsync_dir(d)
        return path

    def load(p: Path, names) -> dict[str, np.ndarray]:
        return {n: np.load(p / f"{n}.npy") for n in names}

    def inspect(p: Path) -> list:
        found = []
        for file in sorted(os.listdir(p)):
            with open(p / file, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
            found.append((file[: -len(".npy")], shape, dtype))
        return found

    return Variant(save, lambda p: load(p, arrays), lambda p: load(p, some), inspect)


MAKERS = {"jstate": jstate_variant, "orbax": orbax_variant, "numpy": numpy_variant}


# -- files ----------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def evict(path: Path) -> None:
    """Drop `path`'s files from the page cache (they are clean: every variant fsyncs)."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def tree_stats(path: Path) -> tuple[int, int]:
    files = [os.path.join(root, n) for root, _, names in os.walk(path) for n in names]
    return len(files), sum(os.path.getsize(f) for f in files)


def pretouch(nbytes: int) -> None:
    """Allocate, touch and free `nbytes`, so the next timed calls find memory the host has backed.

    On these VMs the first touch of guest memory the host has not backed yet costs 0.6-4 s per
    GiB (shared/BENCHMARKING.md); a restore right after a save (whose files took the backed
    pages as page cache) read 1 GiB of just-written numpy files in 2.4-7.8 s instead of 0.35 s,
    and 0.44 s after this. That cost lands on whichever variant runs first; this runs (untimed)
    at the start of each round and again before its restores.
    """
    block = np.ones(nbytes, dtype=np.uint8)
    del block


def measure(fn: Callable[..., object], arg: Path) -> float:
    """Seconds of ``fn(arg)``, after a garbage collection."""
    gc.collect()
    return timed(fn, arg)


def timed(fn: Callable[..., object], *args) -> float:
    start = time.perf_counter()
    result = fn(*args)
    seconds = time.perf_counter() - start
    del result
    return seconds


# -- one case -------------------------------------------------------------------------------
OPS = ("save", "inspect", "restore", "restore 10%", "cold restore", "cold restore 10%")


def run_case(case: Case, cfg: Config, workdir: Path, cold: bool, touch: bool) -> None:
    setup = time.perf_counter()
    arrays = make_arrays(case)
    names = list(arrays)
    some = subset(names)
    nbytes = case.count * case.size * 4
    some_bytes = len(some) * case.size * 4
    variants = {v: MAKERS[v](arrays, some) for v in VARIANTS}
    ops = OPS if cold else OPS[:4]
    times = {op: {v: [] for v in VARIANTS} for op in ops}
    verify_cost = []  # per round: jstate restore time with checksums / without, back to back
    on_disk = {}
    print(
        f"[{case.name}: {case.count} x {case.size} float32, {nbytes / 2**20:.1f} MiB; 10% = {len(some)} arrays, "
        f"{some_bytes / 2**20:.1f} MiB; data made in {time.perf_counter() - setup:.1f} s]",
        flush=True,
    )
    for r in range(cfg.rounds + 1):
        start = time.perf_counter()
        order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]
        dirs = {v: workdir / f"{case.name}-{v}" for v in VARIANTS}
        paths, sample = {}, {}
        if touch:
            pretouch(2 * nbytes)
        for v in order:
            _remove(dirs[v])
            dirs[v].mkdir()
            gc.collect()
            before = time.perf_counter()
            paths[v] = variants[v].save(dirs[v])
            sample.setdefault("save", {})[v] = time.perf_counter() - before
        for v in order:
            calls = []  # up to inspect_calls calls, but at least 3 and no more than ~1 s of them
            while len(calls) < 3 or (len(calls) < cfg.inspect_calls and sum(calls) < 1.0):
                calls.append(timed(variants[v].inspect, paths[v]))
            sample.setdefault("inspect", {})[v] = statistics.median(calls)
        for v in order:
            assert len(variants[v].inspect(paths[v])) == case.count, v
            on_disk[v] = tree_stats(paths[v])
        if touch:
            pretouch(2 * nbytes)
        for op, fn in (("restore", "restore"), ("restore 10%", "restore_some")):
            for v in order:
                sample.setdefault(op, {})[v] = measure(getattr(variants[v], fn), paths[v])
        jstate_v = variants["jstate"]
        unverified = measure(jstate_v.restore_unverified, paths["jstate"])
        verified = measure(jstate_v.restore, paths["jstate"])
        if r > 0:
            verify_cost.append(verified / unverified)
        if cold:
            for op, fn in (("cold restore", "restore"), ("cold restore 10%", "restore_some")):
                for v in order:
                    evict(paths[v])
                    sample.setdefault(op, {})[v] = measure(getattr(variants[v], fn), paths[v])
        for v in VARIANTS:
            _remove(dirs[v])
        os.sync()
        label = "warm-up" if r == 0 else f"round {r}/{cfg.rounds}"
        print(
            f"  {label} ({time.perf_counter() - start:.1f} s): "
            + "; ".join(f"{op} " + " ".join(f"{v} {sample[op][v]:.3g}" for v in VARIANTS) for op in ops[:4]),
            flush=True,
        )
        if r > 0:
            for op in ops:
                for v in VARIANTS:
                    times[op][v].append(sample[op][v])
    print("  on disk: " + ", ".join(f"{v} {n} files {b / 2**20:.1f} MiB" for v, (n, b) in on_disk.items()))
    print()
    report(case, times, nbytes, some_bytes, cold, statistics.median(verify_cost))


def report(case: Case, t: dict, nbytes: int, some_bytes: int, cold: bool, verify_cost: float) -> None:
    med = {op: {v: statistics.median(x) for v, x in by.items()} for op, by in t.items()}
    speedup = lambda op, a, b: h.median_ratio(t[op][b], t[op][a])  # noqa: E731  throughput a / b
    fraction = lambda op, v: h.median_ratio(t[f"{op} 10%"][v], t[op][v])  # noqa: E731
    title = (
        f"{case.name}: {case.count} arrays of {case.size} float32 ({nbytes / 2**20:.1f} MiB), "
        f"10% = {some_bytes / 2**20:.1f} MiB"
    )
    rows = [
        Row("save throughput, jstate / orbax", speedup("save", "jstate", "orbax"), at_least=2),
        Row("save throughput, jstate / numpy", speedup("save", "jstate", "numpy")),
        Row("restore throughput, jstate / orbax (warm)", speedup("restore", "jstate", "orbax"), at_least=1.5),
        Row("restore throughput, jstate / numpy (warm)", speedup("restore", "jstate", "numpy")),
        Row("10% restore / full restore, jstate (warm)", fraction("restore", "jstate"), at_most=0.15),
        Row("restore time with checksums / verify=False, jstate (warm)", verify_cost, at_most=1.10),
        Row("10% restore / full restore, orbax partial (warm)", fraction("restore", "orbax")),
        Row("10% restore / full restore, numpy (warm)", fraction("restore", "numpy")),
        Row(
            "10% restore time, jstate / orbax partial (warm)",
            h.median_ratio(t["restore 10%"]["jstate"], t["restore 10%"]["orbax"]),
        ),
        Row(
            "10% restore time, jstate / numpy (warm)",
            h.median_ratio(t["restore 10%"]["jstate"], t["restore 10%"]["numpy"]),
        ),
    ]
    if cold:
        rows += [
            Row("restore throughput, jstate / orbax (cold)", speedup("cold restore", "jstate", "orbax")),
            Row("restore throughput, jstate / numpy (cold)", speedup("cold restore", "jstate", "numpy")),
            Row("10% restore / full restore, jstate (cold)", fraction("cold restore", "jstate")),
        ]
    rows += [
        Row("list_variables, jstate", med["inspect"]["jstate"], "ms", at_most=case.inspect_target),
        Row("inspect time, jstate / orbax metadata", h.median_ratio(t["inspect"]["jstate"], t["inspect"]["orbax"])),
        Row("inspect time, jstate / numpy headers", h.median_ratio(t["inspect"]["jstate"], t["inspect"]["numpy"])),
    ]
    print_rows(title, rows)
    abs_rows = []
    for op in t:
        for v in VARIANTS:
            seconds = med[op][v]
            unit = "ms" if seconds < 1 else "s"
            moved = nbytes if op in ("save", "restore", "cold restore") else some_bytes if "10%" in op else 0
            abs_rows.append((f"{op}, {v}", _number(seconds, unit) + (f", {_rate(moved / seconds)}" if moved else "")))
    width = max(len(a) for a, _ in abs_rows)
    print(f"{case.name}: median times", *(f"  {a.ljust(width)}  {b}" for a, b in abs_rows), "", sep="\n", flush=True)


def _rate(bytes_per_second: float) -> str:
    if bytes_per_second >= 2**30:
        return f"{bytes_per_second / 2**30:.2f} GiB/s"
    return f"{bytes_per_second / 2**20:.1f} MiB/s"


def _remove(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


# -- entry points ---------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one round: a smoke test (< 60 s)")
    parser.add_argument(
        "--workdir",
        default="/tmp",
        help="where checkpoints go (a fresh temporary directory is made inside it; default /tmp)",
    )
    parser.add_argument(
        "--malloc",
        choices=("inherit", "glibc", "tuned", "both"),
        default="inherit",
        help="glibc malloc setting: as inherited, glibc defaults, the tuned setting of "
        "shared/BENCHMARKING.md, or one run under each",
    )
    parser.add_argument("--no-cold", dest="cold", action="store_false", help="skip the cold-page-cache restores")
    parser.add_argument(
        "--no-pretouch",
        dest="pretouch",
        action="store_false",
        help="skip touching 2x the checkpoint's size of fresh memory before the saves and the restores",
    )
    parser.add_argument("--only", choices=("big", "many"), help="run one case only")
    return parser.parse_args()


def malloc_env(setting: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in h.MALLOC_VARS}
    if setting == "tuned":
        env.update(pair.split("=", 1) for pair in h.TUNED_MALLOC.split())
    return env


def rerun(setting: str) -> int:
    """Run this script again, under malloc `setting`, with the same other arguments."""
    argv = _drop_malloc(sys.argv[1:])
    return subprocess.run([sys.executable, __file__, *argv], env=malloc_env(setting)).returncode


def _drop_malloc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--malloc":
            skip = True
        elif not a.startswith("--malloc="):
            out.append(a)
    return out


def source_revision() -> str:
    """The git commit jstate was imported from, "+ uncommitted changes" if its tree differs."""
    root = Path(jstate.__file__).parent
    try:
        commit = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "."], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "an unknown revision (not a git checkout)"
    return f"commit {commit}" + (" + uncommitted changes to jstate/" if dirty else "")


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` removes the workdir
    args = parse_args()
    if args.malloc == "both":
        codes = [rerun(s) for s in ("glibc", "tuned")]
        sys.exit(max(codes))
    if args.malloc != "inherit":
        sys.exit(rerun(args.malloc))
    cfg = QUICK if args.quick else FULL
    workdir = Path(tempfile.mkdtemp(prefix="jstate-bench-checkpoint-", dir=args.workdir))
    same = os.stat(workdir).st_dev == os.stat("/tmp").st_dev
    print("== jstate checkpoint benchmarks ==")
    print(f"command: {h.command_line()}")
    print(
        f"jax {jax.__version__}, orbax-checkpoint {ocp.__version__}, numpy {np.__version__}, "
        f"{len(jax.devices())} {jax.default_backend()} device(s), {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(f"jstate {jstate.__version__} from {Path(jstate.__file__).parent} at {source_revision()}")
    print(f"malloc: {h.malloc_setting()}")
    print(f"workdir: {workdir} ({'same filesystem as' if same else 'NOT on the filesystem of'} /tmp)")
    print(
        "page cache: 'warm' = restore right after the save (files cached); "
        + ("'cold' = files evicted with posix_fadvise(DONTNEED) first" if args.cold else "cold restores skipped")
    )
    print(
        "memory: "
        + (
            "2x the checkpoint's size touched and freed before each round's saves and restores (`pretouch`)"
            if args.pretouch
            else "no pretouch (first touches of fresh VM memory land in the timings)"
        )
    )
    print(f"rounds: {cfg.rounds} counted after 1 warm-up; inspect = median of 3-{cfg.inspect_calls} calls per round")
    if args.quick:
        print("QUICK MODE: small sizes and one round; a smoke test, the verdicts mean nothing.")
    print(flush=True)
    start = time.perf_counter()
    try:
        for case in cfg.cases:
            if args.only is None or args.only == case.name:
                run_case(case, cfg, workdir, args.cold, args.pretouch)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
