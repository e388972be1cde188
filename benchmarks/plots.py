"""The documentation's benchmark plots, from the results file `bench_sweep.py` writes.

    python benchmarks/plots.py [--results benchmarks/results/sweep.json] [--out docs/_static/benchmarks]

Writes checkpoint.png, init.png and memory.png; each names the machine and the date of the run
it plots, so a plot is never shown apart from where its numbers come from. Rerun it after
`bench_sweep.py`; both the results file and the plots are committed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "sweep.json"
OUT = HERE.parent / "docs" / "_static" / "benchmarks"
STYLE = {  # one colour and marker per library, in every plot
    "jstate": {"color": "#1f77b4", "marker": "o", "label": "jstate"},
    "orbax": {"color": "#ff7f0e", "marker": "s", "label": "Orbax StandardCheckpointer"},
    "numpy": {"color": "#7f7f7f", "marker": "^", "label": "numpy (np.save / np.load: the floor)", "linestyle": "--"},
    "jit": {"color": "#2ca02c", "marker": "s", "label": "one jax.jit building the dict"},
    "nnx": {"color": "#d62728", "marker": "^", "label": "Flax NNX, eager"},
}


def source(sweep: dict) -> str:
    """One line saying where a sweep's numbers come from."""
    m = sweep["machine"]
    quick = ", --quick" if sweep.get("quick") else ""
    return (
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {sweep['date'][:10]}; "
        f"jax {m['versions']['jax']}, orbax {m['versions']['orbax-checkpoint']}{quick}"
    )


def _line(ax, rows: list[dict], x: str, variant: str, value, scale: float = 1.0) -> None:
    points = [(row[x] * scale, value(row[variant])) for row in rows if variant in row]
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, **STYLE[variant])


def _axes(ax, title: str, xlabel: str, ylabel: str, log: bool = True) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain_ticks(ax.yaxis)
    _plain_ticks(ax.xaxis)
    ax.grid(True, which="major", alpha=0.3)


def _plain_ticks(axis) -> None:
    """Ticks read 0.1, 1, 10 rather than 10^-1 or 2 x 10^1; minor ticks unlabelled."""
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def checkpoint_figure(results: dict):
    sweeps = results["checkpoint"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    for col, op in enumerate(("save", "restore")):
        ax = axes[0, col]
        for variant in ("jstate", "orbax", "numpy"):
            _line(ax, sweeps["by_size"], "bytes", variant, lambda r, op=op: r[op], scale=1 / 2**20)
        _axes(ax, f"{op}: 16 float32 arrays, by state size", "state size (MiB)", "seconds")
        ax = axes[1, col]
        for variant in ("jstate", "orbax", "numpy"):
            _line(ax, sweeps["by_count"], "arrays", variant, lambda r, op=op: r[op])
        _axes(ax, f"{op}: arrays of 10 KB, by array count", "arrays", "seconds")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Checkpoints: save and restore time (lower is better)\n{source(sweeps)}", fontsize=10)
    return fig


def init_figure(results: dict):
    sweeps = results["init"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), constrained_layout=True)
    for variant in ("jstate", "jit", "nnx"):
        _line(axes[0], sweeps["by_variables"], "variables", variant, lambda r: r["first"])
        _line(axes[1], sweeps["by_variables"], "variables", variant, lambda r: r["steady"])
        _line(axes[2], sweeps["by_shapes"], "shapes", variant, lambda r: r["first"])
    _axes(axes[0], "first call (trace + compile + run), 64x64 variables", "variables", "seconds")
    _axes(axes[1], "later calls (compiled), 64x64 variables", "variables", "seconds")
    count = sweeps["by_shapes"][0]["variables"] if sweeps["by_shapes"] else ""
    _axes(axes[2], f"first call, {count} variables, by distinct shapes", "distinct shapes", "seconds")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Init in a fresh process (lower is better)\n{source(sweeps)}", fontsize=10)
    return fig


def memory_figure(results: dict):
    rows = results["memory"]["rows"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2), constrained_layout=True)
    for variant in ("jstate", "orbax"):
        _line(ax, rows, "bytes", variant, lambda r: r["restore"], scale=1 / 2**20)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":", label="the restored arrays alone")
    _axes(
        ax,
        "64 float32 arrays (those of at most 1 MiB are packed)",
        "state size (MiB)",
        "peak RSS / state bytes",
        log=False,
    )
    ax.set_xscale("log")
    ax.set_xticks([row["bytes"] / 2**20 for row in rows])
    _plain_ticks(ax.xaxis)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.suptitle(f"Host memory during a restore (lower is better)\n{source(results['memory'])}", fontsize=9)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    figures = {"checkpoint": checkpoint_figure, "init": init_figure, "memory": memory_figure}
    for name, make in figures.items():
        if name not in results:
            continue
        fig = make(results)
        # No timestamp in the file, so an unchanged plot is byte-for-byte unchanged in git.
        fig.savefig(args.out / f"{name}.png", dpi=110, metadata={"Software": None})
        plt.close(fig)
        print(f"wrote {args.out / f'{name}.png'}")


if __name__ == "__main__":
    main()
