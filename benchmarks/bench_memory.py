"""Peak host memory of a save and a restore, jstate against Orbax's defaults, in fresh processes
(issue 15, requirement 4).

    python benchmarks/bench_memory.py [--gib 4] [--runs 1] [--malloc {inherit,glibc,tuned,both}] [--quick]

A state of `--gib` GiB of float32 in 64 arrays on the CPU device is saved, then restored, by a
fresh child process per measurement (one per variant and operation, interleaved):

  save     the child makes the state, then the peak resident set size (VmHWM, reset through
           /proc/self/clear_refs just before) above the RSS just before the save, divided by the
           state's bytes. jstate: ``Saver().save``; orbax: ``StandardCheckpointer`` save + wait.
  restore  the child restores the checkpoint a save child wrote (warm page cache: page-cache
           pages are not part of RSS) and reports the same ratio: the restored state itself
           counts 1.0. jstate: ``Saver().restore`` into an abstract State (verified); orbax:
           ``StandardCheckpointer.restore`` with ``ShapeDtypeStruct`` targets.

Targets: restore peak / state bytes <= 1.15 for jstate (issue 15); save and Orbax's figures are
reported beside it. --quick: 0.25 GiB, a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _harness as h

COUNT = 64


def vm_hwm() -> int:
    """Peak RSS since the last reset (VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> None:
    """Make VmHWM the current RSS (Linux >= 4.0: writing 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(variant: str, op: str, gib: float, workdir: Path) -> dict:
    h.use_cpu_devices(1)
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    import jstate

    size = int(gib * 2**30) // 4 // COUNT
    device = jax.devices()[0]
    names = [f"v{i:02d}" for i in range(COUNT)]
    structs = {
        n: jax.ShapeDtypeStruct((size,), np.float32, sharding=jax.sharding.SingleDeviceSharding(device)) for n in names
    }
    tiny = {"t": jax.numpy.ones(4)}  # loads each library's machinery before the baseline
    path = workdir / variant
    if op == "save":
        rng = np.random.default_rng(0)
        arrays = {n: jax.device_put(rng.random(size, dtype=np.float32), device) for n in names}
        jax.block_until_ready(arrays)
        state = jstate.State(arrays)
        if variant == "jstate":
            jstate.Saver().save(jstate.State(tiny), workdir / "warm-jstate")
            run = lambda: jstate.Saver().save(state, path)  # noqa: E731
        else:
            checkpointer = ocp.StandardCheckpointer()
            checkpointer.save(workdir / "warm-orbax", tiny)
            checkpointer.wait_until_finished()

            def run():
                checkpointer.save(path, arrays)
                checkpointer.wait_until_finished()
    else:
        if variant == "jstate":
            target = jstate.State.from_tree(structs, flat=True)
            run = lambda: jax.block_until_ready(jstate.Saver().restore(path, target))  # noqa: E731
        else:
            checkpointer = ocp.StandardCheckpointer()
            run = lambda: jax.block_until_ready(checkpointer.restore(path, structs))  # noqa: E731
    reset_peak()
    baseline = h.resident_bytes()
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    peak = vm_hwm() - baseline
    del result
    return {"seconds": seconds, "peak": peak, "ratio": peak / (size * 4 * COUNT)}


def run_child(variant: str, op: str, args, workdir: Path) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        f"{variant}:{op}",
        "--gib",
        str(args.gib),
        "--workdir",
        str(workdir),
    ]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--runs", type=int, default=1, help="measurements per variant and operation")
    parser.add_argument("--quick", action="store_true", help="0.25 GiB: a smoke test")
    parser.add_argument("--workdir", default="/tmp")
    parser.add_argument("--malloc", choices=("inherit", "glibc", "tuned", "both"), default="inherit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, op = args.child.split(":")
        print(json.dumps(child(variant, op, args.gib, Path(args.workdir))))
        return
    if args.malloc != "inherit":
        from bench_checkpoint import _drop_malloc, malloc_env

        settings = ("glibc", "tuned") if args.malloc == "both" else (args.malloc,)
        argv = _drop_malloc(sys.argv[1:])
        sys.exit(max(subprocess.run([sys.executable, __file__, *argv], env=malloc_env(s)).returncode for s in settings))
    if args.quick:
        args.gib = 0.25
    workdir = Path(tempfile.mkdtemp(prefix="jstate-bench-memory-", dir=args.workdir))
    print("== peak host memory of a save and a restore (issue 15) ==")
    print(f"command: {h.command_line()}")
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}, malloc: {h.malloc_setting()}")
    print(f"state: {args.gib:g} GiB of float32 in {COUNT} arrays; a fresh process per measurement; restores warm")
    if args.quick:
        print("QUICK MODE: a smoke test, the verdicts mean nothing.")
    print(flush=True)
    results: dict[str, list[dict]] = {}
    try:
        for r in range(args.runs):
            for op in ("save", "restore"):
                for variant in ("jstate", "orbax") if r % 2 == 0 else ("orbax", "jstate"):
                    if op == "save":
                        shutil.rmtree(workdir / variant, ignore_errors=True)
                    found = run_child(variant, op, args, workdir)
                    results.setdefault(f"{op}, {variant}", []).append(found)
                    print(
                        f"  {op} {variant}: peak {found['peak'] / 2**30:.2f} GiB above baseline, "
                        f"{found['ratio']:.3f} x the state, {found['seconds']:.1f} s",
                        flush=True,
                    )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ratio = {k: h.median([x["ratio"] for x in v]) for k, v in results.items()}
    print()
    h.print_rows(
        f"peak RSS above baseline / state bytes ({args.gib:g} GiB state)",
        [
            h.Row("restore, jstate", ratio["restore, jstate"], at_most=1.15),
            h.Row("restore, orbax", ratio["restore, orbax"]),
            h.Row("save, jstate", ratio["save, jstate"]),
            h.Row("save, orbax", ratio["save, orbax"]),
        ],
    )
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
