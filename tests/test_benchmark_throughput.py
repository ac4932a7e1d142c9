"""The throughput benchmark runs end to end at a tiny size and ends with the ratio line."""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
TINY = ["--resolution", "16", "--cbase", "8", "--cres", "1,2", "--attn", "8", "--batch", "4"]


def load_script():
    spec = importlib.util.spec_from_file_location("benchmark_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_tiny_run_prints_a_positive_ratio_last():
    # A subprocess: its own torch thread setting, and the __main__ path of the script is covered too.
    cmd = [sys.executable, str(SCRIPT), *TINY, "--steps", "4", "--block", "2", "--warmup", "0"]
    cmd += ["--profile-steps", "1", "--no-memory", "--threads", "1", "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    match = re.fullmatch(r"patch/full throughput ratio: (\d+\.\d{2})", lines[-1])
    assert match, lines[-1]
    ratio = float(match.group(1))
    assert math.isfinite(ratio) and ratio > 0
    rows = [line.split() for line in lines]
    table = {r[0]: r for r in rows if len(r) > 2 and r[0] in ("full", "patch") and r[1].isdigit()}
    # 4 timed steps each; a full step loads the batch, a patch step at least the batch.
    assert table["full"][1:3] == ["4", "16"]
    assert table["patch"][1] == "4" and int(table["patch"][2]) >= 16
    assert any("ideal ratio if cost followed pixels 2.71" in line for line in lines)
    # The profile prints the loader's images/s (the same for every crop: it loads full images) next to
    # each crop size's step images/s.
    profile = [r for r in rows if len(r) == 7 and re.fullmatch(r"\d+x\d+", r[0])]
    assert [r[0] for r in profile] == ["4x4", "8x8", "16x16"]
    loader = {float(r[5]) for r in profile}
    assert len(loader) == 1 and loader.pop() > 0
    for r in profile:
        assert float(r[6]) == pytest.approx(float(r[5]) / float(r[3]), rel=0.02)


def test_bad_flags_are_value_errors():
    script = load_script()
    with pytest.raises(ValueError, match="--steps"):
        script.main([*TINY, "--steps", "0"])
    with pytest.raises(ValueError, match="--real-p"):
        script.main([*TINY, "--real-p", "1.5"])
    with pytest.raises(ValueError, match="patch size 4 is not a multiple of 8"):
        script.main(["--resolution", "16", "--cres", "1,2,2,2"])


def test_ideal_ratio_is_the_papers_2_71():
    script = load_script()
    from patchdiff.config import PatchConfig
    from patchdiff.patching import resolve_schedule

    schedule = resolve_schedule(PatchConfig(schedule="stochastic"), (64, 64), 8)
    images, pixels, ratio = script.ideal_ratio(schedule, 8)
    assert images == pytest.approx(1.9)
    assert pixels == pytest.approx(0.7)
    assert ratio == pytest.approx(1.9 / 0.7)


def test_dit_backbone_runs_and_reports_its_tokens():
    dit = ["--arch", "dit", "--resolution", "16", "--depth", "1", "--width", "32", "--heads", "2"]
    cmd = [sys.executable, str(SCRIPT), *dit, "--batch", "4", "--steps", "2", "--block", "2", "--warmup", "0"]
    cmd += ["--profile-steps", "0", "--no-memory", "--threads", "1", "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("dit R=16x3 depth=1 width=32 heads=2 p=2 (64 tokens)")
    assert re.fullmatch(r"patch/full throughput ratio: \d+\.\d{2}", lines[-1])
