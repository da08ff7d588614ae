r"""What the proxy gap is made of, measured: the study's "proxy gap = metric mismatch + optimization state +
estimation noise", per (k, T) cell, from the budget fits (:mod:`budget_curves`) and the noise estimates
(:func:`stats.eval_noise`). Works on tables only.

For a metric (CE_rec, R²) at a tested budget T of sparsity k, with the per-seed paired gaps
``Δ_i = y_large,i - y_small,i`` (n seeds) and both roles' fitted curves ``y(T) = y_inf - a T^-alpha``:

* ``observed`` = mean Δ_i, with its Student-t interval (``seed_se`` = SD / sqrt(n));
* ``asymptotic`` = Δy∞ = y∞,large - y∞,small: the gap an unlimited budget leaves, the *metric-mismatch* (intrinsic)
  term, with the interval of the paired seed bootstrap of both fits;
* ``optimisation`` = Δ̂(T) - Δy∞ (Δ̂ the fitted gap at T): the part that more training removes, the
  *optimisation-state* term, with its bootstrap interval;
* ``lack_of_fit`` = observed - Δ̂(T): what the power law does not explain.

So ``observed = asymptotic + optimisation + lack_of_fit`` exactly. Estimation noise: ``seed_se`` and ``eval_se``
(the eval-sampling SE of the mean gap, :func:`stats.eval_noise`; measured for CE_rec only, NaN for R², whose
per-sequence sums are not stored), ``noise_se`` = sqrt(seed_se² + eval_se²) (eval_se counted as 0 where NaN).
``share_<term>`` is |term| / (|asymptotic| + |optimisation| + |lack_of_fit|): the share of the gap's magnitude each
term carries (shares of |observed| itself could exceed 1 when terms cancel).

**Verdict** per (k, T), on both metrics' rows: the proxy gap is the disagreement of ΔR² (the proxy) with ΔCE_rec
(behaviour). In this order:

1. *no mismatch*: the observed ΔCE_rec and ΔR² have the same sign;
2. *within noise*: their signs differ, and an observed interval spans 0;
3. *cannot be said*: their signs differ, and a fit of either metric is refused (``budget_curves``' rules) or has no
   bootstrap;
4. *optimisation-mediated*: the observed signs differ, the asymptotes' signs agree;
5. *metric mismatch*: the asymptotes' signs differ too.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from .budget_curves import Curves, _pct, predict

NO_MISMATCH, WITHIN_NOISE, CANNOT, OPTIMISATION, METRIC = (
    "no mismatch", "within noise", "cannot be said", "optimisation-mediated", "metric mismatch")
VERDICTS = (NO_MISMATCH, WITHIN_NOISE, CANNOT, OPTIMISATION, METRIC)
TERMS = ("asymptotic", "optimisation", "lack_of_fit")
DECOMPOSITION_COLUMNS = ["k", "tokens", "metric", "n", "observed", "observed_lo", "observed_hi", "fitted",
                         "asymptotic", "asymptotic_lo", "asymptotic_hi", "optimisation", "optimisation_lo",
                         "optimisation_hi", "lack_of_fit", "seed_se", "eval_se", "noise_se", "share_asymptotic",
                         "share_optimisation", "share_lack_of_fit", "fit_status", "verdict", "reason"]


def _terms(c: Curves, j: int, level: float) -> dict:
    """One (k, metric, T) row's numbers (module docstring); the fitted terms only where both fits are accepted."""
    d = c.samples[j][:, 1] - c.samples[j][:, 0]
    n = len(d)
    se = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else np.nan
    half = float(sps.t.ppf((1 + level) / 2, n - 1)) * se if n > 1 else np.nan
    row = {"k": c.k, "tokens": int(c.tokens[j]), "metric": c.metric, "n": n, "observed": float(d.mean()),
           "observed_lo": float(d.mean()) - half, "observed_hi": float(d.mean()) + half, "seed_se": se,
           "fit_status": "fit" if c.ok else "; ".join(f"{r}: {f.reason}" for r, f in c.fits.items() if f.reason)}
    if not c.ok:
        return row
    x = c.scale.x([c.tokens[j]])
    small, large = c.fits["small"], c.fits["large"]
    fitted = float(predict(large.point, x)[0, 0] - predict(small.point, x)[0, 0])
    asym = float(large.point["y_inf"][0] - small.point["y_inf"][0])
    row |= {"fitted": fitted, "asymptotic": asym, "optimisation": fitted - asym, "lack_of_fit": row["observed"] - fitted}
    if c.has_boot:
        a_b = large.boot["y_inf"] - small.boot["y_inf"]
        f_b = predict(large.boot, x)[:, 0] - predict(small.boot, x)[:, 0]
        row["asymptotic_lo"], row["asymptotic_hi"] = _pct(a_b, level)
        row["optimisation_lo"], row["optimisation_hi"] = _pct(f_b - a_b, level)
    total = sum(abs(row[t]) for t in TERMS)
    for t in TERMS:
        row[f"share_{t}"] = abs(row[t]) / total if total > 0 else np.nan
    return row


def _spans_zero(row: pd.Series) -> bool:
    return not (row["observed_lo"] > 0 or row["observed_hi"] < 0)


def _verdict(cell: pd.DataFrame) -> tuple[str, str]:
    """(verdict, reason) of one (k, T) cell from its ce_rec and r2 rows (module docstring's order)."""
    by = {r["metric"]: r for _, r in cell.iterrows()}
    if set(by) != {"ce_rec", "r2"}:
        return CANNOT, f"only {', '.join(sorted(by))} measured in this cell"
    ce, r2 = by["ce_rec"], by["r2"]
    if np.sign(ce["observed"]) == np.sign(r2["observed"]):
        return NO_MISMATCH, f"ΔCE_rec {ce['observed']:+.4g} and ΔR² {r2['observed']:+.4g} agree in sign"
    noisy = [m for m, r in (("ΔCE_rec", ce), ("ΔR²", r2)) if _spans_zero(r)]
    if noisy:
        return WITHIN_NOISE, f"the signs differ, but the interval of {' and '.join(noisy)} spans 0"
    refused = [m for m, r in (("CE_rec", ce), ("R²", r2)) if r["fit_status"] != "fit" or np.isnan(r["asymptotic_lo"])]
    if refused:
        return CANNOT, f"the signs differ; the budget fit of {' and '.join(refused)} is refused or has no interval"
    asym = f"Δy∞ CE_rec {ce['asymptotic']:+.4g}, R² {r2['asymptotic']:+.4g}"
    if np.sign(ce["asymptotic"]) == np.sign(r2["asymptotic"]):
        return OPTIMISATION, f"the signs differ at this budget; the asymptotes agree ({asym})"
    return METRIC, f"the signs differ, and so do the asymptotes ({asym})"


def decompose(curves: Sequence[Curves], noise: pd.DataFrame | None = None, level: float = 0.95) -> pd.DataFrame:
    """``decomposition.csv``: one row per (k, T, metric) of ``curves`` (``budget_curves.curves_for`` of the pairs)
    with the terms, intervals, noise and the cell's verdict (module docstring; ``DECOMPOSITION_COLUMNS``).
    ``noise`` is :func:`stats.eval_noise`'s table (``d_ce_rec_eval_se`` per k, tokens) or None."""
    rows = [_terms(c, j, level) for c in curves for j in range(len(c.tokens))]
    df = pd.DataFrame(rows, columns=DECOMPOSITION_COLUMNS)
    if not len(df):
        return df
    df["eval_se"] = np.nan
    if noise is not None and len(noise):
        se = noise.set_index(["k", "tokens"])["d_ce_rec_eval_se"]
        ce = df["metric"] == "ce_rec"
        df.loc[ce, "eval_se"] = [se.get((k, t), np.nan) for k, t in zip(df.loc[ce, "k"], df.loc[ce, "tokens"])]
    df["noise_se"] = np.hypot(df["seed_se"].fillna(0.0), df["eval_se"].fillna(0.0))
    df["verdict"], df["reason"] = "", ""
    for _, cell in df.groupby(["k", "tokens"], sort=False):
        verdict, reason = _verdict(cell)
        df.loc[cell.index, "verdict"] = verdict
        df.loc[cell.index, "reason"] = reason
    return df.sort_values(["k", "tokens", "metric"], ignore_index=True)[DECOMPOSITION_COLUMNS]
