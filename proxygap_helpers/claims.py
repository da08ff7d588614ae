"""The frozen claim table: each claim of the study is an explicit rule evaluated on the aggregate.

Inputs are the ``(k, tokens)`` table of ``stats.phase2_table``, the pairs of ``stats.pair`` and the proxy
leaderboard of ``leaderboard.proxy_leaderboard``. Every rule returns ``supported``, ``pending`` or
``rejected`` with its evidence. Principles shared by all rules: a cell a rule needs that is missing or has
n < ``MIN_N`` makes the claim ``pending``, never ``supported``; ``rejected`` needs the opposite to be
clearly shown (an interval or rate on the wrong side), not just the absence of support.

Thresholds live in ``DEFAULT_RULES`` and can be overridden from the params file's ``claims:`` mapping,
e.g. ``claims: {C1: {min_mismatch_rate: 0.75}}`` (see ``resolve_rules``).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from .params import check_claim_overrides, format_tokens

MIN_N = 2
CLAIM_COLUMNS = ["claim", "gate", "statement", "status", "evidence", "rule"]

DEFAULT_RULES: dict[str, dict[str, Any]] = {
    # lowest k, lowest budget: mismatch rate >= min_mismatch_rate and the d_ce_rec CI entirely below 0
    "C1": {"min_mismatch_rate": 0.5},
    # for each k in `k` (None = the two smallest k): mean d_ce_rec rises from the lowest to the highest budget
    # and the mismatch rate at the highest budget is <= max_mismatch_rate_at_highest
    "C2": {"k": None, "max_mismatch_rate_at_highest": 0.0},
    # d_r2 CI lower bound > min_d_r2_lo in every cell
    "C3": {"min_d_r2_lo": 0.0},
    # boundary k (None = 32 if present, else the largest k above the two smallest) vs the lowest k, at budget
    # `tokens` (None = the lowest)
    "C4": {"k": None, "tokens": None},
    # one of `proxies` has beats_r2 in leaderboard scheme `scheme`, with >= min_cells held-out cells: the Fisher
    # pullback d_swd or the study's first-order d_gwd (d_kl and d_random_error_ratio are reported on the
    # leaderboard but are not geometry proxies: they are measured with the patch in place)
    "C5": {"proxies": ["d_swd", "d_gwd"], "scheme": "pooled", "min_cells": 4},
    # the per-pair dimensionality delta `column` correlates with d_ce_rec (|Spearman| >= min_abs_rho, p < alpha);
    # d_dim = Δ of the share of the input's participation ratio that the reconstruction keeps (stats.DIM_METRIC)
    "C6": {"column": "d_dim", "min_abs_rho": 0.5, "alpha": 0.05, "min_pairs": 6},
}


def resolve_rules(overrides: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """``DEFAULT_RULES`` with ``overrides`` (rule name -> partial option dict) merged over it.

    Raises ``params.ParamsError`` (a ValueError) naming unknown rule names, unknown option keys, or a rule
    given as a non-mapping (``params.check_claim_overrides``, which validates the params file the same way).
    """
    overrides = overrides or {}
    check_claim_overrides(overrides)
    rules = copy.deepcopy(DEFAULT_RULES)
    for name, options in overrides.items():
        rules[name] |= copy.deepcopy(options)
    return rules


# ---------------------------------------------------------------- helpers


Verdict = tuple[str, str, str]  # (status, evidence, rule in words)


def _cell(table: pd.DataFrame, k: int, tokens: int) -> pd.Series | None:
    rows = table[(table["k"] == k) & (table["tokens"] == tokens)]
    return rows.iloc[0] if len(rows) else None


def _where(k: int, tokens: int) -> str:
    return f"k={k}, T={format_tokens(int(tokens))}"


def _thin(cells: dict[str, pd.Series | None]) -> str | None:
    """A 'pending' message when a needed cell is missing or has n < MIN_N, else None."""
    missing = [w for w, c in cells.items() if c is None]
    thin = [f"{w} (n={int(c['n'])})" for w, c in cells.items() if c is not None and c["n"] < MIN_N]
    parts = [f"missing cell(s) {'; '.join(missing)}"] if missing else []
    parts += [f"n < {MIN_N} at {'; '.join(thin)}"] if thin else []
    return ", ".join(parts) if parts else None


def _ce(c: pd.Series) -> str:
    return f"ΔCE_rec {c['d_ce_rec_mean']:+.3f} [{c['d_ce_rec_lo']:.3f}, {c['d_ce_rec_hi']:.3f}]"


def _r2(c: pd.Series) -> str:
    return f"ΔR² {c['d_r2_mean']:+.3f} [{c['d_r2_lo']:.3f}, {c['d_r2_hi']:.3f}]"


# ---------------------------------------------------------------- rules


def _c1_low_k_mismatch(table: pd.DataFrame, pairs: pd.DataFrame, board: pd.DataFrame | None,
                       opt: dict[str, Any]) -> Verdict:
    """Supported: rate >= threshold and CI upper < 0 at (lowest k, lowest T); rejected: CI lower > 0."""
    thr = opt["min_mismatch_rate"]
    rule = (f"at the lowest k and lowest budget: supported if mismatch rate >= {thr} and the ΔCE_rec CI upper "
            f"bound < 0; rejected if the ΔCE_rec CI lower bound > 0; pending otherwise or if n < {MIN_N}")
    if table.empty:
        return "pending", "no cells", rule
    k, t = table["k"].min(), table["tokens"].min()
    c = _cell(table, k, t)
    if (why := _thin({_where(k, t): c})):
        return "pending", why, rule
    evidence = f"{_where(k, t)}: n={int(c['n'])}, mismatch rate {c['mismatch_rate']:.2f}, {_ce(c)}, {_r2(c)}"
    if c["mismatch_rate"] >= thr and c["d_ce_rec_hi"] < 0:
        return "supported", evidence, rule
    return ("rejected" if c["d_ce_rec_lo"] > 0 else "pending"), evidence, rule


def _c2_optimisation_dominant(table: pd.DataFrame, pairs: pd.DataFrame, board: pd.DataFrame | None,
                              opt: dict[str, Any]) -> Verdict:
    """Per low k: rises = mean(T_max) > mean(T_min), cleared = rate(T_max) <= threshold. Supported when both
    hold for every k; rejected when for some k neither holds; pending otherwise."""
    ks = opt["k"] if opt["k"] is not None else sorted(table["k"].unique())[:2]
    thr = opt["max_mismatch_rate_at_highest"]
    rule = (f"for k in {list(ks) if opt['k'] is not None else 'the two smallest k'}: supported if mean ΔCE_rec "
            f"rises from the lowest to the highest budget and the mismatch rate at the highest budget is <= {thr} "
            f"for every k (and some k shows a mismatch at the lowest budget); rejected if for some k it neither "
            f"rises nor clears; pending otherwise or if a needed "
            f"cell is missing or has n < {MIN_N}")
    budgets = sorted(int(t) for t in table["tokens"].unique())
    ks = [int(k) for k in ks]
    if len(budgets) < 2 or not len(ks):
        return "pending", f"needs >= 2 budgets and >= 1 low k; have budgets {budgets}, k {list(ks)}", rule
    lo_t, hi_t = budgets[0], budgets[-1]
    cells = {_where(k, t): _cell(table, k, t) for k in ks for t in (lo_t, hi_t)}
    if (why := _thin(cells)):
        return "pending", why, rule
    verdicts, lines = [], []
    for k in ks:
        a, b = cells[_where(k, lo_t)], cells[_where(k, hi_t)]
        rises, cleared = b["d_ce_rec_mean"] > a["d_ce_rec_mean"], b["mismatch_rate"] <= thr
        verdicts.append((rises, cleared))
        lines.append(f"k={k}: ΔCE_rec {a['d_ce_rec_mean']:+.3f} ({format_tokens(int(lo_t))}) -> "
                     f"{b['d_ce_rec_mean']:+.3f} ({format_tokens(int(hi_t))}), mismatch rate "
                     f"{a['mismatch_rate']:.2f} -> {b['mismatch_rate']:.2f}")
    evidence = "; ".join(lines)
    if all(cells[_where(k, lo_t)]["mismatch_rate"] <= thr for k in ks):
        return "pending", f"{evidence}; no mismatch at the lowest budget, so there is none to remove", rule
    if all(r and c for r, c in verdicts):
        return "supported", evidence, rule
    return ("rejected" if any(not r and not c for r, c in verdicts) else "pending"), evidence, rule


def _c3_r2_positive(table: pd.DataFrame, pairs: pd.DataFrame, board: pd.DataFrame | None,
                    opt: dict[str, Any]) -> Verdict:
    """Supported: d_r2 CI lower > threshold in every cell of the k x budget grid; rejected: some cell (n >= MIN_N)
    has its CI upper < threshold; a grid cell that is missing or has n < MIN_N makes it pending."""
    thr = opt["min_d_r2_lo"]
    rule = (f"supported if the ΔR² CI lower bound > {thr} in every (k, T) cell; rejected if some cell's CI upper "
            f"bound < {thr}; pending otherwise or if any cell has n < {MIN_N}")
    if table.empty:
        return "pending", "no cells", rule
    lows = table.loc[table["d_r2_lo"] <= thr]
    evidence = (f"{len(table)} cells; ΔR² CI lower bounds from {table['d_r2_lo'].min():.3f} to "
                f"{table['d_r2_lo'].max():.3f}; cells with lower bound <= {thr}: "
                f"{', '.join(_where(k, t) for k, t in zip(lows['k'], lows['tokens'])) or 'none'}")
    clear = table[(table["d_r2_hi"] < thr) & (table["n"] >= MIN_N)]
    if len(clear):
        where = ", ".join(_where(k, t) for k, t in zip(clear["k"], clear["tokens"]))
        return "rejected", f"{evidence}; CI entirely below {thr} at {where}", rule
    grid = {(k, t): _cell(table, k, t) for k in sorted(table["k"].unique()) for t in sorted(table["tokens"].unique())}
    if (why := _thin({_where(k, t): c for (k, t), c in grid.items()})):
        return "pending", f"{evidence}; {why}", rule
    return ("supported" if lows.empty else "pending"), evidence, rule


def _c4_boundary(table: pd.DataFrame, pairs: pd.DataFrame, board: pd.DataFrame | None,
                 opt: dict[str, Any]) -> Verdict:
    """Supported: rate(boundary k) < rate(lowest k) at the budget; rejected: >=; pending if the lowest k shows
    no mismatch (nothing to be specific about). By default the two smallest k are the low-k regime (as in C2), so
    the boundary must lie above them: a grid with only k = 8, 16 has no boundary check yet."""
    budget = format_tokens(int(opt["tokens"])) if opt["tokens"] else "the lowest budget"
    boundary = opt["k"] or "32 if present, else the largest k above the two smallest"
    rule = (f"at {budget}: supported if the mismatch rate at the boundary k ({boundary}) is below that at the "
            f"lowest k; rejected if it is >=; pending if the lowest k shows no mismatch, a cell is missing or has "
            f"n < {MIN_N}")
    if table.empty:
        return "pending", "no cells", rule
    ks = sorted(int(k) for k in table["k"].unique())
    above_low = ks[2:]
    big = opt["k"] or (32 if 32 in above_low else (above_low[-1] if above_low else None))
    if big is None:
        return "pending", f"no boundary k above the low-k regime (the two smallest k); have k {ks}", rule
    t = opt["tokens"] or table["tokens"].min()
    low_c, big_c = _cell(table, ks[0], t), _cell(table, big, t)
    if (why := _thin({_where(ks[0], t): low_c, _where(big, t): big_c})):
        return "pending", why, rule
    evidence = (f"mismatch rate {low_c['mismatch_rate']:.2f} at {_where(ks[0], t)} (n={int(low_c['n'])}) vs "
                f"{big_c['mismatch_rate']:.2f} at {_where(big, t)} (n={int(big_c['n'])}); {_ce(big_c)} at k={big}")
    if low_c["mismatch_rate"] == 0:
        return "pending", f"{evidence}; no mismatch at the lowest k to compare with", rule
    return ("supported" if big_c["mismatch_rate"] < low_c["mismatch_rate"] else "rejected"), evidence, rule


def _c5_geometry_proxy(table: pd.DataFrame, pairs: pd.DataFrame, board: pd.DataFrame | None,
                       opt: dict[str, Any]) -> Verdict:
    """Supported: some listed proxy has beats_r2; rejected: every scored listed proxy has its MAE-difference
    CI entirely below 0 (R2 clearly better); pending otherwise."""
    proxies, scheme, min_cells = list(opt["proxies"]), opt["scheme"], opt["min_cells"]
    rule = (f"leaderboard scheme '{scheme}': supported if one of {proxies} beats ΔR² (CI of the MAE difference "
            f"entirely on the better side) with >= {min_cells} held-out cells; rejected if ΔR² is clearly better "
            f"than every one of them; pending otherwise")
    if board is None or board.empty:
        return "pending", "no proxy leaderboard", rule
    rows = board[(board["scheme"] == scheme) & board["proxy"].isin(proxies) & board["mae"].notna()]
    if rows.empty:
        return "pending", f"none of {proxies} was scored in scheme '{scheme}'", rule
    evidence = "; ".join(f"{r.proxy}: MAE {r.mae:.4f}, MAE gain over ΔR² {r.mae_vs_r2:+.4f} "
                         f"[{r.mae_vs_r2_lo:.4f}, {r.mae_vs_r2_hi:.4f}], sign acc {r.sign_acc:.2f}"
                         for r in rows.itertuples())
    n_cells = int(rows["n_cells"].min())
    if n_cells < min_cells:
        return "pending", f"{evidence}; only {n_cells} held-out cells (< {min_cells})", rule
    if rows["beats_r2"].any():
        return "supported", evidence, rule
    return ("rejected" if (rows["mae_vs_r2_hi"] < 0).all() else "pending"), evidence, rule


def _c6_dimensionality(table: pd.DataFrame, pairs: pd.DataFrame, board: pd.DataFrame | None,
                       opt: dict[str, Any]) -> Verdict:
    """Supported: |Spearman(column, d_ce_rec)| >= threshold with p < alpha over >= min_pairs pairs. Never
    rejected: a weak correlation does not show that dimensionality is irrelevant."""
    col = opt["column"]
    rule = (f"supported if the per-pair column {col} has |Spearman ρ| >= {opt['min_abs_rho']} with ΔCE_rec at "
            f"p < {opt['alpha']} over >= {opt['min_pairs']} pairs; pending otherwise (never rejected)")
    if col not in pairs.columns:
        return "pending", f"no dimensionality column {col} in the pairs (metrics without D3 statistics)", rule
    data = pairs[[col, "d_ce_rec"]].dropna()
    if len(data) < opt["min_pairs"] or data[col].nunique() < 2:
        return "pending", f"{len(data)} usable pairs (< {opt['min_pairs']}) or constant {col}", rule
    rho, p = spearmanr(data[col], data["d_ce_rec"])
    evidence = f"Spearman ρ({col}, ΔCE_rec) = {rho:+.3f}, p = {p:.3g}, {len(data)} pairs"
    strong = np.abs(rho) >= opt["min_abs_rho"] and p < opt["alpha"]
    return ("supported" if strong else "pending"), evidence, rule


CLAIMS: dict[str, tuple[str, str, Callable[..., Verdict]]] = {
    "C1": ("-", "At the lowest budget, the lowest-k SAEs show the proxy mismatch: ΔR² > 0 while ΔCE_rec < 0.",
           _c1_low_k_mismatch),
    "C2": ("D1", "The low-k mismatch is optimisation-dominant: more SAE training tokens close the CE gap and "
                 "remove the mismatch.", _c2_optimisation_dominant),
    "C3": ("-", "ΔR² > 0 at every budget: the larger model always looks better in reconstruction space.",
           _c3_r2_positive),
    "C4": ("-", "The mismatch is specific to low k: the k=32 boundary (else the largest k above the two smallest) "
                "shows less of it at the same budget.",
           _c4_boundary),
    "C5": ("D2", "A geometry-aware proxy (ΔSWD, the Fisher pullback, or ΔGWD, the first-order gradient-weighted "
                 "distortion) predicts held-out ΔCE_rec better than ΔR².",
           _c5_geometry_proxy),
    "C6": ("D3", "Dimensionality tracks the behavioural gap.", _c6_dimensionality),
}


def on_grid(table: pd.DataFrame, ks: Sequence[int], budgets: Sequence[int]) -> pd.DataFrame:
    """The table with a row for every (k, T) of the planned grid; cells without pairs get n = 0 (so every rule
    that needs them says pending) and NaN statistics."""
    full = pd.MultiIndex.from_product([sorted(ks), sorted(budgets)], names=["k", "tokens"])
    if not {"k", "tokens"} <= set(table.columns):
        table = pd.DataFrame(columns=["k", "tokens", "n"])
    out = table.set_index(["k", "tokens"]).reindex(full).reset_index()
    out["n"] = pd.to_numeric(out["n"]).fillna(0).astype(int)
    return out


def evaluate_claims(table: pd.DataFrame, pairs: pd.DataFrame, leaderboard: pd.DataFrame | None,
                    rules: dict[str, Any] | None = None,
                    grid: tuple[Sequence[int], Sequence[int]] | None = None) -> pd.DataFrame:
    """Evaluate every claim; ``rules`` = the params file's ``claims:`` overrides (see ``resolve_rules``);
    ``grid`` = the planned (k values, budgets): cells of it that have no pairs yet count as missing.

    Returns one row per claim with columns ``claim, gate, statement, status, evidence, rule``.
    """
    resolved = resolve_rules(rules)
    if grid is not None:
        table = on_grid(table, *grid)
    rows = []
    for claim, (gate, statement, rule_fn) in CLAIMS.items():
        status, evidence, rule = rule_fn(table, pairs, leaderboard, resolved[claim])
        rows.append({"claim": claim, "gate": gate, "statement": statement, "status": status,
                     "evidence": evidence, "rule": rule})
    return pd.DataFrame(rows, columns=CLAIM_COLUMNS)
