"""`patchdiff train`'s flags as a library (training/flags.py): the parser built from config.TRAIN_FLAGS,
argv -> (TrainConfig, given fields), the same configuration the command line trains."""

import json

import pytest
from tests.conftest import TINY_TRAIN_FLAGS

from patchdiff.cli import main
from patchdiff.config import TrainConfig, from_dict
from patchdiff.config_flags import SETTING_FLAGS, setting
from patchdiff.training.flags import config_from_argv, default_precision, train_parser


def dry_run_config(argv: list[str], capsys) -> TrainConfig:
    """The config `patchdiff train --dry-run` prints."""
    assert main(["train", *argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    config, _ = json.JSONDecoder().raw_decode(out[out.index("{") :])
    return from_dict(TrainConfig, config)


@pytest.mark.parametrize(
    "flags",
    [
        [],
        ["--arch", "edm2", "--edm2-size", "tiny", "--posthoc-ema", ""],
        ["--arch", "dit", "--depth", "2", "--width", "32", "--heads", "2", "--dit-patch", "4"],
        ["--patch-schedule", "fixed", "--crop-kimg", "0.1", "--no-coords", "--lr-cooldown", "0.2"],
        [
            "--preset",
            "lsun256-latent",
            "--arch",
            "ddpmpp",
            "--batch",
            "8",
            "--batch-gpu",
            "0",
            "--augment",
            "0.2",
        ],
    ],
)
def test_the_library_resolves_what_a_dry_run_prints(flags, landscapes, tmp_path, capsys):
    argv = [
        "--data",
        str(landscapes),
        "--outdir",
        str(tmp_path),
        *TINY_TRAIN_FLAGS,
        *flags,
        "--device",
        "cpu",
    ]
    cfg, given = config_from_argv(argv)
    assert cfg == dry_run_config(argv, capsys)
    assert cfg.image_size == (16, 16) and cfg.network.resolution == 16  # filled in from the data
    assert {"data", "outdir", "network.model_channels", "batch"} <= given
    unresolved, _ = config_from_argv(argv, resolve=False)
    assert unresolved.image_size == () and unresolved.lr == cfg.lr


def test_given_fields_are_the_settings_on_the_command_line(tmp_path):
    argv = ["--data", "d", "--outdir", str(tmp_path), "--cbase", "8", "--no-coords", "--P-mean", "-1"]
    argv += ["--logger", "tensorboard", "--preset", "lsun256-latent", "--device", "cpu", "--dit-size", "B"]
    cfg, given = config_from_argv(argv, resolve=False)
    # A preset's values and flags that are not settings (--device, --dit-size, --preset) are not given.
    assert given == {"data", "outdir", "network.model_channels", "patch.coords", "loss.P_mean", "loggers"}
    assert (cfg.network.arch, cfg.batch, cfg.patch.coords, cfg.loggers) == (
        "adm",
        1024,
        False,
        ("tensorboard",),
    )


def test_defaults_come_from_the_fields_and_the_arch_presets(tmp_path):
    parser = train_parser()
    assert parser.get_default("duration") == TrainConfig.duration_kimg
    assert parser.get_default("real_p") == TrainConfig().patch.real_p
    assert parser.get_default("lr") is None  # --arch decides
    base = ["--data", "d", "--outdir", str(tmp_path), "--device", "cpu"]
    cfg, _ = config_from_argv(base, resolve=False)
    defaults = TrainConfig(data="d", outdir=str(tmp_path))
    for f in SETTING_FLAGS:
        if f.path not in ("data", "outdir", "precision"):
            assert setting(cfg, f.path) == setting(defaults, f.path), f.name
    assert cfg.precision == default_precision("cpu") == "fp32"
    edm2, _ = config_from_argv([*base, "--arch", "edm2"], resolve=False)
    assert (edm2.lr, edm2.lr_schedule, edm2.loss.weighting, edm2.posthoc_ema) == (
        0.012,
        "isqrt",
        "learned",
        (0.05, 0.1),
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--arch", "foo"], "argument --arch: invalid choice: 'foo'"),
        (["--cres", "1,x"], "expected comma-separated values like 1,2,2, got '1,x'"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--help"], "unrecognized arguments: --help"),
        (["--coord-embed", "2", "--no-coords"], "--coord-embed 2 embeds the coordinates that --no-coords"),
        (["--lr", "0"], r"--lr 0.0: must be a finite number > 0"),
    ],
)
def test_bad_flags_raise_instead_of_exiting(flags, message, landscapes, tmp_path):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        config_from_argv(["--data", str(landscapes), "--outdir", str(tmp_path), *TINY_TRAIN_FLAGS, *flags])
    with pytest.raises(ValueError, match="the following arguments are required: --data"):
        config_from_argv(["--outdir", str(tmp_path)])
