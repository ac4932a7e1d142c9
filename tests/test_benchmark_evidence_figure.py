"""The evidence figure places each FID at the run's logged cumulative FLOPs, not kimg x average cost."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "evidence_figure.py"


def load_script():
    spec = importlib.util.spec_from_file_location("evidence_figure", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finished_configuration(tmp_path: Path, metric_lines: list[dict]) -> Path:
    """A study's configuration folder as `patchdiff compare` leaves it: result.json and the run folder."""
    config_dir = tmp_path / "runs" / "progressive"
    run_dir = config_dir / "00000-run"
    run_dir.mkdir(parents=True)
    lines = [{"kind": "metrics", **m} for m in metric_lines]
    (run_dir / "stats.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    # run_dir is recorded relative to where the study ran; the figure takes only its name.
    result = {"run_dir": "elsewhere/runs/progressive/00000-run", "flops_per_image": 1e9}
    (config_dir / "result.json").write_text(json.dumps(result))
    return config_dir


def test_points_use_logged_cumulative_flops(tmp_path):
    # A crop-first run: its first 10 kimg cost 0.2e9 each, so it reaches 2e12 FLOPs at 10 kimg where
    # kimg x average cost (1e9) would say 1e13.
    config_dir = finished_configuration(
        tmp_path,
        [
            {"kimg": 10.0, "flops": 2e12, "fid": 90.0, "kid": 0.08},
            {"kimg": 20.0, "flops": 2e13, "fid": 50.0, "kid": 0.04},
        ],
    )
    pts = load_script().points(config_dir)
    assert [p[1] for p in pts] == pytest.approx([2e12, 2e13])
    assert [p[2] for p in pts] == [90.0, 50.0]
    assert [p[3] for p in pts] == [0.08, 0.04]


def test_points_fall_back_to_kimg_times_cost_without_logged_flops(tmp_path):
    # Runs from before FLOPs were logged keep the estimate.
    config_dir = finished_configuration(
        tmp_path, [{"kimg": 10.0, "fid": 90.0}, {"kimg": 20.0, "flops": 2.5e13, "fid": 50.0}]
    )
    pts = load_script().points(config_dir)
    assert [p[1] for p in pts] == pytest.approx([1e13, 2.5e13])


def test_main_writes_a_png(tmp_path, capsys):
    config_dir = finished_configuration(tmp_path, [{"kimg": 10.0, "flops": 2e12, "fid": 90.0}])
    out = tmp_path / "figure.png"
    load_script().main(["--out", str(out), "--budget", "1e12", "--series", f"progressive={config_dir}"])
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert " 2.00x  FID   90.00" in capsys.readouterr().out


def test_table_series_from_recorded_numbers(tmp_path, capsys):
    table = tmp_path / "points.csv"
    table.write_text('label,compute,fid\n"whole, seed 0",3,83.5\n"whole, seed 0",1,161.8\nfixed,3,82.8\n')
    module = load_script()
    assert module.table_series(table) == {
        "whole, seed 0": [(3.0, 83.5), (1.0, 161.8)],
        "fixed": [(3.0, 82.8)],
    }
    out = tmp_path / "figure.png"
    module.main(["--out", str(out), "--budget", "1e12", "--table", str(table)])
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert " 3.00x  FID   82.80" in capsys.readouterr().out


def test_table_errors_name_the_file_and_line(tmp_path):
    table = tmp_path / "points.csv"
    table.write_text("label,budget,fid\nwhole,1,160\n")
    with pytest.raises(SystemExit, match="needs the columns label, compute, fid"):
        load_script().table_series(table)
    table.write_text("label,compute,fid\nwhole,1,n/a\n")
    with pytest.raises(SystemExit, match="line 2: compute and fid must be numbers"):
        load_script().table_series(table)
    with pytest.raises(SystemExit):
        load_script().main(["--out", str(tmp_path / "f.png"), "--budget", "1e12"])  # neither source
