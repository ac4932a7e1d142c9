"""A study's post-hoc EMA sweep: configurations with stored profiles are scored at each sigma_rel at
their final snapshot and the best is reported in results.md; the study key is checked."""

import json

import pytest
from tests.test_compare import write_study
from tests.training.test_training_posthoc_ema import edm2_config

from patchdiff.cli import main
from patchdiff.compare import load_study, write_results
from patchdiff.compare.posthoc_ema import SWEEP_KEY, ensure_sigma_rel_sweeps, sigma_rel_table
from patchdiff.training import loop
from patchdiff.training.posthoc_ema import sweep_sigma_rel


def test_sweep_scores_configurations_with_profiles_and_reports_the_best(
    tmp_path, landscapes, tiny_detector, tiny_run, capsys
):
    ref = tmp_path / "ref.npz"
    det = ["--detector", tiny_detector, "--workers", "0", "--no-progress", "--device", "cpu"]
    assert main(["fid", "ref", "--data", str(landscapes), "--dest", str(ref), *det]) == 0
    study = load_study(
        write_study(
            tmp_path / "study.json",
            landscapes,
            tiny_detector,
            metrics=["fid"],
            metric_num=4,
            metric_ref=str(ref),
            sigma_rel=[0.05, 0.2],
        )
    )
    assert study.sigma_rel == (0.05, 0.2)
    run = loop.train(edm2_config(landscapes, tmp_path / "edm2", duration_kimg=0.2), progress=False, grid=0)
    out = tmp_path / "out"
    for name in ("edm2", "ddpm"):
        (out / "runs" / name).mkdir(parents=True)
    results = {"edm2": {"run_dir": str(run)}, "ddpm": {"run_dir": str(tiny_run)}}  # ddpm: no profiles

    swept = ensure_sigma_rel_sweeps(results, study, out)
    assert SWEEP_KEY not in swept["ddpm"]
    sweep = swept["edm2"][SWEEP_KEY]
    # The same numbers as the sweep API with the default sampler on seeds 0..3.
    rows = sweep_sigma_rel(["fid"], run, [0.05, 0.2], ref, 4, tiny_detector, 64, device="cpu")
    assert [r["fid"] for r in sweep["rows"]] == pytest.approx([r["fid"] for r in rows])
    assert sweep["best"] == min(rows, key=lambda r: r["fid"])["sigma_rel"] and sweep["num"] == 4
    stored = json.loads((out / "runs" / "edm2" / "result.json").read_text())
    assert stored[SWEEP_KEY]["sigma_rels"] == [0.05, 0.2]

    # results.md's table: one row per swept configuration, the best in bold.
    table = sigma_rel_table(swept)
    assert "| edm2 |" in table and "| ddpm |" not in table
    assert f"**{min(r['fid'] for r in rows):.2f}**" in table
    plan = dict(kimg=0.2, flops=1e9, flops_per_image=5e6, wall_s=1.0)
    write_results({k: dict(r, **plan) for k, r in swept.items()}, out, 1e9)
    assert "Post-hoc EMA at the last snapshot, by sigma_rel" in (out / "results.md").read_text()
    # A finished sweep is not scored again.
    swept["edm2"][SWEEP_KEY]["rows"][0]["fid"] = -1.0
    assert ensure_sigma_rel_sweeps(swept, study, out)["edm2"][SWEEP_KEY]["rows"][0]["fid"] == -1.0


def test_sigma_rel_study_key_is_checked(tmp_path, landscapes, tiny_detector):
    path = tmp_path / "s.json"
    write_study(path, landscapes, tiny_detector, sigma_rel=[0.1, 0.5])
    with pytest.raises(ValueError, match=r"sigma_rel: sigma_rel 0\.5 must be in"):
        load_study(path)
    write_study(path, landscapes, tiny_detector, sigma_rel=[0.1], metrics=[])
    with pytest.raises(ValueError, match='sigma_rel needs "metrics"'):
        load_study(path)
