"""``verify``: a finished run's published tables against a published report, every CSV cell by cell.

Rows are compared in order (every table is written sorted by its keys, and the key columns must agree exactly);
a column is compared by its kind:

- **identifiers and volatile columns** (SAE ids, hashes, provenance, wall times, timestamps) and **free text**
  (claims' evidence, fits' reasons, notes: sentences whose numbers are other columns' numbers rounded) are
  skipped;
- **other text, booleans and integers** (keys, statuses, directions, counts) must be equal;
- **floats** must agree within ``|run - ref| <= FRACTION * noise(column) + RTOL * |ref|`` (both NaN, or equal
  infinities, agree). ``noise(column)`` is the study's own noise scale for that quantity, measured in the
  reference report: for a table with a ``seed`` column, the pooled within-cell seed-to-seed SD of the column
  (cells = the rows' other key columns); for the other tables, the seed SD of the pairs column that the
  column summarises (``d_ce_rec_mean`` / ``_lo`` / ``_hi`` -> ``pairs.d_ce_rec``), else, for fitted and derived
  quantities with no per-seed counterpart (budget fits, curves, t*, the leaderboard), the column's spread across
  the table's rows.

The two constants come from measurement (README, "Reproducing a published report"): a run at another thread
count moves the seed-level metrics by far less than ``FRACTION`` of the seed SD, and an SAE retrained with one
different seed moves them by about one seed SD, so a reproduction passes and a real change fails.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

FRACTION = 0.05  # of the column's seed-to-seed SD (or its spread across rows): the tolerance's noise part
RTOL = 1e-6  # relative part: CSV round trips and last-bit differences of large values
SKIPPED = re.compile(r"^(sae_id.*|.*_hash|provenance\..*|.*_seconds|finished_at|evidence|reason|note|statement|rule"
                     r"|model_name|eval_predictions)$")
SUMMARY_SUFFIX = re.compile(r"_(mean|lo|hi|boot_lo|boot_hi|seed_sd|seed_se|eval_se)$")


@dataclass
class TableResult:
    """One reference table against the run's copy: ``problems`` (empty when it agrees), and per float column
    ``(max abs diff, max rel diff, max abs diff in units of the column's noise scale)``."""

    name: str
    problems: list[str] = field(default_factory=list)
    columns: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    n_cells: int = 0


def _seed_sd(table: pd.DataFrame, col: str, keys: list[str]) -> float:
    """Pooled within-cell SD of ``col`` across the ``seed`` rows of each cell (``keys`` but seed); NaN when no cell
    has two finite seeds."""
    cells = [c for c in keys if c != "seed"]
    if not cells:
        return float("nan")
    v = table[col].astype(float).replace([np.inf, -np.inf], np.nan)
    g = pd.DataFrame({"v": v, **{c: table[c] for c in cells}}).dropna(subset=["v"]).groupby(cells, dropna=False)["v"]
    var, n = g.var(ddof=1), g.count()
    ok = n >= 2
    if not ok.any():
        return float("nan")
    return float(math.sqrt((var[ok] * (n[ok] - 1)).sum() / (n[ok] - 1).sum()))


def _spread(values: pd.Series) -> float:
    v = values.astype(float).replace([np.inf, -np.inf], np.nan).dropna()
    return float(v.std(ddof=1)) if len(v) >= 2 else float("nan")


def _is_float(s: pd.Series) -> bool:
    return pd.api.types.is_float_dtype(s)


def _keys(ref: pd.DataFrame) -> list[str]:
    return [c for c in ref.columns if not SKIPPED.match(c) and not _is_float(ref[c])]


def noise_scales(ref: pd.DataFrame, pairs_sd: dict[str, float]) -> dict[str, float]:
    """The noise scale of every float column of a reference table (module docstring); ``pairs_sd`` holds the
    pairs table's per-column seed SDs."""
    keys = _keys(ref)
    out = {}
    for c in ref.columns:
        if SKIPPED.match(c) or not _is_float(ref[c]):
            continue
        sd = _seed_sd(ref, c, keys) if "seed" in ref.columns else float("nan")
        if not np.isfinite(sd) or sd == 0:
            sd = pairs_sd.get(SUMMARY_SUFFIX.sub("", c), float("nan"))
        if not np.isfinite(sd) or sd == 0:
            sd = _spread(ref[c])
        out[c] = sd if np.isfinite(sd) else 0.0
    return out


def _agree(a: np.ndarray, b: np.ndarray, tol: np.ndarray) -> np.ndarray:
    both_nan = np.isnan(a) & np.isnan(b)
    same_inf = np.isinf(a) & np.isinf(b) & (np.sign(a) == np.sign(b))
    with np.errstate(invalid="ignore"):
        close = np.abs(a - b) <= tol
    return both_nan | same_inf | close


def compare_table(name: str, run: pd.DataFrame, ref: pd.DataFrame, pairs_sd: dict[str, float],
                  max_cells: int = 5) -> TableResult:
    """Compare one table (module docstring); the first ``max_cells`` differing cells are named."""
    res = TableResult(name)
    if missing := [c for c in ref.columns if c not in run.columns]:
        res.problems.append(f"{name}: columns missing from the run: {', '.join(missing)}")
    if len(run) != len(ref):
        res.problems.append(f"{name}: {len(run)} rows in the run, {len(ref)} in the reference")
    if res.problems:
        return res
    run = run.reset_index(drop=True)
    ref = ref.reset_index(drop=True)
    noise = noise_scales(ref, pairs_sd)
    bad: list[str] = []
    for c in ref.columns:
        if SKIPPED.match(c):
            continue
        res.n_cells += len(ref)
        if c in noise:
            a = pd.to_numeric(run[c], errors="coerce").to_numpy(float)
            b = ref[c].to_numpy(float)
            tol = FRACTION * noise[c] + RTOL * np.abs(np.where(np.isfinite(b), b, 0.0))
            ok = _agree(a, b, tol)
            with np.errstate(invalid="ignore"):
                d = np.where(np.isfinite(a) & np.isfinite(b), np.abs(a - b), np.where(ok, 0.0, np.inf))
                rel = d / np.maximum(np.abs(np.where(np.isfinite(b), b, 0.0)), 1e-300)
            res.columns[c] = (float(np.nanmax(d)) if len(d) else 0.0,
                              float(np.nanmax(np.where(d == 0, 0.0, rel))) if len(d) else 0.0,
                              float(np.nanmax(d)) / noise[c] if len(d) and noise[c] > 0 else
                              (0.0 if not len(d) or np.nanmax(d) == 0 else np.inf))
            bad += [f"{name}[row {i}].{c}: run {a[i]!r}, reference {b[i]!r} (tolerance {tol[i]:.3g})"
                    for i in np.flatnonzero(~ok)]
        else:
            x, y = run[c].astype(str).to_numpy(), ref[c].astype(str).to_numpy()
            bad += [f"{name}[row {i}].{c}: run {x[i]!r}, reference {y[i]!r}" for i in np.flatnonzero(x != y)]
    if bad:
        res.problems += bad[:max_cells] + ([f"{name}: ... and {len(bad) - max_cells} more cells"]
                                           if len(bad) > max_cells else [])
    return res


def compare_dirs(run_dir: Path, ref_dir: Path) -> list[TableResult]:
    """Every CSV of ``ref_dir`` against the same file in ``run_dir`` (a table missing from the run is a
    problem; tables only the run has are ignored). Raises FileNotFoundError when ``ref_dir`` holds no CSV."""
    ref_files = sorted(Path(ref_dir).glob("*.csv"))
    if not ref_files:
        raise FileNotFoundError(f"no CSV tables in {str(ref_dir)!r}")
    pairs = Path(ref_dir) / "pairs.csv"
    pairs_sd = {}
    if pairs.is_file():
        pt = pd.read_csv(pairs)
        keys = _keys(pt)
        pairs_sd = {c: _seed_sd(pt, c, keys) for c in pt.columns if _is_float(pt[c]) and not SKIPPED.match(c)}
    results = []
    for f in ref_files:
        mine = Path(run_dir) / f.name
        if not mine.is_file():
            results.append(TableResult(f.name, [f"{f.name}: missing from the run ({mine})"]))
            continue
        results.append(compare_table(f.name, pd.read_csv(mine), pd.read_csv(f), pairs_sd))
    return results


def print_results(results: list[TableResult], run_dir: Path, ref_dir: Path) -> bool:
    """Print the largest differences per table and column, then the problems; returns True when all agree."""
    print(f"verify: {run_dir} against {ref_dir}")
    for r in results:
        state = "ok  " if not r.problems else "DIFF"
        print(f"{state} {r.name}: {r.n_cells} cells compared")
        for c, (d, rel, in_noise) in r.columns.items():
            if d > 0:
                print(f"       {c:32s} max |diff| {d:.3g}  max rel {rel:.3g}  = {in_noise:.3g} x its noise scale")
    problems = [p for r in results for p in r.problems]
    for p in problems:
        print(f"  {p}")
    n = sum(bool(r.problems) for r in results)
    print(f"{'all tables agree' if not n else f'{n} of {len(results)} tables differ'} "
          f"(floats within {FRACTION} x the column's seed SD + {RTOL:g} relative)")
    return not problems
