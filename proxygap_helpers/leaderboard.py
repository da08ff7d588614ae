"""Gate D2: which proxy delta best predicts the behavioural gap ``d_ce_rec`` of *held-out* cells?

For each proxy column ``d_<proxy>`` of the pairs table, an ordinary least-squares line
``d_ce_rec ~ a + b * proxy`` is fitted on the pair rows of the other cells and used to predict every pair
row of the held-out cells (when the training rows have fewer than 2 distinct proxy values the prediction is
the training mean of ``d_ce_rec``). Two schemes: leave-one-budget-out (hold out every pair at one
``tokens`` value) and leave-one-k-out; ``pooled`` scores both schemes' predictions together.

Scores over the held-out predictions: ``sign_acc`` = share of rows with sign(predicted) == sign(actual),
``spearman`` = Spearman rank correlation of predicted and actual, ``mae`` = mean |predicted - actual|.
Each proxy is compared with ``d_r2`` by a paired bootstrap over cells ``(k, tokens)``: one resample of
cells (with replacement, all of a cell's rows) is scored for every proxy. ``<score>_vs_r2`` is oriented so
that **positive = better than R2** for all three scores: ``sign_acc - sign_acc_r2``,
``spearman - spearman_r2`` and ``mae_r2 - mae``. MAE is the primary score (sign accuracy is coarse and
Spearman ignores calibration): ``beats_r2`` is True only when the whole percentile CI of ``mae_vs_r2`` is
above 0, and ``rank`` orders proxies by MAE within a scheme (1 = lowest).

Proxies (``PROXY_KINDS`` and ``PROXY_TEXT`` say what each measures): ``d_r2`` (the baseline), ``d_cosine``,
``d_rel_err_norm``, ``d_nmse`` (reconstruction-space), ``d_dim`` (gate D3: the share of the input's
participation ratio that the reconstruction keeps), ``d_swd`` and ``d_gwd`` (geometry-aware: the error
weighted by the model's sensitivity at the clean run, second-order Fisher pullback and first-order gradient),
``d_dead_frac`` (an optimisation-state proxy: the study attributes the low-budget gap mainly to training state,
so a training-state signal is the natural rival to geometry), and two behavioural references, ``d_kl`` and
``d_random_error_ratio``: they are measured with the reconstruction patched in, so they are upper references
for what a cheap proxy could reach, not proxies.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata

BASELINE = "d_r2"
DEFAULT_PROXIES: tuple[str, ...] = ("d_r2", "d_cosine", "d_rel_err_norm", "d_nmse", "d_kl", "d_swd", "d_gwd",
                                    "d_random_error_ratio", "d_dead_frac", "d_dim")
BEHAVIOURAL_REFERENCES: tuple[str, ...] = ("d_kl", "d_random_error_ratio")
PROXY_KINDS: dict[str, str] = {
    "d_r2": "reconstruction", "d_cosine": "reconstruction", "d_rel_err_norm": "reconstruction",
    "d_nmse": "reconstruction", "d_dim": "dimensionality (D3)", "d_swd": "geometry-aware",
    "d_gwd": "geometry-aware", "d_dead_frac": "optimisation state", "d_kl": "behavioural reference",
    "d_random_error_ratio": "behavioural reference",
}
PROXY_TEXT: dict[str, str] = {
    "d_r2": "ΔR², the fraction of the activations' variance around their mean that the reconstruction explains",
    "d_cosine": "Δ mean cosine between activation and reconstruction",
    "d_rel_err_norm": "Δ mean ‖x − x̂‖ / ‖x‖",
    "d_nmse": "Δ normalised MSE, Σ‖x − x̂‖² / Σ‖x‖²: like 1 − R², but divided by the uncentred size of the "
              "activations, so a larger model's bigger variance (SST) does not flatter it",
    "d_dim": "Δ participation ratio of the reconstruction's covariance as a share of the input's: how much of the "
             "activations' dimensionality the SAE keeps (gate D3)",
    "d_swd": "Δ SWD, the second-order (Fisher) term of the KL: the error pushed through the downstream Jacobian and "
             "weighted by the clean next-token distribution (one forward-mode JVP per batch)",
    "d_gwd": "Δ GWD, the study's first-order gradient-weighted distortion E[(gᵀe)²], with g the gradient of the "
             "clean sequence CE at the hook (one backward per batch, shared by all SAEs of a model)",
    "d_dead_frac": "Δ fraction of dead latents, a training-state signal",
    "d_kl": "Δ KL(clean ‖ patched), measured with the reconstruction spliced in: behaviour itself",
    "d_random_error_ratio": "Δ of Gurnee's ratio KL(SAE error) / KL(random error of the same norm per token): "
                            "how pathological the error's direction is, measured with patched forwards",
}
TARGET = "d_ce_rec"
SCHEMES: dict[str, str] = {"leave-one-budget-out": "tokens", "leave-one-k-out": "k"}
POOLED = "pooled"
SCORES = ("sign_acc", "spearman", "mae")
PREDICTION_COLUMNS = ["scheme", "proxy", "k", "tokens", "seed", "actual", "predicted", "fit"]
LEADERBOARD_COLUMNS = ["scheme", "proxy", "n_cells", "n_pred", *SCORES,
                       *(f"{s}_vs_r2{b}" for s in SCORES for b in ("", "_lo", "_hi")), "beats_r2", "rank", "note"]


def _requested(proxies: Sequence[str] | None) -> list[str]:
    return list(dict.fromkeys([BASELINE, *(DEFAULT_PROXIES if proxies is None else proxies)]))


def usable_proxies(pairs: pd.DataFrame, proxies: Sequence[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """Split the requested proxies (default ``DEFAULT_PROXIES``; ``d_r2`` is always added as the baseline)
    into those with data and ``{skipped proxy: reason}`` for columns that are absent or all NaN."""
    used, skipped = [], {}
    for proxy in _requested(proxies):
        if proxy not in pairs.columns:
            skipped[proxy] = f"skipped: column {proxy} absent from the pairs"
        elif pairs[proxy].isna().all():
            skipped[proxy] = f"skipped: column {proxy} is all NaN"
        else:
            used.append(proxy)
    return used, skipped


def _fit_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, str]:
    """OLS ``y ~ a + b x`` on the training rows -> predictions at ``x_test`` and the fit used
    ('ols'; 'mean' when fewer than 2 distinct x; 'none' with no training rows, predictions NaN)."""
    if y_train.size == 0:
        return np.full(x_test.shape, np.nan), "none"
    if np.unique(x_train).size < 2:
        return np.full(x_test.shape, y_train.mean()), "mean"
    slope, intercept = np.polyfit(x_train, y_train, 1)
    return intercept + slope * x_test, "ols"


def heldout_predictions(pairs: pd.DataFrame, proxies: Sequence[str] | None = None) -> pd.DataFrame:
    """Held-out predictions of ``d_ce_rec`` for every scheme, usable proxy and held-out pair row.

    Only pair rows where ``d_ce_rec`` and every usable proxy are finite take part, so all proxies are trained
    and scored on the same rows. Columns ``scheme, proxy, k, tokens, seed, actual, predicted, fit``; folds with
    nothing to train on (a scheme with a single k or budget) produce no rows.
    """
    used, _ = usable_proxies(pairs, proxies)
    data = pairs.dropna(subset=[TARGET, *used]).reset_index(drop=True)
    frames = []
    for scheme, column in SCHEMES.items():
        for held in sorted(data[column].unique()):
            test = (data[column] == held).to_numpy()
            y_train = data.loc[~test, TARGET].to_numpy(float)
            for proxy in used:
                x = data[proxy].to_numpy(float)
                predicted, fit = _fit_predict(x[~test], y_train, x[test])
                if fit != "none":
                    frames.append(data.loc[test, ["k", "tokens", "seed"]].assign(
                        scheme=scheme, proxy=proxy, actual=data.loc[test, TARGET], predicted=predicted, fit=fit))
    if not frames:
        return pd.DataFrame(columns=PREDICTION_COLUMNS)
    return pd.concat(frames, ignore_index=True)[PREDICTION_COLUMNS]


def _spearman(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Per column of ``predicted`` (rows x proxies): Pearson correlation of average ranks with ``actual``;
    NaN where either side is constant or there are < 2 rows."""
    if actual.size < 2 or np.ptp(actual) == 0:
        return np.full(predicted.shape[1], np.nan)
    rp = rankdata(predicted, axis=0)
    rp -= rp.mean(axis=0)
    ra = rankdata(actual) - (actual.size + 1) / 2
    norm = np.sqrt((rp**2).sum(axis=0) * (ra**2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, (rp * ra[:, None]).sum(axis=0) / norm, np.nan)


def _scores(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Scores of each column of ``predicted`` (rows x proxies) against ``actual``: array proxies x
    ``[sign_acc, spearman, mae]``."""
    return np.column_stack([(np.sign(predicted) == np.sign(actual)[:, None]).mean(axis=0),
                            _spearman(predicted, actual), np.abs(predicted - actual[:, None]).mean(axis=0)])


def _oriented_diff(scores: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """Score minus baseline score, with MAE reversed, so positive = better than the baseline."""
    return (scores - baseline) * np.array([1.0, 1.0, -1.0]) + 0.0


def _paired_bootstrap(wide: pd.DataFrame, proxies: list[str], n_boot: int, level: float,
                      rng: np.random.Generator) -> np.ndarray:
    """Percentile CIs of ``_oriented_diff(proxy, d_r2)`` over cell resamples: array [proxy, score, (lo, hi)]."""
    rows_of = list(wide.groupby(["k", "tokens"]).indices.values())
    actual, predicted = wide["actual"].to_numpy(float), wide[proxies].to_numpy(float)
    base = proxies.index(BASELINE)
    diffs = np.empty((n_boot, len(proxies), len(SCORES)))
    for b in range(n_boot):
        idx = np.concatenate([rows_of[c] for c in rng.integers(0, len(rows_of), len(rows_of))])
        scores = _scores(predicted[idx], actual[idx])
        diffs[b] = _oriented_diff(scores, scores[base])
    return np.moveaxis(np.nanquantile(diffs, [(1 - level) / 2, (1 + level) / 2], axis=0), 0, -1)


def _empty_row(scheme: str, proxy: str, n_cells: int, n_pred: int, note: str) -> dict[str, Any]:
    """A row without scores (NaN), saying why in ``note``."""
    return {"scheme": scheme, "proxy": proxy, "n_cells": n_cells, "n_pred": n_pred, "beats_r2": False, "note": note}


def _scheme_rows(scheme: str, preds: pd.DataFrame, proxies: list[str], n_boot: int, level: float,
                 rng: np.random.Generator) -> list[dict[str, Any]]:
    """Leaderboard rows of one scheme: point scores, and R2 comparisons when the baseline is usable."""
    wide = preds.pivot(index=["scheme", "k", "tokens", "seed"], columns="proxy", values="predicted")
    wide = wide.join(preds.groupby(["scheme", "k", "tokens", "seed"])["actual"].first()).reset_index()
    n_cells, n_pred = len(wide.groupby(["k", "tokens"])), len(wide)
    if n_cells < 2:
        note = (f"{n_cells} held-out cell(s) with predictions, need >= 2 (a fold trains on the pairs of the other "
                "k values / budgets)")
        return [_empty_row(scheme, p, n_cells, n_pred, note) for p in proxies]
    points = _scores(wide[proxies].to_numpy(float), wide["actual"].to_numpy(float))
    cis = _paired_bootstrap(wide, proxies, n_boot, level, rng) if n_boot > 0 else None
    rows = []
    for j, proxy in enumerate(proxies):
        row = {"scheme": scheme, "proxy": proxy, "n_cells": n_cells, "n_pred": n_pred,
               **dict(zip(SCORES, points[j])), "note": "baseline" if proxy == BASELINE else ""}
        diff = _oriented_diff(points[j], points[proxies.index(BASELINE)])
        for i, score in enumerate(SCORES):
            lo, hi = (np.nan, np.nan) if cis is None else cis[j, i]
            row |= {f"{score}_vs_r2": diff[i], f"{score}_vs_r2_lo": lo, f"{score}_vs_r2_hi": hi}
        row["beats_r2"] = bool(proxy != BASELINE and row["mae_vs_r2_lo"] > 0)
        rows.append(row)
    return rows


def proxy_leaderboard(pairs: pd.DataFrame, proxies: Sequence[str] | None = None, n_boot: int = 1000,
                      seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """One row per (scheme, proxy) for the two held-out schemes and ``pooled`` (see the module docstring).

    Columns ``LEADERBOARD_COLUMNS``: ``n_cells`` (held-out cells with predictions), ``n_pred`` (prediction
    rows), ``sign_acc, spearman, mae``, ``<score>_vs_r2[_lo|_hi]`` (positive = better than R2; the bootstrap
    generator of scheme i is seeded by ``(seed, i)``), ``beats_r2``, ``rank`` (by MAE within the scheme) and
    ``note``. Skipped proxies (absent / all NaN) and schemes with < 2 held-out cells give rows of NaN scores
    with the reason in ``note``; without a usable ``d_r2`` every proxy is skipped (there is no baseline).
    """
    used, skipped = usable_proxies(pairs, proxies)
    if BASELINE not in used:
        skipped |= {p: f"skipped: no usable baseline {BASELINE}" for p in used}
        used = []
    preds = heldout_predictions(pairs, used) if used else pd.DataFrame(columns=PREDICTION_COLUMNS)
    rows = []
    for i, scheme in enumerate([*SCHEMES, POOLED]):
        sub = preds if scheme == POOLED else preds[preds["scheme"] == scheme]
        scored = _scheme_rows(scheme, sub, used, n_boot, level, np.random.default_rng([seed, i])) if used else []
        by_proxy = {r["proxy"]: r for r in scored}
        by_proxy |= {p: _empty_row(scheme, p, 0, 0, why) for p, why in skipped.items()}
        rows += [by_proxy[p] for p in _requested(proxies)]
    board = pd.DataFrame(rows, columns=LEADERBOARD_COLUMNS)
    board["rank"] = board.groupby("scheme", sort=False)["mae"].rank(method="min")
    return board
