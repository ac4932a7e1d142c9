"""Frechet distance against closed forms, feature statistics, reference files, scoring."""

import numpy as np
import pytest
import scipy.linalg
import torch

from patchdiff.metrics.fid import (
    Reference,
    check_reference,
    feature_statistics,
    frechet_distance,
    load_reference,
    parse_metric_names,
    reference_from_features,
    save_reference,
    score_features,
)


def random_rotation(D: int, seed: int) -> np.ndarray:
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((D, D)))
    return Q


def test_frechet_one_dimension_closed_form():
    # W2^2 between N(m1, s1^2) and N(m2, s2^2) is (m1 - m2)^2 + (s1 - s2)^2.
    fid = frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]]))
    assert fid == pytest.approx(9.0 + 1.0)


def test_frechet_commuting_covariances_closed_form():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute: tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt a - sqrt b)^2.
    D = 12
    rng = np.random.default_rng(0)
    Q = random_rotation(D, 1)
    a, b = rng.uniform(0.1, 5.0, D), rng.uniform(0.1, 5.0, D)
    mu1, mu2 = rng.standard_normal(D), rng.standard_normal(D)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    fid = frechet_distance(mu1, Q @ np.diag(a) @ Q.T, mu2, Q @ np.diag(b) @ Q.T)
    assert fid == pytest.approx(expected, rel=1e-9)


def test_frechet_matches_scipy_sqrtm_for_general_covariances():
    D = 10
    rng = np.random.default_rng(2)
    A, B = rng.standard_normal((D, D)), rng.standard_normal((D, D))
    S1, S2 = A @ A.T + 0.1 * np.eye(D), B @ B.T + 0.1 * np.eye(D)
    mu1, mu2 = rng.standard_normal(D), rng.standard_normal(D)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(S1 + S2 - 2 * scipy.linalg.sqrtm(S1 @ S2).real)
    assert frechet_distance(mu1, S1, mu2, S2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu2, S2, mu1, S1) == pytest.approx(expected, rel=1e-8)  # symmetric


def test_frechet_singular_covariances_stay_finite_and_exact():
    # Rank-3 covariances in D=16 sharing an eigenbasis: the closed form still holds, zeros included.
    D = 16
    Q = random_rotation(D, 3)
    a = np.zeros(D)
    b = np.zeros(D)
    a[:3], b[1:4] = [1.0, 2.0, 3.0], [4.0, 0.5, 2.0]
    S1, S2 = Q @ np.diag(a) @ Q.T, Q @ np.diag(b) @ Q.T
    fid = frechet_distance(np.zeros(D), S1, np.ones(D), S2)
    assert np.isfinite(fid)
    assert fid == pytest.approx(D + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-9)


def test_frechet_of_rank_deficient_features_against_themselves_is_zero():
    features = np.random.default_rng(4).standard_normal((10, 64))  # N < D: covariance of rank 9
    mu, sigma = feature_statistics(features)
    assert np.linalg.matrix_rank(sigma) == 9
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_frechet_shape_mismatch_is_a_value_error():
    with pytest.raises(ValueError, match="same detector"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))


def test_feature_statistics_match_numpy_and_accept_tensors():
    features = np.random.default_rng(5).standard_normal((50, 7)).astype(np.float32)
    mu, sigma = feature_statistics(torch.from_numpy(features))
    assert mu.dtype == np.float64 and sigma.shape == (7, 7)
    np.testing.assert_allclose(mu, features.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False), rtol=1e-10)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(features[:1])


def test_reference_round_trip_and_edm_layout(tmp_path):
    features = np.random.default_rng(6).standard_normal((40, 5))
    ref = reference_from_features(features, kid_features=25, seed=1)
    assert ref.features.shape == (25, 5) and ref.features.dtype == np.float32
    path = tmp_path / "sub" / "ref.npz"
    save_reference(ref, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ref.npz"]  # no temp file left behind
    with np.load(path, allow_pickle=False) as data:  # EDM's layout: mu and sigma, float64
        assert data["mu"].dtype == np.float64 and data["sigma"].shape == (5, 5)
    loaded = load_reference(path)
    np.testing.assert_array_equal(loaded.mu, ref.mu)
    np.testing.assert_array_equal(loaded.sigma, ref.sigma)
    np.testing.assert_array_equal(loaded.features, ref.features)
    # An EDM-style file without features loads too; KID against it is a clear error.
    np.savez(tmp_path / "edm.npz", mu=ref.mu, sigma=ref.sigma)
    edm = load_reference(tmp_path / "edm.npz")
    assert edm.features is None
    with pytest.raises(ValueError, match="rebuild it"):
        check_reference(("fid", "kid"), edm)
    check_reference(("fid",), edm)


def test_reference_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="patchdiff fid ref"):
        load_reference(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match=r"bad\.npz.*'mu' and 'sigma'"):
        load_reference(tmp_path / "bad.npz")
    np.savez(tmp_path / "shapes.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match="inconsistent shapes"):
        load_reference(tmp_path / "shapes.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match=r"text\.npz"):
        load_reference(tmp_path / "text.npz")


def test_reference_must_be_a_covariance(tmp_path):
    # Rank-deficient statistics (fewer images than features), as real small references are, load fine:
    # their tiny negative eigenvalues are rounding. A clearly indefinite or asymmetric sigma does not.
    rng = np.random.default_rng(0)
    save_reference(
        reference_from_features(rng.normal(size=(5, 64)) * 1e3, kid_features=0), tmp_path / "ok.npz"
    )
    assert load_reference(tmp_path / "ok.npz").feature_dim == 64
    sigma = np.cov(rng.normal(size=(100, 8)), rowvar=False)
    w, V = np.linalg.eigh(sigma)
    w[0] = -0.01 * w[-1]  # one clearly negative eigenvalue: FID would come out as garbage (or 0)
    cases = {
        "indefinite": (np.zeros(8), (V * w) @ V.T, "sigma is not positive semi-definite"),
        "asymmetric": (np.zeros(8), sigma + np.triu(np.full((8, 8), 0.1), 1), "sigma is not symmetric"),
        "nan-sigma": (np.zeros(8), np.where(np.eye(8) > 0, np.nan, 0.0), "sigma holds NaN"),
        "inf-mu": (np.full(8, np.inf), sigma, "mu holds NaN"),
    }
    for name, (mu, bad_sigma, message) in cases.items():
        np.savez(tmp_path / f"{name}.npz", mu=mu, sigma=bad_sigma)
        with pytest.raises(ValueError, match=rf"{name}\.npz: {message}"):
            load_reference(tmp_path / f"{name}.npz")


def test_score_features_fid_kid_and_dimension_check():
    rng = np.random.default_rng(7)
    real = rng.standard_normal((100, 6))
    ref = reference_from_features(real, kid_features=100)
    same = score_features(["fid", "kid"], real, ref)
    assert same["fid"] == pytest.approx(0.0, abs=1e-9)
    assert set(same) == {"fid", "kid", "kid_std"}
    fresh = score_features(["kid"], rng.standard_normal((100, 6)), ref)["kid"]
    moved = score_features(["kid"], rng.standard_normal((100, 6)) + 0.5, ref)["kid"]
    assert moved > 10 * abs(fresh)
    shifted = score_features(["fid"], real + 1.0, ref)
    assert shifted == {"fid": pytest.approx(6.0, rel=1e-9)}  # ||mu shift||^2 = 6, same covariance
    with pytest.raises(ValueError, match="same detector"):
        score_features(["fid"], real[:, :5], ref)


def test_parse_metric_names():
    assert parse_metric_names("fid, KID") == ("fid", "kid")
    assert parse_metric_names(["kid", "fid", "kid"]) == ("kid", "fid")
    with pytest.raises(ValueError, match="is"):
        parse_metric_names("fid,is")
    with pytest.raises(ValueError, match="choose from"):
        parse_metric_names("")


def test_reference_feature_dim():
    assert Reference(np.zeros(4), np.eye(4)).feature_dim == 4
