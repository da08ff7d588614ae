"""Stage 3: every finished metrics.json -> the aggregate tables of a grid (``<out>/aggregate/``).

Writes ``sae_metrics.csv``, ``dropped_duplicates.csv``, ``unpaired.csv``, ``pairs.csv``, ``phase2_table.csv``
and ``.md``, ``sign_flip.csv``, ``heldout_predictions.csv``, ``proxy_leaderboard.csv``, ``claims.csv``, the
budget-curve tables of ``budget_curves`` (``budget_fits.csv``, ``tstar.csv``, ``budget_curves.csv``,
``next_budget.csv``), ``decomposition.csv`` (what each cell's gap is made of: ``decomposition.py``) and
``summary.json`` (what went in, and for an embedded grid the pinned text its models were
trained on, ``corpus``, which the report quotes); per setting (pair of models x hook) when the grid has
several, plus ``settings.csv``, ``ladder.csv`` and ``size_trend.csv`` (``ladder.py``), and with several families
``family_gaps.csv`` and ``family_signs.csv`` (``families.py``). Missing cells are simply absent: the claims say
"pending".
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import budget_curves, claims, data, decomposition, families, ladder, leaderboard, stats
from .files import read_json, write_json_atomic, write_text_atomic
from .layout import aggregate_dir, metrics_files, sequence_ce_path
from .params import Params

TABLES = ("sae_metrics", "pairs", "phase2_table", "sign_flip", "heldout_predictions", "proxy_leaderboard", "claims")
CURVE_TABLES = ("budget_fits", "tstar", "budget_curves", "next_budget")  # budget_curves.analyse
LADDER_TABLES = ("settings", "ladder", "size_trend")  # grids with several settings (ladder.py)
FAMILY_TABLES = ("family_gaps", "family_signs")  # grids with several families (families.py)
ANALYSIS_TABLES = ("decomposition",)  # what each cell's gap is made of (decomposition.py)


class AggregateError(RuntimeError):
    """Nothing to aggregate: no SAE of the grid has metrics of its evaluation (a stage never reports done on zero
    inputs)."""


def _csv(df: pd.DataFrame, path: Path) -> None:
    """Atomic CSV at full float precision (shortest round-trip repr): machine-readable tables are never
    rounded; only the ``.md`` table and the HTML report round for reading."""
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(path)


def run_aggregate(p: Params, out_dir: Path) -> dict[str, pd.DataFrame]:
    """Every table of the grid from its finished metrics.json, written to ``<out>/aggregate/``.

    The two-model analysis runs once per setting (``Params.settings``: pair of models x hook) on that setting's
    SAEs (``ladder.side_rows``); with one setting its tables are written as they are, with several they are
    stacked with ``ladder.SETTING_COLUMNS`` in front, the claims get one summary row per claim after the
    per-setting rows, and ``settings.csv``, ``ladder.csv`` and ``size_trend.csv`` say what the settings say
    together (``ladder.py``)."""
    out_dir = Path(out_dir)
    agg = aggregate_dir(out_dir)
    agg.mkdir(parents=True, exist_ok=True)
    wanted = {s.sae_id for s in p.sae_specs()}
    mine, records = stats.grid_records(map(read_json, metrics_files(out_dir)), wanted, p.eval_hash)
    if not records and wanted:
        raise AggregateError(f"no SAE of grid {p.name!r} has metrics of this evaluation in {out_dir} (expected "
                             f"{len(wanted)}; {len(mine)} found with other `evaluation.*` settings): run the grid "
                             "first (python -m proxygap_helpers run PARAMS), or give the notebook the right out_dir")
    flat = stats.flatten_metrics(records)
    kept, dropped = stats.dedupe(flat) if len(flat) else (flat, flat)
    settings = p.settings()
    per = [_setting_tables(p, out_dir, ladder.side_rows(kept, p, s)) for s in settings]
    if len(settings) == 1:
        out = per[0]
    else:
        out = {name: ladder.stack((s, t[name]) for s, t in zip(settings, per)) for name in per[0]}
        out["claims"] = pd.concat([out["claims"], ladder.claims_summary(out["claims"])], ignore_index=True)
        info = ladder.settings_table(p)
        table = ladder.ladder_table(out["phase2_table"], info)
        out |= {"settings": info, "ladder": table, "size_trend": ladder.size_trend(table)}
        if families.several(info):
            gaps = families.family_gaps(out["phase2_table"], info)
            out |= {"family_gaps": gaps, "family_signs": families.sign_agreement(gaps)}
    out = {"sae_metrics": kept, "dropped_duplicates": dropped, **out}
    for name, df in out.items():
        _csv(df, agg / f"{name}.csv")
    tables = [(s, t["phase2_table"]) for s, t in zip(settings, per)]
    write_text_atomic(agg / "phase2_table.md", "\n".join(
        (f"### {s.label}\n\n" if len(settings) > 1 else "")
        + (stats.phase2_markdown(t, level=p.stats.ci) if len(t) else "_no complete pairs yet_\n") for s, t in tables))
    write_json_atomic(agg / "summary.json", {
        "grid": p.name, "params_hash": p.params_hash(), "n_metrics_files": len(records), "n_saes": len(kept),
        "n_dropped_duplicates": len(dropped), "n_pairs": len(out["pairs"]), "n_cells": len(out["phase2_table"]),
        "expected_saes": len(wanted), "n_stale_evaluation": len(mine) - len(records), "eval_hash": p.eval_hash, "budget_mode": p.sae.budget_mode, "ce_rec": p.evaluation.ce_rec,
        **({"corpus": f"{data.CORPUS_PACKAGE}=={data.CORPUS_VERSION}"} if p.embedded else {}),
        **({"settings": [s.label for s in settings]} if len(settings) > 1 else {})})
    return out


def _setting_tables(p: Params, out_dir: Path, kept: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The two-model analysis of one setting: ``kept`` holds its SAEs, ``model_role`` 'small' / 'large'."""
    pairs = stats.pair(kept) if len(kept) else pd.DataFrame()
    n_boot = max(p.stats.bootstrap, 200)
    table = stats.phase2_table(pairs, level=p.stats.ci, bootstrap=p.stats.bootstrap, seed=p.stats.seed) \
        if len(pairs) else pd.DataFrame(columns=stats.TABLE_COLUMNS)
    noise = None
    if len(pairs):  # the eval set's share of the uncertainty, beside the seeds' (issue: eval noise < seed noise)
        noise = stats.eval_noise(pairs, sequence_table(out_dir, kept["sae_id"], p.eval_hash), p.evaluation.ce_rec,
                                 n_boot=n_boot, seed=p.stats.seed)
        table = table.merge(noise.drop(columns="n"), on=stats.CELL_KEY, how="left")
    flips = stats.sign_flip(pairs, n_boot=n_boot, seed=p.stats.seed) if len(pairs) \
        else pd.DataFrame()
    preds = leaderboard.heldout_predictions(pairs) if len(pairs) else pd.DataFrame()
    board = leaderboard.proxy_leaderboard(pairs, n_boot=n_boot, seed=p.stats.seed) \
        if len(pairs) else pd.DataFrame()
    claim_table = claims.evaluate_claims(table, pairs, board if len(board) else None, p.claims,
                                         grid=(p.sae.k, p.sae.tokens))
    out = {"unpaired": stats.unpaired(kept) if len(kept) else pd.DataFrame(), "pairs": pairs, "phase2_table": table,
           "sign_flip": flips, "heldout_predictions": preds, "proxy_leaderboard": board, "claims": claim_table}
    curves = budget_curves.curves_for(pairs, n_boot, p.stats.seed, p.stats.ci) if len(pairs) else []
    return out | budget_curves.analyse(pairs, n_boot=n_boot, seed=p.stats.seed, level=p.stats.ci, curves=curves) \
        | {"decomposition": decomposition.decompose(curves, noise, p.stats.ci)}


def sequence_table(out_dir: Path, sae_ids, eval_hash: str | None = None) -> pd.DataFrame:
    """The per eval sequence CE sums of these SAEs (``runs/<sae id>/sequence_ce.json``), long: one row per
    (``sae_id``, ``sequence``) with ``ce_sae``, ``ce_clean``, ``ce_zero``, ``predictions``; SAEs evaluated
    before those files existed, or (``eval_hash`` given) under another evaluation, are left out (their cells get
    NaN eval noise)."""
    frames = []
    for sid in sae_ids:
        path = sequence_ce_path(out_dir, sid)
        if path.is_file():
            rec = read_json(path)
            if eval_hash is not None and rec.get("eval_hash") != eval_hash:
                continue
            cols = {c: rec[c] for c in ("ce_sae", "ce_clean", "ce_zero", "predictions")}
            frames.append(pd.DataFrame({"sae_id": sid, "sequence": range(len(cols["ce_sae"])), **cols}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_aggregate(out_dir: Path, p: Params | None = None, setting: str | None = None) -> dict[str, pd.DataFrame]:
    """Read back what :func:`run_aggregate` wrote (empty frames for empty or missing tables); with ``p``, as the
    two-model report reads one setting (``ladder.setting_view``; ``setting`` None: the grid's only one)."""
    agg = aggregate_dir(out_dir)
    res = {}
    for name in (*TABLES, *CURVE_TABLES, *ANALYSIS_TABLES, "dropped_duplicates", "unpaired", *LADDER_TABLES,
                 *FAMILY_TABLES):
        path = agg / f"{name}.csv"
        try:
            res[name] = pd.read_csv(path)
        except (FileNotFoundError, pd.errors.EmptyDataError):
            res[name] = pd.DataFrame()
    return res if p is None else ladder.setting_view(res, p, setting)
