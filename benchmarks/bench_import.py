"""The cost of ``import jstate`` over ``import jax``, each in a fresh Python process.

    python benchmarks/bench_import.py [--pairs N]

Two child processes, run alternately (A B A B ...), ``--pairs`` times each (default 5), after one
untimed pair (which also writes any stale ``.pyc`` files):

  A  ``python -c "import jax"``
  B  ``python -c "import jax; import jstate"``

Each child times its own imports with ``time.perf_counter`` (interpreter start-up excluded) and
prints the result; the children import jstate from this checkout (they run in the repository
root) with the environment this script runs under. B also reports which heavy optional
dependencies ``import jstate`` pulled into ``sys.modules``: they should load only when used.

Target: import jax + jstate, minus import jax .................. <= 0.3 s

The headline is the median of the per-pair differences (B - A): pairs run back to back, so slow
drifts of the machine cancel (shared/BENCHMARKING.md). The medians of A and B, and of the time of
``import jstate`` alone inside B (after jax is imported), are shown beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import _harness as h

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.3  # seconds over `import jax`

# Heavy dependencies `import jstate` should leave unloaded: (label, module name in sys.modules).
HEAVY = (
    ("orbax", "orbax"),
    ("orbax.checkpoint", "orbax.checkpoint"),
    ("safetensors", "safetensors"),
    ("flax", "flax"),
    ("flax.nnx", "flax.nnx"),
    ("tensorstore", "tensorstore"),
)

# The child: as little as possible before the timed imports (`time` is a builtin module).
CHILD = """\
import time
t0 = time.perf_counter()
import jax
t1 = time.perf_counter()
{jstate}
t2 = time.perf_counter()
import json, sys
print(json.dumps({{
    "jax": t1 - t0,
    "jstate": t2 - t1,
    "total": t2 - t0,
    "jax_version": jax.__version__,
    "jstate_file": getattr(sys.modules.get("jstate"), "__file__", None),
    "modules": len(sys.modules),
    "heavy": {{name: name in sys.modules for name in {heavy!r}}},
}}))
"""


def run_child(with_jstate: bool) -> dict:
    code = CHILD.format(jstate="import jstate" if with_jstate else "", heavy=[m for _, m in HEAVY])
    command = [sys.executable, "-c", code]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        what = "import jax; import jstate" if with_jstate else "import jax"
        raise RuntimeError(f'python -c "{what}" failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5, help="timed A/B pairs of fresh processes (default 5)")
    args = parser.parse_args()
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")

    load_before = os.getloadavg()
    print("== jstate import cost ==")
    print(f"command: {h.command_line()}")
    print(
        f"{os.cpu_count()} cores, python {platform.python_version()} ({sys.executable}), "
        f"load average {' '.join(f'{x:.2f}' for x in load_before)} (1, 5, 15 min) at the start"
    )
    print(f"malloc: {h.malloc_setting()}")
    print(f"JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '(unset)')}, children run in {ROOT}")

    warm_a, warm_b = run_child(False), run_child(True)  # untimed: .pyc files, disk cache
    print(f"jax {warm_a['jax_version']}; jstate from {Path(warm_b['jstate_file']).parent}")
    print(f"pairs: {args.pairs} timed (A = import jax, B = import jax; import jstate), after 1 untimed pair")
    print(flush=True)

    a_runs, b_runs = [], []
    for i in range(args.pairs):
        a_runs.append(run_child(False))
        b_runs.append(run_child(True))
        print(
            f"  pair {i + 1}/{args.pairs}: A import jax {a_runs[-1]['total']:.3f} s; "
            f"B import jax {b_runs[-1]['jax']:.3f} s + import jstate {b_runs[-1]['jstate']:.3f} s "
            f"= {b_runs[-1]['total']:.3f} s; B - A {b_runs[-1]['total'] - a_runs[-1]['total']:+.3f} s",
            flush=True,
        )
    load_after = os.getloadavg()
    print()

    a = [r["total"] for r in a_runs]
    b = [r["total"] for r in b_runs]
    over = statistics.median(y - x for x, y in zip(a, b))
    h.print_rows(
        f"import cost, {args.pairs} interleaved pairs of fresh processes (medians):",
        [
            h.Row("import jax + jstate, minus import jax (per-pair median)", over, "s", at_most=TARGET),
            h.Row("import jax + jstate minus import jax (difference of medians)", h.median(b) - h.median(a), "s"),
            h.Row("import jax (A)", h.median(a), "s"),
            h.Row("import jax; import jstate (B)", h.median(b), "s"),
            h.Row("  of which import jstate, after jax, inside B", h.median([r["jstate"] for r in b_runs]), "s"),
            h.Row("import jax + jstate / import jax (per-pair median)", h.median_ratio(b, a)),
        ],
    )
    extra = statistics.median(r["modules"] for r in b_runs) - statistics.median(r["modules"] for r in a_runs)
    print("heavy modules in sys.modules after the imports (A: import jax; B: import jax; import jstate):")
    width = max(len(label) for label, _ in HEAVY)
    for label, module in HEAVY:
        loaded_a = any(r["heavy"][module] for r in a_runs)
        loaded_b = any(r["heavy"][module] for r in b_runs)
        print(f"  {label.ljust(width)}  A {'yes' if loaded_a else 'no '}  B {'yes' if loaded_b else 'no'}")
    print(f"  modules loaded: A {statistics.median(r['modules'] for r in a_runs):.0f}, B +{extra:.0f}")
    print()
    print(
        f"load average {' '.join(f'{x:.2f}' for x in load_after)} (1, 5, 15 min) at the end "
        f"({os.cpu_count()} cores; a 1-min load near or above that skews the times)"
    )


if __name__ == "__main__":
    main()
