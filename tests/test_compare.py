import json
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import TINY_TRAIN_FLAGS

from patchdiff.compare import load_study
from patchdiff.compare.results import results_table


def write_study(path, landscapes, detector, **overrides):
    study = dict(
        data=str(landscapes),
        base_flags=[*TINY_TRAIN_FLAGS, "--lr", "2e-3", "--dropout", "0"],
        configs=[
            {"name": "full", "flags": ["--patch-schedule", "full"]},
            {"name": "patch", "flags": ["--patch-schedule", "stochastic"]},
        ],
        budget_kimg=0.1,
        budget_of="full",
        points=2,
        metrics=["fid", "kid"],
        metric_num=16,
        detector=detector,
        grid=4,
    )
    study.update(overrides)
    path.write_text(json.dumps(study))
    return path


def compare_cmd(study, outdir):
    return [
        sys.executable,
        "-m",
        "patchdiff",
        "compare",
        str(study),
        "--outdir",
        str(outdir),
        "--no-progress",
    ]


def compare(study, outdir):
    return subprocess.run(compare_cmd(study, outdir), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_tiny_study_writes_table_and_plots_and_does_not_retrain(tmp_path, landscapes, tiny_detector):
    study = write_study(
        tmp_path / "study.json",
        landscapes,
        tiny_detector,
        heldout=str(landscapes),
        heldout_num=8,
        memorisation=4,
        nn_rows=2,
    )
    out = tmp_path / "out"
    first = compare(study, out)
    assert first.returncode == 0, first.stderr
    plan = json.loads((out / "plan.json").read_text())
    # Equal FLOPs: the patch schedule's images are cheaper, so it trains for more kimg.
    assert plan["full"]["kimg"] == pytest.approx(0.1)
    assert plan["patch"]["kimg"] > 0.1
    for name in ("full", "patch"):
        p = plan[name]
        assert p["kimg"] * 1000 * p["flops_per_image"] == pytest.approx(plan["full"]["budget_flops"])
    table = (out / "results.md").read_text()
    assert "| full |" in table and "| patch |" in table
    assert "Held-out loss on whole images by noise level" in table and "| 80 |" in table
    assert "Memorisation at the last snapshot" in table and (out / "nearest-patch.png").is_file()
    for png in ("fid-vs-kimg.png", "fid-vs-time.png", "fid-vs-flops.png", "grids.png", "loss-vs-sigma.png"):
        assert (out / png).stat().st_size > 1000
    for name in ("full", "patch"):
        result = json.loads((out / "runs" / name / "result.json").read_text())
        lines = open(f"{result['run_dir']}/stats.jsonl").read().splitlines()  # noqa: SIM115
        stats = [json.loads(line) for line in lines]
        fids = [r["fid"] for r in stats if r["kind"] == "metrics"]
        assert len(fids) == 2  # `points` evaluations, the last at the end of training
        assert all(f == f and f >= 0 for f in fids)
        assert f"{fids[-1]:.2f}" in table
        by_sigma = result["sigma_loss"]
        assert by_sigma["num"] == 8 and len(by_sigma["loss"]) == len(by_sigma["sigmas"]) == 9
        assert all(0 < v < 100 for v in by_sigma["loss"])

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".jsonl", ".safetensors")}
    second = compare(study, out)
    assert second.returncode == 0, second.stderr
    assert "training" not in second.stdout
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}
    assert (out / "runs" / "full" / "train.log").read_text().count("$ ") == 1

    (out / "results.md").unlink()
    redraw = subprocess.run([*compare_cmd(study, out), "--results-only"], capture_output=True, text=True)
    assert redraw.returncode == 0 and "| patch |" in (out / "results.md").read_text()

    # A configuration without its result (an interrupted run) resumes from its training state.
    (out / "runs" / "patch" / "result.json").unlink()
    third = compare(study, out)
    assert third.returncode == 0, third.stderr
    log = (out / "runs" / "patch" / "train.log").read_text()
    commands = [line for line in log.splitlines() if line.startswith("$ ")]
    assert len(commands) == 2 and "--resume" not in commands[0] and "--resume" in commands[1]


def test_study_file_errors_name_the_problem(tmp_path, landscapes, tiny_detector):
    path = tmp_path / "s.json"
    write_study(path, landscapes, tiny_detector, base_flags=["--duration", "5"])
    with pytest.raises(ValueError, match="base_flags sets --duration, which the study runner sets itself"):
        load_study(path)
    write_study(path, landscapes, tiny_detector, budget_flops=1e9)
    with pytest.raises(ValueError, match="exactly one of budget_flops or budget_kimg"):
        load_study(path)
    write_study(path, landscapes, tiny_detector, budget_of="nope")
    with pytest.raises(ValueError, match="budget_of 'nope'"):
        load_study(path)
    write_study(path, landscapes, tiny_detector, configs=[{"name": "a"}, {"name": "a"}])
    with pytest.raises(ValueError, match="must be unique"):
        load_study(path)
    write_study(path, landscapes, tiny_detector, colour="red")
    with pytest.raises(ValueError, match="unknown StudyConfig fields"):
        load_study(path)
    write_study(path, tmp_path / "missing", tiny_detector)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_study(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_study(path)


def test_cli_reports_a_bad_study_in_one_line(tmp_path, landscapes, tiny_detector):
    path = write_study(tmp_path / "s.json", landscapes, tiny_detector, points=0)
    proc = compare(path, tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"patchdiff compare: error: {path}: points 0 must be at least 1 (and a configuration's >= 0)"
    ]


def test_results_table_rows():
    row = dict(
        name="full",
        flags=["--patch-schedule", "full"],
        kimg=1.5,
        flops_per_image=2e9,
        flops=3e12,
        train_s=30.0,
        wall_s=200.0,
        fid=12.345,
        fid_std=float("nan"),
        kid=0.01,
        kid_std=0.002,
    )
    table = results_table([row])
    assert (
        "| full | `--patch-schedule full` | 1.50 | 2 G | 3 T | 30 s | 3.3 min | 12.35 | 0.0100 ± 0.0020 |"
        in table
    )


def test_loss_by_sigma_closed_forms():
    """D(x) = y scores 0; D(x) = x leaves the noise: lambda(sigma) * sigma^2 at each sigma."""
    import torch

    from patchdiff.compare.sigma_loss import loss_by_sigma
    from patchdiff.loss import loss_weight

    y = torch.rand(64, 1, 8, 8) * 2 - 1

    class Fixed(torch.nn.Module):
        def __init__(self, clean):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.clean = clean

        def forward(self, x, sigma, coords, labels):
            return y[: len(x)] if self.clean else x

    assert loss_by_sigma(Fixed(True), y, (0.1, 1.0), batch=64) == [0.0, 0.0]
    sigmas = (0.1, 1.0, 10.0)
    losses = loss_by_sigma(Fixed(False), y, sigmas, batch=64)
    for sigma, loss in zip(sigmas, losses, strict=True):
        expected = float(loss_weight(torch.tensor(sigma))) * sigma**2
        assert loss == pytest.approx(expected, rel=0.03)
    # Seeded: the same noise for every model scored.
    assert loss_by_sigma(Fixed(False), y, sigmas, batch=64) == losses


def test_an_interrupted_configuration_resumes_from_the_state_training_would(
    tmp_path, landscapes, tiny_detector, monkeypatch
):
    import torch
    from tqdm import tqdm

    from patchdiff.compare import study as study_module
    from patchdiff.training.checkpoint import save_state

    study = load_study(write_study(tmp_path / "study.json", landscapes, tiny_detector))
    run_out = tmp_path / "runs" / "full"
    run_dir = run_out / "00000-landscapes"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")
    save_state(run_dir / "state.pt.prev", dict(w=torch.zeros(1)))  # a crash fell between the two renames
    commands = []

    class Finished:  # stands in for the training process
        returncode = 0

        def __init__(self, cmd, **kwargs):
            commands.append(cmd)

        def poll(self):
            return 0

    monkeypatch.setattr(study_module.subprocess, "Popen", Finished)
    entry = dict(kimg=0.1, budget_flops=1e9, flops_per_image=1e4)
    study_module.train_one(study, study.configs[0], entry, run_out, tqdm(disable=True))
    assert commands[0][-2:] == ["--resume", str(run_dir)]  # not a fresh start


def test_loss_by_sigma_scores_a_vp_model_as_it_is_trained():
    """An epsilon model is scored at its own timesteps with the plain epsilon MSE (1 / sigma^2): a network
    that predicts no noise has epsilon loss 1 at every level, where EDM's lambda would give 1 + 4 sigma^2."""
    import torch

    from patchdiff.compare.sigma_loss import loss_by_sigma
    from patchdiff.precond_vp import VPDenoiser, vp_alphas_cumprod

    class Zero(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(()))  # the scorer reads the device from it

        def forward(self, x, t, labels=None):
            return torch.zeros_like(x)

    D = VPDenoiser(Zero(), "epsilon", vp_alphas_cumprod("scaled_linear", 0.00085, 0.012), use_coords=False)
    y = torch.zeros(64, 1, 8, 8)
    losses = loss_by_sigma(D, y, (0.5, 5.0), batch=64)
    assert losses == pytest.approx([1.0, 1.0], rel=0.05)


def test_planning_resolves_the_flags_in_process(tmp_path, landscapes, tiny_detector, monkeypatch):
    """plan_study resolves each configuration with the library (training/flags.py), as `patchdiff train
    --dry-run` would, without starting a process; a configuration with bad flags is named."""
    from patchdiff.compare import study as study_module

    def no_process(*args, **kwargs):
        raise AssertionError("planning started a process")

    monkeypatch.setattr(study_module.subprocess, "run", no_process)
    monkeypatch.setattr(study_module.subprocess, "Popen", no_process)
    study = load_study(write_study(tmp_path / "study.json", landscapes, tiny_detector))
    (tmp_path / "out" / "runs").mkdir(parents=True)  # as run_study makes it
    plan = study_module.plan_study(study, tmp_path / "out")
    assert plan["full"]["kimg"] == pytest.approx(0.1) and plan["patch"]["kimg"] > 0.1
    bad = dict(name="bad", flags=["--arch", "foo"])
    study = load_study(
        write_study(tmp_path / "bad.json", landscapes, tiny_detector, configs=[bad], budget_of="bad")
    )
    with pytest.raises(
        ValueError, match="configuration 'bad': `patchdiff train` rejects its flags: argument --arch"
    ):
        study_module.plan_study(study, tmp_path / "out")


STUDY_FILES = Path(__file__).resolve().parents[1] / "docs" / "studies"


@pytest.mark.parametrize("name", sorted(p.name for p in STUDY_FILES.glob("study-*.json")))
def test_the_study_files_of_docs_evidence_load(tmp_path, name):
    # docs/studies/ holds the study files docs/evidence.md cites; they must stay loadable as the format
    # and the training flags evolve. Their data sets are placeholders here (only their existence is checked).
    from patchdiff.training.flags import config_from_argv

    source = STUDY_FILES / name
    data = json.loads(source.read_text())
    for key in ("data", "heldout", "metric_ref", "detector"):
        if data.get(key):  # an empty placeholder in tmp_path, never at the file's own (maybe absolute) path
            data[key] = str(tmp_path / f"{key}-{Path(data[key]).name}")
            Path(data[key]).write_bytes(b"")
    (tmp_path / name).write_text(json.dumps(data))
    study = load_study(tmp_path / name)
    assert study.budget_flops > 0 and study.configs
    for run in study.configs:
        argv = ["--data", study.data, "--outdir", str(tmp_path / "runs"), *study.base_flags, *run.flags]
        cfg, _ = config_from_argv(argv, resolve=False)
        assert cfg.seed in (0, 1)
