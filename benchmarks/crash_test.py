"""Crash test: kill -9 a tiny training run at random moments, resume it each time, and check that the
final EMA weights are bit-identical to those of an uninterrupted run.

Kill moments cycle through three kinds: during start-up (imports, set-up, run-directory creation),
after a random few steps of training, and while a state or snapshot file is being written (the script
watches the run directory for the temporary files of atomic writes and kills the moment one appears).
Every run passes `--resume auto`, as a job script would. Prints one line per kill (its kind, the step
reached, the step of the state it resumed from, the steps lost), then the totals. Exits 1 on a failed
resume or differing weights. On 2 CPU cores, `--kills 20` takes about three minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

TINY = "--cbase 8 --cres 1,2 --blocks 1 --attn 8 --batch 8 --lr-rampup 0.05 --ema 0.05 --workers 0"
KINDS = ("training", "write", "start-up")


def train_command(data: Path, outdir: Path, duration: float) -> list[str]:
    flags = f"--duration {duration} --tick 0.1 --snap 1 --checkpoint 0.03 --grid 0 --no-progress"
    where = ["--data", str(data), "--outdir", str(outdir)]
    return [
        sys.executable,
        "-m",
        "patchdiff",
        "train",
        *where,
        *flags.split(),
        *TINY.split(),
        "--resume",
        "auto",
    ]


def run_to_end(cmd: list[str], env: dict) -> Path:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"a run failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    return Path(re.search(r"^done: (.+)$", out.stdout, re.M).group(1))


def newest_state_step(outdir: Path) -> int:
    """The step of the state a resume would start from (0 when there is none)."""
    from patchdiff.training.checkpoint import find_resume_state, load_state

    path = find_resume_state("auto", outdir)
    if path is None:
        return 0
    return json.loads(load_state(path)["counters"])["step"]


def steps_reached(trace: Path) -> int:
    lines = trace.read_text().split("\n") if trace.is_file() else []
    steps = [int(line.split()[0]) for line in lines if len(line.split()) == 2]
    return steps[-1] + 1 if steps else 0


def first_step(trace: Path) -> int:
    """The step this invocation started at (the first line of its trace)."""
    lines = trace.read_text().split("\n") if trace.is_file() else []
    return int(lines[0].split()[0]) if lines and len(lines[0].split()) == 2 else 0


def kill_once(cmd: list[str], env: dict, outdir: Path, trace: Path, kind: str, rng: random.Random) -> str:
    """Start a run and kill -9 it at a moment of the given kind; returns "" if it finished first, else
    what the kill hit ("mid-write" when a temporary file of an atomic write existed at the kill).

    Kills are placed by the steps the run is seen to take (its trace), not by the clock: a fast machine
    then gets no further per kill than a slow one, so the run cannot end before the last kill.
    "training" waits for 2-6 new steps, "write" for the next temporary file (at most 8 steps: the
    state is written every ~2), "start-up" for a random 0.5-3 s or the first step, whichever is first."""
    trace.unlink(missing_ok=True)
    stale = set(outdir.glob("*/.*.tmp"))  # left by the previous kill; this run removes them
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120

    def wait(done) -> None:
        while proc.poll() is None and time.time() < deadline and not done():
            time.sleep(0.002)

    if kind == "start-up":
        until = time.time() + rng.uniform(0.5, 3.0)
        wait(lambda: time.time() >= until or trace.is_file())
    else:
        wait(trace.is_file)
        first = first_step(trace)
        if kind == "training":
            target = first + rng.randint(2, 6)
            wait(lambda: steps_reached(trace) >= target)
        else:  # the moment a temporary file of an atomic write appears
            wait(lambda: bool(set(outdir.glob("*/.*.tmp")) - stale) or steps_reached(trace) >= first + 8)
    if proc.poll() is not None:
        if proc.returncode != 0:
            raise SystemExit(f"a resumed run failed (exit {proc.returncode}):\n{proc.stderr.read()[-2000:]}")
        return ""
    mid_write = bool(set(outdir.glob("*/.*.tmp")) - stale)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    return "mid-write" if mid_write else "killed"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20, help="how many times to kill the run")
    p.add_argument("--duration", type=float, default=0.8, help="training length in kimg")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--workdir", help="where data and runs go (default: a temporary folder)")
    args = p.parse_args()
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="crash-test-"))
    from patchdiff.demo import make_landscapes, write_images

    data = write_images(make_landscapes(64, 16, seed=1), work / "data")
    env = dict(os.environ, OMP_NUM_THREADS="1", PATCHDIFF_TRACE_SIZES=str(work))
    trace = work / "sizes-0.txt"

    print(f"uninterrupted run of {args.duration} kimg ...", flush=True)
    reference = run_to_end(train_command(data, work / "reference", args.duration), env)
    cmd = train_command(data, work / "crashed", args.duration)
    outdir = work / "crashed"
    survived, lost, mid_write = 0, [], 0
    for k in range(args.kills):
        kind = KINDS[k % len(KINDS)]
        hit = kill_once(cmd, env, outdir, trace, kind, rng)
        if not hit:
            print(f"kill {k + 1}: the run finished before the kill; stopping early", flush=True)
            break
        reached, resumed_from = steps_reached(trace), newest_state_step(outdir)
        lost.append(max(reached - resumed_from, 0))
        survived += 1
        mid_write += hit == "mid-write"
        print(
            f"kill {k + 1:2d} ({kind:8s}): reached step {reached:3d}, state at step {resumed_from:3d}, "
            f"lost {lost[-1]} steps{' (mid-write)' if hit == 'mid-write' else ''}",
            flush=True,
        )
    final = run_to_end(cmd, env)
    a = load_file(str(sorted(reference.glob("snapshot-*.safetensors"))[-1]))
    b = load_file(str(sorted(final.glob("snapshot-*.safetensors"))[-1]))
    identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"kills survived: {survived}/{args.kills} ({mid_write} while a file was being written)")
    if lost:
        print(f"steps lost per kill: mean {sum(lost) / len(lost):.1f}, max {max(lost)}")
    print(f"final EMA weights bit-identical to the uninterrupted run: {'yes' if identical else 'NO'}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
