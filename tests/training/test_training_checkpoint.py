import dataclasses
import errno
import json

import pytest
import torch
from tests.conftest import tiny_config

from patchdiff.config import TrainConfig, to_json
from patchdiff.denoisers import build_denoiser
from patchdiff.files import atomic_write
from patchdiff.generation import load
from patchdiff.snapshot import newest_snapshot, read_snapshot, save_snapshot
from patchdiff.training.checkpoint import (
    StateError,
    check_state,
    find_resume_state,
    load_state,
    remove_temporaries,
    save_state,
    settle_state,
    state_in,
    truncate_stats,
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
    assert find_resume_state("auto", tmp_path / "empty") is None  # auto starts fresh when nothing exists
    # A state that smuggles code is refused by weights_only loading, with a one-line message.
    evil = tmp_path / "evil.pt"
    torch.save({"f": print}, evil)
    with pytest.raises(StateError, match=r"evil\.pt is not a patchdiff training state") as info:
        load_state(evil)
    assert "\n" not in str(info.value)


def test_a_new_state_replaces_the_old_one_only_when_complete(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    save_state(path, dict(w=torch.zeros(1)))
    save_state(path, dict(w=torch.ones(1)))
    assert load_state(path)["w"].item() == 1 and load_state(tmp_path / "state.pt.prev")["w"].item() == 0
    # A crash between the two renames leaves only state.pt.prev, which resuming finds.
    path.unlink()
    assert find_resume_state(str(tmp_path), tmp_path) == tmp_path / "state.pt.prev"
    save_state(path, dict(w=torch.ones(1)))

    def disk_full(obj, f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(RuntimeError, match="No space left on device; the previous state is kept"):
        save_state(path, dict(w=torch.full((1,), 2.0)))
    assert load_state(path)["w"].item() == 1 and not list(tmp_path.glob(".*.tmp"))


def test_damaged_states_are_named(tmp_path):
    empty, junk, short = tmp_path / "empty.pt", tmp_path / "junk.pt", tmp_path / "short.pt"
    empty.write_bytes(b"")
    junk.write_bytes(b"hello")
    save_state(short, dict(w=torch.ones(1000)))
    short.write_bytes(short.read_bytes()[:500])
    for path in (empty, junk, short):
        with pytest.raises(StateError, match=path.name) as info:
            load_state(path)
        assert "\n" not in str(info.value)
    with pytest.raises(StateError, match="lacks config, denoiser"):
        check_state(junk, {"w": 1})


def test_stale_temporaries_and_lost_stats_are_cleaned(tmp_path):
    (tmp_path / ".state.pt.new.abc.tmp").write_bytes(b"x")
    (tmp_path / "state.pt.new").write_text("x")  # torn: settle_state removes it
    (tmp_path / "keep.txt").write_text("x")
    assert [p.name for p in remove_temporaries(tmp_path)] == [".state.pt.new.abc.tmp"]
    assert settle_state(tmp_path) is None
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    stats = tmp_path / "stats.jsonl"
    stats.write_text('{"kind": "tick", "step": 5}\n{"kind": "tick", "step": 10}\n{"kind": "tick", "st')
    assert truncate_stats(stats, 5) == 2
    assert stats.read_text() == '{"kind": "tick", "step": 5}\n'
    assert truncate_stats(stats, 5) == 0


def test_resume_prefers_the_newest_complete_state(tmp_path):
    outdir = tmp_path
    tmp_path = outdir / "00000-run"
    tmp_path.mkdir()
    path, new = tmp_path / "state.pt", tmp_path / "state.pt.new"
    save_state(path, dict(w=torch.zeros(1)))
    # A crash after state.pt.new was written but before it was renamed: it is the newest state.
    atomic_write(new, lambda tmp: torch.save(dict(w=torch.ones(1)), tmp))
    assert state_in(tmp_path) == new == find_resume_state(str(tmp_path), tmp_path)
    assert find_resume_state("auto", outdir) == new
    assert settle_state(tmp_path) == path and not new.is_file()
    assert load_state(path)["w"].item() == 1 and load_state(tmp_path / "state.pt.prev")["w"].item() == 0
    # A torn state.pt.new (or state.pt) is passed over for the complete one before it.
    new.write_bytes(path.read_bytes()[:100])
    assert state_in(tmp_path) == path
    path.write_bytes(path.read_bytes()[:-30])
    assert state_in(tmp_path) == tmp_path / "state.pt.prev"
    (tmp_path / "state.pt.prev").unlink()
    assert state_in(tmp_path) == path  # nothing complete: state.pt, whose loading names the damage
    with pytest.raises(StateError, match=r"state\.pt is damaged"):
        load_state(state_in(tmp_path))


def test_crafted_snapshot_metadata_is_named(tmp_path):
    from safetensors.torch import save_file

    cfg = tiny_config("data", "out", image_size=(16, 16))
    tensors = {"w": torch.zeros(1)}
    path = tmp_path / "crafted.safetensors"

    def write(**meta):
        save_file(
            tensors, str(path), metadata={"patchdiff.config": to_json(cfg), "patchdiff.step": "5", **meta}
        )

    write(**{"patchdiff.kimg": "{broken"})  # broken JSON: the key is named
    with pytest.raises(ValueError, match=r"'patchdiff\.kimg' is not valid") as info:
        read_snapshot(path)
    assert "\n" not in str(info.value)
    write(**{"patchdiff.config": to_json(cfg)[:-5]})
    with pytest.raises(ValueError, match=r"'patchdiff\.config' is not valid"):
        read_snapshot(path)
    # A claimed 100000 x 100000 image is refused before anything is built at that size.
    huge = dataclasses.replace(cfg, image_size=(100_000, 100_000))
    save_file(tensors, str(path), metadata={"patchdiff.config": to_json(huge)})
    with pytest.raises(ValueError, match=r"implausible image size \(100000, 100000\)"):
        read_snapshot(path)


def test_a_refused_state_does_not_pass_on_torchs_advice(tmp_path):
    import pickle

    path = tmp_path / "state.pt"
    with open(path, "wb") as f:  # a plain pickle with an opcode the weights-only unpickler refuses
        pickle.dump({"a": {1}}, f, protocol=4)
    with pytest.raises(StateError) as info:
        load_state(path)
    message = str(info.value)
    assert "weights_only" not in message and "Re-running" not in message and "\n" not in message
    assert "state.pt is damaged or not a training state (Unsupported operand" in message
