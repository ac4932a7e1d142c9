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
