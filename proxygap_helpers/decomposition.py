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

**The study's table** (:func:`reference`) holds only the mean gaps per (k, T), with Student-t intervals: each
gap series (ΔCE_rec and ΔR² per k) is fitted as one saturating curve in the direction it moves (the per-model
curves are unknown), under the same refusal rule; its limit is the asymptotic term, and a parametric bootstrap
(each mean drawn as mean + SE t_{n-1}, SE from the interval) gives its interval where every budget has n >= 2.
With three budgets and three parameters the curve passes through the means: lack_of_fit is 0 there.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from .budget_curves import (STATUS_FIT, Curves, Scale, _monotone_reason, _pct, _shape_reason, fit_means,
                            predict)
from .plots import format_tokens  # rounded (123k), as the figures and the rest of the report write budgets

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
    refused = [f"the {m} fit is refused ({r['fit_status']})" if r["fit_status"] != "fit" else f"the {m} fit has no "
               "interval (a budget with one seed)" for m, r in (("CE_rec", ce), ("R²", r2))
               if r["fit_status"] != "fit" or np.isnan(r["asymptotic_lo"])]
    if refused:
        return CANNOT, "the signs differ; " + "; ".join(refused)
    asym = f"Δy∞ CE_rec {ce['asymptotic']:+.4g}, R² {r2['asymptotic']:+.4g}"
    if np.sign(ce["asymptotic"]) == np.sign(r2["asymptotic"]):
        return OPTIMISATION, f"the signs differ at this budget; the asymptotes agree ({asym})"
    return METRIC, f"the signs differ, and so do the asymptotes ({asym})"


def reference(table: pd.DataFrame, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """The study's published table (``k, tokens, n, d_ce_rec_mean/lo/hi, d_r2_mean/lo/hi``) read as
    :func:`decompose` reads a grid, as far as its means allow (module docstring): ``DECOMPOSITION_COLUMNS`` without
    the noise split (``seed_se`` is the SE recovered from the interval; ``eval_se`` NaN)."""
    rows = []
    q = (1 + level) / 2
    for k, cell in table.sort_values("tokens").groupby("k", sort=True):
        for metric in ("ce_rec", "r2"):
            rows += _reference_rows(int(k), metric, cell, q, n_boot, seed)
    df = pd.DataFrame(rows, columns=DECOMPOSITION_COLUMNS)
    df["noise_se"] = df["seed_se"]
    return _with_verdicts(df)


def _with_verdicts(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with each (k, T) cell's verdict and reason, sorted by its keys."""
    df["verdict"], df["reason"] = "", ""
    for _, cell in df.groupby(["k", "tokens"], sort=False):
        verdict, reason = _verdict(cell)
        df.loc[cell.index, "verdict"] = verdict
        df.loc[cell.index, "reason"] = reason
    return df.sort_values(["k", "tokens", "metric"], ignore_index=True)[DECOMPOSITION_COLUMNS]


def _reference_rows(k: int, metric: str, cell: pd.DataFrame, q: float, n_boot: int, seed: int) -> list[dict]:
    col = f"d_{metric}"
    tokens, n = cell["tokens"].to_numpy(np.int64), cell["n"].to_numpy(int)
    mean, lo, hi = (cell[f"{col}_{c}"].to_numpy(float) for c in ("mean", "lo", "hi"))
    se = np.where(n > 1, (hi - lo) / (2 * sps.t.ppf(q, np.maximum(n - 1, 1))), np.nan)
    rows = [{"k": k, "tokens": int(t), "metric": metric, "n": int(m), "observed": float(y), "observed_lo": float(a),
             "observed_hi": float(b), "seed_se": float(e), "eval_se": np.nan}
            for t, m, y, a, b, e in zip(tokens, n, mean, lo, hi, se)]
    direction = 1.0 if mean[-1] >= mean[0] else -1.0  # a gap may close from either side: fit it rising
    reason = (f"{len(tokens)} budget(s)" if len(tokens) < 3 else
              _monotone_reason(tokens, direction * mean, se))
    scale = Scale.of(tokens)
    point = None
    if reason is None:
        point = fit_means(scale.x(tokens), direction * mean[None], n, scale.beta_bounds(), y_max=None)
        reason = _shape_reason(point)
    for j, row in enumerate(rows):
        row["fit_status"] = STATUS_FIT if reason is None else reason
        if reason is not None:
            continue
        fitted = direction * float(predict(point, scale.x(tokens[j:j + 1]))[0, 0])
        asym = direction * float(point["y_inf"][0])
        row |= {"fitted": fitted, "asymptotic": asym, "optimisation": fitted - asym,
                "lack_of_fit": row["observed"] - fitted}
        if (n > 1).all():
            rng = np.random.default_rng([seed, k, j])
            draws = direction * (mean + se * rng.standard_t(n - 1, size=(n_boot, len(n))))
            boot = fit_means(scale.x(tokens), draws, n, scale.beta_bounds(), y_max=None)
            a_b = direction * boot["y_inf"]
            f_b = direction * predict(boot, scale.x(tokens[j:j + 1]))[:, 0]
            row["asymptotic_lo"], row["asymptotic_hi"] = _pct(a_b, 2 * q - 1)
            row["optimisation_lo"], row["optimisation_hi"] = _pct(f_b - a_b, 2 * q - 1)
        total = sum(abs(row[t]) for t in TERMS)
        for t in TERMS:
            row[f"share_{t}"] = abs(row[t]) / total if total > 0 else np.nan
    return rows


def overall_shares(df: pd.DataFrame) -> pd.DataFrame:
    """Per metric, over the cells whose fits are accepted: the share of the summed |terms| that each term carries
    (``share_<term>``), the cells counted, and the mean noise SE over the mean |observed| (``noise_to_gap``)."""
    rows = []
    for metric, g in df[df["fit_status"] == STATUS_FIT].groupby("metric", sort=True):
        mags = {t: float(g[t].abs().sum()) for t in TERMS}
        total = sum(mags.values())
        rows.append({"metric": metric, "cells": len(g),
                     **{f"share_{t}": mags[t] / total if total > 0 else np.nan for t in TERMS},
                     "noise_to_gap": float(g["noise_se"].mean() / g["observed"].abs().mean())})
    return pd.DataFrame(rows, columns=["metric", "cells", *(f"share_{t}" for t in TERMS), "noise_to_gap"])


METRIC_NAMES = {"ce_rec": "ΔCE_rec", "r2": "ΔR²"}


def markdown(df: pd.DataFrame, ref: pd.DataFrame | None = None) -> str:
    """The report's "What the gap is made of": verdict counts, the overall shares per metric, the cells that
    are not "no mismatch", and the study's table read the same way (``ref``: :func:`reference`)."""
    if df is None or not len(df):
        return "Pending: no complete pairs yet."
    cells = df.drop_duplicates(["k", "tokens"])
    counts = cells["verdict"].value_counts()
    lines = [f"**Verdicts**, {len(cells)} cells: " + "; ".join(f"{v} {counts[v]}" for v in VERDICTS if v in counts)
             + "."]
    shares = overall_shares(df)
    if not len(shares):
        lines.append("- No cell has both models' budget fits accepted (see the budget curves above), so the gap "
                     "cannot be split into its terms here: only the observed gaps, their noise and the verdicts.")
    for _, r in shares.iterrows():
        lines.append(f"- **{METRIC_NAMES[r['metric']]}** over {r['cells']} fitted cells: asymptotic (intrinsic) "
                     f"{r['share_asymptotic']:.0%} of the summed magnitudes, optimisation state "
                     f"{r['share_optimisation']:.0%}, lack of fit {r['share_lack_of_fit']:.0%}; the estimation "
                     f"noise (seed and eval SE) is {r['noise_to_gap']:.1%} of the mean |observed| gap.")
    odd = cells[cells["verdict"] != NO_MISMATCH]
    for _, c in odd.iterrows():
        lines.append(f"- k = {c['k']}, T = {format_tokens(int(c['tokens']))}: *{c['verdict']}*: {c['reason']}.")
    if ref is not None and len(ref):
        rc = ref.drop_duplicates(["k", "tokens"])
        rcount = rc["verdict"].value_counts()
        lines.append("\n**The study's table, read the same way** (three budgets, n = 1 at 50M, gap means only): "
                     + "; ".join(f"{v} {rcount[v]}" for v in VERDICTS if v in rcount) + ".")
        for _, c in rc.iterrows():
            lines.append(f"- k = {c['k']}, T = {format_tokens(int(c['tokens']))}: *{c['verdict']}*: {c['reason']}.")
    return "\n".join(lines)


def frame(df: pd.DataFrame | None) -> pd.DataFrame:
    """``decomposition.csv`` for reading: one row per (k, T, metric), indexed by them (budgets rounded: 123k), the
    terms rounded, intervals in brackets."""
    from .report import fmt_ci

    if df is None or not len(df):
        return pd.DataFrame()
    def num(v):
        return "" if pd.isna(v) else f"{round(v, 4) + 0.0:+.4f}"  # (no "-0.0000")
    return pd.DataFrame({
        "k": df["k"], "T": [format_tokens(int(t)) for t in df["tokens"]], "gap": df["metric"].map(METRIC_NAMES),
        "observed": [fmt_ci(m, a, b, 4) for m, a, b in zip(df["observed"], df["observed_lo"], df["observed_hi"])],
        "asymptotic Δy∞": [fmt_ci(m, a, b, 4) if pd.notna(m) else "" for m, a, b in
                           zip(df["asymptotic"], df["asymptotic_lo"], df["asymptotic_hi"])],
        "optimisation": [fmt_ci(m, a, b, 4) if pd.notna(m) else "" for m, a, b in
                         zip(df["optimisation"], df["optimisation_lo"], df["optimisation_hi"])],
        "lack of fit": df["lack_of_fit"].map(num), "noise SE": df["noise_se"].map(lambda v: f"{v:.4f}"),
        "verdict": df["verdict"]}).set_index(["k", "T", "gap"])


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
    return _with_verdicts(df)
