"""The metric math: mergeable float64 statistics, the Frechet distance (closed forms, torch-fidelity, ADM's sqrtm,
the singular n < dim case), IS, KID and blockwise precision/recall against torch-fidelity's own functions."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import linalg

from dcdit.errors import DCDiTError
from dcdit.metrics import (BiasedEstimateWarning, FeatureStats, Moments, class_accuracy, frechet_distance,
                           inception_score, kernel_distance, precision_recall)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def random_spd(rng, d: int, scale: float = 1.0) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def closed_form(mu1, s1, mu2, s2) -> float:
    """The Frechet distance between N(mu1, s1) and N(mu2, s2) via scipy's matrix square root."""
    covmean = linalg.sqrtm(s1 @ s2).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_merged_statistics_equal_single_process():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(1000, 64)) * 3 + 1).astype(np.float32)
    whole = FeatureStats.from_features(x)
    cuts = [0, 3, 150, 151, 400, 777, 900, 1000]  # 7 uneven shards, one of a single row
    parts = [FeatureStats.from_features(x[a:b]) for a, b in zip(cuts, cuts[1:])]
    merged = FeatureStats.merge_all(parts)
    regrouped = FeatureStats.merge_all(parts[4:]) + FeatureStats.merge_all(parts[:4])
    for stats in (merged, regrouped):
        assert stats.n == whole.n == 1000
        np.testing.assert_allclose(stats.sum, whole.sum, rtol=1e-12)
        np.testing.assert_allclose(stats.sum_outer, whole.sum_outer, rtol=1e-12)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(merged.mean(), x64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(merged.covariance(), np.cov(x64, rowvar=False), rtol=1e-9, atol=1e-12)
    other = FeatureStats.from_features(rng.normal(size=(500, 64)))
    assert rel(frechet_distance(merged, other), frechet_distance(whole, other)) < 1e-9
    # A fixed merge order is bit-identical, which is what makes results independent of the worker count.
    again = FeatureStats.merge_all([FeatureStats.from_features(x[a:b]) for a, b in zip(cuts, cuts[1:])])
    assert frechet_distance(merged, other) == frechet_distance(again, other)


def test_statistics_round_trip_through_arrays():
    rng = np.random.default_rng(1)
    stats = FeatureStats.from_features(rng.normal(size=(30, 5)))
    arrays = stats.to_arrays("s")
    back = FeatureStats.from_arrays(arrays, "s")
    assert back.n == 30 and np.array_equal(back.sum_outer, stats.sum_outer)
    adm = {"mu": stats.mean(), "sigma": stats.covariance()}  # an ADM reference batch has no counts
    moments = Moments.from_arrays(adm)
    assert moments.n is None and np.array_equal(moments.sigma, stats.covariance())
    assert Moments.from_arrays(arrays, "s").n == 30


def test_bad_features_are_refused():
    with pytest.raises(DCDiTError, match="NaN"):
        FeatureStats.from_features(np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(DCDiTError, match="dimensions"):
        FeatureStats.empty(3).update(np.zeros((2, 4)))
    with pytest.raises(DCDiTError, match="cannot be compared"):
        frechet_distance(Moments(np.zeros(2), np.eye(2)), Moments(np.zeros(3), np.eye(3)))


def test_frechet_distance_of_true_moments_is_the_closed_form():
    rng = np.random.default_rng(2)
    d = 32
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d, 2.0)
    expected = closed_form(mu1, s1, mu2, s2)
    assert rel(frechet_distance(Moments(mu1, s1), Moments(mu2, s2)), expected) < 1e-9
    assert rel(frechet_distance(Moments(mu1, s1), Moments(mu2, s2), method="sqrtm"), expected) < 1e-9
    # Commuting (diagonal) covariances: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
    diagonal = float((mu1 - mu2) @ (mu1 - mu2) + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert rel(frechet_distance(Moments(mu1, np.diag(a)), Moments(mu2, np.diag(b))), diagonal) < 1e-12
    assert abs(frechet_distance(Moments(mu1, s1), Moments(mu1, s1))) < 1e-9 * np.trace(s1)


def test_fid_of_two_gaussian_samples_matches_the_closed_form():
    rng = np.random.default_rng(3)
    d, n = 8, 200_000
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    s1, s2 = random_spd(rng, d), random_spd(rng, d, 1.5)
    x = rng.multivariate_normal(mu1, s1, size=n)
    y = rng.multivariate_normal(mu2, s2, size=n)
    expected = closed_form(mu1, s1, mu2, s2)
    # Sampling error of each moment is O(1/sqrt(n)); 2% of a distance of order 2 is many standard errors.
    measured = frechet_distance(FeatureStats.from_features(x), FeatureStats.from_features(y))
    assert isinstance(measured, float)
    assert rel(measured, expected) < 0.02, (measured, expected)


def test_matches_torch_fidelity_on_well_conditioned_statistics():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(4)
    d = 64
    a = Moments(rng.normal(size=d), random_spd(rng, d))
    b = Moments(rng.normal(size=d), random_spd(rng, d, 3.0))
    theirs = fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma},
                                      False)["frechet_inception_distance"]
    assert rel(frechet_distance(a, b), theirs) < 1e-9


def test_fewer_samples_than_dimensions_warns_and_stays_exact_and_real():
    rng = np.random.default_rng(5)
    d, n1, n2 = 256, 20, 30
    x = rng.normal(size=(n1, d)) * 0.5 + 0.3
    y = rng.normal(size=(n2, d)) * 0.7
    with pytest.warns(BiasedEstimateWarning, match="20 and 30 samples in 256 dimensions"):
        fd = frechet_distance(FeatureStats.from_features(x), FeatureStats.from_features(y))
    assert isinstance(fd, float) and np.isfinite(fd)
    # Exact value from the samples: tr sqrt(S1 S2) is the nuclear norm of Xc Yc^T / sqrt((n1-1)(n2-1)).
    xc, yc = x - x.mean(0), y - y.mean(0)
    nuclear = np.linalg.svd(xc @ yc.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    dm = x.mean(0) - y.mean(0)
    exact = dm @ dm + (xc**2).sum() / (n1 - 1) + (yc**2).sum() / (n2 - 1) - 2 * nuclear
    assert rel(fd, exact) < 1e-10
    # The same with an ADM-style reference that records no count (full-rank side unknown).
    with pytest.warns(BiasedEstimateWarning):
        fd_ref = frechet_distance(FeatureStats.from_features(x), Moments(y.mean(0), np.cov(y, rowvar=False)))
    assert rel(fd_ref, exact) < 1e-8


def test_inception_score_matches_torch_fidelity_in_file_order():
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.randn(200, 50, generator=torch.Generator().manual_seed(0)) * 3
    theirs = isc_features_to_metric(logits, splits=10, shuffle=False)
    mean, std = inception_score(logits)
    assert rel(mean, theirs["inception_score_mean"]) < 1e-12
    assert rel(std, theirs["inception_score_std"]) < 1e-9
    with pytest.warns(BiasedEstimateWarning, match="5 splits"):
        inception_score(logits[:5])


def test_kid_matches_torch_fidelity_subsets():
    from torch_fidelity.metric_kid import kid_features_to_metric

    gen = torch.Generator().manual_seed(1)
    f1, f2 = torch.randn(120, 16, generator=gen), torch.randn(90, 16, generator=gen) + 0.3
    theirs = kid_features_to_metric(f1, f2, kid_subsets=10, kid_subset_size=50, verbose=False, rng_seed=2020,
                                    kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                                    kid_kernel_poly_coef0=1)
    mean, std = kernel_distance(f1, f2, subsets=10, subset_size=50)
    # torch-fidelity computes kernels in float32, this module in float64.
    assert rel(mean, theirs["kernel_inception_distance_mean"]) < 1e-4
    assert rel(std, theirs["kernel_inception_distance_std"]) < 1e-3
    with pytest.warns(BiasedEstimateWarning, match="subsets of 90"):
        kernel_distance(f1, f2, subsets=2)


def test_blockwise_precision_recall_matches_torch_fidelity():
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    gen = torch.Generator().manual_seed(2)
    real = torch.randn(70, 8, generator=gen)
    fake = torch.randn(55, 8, generator=gen) * 1.3 + 0.4
    # torch-fidelity's convention: features_1 generated, features_2 real.
    p_ref, r_ref = calculate_precision_recall_full(fake, real, neighborhood=3, batch_size=10000)
    for block in (7, 16, 4096):  # tiles smaller than, unaligned with and larger than the sets
        # Same hits: torch-fidelity averages in float32, hence the 1e-6.
        assert precision_recall(real, fake, k=3, block_size=block) == pytest.approx((p_ref, r_ref), abs=1e-6)
    with pytest.raises(DCDiTError, match="more than 3"):
        precision_recall(real[:3], fake)


def test_class_accuracy():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    assert class_accuracy(logits, [0, 1, 1]) == pytest.approx(2 / 3)


def test_no_warning_with_enough_samples():
    rng = np.random.default_rng(6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BiasedEstimateWarning)
        frechet_distance(FeatureStats.from_features(rng.normal(size=(40, 4))),
                         FeatureStats.from_features(rng.normal(size=(40, 4))))
