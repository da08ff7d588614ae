"""Aggregation of per-SAE metrics into the study's paired statistics.

The chain is ``flatten_metrics`` (metrics.json records -> one row per SAE) -> ``dedupe`` (one SAE per
``(model_role, hook, k, tokens, seed)``, the newest ``finished_at`` wins) -> ``pair`` (small and large SAEs of the
same ``(k, tokens, seed)``; deltas are large - small; ``small`` and ``large`` are the two sides of one setting of
a grid, ``ladder.side_rows``) -> ``phase2_table`` (one row per ``(k, tokens)``: n,
Student-t means and CIs, mismatch rate) -> ``phase2_markdown`` (rendered like the study's table).
``sign_flip`` finds the budget T* where the mean CE gap changes sign.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from .params import format_tokens

CORE_KEYS: tuple[str, ...] = (
    "sae_id", "model_role", "model_name", "hook", "k", "tokens", "seed", "d_in", "d_sae", "eval_tokens",
    "ce_clean", "ce_sae", "ce_zero", "ce_mean_ablation", "ce_rec_relative", "ce_rec_zero_norm", "ce_rec",
    "r2", "cosine", "rel_err_norm", "kl", "swd", "l0", "dead_frac", "mse", "nmse", "gwd", "kl_random",
    "random_error_ratio", "random_error_ratio_sd", "pr_recon", "pr_recon_frac", "pr_act", "twonn_dim",
    "sst_per_token", "act_norm_mean", "train_seconds", "budget_mode", "finished_at",
)
DEDUPE_KEY = ["model_role", "hook", "k", "tokens", "seed"]
PAIR_KEY = ["k", "tokens", "seed"]
CELL_KEY = ["k", "tokens"]
DEFAULT_PAIR_METRICS: tuple[str, ...] = (
    "ce_rec", "ce_rec_relative", "ce_rec_zero_norm", "ce_clean", "ce_sae", "r2", "cosine", "rel_err_norm",
    "kl", "swd", "l0", "dead_frac", "nmse", "gwd", "random_error_ratio", "kl_random", "pr_recon", "pr_recon_frac",
    "pr_act", "twonn_dim", "sst_per_token", "act_norm_mean", "tokens_per_latent",
)
REQUIRED_PAIR_METRICS = ("ce_rec", "r2")
# gate D3's per-pair column: d_dim = d_<DIM_METRIC>, the change in the share of its input's participation ratio
# that the SAE's reconstruction keeps. The per-model dimensionality deltas (d_pr_act, d_twonn_dim) are one
# number per model pair, the same in every pair, so they cannot rank pairs.
DIM_METRIC = "pr_recon_frac"
SECONDARY_DELTAS = ("d_cosine", "d_rel_err_norm", "d_kl", "d_swd", "d_nmse", "d_gwd", "d_random_error_ratio",
                    "d_dim")
TABLE_COLUMNS = ["k", "tokens", "n", "d_ce_rec_mean", "d_ce_rec_lo", "d_ce_rec_hi", "d_r2_mean", "d_r2_lo",
                 "d_r2_hi", "mismatch_rate", "directional"]
# per cell: where the budget sits in tokens per latent (T / d_sae) and how many latents are dead, per model
CELL_CONTEXT = ("tokens_per_latent_small", "tokens_per_latent_large", "dead_frac_small_mean",
                "dead_frac_large_mean")
STUDY_D_SAE = {"small": 16384, "large": 32768}  # pythia-70m / pythia-410m at 32x: the study's tokens per latent


# ---------------------------------------------------------------- records -> rows


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; non-dict values (lists included) are kept as they are."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def grid_records(records: Iterable[dict[str, Any]], sae_ids: Iterable[str], eval_hash: str
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Of some ``metrics.json`` records, those of a grid's SAE ids, and of these the ones evaluated as its params
    say (``eval_hash``): an output folder may hold other grids' SAEs, and another evaluation's metrics of the
    same SAE id are stale for the grid (left out: its cells are missing until ``run`` re-evaluates them)."""
    wanted = set(sae_ids)
    mine = [r for r in records if r.get("sae_id") in wanted]
    return mine, [r for r in mine if r.get("eval_hash") == eval_hash]


def flatten_metrics(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per metrics record, nested dicts flattened with ``.`` (``provenance.git_commit``).

    Columns: every key of ``CORE_KEYS`` in that order (NaN where a record lacks it), then all other keys
    sorted by name, so the column order does not depend on the order or content of the records.
    """
    rows = [_flatten(r) for r in records]
    extra = sorted({c for row in rows for c in row} - set(CORE_KEYS))
    return pd.DataFrame(rows, columns=[*CORE_KEYS, *extra])


# ---------------------------------------------------------------- duplicates


def dedupe(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep one SAE per ``(model_role, hook, k, tokens, seed)``: the one with the newest ``finished_at``.

    Timestamps are parsed as ISO-8601 (naive ones read as UTC); an unparsable or missing timestamp counts
    as oldest; among equal timestamps the record that comes later in ``df`` wins.
    Returns ``(kept, dropped)``: ``kept`` in the input order, ``dropped`` = the removed rows plus
    ``kept_sae_id`` (the row that replaced it) and ``reason``.
    """
    df = df.reset_index(drop=True)
    finished = pd.to_datetime(df["finished_at"], utc=True, format="ISO8601", errors="coerce")
    by_age = df.assign(_finished=finished).sort_values("_finished", kind="stable", na_position="first")
    winners = by_age.drop_duplicates(DEDUPE_KEY, keep="last")
    kept = df.loc[sorted(winners.index)]
    dropped = by_age.drop(index=winners.index).sort_index()
    winner_of = winners[[*DEDUPE_KEY, "sae_id", "_finished"]].rename(
        columns={"sae_id": "kept_sae_id", "_finished": "_kept_finished"})
    dropped = dropped.merge(winner_of, on=DEDUPE_KEY, how="left")
    dropped["reason"] = [_drop_reason(row) for row in dropped.to_dict("records")]
    return kept, dropped.drop(columns=["_finished", "_kept_finished"])


def _drop_reason(row: dict[str, Any]) -> str:
    key = "(model_role, hook, k, tokens, seed) = ({model_role}, {hook}, {k}, {tokens}, {seed})".format(**row)
    finished, kept_finished, kept = row["_finished"], row["_kept_finished"], row["kept_sae_id"]
    if pd.isna(finished):
        return f"duplicate {key} with no valid finished_at; kept {kept}"
    if finished == kept_finished:
        return f"duplicate {key} with the same finished_at; kept the later record {kept}"
    return (f"duplicate {key} finished {finished.isoformat()}; kept the newer {kept} "
            f"finished {kept_finished.isoformat()}")


# ---------------------------------------------------------------- small x large pairs


def _sides(df: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Outer merge of the small and large rows on (k, tokens, seed), columns suffixed _small/_large."""
    repeated = df.duplicated(DEDUPE_KEY, keep=False)
    if repeated.any():
        raise ValueError(f"{int(repeated.sum())} rows share (model_role, hook, k, tokens, seed); call dedupe() "
                         "first")
    cols = [*PAIR_KEY, "sae_id", *metrics]
    small = df.loc[df["model_role"] == "small", cols]
    large = df.loc[df["model_role"] == "large", cols]
    return small.merge(large, on=PAIR_KEY, how="outer", suffixes=("_small", "_large"), indicator=True)


def _complete(sides: pd.DataFrame) -> pd.Series:
    """Both roles present and the primary metric and R2 finite on both sides."""
    both = sides["_merge"] == "both"
    for m in REQUIRED_PAIR_METRICS:
        both &= np.isfinite(sides[f"{m}_small"].astype(float)) & np.isfinite(sides[f"{m}_large"].astype(float))
    return both


def pair(df: pd.DataFrame, metrics: Sequence[str] = DEFAULT_PAIR_METRICS) -> pd.DataFrame:
    """Pair small and large SAEs by ``(k, tokens, seed)``; one row per complete pair.

    Columns: ``k, tokens, seed, sae_id_small, sae_id_large``, then for each metric ``m`` (metrics absent from
    ``df`` are skipped;
    ``ce_rec`` and ``r2`` are required) ``m_small, m_large, d_m`` with ``d_m = m_large - m_small``, then
    ``d_dim`` (gate D3: a copy of ``d_pr_recon_frac``, see ``DIM_METRIC``; only when that metric is
    present) and ``mismatch = int(d_r2 > 0 and d_ce_rec < 0)``. Complete = both roles present with finite ``ce_rec``
    and ``r2``; see ``unpaired`` for the rest. Sorted by k, tokens, seed. ``df`` must be deduplicated.
    """
    missing = [m for m in REQUIRED_PAIR_METRICS if m not in df.columns]
    if missing:
        raise ValueError(f"pair() needs the metric column(s) {missing}")
    metrics = [m for m in dict.fromkeys([*metrics, *REQUIRED_PAIR_METRICS]) if m in df.columns]
    sides = _sides(df, metrics)
    sides = sides[_complete(sides)]
    out = sides[PAIR_KEY].astype("int64").assign(sae_id_small=sides["sae_id_small"],
                                                  sae_id_large=sides["sae_id_large"])
    for m in metrics:
        small, large = sides[f"{m}_small"].astype(float), sides[f"{m}_large"].astype(float)
        out = out.assign(**{f"{m}_small": small, f"{m}_large": large, f"d_{m}": large - small})
    if f"d_{DIM_METRIC}" in out.columns:
        out["d_dim"] = out[f"d_{DIM_METRIC}"]
    out["mismatch"] = ((out["d_r2"] > 0) & (out["d_ce_rec"] < 0)).astype("int64")
    return out.sort_values(PAIR_KEY).reset_index(drop=True)


def unpaired(df: pd.DataFrame) -> pd.DataFrame:
    """The ``(k, tokens, seed)`` that ``pair`` leaves out, with ``sae_id_small, sae_id_large, reason``."""
    sides = _sides(df, list(REQUIRED_PAIR_METRICS))
    bad = sides[~_complete(sides)].copy()
    reasons = {"left_only": "no large SAE", "right_only": "no small SAE",
               "both": "ce_rec or r2 is missing/non-finite"}
    bad["reason"] = bad["_merge"].astype(str).map(reasons)
    cols = [*PAIR_KEY, "sae_id_small", "sae_id_large", "reason"]
    return bad[cols].sort_values(PAIR_KEY).reset_index(drop=True)


# ---------------------------------------------------------------- intervals and the (k, T) table


def mean_ci(values: Iterable[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, lo, hi)`` with the Student-t interval ``mean -/+ t_{(1+level)/2, n-1} * s / sqrt(n)``.

    ``s`` is the sample SD (ddof = 1); NaNs are ignored. n = 1 gives the point as both bounds; n = 0 NaNs.
    """
    x = np.asarray(list(values), dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return (np.nan, np.nan, np.nan)
    mean = float(x.mean())
    if x.size == 1:
        return (mean, mean, mean)
    half = float(stats.t.ppf((1 + level) / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size))
    return (mean, mean - half, mean + half)


def bootstrap_mean_ci(values: Iterable[float], n_boot: int, level: float,
                      rng: np.random.Generator) -> tuple[float, float]:
    """Percentile bootstrap of the mean: resample the values with replacement ``n_boot`` times and take the
    ``(1 -/+ level) / 2`` quantiles of the resampled means. NaNs ignored; no values -> NaNs."""
    x = np.asarray(list(values), dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return (np.nan, np.nan)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return (float(lo), float(hi))


def _mean_ci_columns(cell: pd.DataFrame, col: str, level: float) -> dict[str, float]:
    values = cell[col] if col in cell.columns else []
    mean, lo, hi = mean_ci(values, level)
    return {f"{col}_mean": mean, f"{col}_lo": lo, f"{col}_hi": hi}


def _cell_row(cell: pd.DataFrame, level: float) -> dict[str, Any]:
    row: dict[str, Any] = {"n": len(cell)}
    row |= _mean_ci_columns(cell, "d_ce_rec", level) | _mean_ci_columns(cell, "d_r2", level)
    row["mismatch_rate"] = float(cell["mismatch"].mean())
    row["directional"] = len(cell) == 1
    for role in ("small", "large"):
        tpl = f"tokens_per_latent_{role}"
        row[tpl] = float(cell[tpl].iloc[0]) if tpl in cell.columns else np.nan
        dead = f"dead_frac_{role}"
        row[f"{dead}_mean"] = float(cell[dead].mean()) if dead in cell.columns else np.nan
    for col in SECONDARY_DELTAS:
        row |= _mean_ci_columns(cell, col, level)
    return row


def phase2_table(pairs: pd.DataFrame, level: float = 0.95, bootstrap: int = 0, seed: int = 0) -> pd.DataFrame:
    """One row per ``(k, tokens)``, sorted: ``n`` (complete pairs), ``mean_ci`` of ``d_ce_rec`` and ``d_r2``,
    ``mismatch_rate`` (mean of the per-pair indicator), ``directional`` (n == 1), the cell's context
    (``CELL_CONTEXT``: tokens per latent T / d_sae of each model, each model's mean dead fraction on the eval
    tokens; NaN when the pairs lack the column), ``mean_ci`` of the
    secondary deltas (NaN when a column is absent) and, when ``bootstrap > 0``, the percentile bootstrap
    over seeds ``d_ce_rec_boot_lo/hi`` (each cell's generator is seeded by ``(seed, k, tokens)``).
    """
    columns = [*TABLE_COLUMNS, *CELL_CONTEXT, *(f"{c}_{s}" for c in SECONDARY_DELTAS for s in ("mean", "lo", "hi"))]
    if bootstrap > 0:
        columns += ["d_ce_rec_boot_lo", "d_ce_rec_boot_hi"]
    rows = []
    for (k, tokens), cell in pairs.groupby(CELL_KEY, sort=True):
        row = {"k": k, "tokens": tokens} | _cell_row(cell, level)
        if bootstrap > 0:
            rng = np.random.default_rng([seed, int(k), int(tokens)])
            row["d_ce_rec_boot_lo"], row["d_ce_rec_boot_hi"] = bootstrap_mean_ci(cell["d_ce_rec"], bootstrap,
                                                                                level, rng)
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


# ---------------------------------------------------------------- markdown


def _r3(x: float) -> float:
    """Round to 3 decimals without producing a negative zero."""
    return round(float(x), 3) + 0.0


def format_mean_ci(mean: float, lo: float, hi: float) -> str:
    """``-0.099 [-0.117, -0.082]``: signed mean, unsigned-positive bounds, 3 decimals; NaN -> ``n/a``."""
    if pd.isna(mean):
        return "n/a"
    return f"{_r3(mean):+.3f} [{_r3(lo):.3f}, {_r3(hi):.3f}]"


def phase2_markdown(table: pd.DataFrame, level: float = 0.95) -> str:
    """The ``(k, T)`` table as markdown, like the study's::

        | k | tokens | n | ΔCE_rec mean (95% CI) | ΔR² mean (95% CI) | mismatch rate |
        | 8 | 10M | 4 | -0.099 [-0.117, -0.082] | +0.150 [0.147, 0.153] | 1.00 |

    Rows with n = 1 (``directional``; derived from n when the column is absent) get ``†`` after n and a
    footnote. ``level`` only labels the header.
    """
    pct = f"{level * 100:g}%"
    cols = ["tokens_per_latent_small", "tokens_per_latent_large"]
    per_latent = set(cols) <= set(table.columns) and bool(table[cols].notna().all(axis=None))
    lines = [f"| k | tokens | {'tokens / latent (small, large) | ' if per_latent else ''}n | "
             f"ΔCE_rec mean ({pct} CI) | ΔR² mean ({pct} CI) | mismatch rate |",
             "|---|---|" + ("---|" if per_latent else "") + "---|---|---|---|"]
    directional = table["directional"] if "directional" in table.columns else table["n"] == 1
    for row, flag in zip(table.itertuples(index=False), directional):
        rate = "n/a" if pd.isna(row.mismatch_rate) else f"{row.mismatch_rate:.2f}"
        tpl = f"{row.tokens_per_latent_small:.0f}, {row.tokens_per_latent_large:.0f} | " if per_latent else ""
        lines.append(f"| {row.k} | {format_tokens(int(row.tokens))} | {tpl}{row.n}{'†' if flag else ''} | "
                     f"{format_mean_ci(row.d_ce_rec_mean, row.d_ce_rec_lo, row.d_ce_rec_hi)} | "
                     f"{format_mean_ci(row.d_r2_mean, row.d_r2_lo, row.d_r2_hi)} | {rate} |")
    if directional.any():
        lines += ["", "† n = 1: directional only; the single pair is shown as both bounds (no interval)."]
    return "\n".join(lines) + "\n"


def reference_table() -> pd.DataFrame:
    """The study's published phase-2 aggregate (``data/phase2_seed_table.csv``; see its SOURCE.md), with the
    tokens per latent of its SAEs (``STUDY_D_SAE``: 10M tokens are 610 per latent for pythia-70m, 305 for
    pythia-410m) so that a grid's budgets can be placed beside the study's."""
    with resources.files("proxygap_helpers").joinpath("data/phase2_seed_table.csv").open() as f:
        ref = pd.read_csv(f)
    for role, d_sae in STUDY_D_SAE.items():
        ref[f"tokens_per_latent_{role}"] = ref["tokens"] / d_sae
    return ref


# ---------------------------------------------------------------- sign flip


def _first_crossing(means: np.ndarray) -> tuple[int, str] | None:
    """Index i and direction of the first step where the mean changes sign: ``means[i] < 0 <= means[i+1]``
    ('up') or ``means[i] > 0 >= means[i+1]`` ('down'); None if there is none."""
    for i in range(len(means) - 1):
        a, b = means[i], means[i + 1]
        if a < 0 <= b:
            return i, "up"
        if a > 0 >= b:
            return i, "down"
    return None


def _log_t_star(log_t: np.ndarray, means: np.ndarray) -> float:
    """log10 T* of the first upward zero crossing of ``means`` along ``log_t``, linearly interpolated:
    ``x_i - m_i (x_{i+1} - x_i) / (m_{i+1} - m_i)``. Censored outside the range: ``-inf`` when there is no
    upward crossing and ``means[0] >= 0`` (crossed before the lowest budget), ``+inf`` when all means < 0."""
    for i in range(len(means) - 1):
        a, b = means[i], means[i + 1]
        if a < 0 <= b:
            return float(log_t[i] - a * (log_t[i + 1] - log_t[i]) / (b - a))
    return -np.inf if means[0] >= 0 else np.inf


def _boot_t_star(log_t: np.ndarray, samples: list[np.ndarray], sign: float, n_boot: int, level: float,
                 rng: np.random.Generator) -> tuple[float, float, float]:
    """Percentile interval of T* resampling seeds within each budget; returns (lo, hi, fraction of resamples
    whose crossing lies inside the budget range). Censored resamples count as T* = 0 or inf."""
    boot_means = np.column_stack([s[rng.integers(0, s.size, size=(n_boot, s.size))].mean(axis=1)
                                  for s in samples])
    logs = np.array([_log_t_star(log_t, sign * m) for m in boot_means])
    lo, hi = np.quantile(logs, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
    return float(10.0 ** lo), float(10.0 ** hi), float(np.isfinite(logs).mean())


def _sign_flip_row(cell: pd.DataFrame, n_boot: int, level: float, rng: np.random.Generator) -> dict[str, Any]:
    budgets = sorted(cell["tokens"].unique())
    samples = [cell.loc[cell["tokens"] == t, "d_ce_rec"].dropna().to_numpy(float) for t in budgets]
    budgets = [t for t, s in zip(budgets, samples) if s.size]
    samples = [s for s in samples if s.size]
    row = {"t_star": np.nan, "t_star_lo": np.nan, "t_star_hi": np.nan, "direction": None,
           "boot_frac_in_range": np.nan}
    if len(budgets) < 2:
        return row | {"status": "insufficient data"}
    means, log_t = np.array([s.mean() for s in samples]), np.log10(np.array(budgets, dtype=float))
    crossing = _first_crossing(means)
    if crossing is None:
        return row | {"status": "no crossing in range"}
    sign = 1.0 if crossing[1] == "up" else -1.0
    row |= {"t_star": float(10.0 ** _log_t_star(log_t, sign * means)), "direction": crossing[1],
            "status": "crossing"}
    if n_boot > 0 and min(s.size for s in samples) >= 2:
        row["t_star_lo"], row["t_star_hi"], row["boot_frac_in_range"] = _boot_t_star(
            log_t, samples, sign, n_boot, level, rng)
    return row


def sign_flip(pairs: pd.DataFrame, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Per k, the budget T* where the mean ``d_ce_rec`` (over seeds, per budget) first changes sign between
    consecutive budgets, interpolated linearly in log10(T).

    Columns: ``k, t_star, t_star_lo, t_star_hi, direction`` ('up' = negative -> positive, 'down'),
    ``status`` ('crossing' | 'no crossing in range' | 'insufficient data' = fewer than two budgets),
    ``boot_frac_in_range``. The bounds are a percentile bootstrap (seeds resampled within each budget, the
    generator seeded by ``(seed, k)``), only when every budget has n >= 2, else NaN. A resample without a
    crossing in the observed direction is censored to T* = 0 (its means already past zero at the lowest
    budget) or inf (not yet at the highest), so a bound of 0 or inf means "beyond the tested range".
    """
    rows = [{"k": k} | _sign_flip_row(cell, n_boot, level, np.random.default_rng([seed, int(k)]))
            for k, cell in pairs.groupby("k", sort=True)]
    return pd.DataFrame(rows, columns=["k", "t_star", "t_star_lo", "t_star_hi", "direction", "status",
                                       "boot_frac_in_range"])


# ---------------------------------------------------------------- eval-sampling noise

EVAL_NOISE_COLUMNS = ["k", "tokens", "n", "d_ce_rec_eval_se", "d_ce_rec_seed_sd", "d_ce_rec_seed_se",
                      "eval_to_seed_se"]


def _ce_rec(sae: np.ndarray, clean: np.ndarray, zero: np.ndarray, definition: str) -> np.ndarray:
    """CE_rec from CE sums over the same sequences (the prediction counts cancel in both ratios)."""
    if definition == "relative":
        return 2.0 - sae / clean
    return (zero - sae) / (zero - clean)


def eval_noise(pairs: pd.DataFrame, sequences: pd.DataFrame, definition: str = "relative", n_boot: int = 1000,
               seed: int = 0) -> pd.DataFrame:
    """Per ``(k, T)`` cell: the eval-sampling standard error of the mean ΔCE_rec beside the seed-to-seed spread.

    ``sequences`` is long: one row per (``sae_id``, ``sequence``) with the sequence's summed next-token CE
    ``ce_sae``, ``ce_clean``, ``ce_zero`` (``metrics.evaluate_saes``' ``sequence_sums``). One bootstrap
    replicate draws the eval sequences with replacement -- the *same* draw for both models and every seed of
    the cell, since they share the eval tokens -- and recomputes each SAE's CE_rec from the resampled sums
    (``definition`` as in params: ``relative`` 2 - CE_sae / CE_clean, or ``zero_norm``), each pair's ΔCE_rec
    and their mean over seeds. ``d_ce_rec_eval_se`` is the SD of that mean over ``n_boot`` replicates (the
    cell's generator is seeded by ``(seed, k, T)``); ``d_ce_rec_seed_sd`` the SD of ΔCE_rec over seeds
    (ddof 1) and ``d_ce_rec_seed_se`` = seed SD / sqrt(n): the standard error the CIs use. ``eval_to_seed_se``
    is their ratio (< 1: the eval set is not what limits the cell). A cell with an SAE lacking sequence sums
    gets NaNs. Columns: ``EVAL_NOISE_COLUMNS``.
    """
    if not len(pairs) or not len(sequences):
        return pd.DataFrame(columns=EVAL_NOISE_COLUMNS)
    by_sae = {sid: g.sort_values("sequence") for sid, g in sequences.groupby("sae_id")}
    rows = []
    for (k, tokens), cell in pairs.groupby(CELL_KEY, sort=True):
        n = len(cell)
        seed_sd = float(cell["d_ce_rec"].std(ddof=1)) if n > 1 else np.nan
        row = {"k": k, "tokens": tokens, "n": n, "d_ce_rec_eval_se": np.nan, "d_ce_rec_seed_sd": seed_sd,
               "d_ce_rec_seed_se": seed_sd / np.sqrt(n)}
        ids = [*cell["sae_id_small"], *cell["sae_id_large"]]
        if all(i in by_sae for i in ids) and len({len(by_sae[i]) for i in ids}) == 1:
            arrays = {c: np.stack([by_sae[i][c].to_numpy(float) for i in ids], 1)
                      for c in ("ce_sae", "ce_clean", "ce_zero")}  # [n_seq, 2n]: small seeds, then large
            n_seq = arrays["ce_sae"].shape[0]
            rng = np.random.default_rng([seed, int(k), int(tokens)])
            weights = rng.multinomial(n_seq, np.full(n_seq, 1.0 / n_seq), size=n_boot).astype(float)
            rec = _ce_rec(*(weights @ arrays[c] for c in ("ce_sae", "ce_clean", "ce_zero")), definition)
            d = rec[:, n:] - rec[:, :n]
            row["d_ce_rec_eval_se"] = float(d.mean(1).std(ddof=1))
        row["eval_to_seed_se"] = row["d_ce_rec_eval_se"] / row["d_ce_rec_seed_se"] if n > 1 else np.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=EVAL_NOISE_COLUMNS)
