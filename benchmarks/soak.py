"""Soak: writer processes with several Savers each save into one directory while a reader reads
it, and random SIGKILL, SIGTERM and SIGINT land at random moments, for a given time. Then every
save that returned is checked, and what the killed saves left behind is counted.

    python benchmarks/soak.py                          # 4 writers x 2 Savers, 60 s, a local directory
    python benchmarks/soak.py --seconds 840            # the 14 minutes of issue 23
    python benchmarks/soak.py --store gs --seconds 180 # fake-gcs-server on 127.0.0.1 (tests/cloud/emulators.py)
    python benchmarks/soak.py --store s3               # moto's S3 server
    python benchmarks/soak.py --rounds 40              # 40 chances to signal, paced by the writers

Prints saves returned, signals sent and kills that took effect, reads, violations and leftovers;
exits 1 on any violation or leftover the README does not allow. A violation is: a save that
returned and is lost (not listed, and no retention policy of its prefix retired it); a listed
checkpoint that restores a mix of saves, or a value never saved to that path; a reader that saw
`latest_checkpoint` return None, a mix, or any exception. Allowed leftovers: locally, empty
directories a writer killed right after making them (the next save removes everything else);
on an object store, everything a killed save left (removed by a later save once a day old).

Each writer cycles through Saver kinds, `--savers` of them (the chaos of tests/reliability/test_stress.py,
kept running): prefix ``k<i>`` keeps every checkpoint (its steps collide across writers: the
same paths re-saved at once); ``k<i>-1`` keeps one, and must never take ``k<i>``'s step 1 with
it; ``r<i>`` keeps 1 to 3, its steps jumping back and forth like resumed runs. Saves are
blocking or not at random. Values prove which save a restore read: ``x`` is filled with the
save's number and ``y`` is ``arange + number``. The schedule (which writer, which signal) follows
`--seed`; timing does not, so each run meets the saves at other moments. By default a signal
comes every 0.2 to 1.2 s for `--seconds`; with `--rounds` it comes after 1 to 6 lines the writers
report (a save begun or returned, a writer gone), `--rounds` times, so a slow machine gets the same
chaos, only slower (tests/reliability/test_soak.py runs both).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIGNALS = {"SIGINT": 5, "SIGKILL": 2, "SIGTERM": 1, None: 2}  # relative weights; None: no signal this time

WRITER = textwrap.dedent(
    """
    import os, random, sys
    import jax.numpy as jnp
    import jstate

    def say(*parts):  # one write: a line is whole or missing, even when a signal lands
        os.write(1, (" ".join(map(str, parts)) + "\\n").encode())

    root, index, seed, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(seed)
    kinds = [lambda: (jstate.Saver(), 6), lambda: (jstate.Saver(max_to_keep=1), 4),
             lambda: (jstate.Saver(max_to_keep=rng.choice([1, 2, 3])), 20)]
    savers = []
    for i in range(count):
        saver, steps = kinds[i % 3]()
        savers.append((["k", "k", "r"][i % 3] + str(i // 3) + ("-1" if i % 3 == 1 else ""), saver, steps))
    say("ready")
    i = 0
    while True:
        prefix, saver, steps = rng.choice(savers)
        step, blocking, value = rng.randrange(steps), rng.random() < 0.5, index * 100_000 + i
        i += 1
        path = f"{root}/{prefix}-{step}"
        try:
            say("begin", path, value)
            state = jstate.State({"x": jnp.full((8, 8), value, jnp.int32), "y": jnp.arange(16, dtype=jnp.int32) + value})
            saver.save(state, f"{root}/{prefix}", step=step, blocking=blocking)
            saver.wait()
            say("saved", path, value)
        except KeyboardInterrupt:
            say("interrupted", path, value)
    """
)

READER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import jax.numpy as jnp
    import numpy as np
    import jstate

    root, stop = sys.argv[1], Path(sys.argv[2])
    target = jstate.State({"x": jnp.zeros((8, 8), jnp.int32), "y": jnp.zeros(16, jnp.int32)})
    reads, problems = 0, []
    print("ready", flush=True)
    while not stop.exists():
        try:
            if jstate.latest_checkpoint(root) is None:
                problems.append("latest_checkpoint returned None")
            jstate.open_checkpoint(root)
            r = jstate.Saver().restore(root, target)
            x, y = np.asarray(r["x"]), np.asarray(r["y"])
            if not ((x == x.flat[0]).all() and (y == np.arange(16) + x.flat[0]).all()):
                problems.append(f"a mix of saves: x={x.flat[:2]} y={y[:2]}")
        except Exception as e:
            problems.append(f"{type(e).__name__}: {e}")
        reads += 1
    print(json.dumps({"reads": reads, "count": len(problems), "problems": problems[:5]}), flush=True)
    """
)


@dataclasses.dataclass
class Report:
    """What a soak did and found."""

    seconds: float
    writers_started: int
    saves_returned: int
    signals: dict[str, int]  # sent, by signal
    kills: int  # writers that died of a signal
    reads: int
    listed: int
    violations: list[str]
    leftovers: list[str]  # not allowed by the README
    allowed_leftovers: list[str]

    def __str__(self) -> str:
        signals = ", ".join(f"{n} {k}" for k, n in self.signals.items())
        lines = [
            f"{self.seconds:.0f} s, {self.writers_started} writer processes: {self.saves_returned} saves returned, "
            f"signals sent: {signals}, {self.kills} kills took effect; {self.reads} reads; {self.listed} listed",
            f"violations: {len(self.violations)}",
            *[f"  {v}" for v in self.violations[:20]],
            f"leftovers: {len(self.leftovers)} (and {len(self.allowed_leftovers)} the README allows)",
            *[f"  {p}" for p in self.leftovers[:20]],
        ]
        return "\n".join(lines)


class Child:
    """A Python child process whose stdout lines are collected as they come, and put on `events`
    (with "exited" when it ends) where one is given."""

    def __init__(
        self, name: str, code: str, *args: str, env: Mapping[str, str], cwd: Path, events: queue.Queue | None = None
    ):
        self.lines: list[str] = []
        self.events = events
        with open(cwd / f"{name}.stderr", "w") as stderr:  # kept in the working directory, to look into
            self.process = subprocess.Popen(
                [sys.executable, "-c", code, *args],
                cwd=cwd,
                env=dict(env),
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self.started = threading.Event()  # it printed "ready"
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if line == "ready\n":
                self.started.set()
            if self.events is not None:
                self.events.put(line)
        self.started.set()  # or it ended
        if self.events is not None:
            self.events.put("exited")

    @property
    def ready(self) -> bool:
        return self.started.is_set() and self.process.poll() is None

    def finish(self, timeout: float = 120) -> None:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=10)


def child_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the children: one CPU device each (they start faster), jstate from this
    checkout."""
    env = dict(os.environ if base is None else base)
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).strip()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env | {"JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def soak(
    root: str,
    *,
    writers: int = 4,
    savers: int = 2,
    seconds: float = 60,
    rounds: int | None = None,
    seed: int = 0,
    env: Mapping[str, str] | None = None,
    workdir: Path | None = None,
) -> Report:
    """Run the soak against directory `root` (a local path or a ``gs://``/``s3://`` URL, empty or
    new) and check it. A chance to signal comes every 0.2 to 1.2 s for `seconds`, or, with
    `rounds`, after every 1 to 6 lines the writers report, `rounds` times. `env`: the children's
    environment (an emulator's variables); `workdir`: their working directory (a temporary one by
    default)."""
    import jax.numpy as jnp

    import jstate

    env = child_env(env)
    rng = random.Random(seed)
    base = jstate.State({"x": jnp.full((8, 8), 7, jnp.int32), "y": jnp.arange(16, dtype=jnp.int32) + 7})
    jstate.Saver().save(base, f"{root}/base")  # never deleted: a reader never rightly sees none
    with contextlib.ExitStack() as stack:
        cwd = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        stop = cwd / "stop-reading"
        reader = Child("reader", READER, root, str(stop), env=env, cwd=cwd)
        done: list[Child] = []
        sent = {name: 0 for name in SIGNALS if name}
        reports: queue.Queue[str] | None = None if rounds is None else queue.Queue()

        def writer(i: int) -> Child:
            seed = str(rng.randrange(2**31))
            return Child(f"writer{i}", WRITER, root, str(i), seed, str(savers), env=env, cwd=cwd, events=reports)

        children = [writer(i) for i in range(writers)]
        started = time.monotonic()
        try:
            for child in [reader, *children]:  # the clock starts when all are at work (JAX starts slowly)
                child.started.wait(timeout=600)
            started, chances = time.monotonic(), 0
            while (time.monotonic() < started + seconds) if rounds is None else (chances < rounds):
                chances += 1
                if reports is None:
                    time.sleep(rng.uniform(0.2, 1.2))  # the chaos schedule, not a synchronization
                else:
                    for _ in range(rng.randint(1, 6)):  # the writers report that many steps of their saves
                        reports.get(timeout=600)
                for child in [c for c in children if c.process.poll() is not None]:
                    children.remove(child)
                    done.append(child)
                    children.append(writer(writers + len(done) - 1))
                child = rng.choice(children)
                action = rng.choices(list(SIGNALS), weights=list(SIGNALS.values()))[0]
                if action is not None and child.ready:
                    child.process.send_signal(getattr(signal, action))
                    sent[action] += 1
            for child in children:
                child.process.send_signal(signal.SIGKILL if rng.random() < 0.5 else signal.SIGTERM)
        finally:
            for child in children:
                child.process.kill()
                child.finish()
            stop.touch()
            reader.finish()
            reader.process.kill()
        elapsed = time.monotonic() - started
        # Killed during the soak (those running at its end are stopped by a signal too: not counted).
        kills = sum(1 for c in done if c.process.returncode is not None and c.process.returncode < 0)
        done += children
    begun, saved = _parse(line for child in done for line in child.lines)
    violations, listed = _check(root, begun, saved)
    read = next((json.loads(line) for line in reversed(reader.lines) if line.startswith("{")), None)
    if read is None:
        violations.append("the reader reported nothing (it crashed)")
    else:
        violations += [f"reader: {p}" for p in read["problems"]]
        violations += [f"reader: {read['count'] - len(read['problems'])} more problems"] * (read["count"] > 5)
    jstate.Saver().save(base, f"{root}/final")  # every writer is gone: this save removes what they left
    leftovers, allowed = _leftovers(root)
    return Report(
        elapsed,
        len(done),
        len(saved),
        sent,
        kills,
        read["reads"] if read else 0,
        len(listed),
        violations,
        leftovers,
        allowed,
    )


def _parse(lines: Iterator[str]) -> tuple[dict[str, set[int]], list[tuple[str, int]]]:
    """``{checkpoint name: values begun there}`` and ``[(name, value)]`` of the saves that returned."""
    begun: dict[str, set[int]] = {}
    saved: list[tuple[str, int]] = []
    for line in lines:
        parts = line.split()
        if len(parts) == 3 and parts[0] in ("begin", "saved") and parts[2].isdigit():
            name, value = parts[1].rsplit("/", 1)[1], int(parts[2])
            if parts[0] == "begin":
                begun.setdefault(name, set()).add(value)
            else:
                saved.append((name, value))
    return begun, saved


def _check(root: str, begun: dict[str, set[int]], saved: list[tuple[str, int]]) -> tuple[list[str], dict[str, int]]:
    """Violations among the listed checkpoints and the saves that returned; ``{name: value}`` listed."""
    import jax.numpy as jnp
    import numpy as np

    import jstate
    from jstate.checkpoint import directory as _directory
    from jstate.storage.store import as_path

    target = jstate.State({"x": jnp.zeros((8, 8), jnp.int32), "y": jnp.zeros(16, jnp.int32)})
    violations, found = [], {}
    for ckpt in _directory.checkpoints(as_path(root)):
        name = ckpt.path.name
        try:
            restored = jstate.Saver().restore(ckpt.path, target)
        except Exception as e:
            violations.append(f"{name}: listed, but restoring it raised {type(e).__name__}: {e}")
            continue
        x, y = np.asarray(restored["x"]), np.asarray(restored["y"])
        value = int(x.flat[0])
        if not ((x == value).all() and (y == np.arange(16) + value).all()):
            violations.append(f"{name}: restores a mix of saves (x={x.flat[:2]}, y={y[:2]})")
        elif (
            name in ("base", "final")
            and value != 7
            or name not in ("base", "final")
            and value not in begun.get(name, ())
        ):
            violations.append(f"{name}: restores value {value}, which no save to that path wrote")
        found[name] = value
    if found.get("base") != 7:
        violations.append("base: the checkpoint nothing may delete is gone")
    prefixes = {name.rsplit("-", 1)[0] for name, _ in saved}
    for name, value in saved:  # prefixes k<i> keep everything: every save that returned stays listed
        if re.fullmatch(r"k\d+", name.rsplit("-", 1)[0]) and name not in found:
            violations.append(f"{name}: a save that returned ({value}) is lost")
    for prefix in sorted(p for p in prefixes if not re.fullmatch(r"k\d+", p)):  # the newest is never retired
        if not any(n.rsplit("-", 1)[0] == prefix for n in found):
            violations.append(f"{prefix}: saves returned, but retention left none of its checkpoints")
    return violations, found


def _leftovers(root: str) -> tuple[list[str], list[str]]:
    """What no committed checkpoint holds, once every writer is gone: ``(not allowed, allowed)``."""
    from jstate.formats.manifest import FILE, Manifest
    from jstate.storage import store as _storage

    directory = _storage.as_path(root)
    remote = _storage.local_path(directory) is None
    bad, allowed = [], []
    for child, below in sorted(_storage.by_child(_storage.files(directory)).items()):
        manifest = Manifest.read(directory / child) if "" not in below else None
        kept = set() if manifest is None else {FILE, manifest.arrays}
        extra = [f"{root}/{child}/{rel}" for rel in below if rel.split("/", 1)[0] not in kept]
        (allowed if remote else bad).extend(extra)  # on object stores: removed once a day old
    if not remote:  # directories with no file at all: a writer killed right after making them
        allowed += [str(d) for d in sorted(directory.iterdir()) if d.is_dir() and not any(d.iterdir())]
    return bad, allowed


@contextlib.contextmanager
def store_root(store: str, directory: str | None) -> Iterator[tuple[str, dict[str, str] | None]]:
    """``(root, environment)`` for `store`: a local directory, or a bucket of an emulator started here."""
    if store == "local":
        with contextlib.ExitStack() as stack:
            root = directory or stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-ckpt-"))
            yield str(Path(root) / "ckpt"), None
        return
    sys.path.insert(0, str(REPO / "tests" / "cloud"))
    import emulators as cloud  # tests/cloud/emulators.py: the emulators the tests use

    start = {"gs": cloud.fake_gcs_server, "s3": cloud.moto_s3_server}[store]
    with start() as emulator:
        env = cloud.loopback_env(**{("gcs" if store == "gs" else "s3"): emulator})
        os.environ.update(env)  # this process reads and checks the bucket too
        cloud.reset_clients()
        yield emulator.url(f"soak-{os.getpid()}"), cloud.subprocess_env(env)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--writers", type=int, default=4, help="writer processes at any time (default 4)")
    parser.add_argument("--savers", type=int, default=2, help="Savers per writer (default 2)")
    parser.add_argument("--seconds", type=float, default=60, help="how long signals are sent (default 60)")
    parser.add_argument("--rounds", type=int, help="instead: this many chances to signal, paced by the writers")
    parser.add_argument("--store", choices=["local", "gs", "s3"], default="local")
    parser.add_argument("--dir", help="local directory to soak in (default: a temporary one)")
    parser.add_argument("--workdir", help="the children's working directory, where each leaves its stderr")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    with store_root(args.store, args.dir) as (root, env):
        report = soak(
            root,
            writers=args.writers,
            savers=args.savers,
            seconds=args.seconds,
            rounds=args.rounds,
            seed=args.seed,
            env=env,
            workdir=args.workdir and Path(args.workdir),
        )
    print(f"soak of {root} ({args.store}), seed {args.seed}, {args.writers} writers x {args.savers} Savers")
    print(report)
    return 1 if report.violations or report.leftovers else 0


if __name__ == "__main__":
    sys.exit(main())
