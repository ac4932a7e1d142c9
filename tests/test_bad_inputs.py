"""Hostile input to `patchdiff dataset | generate | fid | report`: every case must exit with its code and
one stderr line naming the problem, without a traceback, and leave nothing behind in the output area.

Inputs live in one shared folder (`w.src`); each case writes only below its own empty `tmp_path`, so
"nothing left behind" is checked as "tmp_path is still empty"."""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tests.conftest import tiny_config
from tests.data.images import png_bytes, write_png

from patchdiff.cli import main
from patchdiff.data import convert
from patchdiff.demo import make_landscapes, write_images
from patchdiff.denoisers import build_denoiser
from patchdiff.metrics.fid import reference_from_features, save_reference
from patchdiff.snapshot import newest_snapshot, save_snapshot

# --------------------------------------------------------------------------- the shared inputs


def _labelled(folder: Path, labels: object) -> Path:
    write_images(make_landscapes(3, 8, seed=2), folder)
    (folder / "dataset.json").write_text(json.dumps({"labels": labels}))
    return folder


@pytest.fixture(scope="module")
def w(tiny_run, landscapes, tiny_detector, tmp_path_factory) -> SimpleNamespace:
    src = tmp_path_factory.mktemp("hostile")
    snap = newest_snapshot(tiny_run)
    state = load_file(str(snap))
    with safe_open(str(snap), "pt") as f:
        meta = f.metadata()

    save_file(state, str(src / "bad-meta.safetensors"), metadata={**meta, "patchdiff.config": "{oops"})
    nan_state = {k: v.clone() for k, v in state.items()}
    nan_state["net.enc_conv.weight"].view(-1)[0] = float("nan")
    save_file(nan_state, str(src / "nan.safetensors"), metadata=meta)
    # Finite weights whose output overflows: the sampler meets infinity and must not write black images.
    huge = {k: v.clone() for k, v in state.items()}
    huge["net.out_conv.weight"].fill_(3e38)
    save_file(huge, str(src / "overflow.safetensors"), metadata=meta)
    (src / "truncated.safetensors").write_bytes(snap.read_bytes()[: snap.stat().st_size // 2])
    (src / "garbage.safetensors").write_bytes(np.random.default_rng(0).bytes(256))
    cfg = tiny_config("data", "runs")
    cond = dataclasses.replace(cfg, network=dataclasses.replace(cfg.network, label_dim=3, label_dropout=0.0))
    save_snapshot(src / "cond-nodrop.safetensors", build_denoiser(cond), cond)

    features = np.random.default_rng(0).normal(size=(64, 16))  # the tiny detector gives 16 features
    save_reference(reference_from_features(features, kid_features=0), src / "ref.npz")
    np.savez(src / "not-psd.npz", mu=np.zeros(16), sigma=-np.eye(16))
    np.savez(src / "asym.npz", mu=np.zeros(16), sigma=np.triu(np.ones((16, 16))))
    np.savez(src / "nan-mu.npz", mu=np.full(16, np.nan), sigma=np.eye(16))
    (src / "garbage.npz").write_bytes(b"PK\x03\x04 this is not a zip")

    (src / "empty").mkdir()
    (src / "junk").mkdir()
    (src / "junk" / "notes.txt").write_text("not an image, and not named like one: ignored")
    (src / "junk" / "b.png").write_bytes(b"named like an image, but is not one")
    (src / "nosnap").mkdir()
    (src / "a-file").write_text("not a folder")
    names = [f"img{i:05d}.png" for i in range(3)]
    _labelled(src / "ghost-label", [[n, 0] for n in names] + [["ghost.png", 5]])
    _labelled(src / "huge-label", [[n, 10**12] for n in names])
    _labelled(src / "negative-label", [[n, -1] for n in names])
    _labelled(src / "float-label", [[n, 1.5] for n in names])
    with zipfile.ZipFile(src / "crc.zip", "w") as archive:  # a member whose CRC no longer matches
        archive.writestr("a.png", png_bytes(np.zeros((8, 8, 3), np.uint8)))
    data = bytearray((src / "crc.zip").read_bytes())
    data[data.find(b"IHDR") + 10] ^= 0xFF
    (src / "crc.zip").write_bytes(bytes(data))
    return SimpleNamespace(
        src=src, run=tiny_run, snap=snap, images=landscapes, detector=tiny_detector, ref=src / "ref.npz"
    )


# --------------------------------------------------------------------------- the table

NO_PROGRESS = ["--no-progress"]


def gen_model(model, out, *flags):
    outdir = str(out / "gen")
    return [
        "generate",
        "--model",
        str(model),
        "--outdir",
        outdir,
        "--steps",
        "2",
        *NO_PROGRESS,
        "--device",
        "cpu",
        *flags,
    ]


def gen(w, out, *flags):
    return gen_model(w.run, out, *flags)


def fid(w, *flags):
    return ["fid", *flags, "--detector", w.detector, "--device", "cpu", "--no-progress", "--workers", "0"]


def calc_images(w, ref):
    return fid(w, "calc", "--images", str(w.images), "--ref", str(ref))


def dataset(source, dest, *flags):
    return ["dataset", "--source", str(source), "--dest", str(dest), "--no-progress", *flags]


# (case, argv(w, out), exit code, words the one line must hold)
CASES = [
    # dataset
    (
        "dataset --dest inside --source",
        lambda w, o: dataset(w.images, w.images / "out.zip"),
        2,
        ["--dest", "inside --source"],
    ),
    (
        "dataset label for a missing file",
        lambda w, o: dataset(w.src / "ghost-label", o / "d.zip"),
        2,
        ["dataset.json", "ghost.png"],
    ),
    (
        "dataset label 10^12",
        lambda w, o: dataset(w.src / "huge-label", o / "d.zip"),
        2,
        ["dataset.json", "1000000000000"],
    ),
    (
        "dataset negative label",
        lambda w, o: dataset(w.src / "negative-label", o / "d.zip"),
        2,
        ["dataset.json", "-1"],
    ),
    (
        "dataset non-integer label",
        lambda w, o: dataset(w.src / "float-label", o / "d.zip"),
        2,
        ["dataset.json", "1.5"],
    ),
    (
        "dataset huge --resolution",
        lambda w, o: dataset(w.images, o / "d.zip", "--resolution", "100000"),
        2,
        ["--resolution", "4096"],
    ),
    (
        "dataset --dest under a file",
        lambda w, o: dataset(w.images, w.src / "a-file" / "d.zip"),
        2,
        ["--dest", "a-file", "not a folder"],
    ),
    (
        "dataset empty source",
        lambda w, o: dataset(w.src / "empty", o / "d.zip"),
        2,
        ["--source", "no images"],
    ),
    (
        "dataset file that is not an image",
        lambda w, o: dataset(w.src / "junk", o / "d.zip"),
        2,
        ["junk/b.png", "not a readable image (cannot identify image file)"],
    ),
    (
        "dataset damaged zip member",
        lambda w, o: dataset(w.src / "crc.zip", o / "d.zip"),
        2,
        ["crc.zip:a.png", "damaged"],
    ),
    (
        "dataset missing source",
        lambda w, o: dataset(w.src / "missing", o / "d.zip"),
        2,
        ["--source", "missing"],
    ),
    # generate
    ("generate --seeds 5-2", lambda w, o: gen(w, o, "--seeds", "5-2"), 2, ["--seeds", "reversed"]),
    ("generate --seeds 1,1,1", lambda w, o: gen(w, o, "--seeds", "1,1,1"), 2, ["--seeds", "more than once"]),
    ("generate --seeds 2**32", lambda w, o: gen(w, o, "--seeds", str(2**32)), 2, ["--seeds", "2**32"]),
    ("generate --seeds -3", lambda w, o: gen(w, o, "--seeds", "-3"), 2, ["--seeds", ">= 0"]),
    ("generate --batch 0", lambda w, o: gen(w, o, "--batch", "0"), 2, ["--batch 0"]),
    ("generate --steps 0", lambda w, o: gen(w, o, "--steps", "0"), 2, ["--steps 0"]),
    ("generate --cfg, unconditional", lambda w, o: gen(w, o, "--cfg", "2"), 2, ["--cfg", "unconditional"]),
    (
        "generate --class, unconditional",
        lambda w, o: gen(w, o, "--class", "0"),
        2,
        ["--class", "unconditional"],
    ),
    (
        "generate --S-churn -5",
        lambda w, o: gen(w, o, "--S-churn", "-5"),
        2,
        ["--S-churn -5", ">= 0"],
    ),
    (
        "generate --steps 10^9",
        lambda w, o: gen(w, o, "--steps", str(10**9)),
        2,
        ["--steps 1000000000", "10000"],
    ),
    (
        "generate --class out of range",
        lambda w, o: gen_model(w.src / "cond-nodrop.safetensors", o, "--class", "3"),
        2,
        ["--class 3", "0..2"],
    ),
    (
        "generate --device cuda, no CUDA",
        lambda w, o: gen(w, o, "--device", "cuda"),
        2,
        ["--device cuda", "CUDA"],
    ),
    ("generate --device nonsense", lambda w, o: gen(w, o, "--device", "gpu"), 2, ["--device", "gpu"]),
    (
        "generate --outdir is a file",
        lambda w, o: ["generate", "--model", str(w.run), "--outdir", str(w.src / "a-file")],
        2,
        ["--outdir", "a-file"],
    ),
    (
        "generate --outdir under a file",
        lambda w, o: ["generate", "--model", str(w.run), "--outdir", str(w.src / "a-file" / "x")],
        2,
        ["--outdir", "not a folder"],
    ),
    (
        "generate --grid is a folder",
        lambda w, o: gen(w, o, "--grid", str(w.src / "empty")),
        2,
        ["--grid", "folder"],
    ),
    (
        "generate NaN weights",
        lambda w, o: gen_model(w.src / "nan.safetensors", o),
        2,
        ["nan.safetensors", "NaN"],
    ),
    (
        "generate bad JSON metadata",
        lambda w, o: gen_model(w.src / "bad-meta.safetensors", o),
        2,
        ["bad-meta.safetensors"],
    ),
    (
        "generate truncated snapshot",
        lambda w, o: gen_model(w.src / "truncated.safetensors", o),
        2,
        ["truncated.safetensors"],
    ),
    (
        "generate garbage snapshot",
        lambda w, o: gen_model(w.src / "garbage.safetensors", o),
        2,
        ["garbage.safetensors"],
    ),
    (
        "generate missing model",
        lambda w, o: gen_model(w.src / "missing", o),
        2,
        ["missing", "does not exist"],
    ),
    (
        "generate run without snapshots",
        lambda w, o: gen_model(w.src / "nosnap", o),
        2,
        ["nosnap", "no snapshot"],
    ),
    (
        "generate non-finite samples",
        lambda w, o: gen_model(w.src / "overflow.safetensors", o, "--seeds", "0-1"),
        2,
        ["NaN or infinity", "seeds 0..1"],
    ),
    # fid
    (
        "fid calc sigma not PSD",
        lambda w, o: calc_images(w, w.src / "not-psd.npz"),
        2,
        ["not-psd.npz", "positive semi-definite"],
    ),
    (
        "fid calc sigma not symmetric",
        lambda w, o: calc_images(w, w.src / "asym.npz"),
        2,
        ["asym.npz", "symmetric"],
    ),
    ("fid calc mu NaN", lambda w, o: calc_images(w, w.src / "nan-mu.npz"), 2, ["nan-mu.npz", "NaN"]),
    (
        "fid calc garbage .npz",
        lambda w, o: calc_images(w, w.src / "garbage.npz"),
        2,
        ["garbage.npz", "not a readable"],
    ),
    (
        "fid calc --device cuda",
        lambda w, o: [*calc_images(w, w.ref), "--device", "cuda"],
        2,
        ["--device cuda", "CUDA"],
    ),
    (
        "fid calc --seeds overflow",
        lambda w, o: fid(
            w, "calc", "--model", str(w.run), "--num", "4", "--seeds", str(2**32 - 2), "--ref", str(w.ref)
        ),
        2,
        ["--seeds", "2**32"],
    ),
    (
        "fid calc --cfg, unconditional",
        lambda w, o: fid(w, "calc", "--model", str(w.run), "--num", "2", "--cfg", "1.5", "--ref", str(w.ref)),
        2,
        ["--cfg", "unconditional"],
    ),
    (
        "fid calc NaN weights",
        lambda w, o: fid(
            w, "calc", "--model", str(w.src / "nan.safetensors"), "--num", "2", "--ref", str(w.ref)
        ),
        2,
        ["nan.safetensors", "NaN"],
    ),
    ("fid calc --batch 0", lambda w, o: [*calc_images(w, w.ref), "--batch", "0"], 2, ["--batch 0"]),
    (
        "fid ref --dest is a folder",
        lambda w, o: fid(w, "ref", "--data", str(w.images), "--dest", str(w.src / "empty")),
        2,
        ["--dest", "folder"],
    ),
    (
        "fid ref --dest under a file",
        lambda w, o: fid(w, "ref", "--data", str(w.images), "--dest", str(w.src / "a-file" / "r.npz")),
        2,
        ["--dest", "not a folder"],
    ),
    # report
    ("report huge --dpi", lambda w, o: ["report", str(w.run), "--dpi", "100000"], 2, ["--dpi", "1000"]),
    ("report not a run", lambda w, o: ["report", str(w.src / "empty")], 2, ["stats.jsonl"]),
]


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"patchdiff {command}: error: "), lines[0]
    assert " object at 0x" not in lines[0]  # no Python reprs: they name nothing the user can find
    return lines[0]


@pytest.mark.parametrize(("argv", "code", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line(w, tmp_path, capsys, argv, code, words):
    before = sorted(p.name for p in w.src.rglob("*"))
    args = argv(w, tmp_path)
    assert main(args) == code
    line = one_error_line(capsys, args[0])
    for word in words:
        assert word in line, line
    assert list(tmp_path.iterdir()) == []  # nothing made, nothing half-made
    assert sorted(p.name for p in w.src.rglob("*")) == before  # and nothing beside the inputs


# --------------------------------------------------------------------------- cases that need more set-up


def test_cfg_without_label_dropout_warns_once(w, tmp_path, capsys):
    args = gen_model(
        w.src / "cond-nodrop.safetensors", tmp_path, "--seeds", "0-2", "--batch", "1", "--cfg", "2"
    )
    assert main(args) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.strip()]
    assert len(warnings) == 1 and warnings[0].startswith("patchdiff generate: warning: --cfg 2.0")
    assert "label_dropout 0" in warnings[0]
    assert len(list((tmp_path / "gen").glob("*.png"))) == 3


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    Image.fromarray(np.full((4, 4), 30000, np.uint16)).save(tmp_path / "src" / "a.png")
    assert Image.open(tmp_path / "src" / "a.png").mode == "I;16"
    assert main(dataset(tmp_path / "src", tmp_path / "d.zip")) == 0
    with zipfile.ZipFile(tmp_path / "d.zip") as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".png")]
        value = np.asarray(Image.open(io.BytesIO(archive.read(name))))
    assert (value == round(30000 / 65535 * 255)).all()  # 117, not 255


def test_disk_full_during_conversion(w, tmp_path, capsys, monkeypatch):
    def full(self, name, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.tmp / name))

    monkeypatch.setattr(convert._Writer, "write", full)
    assert main(dataset(w.images, tmp_path / "d.zip")) == 1
    line = one_error_line(capsys, "dataset")
    assert "No space left on device" in line and "d.zip.tmp-" in line
    assert list(tmp_path.iterdir()) == []  # the temporary zip was removed


def test_permission_denied_outputs(w, tmp_path, capsys, monkeypatch):
    # Tests run as root here, where chmod cannot forbid writing, so the refusal is simulated where
    # each command first writes.
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "locked"))

    monkeypatch.setattr("patchdiff.cli.checks.tempfile.mkstemp", denied)
    monkeypatch.setattr(convert._Writer, "__init__", denied)
    runs = {
        "generate": (gen(w, tmp_path / "locked"), "--outdir"),
        "fid": (
            fid(w, "ref", "--data", str(w.images), "--dest", str(tmp_path / "locked" / "r.npz")),
            "--dest",
        ),
        "dataset": (dataset(w.images, tmp_path / "locked" / "d.zip"), "--dest"),
    }
    for command, (args, flag) in runs.items():
        assert main(args) == 2
        line = one_error_line(capsys, command)
        assert flag in line and "locked" in line and "Permission denied" in line, line
    assert list(tmp_path.iterdir()) == []  # not even the folders the commands would have made


def test_ctrl_c_in_process(w, tmp_path, capsys, monkeypatch):
    calls = []

    def interrupted(image):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return png_bytes(image)

    monkeypatch.setattr(convert, "encode_png", interrupted)
    for dest in (tmp_path / "d.zip", tmp_path / "folder"):
        calls.clear()
        assert main(dataset(w.images, dest)) == 130
        err = capsys.readouterr().err
        assert (
            "Traceback" not in err
            and err.strip() == "patchdiff dataset: interrupted; partial output was removed"
        )
        assert list(tmp_path.iterdir()) == []


def test_ctrl_c_signal_to_the_command(tmp_path):
    """A real SIGINT to `python -m patchdiff dataset` once its temporary output exists. Upscaling to 512
    makes the conversion take many seconds, so the signal lands mid-way even on a loaded machine.

    Python's own SIGINT handler is in place from interpreter start-up and the temporary output is made
    inside the CLI's Ctrl-C handler (no threads or child processes), so the one way we found to see exit
    -2 (an uncaught KeyboardInterrupt, seen once under load) is a signal that lands after the command
    has finished its work, in interpreter shutdown: a test process starved of the CPU for the whole
    conversion. That case is told apart (DEST exists) and run once more."""
    rng = np.random.default_rng(0)
    for i in range(400):
        write_png(tmp_path / "src" / f"{i:04d}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    dest = tmp_path / "out" / "d.zip"
    for _attempt in range(2):
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        proc = subprocess.Popen(
            [sys.executable, "-m", "patchdiff", *dataset(tmp_path / "src", dest, "--resolution", "512")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # A shell's background job inherits SIGINT ignored, and Python then installs no Ctrl-C handler:
            # give the command the disposition a terminal's Ctrl-C meets.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.monotonic() + 60
        while not any((tmp_path / "out").glob("d.zip.tmp-*")) and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert proc.poll() is None, "finished before the signal; make the source bigger"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        if not dest.exists():  # the signal landed during the conversion, as intended
            break
    assert proc.returncode == 130 and "Traceback" not in err, (proc.returncode, out, err)
    assert err.strip() == "patchdiff dataset: interrupted; partial output was removed"
    assert not (tmp_path / "out").exists()  # the folder it made for DEST is gone too


def test_labels_of_images_beyond_max_images_are_not_missing_files(tmp_path):
    from patchdiff.data import ImageDataset

    folder = _labelled(tmp_path / "set", [[f"img{i:05d}.png", i] for i in range(3)])
    ds = ImageDataset(folder, max_images=2)
    assert ds.labels.tolist() == [0, 1] and ds.num_classes == 3


def test_warning_free_run_prints_nothing_on_stderr(w, tmp_path, capsys):
    torch.manual_seed(0)
    assert main(gen(w, tmp_path, "--seeds", "0-1")) == 0
    assert capsys.readouterr().err == ""
