"""Report figures: each builds from small synthetic aggregates (n = 1 cell, missing cell, NaN SWD, empty
frames) with the expected panels, labels, log-x scale and artists."""

import io

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from proxygap_helpers import claims, leaderboard, plots, stats

PROXIES = ["d_r2", "d_cosine", "d_kl", "d_swd"]
# (k, tokens, seeds): (16, 3M) is missing for both models, (16, 10M) has one seed (n = 1)
CELLS = [(8, 1_000_000, 3), (8, 3_000_000, 3), (8, 10_000_000, 3), (16, 1_000_000, 3), (16, 10_000_000, 1)]


def synthetic_metrics(mismatch: bool = True, seed: int = 0, **overrides) -> pd.DataFrame:
    """One row per SAE, shaped like aggregate/sae_metrics.csv. With ``mismatch`` the large model has the
    higher R2 but the lower CE_rec at 1M tokens and the gap reverses by 10M; without it CE_rec favours the
    large model everywhere. SWD is NaN for seed 0."""
    rng = np.random.default_rng(seed)
    rows = []
    for k, t, n in CELLS:
        lt = np.log10(t / 1e6)
        gap = (-0.06 + 0.08 * lt) if mismatch else (0.02 + 0.01 * lt)
        base = 0.80 + 0.05 * lt
        for s in range(n):
            for role, ce, r2 in (("small", base, 0.6 + 0.1 * lt), ("large", base + gap, 0.7 + 0.1 * lt)):
                rows.append(dict(
                    sae_id=f"{role}-k{k}-t{t}-s{s}", model_role=role, model_name=f"tiny-neox-{role}",
                    hook="blocks.1.hook_resid_post", k=k, tokens=t, seed=s, d_in=64, d_sae=2048,
                    eval_tokens=100_000, ce_clean=4.0, ce_sae=4.0 * (2 - ce), ce_zero=15.0, ce_mean_ablation=9.0,
                    ce_rec=ce + rng.normal(0, 0.005), ce_rec_relative=ce, ce_rec_zero_norm=0.98,
                    r2=r2 + rng.normal(0, 0.005), cosine=0.9 + 0.02 * (role == "large") + rng.normal(0, 0.003),
                    rel_err_norm=0.3 + rng.normal(0, 0.003), kl=0.1 - gap + rng.normal(0, 0.002),
                    swd=np.nan if s == 0 else 0.09 - gap + rng.normal(0, 0.002), l0=float(k), dead_frac=0.2,
                    train_seconds=10.0, budget_mode="tokens", finished_at="2026-01-01T00:00:00Z",
                    epochs_used=0.5))
    df = pd.DataFrame(rows)
    for col, value in overrides.items():
        df[col] = value
    return df


def aggregates(mismatch: bool = True) -> dict:
    m = synthetic_metrics(mismatch)
    pairs = stats.pair(m)
    table = stats.phase2_table(pairs)
    board = leaderboard.proxy_leaderboard(pairs, PROXIES, n_boot=200)
    return {"metrics": m, "pairs": pairs, "table": table, "flip": stats.sign_flip(pairs, n_boot=200),
            "preds": leaderboard.heldout_predictions(pairs, PROXIES), "board": board,
            "claims": claims.evaluate_claims(table, pairs, board)}


@pytest.fixture(scope="module")
def agg():
    return aggregates()


def visible_axes(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.get_visible()]


def texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def renders(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=40)  # low dpi: this checks that every artist draws, quickly
    assert buf.tell() > 2_000
    return buf.getvalue()


# ---------------------------------------------------------------- fixtures are what the figures expect


def test_synthetic_aggregates_have_the_edge_cases(agg):
    table = agg["table"]
    assert set(zip(table["k"], table["tokens"])) == {(k, t) for k, t, _ in CELLS}  # (16, 3M) missing
    assert table.loc[(table["k"] == 16) & (table["tokens"] == 10_000_000), "n"].item() == 1
    assert agg["metrics"]["swd"].isna().any()
    assert table.loc[(table["k"] == 8) & (table["tokens"] == 1_000_000), "mismatch_rate"].item() == 1.0


# ---------------------------------------------------------------- sign flip


def test_sign_flip_figure_panels_labels_and_artists(agg):
    plots.set_theme()
    fig = plots.sign_flip_figure(agg["pairs"], agg["table"], agg["flip"])
    assert isinstance(fig, Figure)
    axes = np.array(visible_axes(fig)).reshape(2, 2)  # rows: dCE_rec, dR2; columns: k = 8, 16
    assert [ax.get_title() for ax in axes[0]] == ["k = 8", "k = 16"]
    assert "ΔCE_rec" in axes[0, 0].get_ylabel() and "ΔR²" in axes[1, 0].get_ylabel()
    for ax in axes.flat:
        assert ax.get_xscale() == "log"
    for ax in axes[1]:
        assert ax.get_xlabel() == plots.TOKENS_LABEL
    assert "log scale" in plots.TOKENS_LABEL and "tokens" in plots.TOKENS_LABEL

    table = agg["table"]
    k8 = table[table["k"] == 8].sort_values("tokens")
    mean_lines = [ln for ln in axes[0, 0].get_lines() if len(ln.get_xdata()) == 3]
    assert len(mean_lines) == 1
    np.testing.assert_allclose(mean_lines[0].get_ydata(), k8["d_ce_rec_mean"])
    np.testing.assert_allclose(mean_lines[0].get_xdata(), k8["tokens"])
    # the CI band (fill_between) and a zero line on every panel
    for ax in axes.flat:
        assert any(isinstance(c, PolyCollection) for c in ax.collections)
        assert any(list(ln.get_ydata()) == [0, 0] for ln in ax.get_lines())
    # per-seed points, jittered in log x but within 0.03 dex of their budget
    seeds_k8 = agg["pairs"][agg["pairs"]["k"] == 8]
    dots = [c for c in axes[0, 0].collections if isinstance(c, PathCollection) and len(c.get_offsets()) == len(seeds_k8)]
    assert dots, "per-seed points missing"
    x = dots[0].get_offsets()[:, 0]
    assert np.all(np.abs(np.log10(x / seeds_k8["tokens"].to_numpy())) <= 0.03)
    assert not np.allclose(x, seeds_k8["tokens"])
    # mismatch shading: red spans at the budgets with mismatch rate > 0 (k=8: 1M and 3M; k=16: 1M)
    def red_spans(ax):
        return [p for p in ax.patches if isinstance(p, (Rectangle,)) or p.__class__.__name__ == "Polygon"
                if np.allclose(p.get_facecolor()[:3], matplotlib.colors.to_rgb(plots.MISMATCH_COLOR))]
    assert len(red_spans(axes[0, 0])) == 2 and len(red_spans(axes[1, 0])) == 2
    assert len(red_spans(axes[0, 1])) == 1
    # T*: dashed vertical line at the sign-flip budget, annotated with its bootstrap interval
    t_star = agg["flip"].set_index("k").loc[8, "t_star"]
    dashed = [ln for ln in axes[0, 0].get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed) == 1 and np.isclose(dashed[0].get_xdata()[0], t_star)
    assert any(t.startswith("T* = ") and "[" in t for t in texts(axes[0, 0]))
    # the missing (16, 3M) cell is marked pending; the n = 1 cell has a hollow marker
    assert "pending" in texts(axes[0, 1]) and "pending" not in texts(axes[0, 0])
    hollow = [c for c in axes[0, 1].collections if isinstance(c, PathCollection) and len(c.get_offsets())
              and np.allclose(c.get_facecolor()[0][:3], 1.0)]
    assert len(hollow) == 1 and np.isclose(hollow[0].get_offsets()[0, 0], 10_000_000)
    legend = fig.legends[0]
    labels = [t.get_text() for t in legend.get_texts()]
    assert any("mismatch" in s for s in labels) and any("T*" in s for s in labels) and any("n = 1" in s for s in labels)
    assert fig._suptitle.get_text()
    assert "red bands" in fig.proxygap_caption.lower()
    renders(fig)


def test_sign_flip_figure_without_crossing_or_mismatch():
    a = aggregates(mismatch=False)
    fig = plots.sign_flip_figure(a["pairs"], a["table"], a["flip"])
    axes = visible_axes(fig)
    assert len(axes) == 4
    assert all(not [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"] for ax in axes)
    assert all(not ax.patches for ax in axes)  # no mismatch -> no red bands
    renders(fig)


@pytest.mark.parametrize("frames", [(None, None, None), (pd.DataFrame(), pd.DataFrame(), pd.DataFrame())])
def test_sign_flip_figure_empty_is_pending(frames):
    fig = plots.sign_flip_figure(*frames)
    (ax,) = visible_axes(fig)
    assert any("pending" in t for t in texts(ax))
    renders(fig)


def test_sign_flip_figure_table_only_and_single_budget(agg):
    one = agg["table"][agg["table"]["tokens"] == 1_000_000]
    fig = plots.sign_flip_figure(None, one, None)
    assert len(visible_axes(fig)) == 4
    renders(fig)


# ---------------------------------------------------------------- per model


def test_per_model_figure(agg):
    fig = plots.per_model_figure(agg["metrics"])
    axes = visible_axes(fig)
    assert len(axes) == 2
    assert "CE_rec" in axes[0].get_ylabel() and "R²" in axes[1].get_ylabel()
    for ax in axes:
        assert ax.get_xscale() == "log" and ax.get_xlabel() == plots.TOKENS_LABEL and ax.get_title()
        bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        assert len(bars) == 4  # 2 roles x 2 k
    # the small model at k=8, 1M: mean over its 3 seeds
    m = agg["metrics"]
    expected = m[(m.model_role == "small") & (m.k == 8) & (m.tokens == 1_000_000)]["ce_rec"].mean()
    ys = [y for c in axes[0].containers for y in c.lines[0].get_ydata()]
    assert np.isclose(ys, expected).any()
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"small model", "large model", "k = 8", "k = 16"} <= set(labels)
    renders(fig)


def test_per_model_figure_nan_and_missing_metric(agg):
    fig = plots.per_model_figure(agg["metrics"], metrics=("swd", "no_such_metric"))
    swd, missing = visible_axes(fig)
    assert [c for c in swd.containers if isinstance(c, ErrorbarContainer)]
    assert any("pending" in t for t in texts(missing))
    fig = plots.per_model_figure(pd.DataFrame())
    assert all(any("pending" in t for t in texts(ax)) for ax in visible_axes(fig))
    renders(fig)


# ---------------------------------------------------------------- leaderboard


def test_leaderboard_figure(agg):
    fig = plots.leaderboard_figure(agg["preds"], agg["board"])
    axes = visible_axes(fig)
    assert len(axes) == len(PROXIES)
    pooled = agg["board"][agg["board"]["scheme"] == "pooled"].set_index("proxy")
    names = {plots.PROXY_LABELS[p]: p for p in PROXIES}
    first = []
    for ax in axes:
        name, scores, verdict = ax.get_title().split("\n")
        proxy = names[name]
        first.append(proxy)
        assert f"MAE {pooled.loc[proxy, 'mae']:.4f}" in scores
        assert f"sign acc {pooled.loc[proxy, 'sign_acc']:.2f}" in scores
        assert verdict in ("baseline", "beats ΔR²", "not better than ΔR²")
        assert ax.get_xlabel() == "" or "actual" in ax.get_xlabel()
        # identity line and both zero lines
        lines = ax.get_lines()
        assert any(np.allclose(ln.get_xdata(), ln.get_ydata()) and ln.get_linestyle() == "--" for ln in lines)
        assert sum(list(ln.get_ydata()) == [0, 0] for ln in lines) == 1
        assert sum(list(ln.get_xdata()) == [0, 0] for ln in lines) == 1
        # one scatter per scheme, together every held-out prediction of this proxy
        sc = [c for c in ax.collections if isinstance(c, PathCollection)]
        assert len(sc) == 2
        assert sum(len(c.get_offsets()) for c in sc) == (agg["preds"]["proxy"] == proxy).sum()
    assert first == list(pooled.loc[PROXIES, "mae"].sort_values(kind="stable").index)  # ordered by MAE
    assert any("actual" in ax.get_xlabel() for ax in axes)
    assert any("predicted" in ax.get_ylabel() for ax in axes)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"leave-one-budget-out", "leave-one-k-out"} <= set(labels)
    renders(fig)


def test_leaderboard_figure_pending_and_unscored(agg):
    for preds, board in [(None, None), (pd.DataFrame(columns=leaderboard.PREDICTION_COLUMNS), pd.DataFrame())]:
        (ax,) = visible_axes(plots.leaderboard_figure(preds, board))
        assert any("pending" in t for t in texts(ax))
    fig = plots.leaderboard_figure(agg["preds"], None)  # predictions without scores
    assert all("pending" in ax.get_title() for ax in visible_axes(fig))
    renders(fig)


# ---------------------------------------------------------------- reference, theme, global state


def test_reference_figure(agg):
    ref = stats.reference_table()
    fig = plots.reference_figure(agg["table"], ref)
    axes = np.array(visible_axes(fig)).reshape(2, 2)
    assert [ax.get_title() for ax in axes[0]] == ["k = 8", "k = 16"]
    for ax in axes.flat:
        assert ax.get_xscale() == "log"
        assert len([c for c in ax.containers if isinstance(c, ErrorbarContainer)]) == 2  # ours + study
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "this run" in labels and "study (published)" in labels
    renders(fig)
    (ax,) = visible_axes(plots.reference_figure(pd.DataFrame(), pd.DataFrame()))
    assert any("pending" in t for t in texts(ax))


def test_figures_leave_no_global_state(agg):
    before = plt.get_fignums()
    rc = dict(matplotlib.rcParams)
    figs = [plots.sign_flip_figure(agg["pairs"], agg["table"], agg["flip"]), plots.per_model_figure(agg["metrics"]),
            plots.leaderboard_figure(agg["preds"], agg["board"]), plots.reference_figure(agg["table"])]
    assert plt.get_fignums() == before
    assert dict(matplotlib.rcParams) == rc
    for fig in figs:
        plt.close(fig)  # safe on figures that pyplot does not manage
        assert fig.proxygap_caption


def test_caption_can_be_left_out(agg):
    fig = plots.per_model_figure(agg["metrics"], caption=False)
    with_caption = plots.per_model_figure(agg["metrics"])
    assert fig.proxygap_caption and [t.get_text() for t in fig.texts] == [fig._suptitle.get_text()]
    assert [t.get_text().replace("\n", " ") for t in with_caption.texts][-1] == with_caption.proxygap_caption
    assert plots.format_tokens(5_940_000) == "5.94M" and plots.format_tokens(1e7) == "10M"


def test_sign_flip_figure_has_a_tokens_per_latent_axis(agg):
    """Budgets as tokens per latent of the large model's SAE on a second x axis over the top row (issue 17)."""
    plots.set_theme()
    table = agg["table"].assign(tokens_per_latent_large=lambda t: t["tokens"] / 4096)
    fig = plots.sign_flip_figure(agg["pairs"], table, agg["flip"])
    top = np.array(visible_axes(fig)).reshape(2, 2)[0]
    secondary = [c for c in top[0].child_axes]
    assert len(secondary) == 1 and "tokens per latent" in secondary[0].get_xlabel()
    renders(fig)  # lays the figure out (an Agg draw): the secondary axis takes its limits from the primary
    sec = secondary[0]
    for v in [t for t in sec.get_xticks() if np.isfinite(t) and t > 0][:3]:  # the same place on both axes
        assert sec.transData.transform((v, 0))[0] == pytest.approx(top[0].transData.transform((v * 4096, 0))[0],
                                                                    abs=0.5)
    assert "tokens per latent" in plots.CAPTIONS["sign_flip"]
    plain = plots.sign_flip_figure(agg["pairs"], agg["table"], agg["flip"])  # no column: no second axis
    assert not np.array(visible_axes(plain)).reshape(2, 2)[0][0].child_axes


def drawn_tick_labels(axis) -> list:
    """The tick labels an axis draws: ticks inside its view, label shown, text not empty (major and minor)."""
    lo, hi = sorted(axis.get_view_interval())
    ticks = [*zip(axis.get_majorticklocs(), axis.get_major_ticks(len(axis.get_majorticklocs()))),
             *zip(axis.get_minorticklocs(), axis.get_minor_ticks(len(axis.get_minorticklocs())))]
    return [label for loc, tick in ticks if lo * (1 - 1e-9) <= loc <= hi * (1 + 1e-9)
            for label in (tick.label1, tick.label2) if label.get_visible() and label.get_text()]


def test_tokens_per_latent_axis_labels_do_not_collide(agg):
    """Issue 25: over less than a decade the top axis' log formatter labelled minor ticks ('3×10²', '4×10²')
    that ran into each other. Its labels are now the primary ticks' budgets in tokens per latent, plain."""
    plots.set_theme()
    table = agg["table"][agg["table"]["tokens"] <= 3_000_000]  # 1M and 3M: 244 to 732 tokens per latent
    table = table.assign(tokens_per_latent_large=lambda t: t["tokens"] / 4096)
    fig = plots.sign_flip_figure(agg["pairs"][agg["pairs"]["tokens"] <= 3_000_000], table, agg["flip"])
    canvas = FigureCanvasAgg(fig)  # figures are built without pyplot: draw on an Agg canvas to measure text
    canvas.draw()
    renderer = canvas.get_renderer()
    top = np.array(visible_axes(fig)).reshape(2, 2)[0]
    for ax in top:
        (sec,) = ax.child_axes
        assert sec.xaxis.get_offset_text().get_text() == ""
        labels = drawn_tick_labels(sec.xaxis)
        boxes = [t.get_window_extent(renderer) for t in labels]
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
        if sec.get_xlabel():
            assert not any(b.overlaps(sec.xaxis.label.get_window_extent(renderer)) for b in boxes)
        assert [t.get_text() for t in labels] == [plots.format_tokens(t / 4096) for t in (1e6, 3e6)]
        # each label sits over its budget on the primary axis
        for label, t in zip(labels, (1e6, 3e6)):
            assert label.get_window_extent(renderer).x0 < ax.transData.transform((t, 0))[0] \
                < label.get_window_extent(renderer).x1


def test_leaderboard_panels_have_their_own_limits(agg):
    """Issue 25: an outlier of one proxy no longer squashes the other panels; each panel's square limits hold
    its own points and 0, and its dashed identity line runs corner to corner."""
    preds = agg["preds"].copy()
    preds.loc[preds.index[preds["proxy"] == "d_swd"][0], "predicted"] = 5.0
    def limits(fig):
        return {ax.get_title().split("\n")[0]: (ax.get_xlim(), ax.get_ylim(), ax) for ax in visible_axes(fig)}
    plain = limits(plots.leaderboard_figure(agg["preds"], agg["board"]))
    outlier = limits(plots.leaderboard_figure(preds, agg["board"]))
    swd = plots.PROXY_LABELS["d_swd"]
    for name, (xlim, ylim, ax) in outlier.items():
        assert xlim == ylim
        sub = preds[preds["proxy"] == {plots.PROXY_LABELS[p]: p for p in PROXIES}[name]]
        vals = np.r_[sub["actual"], sub["predicted"], 0.0]
        assert xlim[0] < vals.min() and vals.max() < xlim[1]
        assert any(ln.get_linestyle() == "--" and tuple(ln.get_xdata()) == xlim == tuple(ln.get_ydata())
                   for ln in ax.get_lines())
        if name != swd:
            assert xlim == plain[name][0] and ylim == plain[name][1]
    assert outlier[swd][1][1] > 5.0 > plain[swd][1][1]
    assert all(plain[n][0][1] < 1.0 for n in plain if n != swd)
