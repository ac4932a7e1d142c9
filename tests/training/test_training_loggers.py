import importlib.util
import json
import time

import pytest
from tests.conftest import TINY_TRAIN_FLAGS, tiny_config

from patchdiff.cli import main
from patchdiff.training import loggers as loggers_module
from patchdiff.training.loggers import check_loggers, parse_logger_names, scalars_of
from patchdiff.training.loop import train


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_logger_names_repeat_or_comma_list():
    assert parse_logger_names(["tensorboard,wandb", "TensorBoard"]) == ("tensorboard", "wandb")
    assert parse_logger_names([]) == ()
    with pytest.raises(ValueError, match="--logger mlflow: unknown logger"):
        parse_logger_names(["mlflow"])


def test_cli_logger_flag(landscapes, tmp_path, capsys):
    flags = ["train", "--data", str(landscapes), "--outdir", str(tmp_path), *TINY_TRAIN_FLAGS]
    assert main([*flags, "--logger", "tensorboard", "--logger", "wandb,tensorboard", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out.split("\nparameters")[0])["loggers"] == ["tensorboard", "wandb"]
    assert main([*flags, "--logger", "mlflow", "--dry-run"]) == 2
    assert "--logger mlflow: unknown logger" in capsys.readouterr().err


def test_missing_package_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        loggers_module.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name)
    )
    with pytest.raises(RuntimeError, match=r'pip install "patchdiff\[wandb\]"'):
        check_loggers(("wandb",))
    check_loggers(("tensorboard",))


def test_scalars_of_tick_and_metrics_records():
    tick = dict(kind="tick", kimg=0.5, loss=0.3, lr=1e-3, s_per_kimg=4.0, tflops=0.1, mem_gb=1.5)
    tick["loss_by_size"] = {"8": 0.4, "16": 0.2}
    values = scalars_of(tick)
    assert values["train/loss"] == 0.3 and values["speed/images_per_s"] == 250.0
    assert values["train/loss_crop8"] == 0.4 and values["train/loss_crop16"] == 0.2
    assert values["progress/kimg"] == 0.5 and values["resources/mem_gb"] == 1.5
    assert scalars_of(dict(kind="metrics", step=3, kimg=0.5, time_s=1.0, fid=12.5)) == {"metrics/fid": 12.5}


def tensorboard_scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder)).Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)], events


def test_tensorboard_logs_the_stats_and_resume_does_not_repeat_steps(landscapes, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    cfg = tiny_config(str(landscapes), str(tmp_path), loggers=("tensorboard",), duration_kimg=0.1)
    run_dir = train(cfg, progress=False, grid=4)
    ticks = [r for r in read_jsonl(run_dir / "stats.jsonl") if r["kind"] == "tick"]
    loss, events = tensorboard_scalars(run_dir / "tensorboard", "train/loss")
    assert loss == [(round(t["kimg"] * 1000), pytest.approx(t["loss"])) for t in ticks]
    sizes = {f"train/loss_crop{s}" for t in ticks for s in t["loss_by_size"]}
    assert sizes and sizes <= set(events.Tags()["scalars"])
    assert {"train/lr", "speed/images_per_s", "speed/tflops", "resources/mem_gb"} <= set(
        events.Tags()["scalars"]
    )
    assert events.Tags()["images"] == ["samples"]
    # Work lost in a crash: an event logged past the saved state must not show after resuming.
    with SummaryWriter(str(run_dir / "tensorboard")) as lost:
        lost.add_scalar("train/loss", 99.0, 10_000)
    train(
        cfg.__class__(**{**cfg.__dict__, "duration_kimg": 0.2}), resume=str(run_dir), progress=False, grid=4
    )
    ticks = [r for r in read_jsonl(run_dir / "stats.jsonl") if r["kind"] == "tick"]
    loss, events = tensorboard_scalars(run_dir / "tensorboard", "train/loss")
    steps = [step for step, _ in loss]
    assert steps == sorted(set(steps)) == [round(t["kimg"] * 1000) for t in ticks]
    assert 99.0 not in [value for _, value in loss]
    assert len(events.Images("samples")) == 2


def test_wandb_offline_run_continues_on_resume(landscapes, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-files"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-files").mkdir()
    cfg = tiny_config(str(landscapes), str(tmp_path / "runs"), loggers=("wandb",), duration_kimg=0.1)
    run_dir = train(cfg, progress=False, grid=4)
    run_id = (run_dir / "wandb-id.txt").read_text().strip()
    train(
        cfg.__class__(**{**cfg.__dict__, "duration_kimg": 0.2}), resume=str(run_dir), progress=False, grid=4
    )
    assert (run_dir / "wandb-id.txt").read_text().strip() == run_id
    runs = sorted((tmp_path / "wandb-files" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2  # both sessions wrote to the same W&B run id
    for folder, kimg_step in zip(
        runs, (106, 213), strict=True
    ):  # the sample grid of each session at its own step
        assert list((folder / "files" / "media" / "images").glob(f"samples_{kimg_step}_*.png"))
        deadline = time.time() + 60  # wandb-core finishes writing the log file on its own time
        while b"train/loss_crop" not in (folder / f"run-{run_id}.wandb").read_bytes():
            assert time.time() < deadline, f"no scalars in {folder}"
            time.sleep(0.5)


def test_wandb_that_cannot_start_is_one_line(landscapes, tmp_path, monkeypatch):
    import wandb

    def refuse(**_):
        raise wandb.errors.UsageError(
            "api_key not configured (no-tty).\nCall wandb.login(key=[your_api_key])"
        )

    monkeypatch.setattr(wandb, "init", refuse)
    cfg = tiny_config(str(landscapes), str(tmp_path), loggers=("wandb",), duration_kimg=0.01)
    with pytest.raises(
        RuntimeError, match=r"--logger wandb: could not start the W&B run \(api_key .*wandb login"
    ):
        train(cfg, progress=False, grid=0)
    assert not list(tmp_path.iterdir())  # the new run's folder is gone: nothing half-made
