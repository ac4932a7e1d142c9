import dataclasses
import math

import pytest

from patchdiff.config import TrainConfig
from patchdiff.training.optim import lr_at
from patchdiff.training.stream import clock

# lr 0.01, warm-up over 1000 counted images, isqrt decay from t_ref = 4000, cool-down over the last 20 of 100 steps.
CFG = TrainConfig(
    lr=0.01, lr_rampup_kimg=1.0, lr_schedule="isqrt", lr_ref_kimg=4.0, lr_cooldown=0.2, batch=100
)


def test_lr_at_warm_up():
    assert lr_at(0, 0, 100, CFG) == 0.0
    assert lr_at(250, 2, 100, CFG) == pytest.approx(0.0025)  # a quarter of the way
    assert lr_at(1000, 10, 100, CFG) == pytest.approx(0.01)


def test_lr_at_constant():
    flat = dataclasses.replace(CFG, lr_schedule="rampup")
    assert lr_at(3000, 30, 100, flat) == pytest.approx(0.01)
    assert lr_at(16000, 79, 100, flat) == pytest.approx(0.01)  # the step before the cool-down
    assert lr_at(3000, 30, 100, CFG) == pytest.approx(0.01)  # isqrt: constant until t_ref


def test_lr_at_isqrt_decay():
    assert lr_at(4000, 40, 100, CFG) == pytest.approx(0.01)  # t = t_ref
    assert lr_at(16000, 70, 100, CFG) == pytest.approx(0.005)  # 1 / sqrt(16000 / 4000)
    assert lr_at(36000, 75, 100, CFG) == pytest.approx(0.01 / 3)  # 1 / sqrt(9)
    default_ref = dataclasses.replace(CFG, lr_ref_kimg=0.0, batch=10, lr_cooldown=0.0)
    assert lr_at(4 * 70_000 * 10, 5, 100, default_ref) == pytest.approx(0.005)  # t_ref = 70k steps x batch


def test_lr_at_cool_down_ends_at_zero():
    flat = dataclasses.replace(CFG, lr_schedule="rampup")
    assert lr_at(9000, 80, 100, flat) == pytest.approx(
        0.01
    )  # the cool-down's first step: (100 - 80) / 20 = 1
    assert lr_at(9000, 90, 100, flat) == pytest.approx(0.005)  # half-way: linear
    assert lr_at(16000, 90, 100, CFG) == pytest.approx(0.0025)  # on top of the isqrt decay (1/2 x 1/2)
    cosine = dataclasses.replace(flat, lr_cooldown_shape="cosine")
    assert lr_at(9000, 95, 100, cosine) == pytest.approx(0.01 * 0.5 * (1 - math.cos(math.pi / 4)))
    assert lr_at(9000, 100, 100, flat) == 0.0
    assert lr_at(9000, 100, 100, cosine) == 0.0


def test_lr_at_counts_steps_with_ema_unit_steps():
    # --ema-unit steps: step s counts s x --batch images, whatever its crops.
    counted, _ = clock(None, 5, "steps", CFG.batch)
    assert lr_at(counted, 5, 100, CFG) == pytest.approx(0.005)  # 500 of the 1000 warm-up images
