"""Model ladders and depth sweeps: the study's analysis per setting (a pair of models at one matched hook), and
what the settings say together.

A grid with more than two models, or with several hooks per model, has several *settings*
(``Params.settings``): each pair of roles (consecutive sizes; with ``pairs: with_smallest`` also the smallest
against each larger one) at each hook (the i-th shallowest of both models; with ``depths``, the same relative
depth). Every table of the two-model analysis (pairs, phase-2 table, sign flip, eval noise, leaderboard, claims,
budget curves) is computed per setting, on that setting's two sides relabelled ``small`` and ``large`` (the
smaller and the larger model of the pair; Δ = large − small as always), and stacked with the columns
``SETTING_COLUMNS`` in front. A grid with one setting keeps its tables exactly as they were.

Across settings:

- ``settings_table``: each setting's models, hooks, relative depths and size ratio (non-embedding parameters,
  ``Params.n_params``);
- ``ladder_table``: the phase-2 cells of every setting beside its size ratio; ``size_trend``: per hook, k and
  budget, how the mean ΔCE_rec and ΔR² change with the size ratio (least-squares slope per decade over the
  pairs' cell means);
- ``claims_summary``: per claim, in how many settings it is supported, rejected or pending.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import pandas as pd

from .params import FAMILIES, Params, Setting
from .plots import format_tokens  # rounded (123k), as the figures and the report write budgets

SETTING_COLUMNS = ["setting", "pair", "hook"]
SIDES = ("small", "large")  # the two sides of a setting: the smaller and the larger model of its pair
SETTINGS_COLUMNS = [*SETTING_COLUMNS, "small_role", "large_role", "small_model", "large_model", "small_hook",
                    "large_hook", "small_depth", "large_depth", "small_params", "large_params", "size_ratio", "family"]
LADDER_COLUMNS = [*SETTING_COLUMNS, "size_ratio", "small_depth", "large_depth", "k", "tokens", "n",
                  "d_ce_rec_mean", "d_ce_rec_lo", "d_ce_rec_hi", "d_r2_mean", "d_r2_lo", "d_r2_hi", "mismatch_rate"]
TREND_COLUMNS = ["hook", "k", "tokens", "n_pairs", "size_ratio_min", "size_ratio_max", "d_ce_rec_slope",
                 "d_r2_slope", "d_ce_rec_at_min", "d_ce_rec_at_max", "d_r2_at_min", "d_r2_at_max"]
SUMMARY_LABEL = "all settings"
CLAIM_COUNT_COLUMNS = ["n_settings", "n_supported", "n_rejected", "n_pending"]


# ---------------------------------------------------------------- one setting


def side_rows(sae_metrics: pd.DataFrame, p: Params, s: Setting) -> pd.DataFrame:
    """The SAE rows of a setting's two sides (model role and hook), ``model_role`` relabelled ``small`` /
    ``large``: what ``stats.pair`` and the report's per-model sections read. Row order is kept. The hook is
    matched only when models have several (with one, a role's rows are its hook's, as before ladders)."""
    if not len(sae_metrics):
        return sae_metrics
    multi = p.multi_hook
    sides = {(s.small, p.hook(s.small, s.layer_small) if multi else ""): SIDES[0],
             (s.large, p.hook(s.large, s.layer_large) if multi else ""): SIDES[1]}
    hooks = sae_metrics["hook"] if multi else [""] * len(sae_metrics)
    key = list(zip(sae_metrics["model_role"], hooks))
    keep = np.array([k in sides for k in key], dtype=bool)
    out = sae_metrics.loc[keep].copy()
    out["model_role"] = [sides[k] for k, kept in zip(key, keep) if kept]
    return out


def with_setting(s: Setting, df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with the setting's ``SETTING_COLUMNS`` in front."""
    out = df.copy()
    for i, (col, value) in enumerate(zip(SETTING_COLUMNS, (s.label, s.pair, s.hook))):
        out.insert(i, col, value)
    return out


def stack(frames: Iterable[tuple[Setting, pd.DataFrame]]) -> pd.DataFrame:
    """One table of every setting's table, each with its ``SETTING_COLUMNS`` in front (settings in order)."""
    parts = [with_setting(s, df) for s, df in frames]
    parts = [d for d in parts if len(d.columns) > len(SETTING_COLUMNS)]
    if not parts:
        return pd.DataFrame(columns=SETTING_COLUMNS)
    return pd.concat([d for d in parts if len(d)] or parts[:1], ignore_index=True)


def setting_view(agg: dict[str, pd.DataFrame], p: Params, label: str | None = None) -> dict[str, pd.DataFrame]:
    """The aggregate as the two-model report reads it, for one setting (``label``; None: the grid's only one):
    the per-setting tables filtered to it without the setting columns, ``sae_metrics`` reduced to its two
    sides (``side_rows``). Raises ValueError for an unknown label, or None in a grid with several settings."""
    settings = {s.label: s for s in p.settings()}
    if label is None:
        if len(settings) != 1:
            raise ValueError(f"this grid has {len(settings)} settings; name one of {', '.join(settings)}")
        label = next(iter(settings))
    if label not in settings:
        raise ValueError(f"unknown setting {label!r}; this grid's settings: {', '.join(settings)}")
    out = {}
    for name, df in agg.items():
        if name == "sae_metrics":
            out[name] = side_rows(df, p, settings[label]) if {"model_role", "hook"} <= set(df.columns) else df
        elif len(settings) > 1 and "setting" in df.columns:
            out[name] = df[df["setting"] == label].drop(columns=[c for c in SETTING_COLUMNS if c in df.columns]
                                                         ).reset_index(drop=True)
        else:
            out[name] = df
    return out


def per_setting(frame_fn, df: pd.DataFrame) -> pd.DataFrame:
    """``frame_fn(df)`` (a readable-table function of the two-model report), once per setting of a stacked
    table and concatenated under the setting's label; ``frame_fn(df)`` itself for a table without settings."""
    if df is None or "setting" not in df.columns:
        return frame_fn(df)
    return pd.concat({label: frame_fn(g.drop(columns=SETTING_COLUMNS).reset_index(drop=True))
                      for label, g in df.groupby("setting", sort=False)}, names=["setting"])


# ---------------------------------------------------------------- across settings


def settings_table(p: Params) -> pd.DataFrame:
    """One row per setting: its roles, model names, hooks, relative depths, non-embedding parameters, the
    size ratio large / small and the family (the HF model_type both models share)."""
    rows = []
    for s in p.settings():
        n_s, n_l = p.n_params(s.small), p.n_params(s.large)
        rows.append({"setting": s.label, "pair": s.pair, "hook": s.hook, "small_role": s.small, "large_role": s.large,
                     "small_model": p.models[s.small].name, "large_model": p.models[s.large].name,
                     "small_hook": p.hook(s.small, s.layer_small), "large_hook": p.hook(s.large, s.layer_large),
                     "small_depth": p.depth(s.small, s.layer_small), "large_depth": p.depth(s.large, s.layer_large),
                     "small_params": n_s, "large_params": n_l, "size_ratio": n_l / n_s, "family": p.family(s.small)})
    return pd.DataFrame(rows, columns=SETTINGS_COLUMNS)


def ladder_table(phase2: pd.DataFrame, settings: pd.DataFrame) -> pd.DataFrame:
    """Every setting's phase-2 cells (the stacked ``phase2_table``) beside its size ratio and depths, sorted by
    hook, k, budget and size ratio: the numbers the ladder summary reads."""
    if not len(phase2) or "setting" not in phase2.columns:
        return pd.DataFrame(columns=LADDER_COLUMNS)
    info = settings[["setting", "size_ratio", "small_depth", "large_depth"]]
    out = phase2.merge(info, on="setting", how="left")
    out = out.sort_values(["hook", "k", "tokens", "size_ratio"], kind="stable").reset_index(drop=True)
    return out[[c for c in LADDER_COLUMNS if c in out.columns]]


def _slope(ratio: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of y against log10(ratio) (per decade of size ratio); NaN with < 2 distinct ratios."""
    ok = np.isfinite(y)
    x = np.log10(ratio[ok])
    if len(np.unique(x)) < 2:
        return np.nan
    return float(np.polyfit(x, y[ok], 1)[0])


def size_trend(ladder: pd.DataFrame) -> pd.DataFrame:
    """Per hook, k and budget: over the settings' pairs (one mean per pair), the size-ratio range, the slope of
    mean ΔCE_rec and of mean ΔR² per decade of size ratio (``_slope``), and the means at the smallest and the
    largest ratio (averaged over the pairs that share it; NaN when every pair has the same ratio: no size
    trend to read). A negative ΔCE_rec slope: the larger the step in size, the worse the larger model's SAEs
    preserve behaviour at that budget."""
    rows = []
    if not len(ladder):
        return pd.DataFrame(columns=TREND_COLUMNS)
    for (hook, k, tokens), g in ladder.groupby(["hook", "k", "tokens"], sort=True, dropna=False):
        r = g["size_ratio"].to_numpy(float)
        ce, r2 = g["d_ce_rec_mean"].to_numpy(float), g["d_r2_mean"].to_numpy(float)
        lo, hi = r == r.min(), r == r.max()
        spread = r.max() > r.min()
        at = lambda y, where: float(np.mean(y[where])) if spread else np.nan  # noqa: E731
        rows.append({"hook": hook, "k": k, "tokens": tokens, "n_pairs": len(g), "size_ratio_min": r.min(),
                     "size_ratio_max": r.max(), "d_ce_rec_slope": _slope(r, ce), "d_r2_slope": _slope(r, r2),
                     "d_ce_rec_at_min": at(ce, lo), "d_ce_rec_at_max": at(ce, hi), "d_r2_at_min": at(r2, lo),
                     "d_r2_at_max": at(r2, hi)})
    return pd.DataFrame(rows, columns=TREND_COLUMNS)


def claims_summary(claims: pd.DataFrame) -> pd.DataFrame:
    """One row per claim over the stacked per-setting claim rows: ``status`` 'supported' / 'rejected' /
    'pending' when every setting agrees, else 'mixed'; ``evidence`` says in how many settings (and which) it is
    supported, rejected and pending; ``CLAIM_COUNT_COLUMNS`` give the counts."""
    rows = []
    for claim, g in claims.groupby("claim", sort=False):
        counts = {st: g.loc[g["status"] == st, "setting"].tolist() for st in ("supported", "rejected", "pending")}
        n = len(g)
        status = next((st for st, where in counts.items() if len(where) == n), "mixed")
        evidence = "; ".join(f"{st} in {len(where)} of {n} settings" + (f" ({', '.join(where)})" if 0 < len(where) < n
                                                                         else "")
                             for st, where in counts.items())
        first = g.iloc[0]
        rows.append({"setting": SUMMARY_LABEL, "pair": "", "hook": "", "claim": claim, "gate": first["gate"],
                     "statement": first["statement"], "status": status, "evidence": evidence,
                     "rule": "holds (supported) in how many settings (pair x hook) of the grid",
                     "n_settings": n, **{f"n_{st}": len(where) for st, where in counts.items()}})
    return pd.DataFrame(rows)


def claims_matrix(claims: pd.DataFrame) -> pd.DataFrame:
    """Claim x setting: each setting's status, then the summary's ('supported in 2 of 4' style counts)."""
    per = claims[claims["setting"] != SUMMARY_LABEL]
    if not len(per):
        return pd.DataFrame({"status": ["pending: no claims yet"]})
    out = per.pivot(index="claim", columns="setting", values="status")
    out = out[list(dict.fromkeys(per["setting"]))]
    summary = claims[claims["setting"] == SUMMARY_LABEL].set_index("claim")
    if len(summary):
        out["supported in"] = [f"{int(summary.loc[c, 'n_supported'])} of {int(summary.loc[c, 'n_settings'])}"
                               for c in out.index]
    out.columns.name = None
    return out


# ---------------------------------------------------------------- the report's summary section


def _fmt_ratio(x: Any) -> str:
    return f"{float(x):.3g}×"


def header_markdown(p: Params) -> str:
    """The report's opening for a grid with several settings: title, description, the models with their size and
    hooks, which settings are compared, and how the page is laid out; a one-line note for a single setting."""
    settings = p.settings()
    if len(settings) == 1:
        return (f"# {p.report.title}\n\nThis grid has one setting ({settings[0].label}): its report is the whole "
                "story, with nothing to compare across a ladder of models or hooks.")
    models = "\n".join(f"| {r} | `{p.models[r].name}` | {p.models[r].n_layers} x {p.models[r].d_model} | "
                       f"{p.n_params(r):,} | {', '.join(f'`blocks.{L}` ({p.depth(r, L):.2f})' for L in p.layers(r))} |"
                       for r in p.roles)
    pairs = {"consecutive": "consecutive sizes",
             "with_smallest": "consecutive sizes, and the smallest model against each larger one",
             "within_family": "consecutive sizes within each model family"}[p.pairs]
    hooks = (f"hooks matched at the relative depths {', '.join(f'{d:g}' for d in p.depths)}" if p.depths is not None
             else "hooks matched by position (the i-th shallowest of one model with the i-th of the other)"
             if p.multi_hook else "one hook per model")
    return f"""# {p.report.title}

{p.description}

| role | model | layers x width | non-embedding parameters | hooks (relative depth) |
|---|---|---|---|---|
{models}

## Across the ladder

**{len(settings)} settings**: pairs of {pairs}; {hooks}. This summary reads them together; after it
each setting has its own section, the full two-model report with the pair's smaller model as *small* and the larger
as *large* (Δ = large − small).
"""


def settings_frame(settings: pd.DataFrame) -> pd.DataFrame:
    """Readable settings table: pair, hook, the two models and hooks with their relative depths, size ratio."""
    if not len(settings):
        return pd.DataFrame({"status": ["no settings"]})
    return pd.DataFrame({
        "setting": settings["setting"],
        "small model (hook, depth)": [f"{m} ({h.split('.hook')[0]}, {d:.2f})" for m, h, d in
                                      zip(settings["small_model"], settings["small_hook"], settings["small_depth"])],
        "large model (hook, depth)": [f"{m} ({h.split('.hook')[0]}, {d:.2f})" for m, h, d in
                                      zip(settings["large_model"], settings["large_hook"], settings["large_depth"])],
        "size ratio": settings["size_ratio"].map(_fmt_ratio),
        **({"family": settings["family"].map(lambda t: FAMILIES[t].label if t in FAMILIES else t)}
           if "family" in settings.columns and settings["family"].nunique() > 1 else {}),
    }).set_index("setting")


def trend_frame(trend: pd.DataFrame) -> pd.DataFrame:
    """Readable size trend: per hook, k and budget, mean ΔCE_rec and ΔR² at the smallest and largest size ratio
    and the slope per decade of size ratio."""
    if not len(trend):
        return pd.DataFrame({"status": ["pending: no complete pairs yet"]})
    f = lambda x: "—" if pd.isna(x) else f"{x:+.3f}"  # noqa: E731
    out = pd.DataFrame({
        "hook": trend["hook"].fillna("").replace("", "—"), "k": trend["k"],
        "tokens": [format_tokens(int(t)) for t in trend["tokens"]], "pairs": trend["n_pairs"],
        "size ratio": [f"{_fmt_ratio(a)}–{_fmt_ratio(b)}" for a, b in zip(trend["size_ratio_min"],
                                                                         trend["size_ratio_max"])],
        "ΔCE_rec (smallest → largest ratio)": [f"{f(a)} → {f(b)}" for a, b in zip(trend["d_ce_rec_at_min"],
                                                                                   trend["d_ce_rec_at_max"])],
        "ΔCE_rec slope / decade": trend["d_ce_rec_slope"].map(f),
        "ΔR² (smallest → largest ratio)": [f"{f(a)} → {f(b)}" for a, b in zip(trend["d_r2_at_min"],
                                                                             trend["d_r2_at_max"])],
        "ΔR² slope / decade": trend["d_r2_slope"].map(f),
    })
    return out.set_index(["hook", "k", "tokens"])


def ladder_markdown(trend: pd.DataFrame, summary: pd.DataFrame, settings: pd.DataFrame) -> str:
    """What the ladder says, in a few deterministic sentences: how many settings, and per hook at the lowest and
    the highest budget (lowest k) the direction of ΔCE_rec and ΔR² with the size ratio; then how many claims
    hold in every setting."""
    if not len(settings):
        return "Pending: no settings."
    n = len(settings)
    text = [f"This grid compares **{n} settings** ({settings['pair'].nunique()} model pair(s) × "
            f"{max(1, settings['hook'].replace('', np.nan).nunique())} hook(s)); size ratios (non-embedding "
            f"parameters, large / small) from {_fmt_ratio(settings['size_ratio'].min())} to "
            f"{_fmt_ratio(settings['size_ratio'].max())}."]
    if len(trend) and trend["d_ce_rec_slope"].notna().any():
        k0 = trend["k"].min()
        for hook, g in trend[trend["k"] == k0].groupby("hook", sort=True, dropna=False):
            g = g.sort_values("tokens")
            parts = []
            for _, row in (g.iloc[[0, -1]] if len(g) > 1 else g).iterrows():
                if pd.isna(row["d_ce_rec_slope"]):
                    continue
                parts.append(f"at T = {format_tokens(int(row['tokens']))}, ΔCE_rec goes {row['d_ce_rec_at_min']:+.3f}"
                             f" → {row['d_ce_rec_at_max']:+.3f} and ΔR² {row['d_r2_at_min']:+.3f} → "
                             f"{row['d_r2_at_max']:+.3f} from the smallest to the largest size ratio (slopes "
                             f"{row['d_ce_rec_slope']:+.3f} and {row['d_r2_slope']:+.3f} per decade)")
            if parts:
                where = f"hook {hook}" if isinstance(hook, str) and hook else "the hook"
                text.append(f"At {where}, k = {int(k0)}: " + "; ".join(parts) + ".")
    else:
        text.append("The size trend needs pairs with at least two different size ratios at the same hook and cell "
                    "(pending).")
    if len(summary):
        held = summary.loc[summary["status"] == "supported", "claim"].tolist()
        rej = summary.loc[summary["status"] == "rejected", "claim"].tolist()
        mixed = summary.loc[summary["status"] == "mixed", "claim"].tolist()
        text.append(f"Claims supported in every setting: {', '.join(held) or 'none'}; rejected in every setting: "
                    f"{', '.join(rej) or 'none'}; mixed (the verdict depends on the pair or hook): "
                    f"{', '.join(mixed) or 'none'}.")
    return "\n\n".join(text)
