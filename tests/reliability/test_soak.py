"""The chaos of benchmarks/soak.py: writers with several Savers each save into one directory while a
reader reads it, and random SIGKILL, SIGTERM and SIGINT land at random moments. Nothing a save
returned is lost, no reader sees None, a mix or an exception, every listed checkpoint restores a
whole save made to its path, and nothing is left behind but what the README allows.

Two paces: a minute of signals every 0.2 to 1.2 s (the soak as the benchmark runs it), and 40
chances to signal, each after 1 to 6 lines the writers report, so that a slow machine gets the
same chaos, only slower; where in a save each signal lands follows no seed either way."""

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("soak", Path(__file__).parents[2] / "benchmarks" / "soak.py")
soak = sys.modules["soak"] = importlib.util.module_from_spec(_spec)  # its dataclass looks itself up there
_spec.loader.exec_module(soak)

pytestmark = pytest.mark.slow  # a minute of chaos each


def _assert_nothing_lost(report) -> None:
    print(report)
    assert report.saves_returned >= 10 and sum(report.signals.values()) >= 10, report  # it did exercise them
    assert report.reads > 20, report
    assert report.violations == [], report
    assert report.leftovers == [], report


def test_a_minute_of_writers_readers_and_random_signals_loses_nothing(tmp_path):
    # Three writers, not the script's four: the suite shares two cores, and a writer killed
    # restarts JAX (seconds of CPU) before it saves again.
    _assert_nothing_lost(soak.soak(str(tmp_path / "ckpt"), writers=3, savers=3, seconds=60, seed=23, workdir=tmp_path))


def test_many_writers_and_signals_paced_by_their_saves_lose_nothing(tmp_path):
    _assert_nothing_lost(soak.soak(str(tmp_path / "ckpt"), writers=3, savers=3, rounds=40, seed=11, workdir=tmp_path))
