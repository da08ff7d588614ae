"""Across model families: a grid whose pairs are the same sizes built in several families (``pairs: within_family``,
``params/families.yaml``) read family by family. Works on the aggregate's tables only.

- ``family_gaps``: the phase-2 cells (mean paired ΔCE_rec and ΔR² with their 95% intervals, the mismatch rate) of
  every setting, with its family: ``aggregate/family_gaps.csv``.
- ``sign_agreement``: per family, in how many cells the signs of the mean ΔCE_rec and of the mean ΔR² are those of
  the reference family's same cell (GPT-NeoX: the default study's own pair), and in how many the interval of ΔCE_rec
  excludes 0 (a sign that can be told): ``aggregate/family_signs.csv``.
- ``answer``: the report's plain answer, from that table.
- ``claims_by_family``: claim x family, each family's status.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

REFERENCE = "gpt_neox"  # the default study's family: the sign pattern the others are held against
GAP_COLUMNS = ["family", "setting", "k", "tokens", "n", "d_ce_rec_mean", "d_ce_rec_lo", "d_ce_rec_hi", "d_r2_mean",
               "d_r2_lo", "d_r2_hi", "mismatch_rate"]
SIGN_COLUMNS = ["family", "reference", "n_cells", "d_ce_rec_same_sign", "d_r2_same_sign", "both_same_sign",
                "d_ce_rec_negative", "d_ce_rec_positive", "d_ce_rec_excludes_0", "d_r2_negative", "mismatch_cells"]


def several(settings: pd.DataFrame) -> bool:
    """Whether the grid's settings span more than one family (else there is nothing to read across families)."""
    return "family" in settings.columns and settings["family"].nunique() > 1


def family_gaps(phase2: pd.DataFrame, settings: pd.DataFrame) -> pd.DataFrame:
    """The stacked phase-2 table (``setting`` column) with each setting's family in front, sorted by family (the
    reference first), k and budget."""
    if not len(phase2) or "setting" not in phase2.columns:
        return pd.DataFrame(columns=GAP_COLUMNS)
    out = phase2.merge(settings[["setting", "family"]], on="setting", how="left")
    order = {f: i for i, f in enumerate(sorted(out["family"].unique(), key=lambda f: (f != REFERENCE, f)))}
    out = out.sort_values(["family", "k", "tokens"], key=lambda c: c.map(order) if c.name == "family" else c,
                          kind="stable").reset_index(drop=True)
    return out[[c for c in GAP_COLUMNS if c in out.columns]]


def _sign(x: pd.Series) -> np.ndarray:
    return np.sign(x.to_numpy(float))


def sign_agreement(gaps: pd.DataFrame, reference: str = REFERENCE) -> pd.DataFrame:
    """Per family, over the (k, budget) cells it shares with ``reference``: how many have the reference's sign of
    the mean ΔCE_rec, of the mean ΔR², and both; how many have ΔCE_rec < 0 or > 0, an interval of ΔCE_rec that
    excludes 0, ΔR² < 0, and a mismatch rate above 0. The reference's own row counts against itself."""
    if not len(gaps) or reference not in set(gaps["family"]):
        return pd.DataFrame(columns=SIGN_COLUMNS)
    ref = gaps[gaps["family"] == reference].set_index(["k", "tokens"])
    rows = []
    for family, g in gaps.groupby("family", sort=False):
        g = g.set_index(["k", "tokens"])
        cells = g.index.intersection(ref.index)
        g, r = g.loc[cells], ref.loc[cells]
        same_ce = _sign(g["d_ce_rec_mean"]) == _sign(r["d_ce_rec_mean"])
        same_r2 = _sign(g["d_r2_mean"]) == _sign(r["d_r2_mean"])
        excludes = (g["d_ce_rec_lo"] > 0) | (g["d_ce_rec_hi"] < 0)
        rows.append({"family": family, "reference": reference, "n_cells": len(cells),
                     "d_ce_rec_same_sign": int(same_ce.sum()), "d_r2_same_sign": int(same_r2.sum()),
                     "both_same_sign": int((same_ce & same_r2).sum()),
                     "d_ce_rec_negative": int((g["d_ce_rec_mean"] < 0).sum()),
                     "d_ce_rec_positive": int((g["d_ce_rec_mean"] > 0).sum()),
                     "d_ce_rec_excludes_0": int(excludes.sum()), "d_r2_negative": int((g["d_r2_mean"] < 0).sum()),
                     "mismatch_cells": int((g["mismatch_rate"] > 0).sum())})
    return pd.DataFrame(rows, columns=SIGN_COLUMNS)


def answer(signs: pd.DataFrame, labels: dict[str, str] | None = None) -> str:
    """One paragraph: does the reference family's sign pattern (ΔCE_rec and ΔR² per cell) hold in the others?
    ``labels`` names families for readers (model_type -> 'Llama (SmolLM2)', ...)."""
    if not len(signs):
        return "Not yet: no family has complete cells beside the reference family's."
    name = (labels or {}).get
    ref_row = signs[signs["family"] == signs["reference"]].iloc[0]
    ref = name(ref_row["family"], ref_row["family"])
    pattern = (f"in {ref}, the default study's family, ΔCE_rec is negative in {ref_row['d_ce_rec_negative']} of "
               f"{ref_row['n_cells']} cells (its interval excludes 0 in {ref_row['d_ce_rec_excludes_0']}) and ΔR² in "
               f"{ref_row['d_r2_negative']}, with a mismatch (ΔR² > 0 while ΔCE_rec < 0) in "
               f"{ref_row['mismatch_cells']} cells")
    others = signs[signs["family"] != signs["reference"]]
    parts, holds = [], []
    for row in others.itertuples():
        agree = row.both_same_sign == row.n_cells
        holds.append(agree)
        parts.append(f"{name(row.family, row.family)}: both signs as in {ref} in {row.both_same_sign} of {row.n_cells} "
                     f"cells (ΔCE_rec {row.d_ce_rec_same_sign}, ΔR² {row.d_r2_same_sign}; ΔCE_rec's interval excludes "
                     f"0 in {row.d_ce_rec_excludes_0}; mismatch in {row.mismatch_cells} cells)")
    verdict = ("Yes" if all(holds) else "No" if not any(holds) else "In part")
    held = [name(r.family, r.family) for r, h in zip(others.itertuples(), holds) if h]
    lead = {"Yes": "the sign pattern holds in every family",
            "No": "the sign pattern holds in none of the other families",
            "In part": f"the sign pattern holds in {', '.join(held)} only"}[verdict]
    return f"**{verdict}: {lead}.** Per cell, {pattern}. " + "; ".join(parts) + "."


def claims_by_family(claims: pd.DataFrame, settings: pd.DataFrame, labels: dict[str, str] | None = None
                     ) -> pd.DataFrame:
    """Claim x family: each family's status (its one setting's; with several settings per family, their statuses
    joined), families in the settings' order."""
    per = claims.merge(settings[["setting", "family"]], on="setting", how="inner")
    if not len(per):
        return pd.DataFrame({"status": ["pending: no claims yet"]})
    out = per.groupby(["claim", "family"], sort=False)["status"].agg(lambda s: " / ".join(dict.fromkeys(s)))
    out = out.unstack("family")[list(dict.fromkeys(settings["family"]))]
    out.columns = [(labels or {}).get(c, c) for c in out.columns]
    out.columns.name = None
    return out
