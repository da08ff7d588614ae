"""Tests of proxygap_helpers.dimensionality: participation ratio, streaming covariance, TwoNN (gate D3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from proxygap_helpers import dimensionality as D


def _rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


def test_participation_ratio_known_spectrum():
    # eigenvalues 3, 1, 0, 0: (3 + 1)^2 / (9 + 1) = 1.6, in any basis
    q = _rotation(4, 0)
    cov = q @ np.diag([3.0, 1.0, 0.0, 0.0]) @ q.T
    assert D.participation_ratio(cov) == pytest.approx(1.6, rel=1e-12)
    # isotropic: PR = d; one direction: PR = 1; zero matrix: NaN
    assert D.participation_ratio(np.eye(7) * 2.5) == pytest.approx(7.0, rel=1e-12)
    v = q[:, :1]
    assert D.participation_ratio(v @ v.T) == pytest.approx(1.0, rel=1e-12)
    assert np.isnan(D.participation_ratio(np.zeros((3, 3))))
    with pytest.raises(ValueError, match="square"):
        D.participation_ratio(np.zeros((2, 3)))


def test_participation_ratio_equals_eigenvalue_formula():
    a = np.random.default_rng(1).normal(size=(50, 9)) * np.arange(1, 10)
    cov = np.cov(a, rowvar=False, bias=True)
    lam = np.linalg.eigvalsh(cov)
    assert D.participation_ratio(cov) == pytest.approx(lam.sum() ** 2 / (lam**2).sum(), rel=1e-12)


def test_covariance_accumulator_streams_like_numpy():
    g = np.random.default_rng(2)
    x = g.normal(size=(900, 6)) @ g.normal(size=(6, 6)) + 500.0  # large mean: cancellation-prone
    acc = D.CovarianceAccumulator()
    for chunk in (slice(0, 1), slice(1, 400), slice(400, 900)):
        acc.add(torch.from_numpy(x[chunk]))
    cov = np.cov(x, rowvar=False, bias=True)
    np.testing.assert_allclose(acc.cov.numpy(), cov, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(acc.mean.numpy(), x.mean(0), rtol=1e-12)
    r = acc.result()
    assert r["n"] == 900
    assert r["sst_per_token"] == pytest.approx(((x - x.mean(0)) ** 2).sum() / 900, rel=1e-10)
    assert r["norm_mean"] == pytest.approx(np.linalg.norm(x, axis=1).mean(), rel=1e-12)
    assert r["sq_norm_mean"] == pytest.approx((x**2).sum(1).mean(), rel=1e-12)
    assert r["participation_ratio"] == pytest.approx(D.participation_ratio(cov), rel=1e-9)
    # leading dimensions are flattened
    acc3 = D.CovarianceAccumulator()
    acc3.add(torch.from_numpy(x).reshape(30, 30, 6))
    np.testing.assert_allclose(acc3.cov.numpy(), cov, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("true_dim, ambient", [(2, 10), (5, 20)])
def test_twonn_on_a_linear_manifold(true_dim, ambient):
    """Uniform points in a true_dim-cube, embedded linearly (random rotation) in ambient dimensions."""
    g = np.random.default_rng(true_dim)
    z = g.uniform(size=(2000, true_dim))
    x = np.concatenate([z, np.zeros((2000, ambient - true_dim))], axis=1) @ _rotation(ambient, 3)
    assert D.twonn_dimension(x) == pytest.approx(true_dim, rel=0.12)


def test_twonn_on_a_curved_manifold():
    """The unit sphere S^2 in R^3 (dimension 2) and a helix-like curve in R^8 (dimension 1)."""
    g = np.random.default_rng(4)
    s = g.normal(size=(2000, 3))
    s /= np.linalg.norm(s, axis=1, keepdims=True)
    assert D.twonn_dimension(s) == pytest.approx(2.0, rel=0.12)
    t = np.sort(g.uniform(0, 6 * np.pi, 1500))
    curve = np.stack([np.cos(t), np.sin(t), np.cos(2 * t), np.sin(2 * t), t / 5, *(0 * t for _ in range(3))], 1)
    assert D.twonn_dimension(curve @ _rotation(8, 5)) == pytest.approx(1.0, rel=0.12)


def test_twonn_duplicates_and_degenerate_input():
    g = np.random.default_rng(6)
    x = g.uniform(size=(800, 3))
    base = D.twonn_dimension(x)
    assert D.twonn_dimension(np.concatenate([x, x[:300]])) == pytest.approx(base, rel=1e-12)  # duplicates dropped
    assert np.isnan(D.twonn_dimension(np.ones((10, 4))))  # one distinct point
    with pytest.raises(ValueError, match="fit_fraction"):
        D.twonn_dimension(x, fit_fraction=0)


def test_subsample_positions_is_fixed_and_masked():
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[0, :] = False
    a = D.subsample_positions(mask, 10, seed=3)
    assert len(a) == 10 and torch.equal(a, D.subsample_positions(mask, 10, seed=3))
    assert not torch.equal(a, D.subsample_positions(mask, 10, seed=4))
    assert mask.reshape(-1)[a].all() and (a.diff() > 0).all()
    assert len(D.subsample_positions(mask, 1000, seed=0)) == int(mask.sum())
