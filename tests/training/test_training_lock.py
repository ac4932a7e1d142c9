"""The run lock: one holder at a time, named in the refusal, and gone when its holder dies."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from patchdiff.training.lock import RunLock, RunLockedError


def test_second_holder_is_refused_until_the_first_dies(tmp_path):
    hold = f"from patchdiff.training.lock import RunLock; held = RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); import time; time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"in use by pid {proc.pid} on "):
            RunLock(tmp_path).acquire()
    finally:
        proc.kill()  # kill -9: no clean-up code runs
        proc.wait()
    deadline = time.time() + 10
    lock = None
    while lock is None and time.time() < deadline:
        try:
            lock = RunLock(tmp_path).acquire()
        except RunLockedError:
            time.sleep(0.05)
    assert lock is not None
    lock.release()
    RunLock(tmp_path).acquire().release()
