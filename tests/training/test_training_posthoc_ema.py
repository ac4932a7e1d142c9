"""Post-hoc EMA: the power-function profile math against closed forms, reconstruction of a profile that
was also tracked directly, the `patchdiff ema` command, and exact resume with the EDM2 recipe."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import tiny_config

from patchdiff.cli import main
from patchdiff.config import LossConfig, network_preset
from patchdiff.training import loop
from patchdiff.training.checkpoint import load_state
from patchdiff.training.posthoc_ema import (
    PowerEMA,
    gamma_to_sigma_rel,
    power_ema_beta,
    profile_inner,
    sigma_rel_to_gamma,
    solve_weights,
)


def test_gamma_and_sigma_rel():
    # The paper's pairs (Sec. 3.2): sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94.
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.01, 0.05, 0.1, 0.2, 0.29):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-9)
    # sigma_rel is the profile's standard deviation over t: check it by integration.
    g, t = 6.94, 1.0
    tau = np.linspace(0, t, 200_001)
    p = (g + 1) * tau**g / t ** (g + 1)
    mean = np.trapezoid(tau * p, tau)
    std = np.sqrt(np.trapezoid((tau - mean) ** 2 * p, tau))
    assert std / t == pytest.approx(gamma_to_sigma_rel(g), rel=1e-4)
    with pytest.raises(ValueError, match=r"sigma_rel 0\.5"):
        sigma_rel_to_gamma(0.5)


def test_discrete_updates_follow_the_continuous_profile():
    """With beta = (1 - n/t)^(gamma+1), a step's weight is the profile's integral over its images,
    whatever the step sizes."""
    g = 4.0
    sizes = np.array([3, 7, 1, 12, 5, 8, 8, 2], dtype=float)
    t = np.cumsum(sizes)
    weights = np.zeros(len(t))
    for i in range(len(t)):  # run the EMA on unit impulses
        w = 0.0
        for j in range(len(t)):
            beta = power_ema_beta(sizes[j], t[j], g)
            w = beta * w + (1 - beta) * (1.0 if j == i else 0.0)
        weights[i] = w
    T = t[-1]
    expected = (t ** (g + 1) - np.concatenate([[0], t[:-1]]) ** (g + 1)) / T ** (g + 1)
    assert np.allclose(weights, expected)
    assert power_ema_beta(5, 5, g) == 0.0  # the first step starts from the weights themselves


def test_profile_inner_matches_numerical_integration():
    tau = np.linspace(0, 1, 400_001)
    for ta, ga, tb, gb in [(1.0, 6.9, 0.6, 17.0), (0.3, 2.0, 0.8, 2.0), (0.5, 0.5, 0.5, 9.0)]:
        pa = np.where(tau <= ta, (ga + 1) * tau**ga / ta ** (ga + 1), 0.0)
        pb = np.where(tau <= tb, (gb + 1) * tau**gb / tb ** (gb + 1), 0.0)
        assert profile_inner(ta, ga, tb, gb) == pytest.approx(np.trapezoid(pa * pb, tau), rel=1e-3)


def test_solve_weights_recovers_a_stored_profile_and_ignores_the_time_unit():
    t = [100.0, 200.0, 300.0, 100.0, 200.0, 300.0]
    g = [16.97] * 3 + [6.94] * 3
    x = solve_weights(t, g, 300.0, 6.94)
    assert np.allclose(x, [0, 0, 0, 0, 0, 1], atol=1e-6)
    y = solve_weights([v * 1e6 for v in t], g, 300.0 * 1e6, 9.0)  # images instead of kimg: same weights
    assert np.allclose(solve_weights(t, g, 300.0, 9.0), y)


def test_reconstruction_matches_a_profile_tracked_directly():
    """Track sigma_rel 0.05, 0.075 and 0.10 over a noisy drifting trajectory with uneven steps; rebuild
    0.075 from the 0.05 and 0.10 snapshots alone and compare with the one tracked directly."""
    rng = np.random.default_rng(0)
    dim, steps = 32, 400
    net = torch.nn.Linear(dim, 1, bias=False)
    sigma_rels = (0.05, 0.075, 0.10)
    phema = PowerEMA(net, sigma_rels)
    drift = rng.normal(size=dim)
    stored = {0.05: [], 0.10: []}
    t, times = 0.0, []
    for step in range(1, steps + 1):
        n = float(rng.integers(4, 16))
        t += n
        with torch.no_grad():  # a drifting, oscillating, noisy parameter trajectory
            theta = drift * np.sqrt(t / 1000) + np.sin(t / 300) + 0.3 * rng.normal(size=dim)
            net.weight.copy_(torch.tensor(theta, dtype=torch.float32)[None])
        phema.update(net, n, t)
        if step % 40 == 0:
            times.append(t)
            for s in stored:
                stored[s].append(phema.emas[sigma_rels.index(s)].weight.detach().clone())
    direct = phema.emas[1].weight
    ts = times * 2
    gs = [phema.gammas[0]] * len(times) + [phema.gammas[2]] * len(times)
    x = solve_weights(ts, gs, times[-1], phema.gammas[1])
    rebuilt = sum(float(w) * v for w, v in zip(x, stored[0.05] + stored[0.10], strict=True))
    scale = direct.abs().mean()
    assert (rebuilt - direct).abs().max() / scale < 0.02
    # Far better than the nearest tracked profile on its own.
    assert (rebuilt - direct).abs().max() < 0.2 * (stored[0.10][-1] - direct).abs().max()


def edm2_config(landscapes, outdir, **overrides):
    net = network_preset(
        "edm2", 16, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.0
    )
    base = dict(
        network=net,
        loss=LossConfig(weighting="learned"),
        lr=0.01,
        lr_schedule="isqrt",
        lr_ref_kimg=0.1,
        posthoc_ema=(0.05, 0.10),
    )
    return tiny_config(str(landscapes), str(outdir), **{**base, **overrides})


def test_resume_is_exact_with_the_edm2_recipe(landscapes, tmp_path):
    full = loop.train(edm2_config(landscapes, tmp_path / "a", duration_kimg=0.3), progress=False, grid=0)
    part = loop.train(edm2_config(landscapes, tmp_path / "b", duration_kimg=0.15), progress=False, grid=0)
    resumed = loop.train(
        edm2_config(landscapes, tmp_path / "b", duration_kimg=0.3), resume="auto", progress=False, grid=0
    )
    assert resumed == part
    a, b = load_state(full / "state.pt"), load_state(resumed / "state.pt")
    assert json.loads(a["counters"])["step"] == json.loads(b["counters"])["step"]
    assert sorted(a["phema"]) == ["0.05", "0.1"]
    assert any(name.startswith("logvar.") for name in a["denoiser"])  # the learned weighting trains
    for key in ("denoiser", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    for s in a["phema"]:
        for name, tensor in a["phema"][s].items():
            assert torch.equal(tensor, b["phema"][s][name]), f"phema {s} {name} differs after resume"
    # The tracked profiles cannot change mid-run: they average from step 0.
    other_profiles = edm2_config(landscapes, tmp_path / "b", duration_kimg=0.4, posthoc_ema=(0.05,))
    with pytest.raises(ValueError, match="posthoc_ema"):
        loop.train(other_profiles, resume="auto", progress=False, grid=0, overrides={"posthoc_ema"})
    # The snapshots of the resumed run hold the same profiles as the uninterrupted one's.
    (last,) = sorted(full.glob("phema-*-0.050.safetensors"))[-1:]
    other = load_file(str(resumed / last.name))
    assert all(torch.equal(v, other[k]) for k, v in load_file(str(last)).items())


def test_ema_command_reconstructs_snapshots(landscapes, tmp_path, capsys):
    run = loop.train(edm2_config(landscapes, tmp_path / "runs", duration_kimg=0.2), progress=False, grid=0)
    steps = sorted(int(p.name.split("-")[1]) for p in run.glob("phema-*-0.050.safetensors"))
    assert len(steps) >= 2
    dest = tmp_path / "ema"
    assert main(["ema", str(run), "--sigma-rel", "0.1,0.07", "--dest", str(dest)]) == 0
    out = dest / "sigma-0.100" / f"snapshot-{steps[-1]:08d}.safetensors"
    tracked = load_file(str(run / f"phema-{steps[-1]:08d}-0.100.safetensors"))
    rebuilt = load_file(str(out))
    for k, v in tracked.items():  # a tracked sigma_rel comes back as itself
        assert torch.allclose(rebuilt[k], v, atol=1e-5), k
    between = load_file(str(dest / "sigma-0.070" / out.name))
    assert any(not torch.allclose(between[k], v) for k, v in tracked.items())
    # An earlier step, and the reconstructed folder samples like a run.
    assert (
        main(["ema", str(run), "--sigma-rel", "0.07", "--dest", str(dest / "early"), "--step", str(steps[0])])
        == 0
    )
    assert (dest / "early" / "sigma-0.070" / f"snapshot-{steps[0]:08d}.safetensors").is_file()
    gen = [
        "generate",
        "--model",
        str(dest / "sigma-0.070"),
        "--outdir",
        str(tmp_path / "img"),
        "--seeds",
        "0-1",
    ]
    assert main([*gen, "--steps", "3", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["ema", str(run), "--sigma-rel", "0.4", "--dest", str(dest)]) == 2
    assert "--sigma-rel" in capsys.readouterr().err
    assert main(["ema", str(tmp_path), "--sigma-rel", "0.1", "--dest", str(dest)]) == 2
    assert "--posthoc-ema" in capsys.readouterr().err
    assert main(["ema", str(run), "--sigma-rel", "0.1", "--dest", str(dest), "--step", "99999"]) == 2


def test_lr_schedule_and_cli_defaults(landscapes, tmp_path):
    from patchdiff.cli import build_parser
    from patchdiff.training.flags import config_from_flags
    from patchdiff.training.optim import lr_at

    cfg = dataclasses.replace(edm2_config(landscapes, tmp_path), lr=0.01, lr_rampup_kimg=1.0, lr_ref_kimg=4.0)
    assert lr_at(500, 0, 1, cfg) == pytest.approx(0.005)  # warm-up
    assert lr_at(3000, 0, 1, cfg) == pytest.approx(0.01)  # before t_ref
    assert lr_at(16000, 0, 1, cfg) == pytest.approx(0.005)  # 1 / sqrt(16 / 4)
    flat = dataclasses.replace(cfg, lr_schedule="rampup")
    assert lr_at(16000, 0, 1, flat) == pytest.approx(0.01)
    default_ref = dataclasses.replace(cfg, lr_ref_kimg=0.0, batch=10, lr_rampup_kimg=0.0)
    assert lr_at(4 * 70_000 * 10, 0, 1, default_ref) == pytest.approx(0.005)  # t_ref = 70k steps

    base = ["train", "--data", str(landscapes), "--outdir", str(tmp_path)]
    edm2 = config_from_flags(build_parser().parse_args([*base, "--arch", "edm2", "--edm2-size", "tiny"]))
    assert (edm2.loss.weighting, edm2.lr_schedule, edm2.posthoc_ema, edm2.lr) == (
        "learned",
        "isqrt",
        (0.05, 0.1),
        0.012,
    )
    assert edm2.network.model_channels == 32 and edm2.network.dropout == 0.0
    ddpm = config_from_flags(build_parser().parse_args(base))
    assert (ddpm.loss.weighting, ddpm.lr_schedule, ddpm.posthoc_ema, ddpm.lr) == ("edm", "rampup", (), 10e-4)
    flags = [
        "--loss-weighting",
        "learned",
        "--lr-schedule",
        "isqrt",
        "--lr-ref-kimg",
        "50",
        "--posthoc-ema",
        "0.1",
    ]
    other = config_from_flags(build_parser().parse_args([*base, *flags]))
    assert (other.loss.weighting, other.lr_schedule, other.lr_ref_kimg, other.posthoc_ema) == (
        "learned",
        "isqrt",
        50.0,
        (0.1,),
    )


def test_learned_weighting_with_another_backbone(landscapes, tmp_path):
    """DDPM++ with the learned weighting: u(sigma) trains, and its loss is lambda*err/exp(u) + u."""
    from patchdiff.denoisers import build_denoiser
    from patchdiff.loss import edm_loss

    cfg = tiny_config(str(landscapes), str(tmp_path), loss=LossConfig(weighting="learned"))
    torch.manual_seed(0)
    denoiser = build_denoiser(cfg)
    y = torch.rand(4, 3, 8, 8) * 2 - 1
    loss = edm_loss(denoiser, y, cfg=cfg.loss, generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert (
        denoiser.logvar.linear.weight.grad is not None and denoiser.logvar.linear.weight.grad.abs().sum() > 0
    )
    # By hand, from the same draws.
    g = torch.Generator().manual_seed(1)
    sigma = (torch.randn(4, generator=g) * cfg.loss.P_std + cfg.loss.P_mean).exp().reshape(-1, 1, 1, 1)
    n = torch.randn(y.shape, generator=g) * sigma
    with torch.no_grad():
        D, u = denoiser(y + n, sigma.reshape(-1), return_logvar=True)
        lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
        expected = (lam * (D - y) ** 2 / u.exp().reshape(-1, 1, 1, 1) + u.reshape(-1, 1, 1, 1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_bad_posthoc_flags_are_refused_before_anything_is_written(landscapes, tmp_path, capsys):
    base = ["train", "--data", str(landscapes), "--outdir", str(tmp_path / "runs"), "--arch", "edm2"]
    for flags, words in [
        (["--posthoc-ema", "0.05,0.4"], "--posthoc-ema 0.4"),
        (["--posthoc-ema", "0.1,0.1"], "repeated"),
        (["--lr-ref-kimg", "-1"], "--lr-ref-kimg -1"),
    ]:
        assert main([*base, *flags]) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_fid_calc_sweeps_sigma_rel_in_memory(landscapes, tiny_detector, tiny_run, tmp_path, capsys):
    """`fid calc --sigma-rel` scores each reconstructed profile on the same seeds: the same numbers as
    scoring the snapshot `patchdiff ema` writes, one line each with the best marked, and a JSON file."""
    from patchdiff.training.posthoc_ema import best_sigma_rel, sweep_sigma_rel

    run = loop.train(edm2_config(landscapes, tmp_path / "runs", duration_kimg=0.2), progress=False, grid=0)
    det = ["--detector", tiny_detector, "--batch", "4", "--workers", "0", "--no-progress", "--device", "cpu"]
    ref = tmp_path / "ref.npz"
    assert main(["fid", "ref", "--data", str(landscapes), "--dest", str(ref), *det]) == 0
    calc = ["fid", "calc", "--ref", str(ref), "--num", "6", "--steps", "3", *det]
    sweep = [*calc, "--model", str(run), "--sigma-rel", "0.05,0.2,0.1", "--json", str(tmp_path / "s.json")]
    capsys.readouterr()
    assert main(sweep) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sigma_rel")]
    assert [line.split()[1] for line in lines] == ["0.050", "0.200", "0.100"]
    fids = [float(line.split()[line.split().index("fid") + 1]) for line in lines]
    assert len(set(fids)) == 3  # the profiles differ, so do their samples
    assert [line.endswith("<- best") for line in lines] == [f == min(fids) for f in fids]
    record = json.loads((tmp_path / "s.json").read_text())
    assert [r["sigma_rel"] for r in record["sweep"]] == [0.05, 0.2, 0.1]
    assert record["best_sigma_rel"] == [0.05, 0.2, 0.1][fids.index(min(fids))]
    assert [r["fid"] for r in record["sweep"]] == pytest.approx(fids, abs=1e-4)

    # In memory == from the file `patchdiff ema` writes, on the same seeds.
    assert main(["ema", str(run), "--sigma-rel", "0.2", "--dest", str(tmp_path / "ema")]) == 0
    capsys.readouterr()
    assert main([*calc, "--model", str(tmp_path / "ema" / "sigma-0.200")]) == 0
    from_file = float(capsys.readouterr().out.split("fid ")[-1].split()[0])
    assert from_file == pytest.approx(fids[1], rel=1e-3, abs=1e-4)

    # The Python API, with KID too, at an earlier snapshot.
    steps = sorted(int(p.name.split("-")[1]) for p in run.glob("phema-*-0.050.safetensors"))
    rows = sweep_sigma_rel(
        ["fid", "kid"], run, [0.1, 0.07], ref, 6, tiny_detector, 4, step=steps[0], num_steps=3, device="cpu"
    )
    assert [(r["sigma_rel"], r["step"]) for r in rows] == [(0.1, steps[0]), (0.07, steps[0])]
    assert {"fid", "kid", "kid_std"} <= set(rows[0]) and best_sigma_rel(rows) in rows

    # A run without profiles, or a sweep without a run folder: one line saying what to do.
    assert main([*calc, "--model", str(tiny_run), "--sigma-rel", "0.1"]) == 2
    assert "--posthoc-ema" in capsys.readouterr().err
    assert main([*calc, "--images", str(landscapes), "--sigma-rel", "0.1"]) == 2
    assert "--model RUN_DIR" in capsys.readouterr().err
    assert main([*calc, "--model", str(run), "--sigma-rel", "0.5"]) == 2
    assert "--sigma-rel" in capsys.readouterr().err
    assert main([*calc, "--model", str(run), "--sigma-rel", "0.1", "--class", "3"]) == 2
    assert "unconditional" in capsys.readouterr().err
    assert main([*calc, "--model", str(run), "--step", "1"]) == 2
    assert "--step 1 needs --sigma-rel" in capsys.readouterr().err
