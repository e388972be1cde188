"""Sweeps for the plots of the documentation: jstate beside Orbax, numpy, `jax.jit` and Flax NNX
as the size of the job grows. Writes one JSON results file, with the machine and the date.

    python benchmarks/bench_sweep.py [--quick] [--out benchmarks/results/sweep.json]
    python benchmarks/plots.py                 # the plots, from that file, into docs/_static/benchmarks/

What each sweep measures, side by side in one run (the variants are the other scripts' own:
`bench_checkpoint.py`'s save and restore of each library, `bench_memory.py`'s fresh-process peak
RSS; the init models are `bench_init.py`'s "many" models, with several shapes):

  checkpoint, by state size    16 float32 arrays of 1 to 64 MiB in all (--quick: up to 16 MiB);
                               save and restore time of jstate, Orbax and numpy (the floor)
  checkpoint, by array count   10 to 1,000 arrays of 10 KB; save and restore time
  init, by variable count      10 to 1,000 variables of 64x64 (normal): the first call in a fresh
                               process (tracing and compiling included), jstate, one `jax.jit`
                               building the same dict (up to 100 variables: its compile time
                               grows super-linearly), and Flax NNX's eager construction
  init, by distinct shapes     100 variables, of 1 to 100 distinct shapes: the same three
  restore memory               peak RSS above the baseline / state bytes, restoring 16 to 256
                               MiB (--quick: up to 64 MiB) in fresh processes, jstate and Orbax

Every time is a median over rounds run in rotating order (A B C, B C A, ...), after a warm-up
round; a fresh-process first call is one run per point. The sizes are small, so that the whole
sweep takes a few minutes on a shared 2-core machine: they show how each cost grows, and the
full-size scripts (bench_checkpoint.py, bench_pack.py, bench_memory.py) give the headline ratios.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import _harness as h

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "sweep.json"
INIT_VARIANTS = ("jstate", "jit", "nnx")
JIT_LIMIT = 100  # variables: 32 s to compile 100 on 2 cores; over 1,000 took 309 s (bench_init.py)
SHAPES_AT = 100  # variables in the distinct-shapes sweep


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory = float("nan")
    versions = {}
    for package in ("jax", "jaxlib", "orbax-checkpoint", "tensorstore", "flax", "numpy"):
        versions[package] = importlib.metadata.version(package)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory, 1),
        "system": platform.platform(),
        "python": platform.python_version(),
        "malloc": h.malloc_setting(),
        "load_average": os.getloadavg(),
        "versions": versions,
    }


# -- checkpoints: in this process, with bench_checkpoint.py's variants -------------------------
def checkpoint_point(count: int, size: int, rounds: int, workdir: Path) -> dict:
    """Median save and restore seconds of each of bench_checkpoint.py's variants for `count`
    float32 arrays of `size` elements each."""
    import bench_checkpoint as bc

    case = bc.Case(f"{count}x{size}", count, size, 0.0)
    arrays = bc.make_arrays(case)
    names = list(arrays)
    variants = {name: make(arrays, bc.subset(names)) for name, make in bc.MAKERS.items()}
    times: dict[str, dict[str, list[float]]] = {v: {"save": [], "restore": []} for v in variants}
    for i, order in enumerate(h._rotations(list(variants), rounds + 1)):
        for name in order:
            directory = workdir / f"{name}-{i}"
            directory.mkdir()
            bc.pretouch(count * size * 4)
            start = bc.time.perf_counter()
            path = variants[name].save(directory)
            save = bc.time.perf_counter() - start
            restore = bc.measure(variants[name].restore, path)
            if i:  # round 0 is the warm-up
                times[name]["save"].append(save)
                times[name]["restore"].append(restore)
            shutil.rmtree(directory)
    return {
        "arrays": count,
        "bytes": count * size * 4,
        **{name: {op: h.median(values) for op, values in ops.items()} for name, ops in times.items()},
    }


def checkpoint_sweeps(quick: bool, workdir: Path) -> dict:
    mib = 2**20 // 4  # float32 elements per MiB
    sizes = (1, 4, 16) if quick else (1, 4, 16, 64)
    counts = (10, 100, 300) if quick else (10, 100, 300, 1000)
    rounds = 2 if quick else 3
    by_size = [checkpoint_point(16, total * mib // 16, rounds, workdir) for total in sizes]
    print("checkpoint by size:", json.dumps(by_size), flush=True)
    by_count = [checkpoint_point(count, 2560, rounds, workdir) for count in counts]
    print("checkpoint by count:", json.dumps(by_count), flush=True)
    return {"by_size": by_size, "by_count": by_count}


# -- init: one fresh process per variant and point ---------------------------------------------
def init_child(variant: str, count: int, distinct: int) -> dict:
    """Run in a fresh process: the first call (and then the median of 3 more) of `variant`
    building `count` normal(0.02) variables of `distinct` shapes (64 x 64, 64 x 65, ...)."""
    h.use_cpu_devices(1)
    import time

    import jax
    import jax.numpy as jnp

    import jstate

    normal = jax.nn.initializers.normal(0.02)
    shapes = [(64, 64 + i % distinct) for i in range(count)]
    key = jax.random.key(0)
    jnp.zeros(1).block_until_ready()  # JAX's own start-up is not part of any variant

    if variant == "jstate":

        def model(s):
            for i, shape in enumerate(shapes):
                s.scope(f"block{i}").variable("w", normal, shape)

        run = lambda: jax.block_until_ready(jstate.init(model, key))  # noqa: E731
    elif variant == "jit":

        @jax.jit
        def build(key):
            return {f"block{i}/w": normal(jax.random.fold_in(key, i), shape) for i, shape in enumerate(shapes)}

        run = lambda: jax.block_until_ready(build(key))  # noqa: E731
    else:
        from flax import nnx

        class Many(nnx.Module):
            def __init__(self, rngs):
                self.params = nnx.List([nnx.Param(normal(rngs.params(), shape)) for shape in shapes])

        run = lambda: jax.block_until_ready(nnx.state(Many(nnx.Rngs(0))))  # noqa: E731
    first = h.first_call(run)["seconds"]
    later = []
    for _ in range(3):
        start = time.perf_counter()
        run()
        later.append(time.perf_counter() - start)
    return {"first": first, "steady": h.median(later)}


def run_init_child(variant: str, count: int, distinct: int) -> dict:
    command = [sys.executable, __file__, "--child", f"{variant}:{count}:{distinct}"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=HERE)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def init_sweeps(quick: bool) -> dict:
    counts = (10, 100, 300) if quick else (10, 100, 300, 1000)
    distincts = (1, 10) if quick else (1, 10, 100)
    by_variables, by_shapes = [], []
    for count in counts:
        row = {"variables": count}
        for variant in INIT_VARIANTS:
            if variant != "jit" or count <= JIT_LIMIT:
                row[variant] = run_init_child(variant, count, 1)
        by_variables.append(row)
        print("init by variables:", json.dumps(row), flush=True)
    for distinct in distincts:
        row = {"variables": SHAPES_AT, "shapes": distinct}
        for variant in INIT_VARIANTS:
            row[variant] = run_init_child(variant, SHAPES_AT, distinct)
        by_shapes.append(row)
        print("init by shapes:", json.dumps(row), flush=True)
    return {"by_variables": by_variables, "by_shapes": by_shapes}


# -- restore memory: bench_memory.py's fresh-process children -----------------------------------
def memory_sweep(quick: bool, workdir: Path) -> list[dict]:
    import bench_memory as bm

    rows = []
    for mib in (16, 64) if quick else (16, 64, 256):
        args = argparse.Namespace(gib=mib / 1024)
        row = {"bytes": mib * 2**20}
        for variant in ("jstate", "orbax"):
            directory = workdir / f"memory-{variant}-{mib}"
            directory.mkdir()
            save = bm.run_child(variant, "save", args, directory)
            restore = bm.run_child(variant, "restore", args, directory)
            row[variant] = {"save": save["ratio"], "restore": restore["ratio"]}
            shutil.rmtree(directory)
        rows.append(row)
        print("memory:", json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer rounds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results file (default {DEFAULT_OUT})")
    parser.add_argument(
        "--only", choices=("checkpoint", "init", "memory"), help="run one sweep, keep the others' results"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, count, distinct = args.child.split(":")
        h.report_to_parent(init_child(variant, int(count), int(distinct)))
        return

    h.use_cpu_devices(1)
    # --only keeps the other sweeps' results; each sweep records its own machine and date.
    results = json.loads(args.out.read_text()) if args.only and args.out.exists() else {}
    workdir = Path(tempfile.mkdtemp(prefix="jstate-sweep-"))
    sweeps = {
        "checkpoint": lambda: checkpoint_sweeps(args.quick, workdir),
        "init": lambda: init_sweeps(args.quick),
        "memory": lambda: memory_sweep(args.quick, workdir),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        for name, sweep in sweeps.items():
            if args.only in (None, name):
                date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
                about = {"date": date, "command": h.command_line(), "quick": args.quick, "machine": machine()}
                results[name] = {**about, **sweep()} if name != "memory" else {**about, "rows": sweep()}
                # After each sweep, so that an interrupted run keeps what it measured.
                args.out.write_text(json.dumps(results, indent=1) + "\n")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
