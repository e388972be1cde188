"""The soak of benchmarks/soak.py, for 60 seconds: writers with several Savers each, a reader, and
random SIGKILL, SIGTERM and SIGINT; nothing a save returned is lost, no reader sees None, a mix
or an exception, and nothing is left behind but what the README allows."""

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("soak", Path(__file__).parents[2] / "benchmarks" / "soak.py")
soak = sys.modules["soak"] = importlib.util.module_from_spec(_spec)  # its dataclass looks itself up there
_spec.loader.exec_module(soak)


@pytest.mark.slow
def test_a_minute_of_writers_readers_and_random_signals_loses_nothing(tmp_path):
    # Three writers, not the script's four: the suite shares two cores, and a writer killed
    # restarts JAX (seconds of CPU) before it saves again.
    report = soak.soak(str(tmp_path / "ckpt"), writers=3, savers=3, seconds=60, seed=23, workdir=tmp_path)
    print(report)
    assert report.saves_returned >= 10 and sum(report.signals.values()) >= 10, report  # it did exercise them
    assert report.reads > 20, report
    assert report.violations == [], report
    assert report.leftovers == [], report
