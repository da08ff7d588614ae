"""Figures of the report: each function takes aggregate frames and returns a ``matplotlib.figure.Figure``.

Figures are built with ``matplotlib.figure.Figure`` directly, not through ``pyplot``: nothing is registered
in pyplot's global figure list (so a notebook shows a figure once, when it is displayed or is the cell's
value, and ``plt.close(fig)`` is harmless), and no function changes rcParams. The one global step is
``set_theme()``, which a notebook calls once at the top.

Every function tolerates empty frames, missing optional columns, NaN values and n = 1 cells: what cannot
be drawn is shown as a "pending" note in the panel rather than raising. Each figure carries its caption as
``fig.proxygap_caption`` (also drawn under the figure when ``caption=True``); ``CAPTIONS`` holds the texts.
"""

from __future__ import annotations

import math
import textwrap
from typing import Any, Iterable, Sequence

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import NullLocator

from proxygap_helpers.params import TWO_ROLES
from proxygap_helpers.stats import mean_ci

TOKENS_LABEL = "SAE training tokens (log scale)"
ROLE_COLORS = {"small": "#0072B2", "large": "#D55E00"}
SCHEME_MARKERS = {"leave-one-budget-out": "o", "leave-one-k-out": "^"}
MISMATCH_COLOR = "#d62728"
PENDING_COLOR = "0.45"

METRIC_LABELS = {
    "ce_rec": "CE_rec (relative; 1 = clean CE)",
    "ce_rec_relative": "CE_rec (relative; 1 = clean CE)",
    "ce_rec_zero_norm": "CE_rec (zero-ablation normalised)",
    "r2": "R² (fraction of variance explained)",
    "cosine": "cosine(x, x̂)",
    "rel_err_norm": "‖x − x̂‖ / ‖x‖",
    "kl": "KL(clean ‖ patched) (nats/token)",
    "swd": "SWD (nats/token)",
    "l0": "L0 (active latents/token)",
    "dead_frac": "dead latent fraction",
    "gwd": "GWD E[(gᵀe)²] (nats²/prediction)",
    "nmse": "NMSE Σ‖x − x̂‖² / Σ‖x‖²",
    "random_error_ratio": "KL(SAE error) / KL(random error)",
    "pr_recon": "participation ratio of x̂",
    "pr_recon_frac": "PR(x̂) / PR(x) (dimensionality kept)",
}
PROXY_LABELS = {
    "d_r2": "ΔR²",
    "d_cosine": "Δcosine",
    "d_rel_err_norm": "Δrel. error norm",
    "d_kl": "ΔKL (behavioural reference)",
    "d_swd": "ΔSWD (pullback proxy)",
    "d_dead_frac": "Δdead-latent fraction",
    "d_gwd": "ΔGWD (first-order gradient-weighted)",
    "d_nmse": "ΔNMSE (scale-free error)",
    "d_random_error_ratio": "Δrandom-error ratio (behavioural reference)",
    "d_dim": "Δdim (PR share kept, D3)",
}

CAPTIONS = {
    "sign_flip": (
        "Paired gaps (large − small) against the SAE training budget, one column per k. Lines: mean over seeds "
        "with its 95% Student-t interval (band); hollow markers: cells with n = 1 (directional only, no "
        "interval); dots: individual seeds (jittered slightly along log x); grey 'pending' marks a budget "
        "without a complete pair. Red bands: budgets where the mismatch rate (share of seeds with ΔR² > 0 "
        "while ΔCE_rec < 0) is above 0, darker = higher rate. Dashed line: T*, the budget where mean ΔCE_rec "
        "changes sign (interpolated in log T), with its seed-bootstrap interval shaded grey when available. The "
        "top axis gives the same budget in tokens per latent of the large model's SAE (T / d_sae), the scale on "
        "which budgets compare across SAE widths: the study's lowest budget, 10M, is 305 for pythia-410m."),
    "sign_flip_curves": (
        " Thin lines: the gap between the two models' fitted saturating curves y(T) = y∞ − a·T^−α (solid over the "
        "tested budgets, dashed past them) with its 95% seed-bootstrap band; ◆ on the zero line: T* where the "
        "fitted gap changes sign, the bar its bootstrap interval (an arrow: open-ended)."),
    "sign_flip_note": (
        " The note in the corner of each panel says what the budget-curve fit says (T*, no crossing, or why it "
        "cannot be said)."),
    "per_model_curves": (
        " Thin lines: each model's fitted saturating curve y(T) = y∞ − a·T^−α, solid over the tested budgets and "
        "dashed for one decade past them."),
    "per_model": (
        "Per-model SAE quality against the SAE training budget. Colour: model role; line style and marker: k. "
        "Points are means over seeds; error bars are 95% Student-t intervals (none when n = 1). Markers are "
        "offset slightly along log x per k so that bars do not overlap."),
    "leaderboard": (
        "Held-out prediction of ΔCE_rec from each proxy's delta (a line fitted on the other cells, "
        "leave-one-budget-out ● and leave-one-k-out ▲). Dashed diagonal: perfect prediction; grey lines: "
        "zero, so points in the off-diagonal quadrants have the wrong sign. Titles: MAE and sign accuracy of the "
        "pooled scheme, and whether the proxy beats ΔR² (95% CI of the MAE gain above 0)."),
    "ladder": (
        "The paired gaps of every setting against its size ratio (non-embedding parameters of the larger model of "
        "the pair over the smaller's, log scale): one column per k, one colour per SAE budget, one line style and "
        "marker per hook. Points are each pair's cell mean over seeds, bars its 95% Student-t interval. A line "
        "that falls to the right: the bigger the step in size, the more the larger model's SAEs lose at that "
        "budget."),
    "families": (
        "The paired gaps (large − small) of each family's pair against the SAE training budget, one column per k: "
        "the same sizes, text, tokenizer, training recipe and SAE grid in every family, only the architecture "
        "differs. Lines: each cell's mean over seeds; bands: its 95% Student-t interval."),
    "decomposition": (
        "What each cell's gap (large − small) is made of, one column per k, ΔCE_rec above and ΔR² below, one bar per "
        "tested budget: the asymptotic term Δy∞ (the gap an unlimited budget leaves: intrinsic), the "
        "optimisation term (the fitted gap at T minus Δy∞: what more training removes) and the lack of fit "
        "(observed minus fitted), stacked with their signs (positive parts upwards, negative downwards from 0). ◆: "
        "the observed mean gap with ±1.96 × the estimation noise (seed and eval-sampling SE). A cell that is not "
        "'no mismatch' has its verdict over its bar (noise: within noise; optim.: optimisation-mediated; METRIC: "
        "metric mismatch; n/a: cannot be said, the fit refused, only the observed gap shown)."),
    "reference": (
        "Our phase-2 table beside the study's published one (Pythia-70M vs 410M): mean gaps with 95% "
        "intervals per k against the SAE training budget; hollow markers: n = 1 (directional)."),
}


# ---------------------------------------------------------------- theme and small helpers


def set_theme(context: str = "notebook") -> None:
    """The report's seaborn theme (white grid, colour-blind palette, readable sizes). Global: call once."""
    sns.set_theme(context=context, style="whitegrid", palette="colorblind", font="DejaVu Sans",
                  rc={"figure.dpi": 100, "savefig.dpi": 110, "axes.titlesize": "medium",
                      "axes.titleweight": "bold", "legend.frameon": False, "axes.spines.top": False,
                      "axes.spines.right": False, "grid.linewidth": 0.6})
    enable_notebook_display()


def format_tokens(x: float) -> str:
    """1e7 -> '10M', 3.16e7 -> '31.6M', 2.5e5 -> '250k', NaN -> 'n/a'."""
    if x is None or not np.isfinite(x):
        return "n/a" if x is None or np.isnan(x) else ("∞" if x > 0 else "-∞")
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def _col(df: pd.DataFrame | None, name: str) -> pd.Series:
    """``df[name]`` as float, or all-NaN when the frame or the column is absent."""
    if df is None or name not in df.columns:
        return pd.Series(np.nan, index=(df.index if df is not None else pd.RangeIndex(0)), dtype=float)
    return pd.to_numeric(df[name], errors="coerce").astype(float)


def _frame(df: pd.DataFrame | None) -> pd.DataFrame:
    return df.copy() if df is not None else pd.DataFrame()


def _new_figure(nrows: int, ncols: int, panel: tuple[float, float], legend: float = 0.0,
                **kw: Any) -> tuple[Figure, np.ndarray]:
    """A constrained-layout figure of ``nrows x ncols`` panels of size ``panel`` (inches), ``legend`` inches
    wider for a legend outside on the right, and room under the panels for the caption."""
    fig = Figure(figsize=(max(panel[0] * ncols, 6.0) + legend, panel[1] * nrows + 1.3), layout="constrained")
    axes = np.atleast_2d(fig.subplots(nrows, ncols, squeeze=False, **kw))
    return fig, axes


def _pending(ax: Axes, text: str = "pending: no data yet") -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color=PENDING_COLOR,
            fontsize="large", style="italic", wrap=True)


def _pending_figure(name: str, title: str, caption: bool, text: str = "pending: no complete pairs yet",
                    size: tuple[float, float] = (5.0, 3.5)) -> Figure:
    """A one-panel figure that only says what is pending (a figure with nothing to draw yet)."""
    fig, axes = _new_figure(1, 1, size)
    _pending(axes[0, 0], text)
    return _finish(fig, name, title, caption)


def enable_notebook_display() -> bool:
    """Make IPython show a ``Figure`` (that is the value of a cell or passed to ``display``) as a PNG.

    The inline backend registers that formatter only once pyplot has created a figure; these figures
    bypass pyplot, so the first one of a session would otherwise print as ``<Figure size ...>``. Does nothing
    outside IPython or when a formatter is already registered. Returns True when figures will display."""
    try:
        from IPython import get_ipython
        from IPython.core.pylabtools import print_figure
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None or not hasattr(shell, "display_formatter"):
        return False
    png = shell.display_formatter.formatters["image/png"]
    try:
        png.lookup_by_type(Figure)
    except KeyError:
        png.for_type(Figure, lambda fig: print_figure(fig, "png", bbox_inches="tight"))
    return True


def _finish(fig: Figure, name: str, title: str, caption: bool, extra: Sequence[str] = ()) -> Figure:
    enable_notebook_display()
    fig.suptitle(title, fontweight="bold")
    fig.proxygap_caption = CAPTIONS[name] + "".join(CAPTIONS[e] for e in extra)  # type: ignore[attr-defined]
    if caption:
        width_chars = max(60, int(fig.get_figwidth() * 100 / 7.5))
        text = textwrap.fill(fig.proxygap_caption, width_chars)
        lines = text.count("\n") + 1
        height = fig.get_figheight()
        bottom = min(0.4, (lines * 0.16 + 0.15) / height)
        fig.get_layout_engine().set(rect=(0, bottom, 1, 1 - bottom))
        fig.text(0.01, bottom - 0.02 / height, text, ha="left", va="top", fontsize=8, color="0.25")
    return fig


def _log_jitter(n: int, key: Iterable[Any], dex: float = 0.025) -> np.ndarray:
    """Deterministic multiplicative jitter ``10**u``, u uniform in [-dex, dex], seeded by ``key``."""
    seed = [abs(int(v)) % (2**32) for v in key]
    return 10.0 ** np.random.default_rng(seed).uniform(-dex, dex, size=n)


def _budget_halfwidth(budgets: Sequence[float]) -> float:
    """Half-width (in dex) of a band around a budget: a third of the smallest gap, at most 0.15 dex."""
    logs = np.log10(np.asarray(sorted(set(budgets)), dtype=float))
    gaps = np.diff(logs)
    return float(min(0.15, gaps.min() / 3)) if gaps.size else 0.15


def _set_log_x(ax: Axes, budgets: Sequence[float]) -> None:
    ax.set_xscale("log")
    budgets = [b for b in budgets if np.isfinite(b) and b > 0]
    if budgets:
        lo, hi = min(budgets), max(budgets)
        pad = 10 ** max(0.25, 0.08 * np.log10(hi / lo))
        ax.set_xlim(lo / pad, hi * pad)
        ax.set_xticks(sorted(set(budgets)))
        ax.set_xticklabels([format_tokens(b) for b in sorted(set(budgets))], fontsize="small")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


# ---------------------------------------------------------------- sign flip


def _plot_gap_row(ax: Axes, cells: pd.DataFrame, seeds: pd.DataFrame, metric: str, k: Any,
                  color: str) -> None:
    """Mean line, CI band, hollow n = 1 markers and jittered seed points for one k and one delta."""
    if len(seeds) and f"d_{metric}" in seeds.columns:
        y = _col(seeds, f"d_{metric}").to_numpy()
        x = seeds["tokens"].to_numpy(float) * _log_jitter(len(seeds), [int(k), len(metric)])
        ax.scatter(x, y, s=14, color=color, alpha=0.45, linewidths=0, zorder=3)
    if not len(cells):
        return
    x = cells["tokens"].to_numpy(float)
    mean = _col(cells, f"d_{metric}_mean").to_numpy()
    lo, hi = _col(cells, f"d_{metric}_lo").to_numpy(), _col(cells, f"d_{metric}_hi").to_numpy()
    ok = np.isfinite(mean)
    if not ok.any():
        return
    ax.plot(x[ok], mean[ok], color=color, lw=1.8, zorder=4)
    band = ok & np.isfinite(lo) & np.isfinite(hi)
    if band.any():
        ax.fill_between(x[band], lo[band], hi[band], color=color, alpha=0.18, lw=0, zorder=2)
    single = _col(cells, "n").to_numpy() == 1
    ax.scatter(x[ok & ~single], mean[ok & ~single], s=36, color=color, zorder=5)
    ax.scatter(x[ok & single], mean[ok & single], s=40, facecolors="white", edgecolors=color, linewidths=1.5,
               zorder=5)


def sign_flip_figure(pairs: pd.DataFrame | None, table: pd.DataFrame | None, sign_flip: pd.DataFrame | None,
                     caption: bool = True, curves: pd.DataFrame | None = None,
                     tstar: pd.DataFrame | None = None) -> Figure:
    """ΔCE_rec (top row) and ΔR² (bottom row) against the budget, one column per k (see ``CAPTIONS``). With
    ``curves`` / ``tstar`` (``aggregate/budget_curves.csv`` / ``tstar.csv``) also the fitted gap, its band,
    the fitted T* and what the fit says, with the x axis extended past the data as far as they need."""
    pairs, table, flips = _frame(pairs), _frame(table), _frame(sign_flip)
    curves, tstar = _frame(curves), _frame(tstar)
    ks = sorted({*pairs.get("k", pd.Series(dtype=float)).dropna().astype(int),
                 *table.get("k", pd.Series(dtype=float)).dropna().astype(int)})
    title = "Behavioural gap vs reconstruction proxy across SAE training budgets"
    if not ks:
        fig, axes = _new_figure(1, 1, (6.0, 3.2))
        _pending(axes[0, 0], "pending: no complete small/large pairs yet")
        axes[0, 0].set(xlabel=TOKENS_LABEL, ylabel="ΔCE_rec (large − small)")
        return _finish(fig, "sign_flip", title, caption)

    budgets = sorted({*pairs.get("tokens", pd.Series(dtype=float)).dropna().astype(float),
                      *table.get("tokens", pd.Series(dtype=float)).dropna().astype(float)})
    half = _budget_halfwidth(budgets)
    fig, axes = _new_figure(2, len(ks), (4.2, 3.0), legend=3.4, sharex=True, sharey="row")
    rows = (("ce_rec", "ΔCE_rec (large − small)", "C0"), ("r2", "ΔR² (large − small)", "C2"))
    any_mismatch = any_single = any_tstar = any_band = any_pending = False
    for j, k in enumerate(ks):
        cells = table[table["k"] == k].sort_values("tokens") if "k" in table else table
        seeds = pairs[pairs["k"] == k] if "k" in pairs else pairs
        seen = set(cells["tokens"].astype(float)) if "tokens" in cells else set()
        if len(seeds):
            seen |= set(seeds["tokens"].astype(float))
        flip = flips[flips["k"] == k].iloc[0] if "k" in flips and (flips["k"] == k).any() else None
        for i, (metric, ylabel, color) in enumerate(rows):
            ax = axes[i, j]
            ax.axhline(0.0, color="0.15", lw=0.9, zorder=1)
            rates = _col(cells, "mismatch_rate").to_numpy()
            for t, rate in zip(cells.get("tokens", []), rates):
                if np.isfinite(rate) and rate > 0:
                    ax.axvspan(t / 10**half, t * 10**half, color=MISMATCH_COLOR, alpha=0.08 + 0.22 * rate,
                               lw=0, zorder=0)
                    any_mismatch = True
            _plot_gap_row(ax, cells, seeds, metric, k, color)
            any_single |= bool((_col(cells, "n").to_numpy() == 1).any())
            for t in budgets:
                if t not in seen:
                    ax.text(t, 0.03, "pending", transform=ax.get_xaxis_transform(), rotation=90, ha="center",
                            va="bottom", fontsize=8, color=PENDING_COLOR, style="italic")
                    any_pending = True
            if flip is not None and np.isfinite(_num(flip.get("t_star"))) and _num(flip.get("t_star")) > 0:
                t_star = _num(flip["t_star"])
                lo, hi = _num(flip.get("t_star_lo")), _num(flip.get("t_star_hi"))
                if not (np.isnan(lo) or np.isnan(hi)):  # censored bounds (0 / inf) run to the panel edge
                    a = max(lo, budgets[0] / 10**0.6)
                    b = min(hi, budgets[-1] * 10**0.6)
                    ax.axvspan(a, b, color="0.5", alpha=0.15, lw=0, zorder=0)
                    any_band = True
                ax.axvline(t_star, color="0.2", ls="--", lw=1.2, zorder=4)
                any_tstar = True
                if i == 0:
                    interval = ("" if np.isnan(lo) or np.isnan(hi)
                                else f" [{format_tokens(lo)}, {format_tokens(hi)}]")
                    ax.annotate(f"T* = {format_tokens(t_star)}{interval}", (t_star, 0.97),
                                xycoords=ax.get_xaxis_transform(), ha="left", va="top", fontsize=8,
                                xytext=(3, 0), textcoords="offset points")
            if i == 0:
                status = "" if flip is None else f" ({flip.get('status')})" if flip.get("status") != "crossing" else ""
                ax.set_title(f"k = {k}{status}")
            if j == 0:
                ax.set_ylabel(ylabel)
            _set_log_x(ax, budgets)
            if i == 1:
                ax.set_xlabel(TOKENS_LABEL)
    fitted, marked = _draw_fits(axes, ks, [r[0] for r in rows], [r[2] for r in rows], budgets, curves, tstar)
    _tokens_per_latent_axes(axes[0], table)
    handles = [Line2D([], [], color="C0", lw=1.8, marker="o", label="mean ΔCE_rec ± 95% CI"),
               Line2D([], [], color="C2", lw=1.8, marker="o", label="mean ΔR² ± 95% CI"),
               Line2D([], [], color="0.4", lw=0, marker="o", alpha=0.5, markersize=4, label="one seed (pair)")]
    if any_single:
        handles.append(Line2D([], [], color="0.3", lw=0, marker="o", markerfacecolor="white",
                              label="n = 1 (directional)"))
    if any_mismatch:
        handles.append(Patch(color=MISMATCH_COLOR, alpha=0.25, label="mismatch rate > 0 (ΔR² > 0, ΔCE_rec < 0)"))
    if any_tstar:
        handles.append(Line2D([], [], color="0.2", ls="--", label="T* (sign change of mean ΔCE_rec)"))
    if any_band:
        handles.append(Patch(color="0.5", alpha=0.25, label="T* bootstrap 95% interval"))
    if any_pending:
        handles.append(Line2D([], [], lw=0, label="'pending' = no complete pair at that budget"))
    if fitted:
        handles += [Line2D([], [], color="0.3", lw=1.0, label="fitted gap (saturating law per model)"),
                    Line2D([], [], color="0.3", lw=1.0, ls="--", label="… extrapolated past the data")]
    if marked:
        handles.append(Line2D([], [], color="0.1", lw=0, marker="D", markersize=5, label="T* of the fitted gap ± 95%"))
    fig.legend(handles=handles, loc="outside right center", fontsize="small")
    extra = (("sign_flip_curves",) if fitted else ()) + (("sign_flip_note",) if len(tstar) else ())
    return _finish(fig, "sign_flip", title, caption, extra=extra)


def _tokens_per_latent_axes(top_row: Sequence[Axes], table: pd.DataFrame) -> None:
    """A second x axis above the top row: the budget in tokens per latent of the large model's SAE (T / d_sae),
    the scale on which budgets compare across SAE widths (the study's lowest budget is 305 for pythia-410m)."""
    per = _col(table, "tokens_per_latent_large").to_numpy()
    tokens = _col(table, "tokens").to_numpy()
    ok = np.isfinite(per) & (per > 0)
    if not ok.any():
        return
    d_sae = float(np.median(tokens[ok] / per[ok]))
    for j, ax in enumerate(top_row):
        sec = ax.secondary_xaxis("top", functions=(lambda t: t / d_sae, lambda v: v * d_sae))
        _plain_ticks(sec, ax.get_xticks() / d_sae)
        sec.tick_params(labelsize="small")
        if j == 0:
            sec.set_xlabel("tokens per latent, large model (T / d_sae)", fontsize="small")


def _plain_ticks(sec: Axes, ticks: Sequence[float]) -> None:
    """Fixed ticks with plain labels ('30', '305', '2.44k') on a secondary x axis, under the primary's ticks, and
    no minor ticks: its log formatter would label minor ticks on a span under a decade ('3×10⁴', '4×10⁴'),
    and those labels run into each other."""
    ticks = [float(v) for v in ticks if np.isfinite(v) and v > 0]
    sec.set_xticks(ticks, [format_tokens(v) for v in ticks])
    sec.xaxis.set_minor_locator(NullLocator())


def _fit_note(row: pd.Series | None) -> str:
    """What the fit says about T*, in a few words, for a panel corner."""
    if row is None:
        return ""
    status = str(row.get("status"))
    if status in ("in range", "extrapolated"):
        lo, hi = _num(row.get("t_star_lo")), _num(row.get("t_star_hi"))
        interval = "" if np.isnan(lo) else f" [{format_tokens(lo)}, {format_tokens(hi)}]"
        where = "" if status == "in range" else f", {_num(row.get('factor_beyond')):.3g}x past data"
        return f"fit: T* ≈ {format_tokens(_num(row.get('t_star')))}{interval}{where}"
    if status == "cannot be said":  # "small model: not monotone: ..." -> "small model: not monotone"
        short = [": ".join(part.split(": ")[:2]).split(" (")[0] for part in str(row.get("reason", "")).split("; ")]
        return "fit: cannot be said\n" + "\n".join(textwrap.shorten(p, 48, placeholder="…") for p in short)
    limit, factor = _num(row.get("gap_inf")), _num(row.get("search_max")) / _num(row.get("tokens_max"))
    return (f"fit: no crossing within {factor:.3g}x\n(limit gap {limit:+.3f})" if np.isfinite(limit)
            else f"fit: {status}")


def _fit_right_edge(budgets: Sequence[float], tstar: pd.DataFrame) -> float:
    """How far right the sign-flip panels go: a decade past the data, or past the largest finite fitted T*
    (or its upper bound) when that lies further out, at most to the end of the T* search range."""
    top = max(budgets)
    right = top * 10
    if len(tstar) and "t_star" in tstar:
        far = pd.concat([_col(tstar, "t_star"), _col(tstar, "t_star_hi")])
        far = far[np.isfinite(far)]
        if len(far):
            right = max(right, 2 * float(far.max()))
        right = min(right, float(_col(tstar, "search_max").max()) if _col(tstar, "search_max").notna().any()
                    else right)
    return max(right, top * 3)


def _draw_fits(axes: np.ndarray, ks: Sequence[int], metrics: Sequence[str], colors: Sequence[str],
               budgets: Sequence[float], curves: pd.DataFrame, tstar: pd.DataFrame) -> tuple[bool, bool]:
    """The fitted gaps (solid over the data, dashed past it, bootstrap band), the fitted T* marker with its
    interval and a note per panel on what the fit says; the x axis is extended past the data and each row's
    y range kept to the data and the fitted lines (a far band does not stretch it). Returns (a curve was
    drawn, a T* marker was drawn)."""
    has_curves = len(curves) and {"k", "metric", "series", "tokens", "fit", "extrapolated"} <= set(curves.columns)
    has_tstar = len(tstar) and {"k", "metric", "status"} <= set(tstar.columns)
    if not budgets or not (has_curves or has_tstar):
        return False, False
    gaps = curves[curves["series"] == "gap"] if has_curves else pd.DataFrame()
    right = _fit_right_edge(budgets, tstar) if len(gaps) else max(budgets)
    drawn = marked = False
    for i, (metric, color) in enumerate(zip(metrics, colors)):
        lo_y, hi_y = axes[i, 0].get_ylim()
        for j, k in enumerate(ks):
            ax = axes[i, j]
            row = None
            if has_tstar:
                hit = tstar[(tstar["k"] == k) & (tstar["metric"] == metric)]
                row = hit.iloc[0] if len(hit) else None
            g = gaps[(gaps["k"] == k) & (gaps["metric"] == metric) & (gaps["tokens"] <= right * 1.001)] \
                if len(gaps) else gaps
            if len(g):
                drawn = True
                g = g.sort_values("tokens")
                x, fit = g["tokens"].to_numpy(float), _col(g, "fit").to_numpy()
                lo, hi = _col(g, "lo").to_numpy(), _col(g, "hi").to_numpy()
                past = g["extrapolated"].astype(bool).to_numpy()
                join = np.r_[~past[:-1] & past[1:], False]  # the last point over the data starts the dashed part
                ax.plot(x[~past], fit[~past], color=color, lw=1.0, alpha=0.9, zorder=3)
                ax.plot(x[past | join], fit[past | join], color=color, lw=1.0, ls="--", alpha=0.9, zorder=3)
                band = np.isfinite(lo) & np.isfinite(hi)
                ax.fill_between(x[band], lo[band], hi[band], color=color, alpha=0.10, lw=0, zorder=1)
                lo_y, hi_y = min(lo_y, float(np.nanmin(fit))), max(hi_y, float(np.nanmax(fit)))
            if row is not None and np.isfinite(_num(row.get("t_star"))):
                marked = True
                _tstar_marker(ax, row, budgets[0], right)
            if (note := _fit_note(row)):
                ax.text(0.98, 0.03, note, transform=ax.transAxes, ha="right", va="bottom", fontsize=7,
                        color="0.2", zorder=8, bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.8))
            if len(gaps):
                ax.set_xlim(ax.get_xlim()[0], right)
                _extra_ticks(ax, budgets, right)
        pad = 0.05 * (hi_y - lo_y) if hi_y > lo_y else 0.01
        axes[i, 0].set_ylim(lo_y - pad, hi_y + pad)
    return drawn, marked


def _tstar_marker(ax: Axes, row: pd.Series, left: float, right: float) -> None:
    """◆ at (T*, 0) and its bootstrap interval as a bar (an arrow head where it runs past the panel)."""
    t, a, b = _num(row["t_star"]), _num(row.get("t_star_lo")), _num(row.get("t_star_hi"))
    if np.isfinite(a) or np.isfinite(b):
        a = max(a, left) if np.isfinite(a) else left
        style = "|-|" if b <= right else "]->"
        ax.annotate("", (min(b, right), 0), (a, 0), zorder=6,
                    arrowprops=dict(arrowstyle=style, color="0.1", lw=1.0, shrinkA=0, shrinkB=0))
    ax.plot([t], [0], marker="D", color="0.1", markersize=5, zorder=7)


def _extra_ticks(ax: Axes, budgets: Sequence[float], right: float) -> None:
    """Tick labels at the tested budgets plus powers of ten past them (the extrapolated part)."""
    top = max(budgets)
    extra = [10.0 ** e for e in range(int(np.floor(np.log10(top))) + 1, int(np.floor(np.log10(right))) + 1)
             if 10.0 ** e > top * 1.5]
    ticks = sorted(set(budgets)) + extra
    ax.set_xticks(ticks)
    ax.set_xticklabels([format_tokens(t) for t in ticks], fontsize="small")


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


# ---------------------------------------------------------------- per model


def _summarise(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean and 95% t-interval of ``metric`` over seeds per (model_role, k, tokens)."""
    rows = []
    for (role, k, tokens), g in df.groupby(["model_role", "k", "tokens"], sort=True):
        mean, lo, hi = mean_ci(_col(g, metric))
        rows.append({"model_role": role, "k": k, "tokens": float(tokens), "mean": mean, "lo": lo, "hi": hi,
                     "n": int(_col(g, metric).notna().sum())})
    return pd.DataFrame(rows, columns=["model_role", "k", "tokens", "mean", "lo", "hi", "n"])


def per_model_figure(sae_metrics: pd.DataFrame | None, metrics: Sequence[str] = ("ce_rec", "r2"),
                     caption: bool = True, curves: pd.DataFrame | None = None) -> Figure:
    """One panel per metric: per-role means over seeds (error bars: 95% t-intervals) against the budget;
    colour = model role, line style / marker = k. With ``curves`` (``aggregate/budget_curves.csv``) each
    accepted fitted curve too, dashed for one decade past the data."""
    df = _frame(sae_metrics)
    curves = _frame(curves)
    fitted = False
    fig, axes = _new_figure(1, len(metrics), (5.2, 3.6), legend=1.4)
    title = "SAE quality per model against the training budget"
    needed = {"model_role", "k", "tokens"}
    ks = sorted(df["k"].dropna().astype(int).unique()) if needed <= set(df.columns) else []
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v", "P"]
    budgets = sorted(df["tokens"].dropna().astype(float).unique()) if "tokens" in df else []
    offsets = {k: 10 ** (0.02 * (i - (len(ks) - 1) / 2)) for i, k in enumerate(ks)}
    roles = [r for r in TWO_ROLES if "model_role" in df and (df["model_role"] == r).any()]
    roles += sorted(set(df.get("model_role", pd.Series(dtype=str)).dropna()) - set(roles))
    for ax, metric in zip(axes[0], metrics):
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.set_xlabel(TOKENS_LABEL)
        ax.set_title(METRIC_LABELS.get(metric, metric).split(" (")[0] + " per model")
        if not needed <= set(df.columns) or metric not in df.columns or _col(df, metric).isna().all():
            _pending(ax, f"pending: no {metric} values yet")
            ax.set_xscale("log")
            continue
        summary = _summarise(df[df[metric].notna()], metric)
        for role in roles:
            for i, k in enumerate(ks):
                s = summary[(summary["model_role"] == role) & (summary["k"] == k)].sort_values("tokens")
                if s.empty:
                    continue
                x = s["tokens"].to_numpy() * offsets[k]
                err = np.vstack([s["mean"] - s["lo"], s["hi"] - s["mean"]])
                ax.errorbar(x, s["mean"], yerr=np.nan_to_num(err), color=ROLE_COLORS.get(role, f"C{i}"),
                            ls=styles[i % len(styles)], marker=markers[i % len(markers)], ms=5, lw=1.5,
                            capsize=3, label=f"{role}, k={k}")
                fitted |= _draw_role_curve(ax, curves, metric, role, k, max(budgets) * 10,
                                           ROLE_COLORS.get(role, f"C{i}"))
        _set_log_x(ax, budgets)
        if fitted:
            ax.set_xlim(ax.get_xlim()[0], max(budgets) * 10 ** 1.05)
            _extra_ticks(ax, budgets, max(budgets) * 10)
    handles = [Line2D([], [], color=ROLE_COLORS.get(r, "0.3"), lw=2, label=f"{r} model") for r in roles]
    handles += [Line2D([], [], color="0.3", ls=styles[i % len(styles)], marker=markers[i % len(markers)],
                       label=f"k = {k}") for i, k in enumerate(ks)]
    if fitted:
        handles.append(Line2D([], [], color="0.3", lw=0.9, ls="--", label="fitted curve, past the data"))
    if handles:
        fig.legend(handles=handles, loc="outside right center", fontsize="small", title="role / k")
    return _finish(fig, "per_model", title, caption, extra=("per_model_curves",) if fitted else ())


def _draw_role_curve(ax: Axes, curves: pd.DataFrame, metric: str, role: str, k: int, right: float,
                     color: str) -> bool:
    """One role's fitted curve at one k: thin, solid over the data and dashed past it up to ``right``."""
    if not len(curves) or not {"k", "metric", "series", "tokens", "fit", "extrapolated"} <= set(curves.columns):
        return False
    c = curves[(curves["k"] == k) & (curves["metric"] == metric) & (curves["series"] == role)
               & (curves["tokens"] <= right * 1.001)].sort_values("tokens")
    if c.empty:
        return False
    x, y, past = c["tokens"].to_numpy(float), _col(c, "fit").to_numpy(), c["extrapolated"].astype(bool).to_numpy()
    join = np.r_[~past[:-1] & past[1:], False]  # the last point over the data starts the dashed part
    ax.plot(x[~past], y[~past], color=color, lw=0.9, alpha=0.7, zorder=2)
    ax.plot(x[past | join], y[past | join], color=color, lw=0.9, ls="--", alpha=0.7, zorder=2)
    return True


# ---------------------------------------------------------------- leaderboard


def _board_row(board: pd.DataFrame, proxy: str) -> pd.Series | None:
    if board.empty or not {"scheme", "proxy"} <= set(board.columns):
        return None
    rows = board[board["proxy"] == proxy]
    for scheme in ("pooled", *SCHEME_MARKERS):
        hit = rows[(rows["scheme"] == scheme) & _col(rows, "mae").notna()]
        if len(hit):
            return hit.iloc[0]
    return None


def _proxy_order(preds: pd.DataFrame, board: pd.DataFrame) -> list[str]:
    proxies = list(dict.fromkeys(preds["proxy"])) if "proxy" in preds else []
    def key(p: str) -> tuple[float, int]:
        row = _board_row(board, p)
        mae = _num(row["mae"]) if row is not None else np.nan
        return (mae if np.isfinite(mae) else np.inf, proxies.index(p))
    return sorted(proxies, key=key)


def _panel_limits(sub: pd.DataFrame) -> tuple[float, float]:
    """Square limits of one held-out panel: its own actual and predicted values and 0, with an 8% margin, so
    that an outlier of one proxy does not squash the other panels."""
    vals = np.concatenate([_col(sub, "actual").to_numpy(), _col(sub, "predicted").to_numpy()])
    vals = vals[np.isfinite(vals)]
    lo, hi = min(float(vals.min(initial=0.0)), 0.0), max(float(vals.max(initial=0.0)), 0.0)
    pad = 0.08 * (hi - lo) if hi > lo else 1e-3
    return lo - pad, hi + pad


def leaderboard_figure(predictions: pd.DataFrame | None, leaderboard: pd.DataFrame | None,
                       caption: bool = True, max_cols: int = 3) -> Figure:
    """Held-out predicted vs actual ΔCE_rec, one panel per proxy (ordered by pooled MAE), both schemes
    distinguished by marker; identity and zero lines; MAE and sign accuracy in each title. Each panel has its
    own (square) limits, from its own points and 0."""
    preds, board = _frame(predictions), _frame(leaderboard)
    title = "Held-out prediction of ΔCE_rec from each proxy"
    ok = {"proxy", "actual", "predicted"} <= set(preds.columns)
    if ok:
        preds = preds[_col(preds, "actual").notna() & _col(preds, "predicted").notna()]
    if not ok or preds.empty:
        fig, axes = _new_figure(1, 1, (6.0, 3.4))
        _pending(axes[0, 0], "pending: no held-out predictions yet\n(needs >= 2 cells per scheme)")
        axes[0, 0].set(xlabel="actual ΔCE_rec (held out)", ylabel="predicted ΔCE_rec")
        return _finish(fig, "leaderboard", title, caption)
    proxies = _proxy_order(preds, board)
    ncols = min(max_cols, len(proxies))
    nrows = math.ceil(len(proxies) / ncols)
    fig, axes = _new_figure(nrows, ncols, (3.8, 3.6), legend=2.0)
    schemes = [s for s in dict.fromkeys(preds.get("scheme", pd.Series(["held out"] * len(preds))))]
    for idx, ax in enumerate(axes.flat):
        if idx >= len(proxies):
            ax.set_visible(False)
            continue
        proxy = proxies[idx]
        sub = preds[preds["proxy"] == proxy]
        lim = _panel_limits(sub)
        ax.plot(lim, lim, ls="--", color="0.3", lw=1, zorder=1)
        ax.axhline(0, color="0.6", lw=0.8, zorder=1)
        ax.axvline(0, color="0.6", lw=0.8, zorder=1)
        for s_idx, scheme in enumerate(schemes):
            part = sub[sub["scheme"] == scheme] if "scheme" in sub else sub
            ax.scatter(_col(part, "actual"), _col(part, "predicted"), marker=SCHEME_MARKERS.get(scheme, "o"),
                       s=26, alpha=0.75, color=f"C{s_idx}", edgecolors="white", linewidths=0.4, zorder=3,
                       label=scheme)
        row = _board_row(board, proxy)
        name = PROXY_LABELS.get(proxy, proxy)
        if row is None:
            ax.set_title(f"{name}\nscores pending", fontsize="small")
        else:
            beats = ("baseline" if proxy == "d_r2"
                     else "beats ΔR²" if bool(row.get("beats_r2", False)) else "not better than ΔR²")
            ax.set_title(f"{name}\nMAE {_num(row['mae']):.4f} · sign acc {_num(row.get('sign_acc')):.2f}\n{beats}",
                         fontsize="small")
        ax.set_xlim(lim)
        ax.set_ylim(lim)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(4))
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
        ax.tick_params(labelsize="small")
        ax.set_aspect("equal", adjustable="box")
        if idx % ncols == 0:
            ax.set_ylabel("predicted ΔCE_rec")
        if idx // ncols == nrows - 1 or idx + ncols >= len(proxies):
            ax.set_xlabel("actual ΔCE_rec (held out)")
    handles = [Line2D([], [], lw=0, marker=SCHEME_MARKERS.get(s, "o"), color=f"C{i}", label=s)
               for i, s in enumerate(schemes)]
    handles.append(Line2D([], [], ls="--", color="0.3", label="predicted = actual"))
    fig.legend(handles=handles, loc="outside right center", fontsize="small", title="held-out scheme")
    return _finish(fig, "leaderboard", title, caption)


# ---------------------------------------------------------------- reference


def reference_figure(ours_table: pd.DataFrame | None, reference_table: pd.DataFrame | None = None,
                     caption: bool = True) -> Figure:
    """Our ΔCE_rec and ΔR² per (k, T) beside the study's published table (``stats.reference_table()``
    when ``reference_table`` is None), one column per k."""
    if reference_table is None:
        try:
            from proxygap_helpers.stats import reference_table as load_reference
            reference_table = load_reference()
        except (ImportError, FileNotFoundError, OSError):
            reference_table = None
    tables = {"this run": _frame(ours_table), "study (published)": _frame(reference_table)}
    colors = {"this run": "C0", "study (published)": "0.35"}
    markers = {"this run": "o", "study (published)": "s"}
    ks = sorted({int(k) for t in tables.values() if "k" in t for k in t["k"].dropna()})
    title = "This run beside the study's phase-2 table"
    if not ks:
        return _pending_figure("reference", title, caption, "pending: no table to compare", (6.0, 3.2))
    budgets = sorted({float(b) for t in tables.values() if "tokens" in t for b in t["tokens"].dropna()})
    fig, axes = _new_figure(2, len(ks), (4.4, 3.0), legend=2.0, sharex=True, sharey="row")
    for j, k in enumerate(ks):
        for i, (metric, label) in enumerate((("d_ce_rec", "ΔCE_rec (large − small)"), ("d_r2", "ΔR² (large − small)"))):
            ax = axes[i, j]
            ax.axhline(0, color="0.15", lw=0.9)
            for s_idx, (name, t) in enumerate(tables.items()):
                if "k" not in t:
                    continue
                cells = t[t["k"] == k].sort_values("tokens")
                mean = _col(cells, f"{metric}_mean").to_numpy()
                if cells.empty or not np.isfinite(mean).any():
                    continue
                x = cells["tokens"].to_numpy(float) * 10 ** (0.03 * (s_idx - 0.5))
                lo, hi = _col(cells, f"{metric}_lo").to_numpy(), _col(cells, f"{metric}_hi").to_numpy()
                err = np.nan_to_num(np.vstack([mean - lo, hi - mean]))
                ax.errorbar(x, mean, yerr=err, color=colors[name], marker=markers[name], lw=1.4, capsize=3,
                            label=name)
                single = _col(cells, "n").to_numpy() == 1
                ax.scatter(x[single], mean[single], marker=markers[name], s=40, facecolors="white",
                           edgecolors=colors[name], zorder=5)
            if i == 0:
                ax.set_title(f"k = {k}")
            else:
                ax.set_xlabel(TOKENS_LABEL)
            if j == 0:
                ax.set_ylabel(label)
            _set_log_x(ax, budgets)
    handles = [Line2D([], [], color=colors[n], marker=markers[n], label=n) for n in tables]
    handles.append(Line2D([], [], lw=0, marker="o", markerfacecolor="white", color="0.3", label="n = 1 (directional)"))
    fig.legend(handles=handles, loc="outside right center", fontsize="small")
    return _finish(fig, "reference", title, caption)


def ladder_figure(ladder: pd.DataFrame | None, caption: bool = True) -> Figure:
    """ΔCE_rec (top row) and ΔR² (bottom row) against the size ratio (log scale), one column per k, one line
    per budget, marker and line style per hook; error bars are the cells' 95% intervals (``ladder.ladder_table``
    rows). Returns the figure."""
    ladder = _frame(ladder)
    if not len(ladder):
        return _pending_figure("ladder", "ΔCE_rec and ΔR² against the size ratio", caption)
    ks = sorted(ladder["k"].unique())
    budgets = sorted(ladder["tokens"].unique())
    ladder["hook"] = ladder["hook"].astype(object).fillna("")  # (one hook per model: read back from CSV as NaN)
    hooks = list(dict.fromkeys(ladder["hook"]))
    ratios = sorted(ladder["size_ratio"].unique())
    colors = dict(zip(budgets, matplotlib.colormaps["viridis"](np.linspace(0.1, 0.85, len(budgets)))))
    markers = dict(zip(hooks, "os^Dvp"))
    fig, axes = _new_figure(2, len(ks), (3.6, 2.9), legend=1.6)
    for j, k in enumerate(ks):
        for i, (metric, label) in enumerate((("d_ce_rec", "ΔCE_rec (large − small)"), ("d_r2", "ΔR² (large − small)"))):
            ax = axes[i, j]
            ax.axhline(0, color="grey", lw=0.8)
            for (t, hook), g in ladder[ladder["k"] == k].groupby(["tokens", "hook"], sort=True):
                g = g.sort_values("size_ratio")
                mean = g[f"{metric}_mean"].to_numpy(float)
                err = np.abs(np.vstack([mean - g[f"{metric}_lo"].to_numpy(float),
                                        g[f"{metric}_hi"].to_numpy(float) - mean]))
                ax.errorbar(g["size_ratio"], mean, yerr=err, color=colors[t], marker=markers[hook], ms=5, lw=1.2,
                            capsize=2, ls="-" if hook == hooks[0] else "--")
            ax.set_xscale("log")
            ax.set_xticks(ratios, [f"{r:.3g}×" for r in ratios])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.margins(x=0.12)
            ax.set(ylabel=label if j == 0 else "")
            if i == 0:
                ax.set_title(f"k = {int(k)}")
    axes[1, len(ks) // 2].set_xlabel("size ratio of the pair (large / small, non-embedding parameters; log scale)")
    handles = [Line2D([], [], color=colors[t], lw=2, label=f"T = {format_tokens(int(t))}") for t in budgets]
    if len(hooks) > 1:
        handles += [Line2D([], [], color="black", marker=markers[h], ls="-" if h == hooks[0] else "--",
                           label=f"hook {h}") for h in hooks]
    fig.legend(handles=handles, loc="outside right center", fontsize="small")
    return _finish(fig, "ladder", "Across the ladder: the paired gaps against the size ratio", caption)


def family_figure(gaps: pd.DataFrame | None, labels: dict[str, str] | None = None, caption: bool = True) -> Figure:
    """ΔCE_rec (top row) and ΔR² (bottom row) against the SAE budget (log scale), one column per k, one line per
    family with its cells' 95% intervals as a band (``families.family_gaps`` rows). Returns the figure."""
    gaps = _frame(gaps)
    if not len(gaps):
        return _pending_figure("families", "ΔCE_rec and ΔR² per family", caption)
    ks = sorted(gaps["k"].unique())
    fams = list(dict.fromkeys(gaps["family"]))
    colors = dict(zip(fams, sns.color_palette("colorblind", len(fams))))
    budgets = sorted(gaps["tokens"].unique())
    fig, axes = _new_figure(2, len(ks), (3.6, 2.9), legend=1.8)
    for j, k in enumerate(ks):
        for i, (metric, label) in enumerate((("d_ce_rec", "ΔCE_rec (large − small)"), ("d_r2", "ΔR² (large − small)"))):
            ax = axes[i, j]
            ax.axhline(0, color="grey", lw=0.8)
            for fam, g in gaps[gaps["k"] == k].groupby("family", sort=False):
                g = g.sort_values("tokens")
                ax.fill_between(g["tokens"], g[f"{metric}_lo"], g[f"{metric}_hi"], color=colors[fam], alpha=0.18,
                                lw=0)
                ax.plot(g["tokens"], g[f"{metric}_mean"], color=colors[fam], marker="o", ms=4, lw=1.6)
            ax.set_xscale("log")
            ax.set_xticks(budgets, [format_tokens(int(t)) for t in budgets])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.margins(x=0.1)
            ax.set(ylabel=label if j == 0 else "")
            if i == 0:
                ax.set_title(f"k = {int(k)}")
    axes[1, len(ks) // 2].set_xlabel("SAE training tokens (log scale)")
    handles = [Line2D([], [], color=colors[f], lw=2, marker="o", label=(labels or {}).get(f, f)) for f in fams]
    fig.legend(handles=handles, loc="outside right center", fontsize="small", title="family")
    return _finish(fig, "families", "Across model families: the paired gaps against the budget", caption)


TERM_COLORS = {"asymptotic": "#0072B2", "optimisation": "#E69F00", "lack_of_fit": "#999999"}
TERM_LABELS = {"asymptotic": "asymptotic Δy∞ (intrinsic)", "optimisation": "optimisation state",
               "lack_of_fit": "lack of fit"}
VERDICT_SHORT = {"no mismatch": "", "within noise": "noise", "cannot be said": "n/a",
                 "optimisation-mediated": "optim.", "metric mismatch": "METRIC"}


def decomposition_figure(decomposition: pd.DataFrame | None, caption: bool = True) -> Figure:
    """Stacked signed bars of each (k, T) cell's terms (``aggregate/decomposition.csv``): one column per k, ΔCE_rec
    and ΔR² rows, the observed gap with ±1.96 noise SE, the verdict over each bar that is not "no mismatch".
    Returns the figure."""
    df = _frame(decomposition)
    if not len(df):
        return _pending_figure("decomposition", "What the gap is made of", caption)
    ks = sorted(df["k"].unique())
    fig, axes = _new_figure(2, len(ks), (3.6, 2.9), legend=2.2)
    for j, k in enumerate(ks):
        for i, metric in enumerate(("ce_rec", "r2")):
            ax = axes[i, j]
            g = df[(df["k"] == k) & (df["metric"] == metric)].sort_values("tokens").reset_index(drop=True)
            x = np.arange(len(g))
            ax.axhline(0, color="grey", lw=0.8)
            up, down = np.zeros(len(g)), np.zeros(len(g))
            for term in ("asymptotic", "optimisation", "lack_of_fit"):
                v = _col(g, term).fillna(0.0).to_numpy()
                base = np.where(v >= 0, up, down)
                ax.bar(x, v, bottom=base, width=0.6, color=TERM_COLORS[term], label=TERM_LABELS[term])
                up, down = np.where(v >= 0, up + v, up), np.where(v < 0, down + v, down)
            obs, se = _col(g, "observed").to_numpy(), _col(g, "noise_se").fillna(0.0).to_numpy()
            ax.errorbar(x, obs, yerr=1.96 * se, fmt="D", color="black", ms=5, capsize=3, lw=1.2,
                        label="observed ± 1.96 noise SE")
            top = np.nanmax(np.concatenate([up, obs + 1.96 * se])) if len(g) else 0.0
            for xi, verdict in zip(x, g["verdict"]):
                if VERDICT_SHORT.get(verdict):
                    ax.annotate(VERDICT_SHORT[verdict], (xi, top), xytext=(0, 4), textcoords="offset points",
                                ha="center", fontsize="x-small",
                                color=MISMATCH_COLOR if verdict in ("metric mismatch", "optimisation-mediated")
                                else PENDING_COLOR)
            ax.set_xticks(x, [format_tokens(int(t)) for t in g["tokens"]])
            ax.margins(y=0.15)
            ax.set(ylabel=("ΔCE_rec" if metric == "ce_rec" else "ΔR²") + " (large − small)" if j == 0 else "")
            if i == 0:
                ax.set_title(f"k = {int(k)}")
    axes[1, len(ks) // 2].set_xlabel("SAE training tokens")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize="small")
    return _finish(fig, "decomposition", "What the gap is made of: asymptote, optimisation state, noise", caption)
