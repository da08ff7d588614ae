"""Aggregation: flatten, dedupe, pair, Student-t CIs, the (k, T) table, its markdown and the sign flip."""

import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from proxygap_helpers import stats as S

PUBLISHED_ROWS = [  # the study's "Core Result" table; † added by us on the n = 1 rows
    "| 8 | 10M | 4 | -0.099 [-0.117, -0.082] | +0.150 [0.147, 0.153] | 1.00 |",
    "| 8 | 50M | 1† | +0.018 [0.018, 0.018] | +0.108 [0.108, 0.108] | 0.00 |",
    "| 8 | 100M | 3 | +0.009 [0.004, 0.013] | +0.096 [0.096, 0.097] | 0.00 |",
    "| 16 | 10M | 4 | -0.028 [-0.064, 0.009] | +0.111 [0.109, 0.112] | 0.50 |",
    "| 16 | 50M | 1† | +0.018 [0.018, 0.018] | +0.072 [0.072, 0.072] | 0.00 |",
    "| 16 | 100M | 3 | +0.020 [0.016, 0.024] | +0.067 [0.067, 0.067] | 0.00 |",
]


def record(role, k, tokens, seed, ce_rec, r2, finished_at="2026-01-01T00:00:00Z", **extra):
    return {"sae_id": f"{role}-k{k}-t{tokens}-s{seed}", "model_role": role, "k": k, "tokens": tokens, "seed": seed,
            "ce_rec": ce_rec, "r2": r2, "finished_at": finished_at, **extra}


def records_for(deltas, small_ce=0.9, small_r2=0.5):
    """Small/large records whose large - small deltas are ``deltas[(k, tokens, seed)] = (d_ce_rec, d_r2)``."""
    out = []
    for (k, t, s), (d_ce, d_r2) in deltas.items():
        out.append(record("small", k, t, s, small_ce, small_r2, cosine=0.8))
        out.append(record("large", k, t, s, small_ce + d_ce, small_r2 + d_r2, cosine=0.9))
    return out


# ---------------------------------------------------------------- flatten / dedupe / pair


def test_flatten_nested_and_stable_columns():
    recs = [record("small", 8, 10, 0, 0.9, 0.5, provenance={"git_commit": "abc", "torch": {"version": "2"}}),
            record("large", 8, 10, 0, 0.8, 0.6, zeta=1)]
    df = S.flatten_metrics(recs)
    assert list(df.columns[: len(S.CORE_KEYS)]) == list(S.CORE_KEYS)
    assert list(df.columns[len(S.CORE_KEYS):]) == ["provenance.git_commit", "provenance.torch.version", "zeta"]
    assert df.loc[0, "provenance.git_commit"] == "abc"
    assert df.loc[0, "provenance.torch.version"] == "2"
    assert pd.isna(df.loc[1, "provenance.git_commit"]) and df.loc[1, "zeta"] == 1
    assert list(S.flatten_metrics(recs[::-1]).columns) == list(df.columns)


def test_dedupe_keeps_newest_and_reports_dropped():
    recs = [record("small", 8, 10, 0, 0.90, 0.5, finished_at="2026-01-01T00:00:00Z"),
            {**record("small", 8, 10, 0, 0.95, 0.5, finished_at="2026-01-02T09:00:00+00:00"), "sae_id": "new"},
            {**record("small", 8, 10, 0, 0.97, 0.5, finished_at="2026-01-02T08:00:00Z"), "sae_id": "middle"},
            record("large", 8, 10, 0, 0.80, 0.6)]
    kept, dropped = S.dedupe(S.flatten_metrics(recs))
    assert sorted(kept["sae_id"]) == ["large-k8-t10-s0", "new"]
    assert sorted(dropped["sae_id"]) == ["middle", "small-k8-t10-s0"]
    assert (dropped["kept_sae_id"] == "new").all()
    assert all("kept the newer new" in r for r in dropped["reason"])


def test_grid_records_keeps_the_grids_ids_under_its_evaluation():
    recs = [{"sae_id": "a", "eval_hash": "e1"}, {"sae_id": "a", "eval_hash": "e0"}, {"sae_id": "other", "eval_hash": "e1"},
            {"sae_id": "b"}]
    mine, current = S.grid_records(iter(recs), ("a", "b"), "e1")
    assert mine == [recs[0], recs[1], recs[3]]
    assert current == [recs[0]]


def test_pair_deltas_mismatch_and_unpaired():
    recs = records_for({(8, 10, 0): (-0.1, 0.2), (8, 10, 1): (0.05, 0.2), (8, 10, 2): (-0.1, -0.1)})
    recs.append(record("small", 8, 10, 3, 0.9, 0.5))  # no large partner
    recs.append(record("large", 16, 10, 0, 0.9, 0.5))  # no small partner
    recs += [record("small", 16, 10, 1, 0.9, 0.5), record("large", 16, 10, 1, float("nan"), 0.5)]
    df = S.flatten_metrics(recs)
    pairs = S.pair(df)
    assert list(pairs.columns[:8]) == ["k", "tokens", "seed", "sae_id_small", "sae_id_large", "ce_rec_small",
                                       "ce_rec_large", "d_ce_rec"]
    assert {"r2_small", "r2_large", "d_r2", "d_cosine", "mismatch"} <= set(pairs.columns)
    assert list(pairs["seed"]) == [0, 1, 2]
    np.testing.assert_allclose(pairs["d_ce_rec"], [-0.1, 0.05, -0.1])
    np.testing.assert_allclose(pairs["d_cosine"], [0.1, 0.1, 0.1])
    assert list(pairs["mismatch"]) == [1, 0, 0]
    missing = S.unpaired(df)
    assert list(zip(missing["k"], missing["seed"], missing["reason"])) == [
        (8, 3, "no large SAE"), (16, 0, "no small SAE"), (16, 1, "ce_rec or r2 is missing/non-finite")]
    with pytest.raises(ValueError, match="dedupe"):
        S.pair(S.flatten_metrics(recs + [record("small", 8, 10, 0, 0.9, 0.5)]))


def test_pair_carries_the_new_proxies_and_d_dim():
    """d_dim (gate D3) is the delta of pr_recon_frac; the model-level and new per-SAE metrics get deltas too."""
    recs = []
    for s, (small, large) in enumerate([(0.30, 0.20), (0.35, 0.30), (0.40, 0.10)]):
        extra = lambda frac, role: dict(pr_recon_frac=frac, gwd=0.1 * s, nmse=0.2, random_error_ratio=2.0 + s,  # noqa: E731
                                        sst_per_token=226.7 if role == "small" else 4131.1, twonn_dim=7.0)
        recs += [record("small", 8, 10, s, 0.9, 0.5, **extra(small, "small")),
                 record("large", 8, 10, s, 0.8, 0.6, **extra(large, "large"))]
    pairs = S.pair(S.flatten_metrics(recs))
    np.testing.assert_allclose(pairs["d_dim"], [-0.10, -0.05, -0.30])
    np.testing.assert_allclose(pairs["d_dim"], pairs["d_pr_recon_frac"])
    np.testing.assert_allclose(pairs["d_sst_per_token"], 4131.1 - 226.7)
    assert (pairs["d_gwd"] == 0).all() and (pairs["d_twonn_dim"] == 0).all() and (pairs["d_nmse"] == 0).all()
    table = S.phase2_table(pairs)
    assert table.loc[0, "d_dim_mean"] == pytest.approx(-0.15)
    assert {"d_gwd_mean", "d_nmse_lo", "d_random_error_ratio_hi"} <= set(table.columns)
    # records without the D3 metric give an all-NaN d_dim (C6 then says there are no usable pairs)
    assert S.pair(S.flatten_metrics(records_for({(8, 10, 0): (0.1, 0.1)})))["d_dim"].isna().all()


# ---------------------------------------------------------------- intervals and the table


def test_mean_ci_matches_hand_computation():
    x = [0.1, 0.4, 0.2, 0.5]
    mean = sum(x) / 4
    sd = math.sqrt(sum((v - mean) ** 2 for v in x) / 3)
    half = sps.t.ppf(0.975, 3) * sd / math.sqrt(4)
    assert S.mean_ci(x) == pytest.approx((mean, mean - half, mean + half))
    half90 = sps.t.ppf(0.95, 3) * sd / 2
    assert S.mean_ci(x, level=0.9) == pytest.approx((mean, mean - half90, mean + half90))
    assert S.mean_ci([0.3]) == (0.3, 0.3, 0.3)
    assert all(math.isnan(v) for v in S.mean_ci([]))
    assert S.mean_ci([0.3, float("nan")]) == (0.3, 0.3, 0.3)


def hand_table_pairs():
    """k=8, T=1M: three seeds (after a duplicate is resolved), k=8, T=10M: one seed."""
    deltas = {(8, 10**6, 0): (-0.10, 0.20), (8, 10**6, 1): (-0.20, 0.10), (8, 10**6, 2): (0.03, 0.30),
              (8, 10**7, 0): (0.05, 0.15)}
    recs = records_for(deltas)
    # an older duplicate of the large SAE of seed 0 that would otherwise change the cell
    recs.append({**record("large", 8, 10**6, 0, 5.0, 5.0, finished_at="2025-06-01T00:00:00Z"), "sae_id": "stale"})
    kept, dropped = S.dedupe(S.flatten_metrics(recs))
    assert list(dropped["sae_id"]) == ["stale"]
    return S.pair(kept)


def test_phase2_table_hand_computed():
    table = S.phase2_table(hand_table_pairs())
    assert list(table.columns[:11]) == ["k", "tokens", "n", "d_ce_rec_mean", "d_ce_rec_lo", "d_ce_rec_hi",
                                        "d_r2_mean", "d_r2_lo", "d_r2_hi", "mismatch_rate", "directional"]
    assert {"d_cosine_mean", "d_swd_lo", "d_kl_hi", "d_rel_err_norm_mean"} <= set(table.columns)
    first, second = table.iloc[0], table.iloc[1]
    assert (first["k"], first["tokens"], first["n"]) == (8, 10**6, 3)
    ce = np.array([-0.10, -0.20, 0.03])
    half = sps.t.ppf(0.975, 2) * ce.std(ddof=1) / np.sqrt(3)
    assert first["d_ce_rec_mean"] == pytest.approx(ce.mean())
    assert (first["d_ce_rec_lo"], first["d_ce_rec_hi"]) == pytest.approx((ce.mean() - half, ce.mean() + half))
    assert first["d_r2_mean"] == pytest.approx(0.2)
    assert first["mismatch_rate"] == pytest.approx(2 / 3)
    assert not first["directional"]
    assert second["n"] == 1 and second["directional"]
    assert (second["d_ce_rec_lo"], second["d_ce_rec_hi"]) == pytest.approx((0.05, 0.05))
    assert second["mismatch_rate"] == 0
    assert first["d_cosine_mean"] == pytest.approx(0.1) and math.isnan(first["d_swd_mean"])


def test_phase2_table_bootstrap_is_deterministic():
    pairs = hand_table_pairs()
    a = S.phase2_table(pairs, bootstrap=500, seed=3)
    b = S.phase2_table(pairs, bootstrap=500, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert list(a.columns[-2:]) == ["d_ce_rec_boot_lo", "d_ce_rec_boot_hi"]
    assert -0.2 - 1e-12 <= a.loc[0, "d_ce_rec_boot_lo"] < a.loc[0, "d_ce_rec_boot_hi"] <= 0.03 + 1e-12
    assert a.loc[1, "d_ce_rec_boot_lo"] == a.loc[1, "d_ce_rec_boot_hi"] == pytest.approx(0.05)
    assert "d_ce_rec_boot_lo" not in S.phase2_table(pairs).columns


def test_markdown_format_and_directional_footnote():
    md = S.phase2_markdown(S.phase2_table(hand_table_pairs())).splitlines()
    assert md[0] == "| k | tokens | n | ΔCE_rec mean (95% CI) | ΔR² mean (95% CI) | mismatch rate |"
    assert md[1] == "|---|---|---|---|---|---|"
    assert md[2].startswith("| 8 | 1M | 3 | -0.090 [")
    assert md[2].endswith("| +0.200 [-0.048, 0.448] | 0.67 |")
    assert md[3] == "| 8 | 10M | 1† | +0.050 [0.050, 0.050] | +0.150 [0.150, 0.150] | 0.00 |"
    assert md[-1].startswith("† n = 1: directional")
    table = pd.DataFrame([{"k": 4, "tokens": 250_000, "n": 2, "d_ce_rec_mean": -0.00004, "d_ce_rec_lo": -0.1,
                           "d_ce_rec_hi": 0.1, "d_r2_mean": 0.5, "d_r2_lo": 0.4, "d_r2_hi": 0.6,
                           "mismatch_rate": 0.5}])
    md = S.phase2_markdown(table)
    assert "| 4 | 250k | 2 | +0.000 [-0.100, 0.100] | +0.500 [0.400, 0.600] | 0.50 |" in md
    assert "†" not in md


def test_reference_table_renders_like_the_published_table():
    ref = S.reference_table()
    assert list(ref.columns) == [*S.TABLE_COLUMNS[:-1], "tokens_per_latent_small", "tokens_per_latent_large"]
    published = ref[S.TABLE_COLUMNS[:-1]]
    assert S.phase2_markdown(published).splitlines()[2:8] == PUBLISHED_ROWS


def test_tokens_per_latent_beside_the_studys_budgets():
    """The study's 10M-100M budgets are 610-6104 tokens per latent for pythia-70m (d_sae 16384) and 305-3052 for
    pythia-410m (32768); both tables show T / d_sae next to T."""
    ref = S.reference_table()
    row = ref[(ref["k"] == 8) & (ref["tokens"] == 10_000_000)].iloc[0]
    assert (round(row["tokens_per_latent_small"]), round(row["tokens_per_latent_large"])) == (610, 305)
    md = S.phase2_markdown(ref).splitlines()
    assert md[0].startswith("| k | tokens | tokens / latent (small, large) | n |")
    assert md[2].startswith("| 8 | 10M | 610, 305 | 4 | -0.099 [")
    pairs = hand_table_pairs().assign(tokens_per_latent_small=lambda d: d["tokens"] / 2048,
                                      tokens_per_latent_large=lambda d: d["tokens"] / 4096,
                                      dead_frac_small=0.1, dead_frac_large=0.3)
    table = S.phase2_table(pairs)
    assert table.loc[0, "tokens_per_latent_large"] == 1_000_000 / 4096
    assert table.loc[0, "dead_frac_small_mean"] == pytest.approx(0.1)
    assert "| 8 | 1M | 488, 244 | 3 |" in S.phase2_markdown(table)


def test_pairs_built_from_reference_means_reproduce_a_row():
    """Per reference cell, n pairs with the published mean and a spread whose Student-t CI is the published
    half-width; aggregated and rendered, the rows have the published structure and numbers (to 0.001)."""
    ref = S.reference_table()
    rows = []
    for cell in ref.itertuples():
        if cell.n > 1:  # z has mean 0 and SD 1; scale it so that t * SD / sqrt(n) is the published half-width
            z = np.linspace(-1, 1, cell.n) / np.std(np.linspace(-1, 1, cell.n), ddof=1)
            scale = np.sqrt(cell.n) / sps.t.ppf(0.975, cell.n - 1) / 2
        else:
            z, scale = np.zeros(1), 0.0
        d_ce = cell.d_ce_rec_mean + z * (cell.d_ce_rec_hi - cell.d_ce_rec_lo) * scale
        d_r2 = cell.d_r2_mean + z * (cell.d_r2_hi - cell.d_r2_lo) * scale
        rows += [{"k": cell.k, "tokens": cell.tokens, "seed": seed, "d_ce_rec": ce, "d_r2": r2,
                  "mismatch": int(r2 > 0 and ce < 0)} for seed, (ce, r2) in enumerate(zip(d_ce, d_r2))]
    table = S.phase2_table(pd.DataFrame(rows))
    assert list(table["n"]) == list(ref["n"])
    for col in ("d_ce_rec_mean", "d_ce_rec_lo", "d_ce_rec_hi", "d_r2_mean", "d_r2_lo", "d_r2_hi"):
        np.testing.assert_allclose(table[col], ref[col], atol=1e-3)
    md = S.phase2_markdown(table).splitlines()
    # the published bounds are rounded (and asymmetric), so the rebuilt bounds may differ in the last digit
    row = r"\| 8 \| 10M \| 4 \| -0\.099 \[(-0\.\d{3}), (-0\.\d{3})\] \| \+0\.150 \[0\.147, 0\.153\] \| 1\.00 \|"
    lo, hi = (float(v) for v in re.fullmatch(row, md[2]).groups())
    assert (lo, hi) == pytest.approx((-0.117, -0.082), abs=1.5e-3)
    assert md[3] == PUBLISHED_ROWS[1]


# ---------------------------------------------------------------- sign flip


def flip_pairs(means_by_budget, k=8, seeds=1, spread=0.01):
    rows = []
    for t, m in means_by_budget.items():
        offsets = np.linspace(-spread, spread, seeds) if seeds > 1 else [0.0]
        rows += [{"k": k, "tokens": t, "seed": s, "d_ce_rec": m + o} for s, o in enumerate(offsets)]
    return pd.DataFrame(rows)


def test_sign_flip_known_crossing_without_interval_for_n1():
    out = S.sign_flip(flip_pairs({10**6: -0.1, 10**8: 0.1}))
    row = out.iloc[0]
    assert row["t_star"] == pytest.approx(1e7)
    assert (row["direction"], row["status"]) == ("up", "crossing")
    assert math.isnan(row["t_star_lo"]) and math.isnan(row["t_star_hi"])


def test_sign_flip_interpolates_in_log_t_and_bootstraps():
    pairs = flip_pairs({10**6: -0.3, 10**7: -0.1, 10**9: 0.1}, seeds=3)
    row = S.sign_flip(pairs, n_boot=400, seed=1).iloc[0]
    assert row["t_star"] == pytest.approx(1e8)  # halfway between 1e7 and 1e9 in log10
    assert 1e7 < row["t_star_lo"] <= row["t_star"] <= row["t_star_hi"] < 1e9
    assert row["boot_frac_in_range"] == 1.0
    again = S.sign_flip(pairs, n_boot=400, seed=1)
    assert again.iloc[0]["t_star_lo"] == row["t_star_lo"]


def test_sign_flip_statuses():
    pairs = pd.concat([flip_pairs({10**6: 0.2, 10**7: -0.2}, k=8),
                       flip_pairs({10**6: 0.1, 10**7: 0.2}, k=16),
                       flip_pairs({10**6: -0.1}, k=32)])
    out = S.sign_flip(pairs).set_index("k")
    assert (out.loc[8, "direction"], out.loc[8, "status"]) == ("down", "crossing")
    assert out.loc[8, "t_star"] == pytest.approx(10**6.5)
    assert out.loc[16, "status"] == "no crossing in range" and math.isnan(out.loc[16, "t_star"])
    assert out.loc[32, "status"] == "insufficient data"


def _noise_cell(n_seq=400, seeds=3, rng=None, tile=1):
    """One (k, T) cell: per-sequence CE sums of `seeds` small/large SAE pairs sharing one eval set."""
    rng = rng or np.random.default_rng(0)
    preds = rng.integers(20, 60, n_seq).astype(float)
    clean = {r: preds * (3.0 + 0.4 * rng.standard_normal(n_seq)) for r in ("small", "large")}
    rows, pairs = [], []
    for s in range(seeds):
        sides = {}
        for role, bump in (("small", 0.30), ("large", 0.36)):
            sae = clean[role] + preds * (bump + 0.05 * s + 0.1 * rng.standard_normal(n_seq))
            sid = f"{role}-{s}"
            for rep in range(tile):
                rows += [{"sae_id": sid, "sequence": rep * n_seq + i, "ce_sae": sae[i], "ce_clean": clean[role][i],
                          "ce_zero": clean[role][i] * 3, "predictions": preds[i]} for i in range(n_seq)]
            sides[role] = (sid, 2 - sae.sum() / clean[role].sum())
        pairs.append({"k": 8, "tokens": 1000, "seed": s, "sae_id_small": sides["small"][0],
                      "sae_id_large": sides["large"][0], "d_ce_rec": sides["large"][1] - sides["small"][1]})
    return pd.DataFrame(pairs), pd.DataFrame(rows)


def test_eval_noise_against_a_brute_force_bootstrap():
    pairs, seqs = _noise_cell()
    got = S.eval_noise(pairs, seqs, n_boot=3000, seed=1).iloc[0]
    # independent path: resample indices, recompute every SAE's CE_rec from the resampled sums, by hand
    rng = np.random.default_rng(7)
    wide = {sid: g.sort_values("sequence") for sid, g in seqs.groupby("sae_id")}
    n_seq = len(wide["small-0"])
    means = []
    for _ in range(3000):
        idx = rng.integers(0, n_seq, n_seq)
        rec = lambda sid: 2 - wide[sid]["ce_sae"].to_numpy()[idx].sum() / wide[sid]["ce_clean"].to_numpy()[idx].sum()  # noqa: E731,E501
        means.append(np.mean([rec(r.sae_id_large) - rec(r.sae_id_small) for r in pairs.itertuples()]))
    assert got["d_ce_rec_eval_se"] == pytest.approx(np.std(means, ddof=1), rel=0.08)
    assert got["d_ce_rec_seed_sd"] == pytest.approx(pairs["d_ce_rec"].std(ddof=1), rel=1e-12)
    assert got["d_ce_rec_seed_se"] == pytest.approx(pairs["d_ce_rec"].std(ddof=1) / np.sqrt(3), rel=1e-12)
    assert got["eval_to_seed_se"] == pytest.approx(got["d_ce_rec_eval_se"] / got["d_ce_rec_seed_se"])
    assert got["n"] == 3 and list(S.eval_noise(pairs, seqs).columns) == S.EVAL_NOISE_COLUMNS


def test_eval_noise_on_pairs_built_by_pair():
    """pair() carries each side's sae_id, which eval_noise looks the per-sequence sums up by."""
    deltas = {(8, 10**6, 0): (-0.10, 0.20), (8, 10**6, 1): (-0.20, 0.10)}
    pairs = S.pair(S.dedupe(S.flatten_metrics(records_for(deltas)))[0])
    assert {"sae_id_small", "sae_id_large"} <= set(pairs.columns)
    rng = np.random.default_rng(0)
    seqs = pd.DataFrame([{"sae_id": sid, "sequence": i, "ce_sae": 4 + rng.random(), "ce_clean": 3 + rng.random(),
                          "ce_zero": 9.0} for sid in [*pairs["sae_id_small"], *pairs["sae_id_large"]]
                         for i in range(50)])
    noise = S.eval_noise(pairs, seqs, n_boot=200)
    assert noise["d_ce_rec_eval_se"].notna().all() and noise["d_ce_rec_eval_se"].iloc[0] > 0


def test_eval_noise_shrinks_as_one_over_root_n_and_needs_every_sae():
    pairs, seqs = _noise_cell(n_seq=200, rng=np.random.default_rng(3))
    _, tiled = _noise_cell(n_seq=200, rng=np.random.default_rng(3), tile=4)  # the same sequences, 4 times each
    se1 = S.eval_noise(pairs, seqs, n_boot=3000).iloc[0]["d_ce_rec_eval_se"]
    se4 = S.eval_noise(pairs, tiled, n_boot=3000).iloc[0]["d_ce_rec_eval_se"]
    assert se4 == pytest.approx(se1 / 2, rel=0.1)
    zero_norm = S.eval_noise(pairs, seqs, definition="zero_norm", n_boot=500).iloc[0]["d_ce_rec_eval_se"]
    assert np.isfinite(zero_norm) and zero_norm != pytest.approx(se1)
    missing = S.eval_noise(pairs, seqs[seqs["sae_id"] != "large-2"]).iloc[0]
    assert np.isnan(missing["d_ce_rec_eval_se"]) and np.isfinite(missing["d_ce_rec_seed_sd"])
    assert S.eval_noise(pairs.iloc[:0], seqs).empty


def test_regime_section_reads_the_table():
    from proxygap_helpers import summary

    pairs, seqs = _noise_cell()
    pairs = pairs.assign(tokens=1_228_800, tokens_per_latent_small=600.0, tokens_per_latent_large=300.0,
                         dead_frac_small=0.02, dead_frac_large=0.05, d_r2=0.1, mismatch=0)
    table = S.phase2_table(pairs).merge(S.eval_noise(pairs, seqs).drop(columns=["n", "tokens"]), on="k")
    text = summary.regime_text(table)
    assert "300 tokens per latent for the large model's SAE and 600 for the small one's" in text
    assert "0.98x the study's *lowest* budget" in text and "at most 5.0%" in text and "under the 10%" in text
    assert "dead-latent sweep" not in text
    above = summary.regime_text(table.assign(dead_frac_large_mean=0.66))
    assert "at most 66.0%" in above and "above the 10%" in above and "reports/dead_latents.md" in above
    frame = summary.regime_frame(table)
    assert frame.iloc[0]["dead latents (small, large)"] == "2.0%, 5.0%"
    assert frame.iloc[0]["tokens / latent (small, large)"] == "600, 300"
    assert frame.iloc[0]["eval / seed"] == pytest.approx(table["eval_to_seed_se"].iloc[0], abs=1e-5)
    assert "pending" in summary.regime_frame(None).iloc[0, 0]
