"""Shared benchmark plumbing: interleaved timing, fresh child processes, peak RSS, reporting.

Plain standard library, so a script can import it before setting up and importing JAX. Functions
that time a callable expect it to block until its result is ready (``jax.block_until_ready``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

MALLOC_VARS = ("MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
TUNED_MALLOC = "MALLOC_ARENA_MAX=2 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_MMAP_THRESHOLD_=33554432"


# -- environment (call before importing jax) ---------------------------------------------------
def use_cpu_devices(count: int) -> None:
    """Make JAX run on the CPU with `count` virtual devices; must run before jax is imported."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def malloc_setting() -> str:
    """The glibc malloc tuning this process runs under (see shared/BENCHMARKING.md)."""
    chosen = [f"{name}={os.environ[name]}" for name in MALLOC_VARS if name in os.environ]
    return " ".join(chosen) if chosen else "glibc defaults (no MALLOC_* set)"


def command_line() -> str:
    """How this script was run, as a shell command (the script's path relative to the working directory)."""
    return shlex.join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]])


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats: a smoke test (< 60 s)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: measure one variant's first call
    return parser.parse_args()


def print_header(title: str, quick: bool, jax_module) -> None:
    print(f"== {title} ==")
    print(f"command: {command_line()}")
    print(
        f"jax {jax_module.__version__}, {len(jax_module.devices())} {jax_module.default_backend()} device(s), "
        f"{os.cpu_count()} cores, python {platform.python_version()}, load average {os.getloadavg()[0]:.2f}"
    )
    print(f"malloc: {malloc_setting()}")
    if quick:
        print("QUICK MODE: small sizes and one or two repeats; a smoke test, the verdicts mean nothing.")
    print()


# -- timing ---------------------------------------------------------------------------------
def interleave(variants: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each variant, run in turn and in a rotating order (A B C, B C A, ...).

    Results are dropped as soon as each call returns, so only one variant's output is alive.
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for names in _rotations(list(variants), rounds):
        for name in names:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """The median of per-pair ratios: pairs measured side by side, so slow drifts cancel."""
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))


def _rotations(names: list[str], rounds: int) -> list[list[str]]:
    return [names[r % len(names) :] + names[: r % len(names)] for r in range(rounds)]


# -- fresh processes: first call and peak memory --------------------------------------------
def resident_bytes() -> int:
    """Current resident set size, from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def first_call(fn: Callable[[], object]) -> dict[str, float]:
    """Time one call of `fn` and its peak RSS above the RSS just before it (for a fresh process)."""
    baseline = resident_bytes()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss": peak_resident_bytes() - baseline}


def report_to_parent(result: dict[str, float]) -> None:
    print(json.dumps(result))


def in_children(
    script: str, variants: Sequence[str], runs: int, extra_args: Sequence[str] = ()
) -> dict[str, list[dict]]:
    """Run ``script --child VARIANT`` for each variant, `runs` times, interleaved and rotating.

    Each child measures its variant with `first_call` and prints the result as its last line.
    """
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for names in _rotations(list(variants), runs):
        for name in names:
            results[name].append(_run_child(script, name, extra_args))
    return results


def _run_child(script: str, variant: str, extra_args: Sequence[str]) -> dict:
    command = [sys.executable, script, "--child", variant, *extra_args]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def column(results: list[dict], field: str) -> list[float]:
    return [r[field] for r in results]


# -- reporting ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Row:
    """One line of a report: a measured value, and the bound it must stay under, if any."""

    what: str
    value: float
    unit: str = "x"  # "x" for a ratio, or "s", "ms", "us"
    at_most: float | None = None

    def cells(self) -> tuple[str, str, str, str]:
        target = "" if self.at_most is None else f"<= {_number(self.at_most, self.unit, exact=True)}"
        verdict = "" if self.at_most is None else ("ok" if self.value <= self.at_most else "MISSED")
        return self.what, _number(self.value, self.unit), target, verdict


def print_rows(title: str, rows: Sequence[Row]) -> None:
    cells = [("measurement", "value", "target", "verdict")] + [row.cells() for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    print(title, *lines, "", sep="\n", flush=True)


def _number(value: float, unit: str, exact: bool = False) -> str:
    shown = value * {"x": 1, "s": 1, "ms": 1e3, "us": 1e6}[unit]
    text = f"{shown:g}" if exact else f"{shown:.3f}" if shown < 10 else f"{shown:.1f}"
    return text + ("" if unit == "x" else f" {unit}")
