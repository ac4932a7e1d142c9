"""config_flags.py: the `patchdiff train` flag of each setting (TRAIN_FLAGS), their checks; config.arch_defaults."""

import dataclasses

import pytest

from patchdiff.config import TrainConfig, arch_defaults
from patchdiff.config_flags import SETTING_FLAGS, TRAIN_FLAGS, check_settings, int_list, setting


def test_every_flag_is_named_once_and_every_setting_flag_names_a_field():
    names = [f.name for _, flags in TRAIN_FLAGS for f in flags]
    assert len(names) == len(set(names))
    cfg = TrainConfig()
    for f in SETTING_FLAGS:
        setting(cfg, f.path)  # an AttributeError names a path that is not a field
    assert {p for p in arch_defaults("edm2")} <= {f.path for f in SETTING_FLAGS if f.preset}
    assert arch_defaults("ddpmpp") == {}


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(lr=0.0), "--lr 0.0: must be a finite number > 0"),
        (dict(duration_kimg=float("nan")), "--duration nan: must be a finite number > 0"),
        (dict(batch_gpu=-1), "--batch-gpu -1: must be a finite number >= 0"),
        (dict(checkpoint_minutes=float("inf")), "--checkpoint-minutes inf: must be a finite number >= 0"),
        (dict(lr_cooldown=1.5), r"--lr-cooldown 1.5: must be a share of the run in \[0, 1\]"),
    ],
)
def test_check_settings_names_the_flag(changes, message):
    check_settings(TrainConfig())
    with pytest.raises(ValueError, match=message):
        check_settings(dataclasses.replace(TrainConfig(), **changes))


def test_comma_lists():
    assert int_list("1,2,,3") == (1, 2, 3) and int_list("") == ()
