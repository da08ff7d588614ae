"""The written part of the report and its HTML export.

- ``caveats(table, sae_metrics)``: the data's own warnings (n = 1 cells, missing cells, dead latents, ...).
- ``narrative(table, sign_flip, leaderboard, claims)``: markdown that reads the numbers (deterministic).
- ``style_claims`` / ``style_table``: pandas Stylers for the claim table and the phase-2 table.
- ``render_html(executed_ipynb, out_html)``: a self-contained HTML page (code hidden, images inline, no
  script or stylesheet fetched from the network), written atomically.
- ``screenshot(html, png)`` / ``dump_dom(html)``: headless Chromium, to check what a reader sees.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from .leaderboard import BEHAVIOURAL_REFERENCES
from .plots import _col, _frame, _num  # the shared NaN-tolerant frame helpers
from .plots import format_tokens as fmt_tokens

MIN_N = 2
STUDY_LOW_BUDGET = 10_000_000
STATUS_COLORS = {"supported": ("#d4edda", "#1e7b34"), "pending": ("#fff3cd", "#8a6100"),
                 "rejected": ("#f8d7da", "#a71d2a"), "mixed": ("#e2e3e5", "#383d41")}
CHROMIUM_HINT = ("headless Chromium was not found (looked for $PROXYGAP_CHROMIUM, /usr/bin/chromium, and chromium / "
                 "chromium-browser / google-chrome on PATH); install it with "
                 "`apt-get update && apt-get install -y chromium`")


# ---------------------------------------------------------------- small formatting helpers


def _z(x: float, digits: int = 3) -> float:
    return round(float(x), digits) + 0.0  # no "-0.000"


def fmt_ci(mean: Any, lo: Any, hi: Any, digits: int = 3) -> str:
    """'-0.099 [-0.117, -0.082]'; a missing mean -> 'pending'; NaN bounds -> the mean alone."""
    mean, lo, hi = _num(mean), _num(lo), _num(hi)
    if np.isnan(mean):
        return "pending"
    if np.isnan(lo) or np.isnan(hi):
        return f"{_z(mean, digits):+.{digits}f}"
    return f"{_z(mean, digits):+.{digits}f} [{_z(lo, digits):.{digits}f}, {_z(hi, digits):.{digits}f}]"


def _fmt_sig(mean: Any, lo: Any, hi: Any) -> str:
    """Three significant digits, for secondary deltas whose scale varies (KL, SWD)."""
    mean, lo, hi = _num(mean), _num(lo), _num(hi)
    if np.isnan(mean):
        return "pending"
    if np.isnan(lo) or np.isnan(hi):
        return f"{mean:+.3g}"
    return f"{mean:+.3g} [{lo:.3g}, {hi:.3g}]"


def _where(k: Any, tokens: Any) -> str:
    return f"k={int(k)}, T={fmt_tokens(tokens)}"


def _grid(table: pd.DataFrame, sae_metrics: pd.DataFrame | None = None) -> tuple[list[int], list[int]]:
    """All k and all budgets seen in the table or the SAE metrics."""
    ks: set[int] = set()
    ts: set[int] = set()
    for df in (table, sae_metrics):
        if df is not None and {"k", "tokens"} <= set(df.columns):
            ks |= set(int(v) for v in df["k"].dropna())
            ts |= set(int(v) for v in df["tokens"].dropna())
    return sorted(ks), sorted(ts)


def _complete_cells(table: pd.DataFrame) -> set[tuple[int, int]]:
    if not {"k", "tokens"} <= set(table.columns):
        return set()
    n = _col(table, "n").fillna(0)
    return {(int(k), int(t)) for k, t, m in zip(table["k"], table["tokens"], n) if m >= 1}


# ---------------------------------------------------------------- caveats


def caveats(table: pd.DataFrame | None, sae_metrics: pd.DataFrame | None,
            extra: str | Iterable[str] | None = None) -> list[str]:
    """Caveats that the data itself raises, most important first, each one sentence or two (markdown).

    Triggers: no data; (k, T) cells with no complete pair ("pending") or with n = 1 ("directional"); SAEs
    without a partner of the other role; duplicate runs; more than half the latents dead; budgets above the
    activation data (``epochs_used > 1``); L0 below k; CE_rec saturated near 1; missing proxy values; few
    seeds; budgets below the study's; models other than the study's. ``extra`` strings are appended as is.
    """
    table, m = _frame(table), _frame(sae_metrics)
    out: list[str] = []
    if m.empty and table.empty:
        out.append("No SAE metrics yet: every number and claim in this report is pending.")
    ks, ts = _grid(table, m)
    done = _complete_cells(table)
    missing = [(k, t) for k in ks for t in ts if (k, t) not in done]
    if missing:
        out.append(f"{len(missing)} of {len(ks) * len(ts)} (k, T) cells have no complete small/large pair and are "
                   f"pending: {'; '.join(_where(k, t) for k, t in missing)}.")
    if {"k", "tokens", "n"} <= set(table.columns):
        single = table[_col(table, "n") == 1]
        if len(single):
            out.append(f"{len(single)} cell(s) rest on a single pair (n = 1) and are directional only, without an "
                       f"interval: {'; '.join(_where(k, t) for k, t in zip(single['k'], single['tokens']))}.")
        if len(table) and (_col(table, "n") >= 1).any():
            n_max = int(_col(table, "n").max())
            if n_max < 3:
                out.append(f"At most {n_max} seed(s) per cell: the 95% t-intervals are wide (t = 12.7 at n = 2) "
                           "and a rate of 0 or 1 over so few seeds is weak evidence.")
    if not m.empty:
        out += _sae_caveats(m)
    if extra is not None:
        out += [extra] if isinstance(extra, str) else [str(e) for e in extra]
    return out


def _sae_caveats(m: pd.DataFrame) -> list[str]:
    out: list[str] = []
    n = len(m)
    key = [c for c in ("k", "tokens", "seed") if c in m.columns]
    if "model_role" in m.columns and len(key) == 3:
        roles = m.groupby(key)["model_role"].agg(lambda s: set(s.dropna()))
        lonely = [(idx, r) for idx, r in roles.items() if not {"small", "large"} <= r]
        if lonely:
            parts = [f"k={int(k)}, T={fmt_tokens(t)}, seed {int(s)} (only {'/'.join(sorted(r)) or 'no role'})"
                     for (k, t, s), r in lonely]
            out.append(f"{len(lonely)} SAE run(s) have no partner of the other model and are left out of the "
                       f"pairs: {'; '.join(parts)}.")
        dup = m.duplicated(["model_role", *key], keep=False)
        if dup.any():
            groups = m[dup].groupby(["model_role", *key]).ngroups
            out.append(f"{int(dup.sum())} SAE rows share (model_role, k, T, seed) in {groups} group(s): only the "
                       "newest run of each is used.")
    dead = _col(m, "dead_frac")
    if (dead > 0.5).any():
        many = m[dead > 0.5]
        by_role = ", ".join(f"{role}: {cnt}" for role, cnt in many.get("model_role", pd.Series(dtype=str))
                            .value_counts().sort_index().items())
        out.append(f"{len(many)} of {n} SAEs have more than half of their latents dead (dead_frac up to "
                   f"{dead.max():.2f}; {by_role}): these dictionaries are under-trained, so gaps at those budgets "
                   "partly measure optimisation state.")
    epochs = _col(m, "epochs_used")
    if (epochs > 1).any():
        over = m[epochs > 1]
        budgets = sorted(set(int(t) for t in _col(over, "tokens").dropna()))
        out.append(f"{len(over)} SAE(s) were trained on a budget larger than the activation data (epochs_used up "
                   f"to {epochs.max():.2f}; budgets {', '.join(fmt_tokens(t) for t in budgets)}): their tokens "
                   "repeat, so a larger budget there is more passes, not more data.")
    l0, k = _col(m, "l0"), _col(m, "k")
    low = l0 < k - 1e-6
    if low.any():
        ratio = (l0[low] / k[low]).min()
        out.append(f"{int(low.sum())} SAE(s) fire fewer latents than k on average (L0 < k; lowest L0/k = "
                   f"{ratio:.2f}): some TopK activations are zero, a sign of dead or collapsed latents.")
    ce = _col(m, "ce_rec").dropna()
    if len(ce) and (ce.sub(1).abs() < 1e-3).all():
        out.append("CE_rec is saturated: every SAE is within 1e-3 of 1, so ΔCE_rec is at the noise floor and its "
                   "sign is not informative.")
    for proxy in ("swd", "gwd", "kl"):
        if proxy in m.columns:
            nan = int(_col(m, proxy).isna().sum())
            if nan:
                out.append(f"{nan} of {n} SAEs have no {proxy.upper()} value: the {proxy.upper()} proxy is scored "
                           "on the remaining pairs only.")
    ts = _col(m, "tokens").dropna()
    if len(ts) and ts.max() <= STUDY_LOW_BUDGET:
        out.append(f"All SAE budgets here ({fmt_tokens(ts.min())}-{fmt_tokens(ts.max())}) are at or below the "
                   f"study's lowest ({fmt_tokens(STUDY_LOW_BUDGET)}): compare the regime (direction and trend), not "
                   "the numbers.")
    if {"model_role", "model_name"} <= set(m.columns):
        names = {r: sorted(set(m.loc[m["model_role"] == r, "model_name"].dropna().astype(str)))
                 for r in ("small", "large")}
        joined = " ".join(sum(names.values(), [])).lower()
        if names["small"] and names["large"] and not ("pythia-70m" in joined and "pythia-410m" in joined):
            out.append(f"The model pair is {', '.join(names['small'])} (small) vs {', '.join(names['large'])} "
                       "(large), not the study's Pythia-70M vs Pythia-410M: a reproduction of the method, not of "
                       "the study's numbers.")
    ev = _col(m, "eval_tokens").dropna()
    if len(ev) and ev.min() < 50_000:
        out.append(f"Some SAEs were evaluated on only {int(ev.min()):,} tokens: small CE differences may be noise.")
    return out


# ---------------------------------------------------------------- narrative


def _cell(table: pd.DataFrame, k: Any, t: Any) -> pd.Series | None:
    if not {"k", "tokens"} <= set(table.columns):
        return None
    rows = table[(table["k"] == k) & (table["tokens"] == t)]
    return rows.iloc[0] if len(rows) else None


def _rate(x: Any) -> str:
    x = _num(x)
    return "pending" if np.isnan(x) else f"{x:.2f}"


def _cell_text(c: pd.Series) -> str:
    n = int(_num(c.get("n")))
    return (f"n = {n}{' (directional)' if n == 1 else ''}, mismatch rate {_rate(c.get('mismatch_rate'))}, "
            f"ΔCE_rec {fmt_ci(c.get('d_ce_rec_mean'), c.get('d_ce_rec_lo'), c.get('d_ce_rec_hi'))}, "
            f"ΔR² {fmt_ci(c.get('d_r2_mean'), c.get('d_r2_lo'), c.get('d_r2_hi'))}")


def _section_mismatch(table: pd.DataFrame) -> tuple[str, str]:
    """(paragraph, verdict) for the low-k mismatch at the smallest budget."""
    head = "**1. Low-k mismatch at the smallest budget.** "
    if table.empty or not {"k", "tokens"} <= set(table.columns):
        return head + "Pending: no (k, T) cells yet.", "pending"
    k, t = table["k"].min(), table["tokens"].min()
    c = _cell(table, k, t)
    study = "The study reports a mismatch rate of 1.00 at k=8, 10M tokens (ΔCE_rec −0.099 [−0.117, −0.082])."
    if c is None or not _num(c.get("n")) >= 1:
        return head + f"Pending: the cell {_where(k, t)} has no complete pair yet. {study}", "pending"
    rate, hi, lo = _num(c.get("mismatch_rate")), _num(c.get("d_ce_rec_hi")), _num(c.get("d_ce_rec_lo"))
    n = int(_num(c.get("n")))
    text = f"At the lowest k and budget ({_where(k, t)}): {_cell_text(c)}. "
    others = table[_col(table, "mismatch_rate") > 0]
    spread = (f" Across the grid, {len(others)} of {len(table)} cells show any mismatch"
              + (f" ({'; '.join(_where(a, b) for a, b in zip(others['k'], others['tokens']))})." if len(others) else "."))
    if rate == 0:
        verdict = "not reproduced" if n >= MIN_N else "pending"
        why = ("no seed has ΔR² > 0 together with ΔCE_rec < 0, so the mismatch is **not reproduced** here"
               if n >= MIN_N else "the single pair shows no mismatch; with n = 1 this stays **pending**")
        return head + text + why[0].upper() + why[1:] + "." + spread + " " + study, verdict
    if n < MIN_N:
        return (head + text + "The single pair shows the mismatch, but with n = 1 this is directional only: "
                "**pending**." + spread + " " + study), "pending"
    if rate >= 0.5 and hi < 0:
        return (head + text + "The mismatch is **reproduced**: R² favours the larger model while its behavioural "
                "reconstruction is clearly worse (the ΔCE_rec interval lies below 0)." + spread + " " + study), \
            "reproduced"
    if lo > 0:
        return (head + text + "Some seeds disagree, but the mean ΔCE_rec is clearly positive: the mismatch is "
                "**not reproduced** at the cell level." + spread + " " + study), "not reproduced"
    return (head + text + "The mismatch appears in some seeds but the ΔCE_rec interval includes 0: "
            "**partly reproduced, pending** more seeds." + spread + " " + study), "pending"


def _section_budget(table: pd.DataFrame, flips: pd.DataFrame) -> tuple[str, str]:
    head = "**2. Does it shrink or reverse with budget?** "
    if table.empty or not {"k", "tokens"} <= set(table.columns):
        return head + "Pending: no (k, T) cells yet.", "pending"
    budgets = sorted(table["tokens"].unique())
    if len(budgets) < 2:
        return head + f"Pending: only one budget ({fmt_tokens(budgets[0])}) so far.", "pending"
    lines, verdicts = [], []
    for k in sorted(table["k"].unique()):
        cells = table[table["k"] == k].sort_values("tokens")
        a, b = cells.iloc[0], cells.iloc[-1]
        trend = (f"k={int(k)}: mean ΔCE_rec {fmt_ci(a.get('d_ce_rec_mean'), np.nan, np.nan)} at "
                 f"{fmt_tokens(a['tokens'])} → {fmt_ci(b.get('d_ce_rec_mean'), np.nan, np.nan)} at "
                 f"{fmt_tokens(b['tokens'])}, mismatch rate {_rate(a.get('mismatch_rate'))} → "
                 f"{_rate(b.get('mismatch_rate'))}")
        flip = flips[flips["k"] == k].iloc[0] if "k" in flips and (flips["k"] == k).any() else None
        means = _col(cells, "d_ce_rec_mean").dropna()
        if len(cells) < 2:
            lines.append(f"{trend}; one budget only (pending)")
            verdicts.append("pending")
            continue
        status = flip.get("status") if flip is not None else None
        t_star = _num(flip.get("t_star")) if flip is not None else np.nan
        if status == "crossing" and np.isfinite(t_star):
            lo, hi = _num(flip.get("t_star_lo")), _num(flip.get("t_star_hi"))
            ci = ("no bootstrap interval (some budget has n < 2)" if np.isnan(lo) or np.isnan(hi)
                  else f"bootstrap 95% interval [{fmt_tokens(lo)}, {fmt_tokens(hi)}]"
                  + (" — a bound of 0 or ∞ means beyond the tested budgets" if lo == 0 or np.isinf(hi) else ""))
            direction = flip.get("direction")
            word = "reverses (negative → positive)" if direction == "up" else "turns negative (positive → negative)"
            lines.append(f"{trend}; the mean gap {word} at T* ≈ {fmt_tokens(t_star)}, {ci}")
            thin = (_col(cells, "n") < MIN_N).any()
            verdicts.append("worsens" if direction != "up" else "reverses (directional)" if thin else "reverses")
        elif len(means) and (means > 0).all():
            lines.append(f"{trend}; ΔCE_rec is positive at every budget, so there is nothing to reverse")
            verdicts.append("no mismatch")
        elif len(means) and (means < 0).all():
            shrinks = means.iloc[-1] > means.iloc[0]
            lines.append(f"{trend}; ΔCE_rec stays negative at every tested budget ("
                         f"{'shrinking' if shrinks else 'not shrinking'}): **not reversed** within "
                         f"{fmt_tokens(budgets[0])}–{fmt_tokens(budgets[-1])}")
            verdicts.append("shrinks" if shrinks else "not reversed")
        else:
            lines.append(f"{trend}; no clean sign change ({status or 'no sign-flip row'})")
            verdicts.append("pending")
    body = head + "The study reports that the gap shrinks and reverses by 100M tokens. Here:\n\n" + \
        "\n".join(f"- {line}." for line in lines)
    if "reverses" in verdicts:
        verdict = "reverses"
    elif "reverses (directional)" in verdicts:
        verdict = "pending"
    elif "shrinks" in verdicts:
        verdict = "shrinks"
    elif verdicts and all(v == "no mismatch" for v in verdicts):
        verdict = "no mismatch"
    elif "not reversed" in verdicts or "worsens" in verdicts:
        verdict = "not reproduced"
    else:
        verdict = "pending"
    return body, verdict


def _section_proxy(board: pd.DataFrame, verdict_detail: list[str]) -> tuple[str, str]:
    head = "**3. Which proxy predicts held-out ΔCE_rec best?** "
    if board.empty or not {"scheme", "proxy", "mae"} <= set(board.columns):
        return head + "Pending: no proxy leaderboard yet.", "pending"
    scored = board[_col(board, "mae").notna()]
    if scored.empty:
        notes = "; ".join(sorted(set(str(n) for n in board.get("note", pd.Series(dtype=str)).dropna() if n)))
        return head + f"Pending: no proxy could be scored ({notes or 'too few held-out cells'}).", "pending"
    scheme = "pooled" if (scored["scheme"] == "pooled").any() else scored["scheme"].iloc[0]
    rows = scored[scored["scheme"] == scheme].sort_values(["mae", "proxy"])
    best = rows.iloc[0]
    n_cells = int(_num(best.get("n_cells")))
    ranking = ", ".join(f"{r.proxy} {_num(r.mae):.4f}" for r in rows.itertuples())
    text = (f"Scheme '{scheme}' ({n_cells} held-out cells, {int(_num(best.get('n_pred')))} predictions); MAE by "
            f"proxy: {ranking}. ")
    beating = [r for r in rows.itertuples() if r.proxy != "d_r2" and bool(r.beats_r2)]
    cheap_beating = [r.proxy for r in beating if r.proxy not in BEHAVIOURAL_REFERENCES]
    if best["proxy"] == "d_r2":
        text += (f"ΔR² itself has the lowest MAE ({_num(best['mae']):.4f}, sign accuracy "
                 f"{_num(best.get('sign_acc')):.2f}): no proxy predicts the behavioural gap better than R².")
    else:
        gain = fmt_ci(best.get("mae_vs_r2"), best.get("mae_vs_r2_lo"), best.get("mae_vs_r2_hi"), digits=4)
        text += (f"Best: **{best['proxy']}** with MAE {_num(best['mae']):.4f} and sign accuracy "
                 f"{_num(best.get('sign_acc')):.2f}; its MAE gain over ΔR² is {gain} (positive = better). "
                 + ("The interval lies above 0, so it **beats ΔR²**." if bool(best.get("beats_r2", False)) else
                    "The interval includes 0 (or lies below it), so it does **not clearly beat ΔR²**."))
    if best["proxy"] in BEHAVIOURAL_REFERENCES:
        text += (f" {best['proxy']} is itself measured with the reconstruction patched in: it is a behavioural upper "
                 "reference, not a cheap proxy.")
        cheap = rows[~rows["proxy"].isin([*BEHAVIOURAL_REFERENCES, "d_r2"])]
        if len(cheap):
            c = cheap.iloc[0]
            text += (f" The best of the other proxies is **{c['proxy']}** (MAE {_num(c['mae']):.4f}, gain over ΔR² "
                     f"{fmt_ci(c.get('mae_vs_r2'), c.get('mae_vs_r2_lo'), c.get('mae_vs_r2_hi'), digits=4)}"
                     f"{', beats ΔR²' if bool(c.get('beats_r2', False)) else ', not clearly better than ΔR²'}).")
    geometry = []
    for proxy, name in (("d_swd", "the Fisher pullback ΔSWD"), ("d_gwd", "the first-order ΔGWD")):
        if proxy in set(rows["proxy"]):
            r = rows[rows["proxy"] == proxy].iloc[0]
            geometry.append(f"{name} ranks {int(list(rows['proxy']).index(proxy)) + 1} of {len(rows)} (MAE "
                            f"{_num(r['mae']):.4f}"
                            f"{', beats ΔR²' if bool(r.get('beats_r2', False)) else ', not clearly better than ΔR²'})")
    if geometry:
        text += f" Of the geometry-aware proxies, {' and '.join(geometry)}."
    if cheap_beating:
        verdict = "beats r2"
    elif beating:
        verdict = "only kl"
    elif best["proxy"] == "d_r2":
        verdict = "r2 best"
    else:
        verdict = "not better"
    if n_cells < 4:
        text += f" With only {n_cells} held-out cells this ranking is **pending** more cells."
        verdict = "pending"
    verdict_detail[0] = ", ".join(cheap_beating if cheap_beating else [r.proxy for r in beating])
    return head + text, verdict


def _section_claims(claims: pd.DataFrame) -> str:
    head = "**4. Claim table.** "
    if claims.empty or "status" not in claims.columns:
        return head + "Pending: no claims evaluated yet."
    counts = claims["status"].value_counts()
    summary = ", ".join(f"{int(counts.get(s, 0))} {s}" for s in ("supported", "pending", "rejected"))
    lines = [f"- {r.get('claim', '?')} ({r.get('gate', '-')}): **{r.get('status')}** — {r.get('statement', '')}"
             for r in claims.to_dict("records")]
    return head + f"{summary}.\n\n" + "\n".join(lines)


def narrative(table: pd.DataFrame | None, sign_flip: pd.DataFrame | None, leaderboard: pd.DataFrame | None,
              claims: pd.DataFrame | None) -> str:
    """Markdown that reads the aggregate honestly: the low-k mismatch at the smallest budget (rate, CI),
    its trend with budget (T*), the best held-out proxy (MAE, gain over R² with CI) and the claim table,
    ending with a one-line bottom line. Says "not reproduced" / "pending" where that is the finding.
    Deterministic: the same frames give the same text."""
    table, flips, board, cl = _frame(table), _frame(sign_flip), _frame(leaderboard), _frame(claims)
    if {"k", "tokens"} <= set(table.columns):
        table = table.sort_values(["k", "tokens"]).reset_index(drop=True)
    s1, v1 = _section_mismatch(table)
    s2, v2 = _section_budget(table, flips)
    detail = [""]
    s3, v3 = _section_proxy(board, detail)
    s4 = _section_claims(cl)
    if v1 == "reproduced" and v2 == "reverses":
        bottom = ("the study's headline — a low-budget mismatch that reverses with more SAE training — is "
                  "**reproduced** in this grid")
    elif v1 == "reproduced":
        bottom = ("the low-budget mismatch is **reproduced**, but its reversal with budget is "
                  + ("**not reproduced** within the tested budgets" if v2 in ("not reproduced", "shrinks")
                     else "**pending**"))
    elif v1 == "not reproduced":
        c = _cell(table, table["k"].min(), table["tokens"].min())
        same = np.sign(_num(c.get("d_r2_mean"))) == np.sign(_num(c.get("d_ce_rec_mean")))
        bottom = ("the study's low-budget mismatch is **not reproduced** in this grid; at its smallest budget "
                  + ("ΔR² and ΔCE_rec point the same way" if same else
                     "ΔR² and ΔCE_rec disagree the other way round (ΔR² ≤ 0 while ΔCE_rec ≥ 0)"))
    else:
        bottom = "the study's headline is **pending**: the cells it needs are missing or have n < 2"
    d2 = {"beats r2": f"{detail[0]} beats ΔR² at held-out prediction",
          "only kl": f"only a behavioural reference ({detail[0]}) beats ΔR² at held-out prediction; no cheap proxy "
                     "does",
          "not better": "no proxy clearly beats ΔR² at held-out prediction",
          "r2 best": "ΔR² is the best held-out predictor here",
          "pending": "the D2 comparison is pending"}[v3]
    return "\n\n".join(["## What the numbers say", s1, s2, s3, s4,
                        f"**Bottom line:** {bottom}; {d2}."]) + "\n"


# ---------------------------------------------------------------- styled tables


def style_claims(claims: pd.DataFrame | None):
    """The claim table as a Styler: rows tinted by status (green supported, amber pending, red rejected),
    the status cell bold in a darker shade, long text wrapped, no index."""
    from proxygap_helpers.claims import CLAIM_COLUMNS

    df = _frame(claims)
    if df.empty and not len(df.columns):
        df = pd.DataFrame(columns=CLAIM_COLUMNS)
    df = df.reset_index(drop=True)

    def row_style(row: pd.Series) -> list[str]:
        bg, fg = STATUS_COLORS.get(str(row.get("status", "")).lower(), ("#ffffff", "#000000"))
        return [f"background-color: {bg}; color: {fg}; font-weight: bold" if col == "status"
                else f"background-color: {bg}" for col in row.index]

    styler = df.style.set_uuid(_table_id("claims", df)).apply(row_style, axis=1).hide(axis="index")
    wide = [c for c in ("statement", "evidence", "rule") if c in df.columns]
    styler = styler.set_properties(subset=wide, **{"white-space": "normal", "text-align": "left",
                                                   "min-width": "16em"})
    styler = styler.set_table_styles(_status_table_styles("left", "vertical-align: top; padding: 4px 8px"))
    return styler.set_caption("Claims: green = supported, amber = pending, red = rejected. "
                              "Too little data (n < 2, missing cells) is pending, never supported.")


def _table_id(kind: str, df: pd.DataFrame) -> str:
    """A Styler id unique to the table's content (``kind`` + a hash of it), so that one page holding several
    such tables (a ladder's report: one section per setting) styles each by its own CSS rules; deterministic,
    so that re-executed notebooks compare equal."""
    return f"{kind}_{hashlib.sha256(df.to_csv().encode()).hexdigest()[:10]}"


def _status_table_styles(header_align: str, cell_props: str) -> list[dict]:
    """The table styles of the claim tables: grey headers aligned ``header_align``, cells ``cell_props`` with a
    rule below, collapsed borders, small type."""
    return [{"selector": "th", "props": f"text-align: {header_align}; background-color: #f2f2f2; padding: 4px 8px"},
            {"selector": "td", "props": f"{cell_props}; border-bottom: 1px solid #ddd"},
            {"selector": "", "props": "border-collapse: collapse; font-size: 0.9em"}]


def style_status_matrix(matrix: pd.DataFrame):
    """A claim x setting table of statuses (``ladder.claims_matrix``) as a Styler: each status cell tinted like
    the claim table (green supported, amber pending, red rejected)."""
    def cell(value: Any) -> str:
        bg, fg = STATUS_COLORS.get(str(value).lower(), ("#ffffff", "#000000"))
        return f"background-color: {bg}; color: {fg}"

    styler = matrix.style.set_uuid(_table_id("claims_matrix", matrix)).map(cell)
    styler = styler.set_table_styles(_status_table_styles("center", "text-align: center; padding: 3px 8px"))
    return styler.set_caption("Each claim in each setting (pair of models @ hook); the last column counts the "
                              "settings where it is supported.")


TABLE_DISPLAY = (("d_ce_rec", "ΔCE_rec mean [95% CI]", fmt_ci), ("d_r2", "ΔR² mean [95% CI]", fmt_ci),
                 ("d_cosine", "Δcosine", _fmt_sig), ("d_rel_err_norm", "Δrel. err. norm", _fmt_sig),
                 ("d_nmse", "ΔNMSE", _fmt_sig), ("d_kl", "ΔKL", _fmt_sig), ("d_swd", "ΔSWD", _fmt_sig),
                 ("d_gwd", "ΔGWD", _fmt_sig), ("d_random_error_ratio", "Δrandom-error ratio", _fmt_sig),
                 ("d_dim", "Δdim (PR share)", _fmt_sig))


def table_frame(table: pd.DataFrame | None, fill_grid: bool = True) -> pd.DataFrame:
    """The phase-2 table as display strings: k, tokens ('10M'), n ('1 †' for n = 1), ΔCE_rec and ΔR² with
    intervals, the mismatch rate and secondary deltas present in the table. With ``fill_grid`` every
    (k, T) combination of the grid without a row is added with 'pending' values."""
    table = _frame(table)
    if fill_grid and {"k", "tokens"} <= set(table.columns):
        ks, ts = _grid(table)
        have = {(int(k), int(t)) for k, t in zip(table["k"], table["tokens"])}
        gaps = [{"k": k, "tokens": t, "n": 0} for k in ks for t in ts if (k, t) not in have]
        if gaps:
            table = pd.concat([table, pd.DataFrame(gaps)], ignore_index=True)
        table = table.sort_values(["k", "tokens"]).reset_index(drop=True)
    out = pd.DataFrame(index=table.index)
    out["k"] = [str(int(k)) for k in table["k"]] if "k" in table else []
    out["tokens"] = [fmt_tokens(t) for t in table["tokens"]] if "tokens" in table else []
    n = _col(table, "n")
    out["n"] = ["0" if np.isnan(v) or v == 0 else f"{int(v)} †" if v == 1 else str(int(v)) for v in n]
    for base, label, fmt in TABLE_DISPLAY:
        if f"{base}_mean" not in table.columns:
            continue
        if base not in ("d_ce_rec", "d_r2") and _col(table, f"{base}_mean").isna().all():
            continue
        out[label] = [fmt(a, b, c) for a, b, c in zip(_col(table, f"{base}_mean"), _col(table, f"{base}_lo"),
                                                        _col(table, f"{base}_hi"))]
        if base == "d_r2":
            out["mismatch rate"] = ["pending" if np.isnan(r) else f"{r:.2f}" for r in _col(table, "mismatch_rate")]
    if "mismatch rate" not in out and "mismatch_rate" in table:
        out["mismatch rate"] = ["pending" if np.isnan(r) else f"{r:.2f}" for r in _col(table, "mismatch_rate")]
    return out


def style_table(table: pd.DataFrame | None, fill_grid: bool = True):
    """The phase-2 table as a Styler (see ``table_frame``): n = 1 rows shaded grey and italic (directional),
    pending rows in grey, mismatch rates > 0 in red, no index."""
    shown = table_frame(table, fill_grid)

    def row_style(row: pd.Series) -> list[str]:
        n = str(row.get("n", ""))
        if n.endswith("†"):
            return ["background-color: #eeeeee; font-style: italic"] * len(row)
        if n == "0":
            return ["color: #888888; font-style: italic"] * len(row)
        return [""] * len(row)

    def rate_style(value: str) -> str:
        rate = _num(value)
        return "color: #a71d2a; font-weight: bold" if rate > 0 else ""

    styler = shown.style.set_uuid(_table_id("phase2", shown)).apply(row_style, axis=1).hide(axis="index")
    if "mismatch rate" in shown.columns:
        styler = styler.map(rate_style, subset=["mismatch rate"])
    styler = styler.set_table_styles([
        {"selector": "th", "props": "text-align: center; background-color: #f2f2f2; padding: 4px 8px"},
        {"selector": "td", "props": "text-align: right; padding: 3px 8px; font-variant-numeric: tabular-nums"},
        {"selector": "", "props": "border-collapse: collapse"},
    ])
    return styler.set_caption("Deltas are large − small, mean over seeds with a 95% Student-t interval. "
                              "† n = 1: directional only (the single pair is shown without an interval). "
                              "'pending': no complete pair yet.")


# ---------------------------------------------------------------- HTML export

# The lab template minus every <script src=...> it would fetch from a CDN (require.js, MathJax, mermaid,
# widget manager): the report has no widgets, no mermaid and writes its maths in Unicode, so nothing is
# lost and the page displays fully offline. CSS is inlined by nbconvert; images are base64 data URIs.
_OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
"""
_URL = r"(?P<url>(?:https?:)?//[^\"'\s>)]+)"
_EXTERNAL = [
    re.compile(r"<script\b[^>]*\bsrc\s*=\s*[\"']?\s*" + _URL, re.I),
    re.compile(r"<link\b[^>]*\bhref\s*=\s*[\"']?\s*" + _URL, re.I),
    re.compile(r"<(?:img|iframe|embed|source|video|audio|object)\b[^>]*\b(?:src|data)\s*=\s*[\"']?\s*" + _URL, re.I),
    re.compile(r"@import\s+[\"']\s*" + _URL, re.I),
    re.compile(r"url\(\s*[\"']?\s*" + _URL, re.I),
    re.compile(r"\bimport\s+[^;]*?from\s+[\"']" + _URL, re.I),
    re.compile(r"\bimport\(\s*[\"']" + _URL, re.I),
]


def external_resources(html: str) -> list[str]:
    """URLs the page would fetch over the network to display: script/stylesheet/image/frame sources, CSS
    ``url()`` and ``@import``, ES-module imports; each once, in order. Plain ``<a href>`` links are not
    resources and are not listed."""
    found = sorted(((m.start("url"), m.group("url")) for p in _EXTERNAL for m in p.finditer(html)))
    return list(dict.fromkeys(url for _, url in found))


def _errors(nb: Any) -> list[str]:
    found = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                found.append(f"cell {i}: {out.get('ename')}: {out.get('evalue')}")
    return found


def render_html(executed_ipynb: Path | str, out_html: Path | str, allow_errors: bool = False,
                title: str | None = None) -> Path:
    """Export an executed notebook to one self-contained HTML file and return its path.

    Code inputs and prompts are hidden; cells tagged ``remove`` are dropped (``remove-input`` /
    ``remove-output`` drop only that part); plots are base64 ``<img>``; markdown images are embedded; no
    script or stylesheet is fetched from a CDN (ValueError if the page would still need one). Raises
    ValueError if a cell has an error output, unless ``allow_errors``. Written to a temporary file in the
    target directory, then renamed, so a reader never sees a half-written page.
    """
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import TagRemovePreprocessor

    src, dst = Path(executed_ipynb), Path(out_html)
    nb = nbformat.read(src, as_version=4)
    if not allow_errors and (errs := _errors(nb)):
        raise ValueError(f"{src} has error output(s), refusing to publish them: {'; '.join(errs)}")
    if title:
        nb.metadata["title"] = title
    exporter = HTMLExporter(template_name="lab", exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True, embed_images=True,
                            extra_loaders=[jinja2.DictLoader({"proxygap_offline.html.j2": _OFFLINE_TEMPLATE})],
                            template_file="proxygap_offline.html.j2")
    tags = TagRemovePreprocessor(remove_cell_tags={"remove"}, remove_input_tags={"remove-input", "remove_input"},
                                 remove_all_outputs_tags={"remove-output", "remove_output"}, enabled=True)
    exporter.register_preprocessor(tags, enabled=True)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title or src.stem}})
    external = external_resources(body)
    if external:
        raise ValueError(f"the HTML export still needs network resources: {external[:5]}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(body)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst


# ---------------------------------------------------------------- headless Chromium


class ChromiumNotFound(RuntimeError):
    """No headless Chromium on this machine."""


CHROMIUM_PATHS = ("/usr/bin/chromium",)
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str:
    """Path of the Chromium binary: ``$PROXYGAP_CHROMIUM``, else ``CHROMIUM_PATHS``, else ``CHROMIUM_NAMES``
    on PATH. Raises ChromiumNotFound with the install command when there is none."""
    candidates = [os.environ.get("PROXYGAP_CHROMIUM"), *CHROMIUM_PATHS, *(shutil.which(n) for n in CHROMIUM_NAMES)]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    raise ChromiumNotFound(CHROMIUM_HINT)


CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
                  # no host name resolves: the page is rendered exactly as it looks offline
                  "--host-resolver-rules=MAP * ~NOTFOUND")


def _run_chromium(args: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
    exe = chromium_path()
    with tempfile.TemporaryDirectory(prefix="proxygap-chromium-") as profile:
        env = os.environ | {"HOME": profile}
        cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"chromium did not finish within {timeout:.0f} s: {' '.join(cmd)}") from err


def screenshot(html: Path | str, png: Path | str, width: int = 1400, height: int = 12000, trim: bool = True,
               timeout: float = 120.0) -> Path:
    """PNG of the page as headless Chromium renders it at ``width`` x ``height`` CSS pixels, offline (no host
    name resolves, so anything the page would fetch from the network is missing from the picture).

    The window is tall (default 12000 px) so that the whole report fits; with ``trim`` the blank
    background below the content is cut off (keeping a 40 px margin). Raises ChromiumNotFound (with the
    ``apt-get install chromium`` hint) when Chromium is missing, RuntimeError when it produced no image.
    """
    chromium_path()  # fail first, and clearly, when Chromium is missing
    html, png = Path(html).resolve(), Path(png).resolve()
    if not html.is_file():
        raise FileNotFoundError(html)
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    res = _run_chromium([f"--screenshot={png}", f"--window-size={int(width)},{int(height)}",
                         "--virtual-time-budget=5000", html.as_uri()], timeout)
    if not png.is_file() or png.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot (exit {res.returncode}): {res.stderr[-2000:]}")
    if trim:
        _trim_bottom(png)
    return png


def _trim_bottom(png: Path, margin: int = 40) -> None:
    """Cut the uniform background (the colour of the bottom-right pixel) below the last drawn row."""
    from PIL import Image

    with Image.open(png) as img:
        rgb = np.asarray(img.convert("RGB"))
    drawn = np.flatnonzero((rgb != rgb[-1, -1]).any(axis=(1, 2)))
    last = int(drawn[-1]) + 1 + margin if drawn.size else min(rgb.shape[0], 200)
    if last < rgb.shape[0]:
        Image.fromarray(rgb[:last]).save(png)


def dump_dom(html: Path | str, timeout: float = 120.0) -> str:
    """The DOM of the page after headless Chromium loaded it (``--dump-dom``), as a string."""
    html = Path(html).resolve()
    res = _run_chromium(["--dump-dom", "--virtual-time-budget=5000", html.as_uri()], timeout)
    if res.returncode != 0 or not res.stdout:
        raise RuntimeError(f"chromium --dump-dom failed (exit {res.returncode}): {res.stderr[-2000:]}")
    return res.stdout
