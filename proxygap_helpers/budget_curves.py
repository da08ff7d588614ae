r"""Budget curves: each model's CE_rec(T) and R²(T) as a saturating power law, the extrapolated sign flip T*,
and the next budget to run. Works on ``pairs.csv`` only (statistics work on tables).

**Model.** For one model role, sparsity k and metric (quality rising with the SAE training budget T)::

    y(T) = y_inf - a * T^(-alpha),     a >= 0,  alpha in [ALPHA_MIN, ALPHA_MAX],  y_inf <= Y_MAX = 1

the saturating power law of SAE quality against training compute (Gao et al. 2024, "Scaling and evaluating
sparse autoencoders", fit L(C) = L_inf + a C^-alpha). It is fitted by least squares to the per-seed values in a
well-conditioned parametrisation: with x = (log10 T - c) / s (c the centre and s the half-range of the tested
log10 budgets, so x is in [-1, 1]), ``y = y_inf - b exp(-beta x)``, b = a T_c^-alpha >= 0 the shortfall at the
centre budget T_c = 10^c and beta = alpha s ln 10. For fixed beta the model is linear in (y_inf, b) under
b >= 0 and y_inf <= 1 (both metrics are at most 1 on average; where the fit without that bound passes it, the
optimum lies on y_inf = 1, a one-parameter fit of b), so the fit profiles beta out (variable projection, Golub & Pereyra 1973): a 64-point grid over the bounded log beta
range, then golden-section search around the best grid point. The result is the global least-squares optimum
under the bounds, vectorised over bootstrap replicates. ``tests/test_budget_curves.py`` checks it against
``scipy.optimize.least_squares`` with bounds.

**Refusal rule** (``STATUS_REFUSED`` = "cannot be said", no extrapolation), checked in this order:

1. fewer than ``MIN_BUDGETS`` = 3 budgets with data (three parameters need three budgets);
2. not monotone: some step between consecutive budgets goes *down* by more than ``MONOTONE_Z`` = 2 standard
   errors of the difference of the two means (any step down when a budget has a single seed);
3. flat: the best fit has a = 0 (no budget dependence: alpha is not identified);
4. ill-conditioned: alpha at a bound (ALPHA_MIN: the gains per decade do not shrink, no saturation is
   visible; ALPHA_MAX: the curve is already flat after the lowest budget, its curvature is not resolved);
5. with 4 or more budgets, the leave-one-budget-out forecast of the largest budget misses by more than
   ``LOBO_Z`` = 3 standard errors (the curve fitted to the lower budgets does not predict the top one).

With exactly 3 budgets the curve passes through the three budget means (no degrees of freedom are left), so
the leave-one-budget-out check is not available and an extrapolation rests on the power-law form alone; the
report says so.

**Intervals.** A seed bootstrap: within each budget the (small, large) pairs are resampled with replacement
and both curves refitted. Each resampled budget mean is moved away from the observed mean by the factor
sqrt(n/(n-1)) * t_{(1+level)/2, n-1} / z_{(1+level)/2} (``inflation``): the plug-in variance's bias undone and
Student-t tails per budget. With 2-3 seeds a plain percentile bootstrap covers about 80% at a nominal 95%;
this one covers at least the nominal level (0.97-0.99 measured; ``tests/test_budget_curves.py`` checks the
coverage of the parameters and of T* over synthetic grids). Intervals need n >= 2 at every budget.

**T\*.** Where the fitted gap ``Δ(T) = y_large(T) - y_small(T)`` first changes sign above the smallest tested
budget, searched up to ``10**EXTRAPOLATION_DECADES`` times the largest: "in range" (at or below the largest
tested budget), "extrapolated" (``factor`` = T*/T_max), "not within 100x" (no sign change in the search
range; the asymptotic gap y_inf,large - y_inf,small says whether the curves ever cross) or "cannot be said"
(a fit is refused). Bootstrap replicates without a crossing are censored at 0 (already crossed below the
smallest budget) or infinity, so a bound of 0 or inf means "beyond the search range".

**Next budget.** Candidates are the tested budgets (more seeds) and round budgets (1-2-3-5 series) up to
``10**CANDIDATE_DECADES`` times the largest. For each, ``n_sims`` new sets of seeds are simulated from the
fitted curves with each role's pooled seed noise, and the expected width of the T* interval (log10 T,
censored bounds clipped to the search range) is computed from the bootstrap of the augmented data. The
proposal minimises the mean over k of (expected width / current width). Where no k has a usable fit, an
explicit rule proposes the budget that makes a fit possible (see ``_fallback``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from .params import TWO_ROLES, format_tokens

ALPHA_MIN, ALPHA_MAX = 0.01, 5.0
MIN_BUDGETS = 3
MONOTONE_Z = 2.0
LOBO_Z = 3.0
EXTRAPOLATION_DECADES = 2.0
CANDIDATE_DECADES = 1.0
N_BETA_GRID = 48
GOLDEN_STEPS = 28
Y_MAX = 1.0  # the asymptote's bound: CE_rec and R² cannot exceed 1 on average
STATUS_FIT, STATUS_REFUSED = "fit", "cannot be said"
METRICS = ("ce_rec", "r2")


# ---------------------------------------------------------------- the vectorised fit


@dataclass
class Scale:
    """x = (log10 T - c) / s: the tested budgets' log10 centre c and half-range s (1 for a single budget)."""

    c: float
    s: float

    @classmethod
    def of(cls, tokens: Sequence[float]) -> "Scale":
        u = np.log10(np.asarray(tokens, dtype=float))
        half = (u.max() - u.min()) / 2
        return cls(float((u.max() + u.min()) / 2), float(half) if half > 0 else 1.0)

    def x(self, tokens: Any) -> np.ndarray:
        return (np.log10(np.asarray(tokens, dtype=float)) - self.c) / self.s

    def beta_bounds(self) -> tuple[float, float]:
        return ALPHA_MIN * self.s * np.log(10), ALPHA_MAX * self.s * np.log(10)


def _profile(beta: np.ndarray, x: np.ndarray, m: np.ndarray, w: np.ndarray, y_max: float | None = Y_MAX):
    """Weighted least squares of y = y_inf - b exp(-beta x) on budget means ``m`` [..., J] with weights ``w``
    (seed counts) for fixed ``beta`` [...] (b >= 0, y_inf <= ``y_max``). Returns (between-budget weighted SS, b,
    y_inf)."""
    phi = np.exp(-beta[..., None] * x)
    wsum = w.sum(-1)
    mp = (w * phi).sum(-1) / wsum
    my = (w * m).sum(-1) / wsum
    dp, dm = phi - mp[..., None], m - my[..., None]
    spp, spy, syy = (w * dp * dp).sum(-1), (w * dp * dm).sum(-1), (w * dm * dm).sum(-1)
    b = np.maximum(-spy / spp, 0.0)
    ss = np.maximum(np.where(b > 0, syy - spy * spy / spp, syy), 0.0)
    y_inf = my + b * mp
    if y_max is None:
        return ss, b, y_inf
    # the bound binds where the fit above exceeds it (a convex problem: its optimum then lies on y_inf = y_max)
    r = y_max - m
    bv, cc = (w * phi * r).sum(-1), (w * phi * phi).sum(-1)
    b1 = np.maximum(bv / cc, 0.0)
    ss1 = np.maximum((w * r * r).sum(-1) - 2 * b1 * bv + b1 * b1 * cc, 0.0)
    over = y_inf > y_max
    return np.where(over, ss1, ss), np.where(over, b1, b), np.where(over, y_max, y_inf)


def _grid_profile(betas: np.ndarray, x: np.ndarray, m: np.ndarray, w: np.ndarray,
                  y_max: float | None = Y_MAX) -> np.ndarray:
    """``_profile``'s residual SS for every row of ``m`` [R, J] and every beta of ``betas`` [G], with weights
    ``w`` [J] shared by all rows: [R, G]."""
    wsum = w.sum()
    my = m @ w / wsum
    dm = m - my[:, None]
    phi = np.exp(-betas[:, None] * x[None, :])
    mp = phi @ w / wsum
    dp = phi - mp[:, None]
    spp = (dp * dp) @ w
    spy = dm @ (w * dp).T
    syy = (dm * dm) @ w
    b = np.maximum(-spy / spp, 0.0)
    ss = np.maximum(np.where(b > 0, syy[:, None] - spy * spy / spp, syy[:, None]), 0.0)
    if y_max is None:
        return ss
    r = y_max - m
    bv, cc = r @ (w * phi).T, (phi * phi) @ w
    b1 = np.maximum(bv / cc, 0.0)
    ss1 = np.maximum(((r * r) @ w)[:, None] - 2 * b1 * bv + b1 * b1 * cc, 0.0)
    return np.where(my[:, None] + b * mp[None, :] > y_max, ss1, ss)


def fit_means(x: np.ndarray, m: np.ndarray, w: np.ndarray, beta_bounds: tuple[float, float],
              y_max: float | None = Y_MAX) -> dict[str, np.ndarray]:
    """Least-squares fit of ``y = y_inf - b exp(-beta x)`` to each row of ``m``.

    ``x``: [J] scaled log budgets; ``m``: [R, J] budget means (R replicates); ``w``: [J] seeds per budget
    (the per-seed least-squares fit equals this weighted fit of the means); ``y_max``: the asymptote's upper
    bound (``Y_MAX`` = 1: CE_rec and R² cannot exceed 1 on average; None: unbounded). Returns arrays [R]:
    ``y_inf`` (<= ``y_max``), ``b`` (>= 0), ``beta`` (in ``beta_bounds``), ``ss`` (weighted between-budget
    residual sum of squares), ``at_bound`` (-1 lower, +1 upper, 0 inside: beta's) and ``y_capped`` (y_inf on
    ``y_max``).
    """
    m = np.atleast_2d(np.asarray(m, dtype=float))
    w = np.asarray(w, dtype=float)
    lo, hi = np.log(beta_bounds[0]), np.log(beta_bounds[1])
    grid = np.linspace(lo, hi, N_BETA_GRID)
    ss_grid = _grid_profile(np.exp(grid), x, m, w, y_max)
    w = np.broadcast_to(w, m.shape)
    i = ss_grid.argmin(axis=1)
    a, b = grid[np.maximum(i - 1, 0)], grid[np.minimum(i + 1, N_BETA_GRID - 1)]
    g = (np.sqrt(5) - 1) / 2  # golden section on log beta within the grid neighbours of the best grid point
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = _profile(np.exp(c), x, m, w, y_max)[0], _profile(np.exp(d), x, m, w, y_max)[0]
    for _ in range(GOLDEN_STEPS):
        left = fc <= fd  # the minimum lies in [a, d]
        a, b = np.where(left, a, c), np.where(left, d, b)
        new = np.where(left, b - g * (b - a), a + g * (b - a))
        f_new = _profile(np.exp(new), x, m, w, y_max)[0]
        c, d, fc, fd = (np.where(left, new, d), np.where(left, c, new), np.where(left, f_new, fd),
                        np.where(left, fc, f_new))
    best = (a + b) / 2
    cands = np.stack([best, np.full_like(best, lo), np.full_like(best, hi)])
    ss_c = np.stack([_profile(np.exp(v), x, m, w, y_max)[0] for v in cands])
    pick = ss_c.argmin(axis=0)
    log_beta = cands[pick, np.arange(len(m))]
    ss, bb, y_inf = _profile(np.exp(log_beta), x, m, w, y_max)
    near = 1e-4  # within 0.01% of a bound counts as on it (rounding stops the search short of a flat edge)
    at_bound = np.where(log_beta - lo < near, -1, np.where(hi - log_beta < near, 1, 0))
    capped = np.zeros(len(m), dtype=bool) if y_max is None else y_inf >= y_max
    return {"y_inf": y_inf, "b": bb, "beta": np.exp(log_beta), "ss": ss, "at_bound": at_bound, "y_capped": capped}


def predict(fit: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Fitted curve at scaled log budgets ``x`` [G] for each replicate: [R, G]."""
    return fit["y_inf"][:, None] - fit["b"][:, None] * np.exp(-fit["beta"][:, None] * np.asarray(x)[None, :])


def to_alpha_a(fit: dict[str, np.ndarray], scale: Scale) -> tuple[np.ndarray, np.ndarray]:
    """The natural parameters: alpha = beta / (s ln 10) and a = b * T_c^alpha (T_c = 10^c)."""
    alpha = fit["beta"] / (scale.s * np.log(10))
    with np.errstate(over="ignore"):
        return alpha, fit["b"] * 10.0 ** (alpha * scale.c)


# ---------------------------------------------------------------- seed bootstrap


def inflation(samples: Sequence[np.ndarray], level: float) -> np.ndarray:
    """Per-budget factor for resampled-mean deviations: sqrt(n_j/(n_j-1)) * t_{q, n_j-1} / z_q, q = (1+level)/2;
    0 where n_j = 1 (no seed noise is known there).

    The first factor undoes the plug-in variance's bias, the second gives each budget mean the spread of its
    own Student-t interval. A statistic that rests on one budget gets its t-interval; one that pools several
    budgets gets a somewhat wider interval than it needs (measured on synthetic grids with 2-3 seeds per
    budget: 0.97-0.99 coverage at the nominal 0.95; a plain percentile bootstrap covers about 0.80 there)."""
    n = np.array([len(s) for s in samples], dtype=float)
    q = (1 + level) / 2
    t_over_z = sps.t.ppf(q, np.maximum(n - 1, 1)) / sps.norm.ppf(q)
    return np.where(n > 1, np.sqrt(n / np.maximum(n - 1, 1)) * t_over_z, 0.0)


def boot_means(samples: Sequence[np.ndarray], n_boot: int, level: float, rng: np.random.Generator) -> np.ndarray:
    """Rescaled seed bootstrap of budget means: ``samples[j]`` is [n_j, C] (one row per seed; the C columns,
    e.g. the small and large values of a pair, are resampled together). Returns [n_boot, J, C]: per budget the
    mean of n_j rows drawn with replacement, moved away from the observed mean by ``inflation``."""
    out = []
    for s, f in zip(samples, inflation(samples, level)):
        mean = s.mean(axis=0)
        boot = s[rng.integers(0, len(s), size=(n_boot, len(s)))].mean(axis=1)
        out.append(mean + f * (boot - mean))
    return np.stack(out, axis=1)


# ---------------------------------------------------------------- T*: the first sign change of the fitted gap


def first_crossing(fit_small: dict[str, np.ndarray], fit_large: dict[str, np.ndarray], scale: Scale,
                   u_lo: float, u_hi: float, sign_before: float, n_grid: int = 128) -> np.ndarray:
    """log10 T* per replicate: the first u in (u_lo, u_hi] (u = log10 T) where the gap large - small leaves the
    sign ``sign_before`` (-1: first u with gap >= 0; +1: gap <= 0), located on an ``n_grid`` grid and refined by
    40 bisection steps. Censored: -inf when the gap already has the other sign at u_lo, +inf when it keeps
    ``sign_before`` up to u_hi. Shape [R]."""
    u = np.linspace(u_lo, u_hi, n_grid)
    after = sign_before * gap_at(fit_small, fit_large, scale, np.broadcast_to(u, (len(fit_small["b"]), n_grid))) <= 0
    first = np.where(after.any(axis=1), after.argmax(axis=1), -1)
    out = np.where(first == 0, -np.inf, np.inf)
    idx = np.flatnonzero(first > 0)
    if idx.size:
        lo, hi = u[first[idx] - 1], u[first[idx]]
        sub_s, sub_l = ({k: v[idx] for k, v in f.items()} for f in (fit_small, fit_large))
        for _ in range(40):
            mid = (lo + hi) / 2
            past = sign_before * gap_at(sub_s, sub_l, scale, mid) <= 0
            hi, lo = np.where(past, mid, hi), np.where(past, lo, mid)
        out[idx] = (lo + hi) / 2
    return out


def gap_at(fit_small: dict[str, np.ndarray], fit_large: dict[str, np.ndarray], scale: Scale,
           u: np.ndarray) -> np.ndarray:
    """Fitted gap large - small at log10 budgets ``u``: [R] (one per replicate) or [R, G]."""
    x = (np.asarray(u) - scale.c) / scale.s
    col = (slice(None),) + (None,) * (x.ndim - 1)  # fit arrays [R] against u [R, ...]
    return ((fit_large["y_inf"][col] - fit_large["b"][col] * np.exp(-fit_large["beta"][col] * x))
            - (fit_small["y_inf"][col] - fit_small["b"][col] * np.exp(-fit_small["beta"][col] * x)))


def _clip_width(logs: np.ndarray, u_lo: float, u_hi: float, level: float) -> float:
    """Width (decades) of the percentile interval of log10 T*, censored values clipped to [u_lo, u_hi]."""
    lo, hi = np.quantile(np.clip(logs, u_lo, u_hi), [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
    return float(hi - lo)


# ---------------------------------------------------------------- one (k, metric): both roles' curves


@dataclass
class RoleFit:
    """One role's curve at one k: status (``STATUS_FIT`` / ``STATUS_REFUSED``) and reason, the point fit and its
    bootstrap replicates (dicts of [1] / [B] arrays, see ``fit_means``; None where not computed) and the
    goodness of fit (``_goodness`` and ``_lobo``)."""

    role: str
    status: str
    reason: str
    point: dict[str, np.ndarray] | None = None
    boot: dict[str, np.ndarray] | None = None
    gof: dict[str, float] | None = None


@dataclass
class Curves:
    """Both roles' budget curves for one (k, metric): ``tokens`` [J] tested budgets, ``samples[j]`` [n_j, 2]
    per-seed (small, large) values, the log-budget ``scale`` and a ``RoleFit`` per role."""

    k: int
    metric: str
    tokens: np.ndarray
    samples: list[np.ndarray]
    scale: Scale
    fits: dict[str, RoleFit]

    @property
    def n(self) -> np.ndarray:
        return np.array([len(s) for s in self.samples])

    @property
    def ok(self) -> bool:
        return all(f.status == STATUS_FIT for f in self.fits.values())

    @property
    def has_boot(self) -> bool:
        return self.ok and all(f.boot is not None for f in self.fits.values())

    @property
    def u_range(self) -> tuple[float, float]:
        """log10 of the smallest tested budget and of the end of the T* search range."""
        u = np.log10(self.tokens.astype(float))
        return float(u.min()), float(u.max() + EXTRAPOLATION_DECADES)


def _monotone_reason(tokens: np.ndarray, means: np.ndarray, se: np.ndarray) -> str | None:
    """Rule 2: the first step between consecutive budgets whose mean falls by more than MONOTONE_Z standard
    errors of the difference (``se`` per budget mean; NaN for a single seed, and then any fall counts)."""
    for j in range(len(means) - 1):
        diff = means[j + 1] - means[j]
        se_diff = float(np.hypot(se[j], se[j + 1]))
        known = np.isfinite(se_diff)
        if diff < -MONOTONE_Z * se_diff if known else diff < 0:
            why = (f"{-diff / se_diff:.1f} standard errors" if known and se_diff > 0
                   else "a budget with one seed, so any fall counts")
            return (f"not monotone: the mean falls from {means[j]:.4g} at {format_tokens(int(tokens[j]))} to "
                    f"{means[j + 1]:.4g} at {format_tokens(int(tokens[j + 1]))} ({why})")
    return None


def _mean_se(samples: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per budget: the mean and its standard error s / sqrt(n) (NaN for a single seed)."""
    means = np.array([s.mean() for s in samples])
    se = np.array([s.std(ddof=1) / np.sqrt(len(s)) if len(s) > 1 else np.nan for s in samples])
    return means, se


def _shape_reason(point: dict[str, np.ndarray]) -> str | None:
    """Rules 3-4 on a point fit: flat (a = 0) or alpha at a bound."""
    if point["b"][0] <= 0:
        return "flat: the best fit has a = 0 (no budget dependence, so alpha is not identified)"
    if point["at_bound"][0] < 0:
        return (f"ill-conditioned: alpha at its lower bound {ALPHA_MIN:g} (the gains per decade do not shrink: "
                "no saturation is visible in the tested budgets)")
    if point["at_bound"][0] > 0:
        return (f"ill-conditioned: alpha at its upper bound {ALPHA_MAX:g} (the curve is flat after the lowest "
                "budget: its curvature is not resolved)")
    return None


def _lobo(tokens: np.ndarray, samples: list[np.ndarray], scale: Scale, level: float, n_boot: int,
          rng: np.random.Generator) -> dict[str, float]:
    """Leave-one-budget-out: for every budget whose removal leaves >= MIN_BUDGETS, fit the others and predict
    its mean. z = error / sqrt(SE_obs^2 + SE_pred^2) (SE_pred: the rescaled bootstrap SD of the prediction;
    NaN without seed noise). Returns lobo_rmse, lobo_max_abs_z and lobo_top_z (the largest budget held out)."""
    out = {"lobo_n": 0, "lobo_rmse": np.nan, "lobo_max_abs_z": np.nan, "lobo_top_z": np.nan}
    if len(tokens) - 1 < MIN_BUDGETS:
        return out
    x = scale.x(tokens)
    errs, zs = [], []
    for j in range(len(tokens)):
        keep = [i for i in range(len(tokens)) if i != j]
        sub = [samples[i][:, None] for i in keep]
        n = np.array([len(s) for s in sub])
        point = fit_means(x[keep], np.array([[s.mean() for s in sub]]), n, scale.beta_bounds())
        pred = float(predict(point, x[j:j + 1])[0, 0])
        err = float(samples[j].mean() - pred)
        se_obs = samples[j].std(ddof=1) / np.sqrt(len(samples[j])) if len(samples[j]) > 1 else np.nan
        se_pred = np.nan
        if (n > 1).all():
            bm = boot_means(sub, n_boot, level, rng)[:, :, 0]
            se_pred = float(predict(fit_means(x[keep], bm, n, scale.beta_bounds()), x[j:j + 1])[:, 0].std(ddof=1))
        se = np.hypot(se_obs, se_pred)
        errs.append(err)
        zs.append(err / se if se > 0 else np.nan)
    zs_arr = np.array(zs)
    return {"lobo_n": len(errs), "lobo_rmse": float(np.sqrt(np.mean(np.square(errs)))),
            "lobo_max_abs_z": float(np.nanmax(np.abs(zs_arr))) if np.isfinite(zs_arr).any() else np.nan,
            "lobo_top_z": float(zs_arr[-1])}


def _goodness(samples: list[np.ndarray], point: dict[str, np.ndarray], scale: Scale,
              tokens: np.ndarray) -> dict[str, float]:
    """Residuals of the point fit: per-seed RMSE, pooled seed SD (pure error), RMSE of the budget means and,
    with more budgets than parameters, the lack-of-fit F test's p-value."""
    fitted = predict(point, scale.x(tokens))[0]
    n = np.array([len(s) for s in samples])
    ss_pe = float(sum(((s - s.mean()) ** 2).sum() for s in samples))
    ss_lof = float(sum(len(s) * (s.mean() - f) ** 2 for s, f in zip(samples, fitted)))
    df_pe, df_lof = int((n - 1).sum()), len(samples) - 3
    lof_p = (float(sps.f.sf((ss_lof / df_lof) / (ss_pe / df_pe), df_lof, df_pe))
             if df_lof > 0 and df_pe > 0 and ss_pe > 0 else np.nan)
    return {"rmse": float(np.sqrt((ss_pe + ss_lof) / n.sum())),
            "sd_seed": float(np.sqrt(ss_pe / df_pe)) if df_pe > 0 else np.nan,
            "rmse_means": float(np.sqrt(np.mean([(s.mean() - f) ** 2 for s, f in zip(samples, fitted)]))),
            "df_lack_of_fit": df_lof, "lack_of_fit_p": lof_p}


def _fit_role(role: str, tokens: np.ndarray, samples: list[np.ndarray], scale: Scale,
              boot: np.ndarray | None, level: float, rng: np.random.Generator) -> RoleFit:
    """The refusal rule (module docstring), the point fit, goodness of fit and the bootstrap refits of the
    resampled means ``boot`` [B, J] (None: no intervals)."""
    if len(tokens) < MIN_BUDGETS:
        return RoleFit(role, STATUS_REFUSED, f"{len(tokens)} budget(s) with data: a three-parameter curve needs at "
                       f"least {MIN_BUDGETS}")
    if (reason := _monotone_reason(tokens, *_mean_se(samples))) is not None:
        return RoleFit(role, STATUS_REFUSED, reason)
    x, n = scale.x(tokens), np.array([len(s) for s in samples])
    point = fit_means(x, np.array([[s.mean() for s in samples]]), n, scale.beta_bounds())
    gof = _goodness(samples, point, scale, tokens) | _lobo(tokens, samples, scale, level, 200, rng)
    if (reason := _shape_reason(point)) is not None:
        return RoleFit(role, STATUS_REFUSED, reason, point, gof=gof)
    if abs(gof["lobo_top_z"]) > LOBO_Z:
        return RoleFit(role, STATUS_REFUSED, f"leave-one-budget-out: the curve fitted to the lower budgets misses "
                       f"the {format_tokens(int(tokens[-1]))} mean by {gof['lobo_top_z']:+.1f} standard errors "
                       f"(limit {LOBO_Z:g})", point, gof=gof)
    boot_fit = fit_means(x, boot, n, scale.beta_bounds()) if boot is not None else None
    return RoleFit(role, STATUS_FIT, "", point, boot_fit, gof)


def _samples(cell: pd.DataFrame, metric: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Tested budgets (sorted) and per budget the [n_j, 2] per-seed (small, large) values of ``metric``
    (pairs with a missing value dropped)."""
    cols = [f"{metric}_{r}" for r in TWO_ROLES]
    cell = cell.dropna(subset=cols)
    tokens = np.array(sorted(cell["tokens"].unique()), dtype=np.int64)
    return tokens, [cell.loc[cell["tokens"] == t, cols].to_numpy(float) for t in tokens]


def curves_from_samples(k: int, metric: str, tokens: np.ndarray, samples: list[np.ndarray], n_boot: int,
                        level: float, rng: np.random.Generator) -> Curves:
    """Fit both roles' curves (columns 0 = small, 1 = large of ``samples``) with bootstrap replicates when every
    budget has n >= 2 (the same resampled pairs for both roles, so the gap's interval keeps their pairing)."""
    scale = Scale.of(tokens) if len(tokens) else Scale(0.0, 1.0)
    boot = (boot_means(samples, n_boot, level, rng)
            if len(tokens) >= MIN_BUDGETS and n_boot > 0 and min(len(s) for s in samples) > 1 else None)
    fits = {r: _fit_role(r, tokens, [s[:, i] for s in samples], scale, None if boot is None else boot[:, :, i],
                         level, rng) for i, r in enumerate(TWO_ROLES)}
    return Curves(k, metric, tokens, samples, scale, fits)


def curves_for(pairs: pd.DataFrame, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> list[Curves]:
    """``Curves`` for every k in ``pairs`` and metric in ``METRICS`` (the generator of each is seeded by
    ``(seed, k, metric index)``)."""
    out = []
    for k, cell in pairs.groupby("k", sort=True):
        for i, metric in enumerate(METRICS):
            if not {f"{metric}_{r}" for r in TWO_ROLES} <= set(cell.columns):
                continue
            tokens, samples = _samples(cell, metric)
            out.append(curves_from_samples(int(k), metric, tokens, samples, n_boot, level,
                                           np.random.default_rng([seed, int(k), i])))
    return out


# ---------------------------------------------------------------- tables


FIT_COLUMNS = ["k", "metric", "model_role", "n_budgets", "n_seeds_min", "tokens_min", "tokens_max", "status",
               "reason", "y_inf", "y_inf_lo", "y_inf_hi", "a", "a_lo", "a_hi", "alpha", "alpha_lo", "alpha_hi",
               "y_inf_at_1", "boot_frac_y_inf_at_1", "boot_frac_ill_conditioned", "rmse", "sd_seed", "rmse_means", "df_lack_of_fit", "lack_of_fit_p",
               "lobo_n", "lobo_rmse", "lobo_max_abs_z", "lobo_top_z"]
TSTAR_COLUMNS = ["k", "metric", "status", "reason", "direction", "t_star", "t_star_lo", "t_star_hi",
                 "factor_beyond", "boot_frac_crossing", "gap_at_max", "gap_inf", "gap_inf_lo", "gap_inf_hi",
                 "tokens_max", "search_max"]
CURVE_COLUMNS = ["k", "metric", "series", "tokens", "fit", "lo", "hi", "extrapolated"]


def _pct(values: np.ndarray, level: float) -> tuple[float, float]:
    finite = values[~np.isnan(values)]
    if not finite.size:
        return (np.nan, np.nan)
    lo, hi = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
    return float(lo), float(hi)


def fit_rows(c: Curves, level: float) -> list[dict[str, Any]]:
    """One ``budget_fits.csv`` row per role (see ``FIT_COLUMNS``; a is in units of the metric x tokens^alpha)."""
    rows = []
    for role, f in c.fits.items():
        row = {"k": c.k, "metric": c.metric, "model_role": role, "n_budgets": len(c.tokens),
               "n_seeds_min": int(c.n.min()) if len(c.tokens) else 0,
               "tokens_min": int(c.tokens.min()) if len(c.tokens) else np.nan,
               "tokens_max": int(c.tokens.max()) if len(c.tokens) else np.nan, "status": f.status, "reason": f.reason}
        if f.point is not None:
            alpha, a = to_alpha_a(f.point, c.scale)
            row |= {"y_inf": float(f.point["y_inf"][0]), "a": float(a[0]), "alpha": float(alpha[0]),
                    "y_inf_at_1": bool(f.point["y_capped"][0])}
        if f.boot is not None:
            alpha, a = to_alpha_a(f.boot, c.scale)
            for name, v in (("y_inf", f.boot["y_inf"]), ("a", a), ("alpha", alpha)):
                row[f"{name}_lo"], row[f"{name}_hi"] = _pct(v, level)
            row["boot_frac_ill_conditioned"] = float(((f.boot["at_bound"] != 0) | (f.boot["b"] <= 0)).mean())
            row["boot_frac_y_inf_at_1"] = float(f.boot["y_capped"].mean())
        rows.append(row | (f.gof or {}))
    return rows


def _refused_reason(c: Curves) -> str:
    bad = {role: f.reason for role, f in c.fits.items() if f.status != STATUS_FIT}
    if len(bad) == 2 and len(set(bad.values())) == 1:
        return f"both models: {bad['small']}"
    return "; ".join(f"{role} model: {why}" for role, why in bad.items())


def tstar_row(c: Curves, level: float) -> dict[str, Any]:
    """One ``tstar.csv`` row: where the fitted gap large - small first changes sign (module docstring)."""
    row: dict[str, Any] = {"k": c.k, "metric": c.metric, "tokens_max": int(c.tokens.max()) if len(c.tokens) else
                           np.nan}
    if not c.ok:
        return row | {"status": STATUS_REFUSED, "reason": _refused_reason(c)}
    u_lo, u_hi = c.u_range
    s, l = c.fits["small"], c.fits["large"]
    row["search_max"] = float(10.0 ** u_hi)
    sign0 = float(np.sign(gap_at(s.point, l.point, c.scale, np.array([u_lo]))[0])) or -1.0
    row["direction"] = "up" if sign0 < 0 else "down"
    row["gap_at_max"] = float(gap_at(s.point, l.point, c.scale, np.array([u_hi - EXTRAPOLATION_DECADES]))[0])
    row["gap_inf"] = float(l.point["y_inf"][0] - s.point["y_inf"][0])
    log_t = float(first_crossing(s.point, l.point, c.scale, u_lo, u_hi, sign0)[0])
    if c.has_boot:
        logs = first_crossing(s.boot, l.boot, c.scale, u_lo, u_hi, sign0)
        lo, hi = np.quantile(logs, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
        row |= {"t_star_lo": float(10.0 ** lo), "t_star_hi": float(10.0 ** hi),
                "boot_frac_crossing": float(np.isfinite(logs).mean())}
        row["gap_inf_lo"], row["gap_inf_hi"] = _pct(l.boot["y_inf"] - s.boot["y_inf"], level)
    if np.isfinite(log_t):
        t_star = float(10.0 ** log_t)
        inside = log_t <= u_hi - EXTRAPOLATION_DECADES + 1e-12
        row |= {"t_star": t_star, "factor_beyond": t_star / row["tokens_max"],
                "status": "in range" if inside else "extrapolated", "reason": "" if c.has_boot else
                "no interval: some budget has a single seed"}
    else:
        row |= {"status": f"not within {10 ** EXTRAPOLATION_DECADES:g}x",
                "reason": _no_crossing_reason(row, sign0)}
    return row


def _no_crossing_reason(row: dict[str, Any], sign0: float) -> str:
    g, lo, hi = row["gap_inf"], row.get("gap_inf_lo", np.nan), row.get("gap_inf_hi", np.nan)
    limit = f"the gap tends to {g:+.4f}" + ("" if np.isnan(lo) else f" [{lo:+.4f}, {hi:+.4f}]")
    if np.sign(g) == sign0 and (np.isnan(lo) or np.sign(lo) == np.sign(hi) == sign0):
        return f"the fitted curves do not cross: {limit}, the sign it has at the smallest budget"
    return f"{limit}, so a crossing, if any, lies beyond {10 ** EXTRAPOLATION_DECADES:g}x the largest budget"


def curve_rows(c: Curves, level: float, n_points: int = 61) -> list[dict[str, Any]]:
    """``budget_curves.csv`` rows: each accepted role curve and (when both are) the gap, on ``n_points``
    log-spaced budgets from the smallest tested to the end of the T* search range, with the bootstrap band."""
    u_lo, u_hi = c.u_range if len(c.tokens) else (0.0, 0.0)
    tokens = 10.0 ** np.linspace(u_lo, u_hi, n_points)
    x = c.scale.x(tokens)
    series: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for role, f in c.fits.items():
        if f.status == STATUS_FIT:
            series[role] = (predict(f.point, x)[0], None if f.boot is None else predict(f.boot, x))
    if c.ok:
        s, l = series["small"], series["large"]
        series["gap"] = (l[0] - s[0], None if s[1] is None or l[1] is None else l[1] - s[1])
    rows = []
    for name, (fit, boot) in series.items():
        if boot is not None:
            lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2], axis=0)
        else:
            lo = hi = np.full(n_points, np.nan)
        for t, y, a, b in zip(tokens, fit, lo, hi):
            rows.append({"k": c.k, "metric": c.metric, "series": name, "tokens": float(t), "fit": float(y),
                         "lo": float(a), "hi": float(b), "extrapolated": bool(t > c.tokens.max() * (1 + 1e-12))})
    return rows


# ---------------------------------------------------------------- the next budget


NEXT_COLUMNS = ["scope", "k", "tokens", "kind", "n_new_seeds", "objective", "current_width", "expected_width",
                "width_ratio", "proposed", "reason"]
MIN_TSTAR_WIDTH = 0.05  # decades: below this the T* interval is pinned (or all censored): narrow the limit gap
ROUND_MANTISSAS = (1, 2, 3, 5)


def candidate_budgets(tokens: Sequence[int]) -> list[int]:
    """The tested budgets (more seeds there) and round budgets (1-2-3-5 x 10^e) above the smallest tested one
    up to 10**CANDIDATE_DECADES times the largest, sorted."""
    lo, hi = min(tokens), max(tokens) * 10 ** CANDIDATE_DECADES
    rounds = {m * 10 ** e for e in range(int(np.log10(lo)), int(np.log10(hi)) + 1) for m in ROUND_MANTISSAS}
    return sorted({int(t) for t in tokens} | {t for t in rounds if lo < t <= hi})


def _objective(c: Curves, level: float) -> tuple[str, float]:
    """What the next budget should narrow for this k, and its current width: the T* interval (decades of
    log10 T, censored bounds clipped to the search range) or, when that is narrower than MIN_TSTAR_WIDTH
    (pinned, or no replicate crosses), the interval of the limit gap y_inf,large - y_inf,small."""
    u_lo, u_hi = c.u_range
    s, l = c.fits["small"], c.fits["large"]
    sign0 = float(np.sign(gap_at(s.point, l.point, c.scale, np.array([u_lo]))[0])) or -1.0
    width = _clip_width(first_crossing(s.boot, l.boot, c.scale, u_lo, u_hi, sign0), u_lo, u_hi, level)
    if width >= MIN_TSTAR_WIDTH:
        return "log10 T* interval width", width
    lo, hi = _pct(l.boot["y_inf"] - s.boot["y_inf"], level)
    return "limit gap interval width", hi - lo


def _nearest_sd(c: Curves, candidate: int) -> np.ndarray:
    """Seed SD per role at the tested budget nearest to ``candidate`` in log T (seed noise shrinks with the
    budget, so the nearest budget's noise is the better guess than a pooled one)."""
    j = int(np.abs(np.log10(c.tokens.astype(float)) - np.log10(candidate)).argmin())
    return c.samples[j].std(axis=0, ddof=1)


def expected_width(c: Curves, candidate: int, objective: str, n_new: int, n_sims: int, n_boot: int,
                   level: float, rng: np.random.Generator) -> float:
    """Mean over ``n_sims`` simulated runs of ``n_new`` seeds at ``candidate`` (values from the fitted curves
    plus the seed noise of the nearest tested budget, ``_nearest_sd``) of the width of ``objective``'s
    bootstrap interval on the augmented data (``n_boot`` replicates each)."""
    u_lo, u_hi = c.u_range
    s, l = c.fits["small"], c.fits["large"]
    x_new = c.scale.x([candidate])
    truth = np.array([predict(s.point, x_new)[0, 0], predict(l.point, x_new)[0, 0]])
    new = truth + _nearest_sd(c, candidate) * rng.standard_normal((n_sims, n_new, 2))
    tokens = sorted({*c.tokens.tolist(), candidate})
    j_new = tokens.index(candidate)
    boots = []
    for sim in range(n_sims):
        samples = [c.samples[list(c.tokens).index(t)] if t in c.tokens else np.empty((0, 2)) for t in tokens]
        samples[j_new] = np.concatenate([samples[j_new], new[sim]])
        boots.append(boot_means(samples, n_boot, level, rng))
    boot = np.concatenate(boots)  # [n_sims * n_boot, J', 2]
    n = np.array([len(c.samples[list(c.tokens).index(t)]) if t in c.tokens else 0 for t in tokens])
    n[j_new] += n_new
    x = c.scale.x(tokens)
    fs, fl = (fit_means(x, boot[:, :, i], n, c.scale.beta_bounds()) for i in range(2))
    if objective == "log10 T* interval width":
        sign0 = float(np.sign(gap_at(s.point, l.point, c.scale, np.array([u_lo]))[0])) or -1.0
        stat = np.clip(first_crossing(fs, fl, c.scale, u_lo, u_hi, sign0), u_lo, u_hi)
    else:
        stat = fl["y_inf"] - fs["y_inf"]
    stat = stat.reshape(n_sims, n_boot)
    q = np.quantile(stat, [(1 - level) / 2, (1 + level) / 2], axis=1, method="inverted_cdf")
    return float((q[1] - q[0]).mean())


def next_budget(curves: Sequence[Curves], n_sims: int = 16, n_boot: int = 100, seed: int = 0,
                level: float = 0.95) -> pd.DataFrame:
    """The next budget to run (``NEXT_COLUMNS``): for every k whose ΔCE_rec curves are both accepted with
    intervals, the expected width of its objective (``_objective``) after running the grid's seeds at each
    candidate budget (``candidate_budgets``), relative to the current width; rows ``scope = 'all k'`` average
    that ratio over those k and the smallest average is ``proposed``. Without any such k, ``_fallback``'s rule."""
    usable = [c for c in curves if c.metric == "ce_rec" and c.has_boot]
    rows: list[dict[str, Any]] = []
    if not usable:
        return _fallback([c for c in curves if c.metric == "ce_rec"])
    cands = candidate_budgets(sorted({int(t) for c in usable for t in c.tokens}))
    for c in usable:
        objective, now = _objective(c, level)
        n_new = int(c.n.max())
        for t in cands:  # common random numbers: the same draws for every candidate
            rng = np.random.default_rng([seed, c.k])
            width = expected_width(c, t, objective, n_new, n_sims, n_boot, level, rng)
            rows.append({"scope": f"k={c.k}", "k": c.k, "tokens": t,
                         "kind": "more seeds" if t in c.tokens else "new budget", "n_new_seeds": n_new,
                         "objective": objective, "current_width": now, "expected_width": width,
                         "width_ratio": width / now if now > 0 else np.nan, "proposed": False, "reason": ""})
    per_k = pd.DataFrame(rows, columns=NEXT_COLUMNS)
    grid = per_k.groupby("tokens", sort=True).agg(width_ratio=("width_ratio", "mean"), kind=("kind", "first"),
                                                  n_new_seeds=("n_new_seeds", "max")).reset_index()
    grid = grid.assign(scope="all k", k=np.nan, objective="mean over k of expected / current width",
                       current_width=np.nan, expected_width=np.nan, proposed=False, reason="")
    best = grid["width_ratio"].idxmin()
    grid.loc[best, "proposed"] = True
    objectives = per_k.drop_duplicates("k").groupby("objective", sort=False)["k"].agg(list)
    names = {"log10 T* interval width": "the T* interval", "limit gap interval width": "the limit gap's interval "
             "(no T* to narrow: no bootstrap replicate crosses, or T* is already pinned)"}
    what = "; ".join(f"{names[o]} for k = {', '.join(map(str, ks))}" for o, ks in objectives.items())
    grid.loc[best, "reason"] = (f"of the candidates (the tested budgets and round budgets up to "
                                f"{10 ** CANDIDATE_DECADES:g}x the largest), it narrows most, averaged over k, {what}: "
                                f"expected width {grid.loc[best, 'width_ratio']:.2f}x the current one")
    return pd.concat([grid[NEXT_COLUMNS], per_k], ignore_index=True)


def _fallback(curves: Sequence[Curves]) -> pd.DataFrame:
    """The rule when no k has accepted curves with intervals, by the first k's refusal (CE_rec fits):

    - fewer than 3 budgets: continue the geometric ladder (ratio of the two largest budgets; 10^0.5 for a
      single budget) up to 3 budgets, the least that a curve needs;
    - a budget with a single seed: more seeds there (intervals need n >= 2);
    - not monotone: more seeds at the two budgets of the step that went down;
    - alpha at its lower bound or a failed leave-one-budget-out check: one ladder step up (saturation or the
      curve's form is tested further out);
    - flat, or alpha at its upper bound: the geometric midpoint of the two smallest budgets (the curvature
      sits below the second budget).
    """
    rows = []
    if not curves:
        return pd.DataFrame(columns=NEXT_COLUMNS)
    c = curves[0]
    tokens = [int(t) for t in c.tokens]
    ratio = tokens[-1] / tokens[-2] if len(tokens) > 1 else 10 ** 0.5
    refused = [f for f in c.fits.values() if f.status != STATUS_FIT]
    reason = refused[0].reason if refused else ""
    n = c.n
    if len(tokens) < MIN_BUDGETS:
        picks = [int(round(tokens[-1] * ratio ** i)) for i in range(1, MIN_BUDGETS - len(tokens) + 1)]
        why = f"{reason}; continuing the ladder (x{ratio:.3g}) to {MIN_BUDGETS} budgets makes a fit possible"
    elif not refused and (n < 2).any():
        picks = [tokens[j] for j in np.flatnonzero(n < 2)]
        why = "a budget has a single seed, so there is no interval: more seeds there"
    elif reason.startswith("not monotone"):
        j = next(j for j in range(len(tokens) - 1) if format_tokens(tokens[j]) in reason
                 and format_tokens(tokens[j + 1]) in reason)
        picks = tokens[j:j + 2]
        why = f"{reason}: more seeds at these budgets decide whether the fall is noise"
    elif "lower bound" in reason or reason.startswith("leave-one-budget-out"):
        picks = [int(round(tokens[-1] * ratio))]
        why = f"{reason}: one ladder step up tests saturation / the curve's form further out"
    else:
        picks = [int(round(np.sqrt(tokens[0] * tokens[1])))]
        why = f"{reason}: a budget between the two smallest resolves the curvature"
    for t in picks:
        rows.append({"scope": "all k", "k": np.nan, "tokens": t, "kind": "more seeds" if t in tokens else
                     "new budget", "n_new_seeds": int(n.max()) if len(n) else 1, "objective": "rule (no usable fit)",
                     "current_width": np.nan, "expected_width": np.nan, "width_ratio": np.nan, "proposed": True,
                     "reason": f"k={c.k}: {why}"})
    return pd.DataFrame(rows, columns=NEXT_COLUMNS)


# ---------------------------------------------------------------- everything at once


def analyse(pairs: pd.DataFrame, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
            n_sims: int = 16, curves: list[Curves] | None = None) -> dict[str, pd.DataFrame]:
    """The four tables from ``pairs.csv``: ``budget_fits`` (``FIT_COLUMNS``), ``tstar`` (``TSTAR_COLUMNS``),
    ``budget_curves`` (``CURVE_COLUMNS``) and ``next_budget`` (``NEXT_COLUMNS``). Deterministic for a seed.
    ``curves``: ``curves_for(pairs, n_boot, seed, level)`` when the caller has it already."""
    if curves is None:
        curves = curves_for(pairs, n_boot, seed, level) if len(pairs) else []
    return {"budget_fits": pd.DataFrame([r for c in curves for r in fit_rows(c, level)], columns=FIT_COLUMNS),
            "tstar": pd.DataFrame([tstar_row(c, level) for c in curves], columns=TSTAR_COLUMNS),
            "budget_curves": pd.DataFrame([r for c in curves for r in curve_rows(c, level)], columns=CURVE_COLUMNS),
            "next_budget": next_budget(curves, n_sims=n_sims, seed=seed, level=level) if curves else
            pd.DataFrame(columns=NEXT_COLUMNS)}


# ---------------------------------------------------------------- a table of gaps only (the study's)


REFERENCE_COLUMNS = ["k", "n_budgets", "n_min", "status", "reason", "d_inf", "a", "alpha", "t_star", "t_star_lo",
                     "t_star_hi", "location", "t_star_interp"]


def _interp_t_star(tokens: np.ndarray, means: np.ndarray) -> float:
    """T* where the means first go from < 0 to >= 0, linear in log10 T between the two budgets; NaN if never."""
    u = np.log10(tokens.astype(float))
    for i in range(len(means) - 1):
        if means[i] < 0 <= means[i + 1]:
            return float(10 ** (u[i] - means[i] * (u[i + 1] - u[i]) / (means[i + 1] - means[i])))
    return np.nan


def _gap_root(fit: dict[str, np.ndarray], scale: Scale, u_lo: float) -> np.ndarray:
    """log10 T where y_inf - b exp(-beta x) = 0 (the curve rises, so at most one root): -inf when the curve is
    already >= 0 at u_lo, +inf when it never reaches 0 (y_inf <= 0). Shape [R]."""
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.log(fit["b"] / fit["y_inf"]) / fit["beta"]
    u = np.where(fit["y_inf"] > 0, scale.c + scale.s * x, np.inf)
    return np.where(u <= u_lo, -np.inf, u)


def reference_fits(table: pd.DataFrame, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """What a table of gap means alone (``k, tokens, n, d_ce_rec_mean/lo/hi``, like the study's published one)
    can say about T*: the saturating law fitted to the mean ΔCE_rec per k directly (weights n), under the same
    refusal rule, its root T* (with a parametric bootstrap interval when every budget has n >= 2: each mean
    drawn as mean + SE t_{n-1}, SE recovered from the Student-t CI) and the log-linear interpolation between
    budgets. The per-model curves are unknown here, so a difference of two saturating curves (which can cross
    back) is approximated by one saturating curve. Columns ``REFERENCE_COLUMNS``."""
    rows = []
    q = (1 + level) / 2
    for k, cell in table.sort_values("tokens").groupby("k", sort=True):
        tokens = cell["tokens"].to_numpy(np.int64)
        means, n = cell["d_ce_rec_mean"].to_numpy(float), cell["n"].to_numpy(int)
        se = np.where(n > 1, (cell["d_ce_rec_hi"] - cell["d_ce_rec_lo"]).to_numpy(float)
                      / (2 * sps.t.ppf(q, np.maximum(n - 1, 1))), 0.0)
        row: dict[str, Any] = {"k": int(k), "n_budgets": len(tokens), "n_min": int(n.min()),
                               "t_star_interp": _interp_t_star(tokens, means)}
        if len(tokens) < MIN_BUDGETS:
            rows.append(row | {"status": STATUS_REFUSED, "reason": f"{len(tokens)} budget(s): a three-parameter "
                               f"curve needs at least {MIN_BUDGETS}"})
            continue
        if (reason := _monotone_reason(tokens, means, np.where(n > 1, se, np.nan))) is not None:
            rows.append(row | {"status": STATUS_REFUSED, "reason": reason})
            continue
        scale = Scale.of(tokens)
        point = fit_means(scale.x(tokens), means[None], n, scale.beta_bounds(), y_max=None)  # a gap: no bound
        alpha, a = to_alpha_a(point, scale)
        row |= {"d_inf": float(point["y_inf"][0]), "a": float(a[0]), "alpha": float(alpha[0])}
        if (reason := _shape_reason(point)) is not None:
            rows.append(row | {"status": STATUS_REFUSED, "reason": reason})
            continue
        u_lo, u_max = np.log10(tokens.min()), np.log10(tokens.max())
        root = float(_gap_root(point, scale, u_lo)[0])
        row["status"], row["reason"] = STATUS_FIT, ""
        if np.isfinite(root):
            row["t_star"] = float(10 ** root)
            row["location"] = "in range" if root <= u_max + 1e-12 else "extrapolated"
        else:
            row["location"] = "below the smallest budget" if root < 0 else "never (limit gap <= 0)"
        if (n > 1).all():
            rng = np.random.default_rng([seed, int(k)])
            draws = means + se * rng.standard_t(np.maximum(n - 1, 1), size=(n_boot, len(n)))
            roots = _gap_root(fit_means(scale.x(tokens), draws, n, scale.beta_bounds(), y_max=None), scale, u_lo)
            lo, hi = np.quantile(roots, [1 - q, q], method="inverted_cdf")
            row["t_star_lo"], row["t_star_hi"] = float(10 ** lo), float(10 ** hi)
        else:
            row["reason"] = ("no interval: " + ", ".join(format_tokens(int(t)) for t in tokens[n < 2])
                             + " has a single seed (n = 1), so its noise is unknown")
        rows.append(row)
    return pd.DataFrame(rows, columns=REFERENCE_COLUMNS)


# ---------------------------------------------------------------- readable output


def _fmt_t(x: Any) -> str:
    from .plots import format_tokens as fmt

    x = float(x)
    return "∞" if np.isinf(x) and x > 0 else "0" if np.isinf(x) else fmt(x)


def _interval(lo: Any, hi: Any) -> str:
    if pd.isna(lo) or pd.isna(hi):
        return ""
    return f" [{_fmt_t(lo)}, {_fmt_t(hi)}]"


def tstar_text(row: pd.Series | dict) -> str:
    """One T* row in words: in range / extrapolated (with the factor) / not within the search range / cannot
    be said, with the bootstrap interval."""
    status = row["status"]
    if status == STATUS_REFUSED:
        return f"cannot be said: {row['reason']}"
    if status in ("in range", "extrapolated"):
        where = ("in the tested range" if status == "in range" else
                 f"**extrapolated** {row['factor_beyond']:.3g}x beyond the largest tested budget "
                 f"({_fmt_t(row['tokens_max'])})")
        note = f" ({row['reason']})" if isinstance(row.get("reason"), str) and row["reason"] else ""
        return f"T* ≈ {_fmt_t(row['t_star'])}{_interval(row['t_star_lo'], row['t_star_hi'])}, {where}{note}"
    interval = _interval(row.get("t_star_lo"), row.get("t_star_hi"))
    tail = f"; 95% interval of T*{interval}" if interval and np.isfinite(float(row["t_star_lo"])) else ""
    return f"no sign change within {10 ** EXTRAPOLATION_DECADES:g}x the largest budget; {row['reason']}{tail}"


def tstar_frame(tstar: pd.DataFrame) -> pd.DataFrame:
    """Readable ``tstar.csv``: per k and gap, the status and T* with its interval in tokens."""
    if tstar is None or not len(tstar):
        return pd.DataFrame({"status": ["pending: no complete pairs yet"]})
    gap = {"ce_rec": "ΔCE_rec", "r2": "ΔR²"}
    return pd.DataFrame({
        "k": tstar["k"], "gap": tstar["metric"].map(gap), "status": tstar["status"],
        "T* (fit)": [_fmt_t(t) if pd.notna(t) else "—" for t in tstar["t_star"]],
        "95% interval": ["—" if pd.isna(a) else f"none within {10 ** EXTRAPOLATION_DECADES:g}x"
                         if np.isinf(a) and a > 0 else _interval(a, b).strip()
                         for a, b in zip(tstar["t_star_lo"], tstar["t_star_hi"])],
        "× largest budget": [f"{f:.3g}" if pd.notna(f) else "—" for f in tstar["factor_beyond"]],
        "limit gap [95%]": ["—" if pd.isna(g) else f"{g:+.4f}" + ("" if pd.isna(lo) else f" [{lo:+.4f}, {hi:+.4f}]")
                            for g, lo, hi in zip(tstar["gap_inf"], tstar["gap_inf_lo"], tstar["gap_inf_hi"])],
    }).set_index(["k", "gap"])


def fits_frame(fits: pd.DataFrame) -> pd.DataFrame:
    """Readable ``budget_fits.csv``: the parameters with their intervals and the goodness of fit."""
    if fits is None or not len(fits):
        return pd.DataFrame({"status": ["pending: no complete pairs yet"]})

    def ci(v: Any, lo: Any, hi: Any, f: str) -> str:
        return "—" if pd.isna(v) else format(v, f) + ("" if pd.isna(lo) else f" [{lo:{f}}, {hi:{f}}]")
    return pd.DataFrame({
        "k": fits["k"], "metric": fits["metric"], "model": fits["model_role"], "status": fits["status"],
        "y∞ [95%]": [ci(*v, ".4f") for v in zip(fits["y_inf"], fits["y_inf_lo"], fits["y_inf_hi"])],
        "α [95%]": [ci(*v, ".3g") for v in zip(fits["alpha"], fits["alpha_lo"], fits["alpha_hi"])],
        "RMSE / seed SD": ["—" if pd.isna(r) else f"{r:.2g} / {s:.2g}"
                           for r, s in zip(fits["rmse"], fits["sd_seed"])],
        "LOBO max |z|": ["n/a (3 budgets)" if pd.isna(z) and n == 3 else "—" if pd.isna(z) else f"{z:.2f}"
                         for z, n in zip(fits["lobo_max_abs_z"], fits["n_budgets"])],
        "reason": fits["reason"].fillna(""),
    }).set_index(["k", "metric", "model"])


def proposal(next_budget: pd.DataFrame) -> pd.DataFrame:
    """The proposed row(s) of ``next_budget.csv`` (one budget, or the smallest set of the fallback rule)."""
    if next_budget is None or not len(next_budget) or "proposed" not in next_budget:
        return pd.DataFrame(columns=NEXT_COLUMNS)
    return next_budget[next_budget["proposed"].astype(bool)]


def next_budget_text(next_budget: pd.DataFrame, cost: dict | None = None, markdown: bool = True) -> str:
    """The proposal in one paragraph (markdown, or plain text for a terminal): budget(s), kind, why, and the
    ``plan`` cost when given (``cost``: ``plan.budget_cost``'s dict, or ``{"error": text}``)."""
    if not markdown:
        return next_budget_text(next_budget, cost).replace("**", "").replace("`", "")
    chosen = proposal(next_budget)
    if not len(chosen):
        return "**Next budget:** pending (no complete pairs yet)."
    budgets = ", ".join(_fmt_t(t) for t in chosen["tokens"])
    n_new = int(chosen["n_new_seeds"].max())
    kind = chosen["kind"].iloc[0]
    what = (f"{n_new} more seed(s) at the tested budget {budgets}" if kind == "more seeds"
            else f"a new budget {budgets} with {n_new} seed(s)" if len(chosen) == 1
            else f"the new budgets {budgets} with {n_new} seed(s) each")
    text = f"**Next budget:** {what}, for every k. Why: {chosen['reason'].iloc[0]}."
    others = next_budget[(next_budget["scope"] == "all k") & (next_budget["kind"] == "new budget")
                         & ~next_budget["proposed"].astype(bool)].dropna(subset=["width_ratio"])
    if kind == "more seeds" and len(others):
        best = others.loc[others["width_ratio"].idxmin()]
        text += f" The best new budget would be {_fmt_t(best['tokens'])} ({best['width_ratio']:.2f}x)."
    if cost:
        text += " " + cost_text(cost)
    return text


def cost_text(cost: dict) -> str:
    """``plan.budget_cost``'s estimate in one sentence."""
    if "error" in cost:
        return f"Cost estimate unavailable: {cost['error']}."
    s = cost["total_s"]
    when = f"{s / 3600:.1f} h" if s > 5400 else f"{s / 60:.1f} min" if s > 90 else f"{s:.0f} s"
    text = (f"Estimated cost on this machine: {when} for {cost['n_saes']} SAEs ({cost['jobs']} job(s) at a time; "
            "`plan`'s calibration)")
    if cost.get("store_note"):
        text += f"; {cost['store_note']}"
    return text + "."


def markdown(tstar: pd.DataFrame, fits: pd.DataFrame, next_budget: pd.DataFrame, cost: dict | None = None) -> str:
    """The report's reading of the budget curves: T* per k for ΔCE_rec (and ΔR²), the three-budget caveat and
    the next budget."""
    if tstar is None or not len(tstar):
        return "Pending: no complete pairs yet."
    lines = []
    for k, rows in tstar.groupby("k", sort=True):
        by = {r["metric"]: r for _, r in rows.iterrows()}
        parts = [f"ΔCE_rec: {tstar_text(by['ce_rec'])}" if "ce_rec" in by else "",
                 f"ΔR²: {tstar_text(by['r2'])}" if "r2" in by else ""]
        lines.append(f"- **k = {k}.** " + " — ".join(p for p in parts if p))
    text = "\n".join(lines)
    n_budgets = fits.loc[fits["status"] == STATUS_FIT, "n_budgets"] if len(fits) else pd.Series(dtype=int)
    if len(n_budgets) and (n_budgets == MIN_BUDGETS).any():
        text += ("\n\nWith three budgets each curve passes through the three budget means: no degrees of freedom "
                 "are left to test its form (the leave-one-budget-out check needs a fourth budget), so an "
                 "extrapolation rests on the saturating power law itself.")
    return text + "\n\n" + next_budget_text(next_budget, cost)


def reference_markdown(ref: pd.DataFrame) -> str:
    """What ``reference_fits`` of the study's table says, per k, and what it cannot say."""
    lines = []
    for _, r in ref.iterrows():
        interp = ("" if pd.isna(r["t_star_interp"]) else
                  f"; the mean gap changes sign between budgets, at T* ≈ {_fmt_t(r['t_star_interp'])} by log-linear "
                  "interpolation")
        if r["status"] == STATUS_REFUSED:
            lines.append(f"- **k = {r['k']}.** The saturating fit of ΔCE_rec(T) cannot be said: {r['reason']}"
                         f"{interp}.")
            continue
        where = (f"T* ≈ {_fmt_t(r['t_star'])}{_interval(r['t_star_lo'], r['t_star_hi'])}, {r['location']}"
                 if pd.notna(r["t_star"]) else f"no crossing ({r['location']})")
        note = f" ({r['reason']})" if r["reason"] else ""
        lines.append(f"- **k = {r['k']}.** Fitted ΔCE_rec(T) = {r['d_inf']:+.3f} − a·T^−{r['alpha']:.2f}: "
                     f"{where}{note}{interp}.")
    return ("\n".join(lines) + "\n\nOnly the gaps are published, not each model's CE_rec(T), so the gap is fitted "
            "as one saturating curve. A difference of two saturating curves can cross back, and whether the gap "
            "stays positive beyond 100M cannot be said from this table.")
