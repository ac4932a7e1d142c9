"""The sampling benchmark runs end to end on a tiny model and ends with the time-ratio line."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from patchdiff.metrics.detector import load_detector
from patchdiff.metrics.fid import reference_from_features, save_reference

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sampling.py"


def load_script():
    spec = importlib.util.spec_from_file_location("benchmark_sampling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_tiny_run_prints_the_ratio_last():
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--batch",
        "2",
        "--rounds",
        "2",
        "--threads",
        "1",
        "--configs",
        "euler:4",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    match = re.fullmatch(r"sampling time ratio \(default/heun-18\): (\d+\.\d{2})", lines[-1])
    assert match, lines[-1]
    rows = {
        r.split()[0] + r.split()[1]: r.split() for r in lines if r.split()[0] in ("heun", "euler", "dpmpp-2m")
    }
    assert rows["heun18"][2] == "35" and rows["euler4"][2] == "4"
    assert float(rows["heun18"][4]) == 1.0
    assert 0 < float(match.group(1)) < 1  # fewer network calls than Heun-18 cost less


def test_fid_rows_json_and_plot(tmp_path, tiny_detector, landscapes, capsys):
    from patchdiff.data import ImageDataset

    detector = load_detector(tiny_detector)
    data = ImageDataset(str(landscapes))
    images = torch.stack([torch.as_tensor(data[i][0]) for i in range(len(data))])
    save_reference(reference_from_features(detector(images)), tmp_path / "ref.npz")
    script = load_script()
    args = ["--batch", "4", "--rounds", "1", "--configs", "dpmpp-3m:3", "--fid", "--num", "8"]
    args += ["--ref", str(tmp_path / "ref.npz"), "--detector", tiny_detector]
    args += ["--json", str(tmp_path / "rows.jsonl"), "--plot", str(tmp_path / "fid.png")]
    assert script.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("FID (default/heun-18): ")
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["sampler"] for r in rows][-1] == "dpmpp-3m" and all(
        r["fid"] > 0 and r["num"] == 8 for r in rows
    )
    assert (tmp_path / "fid.png").stat().st_size > 1000


def test_bad_flags_are_value_errors():
    script = load_script()
    with pytest.raises(ValueError, match="--configs 'dpm:3'"):
        script.main(["--configs", "dpm:3"])
    with pytest.raises(ValueError, match="--fid needs --ref"):
        script.main(["--fid"])
