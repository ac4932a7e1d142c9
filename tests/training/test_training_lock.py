"""The run lock: one holder at a time, named in the refusal, and gone when its holder dies."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.conftest import TINY_TRAIN_FLAGS

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


def test_a_second_holder_in_the_same_process_is_refused_and_the_lock_survives(tmp_path):
    lock = RunLock(tmp_path).acquire()
    with pytest.raises(RunLockedError, match="this process"):
        RunLock(tmp_path).acquire()
    # The refusal did not drop the lock (closing a descriptor of the file would have).
    probe = "from patchdiff.training.lock import RunLock; RunLock(__import__('sys').argv[1]).acquire()"
    other = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True)
    assert other.returncode != 0 and "RunLockedError" in other.stderr
    lock.release()
    RunLock(tmp_path).acquire().release()


def children_of(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
def test_kill_9_with_loader_workers_can_be_resumed_at_once(landscapes, tmp_path):
    # The forked DataLoader workers outlive a killed trainer by seconds; they must not hold its lock.
    outdir = tmp_path / "runs"
    cmd = [sys.executable, "-m", "patchdiff", "train", "--data", str(landscapes), "--outdir", str(outdir)]
    cmd += ["--tick", "0.1", "--grid", "0", "--no-progress", *TINY_TRAIN_FLAGS, "--workers", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [*cmd, "--duration", "5", "--checkpoint", "0.01"], env=env, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    workers = []
    try:
        deadline = time.time() + 120
        while not list(outdir.glob("*/state.pt")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()[1]
        workers = children_of(proc.pid)
        proc.kill()
        proc.wait()
        assert any(Path(f"/proc/{w}").exists() for w in workers)  # the workers still live
        (run,) = outdir.iterdir()
        RunLock(run).acquire().release()  # at once, not after the workers have gone
        # The same command with --resume auto continues the run (a shorter duration ends it at once).
        done = subprocess.run(
            [*cmd, "--duration", "0.01", "--resume", "auto"], env=env, capture_output=True, text=True, timeout=120
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert [p.name for p in outdir.iterdir()] == [run.name]
        assert f"resuming {run}" in (run / "log.txt").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError):  # the orphaned workers of the test's own session
            os.killpg(proc.pid, signal.SIGKILL)
