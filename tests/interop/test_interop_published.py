"""Importing published Patch Diffusion / EDM snapshots: the restricted unpickler, the weight mapping, the
`patchdiff import` command, and what runs on the imported snapshot afterwards."""

from __future__ import annotations

import math
import os
import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from patchdiff.cli import main
from patchdiff.generation import load
from patchdiff.interop.convert import convert, qkv_order
from patchdiff.interop.published import PublishedError, read_published
from patchdiff.interop.snapshot import import_published

# Beside the repository (../shared), as the fixtures' README says; never copied into it.
FIXTURES = Path(
    os.environ.get("PATCHDIFF_PUBLISHED_FIXTURES")
    or Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "published-snapshots"
)
# A checkout without the folder beside it cannot run these; with it (the project's machines) they all run.
pytestmark = pytest.mark.skipif(
    not FIXTURES.is_dir(),
    reason=f"the published-snapshot fixtures are not at {FIXTURES} (set PATCHDIFF_PUBLISHED_FIXTURES)",
)
NAMES = ["patch-ddpmpp-uncond", "patch-ncsnpp-uncond", "patch-adm-latent-cond", "edm-ddpmpp-cond"]
ARCHS = {"patch-ddpmpp-uncond": "ddpmpp", "patch-ncsnpp-uncond": "ncsnpp", "patch-adm-latent-cond": "adm"}
TOLERANCE = 1e-5  # max |dD| / max |D|


def relative_error(name: str, denoiser) -> float:
    ref = np.load(FIXTURES / f"{name}-reference.npz")
    arg = {k: torch.from_numpy(ref[k]) for k in ("x", "sigma", "x_pos", "class_labels") if k in ref}
    with torch.no_grad():
        D = denoiser(arg["x"], arg["sigma"], arg.get("x_pos"), arg.get("class_labels"))
    expected = torch.from_numpy(ref["D"])
    return float((D - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("name", NAMES)
def test_imported_snapshot_reproduces_the_published_output(name, tmp_path):
    path, conv = import_published(FIXTURES / f"{name}.pkl", tmp_path / "imported")
    assert conv.network.arch == ARCHS.get(name, "ddpmpp")
    assert conv.network.coord_channels == (2 if name.startswith("patch") else 0)
    model = load(path, "cpu")  # through the written safetensors + config, as generate loads it
    error = relative_error(name, model.denoiser)
    print(f"{name}: max|dD|/max|D| = {error:.2e}")
    assert error < TOLERANCE


def test_our_layout_differs_where_the_options_say(tmp_path):
    """Without the edm_* options (our own layout) the published weights give another output: the
    options are needed, and the test above can fail."""
    import dataclasses

    from patchdiff.networks import build_network
    from patchdiff.precond import Denoiser

    for name, option in (
        ("patch-ddpmpp-uncond", "edm_noise_endpoint"),
        ("patch-ncsnpp-uncond", "edm_aux_conv_first"),
    ):
        conv = convert(read_published(FIXTURES / f"{name}.pkl")["ema"])
        net = build_network(dataclasses.replace(conv.network, **{option: False}))
        # the same weights; only the progressive input's conv sits at another place in the module tree
        net.load_state_dict(
            {k.replace(".conv.", ".1.") if k.startswith("enc_aux") else k: v for k, v in conv.state.items()}
        )
        assert relative_error(name, Denoiser(net, conv.sigma_data).eval()) > 1e-3


def test_qkv_order_is_a_permutation_that_regroups_q_k_v():
    order = qkv_order(heads=2, channels=4)  # theirs: head-major, then channel, then (q, k, v)
    assert sorted(order.tolist()) == list(range(12))
    assert order[:4].tolist() == [0, 3, 6, 9]  # our q rows: every head's q of each channel


def test_evil_module_source_is_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import_published(FIXTURES / "evil-module-src.pkl", tmp_path / "out")
    assert not list(tmp_path.rglob("PWNED*"))
    assert not Path("PWNED-by-module-src").exists()


def test_plain_values_and_tensors_load():
    """What a snapshot's plain attributes may hold: numpy arrays and scalars, ordered dicts, tensors."""
    import io

    from patchdiff.interop.published import RestrictedUnpickler

    values = dict(a=np.arange(6, dtype=np.float32).reshape(2, 3), s=np.float64(2.5), o=OrderedDict(x=1))
    values["t"] = torch.arange(4.0)[1:]  # a view: offset and stride survive
    loaded = RestrictedUnpickler(io.BytesIO(pickle.dumps(values, protocol=4))).load()
    assert np.array_equal(loaded["a"], values["a"]) and loaded["s"] == 2.5 and loaded["o"] == values["o"]
    assert torch.equal(loaded["t"], torch.tensor([1.0, 2.0, 3.0]))


# --------------------------------------------------------------------------- hostile and broken files


class SystemCall:
    def __reduce__(self):
        return os.system, ("touch PWNED-by-os-system",)


class Eval:
    def __reduce__(self):
        import builtins

        return builtins.eval, ("open('PWNED-by-eval', 'w')",)


def _write(path: Path, obj) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=4))
    return path


def hostile_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a word the one-line refusal must contain)."""
    good = (FIXTURES / "patch-ddpmpp-uncond.pkl").read_bytes()
    (tmp / "truncated.pkl").write_bytes(good[: len(good) // 2])
    (tmp / "random.pkl").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp / "empty.pkl").write_bytes(b"")
    system_name = f"{os.system.__module__}.system"  # posix.system or nt.system
    return {
        "os.system": (_write(tmp / "system.pkl", {"ema": SystemCall()}), system_name),
        "eval": (_write(tmp / "eval.pkl", {"ema": Eval()}), "builtins.eval"),
        "truncated": (tmp / "truncated.pkl", "damaged"),
        "random bytes": (tmp / "random.pkl", "random.pkl"),
        "empty": (tmp / "empty.pkl", "damaged"),
        "not a snapshot": (_write(tmp / "list.pkl", [1, 2, 3]), "not a published network snapshot"),
        "no ema": (_write(tmp / "dict.pkl", OrderedDict(a=1)), "no 'ema' network"),
    }


def test_hostile_and_broken_pickles_are_refused_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for label, (path, word) in hostile_files(tmp_path).items():
        with pytest.raises(PublishedError) as info:
            read_published(path)
        message = str(info.value)
        assert "\n" not in message and str(path) in message and word in message, (label, message)
        # and through the command line: exit 2, one line, nothing written
        assert main(["import", str(path), "--dest", str(tmp_path / label)]) == 2, label
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "patchdiff import: error:" in err, (label, err)
        assert not (tmp_path / label).exists()
    assert not list(tmp_path.glob("PWNED*"))


@pytest.fixture
def persistence(monkeypatch):
    """A stand-in `torch_utils.persistence` module, so the test can write persistent-class pickles of its
    own (what the published code writes: a reconstruct call with the module source and the state)."""
    module = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # never called: only its name is pickled
        raise AssertionError

    _reconstruct_persistent_obj.__module__ = module.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    monkeypatch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", module)

    class Persistent:
        def __init__(self, class_name, state, src="open('PWNED-by-src', 'w')"):
            self.meta = dict(type="class", version=6, module_src=src, class_name=class_name, state=state)

        def __reduce__(self):
            return _reconstruct_persistent_obj, (self.meta,)

    return Persistent


def test_unknown_classes_are_refused_naming_them(tmp_path, persistence, monkeypatch):
    monkeypatch.chdir(tmp_path)
    iddpm = _write(tmp_path / "iddpm.pkl", {"ema": persistence("iDDPMPrecond", {"_modules": {}})})
    with pytest.raises(PublishedError, match="network class iDDPMPrecond is not supported"):
        convert(read_published(iddpm)["ema"])
    backbone = persistence("MyUNet", {"_init_kwargs": {}})
    odd = _write(tmp_path / "odd.pkl", {"ema": persistence("EDMPrecond", {"_modules": {"model": backbone}})})
    with pytest.raises(PublishedError, match="backbone class MyUNet is not supported"):
        convert(read_published(odd)["ema"])
    # Records whose state is not a module's
    from patchdiff.interop.published import Record

    with pytest.raises(PublishedError, match="malformed network record"):
        convert(Record("EDMPrecond", {"_modules": [1, 2]}))
    # A persistent object whose state smuggles a global is refused at that global.
    smuggled = _write(tmp_path / "smuggled.pkl", {"ema": persistence("EDMPrecond", {"x": SystemCall()})})
    with pytest.raises(PublishedError, match=r"refused: it refers to \w+\.system"):
        read_published(smuggled)
    assert not list(tmp_path.glob("PWNED*"))


# --------------------------------------------------------------------------- the imported snapshot in use


def test_generate_from_an_imported_snapshot(tmp_path, capsys):
    dest = tmp_path / "imported"
    assert main(["import", str(FIXTURES / "patch-ncsnpp-uncond.pkl"), "--dest", str(dest)]) == 0
    assert "ncsnpp" in capsys.readouterr().out
    out = tmp_path / "images"
    args = ["generate", "--model", str(dest), "--outdir", str(out), "--seeds", "0-1", "--steps", "3"]
    assert main([*args, "--device", "cpu", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png"]
    # a second import onto the same destination is refused, the first snapshot is kept
    assert main(["import", str(FIXTURES / "patch-ncsnpp-uncond.pkl"), "--dest", str(dest)]) == 2
    assert "exists" in capsys.readouterr().err


def test_fine_tune_an_imported_snapshot(tmp_path, landscapes, capsys):
    """`train --init-snapshot`: a new run with the imported network, starting from its weights."""
    from patchdiff.snapshot import newest_snapshot, read_snapshot

    snap, conv = import_published(FIXTURES / "patch-ddpmpp-uncond.pkl", tmp_path / "imported")
    train = f"train --data {landscapes} --outdir {tmp_path / 'runs'} --init-snapshot {snap.parent}".split()
    flags = "--duration 0.016 --tick 0.008 --snap 1 --batch 8 --lr 1e-7 --workers 0 --grid 0 --no-progress"
    assert main([*train, *flags.split()]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    tuned, cfg, _ = read_snapshot(newest_snapshot(run))
    assert cfg.network == conv.network and cfg.init_snapshot == str(snap.parent)
    start, _, _ = read_snapshot(snap)
    assert tuned.keys() == start.keys()
    # a few steps at a tiny learning rate: the weights it started from, up to that step (a fresh
    # initialisation would differ by ~0.1)
    assert max(float((tuned[k] - start[k]).abs().max()) for k in start) < 1e-4
    capsys.readouterr()

    # network flags contradict the snapshot's network: refused before anything is written
    assert main([*train, *flags.split(), "--cbase", "32"]) == 2
    assert "drop --cbase" in capsys.readouterr().err
    # data that does not fit the snapshot (8x8 images for a 16x16 network)
    small = tmp_path / "small"
    small.mkdir()
    from PIL import Image

    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(small / f"{i}.png")
    bad = f"train --data {small} --outdir {tmp_path / 'runs2'} --init-snapshot {snap}".split()
    assert main([*bad, *flags.split()]) == 2
    assert "resolution 16 (data: 8)" in capsys.readouterr().err


def test_fid_of_an_imported_snapshot(tmp_path, tiny_detector, capsys):
    from patchdiff.metrics.fid import reference_from_features, save_reference

    snap, _ = import_published(FIXTURES / "patch-ddpmpp-uncond.pkl", tmp_path / "imported.safetensors")
    ref = tmp_path / "ref.npz"
    save_reference(reference_from_features(np.random.default_rng(0).random((8, 16)), kid_features=0), ref)
    argv = f"fid calc --model {snap} --num 4 --ref {ref} --detector {tiny_detector} --device cpu".split()
    churn = [
        "--sampler",
        "heun",
        "--steps",
        "3",
        "--S-churn",
        "5",
        "--batch",
        "2",
        "--workers",
        "0",
        "--no-progress",
    ]
    assert main([*argv, *churn]) == 0
    fid = float(capsys.readouterr().out.split("fid ")[1].split()[0])
    assert np.isfinite(fid) and fid > 0


def test_generate_from_an_imported_latent_snapshot(tmp_path, capsys):
    """A latent network imported with --vae decodes to pixels: 8x8x4 latents -> 64x64 RGB images."""
    from PIL import Image
    from tests.vae import make_tiny_vae

    vae = make_tiny_vae(tmp_path / "vae")  # SD's VAE shape (8 pixels per latent), few channels
    dest = tmp_path / "latent"
    assert (
        main(["import", str(FIXTURES / "patch-adm-latent-cond.pkl"), "--dest", str(dest), "--vae", str(vae)])
        == 0
    )
    assert "adm, 8x8x4, 10 classes, coordinates" in capsys.readouterr().out
    out = tmp_path / "images"
    args = [
        "generate",
        "--model",
        str(dest),
        "--outdir",
        str(out),
        "--seeds",
        "0-1",
        "--steps",
        "3",
        "--class",
        "3",
    ]
    assert main([*args, "--device", "cpu", "--no-progress"]) == 0
    with Image.open(out / "000001.png") as image:
        assert image.size == (64, 64) and image.mode == "RGB"


# --------------------------------------------------------------------------- EDM's VP and VE wrappers


def repickled(record, persistence):
    """A Record read from a fixture, as persistent objects again (every module, containers included, as
    a persistent class: the importer reads only class names, sub-modules and tensors)."""
    from patchdiff.interop.published import Record

    def convert_value(value):
        if isinstance(value, Record):
            return persistence(value.class_name, {k: convert_value(v) for k, v in value.state.items()})
        if isinstance(value, dict):
            return type(value)((k, convert_value(v)) for k, v in value.items())
        return value

    return convert_value(record)


def wrapper_pickle(tmp_path, persistence, class_name: str, **constants) -> Path:
    """edm-ddpmpp-cond.pkl's EDMPrecond record rewritten as EDM's VPPrecond / VEPrecond around the same
    DDPM++ backbone: another class name, the wrapper's constants as attributes and keyword arguments."""
    ema = read_published(FIXTURES / "edm-ddpmpp-cond.pkl")["ema"]
    state = {k: v for k, v in ema.state.items() if k != "sigma_data"}
    state["_init_kwargs"] = {**state["_init_kwargs"], **constants}
    state.update(constants)
    ema.class_name, ema.state = class_name, state
    return _write(tmp_path / f"{class_name}.pkl", {"ema": repickled(ema, persistence)})


VP_CONSTANTS = dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5)
VE_CONSTANTS = dict(sigma_min=0.02, sigma_max=100.0)


def closed_form(precond: str, sigma: float) -> tuple[float, float, float, float]:
    """(c_skip, c_out, c_in, c_noise) of EDM Table 1 in float64, written out independently."""
    if precond == "vp":
        beta_d, beta_min, M = 19.9, 0.1, 1000
        # t solves beta_d t^2 / 2 + beta_min t - log(1 + sigma^2) = 0 (the positive root)
        t = (-beta_min + math.sqrt(beta_min**2 + 2 * beta_d * math.log(1 + sigma**2))) / beta_d
        return 1.0, -sigma, 1 / math.sqrt(sigma**2 + 1), (M - 1) * t
    return 1.0, sigma, 1.0, math.log(sigma / 2)


@pytest.mark.parametrize(
    "class_name,precond,constants",
    [("VPPrecond", "vp", VP_CONSTANTS), ("VEPrecond", "ve", VE_CONSTANTS)],
)
def test_vp_and_ve_wrappers_import_with_their_preconditioning(
    tmp_path, persistence, monkeypatch, class_name, precond, constants
):
    monkeypatch.chdir(tmp_path)
    pkl = wrapper_pickle(tmp_path, persistence, class_name, **constants)
    path, conv = import_published(pkl, tmp_path / "imported")
    assert conv.network.precond == precond and conv.source == f"{class_name}(SongUNet)"
    model = load(path, "cpu")
    assert model.denoiser.precond == precond
    ref = np.load(FIXTURES / "edm-ddpmpp-cond-reference.npz")
    x, labels = torch.from_numpy(ref["x"]), torch.from_numpy(ref["class_labels"])
    net = model.denoiser.net
    for s in (0.02, 0.5, 1.0, 40.0):
        c_skip, c_out, c_in, c_noise = closed_form(precond, s)
        with torch.no_grad():
            F = net(c_in * x, torch.full((x.shape[0],), c_noise), labels).double()
            D = model.denoiser(x, s, None, labels).double()
        expected = c_skip * x.double() + c_out * F
        error = float((D - expected).abs().max() / expected.abs().max())
        print(f"{class_name} sigma={s}: max|dD|/max|D| = {error:.2e}")
        assert error < TOLERANCE, (s, error)
    # and not EDM's preconditioning: the same backbone under "edm" answers otherwise
    edm = load(path, "cpu").denoiser
    edm.precond = "edm"
    with torch.no_grad():
        assert (edm(x, 1.0, None, labels) - model.denoiser(x, 1.0, None, labels)).abs().max() > 1e-2
    assert not list(tmp_path.glob("PWNED*"))


def test_vp_and_ve_wrappers_with_other_constants_are_refused(tmp_path, persistence, monkeypatch):
    monkeypatch.chdir(tmp_path)
    vp = wrapper_pickle(tmp_path, persistence, "VPPrecond", **{**VP_CONSTANTS, "beta_d": 20.0})
    with pytest.raises(
        PublishedError, match=r"VPPrecond\(SongUNet\) has beta_d=20; only the paper.s beta_d=19\.9"
    ):
        convert(read_published(vp)["ema"])
    ve = wrapper_pickle(tmp_path, persistence, "VEPrecond", **{**VE_CONSTANTS, "sigma_max": 500.0})
    with pytest.raises(PublishedError, match="sigma_max=500"):
        convert(read_published(ve)["ema"])


def test_generate_from_an_imported_vp_snapshot(tmp_path, persistence, monkeypatch, capsys, landscapes):
    monkeypatch.chdir(tmp_path)
    pkl = wrapper_pickle(tmp_path, persistence, "VPPrecond", **VP_CONSTANTS)
    dest = tmp_path / "imported"
    assert main(["import", str(pkl), "--dest", str(dest)]) == 0
    assert "VPPrecond(SongUNet) as ddpmpp" in capsys.readouterr().out
    out = tmp_path / "images"
    args = ["generate", "--model", str(dest), "--outdir", str(out), "--seeds", "0-1", "--steps", "3"]
    assert main([*args, "--class", "3", "--device", "cpu", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png"]
    # fine-tuning a VP network would need EDM's VP training: refused in one line, nothing written
    train = f"train --data {landscapes} --outdir {tmp_path / 'runs'} --init-snapshot {dest}".split()
    assert main([*train, "--duration", "0.016", "--batch", "8", "--workers", "0"]) == 2
    assert "VP preconditioning" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
