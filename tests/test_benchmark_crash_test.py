"""The crash test survives five kill -9s and ends with the same EMA weights as an uninterrupted run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "crash_test.py"


@pytest.mark.slow
def test_five_kills_resume_to_identical_weights(tmp_path):
    # Kills land after a counted number of observed steps (at most 8 per kill), not at random times, so
    # 0.6 kimg (about 40 steps) leaves room for five kills on a machine of any speed.
    cmd = [sys.executable, str(SCRIPT), "--kills", "5", "--duration", "0.6", "--workdir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert re.search(r"^kills survived: 5/5 ", out.stdout, re.M), out.stdout
    assert "bit-identical to the uninterrupted run: yes" in out.stdout
    kinds = set(re.findall(r"^kill +\d+ \((\S+) *\)", out.stdout, re.M))
    assert kinds == {"training", "write", "start-up"}, out.stdout
