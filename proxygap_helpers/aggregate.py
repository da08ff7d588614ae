"""Stage 3: every finished metrics.json -> the aggregate tables of a grid (``<out>/aggregate/``).

Writes ``sae_metrics.csv``, ``dropped_duplicates.csv``, ``unpaired.csv``, ``pairs.csv``, ``phase2_table.csv``
and ``.md``, ``sign_flip.csv``, ``heldout_predictions.csv``, ``proxy_leaderboard.csv``, ``claims.csv``, the
budget-curve tables of ``budget_curves`` (``budget_fits.csv``, ``tstar.csv``, ``budget_curves.csv``,
``next_budget.csv``) and ``summary.json`` (what went in). Missing cells are simply
absent: the claims say "pending".
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import budget_curves, claims, leaderboard, stats
from .files import read_json, write_json_atomic, write_text_atomic
from .layout import aggregate_dir, metrics_files, sequence_ce_path
from .params import Params

TABLES = ("sae_metrics", "pairs", "phase2_table", "sign_flip", "heldout_predictions", "proxy_leaderboard", "claims")
CURVE_TABLES = ("budget_fits", "tstar", "budget_curves", "next_budget")  # budget_curves.analyse


def _csv(df: pd.DataFrame, path: Path) -> None:
    """Atomic CSV at full float precision (shortest round-trip repr): machine-readable tables are never
    rounded; only the ``.md`` table and the HTML report round for reading."""
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(path)


def run_aggregate(p: Params, out_dir: Path) -> dict[str, pd.DataFrame]:
    out_dir = Path(out_dir)
    agg = aggregate_dir(out_dir)
    agg.mkdir(parents=True, exist_ok=True)
    records = [read_json(f) for f in metrics_files(out_dir)]
    wanted = {s.sae_id for s in p.sae_specs()}
    records = [r for r in records if r["sae_id"] in wanted]  # SAEs of this grid's current params only
    flat = stats.flatten_metrics(records)
    kept, dropped = stats.dedupe(flat) if len(flat) else (flat, flat)
    pairs = stats.pair(kept) if len(kept) else pd.DataFrame()
    table = stats.phase2_table(pairs, level=p.stats.ci, bootstrap=p.stats.bootstrap, seed=p.stats.seed) \
        if len(pairs) else pd.DataFrame(columns=stats.TABLE_COLUMNS)
    if len(pairs):  # the eval set's share of the uncertainty, beside the seeds' (issue: eval noise < seed noise)
        noise = stats.eval_noise(pairs, sequence_table(out_dir, kept["sae_id"]), p.evaluation.ce_rec,
                                 n_boot=max(p.stats.bootstrap, 200), seed=p.stats.seed)
        table = table.merge(noise.drop(columns="n"), on=stats.CELL_KEY, how="left")
    flips = stats.sign_flip(pairs, n_boot=max(p.stats.bootstrap, 200), seed=p.stats.seed) if len(pairs) \
        else pd.DataFrame()
    preds = leaderboard.heldout_predictions(pairs) if len(pairs) else pd.DataFrame()
    board = leaderboard.proxy_leaderboard(pairs, n_boot=max(p.stats.bootstrap, 200), seed=p.stats.seed) \
        if len(pairs) else pd.DataFrame()
    claim_table = claims.evaluate_claims(table, pairs, board if len(board) else None, p.claims,
                                         grid=(p.sae.k, p.sae.tokens))
    out = {"sae_metrics": kept, "dropped_duplicates": dropped, "unpaired": stats.unpaired(kept) if len(kept)
           else pd.DataFrame(), "pairs": pairs, "phase2_table": table, "sign_flip": flips,
           "heldout_predictions": preds, "proxy_leaderboard": board, "claims": claim_table}
    out |= budget_curves.analyse(pairs, n_boot=max(p.stats.bootstrap, 200), seed=p.stats.seed, level=p.stats.ci)
    for name, df in out.items():
        _csv(df, agg / f"{name}.csv")
    write_text_atomic(agg / "phase2_table.md", stats.phase2_markdown(table, level=p.stats.ci) if len(table) else
                      "_no complete pairs yet_\n")
    write_json_atomic(agg / "summary.json", {
        "grid": p.name, "params_hash": p.params_hash(), "n_metrics_files": len(records), "n_saes": len(kept),
        "n_dropped_duplicates": len(dropped), "n_pairs": len(pairs), "n_cells": len(table),
        "expected_saes": len(wanted), "budget_mode": p.sae.budget_mode, "ce_rec": p.evaluation.ce_rec})
    return out


def sequence_table(out_dir: Path, sae_ids) -> pd.DataFrame:
    """The per eval sequence CE sums of these SAEs (``runs/<sae id>/sequence_ce.json``), long: one row per
    (``sae_id``, ``sequence``) with ``ce_sae``, ``ce_clean``, ``ce_zero``, ``predictions``; SAEs evaluated
    before those files existed are left out (their cells get NaN eval noise)."""
    frames = []
    for sid in sae_ids:
        path = sequence_ce_path(out_dir, sid)
        if path.is_file():
            rec = read_json(path)
            cols = {c: rec[c] for c in ("ce_sae", "ce_clean", "ce_zero", "predictions")}
            frames.append(pd.DataFrame({"sae_id": sid, "sequence": range(len(cols["ce_sae"])), **cols}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_aggregate(out_dir: Path) -> dict[str, pd.DataFrame]:
    """Read back what :func:`run_aggregate` wrote (empty frames for empty or missing tables)."""
    agg = aggregate_dir(out_dir)
    res = {}
    for name in (*TABLES, *CURVE_TABLES, "dropped_duplicates", "unpaired"):
        path = agg / f"{name}.csv"
        try:
            res[name] = pd.read_csv(path)
        except (FileNotFoundError, pd.errors.EmptyDataError):
            res[name] = pd.DataFrame()
    return res
