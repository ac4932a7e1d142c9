"""Bad `patchdiff train` inputs: one clear line naming the problem, exit code 2, no traceback, and no
half-made run directory left behind."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from tests.conftest import TINY_TRAIN_FLAGS

from patchdiff import snapshot
from patchdiff.cli import main
from patchdiff.training import checkpoint
from patchdiff.training.lock import RunLock


def train_args(data, outdir, *extra):
    flags = ["--data", str(data), "--outdir", str(outdir), "--no-progress", "--grid", "0"]
    return ["train", *flags, *TINY_TRAIN_FLAGS, *extra]


def make_state(run_dir, kind):
    """A run directory whose state.pt is broken in the given way."""
    run_dir.mkdir(parents=True)
    path = run_dir / "state.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        torch.save({"config": "{}", "w": torch.ones(1000)}, path)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "wrong keys":
        torch.save({"weights": torch.ones(2)}, path)
    elif kind == "code":
        torch.save({"config": print}, path)
    return path


CASES = [
    # (flags, a piece of the expected message)
    (["--duration", "0"], "--duration 0.0: must be a finite number > 0"),
    (["--duration", "-1"], "--duration -1.0: must be"),
    (["--duration", "nan"], "--duration nan: must be"),
    (["--lr", "inf"], "--lr inf: must be a finite number > 0"),
    (["--lr", "0"], "--lr 0.0: must be"),
    (["--tick", "0"], "--tick 0.0: must be"),
    (["--batch", "0"], "--batch 0: must be"),
    (["--workers", "-1"], "--workers -1: must be a finite number >= 0"),
    (["--checkpoint", "-2"], "--checkpoint -2.0"),
    (["--patch-probs", "0.5,0.5"], "--patch-probs 0.5,0.5 gives 2 probabilities for the 3 default sizes"),
    (["--finish-full", "1.5"], "--finish-full 1.5 must lie in [0, 1)"),
    (["--noise-bands", "--patch-schedule", "full"], "--noise-bands needs --patch-schedule stochastic"),
    (["--resume", "{tmp}/nowhere"], "no training state at"),
]
if not torch.cuda.is_available():
    CASES.append((["--device", "cuda"], "--device cuda: CUDA is not available"))
CASES.append((["--device", "toaster"], "--device 'toaster': not a device"))


def check_refused(capsys, code, expected, outdir, also=""):
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("patchdiff train: error:"), err
    assert expected in lines[0] and also in lines[0], lines[0]
    assert "Traceback" not in out + err
    runs = [p for p in outdir.iterdir() if p.is_dir()] if outdir.is_dir() else []
    assert not runs, runs


@pytest.mark.parametrize("flags,expected", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_flags_are_refused_before_anything_is_written(landscapes, tmp_path, capsys, flags, expected):
    outdir = tmp_path / "runs"
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    check_refused(capsys, main(train_args(landscapes, outdir, *flags)), expected, outdir)


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("empty", "state.pt is damaged or not a training state"),
        ("truncated", "state.pt is damaged or not a training state"),
        ("wrong keys", "state.pt is not a patchdiff training state: it lacks config"),
        ("code", "state.pt is not a patchdiff training state (it holds code, refused)"),
    ],
)
def test_broken_states_are_named(landscapes, tmp_path, capsys, kind, expected):
    outdir = tmp_path / "runs"
    path = make_state(outdir / "00000-x", kind)
    code = main(train_args(landscapes, outdir, "--resume", "auto"))
    check_refused(capsys, code, f"{path} ", outdir / "00000-x" / "none", expected)
    assert sorted(p.name for p in (outdir / "00000-x").iterdir()) == ["run.lock", "state.pt"]


@pytest.mark.parametrize("where", ["a file", "under a file", "unwritable"])
def test_bad_outdirs(landscapes, tmp_path, capsys, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    outdir = {"a file": blocker, "under a file": blocker / "runs", "unwritable": "/proc/patchdiff-runs"}[
        where
    ]
    code = main(train_args(landscapes, outdir))
    expected = "is not writable" if where == "unwritable" else "is a file, not a folder"
    _, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert expected in err and "--outdir" in err


def test_a_locked_run_is_refused_with_its_holder(landscapes, tmp_path, capsys):
    outdir = tmp_path / "runs"
    assert main(train_args(landscapes, outdir, "--duration", "0.02", "--tick", "0.02")) == 0
    (run,) = outdir.iterdir()
    before = (run / "state.pt").read_bytes()
    capsys.readouterr()
    lock = RunLock(run).acquire()  # another process holds the run (a second open file conflicts too)
    try:
        code = main(train_args(landscapes, outdir, "--resume", "auto", "--duration", "0.05"))
    finally:
        lock.release()
    _, err = capsys.readouterr()
    assert code == 2 and "is in use by pid" in err and "Traceback" not in err, err
    assert (run / "state.pt").read_bytes() == before


def test_disk_full_while_writing_the_state_keeps_the_previous_one(landscapes, tmp_path, capsys, monkeypatch):
    outdir = tmp_path / "runs"
    assert main(train_args(landscapes, outdir, "--duration", "0.02", "--tick", "0.02")) == 0
    (run,) = outdir.iterdir()
    before = (run / "state.pt").read_bytes()
    capsys.readouterr()

    def disk_full(obj, f):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    code = main(
        train_args(landscapes, outdir, "--resume", "auto", "--duration", "0.05", "--checkpoint", "0.01")
    )
    _, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "No space left on device; the previous state is kept" in err and "state.pt" in err
    assert (run / "state.pt").read_bytes() == before and not list(run.glob(".*.tmp"))
    steps = [json.loads(line)["step"] for line in (run / "stats.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)


def test_a_missing_data_set_is_named_as_missing(landscapes, tmp_path, capsys):
    outdir = tmp_path / "runs"
    code = main(train_args(tmp_path / "gone", outdir))
    check_refused(capsys, code, f"dataset {tmp_path / 'gone'} does not exist", outdir)
    assert "cannot write" not in capsys.readouterr().err
    # The same when a resumed run's data set has gone.
    assert main(train_args(landscapes, outdir, "--duration", "0.02", "--tick", "0.02")) == 0
    capsys.readouterr()
    code = main(train_args(tmp_path / "gone", outdir, "--resume", "auto"))
    _, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot write" not in err, err
    assert f"dataset {tmp_path / 'gone'} does not exist" in err


def test_disk_full_while_writing_a_snapshot_is_one_line(landscapes, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    def disk_full(tensors, path, metadata=None):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(snapshot, "save_file", disk_full)
    outdir = tmp_path / "runs"
    code = main(train_args(landscapes, outdir, "--duration", "0.02", "--tick", "0.02"))
    _, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "could not write the snapshot" in err and "StorageFull" in err
    assert "the training state was not written yet" in err
