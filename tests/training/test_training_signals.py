"""A stop signal writes the state at the next step and exits with one line and 128 + signal number."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from tests.conftest import TINY_TRAIN_FLAGS

from patchdiff.training.checkpoint import load_state


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_stop_signal_saves_the_state_and_the_run_resumes(landscapes, tmp_path, sig):
    outdir = tmp_path / "runs"
    cmd = [sys.executable, "-m", "patchdiff", "train", "--data", str(landscapes), "--outdir", str(outdir)]
    cmd += ["--duration", "0.3", "--tick", "0.1", "--grid", "0", "--no-progress", *TINY_TRAIN_FLAGS]
    env = dict(os.environ, OMP_NUM_THREADS="1", PATCHDIFF_TRACE_SIZES=str(tmp_path))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "sizes-0.txt").is_file() and time.time() < deadline:  # training has begun
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"stopped by {signal.Signals(sig).name} at step" in lines[0] and "--resume" in lines[0]
    (run,) = outdir.iterdir()
    step = json.loads(load_state(run / "state.pt")["counters"])["step"]
    assert f"at step {step};" in lines[0] and step > 0
    # The same command plus --resume finishes the run.
    done = subprocess.run([*cmd, "--resume", str(run)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(load_state(run / "state.pt")["counters"])["step"] > step


def start_training(landscapes, tmp_path, *flags):
    """`patchdiff train` in its own session (process group), once it has taken its first step."""
    outdir = tmp_path / "runs"
    cmd = [sys.executable, "-m", "patchdiff", "train", "--data", str(landscapes), "--outdir", str(outdir)]
    cmd += ["--duration", "5", "--tick", "0.1", "--grid", "0", "--no-progress", *TINY_TRAIN_FLAGS, *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", PATCHDIFF_TRACE_SIZES=str(tmp_path))
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.time() + 120
    while not (tmp_path / "sizes-0.txt").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[1]
    return proc, cmd, env, outdir


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers_saves_the_state(landscapes, tmp_path):
    # Slurm preemption (and `kill -TERM -PGID`) signals the workers too: they must leave it to the trainer.
    proc, *_, outdir = start_training(landscapes, tmp_path, "--workers", "2")
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err, err
    (run,) = outdir.iterdir()
    assert json.loads(load_state(run / "state.pt")["counters"])["step"] > 0
