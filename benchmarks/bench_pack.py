"""Checkpoints of real training states: many small arrays, a ResNet-50 with Adam, and the fixed
cost of a save, jstate against Orbax's defaults (issue 15).

    python benchmarks/bench_pack.py [--quick] [--workdir DIR] [--malloc {inherit,glibc,tuned,both}]
        [--only {many,resnet,sixteen}] [--rounds N]

Three states of random float32 data on the default (CPU) device:

  many:     1,000 arrays of 2,560 floats (10 KB each, 9.8 MiB)   --quick: 200 of them
  resnet:   ResNet-50's parameters and BatchNorm statistics with Adam's two moments and count:
            590 arrays, 25.6 M parameters, ~294 MiB (shapes generated, nothing downloaded)
            --quick: every width divided by 4
  sixteen:  16 arrays of 2 Mi floats (8 MiB each, 128 MiB)        --quick: 16 of 2 MiB

Side by side in each round, in a rotating order:

  jstate        ``jstate.Saver()`` defaults (blocking save, small variables packed, verified
                restores into an abstract State; ``Saver(subset)`` for the 10% restore)
  jstate-plain  ``jstate.Saver(pack=False)``: every variable under its own name (many only)
  orbax         ``ocp.StandardCheckpointer()`` defaults saving the flat ``{name: array}`` dict
                (``save`` + ``wait_until_finished``), restoring with ``ShapeDtypeStruct``
                targets; its 10% restore is the PyTree handler's ``partial_restore``

Targets (issue 15; full run only, --quick smoke-tests the script):

  many     save and restore time, jstate / orbax ............ <= 0.1 each, and <= 0.15 s each
  resnet   save time, jstate / orbax ......................... <= 0.5
  resnet   restore time, jstate / orbax ...................... <= 0.6
  sixteen  save time, jstate / orbax ......................... <= 0.8
  all      10% restore / full restore, jstate (packed or not)  <= 0.15

Restores are warm (the files were just written: page cache). Each round touches and frees 2x the
state's size before its saves and before its restores (see bench_checkpoint.py's `pretouch`).
Ratios are medians of per-round ratios, times medians over rounds; one warm-up round is dropped.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import shutil
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
from bench_checkpoint import malloc_env, pretouch, source_revision, structs, subset  # noqa: E402

import jstate  # noqa: E402


# -- the states -----------------------------------------------------------------------------
def many(quick: bool) -> dict[str, tuple[int, ...]]:
    count = 200 if quick else 1000
    return {f"v{i:04d}": (2560,) for i in range(count)}


def sixteen(quick: bool) -> dict[str, tuple[int, ...]]:
    return {f"w{i:02d}": ((512 if quick else 2048) * 1024,) for i in range(16)}  # above the packing threshold


def resnet50(quick: bool) -> dict[str, tuple[int, ...]]:
    """ResNet-50 (bottleneck blocks 3-4-6-3) as a Flax model names it, with BatchNorm statistics
    and Adam's moments: ``params/...``, ``batch_stats/...``, ``opt/mu/...``, ``opt/nu/...``."""
    scale = 4 if quick else 1
    params, stats = {}, {}

    def conv(name, k, cin, cout):
        params[f"{name}/kernel"] = (k, k, cin, cout)

    def norm(name, c):
        params[f"{name}/scale"] = params[f"{name}/bias"] = (c,)
        stats[f"{name}/mean"] = stats[f"{name}/var"] = (c,)

    conv("conv_init", 7, 3, 64 // scale)
    norm("bn_init", 64 // scale)
    cin = 64 // scale
    for stage, blocks in enumerate((3, 4, 6, 3)):
        width = (64 << stage) // scale
        for b in range(blocks):
            p = f"stage{stage}/block{b}"
            conv(f"{p}/conv1", 1, cin, width), norm(f"{p}/bn1", width)
            conv(f"{p}/conv2", 3, width, width), norm(f"{p}/bn2", width)
            conv(f"{p}/conv3", 1, width, 4 * width), norm(f"{p}/bn3", 4 * width)
            if b == 0:
                conv(f"{p}/proj", 1, cin, 4 * width), norm(f"{p}/bn_proj", 4 * width)
            cin = 4 * width
    params["head/kernel"], params["head/bias"] = (cin, 1000), (1000,)
    out = {f"params/{n}": s for n, s in params.items()} | {f"batch_stats/{n}": s for n, s in stats.items()}
    for moment in ("mu", "nu"):
        out |= {f"opt/{moment}/{n}": s for n, s in params.items()}
    return out | {"opt/count": ()}


CASES: dict[str, Callable[[bool], dict[str, tuple[int, ...]]]] = {"many": many, "resnet": resnet50, "sixteen": sixteen}


def make_arrays(shapes: dict[str, tuple[int, ...]]) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    device = jax.devices()[0]
    return jax.block_until_ready(
        {n: jax.device_put(rng.random(s, dtype=np.float32), device) for n, s in shapes.items()}
    )


# -- the variants: save(dir) -> path, restore(path), restore_some(path) ---------------------
def jstate_variant(arrays, some, pack=True):
    state = jstate.State.from_tree(arrays, flat=True)
    target = jstate.State.from_tree(structs(arrays, list(arrays)), flat=True)
    saver, some_saver = jstate.Saver(pack=pack), jstate.Saver(some)
    return (
        lambda d: Path(saver.save(state, d / "model")),
        lambda p: jax.block_until_ready(saver.restore(p, target)),
        lambda p: jax.block_until_ready(some_saver.restore(p, target)),
    )


def orbax_variant(arrays, some):
    checkpointer = ocp.StandardCheckpointer()
    target = structs(arrays, list(arrays))
    some_item = structs(arrays, some)
    some_args = {
        n: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype) for n, s in some_item.items()
    }
    partial = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())

    def save(d: Path) -> Path:
        checkpointer.save(d / "model", arrays)
        checkpointer.wait_until_finished()
        return d / "model"

    def restore_some(p: Path):
        args = ocp.args.PyTreeRestore(item=some_item, restore_args=some_args, partial_restore=True)
        return jax.block_until_ready(partial.restore(p, args=args))

    return save, lambda p: jax.block_until_ready(checkpointer.restore(p, target)), restore_some


def timed(fn, arg) -> float:
    gc.collect()
    start = time.perf_counter()
    result = fn(arg)
    seconds = time.perf_counter() - start
    del result
    return seconds


# -- one case -------------------------------------------------------------------------------
OPS = ("save", "restore", "restore 10%")


def run_case(name: str, quick: bool, rounds: int, workdir: Path) -> list[h.Row]:
    arrays = make_arrays(CASES[name](quick))
    some = subset(sorted(arrays))
    nbytes = sum(a.nbytes for a in arrays.values())
    small = sum(1 for a in arrays.values() if 0 < a.nbytes <= 2**20)
    variants = {"jstate": jstate_variant(arrays, some), "orbax": orbax_variant(arrays, some)}
    if name == "many":
        variants["jstate-plain"] = jstate_variant(arrays, some, pack=False)
    print(
        f"[{name}: {len(arrays)} arrays ({small} of them <= 1 MiB, packed by default), {nbytes / 2**20:.1f} MiB; "
        f"10% = {len(some)} arrays]",
        flush=True,
    )
    times = {op: {v: [] for v in variants} for op in OPS}
    for r in range(rounds + 1):
        names = list(variants)
        order = names[r % len(names) :] + names[: r % len(names)]
        sample: dict[str, dict[str, float]] = {op: {} for op in OPS}
        paths = {}
        pretouch(2 * nbytes)
        for v in order:
            directory = workdir / f"{name}-{v}"
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            sample["save"][v] = timed(variants[v][0], directory)
            paths[v] = directory / "model" if v == "orbax" else Path(jstate.latest_checkpoint(directory))
        pretouch(2 * nbytes)
        for op, i in (("restore", 1), ("restore 10%", 2)):
            for v in order:
                sample[op][v] = timed(variants[v][i], paths[v])
        for v in names:
            shutil.rmtree(workdir / f"{name}-{v}", ignore_errors=True)
        os.sync()
        print(
            f"  {'warm-up' if r == 0 else f'round {r}/{rounds}'}: "
            + "; ".join(f"{op} " + " ".join(f"{v} {sample[op][v]:.3g}" for v in names) for op in OPS),
            flush=True,
        )
        if r:
            for op in OPS:
                for v in names:
                    times[op][v].append(sample[op][v])
    print()
    return report(name, times)


def report(name: str, t: dict) -> list[h.Row]:
    """Print the case's ratios and median times; return its rows."""

    def ratio(op, a="jstate", b="orbax"):
        return h.median_ratio(t[op][a], t[op][b])

    def part(v):
        return h.median_ratio(t["restore 10%"][v], t["restore"][v])

    rows = []
    if name == "many":
        rows += [
            h.Row("save time, jstate / orbax", ratio("save"), at_most=0.1),
            h.Row("restore time, jstate / orbax", ratio("restore"), at_most=0.1),
            h.Row("save time, jstate", h.median(t["save"]["jstate"]), "s", at_most=0.15),
            h.Row("restore time, jstate", h.median(t["restore"]["jstate"]), "s", at_most=0.15),
            h.Row("save time, jstate / jstate pack=False", ratio("save", b="jstate-plain")),
            h.Row("restore time, jstate / jstate pack=False", ratio("restore", b="jstate-plain")),
            h.Row("10% restore / full restore, jstate pack=False", part("jstate-plain"), at_most=0.15),
        ]
    elif name == "resnet":
        rows += [
            h.Row("save time, jstate / orbax", ratio("save"), at_most=0.5),
            h.Row("restore time, jstate / orbax", ratio("restore"), at_most=0.6),
        ]
    else:
        rows += [
            h.Row("save time, jstate / orbax", ratio("save"), at_most=0.8),
            h.Row("restore time, jstate / orbax", ratio("restore")),
        ]
    rows += [
        h.Row("10% restore / full restore, jstate", part("jstate"), at_most=0.15),
        h.Row("10% restore / full restore, orbax", part("orbax")),
        h.Row("10% restore time, jstate / orbax", ratio("restore 10%")),
    ]
    h.print_rows(f"{name}: ratios (medians of per-round ratios)", rows)
    lines = [f"  {op}, {v}: {h.median(x) * 1e3:.1f} ms" for op, by in t.items() for v, x in by.items()]
    print(f"{name}: median times", *lines, "", sep="\n", flush=True)
    return [dataclasses.replace(row, what=f"{name}: {row.what}") for row in rows]


# -- entry point ----------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one round: a smoke test (< 1 min)")
    parser.add_argument("--workdir", default="/tmp", help="where checkpoints go (a fresh temporary directory inside)")
    parser.add_argument("--malloc", choices=("inherit", "glibc", "tuned", "both"), default="inherit")
    parser.add_argument("--only", choices=tuple(CASES), help="run one case only")
    parser.add_argument("--rounds", type=int, help="counted rounds (default 5, --quick 1)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.malloc != "inherit":
        argv, skip = [], False
        for a in sys.argv[1:]:  # the same arguments, less --malloc
            if skip or a == "--malloc":
                skip = not skip
            elif not a.startswith("--malloc="):
                argv.append(a)
        settings = ("glibc", "tuned") if args.malloc == "both" else (args.malloc,)
        codes = [subprocess.run([sys.executable, __file__, *argv], env=malloc_env(s)).returncode for s in settings]
        sys.exit(max(codes))
    rounds = args.rounds or (1 if args.quick else 5)
    workdir = Path(tempfile.mkdtemp(prefix="jstate-bench-pack-", dir=args.workdir))
    print("== jstate checkpoints of real training states (issue 15) ==")
    print(f"command: {h.command_line()}")
    print(
        f"jax {jax.__version__}, orbax-checkpoint {ocp.__version__}, {len(jax.devices())} "
        f"{jax.default_backend()} device(s), {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}"
    )
    print(f"jstate {jstate.__version__} at {source_revision()}")
    print(f"malloc: {h.malloc_setting()}")
    print(f"workdir: {workdir}; restores are warm (page cache); {rounds} counted rounds after 1 warm-up")
    if args.quick:
        print("QUICK MODE: small sizes; a smoke test, the verdicts mean nothing.")
    print(flush=True)
    start = time.perf_counter()
    rows = []
    try:
        for name in CASES:
            if args.only in (None, name):
                rows += run_case(name, args.quick, rounds, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    targets = [row for row in rows if row.at_most is not None]
    missed = [row for row in targets if row.value > row.at_most]
    h.print_rows(f"summary ({h.malloc_setting()}): {len(targets) - len(missed)} of {len(targets)} targets met", targets)
    print(f"total {time.perf_counter() - start:.0f} s, load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
