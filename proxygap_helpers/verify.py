"""``verify``: a finished run's published tables against a published report, every CSV cell by cell.

Rows are compared in order (every table is written sorted by its keys, and the key columns must agree exactly);
identifiers and volatile columns (SAE ids, hashes, provenance, wall times, timestamps) and free text (claims'
evidence, fits' reasons: sentences whose numbers are other columns' numbers rounded) are skipped. Two modes:

**exact** (the run and the reference report the same CPU, torch build and torch threads in their provenance):
CPU numerics are deterministic there, so every float must agree to ``EXACT_RTOL`` relative (the last bits that
numpy's SIMD dispatch may still move) and every other cell exactly.

**noise** (another CPU family, torch build or thread count): float sums run in another order, the models and
activations differ in the last bits, and every SAE's training amplifies that like drawing another seed (measured:
README, "Reproducing a published report"). A cell then agrees when its difference is within seed noise:

- a per-seed table (``pairs``, ``sae_metrics``: it has a ``seed`` column): per cell (the row's keys but the seed),
  the difference of the run's and the reference's mean over seeds, in units of its standard error
  ``sigma * sqrt(2 / n)``. ``sigma`` is the larger of the column's pooled seed-to-seed SD (its wildest cells left
  out, :func:`seed_sd`) and the cell's own, each the root mean square of the run's and the reference's (Welch): a
  cell noisier than most, as the dead-latent fraction at k = 8 and the top budget, has its own tolerance. A single
  seed is not tested on its own: with a few seeds one SAE's value cannot be told from seed noise (each row's largest
  difference is printed); a change of every seed of a cell, or of a column, moves the cell means and is caught;
- a summary of seeds (``*_mean`` of ``phase2_table`` and the tables stacked from it): the same as a cell mean, with
  the ``sigma`` of the per-seed column it summarises (``d_ce_rec_mean`` -> ``pairs.d_ce_rec``) and the row's ``n``;
  its interval bounds (``*_lo``, ``*_hi``, ``*_boot_lo``, ``*_boot_hi``) with ``sigma * sqrt(2/n + t^2 / (n (n-1)))``
  (the mean's noise plus that of the seed SD the bound adds, ``t`` the Student quantile); its seed SD and SE
  (``*_seed_sd``, ``*_seed_se``) with ``sigma / sqrt(n - 1)`` (over ``sqrt(n)`` for the SE);
- every difference passes when ``|z| <= Z``, ``Z`` the Bonferroni bound for a family-wise false-alarm rate of
  ``ALPHA`` over all the tests made; a value with no seed spread (a model's own statistic: ``ce_clean``,
  ``sst_per_token``) must agree to ``NOISE_RTOL`` relative (float32 sums in another order);
- derived quantities (budget fits, T*, curves, held-out predictions, the leaderboard, mismatch rates) and
  conclusions (claim statuses, directions) are functions of the tables above: their largest differences are
  reported, and a conclusion that moved is named, but they do not fail the check (a claim whose evidence sits at
  its threshold can flip under seed noise; that is a fact about the claim, not a failed reproduction).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as st

EXACT_RTOL = 1e-9  # exact mode: relative (plus EXACT_ATOL absolute) for the last bits
EXACT_ATOL = 1e-12
NOISE_RTOL = 1e-5  # noise mode: values without seed spread (a model's statistics), float32 in another order
ALPHA = 0.01  # noise mode: family-wise false-alarm rate of all the z tests of one verify
CI_LEVEL = 0.95  # the intervals of the phase-2 tables (stats.ci)
SKIPPED = re.compile(r"^(sae_id.*|.*_hash|provenance\..*|.*_seconds|finished_at|evidence|reason|note|statement|rule"
                     r"|model_name|eval_predictions|fit_status)$")
MEAN = re.compile(r"_mean$")
BOUND = re.compile(r"_(lo|hi|boot_lo|boot_hi)$")
SPREAD = re.compile(r"_seed_(sd|se)$")
SUMMARY_SUFFIX = re.compile(r"_(mean|lo|hi|boot_lo|boot_hi|seed_sd|seed_se)$")
# conclusions: categorical outcomes of the numbers (a claim's status, a fit's direction, a seed's mismatch indicator):
# compared exactly in exact mode, named when they moved in noise mode
CONCLUSIONS = frozenset({"status", "direction", "fit", "proposed", "beats_r2", "mismatch", "kind", "objective",
                         "verdict", "y_inf_at_1"})
SAME_RUN_KEYS = ("provenance.machine.cpu", "provenance.machine.torch_threads", "provenance.versions.torch")


@dataclass
class TableResult:
    """One reference table against the run's copy: ``problems`` (empty when it agrees), ``notes`` (derived values
    and conclusions that moved in noise mode), and per float column ``(max |diff|, max rel diff, max |z|)`` (``z``:
    the difference in units of its noise, noise mode; NaN in exact mode or for derived columns)."""

    name: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    columns: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    n_cells: int = 0
    n_tests: int = 0


# ---------------------------------------------------------------- noise scales
def _is_float(s: pd.Series) -> bool:
    return pd.api.types.is_float_dtype(s)


def _keys(ref: pd.DataFrame) -> list[str]:
    """The identity columns of a table (what a row is: k, tokens, seed, setting, proxy, ...): not floats, not
    skipped, not conclusions."""
    return [c for c in ref.columns if not SKIPPED.match(c) and not _is_float(ref[c]) and c not in CONCLUSIONS]


def seed_sd(table: pd.DataFrame, col: str, keys: list[str]) -> float:
    """The seed-to-seed SD of ``col``: the pooled within-cell SD over the cells (the rows' ``keys`` but seed) with two
    or more finite seeds, leaving out the tenth of the cells with the largest variance (at least one cell when there
    are three or more), so that one wild cell (the very difference a check must catch) cannot widen the tolerance,
    while cells of different noise (dead latents at k = 8 and at k = 32) still pool. NaN when no cell has two
    finite seeds."""
    cells = [c for c in keys if c != "seed"]
    if not cells:
        return float("nan")
    v = table[col].astype(float).replace([np.inf, -np.inf], np.nan)
    g = pd.DataFrame({"v": v, **{c: table[c] for c in cells}}).dropna(subset=["v"]).groupby(cells, dropna=False)["v"]
    var, n = g.var(ddof=1), g.count()
    ok = n >= 2
    if not ok.any():
        return float("nan")
    var, df = var[ok].to_numpy(float), (n[ok] - 1).to_numpy(float)
    drop = max(1, math.ceil(0.1 * len(var))) if len(var) >= 3 else 0
    keep = np.argsort(var, kind="stable")[:len(var) - drop]
    return float(math.sqrt((var[keep] * df[keep]).sum() / df[keep].sum()))


def _sigmas(table: pd.DataFrame) -> dict[str, float]:
    keys = _keys(table)
    return {c: seed_sd(table, c, keys) for c in table.columns if _is_float(table[c]) and not SKIPPED.match(c)}


def _rms(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Per column the root mean square of two seed SDs, sqrt((a^2 + b^2) / 2) (NaN where either is unknown)."""
    return {c: float(np.sqrt((v ** 2 + b.get(c, np.nan) ** 2) / 2)) for c, v in a.items()}


def cell_sd(run: pd.DataFrame, ref: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per cell (``keys`` but seed) and float column, the root mean square of the run's and the reference's seed SD
    in that cell (NaN with fewer than two seeds on a side): one row per cell, the cell keys then one column per float
    column."""
    cells = [k for k in keys if k != "seed"]
    cols = [c for c in ref.columns if _is_float(ref[c]) and not SKIPPED.match(c) and c in run.columns]
    if not cells or not cols:
        return pd.DataFrame(columns=cells)
    sd = [df.groupby(cells, sort=False)[cols].std(ddof=1) for df in (run, ref)]
    out = np.sqrt((sd[0].reindex(sd[1].index) ** 2 + sd[1] ** 2) / 2)
    return out.reset_index()


def pairs_sigma(run_dir: Path, ref_dir: Path) -> tuple[dict[str, float], pd.DataFrame]:
    """Per column of ``pairs.csv`` (what a phase-2 summary column summarises): the root mean square of the run's and
    the reference's pooled seed SD, and per cell the root mean square of their cell SDs (:func:`cell_sd`)."""
    paths = [Path(d) / "pairs.csv" for d in (run_dir, ref_dir)]
    if not all(p.is_file() for p in paths):
        return {}, pd.DataFrame()
    run, ref = (pd.read_csv(p) for p in paths)
    return _rms(_sigmas(run), _sigmas(ref)), cell_sd(run, ref, _keys(ref))


def same_run_setting(run_dir: Path, ref_dir: Path) -> tuple[bool, str]:
    """Whether run and reference computed on the same CPU, torch build and thread count (their ``sae_metrics.csv``
    provenance), and a phrase saying so or what differs."""
    try:
        a, b = (pd.read_csv(Path(d) / "sae_metrics.csv") for d in (run_dir, ref_dir))
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return False, "no sae_metrics.csv provenance to compare"
    differ = []
    for key in SAME_RUN_KEYS:
        va = set(a[key].astype(str)) if key in a else {"?"}
        vb = set(b[key].astype(str)) if key in b else {"?"}
        if va != vb:
            differ.append(f"{key.split('.')[-1]} {', '.join(sorted(va))} vs {', '.join(sorted(vb))}")
    if differ:
        return False, "; ".join(differ)
    return True, "same " + ", ".join(f"{k.split('.')[-1]} ({', '.join(sorted(set(a[k].astype(str))))})"
                                     for k in SAME_RUN_KEYS)


# ---------------------------------------------------------------- one table
def _agree_exact(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    both_nan = np.isnan(a) & np.isnan(b)
    same_inf = np.isinf(a) & np.isinf(b) & (np.sign(a) == np.sign(b))
    with np.errstate(invalid="ignore"):
        close = np.abs(a - b) <= EXACT_RTOL * np.abs(np.where(np.isfinite(b), b, 0.0)) + EXACT_ATOL
    return both_nan | same_inf | close


def _diffs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, float, float]:
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(np.isfinite(a) & np.isfinite(b), np.abs(a - b), np.where(np.isnan(a) & np.isnan(b), 0.0, np.inf))
        rel = np.where(d == 0, 0.0, d / np.maximum(np.abs(np.where(np.isfinite(b), b, 0.0)), 1e-300))
    return d, float(np.max(d)) if len(d) else 0.0, float(np.max(rel)) if len(rel) else 0.0


def _row_sigma(base: str, ref: pd.DataFrame, sigma: dict[str, float], cells: pd.DataFrame) -> np.ndarray:
    """Each row's sigma for the per-seed column ``base``: the larger of its pooled SD and its cell's (the pairs
    cell whose keys the row shares)."""
    s = np.full(len(ref), sigma.get(base, np.nan))
    on = [k for k in cells.columns if k in ref.columns and k != base and not _is_float(cells[k])]
    if base in cells.columns and on:
        merged = ref[on].astype(str).merge(cells[on + [base]].astype({k: str for k in on}), on=on, how="left")
        s = np.fmax(s, merged[base].to_numpy(float))
    return s


def _noise_se(col: str, ref: pd.DataFrame, sigma: dict[str, float], cells: pd.DataFrame,
              per_seed: bool) -> np.ndarray | None:
    """The standard error of the run-minus-reference difference of each row of a summary column (module
    docstring), or None for a derived column (not a summary of seeds)."""
    if per_seed:
        return None
    base = SUMMARY_SUFFIX.sub("", col)
    if not np.isfinite(sigma.get(base, np.nan)) or "n" not in ref.columns or not SUMMARY_SUFFIX.search(col):
        return None
    s = _row_sigma(base, ref, sigma, cells)
    n = ref["n"].to_numpy(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        if MEAN.search(col):
            return s * np.sqrt(2 / n)
        t = st.t.ppf(0.5 + CI_LEVEL / 2, np.maximum(n - 1, 1))
        if BOUND.search(col):
            return s * np.sqrt(2 / n + t ** 2 / (n * (n - 1)))
        if SPREAD.search(col):
            return s / np.sqrt(n - 1) / (np.sqrt(n) if col.endswith("_se") else 1.0)
    return None


def _z(d: np.ndarray, se: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|difference| / se; where se is 0 (no seed spread) the relative difference against NOISE_RTOL instead,
    scaled so that the same Z bound applies; NaN (both NaN) counts as 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = d / np.maximum(np.abs(np.where(np.isfinite(b), b, 0.0)), 1e-300)
        z = np.where(se > 0, d / np.where(se > 0, se, 1.0), np.where(rel <= NOISE_RTOL, 0.0, np.inf))
    return np.where(np.isnan(a) & np.isnan(b), 0.0, z)


def compare_table(name: str, run: pd.DataFrame, ref: pd.DataFrame, sigma: dict[str, float], exact: bool,
                  z_max: float = np.inf, max_cells: int = 5, cells: pd.DataFrame | None = None) -> TableResult:
    """Compare one table (module docstring); the first ``max_cells`` cells that fail are named."""
    res = TableResult(name)
    if missing := [c for c in ref.columns if c not in run.columns]:
        res.problems.append(f"{name}: columns missing from the run: {', '.join(missing)}")
    if len(run) != len(ref):
        res.problems.append(f"{name}: {len(run)} rows in the run, {len(ref)} in the reference")
    if res.problems:
        return res
    run, ref = run.reset_index(drop=True), ref.reset_index(drop=True)
    keys = _keys(ref)
    per_seed = "seed" in ref.columns
    if per_seed:  # per-seed tables: each column's own seed SD, of the run and of the reference
        sigma = _rms(_sigmas(ref), _sigmas(run))
    bad, moved = [], []
    for c in ref.columns:
        if SKIPPED.match(c):
            continue
        res.n_cells += len(ref)
        if not _is_float(ref[c]):
            x, y = run[c].astype(str).to_numpy(), ref[c].astype(str).to_numpy()
            diff = [f"{name}[row {i}].{c}: run {x[i]!r}, reference {y[i]!r}" for i in np.flatnonzero(x != y)]
            (moved if not exact and c in CONCLUSIONS else bad).extend(diff)
            continue
        a = pd.to_numeric(run[c], errors="coerce").to_numpy(float)
        b = ref[c].to_numpy(float)
        d, dmax, rmax = _diffs(a, b)
        if exact:
            ok = _agree_exact(a, b)
            res.columns[c] = (dmax, rmax, float("nan"))
            bad += [f"{name}[row {i}].{c}: run {a[i]!r}, reference {b[i]!r}" for i in np.flatnonzero(~ok)]
            continue
        z, what = _noise_z(c, run, ref, a, b, d, sigma, keys, per_seed,
                           cells if cells is not None else pd.DataFrame())
        if z is None:  # derived: reported only
            res.columns[c] = (dmax, rmax, float("nan"))
            if dmax > 0:
                moved.append(f"{name}.{c}: derived, largest difference {dmax:.3g} (relative {rmax:.3g})")
            continue
        res.n_tests += len(z)
        finite_z = np.where(np.isnan(z), 0.0, z)
        res.columns[c] = (dmax, rmax, float(np.max(finite_z)) if len(z) else 0.0)
        bad += [f"{name}[{what(i)}].{c}: |z| = {finite_z[i]:.2f} > {z_max:.2f}" for i in np.flatnonzero(finite_z > z_max)]
    if bad:
        res.problems += bad[:max_cells] + ([f"{name}: ... and {len(bad) - max_cells} more cells"]
                                           if len(bad) > max_cells else [])
    res.notes += [m for m in moved if "derived" not in m][:max_cells]
    return res


def _noise_z(c, run, ref, a, b, d, sigma, keys, per_seed, cells):
    """The z of every test of one float column in noise mode and a function naming test i, or (None, None) for a
    derived column. A per-seed column gets one test per row and one per cell mean."""
    s = sigma.get(c, np.nan)
    if per_seed:
        if not np.isfinite(s):
            return None, None
        groups = [k for k in keys if k != "seed"]
        frame = pd.DataFrame({"a": a, "b": b, **{k: ref[k].astype(str) for k in groups}})
        g = frame.groupby(groups, sort=False) if groups else frame.groupby(np.zeros(len(frame)))
        ma, mb, n = g["a"].mean(), g["b"].mean(), g["b"].count().to_numpy(float)
        own = np.sqrt((g["a"].std().to_numpy(float) ** 2 + g["b"].std().to_numpy(float) ** 2) / 2)
        s_cell = np.fmax(s, own)  # a cell noisier than the pooled SD has its own tolerance
        dm = np.abs(ma.to_numpy() - mb.to_numpy())
        labels = [f"cell {', '.join(f'{k}={v}' for k, v in zip(groups, key if isinstance(key, tuple) else (key,)))}"
                  for key in ma.index]
        return _z(dm, s_cell * np.sqrt(2 / n), ma.to_numpy(), mb.to_numpy()), labels.__getitem__
    se = _noise_se(c, ref, sigma, cells, per_seed)
    if se is None:
        return None, None
    return _z(d, se, a, b), (lambda i: f"row {i}")


# ---------------------------------------------------------------- a report folder
def compare_dirs(run_dir: Path, ref_dir: Path, mode: str = "auto") -> tuple[list[TableResult], dict]:
    """Every CSV of ``ref_dir`` against the same file in ``run_dir`` (a table missing from the run is a problem;
    tables only the run has are ignored). ``mode``: ``exact``, ``noise`` or ``auto`` (exact when both report the
    same CPU, torch build and threads: :func:`same_run_setting`). Returns the results and ``{mode, why, z_max,
    n_tests}``. Raises FileNotFoundError when ``ref_dir`` holds no CSV."""
    ref_files = sorted(Path(ref_dir).glob("*.csv"))
    if not ref_files:
        raise FileNotFoundError(f"no CSV tables in {str(ref_dir)!r}")
    same, why = same_run_setting(run_dir, ref_dir)
    exact = mode == "exact" or (mode == "auto" and same)
    sigma, cells = pairs_sigma(run_dir, ref_dir)
    tables = []
    for f in ref_files:
        mine = Path(run_dir) / f.name
        tables.append((f.name, pd.read_csv(mine) if mine.is_file() else None, pd.read_csv(f)))
    # the Bonferroni bound needs the number of tests: count them with an infinite bound first (cheap), then apply
    first = [compare_table(n, r, ref, sigma, exact, cells=cells) if r is not None else None for n, r, ref in tables]
    m = max(1, sum(t.n_tests for t in first if t is not None))
    z_max = float(st.norm.isf(ALPHA / 2 / m))
    results = []
    for (name, r, ref), pre in zip(tables, first):
        if r is None:
            results.append(TableResult(name, [f"{name}: missing from the run ({Path(run_dir) / name})"]))
        else:
            results.append(pre if exact else compare_table(name, r, ref, sigma, exact, z_max, cells=cells))
    info = {"mode": "exact" if exact else "noise", "why": why, "z_max": z_max, "n_tests": m}
    return results, info


def print_results(results: list[TableResult], info: dict, run_dir: Path, ref_dir: Path) -> bool:
    """Print the mode, the largest differences per table and column, then the problems and the conclusions that
    moved; returns True when every table agrees."""
    print(f"verify: {run_dir} against {ref_dir}")
    if info["mode"] == "exact":
        print(f"mode exact ({info['why']}): floats within {EXACT_RTOL:g} relative, everything else equal")
    else:
        print(f"mode noise ({info['why']}): differences in units of seed noise, |z| <= {info['z_max']:.2f} "
              f"(Bonferroni over {info['n_tests']} tests at {ALPHA:g}); derived values and conclusions reported")
    for r in results:
        state = "ok  " if not r.problems else "DIFF"
        print(f"{state} {r.name}: {r.n_cells} cells compared" + (f", {r.n_tests} noise tests" if r.n_tests else ""))
        for c, (d, rel, z) in r.columns.items():
            if d > 0:
                tail = f"  max |z| {z:.2f}" if np.isfinite(z) else ("  (derived)" if info["mode"] == "noise" else "")
                print(f"       {c:32s} max |diff| {d:.3g}  max rel {rel:.3g}{tail}")
    problems = [p for r in results for p in r.problems]
    notes = [n for r in results for n in r.notes]
    for p in problems:
        print(f"  {p}")
    if notes:
        print("conclusions that moved (within seed noise; not a failure):")
        for n in notes:
            print(f"  {n}")
    n = sum(bool(r.problems) for r in results)
    print("all tables agree" if not n else f"{n} of {len(results)} tables differ")
    return not problems
