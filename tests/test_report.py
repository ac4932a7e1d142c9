import argparse
import base64
import json
import math
import re
import warnings

import numpy as np
import pytest
from PIL import Image

from patchdiff.cli import main, report
from patchdiff.config import TrainConfig, to_dict
from patchdiff.report import (
    crop_mix,
    last_metrics,
    latest_grid,
    local_linear_smooth,
    loss_series,
    metric_names,
    metric_series,
    parse_stats,
    plot_loss,
    read_stats,
    records_of_kind,
    write_report,
)

SIZES = (16, 32, 64)


def _ticks(n: int) -> list[dict]:
    """Cumulative counters as the training loop logs them; the crop mix shifts toward 64 over time."""
    rng = np.random.default_rng(0)
    crops, steps, lines = np.zeros(3, int), np.zeros(3, int), []
    for i in range(1, n + 1):
        new = rng.multinomial(100, [0.3, 0.4, 0.3] if i <= n // 2 else [0.1, 0.2, 0.7])
        crops += new * (4, 2, 1)
        steps += new
        lines.append(
            {
                "kind": "tick", "step": 100 * i, "kimg": 3.2 * i, "time_s": 40.0 * i,
                "loss": float(0.5 * math.exp(-i / n) + 0.01 * rng.random()), "lr": 1e-3,
                "s_per_kimg": 12.5, "steps_per_s": 2.5, "images": int(3200 * i),
                "crops": {str(s): int(c) for s, c in zip(SIZES, crops, strict=True)},
                "steps_by_size": {str(s): int(c) for s, c in zip(SIZES, steps, strict=True)},
                "mem_gb": 1.5, "tflops": 0.25,
            }
        )  # fmt: skip
    return lines


def _metrics(step: int, kimg: float, fid: float, kid: float) -> dict:
    return {"kind": "metrics", "step": step, "kimg": kimg, "time_s": kimg * 12.5, "fid": fid, "kid": kid,
            "kid_std": kid / 10}  # fmt: skip


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "00001-run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(to_dict(TrainConfig(batch=64, duration_kimg=40.0))))
    ticks = _ticks(12)
    ticks[5]["loss"] = float("nan")  # json.dumps writes NaN, as the training loop would
    lines = [json.dumps(t) for t in ticks[:6]]
    lines.append(json.dumps(_metrics(600, 19.2, 80.0, 0.05)))
    lines += [json.dumps(t) for t in ticks[6:]]
    lines.append(json.dumps(_metrics(1200, 38.4, 12.25, 0.004)))
    lines.append(json.dumps(ticks[-1])[:40])  # a crash mid-write
    (run / "stats.jsonl").write_text("\n".join(lines))
    for step, color in ((600, 0), (1200, 255)):
        Image.fromarray(np.full((24, 40, 3), color, np.uint8)).save(run / f"grid-{step:08d}.png")
    (run / "snapshot-00000600.safetensors").write_bytes(b"x")
    (run / "snapshot-00001200.safetensors").write_bytes(b"x")
    return run


def test_read_stats_skips_and_counts_the_broken_line(run_dir):
    with pytest.warns(UserWarning, match="skipped 1 line"):
        stats = read_stats(run_dir)
    assert len(stats) == 14
    assert len(records_of_kind(stats, "tick")) == 12 and len(records_of_kind(stats, "metrics")) == 2
    records, bad = parse_stats('{"kind": "tick", "step": 1}\n\n[1, 2]\n{"kind": "ti\nnot json\n')
    assert (len(records), bad) == (1, 3)


def test_series_keep_nan_loss_and_pick_up_metrics(run_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = read_stats(run_dir)
    kimg, loss = loss_series(stats)
    assert len(kimg) == 12 and np.isnan(loss[5]) and np.isfinite(np.delete(loss, 5)).all()
    assert metric_names(stats) == ["fid", "kid"]
    kid = metric_series(stats, "kid")
    np.testing.assert_allclose(kid.value, [0.05, 0.004])
    np.testing.assert_allclose(kid.std, [0.005, 0.0004])
    assert metric_series(stats, "fid").std is None
    assert last_metrics(stats)["fid"]["fid"] == 12.25


def test_resumed_run_supersedes_rolled_back_steps():
    ticks = _ticks(5)
    stats = [*ticks[:4], dict(ticks[2], loss=9.0), ticks[3], ticks[4]]  # resumed from the step-200 snapshot
    kept = records_of_kind(stats, "tick")
    assert [t["step"] for t in kept] == [100, 200, 300, 400, 500]
    assert kept[2]["loss"] == 9.0
    fid, kid = _metrics(300, 9.6, 50.0, 0.02), _metrics(300, 9.6, 50.0, 0.02)
    del fid["kid"], fid["kid_std"], kid["fid"]  # one line per metric at the same step: both stay
    assert len(records_of_kind([fid, kid], "metrics")) == 2
    assert len(records_of_kind([fid, kid, dict(fid, fid=40.0)], "metrics")) == 2  # a re-logged fid replaces
    assert metric_names([fid, kid]) == ["fid", "kid"]


def test_crop_mix_sums_to_one_per_tick_and_follows_the_counts(run_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = read_stats(run_dir)
    mix = crop_mix(stats)
    assert mix.sizes == SIZES and mix.shares.shape == (12, 3)
    np.testing.assert_allclose(mix.shares.sum(axis=1), 1.0)
    np.testing.assert_allclose(mix.overall.sum(), 1.0)
    assert mix.kimg_start[0] == 0 and np.allclose(mix.kimg_start[1:], mix.kimg_end[:-1])
    # Late ticks draw mostly full-size steps, so the 64px share of crops rises.
    assert mix.shares[-6:, 2].mean() > mix.shares[:6, 2].mean() + 0.2
    second = stats[1]["crops"]
    first = stats[0]["crops"]
    expected = np.array([second[str(s)] - first[str(s)] for s in SIZES], float)
    np.testing.assert_allclose(mix.shares[1], expected / expected.sum())
    steps = crop_mix(stats, key="steps_by_size")
    np.testing.assert_allclose(steps.shares.sum(axis=1), 1.0)


def test_local_linear_smooth_keeps_trends_and_skips_nan():
    line = 0.5 - 0.01 * np.arange(30.0)
    np.testing.assert_allclose(local_linear_smooth(line, half_width=4), line)  # no lag, ends included
    noisy = line + 0.05 * np.random.default_rng(0).standard_normal(30)
    noisy[[3, 17]] = np.nan
    smooth = local_linear_smooth(noisy, half_width=6)
    assert np.isfinite(smooth).all()
    assert np.abs(smooth - line).max() < 0.5 * np.nanmax(np.abs(noisy - line))
    assert np.isnan(local_linear_smooth(np.array([np.nan, np.nan, 1.0]), half_width=1)[0])


def test_write_report(run_dir):
    png_path, html_path = write_report(run_dir, dpi=40)
    assert png_path == run_dir / "report.png" and html_path == run_dir / "report.html"
    with Image.open(png_path) as image:
        assert image.format == "PNG" and 400 <= image.width <= 2000 and 200 <= image.height <= 1200
        assert np.asarray(image.convert("L")).std() > 5  # something was drawn
    page = html_path.read_text(encoding="utf-8")
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert base64.b64decode(embedded[0]) == png_path.read_bytes()
    assert base64.b64decode(embedded[1]) == (run_dir / "grid-00001200.png").read_bytes()  # the newest grid
    assert re.search(r"<th>fid</th><td>12.25 at step 1200", page)
    assert re.search(r"<th>kid</th><td>0.004 ± 0.0004", page)
    assert "snapshot-00001200.safetensors" in page and "<th>network.arch</th><td>ddpmpp</td>" in page
    assert re.search(r"unparseable stats lines</th><td>1<", page)
    assert re.search(r"achieved TFLOP/s</th><td>0.25<", page) and re.search(
        r"MFU \(bf16 peak\)</th><td>-<", page
    )
    assert not list(run_dir.glob("*.tmp"))  # atomic writes leave no temp files behind


def test_write_report_without_metrics_grid_or_config(tmp_path):
    (tmp_path / "stats.jsonl").write_text(json.dumps(_ticks(1)[0]) + "\n")
    png_path, html_path = write_report(tmp_path, dpi=30)
    assert png_path.is_file() and latest_grid(tmp_path) is None
    page = html_path.read_text(encoding="utf-8")
    assert "No metrics yet." in page and "config.json is missing" in page


def test_missing_run_directory_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a patchdiff run directory"):
        write_report(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_stats(tmp_path / "nope")


def test_plot_loss_writes_a_png(run_dir, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = read_stats(run_dir)
    path = plot_loss(stats, tmp_path / "loss.png", dpi=50)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (300, 200)


def test_cli_prints_both_paths(run_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    report.add_parser(parser.add_subparsers())
    args = parser.parse_args(["report", str(run_dir), "--dpi", "30"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.split() == [str(run_dir / "report.png"), str(run_dir / "report.html")]
    args = parser.parse_args(["report", str(tmp_path / "empty")])
    with pytest.raises(FileNotFoundError, match="empty"):
        args.func(args)
    # Through the real `patchdiff` entry point, a bad run directory is a clean error with exit code 2.
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "patchdiff report: error:" in capsys.readouterr().err
