"""Gate D2: held-out prediction of d_ce_rec from proxy deltas, and the paired-bootstrap leaderboard."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from proxygap_helpers import leaderboard as L

KS, BUDGETS, SEEDS = (8, 16, 32), (10**6, 10**7, 10**8), (0, 1, 2)


def synthetic_pairs(seed=0):
    """d_ce_rec = 0.3 - 2 * d_swd exactly; d_r2 and d_kl are independent noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in KS:
        for t in BUDGETS:
            for s in SEEDS:
                swd = rng.normal()
                rows.append({"k": k, "tokens": t, "seed": s, "d_swd": swd, "d_ce_rec": 0.3 - 2 * swd,
                             "d_r2": rng.normal(), "d_kl": rng.normal()})
    return pd.DataFrame(rows)


def test_heldout_predictions_never_see_the_held_out_cells():
    pairs = synthetic_pairs()
    preds = L.heldout_predictions(pairs, ["d_kl"])
    assert list(preds.columns) == L.PREDICTION_COLUMNS
    assert set(preds["proxy"]) == {"d_r2", "d_kl"}  # the baseline is always included
    assert len(preds) == 2 * 2 * len(pairs)  # 2 schemes x 2 proxies x every pair once
    fold = preds[(preds["scheme"] == "leave-one-budget-out") & (preds["proxy"] == "d_kl")
                 & (preds["tokens"] == 10**7)]
    train = pairs[pairs["tokens"] != 10**7]
    fit = sps.linregress(train["d_kl"], train["d_ce_rec"])
    expected = fit.intercept + fit.slope * pairs.loc[pairs["tokens"] == 10**7, "d_kl"].to_numpy()
    np.testing.assert_allclose(fold["predicted"], expected)
    assert (fold["fit"] == "ols").all()


def test_constant_training_proxy_falls_back_to_the_training_mean():
    pairs = synthetic_pairs().assign(d_cosine=0.5)
    preds = L.heldout_predictions(pairs, ["d_cosine"])
    fold = preds[(preds["scheme"] == "leave-one-k-out") & (preds["proxy"] == "d_cosine") & (preds["k"] == 8)]
    assert (fold["fit"] == "mean").all()
    np.testing.assert_allclose(fold["predicted"], pairs.loc[pairs["k"] != 8, "d_ce_rec"].mean())


def test_perfect_proxy_beats_noise_r2():
    board = L.proxy_leaderboard(synthetic_pairs(), ["d_kl", "d_swd"], n_boot=300, seed=0)
    assert list(board.columns) == L.LEADERBOARD_COLUMNS
    assert list(board["scheme"].unique()) == ["leave-one-budget-out", "leave-one-k-out", "pooled"]
    swd = board[board["proxy"] == "d_swd"].set_index("scheme")
    assert (swd["mae"] < 1e-9).all()
    assert (swd["sign_acc"] == 1).all()
    # pooled holds every pair twice: tied actuals against predictions that differ by rounding error
    assert (swd["spearman"] > 0.999).all()
    assert (swd["mae_vs_r2_lo"] > 0).all() and swd["beats_r2"].all()
    assert (swd["rank"] == 1).all()
    assert swd.loc["pooled", "n_cells"] == 9 and swd.loc["pooled", "n_pred"] == 2 * 27
    r2 = board[board["proxy"] == "d_r2"]
    assert not r2["beats_r2"].any() and (r2["mae_vs_r2"] == 0).all()
    # orientation: positive = better than R2 for every score
    pooled = swd.loc["pooled"]
    r2_pooled = r2.set_index("scheme").loc["pooled"]
    assert pooled["mae_vs_r2"] == pytest.approx(r2_pooled["mae"] - pooled["mae"])
    assert pooled["sign_acc_vs_r2"] == pytest.approx(pooled["sign_acc"] - r2_pooled["sign_acc"])
    assert pooled["mae_vs_r2"] > 0


def test_noise_proxy_does_not_beat_r2_and_board_is_deterministic():
    pairs = synthetic_pairs()
    a = L.proxy_leaderboard(pairs, ["d_kl", "d_swd"], n_boot=200, seed=5)
    b = L.proxy_leaderboard(pairs, ["d_kl", "d_swd"], n_boot=200, seed=5)
    pd.testing.assert_frame_equal(a, b)
    kl = a[a["proxy"] == "d_kl"]
    assert not kl["beats_r2"].any()
    assert (kl["mae_vs_r2_lo"] < 0).all()  # two noise proxies: the CI of their difference straddles 0


def test_absent_or_all_nan_proxies_are_skipped_with_a_note():
    pairs = synthetic_pairs().assign(d_cosine=np.nan)
    board = L.proxy_leaderboard(pairs, n_boot=50)
    assert set(board["proxy"]) == set(L.DEFAULT_PROXIES)
    cos = board[board["proxy"] == "d_cosine"]
    assert cos["mae"].isna().all() and (cos["note"] == "skipped: column d_cosine is all NaN").all()
    dead = board[board["proxy"] == "d_dead_frac"]
    assert (dead["note"] == "skipped: column d_dead_frac absent from the pairs").all()
    assert board.loc[board["proxy"] == "d_swd", "mae"].notna().all()


def test_scheme_with_fewer_than_two_cells_gives_nan_rows_with_note():
    pairs = synthetic_pairs()
    pairs = pairs[pairs["k"] == 8]  # one k: leave-one-k-out has nothing to train on
    board = L.proxy_leaderboard(pairs, ["d_swd"], n_boot=50).set_index(["scheme", "proxy"])
    row = board.loc[("leave-one-k-out", "d_swd")]
    assert np.isnan(row["mae"]) and np.isnan(row["mae_vs_r2_lo"]) and not row["beats_r2"]
    assert row["n_cells"] == 0 and "need >= 2" in row["note"]
    assert board.loc[("leave-one-budget-out", "d_swd"), "n_cells"] == 3


def test_without_r2_baseline_every_proxy_is_skipped():
    board = L.proxy_leaderboard(synthetic_pairs().drop(columns="d_r2"), ["d_swd"], n_boot=20)
    assert board["mae"].isna().all()
    assert (board.loc[board["proxy"] == "d_swd", "note"] == "skipped: no usable baseline d_r2").all()


def test_default_proxies_include_the_new_ones_with_kinds_and_text():
    assert {"d_gwd", "d_nmse", "d_dim", "d_random_error_ratio"} <= set(L.DEFAULT_PROXIES)
    assert set(L.PROXY_KINDS) == set(L.PROXY_TEXT) == set(L.DEFAULT_PROXIES)
    assert {p for p, kind in L.PROXY_KINDS.items() if kind == "behavioural reference"} == set(L.BEHAVIOURAL_REFERENCES)
    pairs = synthetic_pairs().assign(d_gwd=lambda d: -0.5 * d["d_swd"])  # another perfect (negated) predictor
    board = L.proxy_leaderboard(pairs, n_boot=50).set_index(["scheme", "proxy"])
    assert board.loc[("pooled", "d_gwd"), "mae"] < 1e-9 and board.loc[("pooled", "d_gwd"), "beats_r2"]
    assert board.loc[("pooled", "d_nmse"), "note"] == "skipped: column d_nmse absent from the pairs"
