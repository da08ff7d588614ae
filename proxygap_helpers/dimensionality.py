"""Gate D3: how many dimensions do a model's hook activations (and an SAE's reconstructions) use?

Two estimators, both on the eval activations of one model and hook:

* **Participation ratio** of the covariance ``C`` (population covariance, ``1/N`` normalised) with
  eigenvalues ``lambda_i``: ``PR = (sum_i lambda_i)^2 / sum_i lambda_i^2 = tr(C)^2 / ||C||_F^2``
  (Gao, Trautmann et al. 2017, "A theory of multineuronal dimensionality"; Recanatesi et al. 2022). It lies
  in ``[1, d]``: 1 when one direction holds all the variance, ``d`` when the variance is isotropic. No
  eigendecomposition is needed (``tr(C)^2 / sum_ij C_ij^2`` is the same number). Dimensionless.
  :class:`CovarianceAccumulator` builds ``C`` in float64 from batches.
* **TwoNN intrinsic dimension** (Facco, d'Errico, Rodriguez & Laio 2017, Sci. Rep. 7:12140): for each point
  the ratio ``mu = r2 / r1`` of its second- to first-nearest-neighbour distance is Pareto-distributed,
  ``F(mu) = 1 - mu^(-d)``, on a manifold of dimension ``d`` (locally uniform density). Their estimator fits
  ``-log(1 - F_emp(mu_(i))) = d log mu_(i)`` by least squares through the origin on the sorted ratios,
  leaving out the largest ``1 - fit_fraction`` (10%) of them, which are the most noise-sensitive.
  Duplicate points (``r1 = 0``) are removed first, as the paper prescribes. Dimensionless.

The same sum ``tr(C)`` is the SST per token that R² divides by (``sst_per_token``): the study's author
explains ΔR² > 0 by this "SST inflation" of the larger model.
"""

from __future__ import annotations

import numpy as np
import torch


class CovarianceAccumulator:
    """Streaming float64 mean, covariance, participation ratio and norms of vectors ``[..., d]``.

    ``add(x)`` flattens leading dimensions to rows. Sums are taken around ``center`` (the mean of the first
    batch when not given), so ``cov = S / N - (m - c)(m - c)^T`` with ``S = sum (x - c)(x - c)^T`` and
    ``m`` the mean: exact for any ``c``, without the cancellation of ``E[x x^T] - m m^T`` when the mean is
    large. Results: ``mean`` ``[d]``, ``cov`` ``[d, d]`` (population, divided by N), ``participation_ratio``,
    ``sst_per_token = tr(cov) = sum_n ||x_n - mean||^2 / N``, ``norm_mean = mean_n ||x_n||`` and
    ``sq_norm_mean = mean_n ||x_n||^2`` (units: those of ``x`` and their squares).
    """

    def __init__(self, center: torch.Tensor | np.ndarray | None = None):
        self.center = None if center is None else torch.as_tensor(center, dtype=torch.float64)
        self.n = 0
        self.sum_dev: torch.Tensor | None = None
        self.sum_outer: torch.Tensor | None = None
        self.sum_norm = 0.0
        self.sum_sq_norm = 0.0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = torch.as_tensor(x)
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        if x.shape[0] == 0:
            return
        if self.center is None:
            self.center = x.mean(0).cpu()
        dev = x - self.center.to(x.device)
        s, outer = dev.sum(0).cpu(), (dev.T @ dev).cpu()
        self.sum_dev = s if self.sum_dev is None else self.sum_dev + s
        self.sum_outer = outer if self.sum_outer is None else self.sum_outer + outer
        sq = x.pow(2).sum(-1)
        self.sum_sq_norm += sq.sum().item()
        self.sum_norm += sq.sqrt().sum().item()
        self.n += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.center + self.sum_dev / self.n

    @property
    def cov(self) -> torch.Tensor:
        shift = self.sum_dev / self.n
        return self.sum_outer / self.n - torch.outer(shift, shift)

    def result(self) -> dict[str, float]:
        if self.n == 0:
            nan = float("nan")
            return {"participation_ratio": nan, "sst_per_token": nan, "norm_mean": nan, "sq_norm_mean": nan, "n": 0}
        cov = self.cov
        return {"participation_ratio": participation_ratio(cov), "sst_per_token": float(torch.trace(cov)),
                "norm_mean": self.sum_norm / self.n, "sq_norm_mean": self.sum_sq_norm / self.n, "n": self.n}


def participation_ratio(cov: torch.Tensor | np.ndarray) -> float:
    """``(sum lambda)^2 / sum lambda^2 = tr(C)^2 / ||C||_F^2`` of a symmetric PSD matrix ``[d, d]``; NaN if C = 0."""
    c = torch.as_tensor(cov, dtype=torch.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"participation_ratio needs a square matrix, got shape {tuple(c.shape)}")
    fro2 = c.pow(2).sum().item()
    return float(torch.trace(c).item() ** 2 / fro2) if fro2 > 0 else float("nan")


def twonn_dimension(points: np.ndarray | torch.Tensor, fit_fraction: float = 0.9, chunk: int = 1024) -> float:
    """TwoNN intrinsic dimension (Facco et al. 2017) of ``points`` ``[n, d]`` (see the module docstring).

    Exact duplicates are dropped first; Euclidean neighbour distances are exact float64 (``torch.cdist``
    over ``chunk`` rows at a time, O(n^2 d)). Needs at least 3 distinct points, else NaN. ``fit_fraction``
    in (0, 1]: the share of the smallest ratios used in the fit.
    """
    if not 0 < fit_fraction <= 1:
        raise ValueError(f"fit_fraction must be in (0, 1], got {fit_fraction}")
    pts = torch.from_numpy(np.unique(np.asarray(points, dtype=np.float64), axis=0))
    n = len(pts)
    if n < 3:
        return float("nan")
    nearest = []
    for i in range(0, n, chunk):
        dist = torch.cdist(pts[i:i + chunk], pts, compute_mode="donot_use_mm_for_euclid_dist")
        rows = torch.arange(dist.shape[0])
        dist[rows, rows + i] = float("inf")  # not its own neighbour
        nearest.append(dist.topk(2, dim=1, largest=False).values)
    r1, r2 = torch.cat(nearest).numpy().T
    mu = np.sort(r2 / r1)
    keep = max(2, int(np.floor(fit_fraction * n)))
    x = np.log(mu[:keep])
    y = -np.log(1.0 - np.arange(keep) / n)  # empirical CDF F_i = i / n, i = 0..n-1 (Facco et al., eq. 4)
    sxx = float(x @ x)
    return float(x @ y / sxx) if sxx > 0 else float("nan")


def subsample_positions(mask: torch.Tensor, n_points: int, seed: int) -> torch.Tensor:
    """A fixed, seeded subsample: flat indices of ``min(n_points, mask.sum())`` True positions of ``mask``.

    The choice depends only on the mask and the seed (a ``numpy`` permutation of the True positions), so
    the same eval tokens always give the same points, however they are batched. Sorted ascending.
    """
    flat = torch.nonzero(mask.reshape(-1)).squeeze(-1).numpy()
    chosen = np.random.default_rng(seed).permutation(len(flat))[:max(0, n_points)]
    return torch.from_numpy(np.sort(flat[chosen]))
