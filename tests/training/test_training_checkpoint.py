import json

import pytest
import torch
from tests.conftest import tiny_config

from patchdiff.config import TrainConfig
from patchdiff.generation import build_denoiser, load
from patchdiff.training.checkpoint import (
    find_resume_state,
    load_state,
    newest_snapshot,
    read_snapshot,
    save_snapshot,
    save_state,
)


def test_snapshot_round_trip_is_exact_and_carries_the_config(tmp_path):
    cfg = tiny_config("data", "out", image_size=(16, 16))
    denoiser = build_denoiser(cfg)
    path = tmp_path / "snapshot-00000005.safetensors"
    save_snapshot(path, denoiser, cfg, step=5, kimg=0.5)
    state, cfg2, info = read_snapshot(path)
    assert cfg2 == cfg and info == {"step": 5, "kimg": 0.5}
    for k, v in denoiser.state_dict().items():
        assert torch.equal(state[k], v)
    assert json.loads(path.with_suffix(".json").read_text())["config"]["batch"] == cfg.batch
    model = load(path, "cpu")
    assert model.image_size == (16, 16) and not model.denoiser.training
    assert newest_snapshot(tmp_path) == path
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries


def test_bad_snapshots_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_snapshot(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"junk\.safetensors"):
        read_snapshot(junk)
    with pytest.raises(FileNotFoundError, match="no snapshot"):
        newest_snapshot(tmp_path)


def test_state_loads_with_weights_only_and_resume_lookup(tmp_path):
    run = tmp_path / "00000-x"
    run.mkdir()
    save_state(
        run / "state.pt", dict(config=TrainConfig().__class__.__name__, w=torch.ones(2), counters="{}")
    )
    assert torch.equal(load_state(run / "state.pt")["w"], torch.ones(2))
    assert find_resume_state("auto", tmp_path) == run / "state.pt"
    assert find_resume_state(str(run), tmp_path) == run / "state.pt"
    with pytest.raises(FileNotFoundError, match="--resume"):
        find_resume_state(str(tmp_path / "missing"), tmp_path)
    with pytest.raises(FileNotFoundError, match="auto"):
        find_resume_state("auto", tmp_path / "empty")
    # A state that smuggles code is refused by weights_only loading.
    evil = tmp_path / "evil.pt"
    torch.save({"f": print}, evil)
    with pytest.raises(Exception):  # noqa: B017 (torch raises UnpicklingError)
        load_state(evil)
