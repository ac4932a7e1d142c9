"""Set-up checks and resuming: a resumed run keeps every saved setting unless its flag is given."""

from __future__ import annotations

import dataclasses
import json

import pytest
from tests.conftest import TINY_TRAIN_FLAGS, tiny_config

from patchdiff.cli import main
from patchdiff.config import PatchConfig
from patchdiff.patching import StepPlan, resolve_schedule
from patchdiff.training.setup import check_config, merge_resumed, phases_on_resume


def test_merge_resumed_takes_only_the_given_settings():
    saved = tiny_config("d", "o", duration_kimg=0.2, tick_kimg=0.1, lr=2e-3)
    given = tiny_config("d", "o", duration_kimg=200_000.0, tick_kimg=50.0, lr=1e-3)
    cfg, changes = merge_resumed(saved, given, {"lr", "network.dropout"})
    assert cfg.duration_kimg == 0.2 and cfg.tick_kimg == 0.1 and cfg.lr == 1e-3
    assert changes == ["lr: 0.002 -> 0.001"]
    wider = tiny_config("d", "o", network=saved.network.__class__(model_channels=16))
    with pytest.raises(ValueError, match=r"network\.model_channels is 16 on the command line but 8"):
        merge_resumed(saved, wider, {"network.model_channels"})
    check_config(saved)


def test_progressive_phases_stay_put_when_the_duration_changes():
    schedule = resolve_schedule(PatchConfig(schedule="progressive"), (64, 64))
    per_step = (32, 16, 8)
    first = StepPlan(schedule, 0, per_step, 10_000)
    longer = StepPlan(schedule, 0, per_step, 20_000, tuple(first.phase_bounds))
    assert longer.phase_bounds[:2] == first.phase_bounds[:2]
    assert longer.phase_bounds[2] > first.phase_bounds[2] and longer.nimg(longer.total_steps) >= 20_000
    assert [longer.nimg(s) for s in range(first.total_steps)] == [
        first.nimg(s) for s in range(first.total_steps)
    ]
    # Without saved bounds a longer run would move every phase.
    assert StepPlan(schedule, 0, per_step, 20_000).phase_bounds[0] != first.phase_bounds[0]


def test_a_resumed_command_line_keeps_the_saved_settings(landscapes, tmp_path, capsys):
    outdir = tmp_path / "runs"
    base = ["train", "--data", str(landscapes), "--outdir", str(outdir), "--no-progress", "--grid", "0"]
    base += TINY_TRAIN_FLAGS
    first = ["--duration", "0.05", "--tick", "0.05", "--patch-schedule", "progressive", "--lr", "0.003"]
    assert main([*base, *first]) == 0
    (run,) = outdir.iterdir()
    capsys.readouterr()
    # Without flags: the effective config is the saved one (not the CLI defaults of 200000 kimg etc.).
    assert main([*base, "--resume", "auto", "--dry-run"]) == 0
    out = capsys.readouterr().out
    cfg = json.loads(out[out.index("{") : out.rindex("}") + 1])
    assert cfg["duration_kimg"] == 0.05 and cfg["tick_kimg"] == 0.05 and cfg["lr"] == 0.003
    assert cfg["patch"]["schedule"] == "progressive" and "resume:" not in out
    # A flag given now overrides its setting, and the change is logged.
    assert main([*base, "--resume", "auto", "--duration", "0.1"]) == 0
    log = (run / "log.txt").read_text()
    assert "resume: duration_kimg: 0.05 -> 0.1 (from the command line)" in log
    saved = json.loads((run / "config.json").read_text())
    assert saved["duration_kimg"] == 0.1 and saved["tick_kimg"] == 0.05 and saved["lr"] == 0.003
    ticks = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert ticks[-1]["kimg"] >= 0.1 and all(t["lr"] <= 0.003 for t in ticks)
    # The network cannot change under a resumed run.
    assert main([*base, "--resume", "auto", "--cbase", "16"]) == 2
    assert "a resumed run keeps its network" in capsys.readouterr().err
    # Nor can what counts its images step by step: kimg, LR ramp, EMA and phases of past steps would jump.
    for flag, value, path in (("--batch", "16", "batch"), ("--seed", "1", "seed")):
        assert main([*base, "--resume", "auto", flag, value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{path} is " in err[0] and "the images seen so far" in err[0], err


def test_patch_probs_apply_to_the_default_sizes(landscapes, tmp_path, capsys):
    args = ["train", "--data", str(landscapes), "--outdir", str(tmp_path), *TINY_TRAIN_FLAGS]
    assert main([*args, "--patch-probs", "0.1,0.1,0.8", "--dry-run"]) == 0
    assert "crop sizes (4, 8, 16) p=(0.1, 0.1, 0.8)" in capsys.readouterr().out


def test_a_longer_resumed_progressive_run_says_its_phases_stay_and_can_replan(
    landscapes, tmp_path, monkeypatch
):
    import signal

    from patchdiff.training import run as run_module
    from patchdiff.training.loop import train
    from patchdiff.training.setup import prepare
    from patchdiff.training.signals import RunInterruptedError

    cfg = tiny_config(
        str(landscapes), str(tmp_path), patch=PatchConfig(schedule="progressive"), duration_kimg=1.0,
        tick_kimg=1.0, snap_ticks=0,
    )  # fmt: skip
    step = run_module.Run.step

    def stop_after_two(self):  # as if SIGTERM came at step 2
        step(self)
        if self.at_step == 2:
            self.stop.signum = signal.SIGTERM

    monkeypatch.setattr(run_module.Run, "step", stop_after_two)
    with pytest.raises(RunInterruptedError):
        train(cfg, progress=False, grid=0)
    longer = dataclasses.replace(cfg, duration_kimg=2.0)
    kept = prepare(longer, "auto", 1, {"duration_kimg"})
    saved = json.loads(kept.state["counters"])["phase_bounds"]
    fresh = prepare(dataclasses.replace(longer, outdir=str(tmp_path / "new")), None, 1).plan.phase_bounds
    assert kept.plan.phase_bounds[:-1] == saved[:-1] != fresh[:-1]
    (note,) = kept.notes
    assert f"keep their boundaries at steps {saved[:-1]}" in note and "--replan" in note
    replanned = prepare(longer, "auto", 1, {"duration_kimg"}, replan=True)
    assert replanned.plan.phase_bounds == fresh  # no boundary was reached at step 2: all move
    assert replanned.notes == (
        f"--replan: progressive phase boundaries {saved[:-1]} -> {fresh[:-1]} (steps; now at step 2)",
    )
    # A boundary already passed stays where it was: moving it would recount the images of past steps.
    assert phases_on_resume([10, 20, 30], [20, 40, 60], 15, True)[0] == (10, 40, 0)
