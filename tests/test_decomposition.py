"""The decomposition of the proxy gap on a synthetic grid with known curves, known noise and every verdict.

Each k is a scenario. Both roles follow ``y(T) = y_inf - a T^-0.5`` exactly in their seed means (three seeds at
offsets -s, 0, +s, so the mean is the curve and the seed SD is known) on four budgets, so the fits recover the
curves, and every term has a known true value: Δy∞, Δ(T) - Δy∞, and 0 for the lack of fit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from proxygap_helpers import budget_curves, decomposition
from proxygap_helpers.decomposition import CANNOT, METRIC, NO_MISMATCH, OPTIMISATION, VERDICTS, WITHIN_NOISE

TOKENS = [10_000, 30_000, 100_000, 300_000]
# k -> {metric: ((y_inf, a) small, (y_inf, a) large, seed offset s)}
SCENARIOS = {
    1: {"ce_rec": ((0.95, 2.0), (0.97, 2.0), 1e-4), "r2": ((0.80, 5.0), (0.85, 5.0), 1e-4)},   # large better on both
    2: {"ce_rec": ((0.95, 2.0), (0.97, 6.0), 1e-4), "r2": ((0.80, 5.0), (0.85, 5.0), 1e-4)},   # CE_rec crosses later
    3: {"ce_rec": ((0.97, 2.0), (0.95, 2.0), 1e-4), "r2": ((0.80, 5.0), (0.85, 5.0), 1e-4)},   # opposite forever
    4: {"ce_rec": ((0.95, 2.0), (0.949, 2.0), 2e-2), "r2": ((0.80, 5.0), (0.801, 5.0), 2e-2)},  # tiny, noisy
}
TRUE_VERDICTS = {1: {NO_MISMATCH}, 2: {OPTIMISATION, NO_MISMATCH}, 3: {METRIC}, 4: {WITHIN_NOISE}, 5: {CANNOT}}


def _curve(y_inf: float, a: float, t: float) -> float:
    return y_inf - a * t ** -0.5


def _pairs() -> pd.DataFrame:
    rows = []
    offsets = np.array([-1.0, 0.0, 1.0])
    for k, metrics in SCENARIOS.items():
        for t in TOKENS:
            for i, off in enumerate(offsets):
                row = {"k": k, "tokens": t, "seed": i}
                for m, (small, large, s) in metrics.items():
                    row[f"{m}_small"] = _curve(*small, t) - off * s
                    row[f"{m}_large"] = _curve(*large, t) + off * s
                rows.append(row)
    # k = 5: CE_rec opposite as in k = 3, and the large model's R² falls between two budgets (refused: not monotone)
    for t, drop in zip(TOKENS, (0.0, 0.0, -0.03, 0.0)):
        for i, off in enumerate(offsets):
            rows.append({"k": 5, "tokens": t, "seed": i,
                         "ce_rec_small": _curve(0.97, 2.0, t) - off * 1e-4, "ce_rec_large": _curve(0.95, 2.0, t) + off * 1e-4,
                         "r2_small": _curve(0.80, 5.0, t) - off * 1e-4,
                         "r2_large": _curve(0.85, 5.0, t) + drop + off * 1e-4})
    df = pd.DataFrame(rows)
    for m in ("ce_rec", "r2"):
        df[f"d_{m}"] = df[f"{m}_large"] - df[f"{m}_small"]
    return df


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    curves = budget_curves.curves_for(_pairs(), n_boot=400, seed=0)
    noise = pd.DataFrame({"k": [1], "tokens": [TOKENS[0]], "d_ce_rec_eval_se": [3e-5]})
    return decomposition.decompose(curves, noise)


def test_every_verdict_is_hit_and_each_scenario_gets_its_own(table):
    assert set(table["verdict"]) == set(VERDICTS)
    for k, expected in TRUE_VERDICTS.items():
        got = set(table.loc[table["k"] == k, "verdict"])
        assert got == expected, (k, got)
    # k = 2: CE_rec's gap is negative at the two lowest budgets (optimisation-mediated), positive above
    k2 = table[(table["k"] == 2) & (table["metric"] == "ce_rec")].set_index("tokens")
    assert list(k2["verdict"]) == [OPTIMISATION, OPTIMISATION, NO_MISMATCH, NO_MISMATCH]
    assert (table.groupby(["k", "tokens"])["verdict"].nunique() == 1).all(), "one verdict per cell"


def test_terms_add_up_and_recover_the_true_curves_within_their_intervals(table):
    fitted = table[table["fit_status"] == "fit"]
    assert len(fitted) == len(table) - len(TOKENS), "only k = 5's R² fit is refused"
    total = fitted["asymptotic"] + fitted["optimisation"] + fitted["lack_of_fit"]
    assert np.allclose(total, fitted["observed"], rtol=0, atol=1e-12)
    for k in (1, 2, 3):
        for m, (small, large, _) in SCENARIOS[k].items():
            rows = table[(table["k"] == k) & (table["metric"] == m)]
            true_asym = large[0] - small[0]
            for _, r in rows.iterrows():
                true_gap = _curve(*large, r["tokens"]) - _curve(*small, r["tokens"])
                assert r["observed"] == pytest.approx(true_gap, abs=1e-12)
                assert r["asymptotic"] == pytest.approx(true_asym, abs=1e-6)
                assert r["asymptotic_lo"] <= true_asym <= r["asymptotic_hi"]
                assert r["optimisation_lo"] <= true_gap - true_asym <= r["optimisation_hi"]
                assert abs(r["lack_of_fit"]) < 1e-6
                shares = r[["share_asymptotic", "share_optimisation", "share_lack_of_fit"]]
                assert shares.sum() == pytest.approx(1.0)


def test_noise_columns(table):
    """The seed SE is the known one (offsets -s, 0, +s on both roles: gap SD 2s); eval_se only where measured
    (CE_rec); noise_se combines them."""
    one = table[(table["k"] == 1) & (table["tokens"] == TOKENS[0])].set_index("metric")
    assert one.loc["r2", "seed_se"] == pytest.approx(2e-4 / np.sqrt(3))
    assert one.loc["ce_rec", "eval_se"] == 3e-5 and np.isnan(one.loc["r2", "eval_se"])
    assert one.loc["ce_rec", "noise_se"] == pytest.approx(np.hypot(2e-4 / np.sqrt(3), 3e-5))
    assert table.loc[table["k"] == 2, "eval_se"].isna().all()


def test_refused_fit_leaves_the_fitted_terms_empty(table):
    k5 = table[table["k"] == 5].set_index(["metric", "tokens"])
    assert k5.loc["r2", "fit_status"].str.contains("large").all()
    assert k5.loc["r2", "asymptotic"].isna().all() and k5.loc["ce_rec", "asymptotic"].notna().all()
    assert "R²" in k5["reason"].iloc[0]


# ---------------------------------------------------------------- the study's table, shares, text and figure


def _gap_table(d_inf: float, a: float, alpha: float, se: float, n=(3, 3, 3)):
    """A published-style table (one k): the gap means follow d_inf - a T^-alpha exactly, intervals mean ± t SE."""
    from scipy import stats as sps

    tokens = np.array([1e7, 3e7, 1e8])
    rows = []
    for t, m in zip(tokens, n):
        g = d_inf - a * t ** -alpha
        h = float(sps.t.ppf(0.975, m - 1)) * se if m > 1 else 0.0
        r2 = 0.2 + 1e3 * t ** -0.5  # ΔR² falling to its limit 0.2
        rows.append({"k": 8, "tokens": int(t), "n": m, "d_ce_rec_mean": g, "d_ce_rec_lo": g - h, "d_ce_rec_hi": g + h,
                     "d_r2_mean": r2, "d_r2_lo": r2 - h, "d_r2_hi": r2 + h})
    return pd.DataFrame(rows)


def test_reference_reads_a_gap_table_through_its_exact_curve():
    """Three budgets and three parameters: the fitted gap passes through the means (lack of fit 0), the
    asymptotic term is the true limit, the terms add up, and the limit's interval covers it. A gap that closes
    from above (ΔR² falling) is fitted in its own direction."""
    tab = _gap_table(0.03, 0.3 * 1e7 ** 0.4, 0.4, 0.002)
    ref = decomposition.reference(tab, n_boot=400)
    ce = ref[ref["metric"] == "ce_rec"]
    assert (ce["fit_status"] == "fit").all()
    np.testing.assert_allclose(ce["asymptotic"], 0.03, rtol=1e-4)
    np.testing.assert_allclose(ce["lack_of_fit"], 0.0, atol=1e-9)
    np.testing.assert_allclose(ce["asymptotic"] + ce["optimisation"] + ce["lack_of_fit"], ce["observed"], atol=1e-12)
    assert ((ce["asymptotic_lo"] <= 0.03) & (0.03 <= ce["asymptotic_hi"])).all()
    r2 = ref[ref["metric"] == "r2"]
    assert (r2["fit_status"] == "fit").all()
    np.testing.assert_allclose(r2["asymptotic"], 0.2, rtol=1e-3)  # the R² gap falls to its limit from above
    assert (r2["optimisation"] > 0).all()
    # ΔCE_rec < 0 at every budget (it closes to +0.03 past them), ΔR² > 0: the asymptotes agree
    assert (ref["verdict"] == OPTIMISATION).all()


def test_reference_on_the_studys_table():
    """The published table: k = 8's ΔCE_rec falls from 50M (n = 1) to 100M, so its fit is refused and its 10M cell
    (ΔCE_rec < 0, ΔR² > 0, neither interval spanning 0) cannot be said; k = 16 at 10M is within noise (the ΔCE_rec
    interval spans 0); every later cell agrees in sign."""
    from proxygap_helpers import stats

    ref = decomposition.reference(stats.reference_table())
    cells = ref.drop_duplicates(["k", "tokens"]).set_index(["k", "tokens"])["verdict"]
    assert cells[(8, 10_000_000)] == CANNOT and cells[(16, 10_000_000)] == WITHIN_NOISE
    assert (cells.drop([(8, 10_000_000), (16, 10_000_000)]) == NO_MISMATCH).all()
    assert ref.loc[(ref["k"] == 8) & (ref["metric"] == "ce_rec"), "fit_status"].str.startswith("not monotone").all()
    text = decomposition.markdown(ref, ref)
    assert "cannot be said 1" in text and "within noise 1" in text and "the CE_rec fit is refused" in text


def test_overall_shares_by_hand():
    df = pd.DataFrame({"metric": ["ce_rec", "ce_rec", "r2"], "fit_status": ["fit", "fit", "fit"],
                       "asymptotic": [0.02, -0.01, 0.05], "optimisation": [-0.03, 0.01, 0.05],
                       "lack_of_fit": [0.0, 0.01, 0.0], "observed": [-0.01, 0.01, 0.10],
                       "noise_se": [0.002, 0.004, 0.01]})
    s = decomposition.overall_shares(df).set_index("metric")
    np.testing.assert_allclose(s.loc["ce_rec", ["share_asymptotic", "share_optimisation", "share_lack_of_fit"]],
                               [0.03 / 0.08, 0.04 / 0.08, 0.01 / 0.08])
    np.testing.assert_allclose(s.loc["ce_rec", "noise_to_gap"], 0.003 / 0.01)
    np.testing.assert_allclose(s.loc["r2", "share_asymptotic"], 0.5)


def test_figure_stacks_every_term_of_every_cell(table):
    from proxygap_helpers import plots

    fig = plots.decomposition_figure(table, caption=False)
    ks = table["k"].nunique()
    axes = [ax for ax in fig.axes if ax.get_title() or ax.get_ylabel() or ax.patches]
    bars = sum(len(ax.patches) for ax in axes)
    assert bars == 3 * len(table)  # three terms per (k, T, metric) row, NaN terms drawn as height 0
    assert len(fig.axes) == 2 * ks
    shown = decomposition.frame(table)
    assert len(shown) == len(table) and shown.index.names == ["k", "T", "gap"]
    assert set(shown.index.get_level_values("T")) == {"10k", "30k", "100k", "300k"}
    assert not shown["lack of fit"].str.startswith("-0.0000").any()


# --------------------------------------------------------------------------- the published reports
@pytest.mark.parametrize("grid", ["default", "ladder"])
def test_the_published_decomposition_is_what_the_code_computes(grid, tmp_path):
    """reports/<grid>/decomposition.csv, per setting, from the published pairs and eval SEs (``phase2_table.csv``):
    the same budget fits, terms, noise and verdicts (the fits' optimiser may differ in the last bits on another
    CPU: 1e-7 relative); the terms add up to the observed gap; and the report carries the section."""
    from proxygap_helpers import aggregate, ladder
    from proxygap_helpers.params import load_params

    repo = Path(__file__).resolve().parents[1]
    pub = repo / "reports" / grid
    p = load_params(repo / "params" / f"{grid}.yaml")
    pairs, table = pd.read_csv(pub / "pairs.csv"), pd.read_csv(pub / "phase2_table.csv")
    published = pd.read_csv(pub / "decomposition.csv")
    several = len(p.settings()) > 1
    assert len(published) == 2 * len(table)  # a row per cell and metric
    for s in p.settings():
        def mine(df):
            return df[df["setting"] == s.label].drop(columns=ladder.SETTING_COLUMNS) if several else df
        curves = budget_curves.curves_for(mine(pairs), max(p.stats.bootstrap, 200), p.stats.seed, p.stats.ci)
        aggregate._csv(decomposition.decompose(curves, mine(table), p.stats.ci), tmp_path / "d.csv")
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "d.csv"), mine(published).reset_index(drop=True),
                                      check_exact=False, rtol=1e-7, atol=1e-12)
    fit = published[published["fit_status"] == "fit"]
    np.testing.assert_allclose(fit["asymptotic"] + fit["optimisation"] + fit["lack_of_fit"], fit["observed"],
                               rtol=1e-9, atol=1e-12)
    assert set(published["verdict"]) <= set(VERDICTS)
    html = (pub / "report.html").read_text()
    assert html.count("What the gap is made of") >= len(p.settings())
