"""Model ladders and several hooks per model (issue 18).

* params: the two-model files keep their SAE ids, unit ids and hashes (the values below were computed on main
  before ladders existed); the list form, relative depths, pairs and settings; refusals name the key;
* one LM pass per model for all its hooks: ``resid_posts``, ``write_stores``, ``StoreSet``, the online source;
* the analysis across settings on synthetic tables (relabelling, stacking, claim counts, size trend by hand);
* a tiny ladder end to end on the smoke models plus a smaller one, two hooks each: ids and folders carry the
  hook, an SAE of a multi-hook unit equals the same SAE trained alone from the single-hook store, resume, the
  per-setting tables against the metrics, the report (one setting and the ladder summary) as one page.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from scipy.stats import t as scipy_t

from proxygap_helpers import activations, aggregate, extract, ladder, models, train
from proxygap_helpers.activations import OnlineSource, StoreSet, StoreSource, verify_store, write_store, write_stores
from proxygap_helpers.evaluate import evaluate_unit
from proxygap_helpers.grid import units
from proxygap_helpers.layout import metrics_path, sae_dir, store_dir
from proxygap_helpers.params import ParamsError, depth_layer, load_params, validate_params

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params"
SMOKE = PARAMS / "smoke.yaml"

# Computed with main's code (a4857d6), before model ladders: extract hash, first and last SAE id, sha256 of all
# SAE ids joined (first 12 hex digits) and the unit ids. Changed since, on purpose: smoke's, the bench grid's and
# phase2_pythia's SAE ids (the default decoder_init_norm is 1.0, Gao et al.'s, no longer SAELens' 0.1), and
# phase2_pythia's extract hash too (sae.batch_size 4000, which divides its budgets: the store size follows it), and
# its SAE ids again (the activation buffer capped at sae.buffer_bytes, 1 GiB: 2^19 / 2^18 rows at d_in 512 / 1024).
MAIN = {
    "params/smoke.yaml": ("e05f2868", "small-k8-t8192-s0-a3dc8170", "large-k16-t32768-s1-5075be18", "b7b73e757325",
                          ["extract-e05f2868", "sae-small-1of1-d33ec9c1", "sae-large-1of1-227b5bdb"]),
    "params/default.yaml": ("c83b9978", "small-k8-t122880-s0-d8c036e8", "large-k32-t1228800-s2-3e0c21cd",
                            "e1b850d7c330", ["extract-c83b9978", "sae-small-1of2-0e277d5e", "sae-small-2of2-d27c1658",
                                             "sae-large-1of2-3a064a72", "sae-large-2of2-25695ced"]),
    "params/regime.yaml": ("df63e442", "small-k8-t1228800-s0-c6843cd2", "large-k32-t12288k-s2-c378b240",
                           "15f8199b357c", ["extract-df63e442", "sae-small-1of2-ef5771d8", "sae-small-2of2-5e980ee5",
                                            "sae-large-1of2-d9c2b73e", "sae-large-2of2-a090a9d7"]),
    "params/phase2_pythia.yaml": ("cc8077fa", "small-k8-t10M-s0-a026d590", "large-k32-t100M-s3-7f5f9e3a",
                                  "55b1a9152140", ["extract-cc8077fa", "sae-small-1of2-bc0c4310",
                                                   "sae-small-2of2-c4bfb713", "sae-large-1of2-1f4ce5aa",
                                                   "sae-large-2of2-37cdb053"]),
    "benchmarks/grid.yaml": ("3518093c", "small-k16-t40960-s0-07192a12", "large-k16-t163840-s1-458e8028",
                             "28381d57b74a", ["extract-3518093c", "sae-small-1of1-9007431e", "sae-large-1of1-2c3477c8"]),
}
# params_hash (provenance only): changed by executor.jobs 'auto' in these files and smoke's decoder_init_norm
PARAMS_HASH = {"params/smoke.yaml": "0fae57e4", "params/default.yaml": "9322ae09", "params/regime.yaml": "85cb3f24"}


def _ids_hash(p) -> str:
    return hashlib.sha256("".join(s.sae_id for s in p.sae_specs()).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- params
@pytest.mark.parametrize("path", sorted(MAIN))
def test_two_model_files_keep_their_ids(path):
    p = load_params(REPO / path)
    extract_hash, first, last, ids, unit_ids = MAIN[path]
    specs = p.sae_specs()
    assert (p.extract_hash, specs[0].sae_id, specs[-1].sae_id, _ids_hash(p)) == (extract_hash, first, last, ids)
    got = [u.uid for u in units(p, Path("/x"), Path("/x/p.yaml"))]
    assert got == [*unit_ids, "aggregate", "report"]
    assert p.roles == ("small", "large") and not p.multi_hook and len(p.settings()) == 1
    assert [u.executions() for u in units(p, Path("/x"), Path("/x/p.yaml"))][-1] == [("05_report", "05_report", {})]
    if path in PARAMS_HASH:
        assert p.params_hash() == PARAMS_HASH[path]


def test_two_models_as_a_list_are_the_two_role_grid():
    """The list form with roles small and large is the same grid: same ids, hashes and settings."""
    import yaml

    raw = yaml.safe_load(SMOKE.read_text())
    as_list = {**raw, "models": [{"role": r, **raw["models"][r]} for r in ("small", "large")]}
    p, q = load_params(SMOKE), validate_params(as_list)
    assert [s.sae_id for s in p.sae_specs()] == [s.sae_id for s in q.sae_specs()]
    assert (p.extract_hash, p.eval_hash, p.params_hash()) == (q.extract_hash, q.eval_hash, q.params_hash())
    mapping_written_large_first = {**raw, "models": {"large": raw["models"]["large"], "small": raw["models"]["small"]}}
    assert validate_params(mapping_written_large_first).roles == ("small", "large")


@pytest.mark.parametrize("depth,n_layers,layer", [(0.25, 4, 0), (0.5, 4, 1), (0.75, 4, 2), (0.25, 8, 1),
                                                  (0.75, 8, 5), (0.3, 10, 2), (0.5, 6, 2), (0.5, 5, 2)])
def test_relative_depth_is_the_block_that_ends_that_share(depth, n_layers, layer):
    assert depth_layer(depth, n_layers) == layer
    assert (layer + 1) / n_layers >= depth - 1e-12 and layer / n_layers < depth  # the first block reaching it
    mid = load_params(SMOKE, overrides={"models.small.n_layers": n_layers})
    if depth == 0.5:
        assert mid.layer("small") == layer, "depth 0.5 is 'mid'"


def test_ladder_params_files():
    p = load_params(PARAMS / "ladder.yaml")
    assert p.roles == ("m1", "m2", "m3") and p.multi_hook and p.embedded
    assert {r: p.layers(r) for r in p.roles} == {"m1": [0, 2], "m2": [0, 2], "m3": [1, 5]}
    assert [s.label for s in p.settings()] == ["m1-m2@d0.25", "m1-m2@d0.75", "m2-m3@d0.25", "m2-m3@d0.75",
                                               "m1-m3@d0.25", "m1-m3@d0.75"]
    specs = p.sae_specs()
    assert len(specs) == 3 * 2 * len(p.sae.k) * len(p.sae.tokens) * len(p.sae.seeds)
    assert all(s.sae_id.startswith(f"{s.role}-L{s.layer}-k{s.k}-") for s in specs)
    assert len({s.sae_id for s in specs}) == len(specs)
    us = units(p, Path("/x"), Path("/x/p.yaml"))
    assert [u.uid.rsplit("-", 1)[0] for u in us if u.stage == "sae"] == [
        "sae-m1-L0+L2-1of2", "sae-m1-L0+L2-2of2", "sae-m2-L0+L2-1of2", "sae-m2-L0+L2-2of2", "sae-m3-L1+L5-1of2",
        "sae-m3-L1+L5-2of2"]
    report = us[-1].executions()
    assert [r[1] for r in report] == [f"05_report-{s.label}" for s in p.settings()] + ["06_ladder"]
    assert report[0][2] == {"setting": "m1-m2@d0.25"}
    pythia = load_params(PARAMS / "ladder_pythia.yaml")
    assert {r: pythia.hook(r) for r in pythia.roles} == {"p70m": "blocks.2.hook_resid_post",
                                                         "p160m": "blocks.5.hook_resid_post",
                                                         "p410m": "blocks.11.hook_resid_post"}
    assert [s.label for s in pythia.settings()] == ["p70m-p160m", "p160m-p410m", "p70m-p410m"]
    assert pythia.sae.tokens == [10_000_000, 50_000_000, 100_000_000] and not pythia.multi_hook
    assert all(s.sae_id.startswith(f"{s.role}-k") for s in pythia.sae_specs())


def test_the_hook_keys_the_sae_and_pairs_do_not():
    p = load_params(SMOKE, overrides={"models.small.layer": [0, 1], "models.large.layer": [1, 2]})
    a, b = (p.sae_specs(role="small", k=8, seed=0, layer=L)[0] for L in (0, 1))
    assert a.sae_id.startswith("small-L0-k8-") and b.sae_id.startswith("small-L1-k8-")
    assert a.sae_id.split("-")[-1] != b.sae_id.split("-")[-1], "the layer is part of the SAE hash"
    assert [(s.label, s.layer_small, s.layer_large) for s in p.settings()] == [("small-large@h1", 0, 1),
                                                                             ("small-large@h2", 1, 2)]
    three = {"name": "t", "data": {"source": "sympy"}, "sae": {"k": [8], "tokens": [4096], "seeds": [0]},
             "models": [{"role": r, "source": "embedded", "d_model": d, "n_layers": 4, "n_heads": 2,
                         "train_tokens": 1000} for r, d in (("a", 16), ("b", 32), ("c", 64))]}
    cons, wide = validate_params(three), validate_params({**three, "pairs": "with_smallest"})
    assert cons.pair_list() == [("a", "b"), ("b", "c")] and wide.pair_list() == [("a", "b"), ("b", "c"), ("a", "c")]
    assert [s.sae_id for s in cons.sae_specs()] == [s.sae_id for s in wide.sae_specs()], "pairs shape no SAE"
    assert cons.n_params("c") / cons.n_params("a") == 16.0


BAD_LADDERS = {
    "unordered": ([("a", 64, 4), ("b", 32, 4)], {}, ("models", "ordered by size", "'b'")),
    "one model": ([("a", 32, 4)], {}, ("models", "two or more")),
    "bad role name": ([("a-1", 32, 4), ("b", 64, 4)], {}, ("models", "'a-1'")),
    "depth on the last block": ([("a", 32, 4), ("b", 64, 4)], {"depths": [0.25, 0.9]}, ("depths", "last block")),
    "depths collide": ([("a", 32, 2), ("b", 64, 4)], {"depths": [0.25, 0.5]}, ("depths", "not all distinct")),
    "depth out of range": ([("a", 32, 4), ("b", 64, 4)], {"depths": [0.5, 1.0]}, ("depths", "between 0 and 1")),
    "depths and a layer": ([("a", 32, 4), ("b", 64, 4, 1)], {"depths": [0.5]}, ("models.b.layer", "depths")),
    "unequal hook counts": ([("a", 32, 4, [0, 1]), ("b", 64, 4, 2)], {}, ("same number of hooks",)),
}


def test_the_resolved_params_of_a_depth_sweep_load_again(tmp_path):
    """params.resolved.yaml (what every notebook reads) writes each model's default layer 'mid' out; with
    ``depths`` that must still validate as the same grid."""
    from proxygap_helpers.params import dump_resolved

    p = load_params(PARAMS / "ladder.yaml")
    (tmp_path / "r.yaml").write_text(dump_resolved(p))
    q = load_params(tmp_path / "r.yaml")
    assert [s.sae_id for s in q.sae_specs()] == [s.sae_id for s in p.sae_specs()] and q.settings() == p.settings()


@pytest.mark.parametrize("case", sorted(BAD_LADDERS))
def test_bad_ladders_are_refused_naming_the_key(case):
    entries, extra, must = BAD_LADDERS[case]
    models_ = [{"role": e[0], "source": "embedded", "d_model": e[1], "n_layers": e[2], "n_heads": 2,
                "train_tokens": 1000, **({"layer": e[3]} if len(e) > 3 else {})} for e in entries]
    raw = {"name": "t", "data": {"source": "sympy"}, "sae": {"k": [8], "tokens": [4096], "seeds": [0]},
           "models": models_, **extra}
    with pytest.raises(ParamsError) as err:
        validate_params(raw)
    for s in must:
        assert s in str(err.value), (s, str(err.value))
    missing_role = {**raw, "models": [{k: v for k, v in m.items() if k != "role"} for m in models_]}
    with pytest.raises(ParamsError, match="needs a `role`"):
        validate_params(missing_role)


# --------------------------------------------------------------------------- one LM pass, every hook
@pytest.fixture(scope="module")
def large_lm(smoke_out):
    return models.load_hf(str(smoke_out / "models" / "large"))


def test_one_forward_captures_every_hook_and_writes_every_store(large_lm, smoke_out, tmp_path, one_thread):
    seqs = np.load(smoke_out / "data" / "eval_tokens.npy")[:10]
    x = torch.from_numpy(seqs.astype(np.int64))
    got = models.resid_posts(large_lm, x, [2, 0, 1])
    for layer in (0, 1, 2):  # the same values as a forward stopped at that block alone
        assert torch.equal(got[layer], models.resid_post(large_lm, x, layer))
    calls = []
    h = large_lm.gpt_neox.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        metas = write_stores(large_lm, {L: (tmp_path / f"L{L}", {"role": "large"}) for L in (0, 2)}, seqs,
                             batch_sequences=4, progress=False)
    finally:
        h.remove()
    assert len(calls) == 3, "one forward per batch of 4 rows for both hooks"
    for L in (0, 2):
        alone = write_store(large_lm, L, seqs, tmp_path / f"alone{L}", {"role": "large"}, batch_sequences=4,
                            progress=False)
        assert metas[L]["content_hash"] == alone["content_hash"] and metas[L]["layer"] == L
        assert verify_store(tmp_path / f"L{L}")["content_hash"] == alone["content_hash"]


def test_store_set_reads_the_stores_in_step(smoke_out, tmp_path):
    a, b = store_dir(smoke_out, "small"), store_dir(smoke_out, "large")
    both = StoreSet({0: a, 1: b}).chunks(300, seed=3)
    one, two = StoreSource(a).chunks(300, seed=3), StoreSource(b).chunks(300, seed=3)
    for _ in range(5):
        c, chunk = next(both)
        (c1, x1), (c2, x2) = next(one), next(two)
        assert c == c1 == c2 and torch.equal(chunk[0], x1) and torch.equal(chunk[1], x2)


def test_online_source_gives_every_hook_from_one_forward(large_lm):
    def text(seed):
        rng = np.random.default_rng(5)
        while True:
            yield rng.integers(2, 500, 64).astype(np.int32)

    multi = OnlineSource(large_lm, [0, 2], text, batch_sequences=4)
    singles = {L: OnlineSource(large_lm, L, text, batch_sequences=4) for L in (0, 2)}
    stream = multi.chunks(600)
    streams = {L: s.chunks(600) for L, s in singles.items()}
    for _ in range(3):
        c, chunk = next(stream)
        for L in (0, 2):
            cs, x = next(streams[L])
            assert c == cs and torch.equal(chunk[L], x)
    assert multi.lm_forwards == singles[0].lm_forwards == singles[2].lm_forwards, "one forward for both hooks"
    assert multi.for_layer(2).layer == 2


def test_the_published_default_tables_are_what_the_ladder_code_computes(tmp_path):
    """reports/default was published by main's code before ladders (c20101a). From its published SAE metrics,
    today's per-setting path (the grid's one setting: ``side_rows`` keeps every row) writes the same pairs, cells,
    sign flip and proxy leaderboard, to 1e-12 relative (the CSVs keep full precision; numpy picks its summation
    kernels by the CPU's vector extensions, so another CPU may differ in the last bits: seen here, 2e-18 in MAE)."""
    from proxygap_helpers import claims, leaderboard, stats

    pub = REPO / "reports" / "default"
    p = load_params(PARAMS / "default.yaml")
    kept = pd.read_csv(pub / "sae_metrics.csv")
    (setting,) = p.settings()
    rows = ladder.side_rows(kept, p, setting)
    pd.testing.assert_frame_equal(rows, kept)

    def same_as_published(name, df):
        aggregate._csv(df, tmp_path / f"{name}.csv")  # as run_aggregate writes it
        mine, published = pd.read_csv(tmp_path / f"{name}.csv"), pd.read_csv(pub / f"{name}.csv")
        pd.testing.assert_frame_equal(mine, published[mine.columns], check_exact=False, rtol=1e-12, atol=1e-15)

    pairs = stats.pair(rows)
    same_as_published("pairs", pairs)
    table = stats.phase2_table(pairs, level=p.stats.ci, bootstrap=p.stats.bootstrap, seed=p.stats.seed)
    same_as_published("phase2_table", table)  # (its eval-noise columns need the unpublished per-sequence CE)
    n_boot = max(p.stats.bootstrap, 200)
    same_as_published("sign_flip", stats.sign_flip(pairs, n_boot=n_boot, seed=p.stats.seed))
    board = leaderboard.proxy_leaderboard(pairs, n_boot=n_boot, seed=p.stats.seed)
    same_as_published("proxy_leaderboard", board)
    same_as_published("claims", claims.evaluate_claims(table, pairs, board, p.claims, grid=(p.sae.k, p.sae.tokens)))


def test_the_published_ladder_is_the_ladder_params_and_its_tables_agree():
    """reports/ladder: its settings are params/ladder.yaml's, every setting has every cell with all seeds, the
    ladder table is the phase-2 table beside the size ratios, and each claim's summary row counts its rows."""
    pub = REPO / "reports" / "ladder"
    p = load_params(PARAMS / "ladder.yaml")
    settings = pd.read_csv(pub / "settings.csv")
    pd.testing.assert_frame_equal(settings, ladder.settings_table(p), check_dtype=False)
    assert set(settings["family"]) == {"gpt_neox"}
    html = (pub / "report.html").read_text()
    assert "Across model families" not in html and html.count("What the gap is made of") == len(p.settings())
    metrics = pd.read_csv(pub / "sae_metrics.csv")
    assert set(metrics["sae_id"]) == {s.sae_id for s in p.sae_specs()}
    table = pd.read_csv(pub / "phase2_table.csv")
    assert len(table) == len(p.settings()) * len(p.sae.k) * len(p.sae.tokens) and (table["n"] == 3).all()
    pd.testing.assert_frame_equal(pd.read_csv(pub / "ladder.csv"), ladder.ladder_table(table, settings),
                                  check_dtype=False)
    pd.testing.assert_frame_equal(pd.read_csv(pub / "size_trend.csv"), ladder.size_trend(ladder.ladder_table(
        table, settings)), check_dtype=False)
    claims = pd.read_csv(pub / "claims.csv")
    per = claims[claims["setting"] != ladder.SUMMARY_LABEL]
    summary = claims[claims["setting"] == ladder.SUMMARY_LABEL].set_index("claim")
    for claim, g in per.groupby("claim"):
        assert summary.loc[claim, "n_settings"] == len(g) == len(p.settings())
        for status in ("supported", "rejected", "pending"):
            assert summary.loc[claim, f"n_{status}"] == (g["status"] == status).sum()


# --------------------------------------------------------------------------- the analysis across settings
def _setting_params():
    return load_params(SMOKE, overrides={"models.small.layer": [0, 1], "models.large.layer": [1, 2]})


def test_side_rows_stack_and_setting_view():
    p = _setting_params()
    s1, s2 = p.settings()
    m = pd.DataFrame({"model_role": ["small", "small", "large", "large"], "sae_id": list("abcd"),
                      "hook": [p.hook("small", 0), p.hook("small", 1), p.hook("large", 1), p.hook("large", 2)]})
    side = ladder.side_rows(m, p, s2)
    assert list(side["sae_id"]) == ["b", "d"] and list(side["model_role"]) == ["small", "large"]
    stacked = ladder.stack([(s1, pd.DataFrame({"k": [8]})), (s2, pd.DataFrame({"k": [16]}))])
    assert list(stacked.columns) == ["setting", "pair", "hook", "k"]
    assert stacked.values.tolist() == [["small-large@h1", "small-large", "h1", 8],
                                       ["small-large@h2", "small-large", "h2", 16]]
    view = ladder.setting_view({"pairs": stacked, "sae_metrics": m}, p, "small-large@h2")
    assert view["pairs"].values.tolist() == [[16]] and list(view["sae_metrics"]["sae_id"]) == ["b", "d"]
    with pytest.raises(ValueError, match="small-large@h1"):
        ladder.setting_view({"pairs": stacked}, p, None)


def test_claims_summary_counts_each_claims_settings():
    rows = [("s1", "C1", "supported"), ("s2", "C1", "supported"), ("s3", "C1", "supported"),
            ("s1", "C2", "supported"), ("s2", "C2", "rejected"), ("s3", "C2", "pending")]
    per = pd.DataFrame([{"setting": s, "claim": c, "gate": "-", "statement": c, "status": st} for s, c, st in rows])
    out = ladder.claims_summary(per).set_index("claim")
    assert out.loc["C1", "status"] == "supported" and out.loc["C2", "status"] == "mixed"
    assert out.loc["C2", ["n_settings", "n_supported", "n_rejected", "n_pending"]].tolist() == [3, 1, 1, 1]
    assert "supported in 1 of 3 settings (s1)" in out.loc["C2", "evidence"]
    matrix = ladder.claims_matrix(pd.concat([per, ladder.claims_summary(per)], ignore_index=True))
    assert matrix.loc["C2"].tolist() == ["supported", "rejected", "pending", "1 of 3"]


def test_size_trend_by_hand():
    ladder_rows = pd.DataFrame({"hook": ["d0.5"] * 3, "k": [8] * 3, "tokens": [1000] * 3,
                                "size_ratio": [4.0, 8.0, 32.0], "d_ce_rec_mean": [-0.1, -0.2, -0.5],
                                "d_r2_mean": [0.01, 0.03, 0.02]})
    trend = ladder.size_trend(ladder_rows).iloc[0]
    x = np.log10([4.0, 8.0, 32.0])
    for col, y in (("d_ce_rec_slope", [-0.1, -0.2, -0.5]), ("d_r2_slope", [0.01, 0.03, 0.02])):
        y = np.array(y)
        by_hand = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
        assert trend[col] == pytest.approx(by_hand)
    assert (trend["n_pairs"], trend["size_ratio_min"], trend["size_ratio_max"]) == (3, 4.0, 32.0)
    assert (trend["d_ce_rec_at_min"], trend["d_ce_rec_at_max"]) == (-0.1, -0.5)
    one = ladder.size_trend(ladder_rows.iloc[:1]).iloc[0]
    assert np.isnan(one["d_ce_rec_slope"]), "one size ratio: no slope"
    assert np.isnan(one["d_ce_rec_at_min"]) and np.isnan(one["d_r2_at_max"]), "no size trend to read"
    # two pairs at the smallest ratio (e.g. doubling the width twice): their mean, not whichever sorts first
    tied = pd.concat([ladder_rows, ladder_rows.iloc[:1].assign(d_ce_rec_mean=-0.3, d_r2_mean=0.05)])
    t = ladder.size_trend(tied).iloc[0]
    assert t["n_pairs"] == 4 and t["d_ce_rec_at_min"] == pytest.approx(-0.2) and t["d_r2_at_min"] == pytest.approx(0.03)
    assert t["d_ce_rec_at_max"] == -0.5
    same = ladder.size_trend(ladder_rows.assign(size_ratio=4.0)).iloc[0]
    assert np.isnan(same["d_ce_rec_at_min"]) and np.isnan(same["d_ce_rec_slope"]), "every pair 4x: no trend"


# --------------------------------------------------------------------------- a tiny ladder, end to end
LADDER = {"sae.k": [8], "sae.tokens": [2048, 4096], "sae.seeds": [0, 1], "stats.bootstrap": 50,
          "models.small.layer": [0, 1], "models.large.layer": [1, 2]}
XS = {"source": "embedded", "d_model": 16, "n_layers": 2, "n_heads": 2, "train_tokens": 30_000, "batch_size": 16,
      "lr": 0.003, "layer": [0, 1]}


def _tiny_ladder(tmp_path_factory, smoke_params):
    """Smoke's two models (their layers as lists: two hooks each) below a smaller third, as a list; the store the
    size of smoke's, so that its rows are smoke's rows."""
    import yaml

    raw = yaml.safe_load(SMOKE.read_text())
    for key, value in {**LADDER, "name": "tiny-ladder", "data.store_tokens": smoke_params.store_tokens}.items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    raw["models"] = [{"role": "xs", **XS}, {"role": "small", **raw["models"]["small"]},
                     {"role": "large", **raw["models"]["large"]}]
    path = tmp_path_factory.mktemp("params") / "tiny-ladder.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _run_sae_units(p, out, only=None):
    trained = []
    for u in units(p, out, out / "params.resolved.yaml"):
        if u.stage != "sae" or (only is not None and u.uid != only):
            continue
        role = u.parameters["role"]
        specs = [s for s in p.sae_specs(role=role) if s.sae_id in u.sae_ids]
        source = extract.activation_source(p, out, role, [s.layer for s in specs], "cpu")
        trained += train.train_unit(p, specs, source, out, extract.model_name(p, role), p.data.context_size,
                                    progress=False)
        evaluate_unit(p, role, out, sae_ids=u.sae_ids, progress=False)
    return trained


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smoke_out, smoke_params):
    """The tiny ladder extracted (the smoke models from the session cache), trained, evaluated and aggregated,
    with the LM forwards of the extract counted per model."""
    path = _tiny_ladder(tmp_path_factory, smoke_params)
    p = load_params(path)
    out = tmp_path_factory.mktemp("tiny_ladder")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # smoke_out's models were trained with one thread: the cache serves them
    calls: dict = {}
    real = models.resid_posts

    def counted(model, x, layers):
        calls[model.config.hidden_size] = calls.get(model.config.hidden_size, 0) + 1
        return real(model, x, layers)
    activations.resid_posts = counted  # what write_stores calls (imported from models at module level)
    try:
        info = extract.run_extract(p, out, progress=False)
    finally:
        activations.resid_posts = real
    try:
        trained = _run_sae_units(p, out)
        agg = aggregate.run_aggregate(p, out)
    finally:
        torch.set_num_threads(threads)
    return {"p": p, "path": path, "out": out, "info": info, "calls": calls, "trained": trained, "agg": agg}


def test_stores_and_ids_carry_the_hook(tiny, smoke_out):
    p, out = tiny["p"], tiny["out"]
    n_batches = -(-p.store_tokens // p.data.context_size // 32)
    assert tiny["calls"] == {16: n_batches, 32: n_batches, 64: n_batches}, "one LM pass per model, not per hook"
    assert sorted(tiny["info"]["stores"]) == ["large L1", "large L2", "small L0", "small L1", "xs L0", "xs L1"]
    for role in p.roles:
        for L in p.layers(role):
            meta = verify_store(store_dir(out, role, L))
            assert meta["hook"] == p.hook(role, L) and meta["layer"] == L
    assert not (store_dir(out, "small") / "meta.json").exists()
    # smoke's small model at its only hook (mid = blocks.0) on the same rows: the same store, bit for bit
    assert verify_store(store_dir(out, "small", 0))["content_hash"] == verify_store(store_dir(smoke_out,
                                                                                           "small"))["content_hash"]
    saes = sorted(d.name for d in (out / "saes").iterdir())
    assert len(saes) == len(p.sae_specs()) == 3 * 2 * 1 * 2 * 2
    assert all(any(s.startswith(f"{r}-L{L}-k8-") for r in p.roles for L in p.layers(r)) for s in saes)
    for s in p.sae_specs():
        rec = json.loads(metrics_path(out, s.sae_id).read_text())
        assert (rec["model_role"], rec["hook"]) == (s.role, p.hook(s.role, s.layer))


def test_an_sae_of_a_multi_hook_unit_is_the_sae_trained_alone(tiny, smoke_out, smoke_params, tmp_path, one_thread):
    """The shared stream of two hooks gives each hook's SAEs exactly their single-hook training."""
    p = tiny["p"]
    spec = next(s for s in p.sae_specs(role="small", layer=0) if s.tokens == 4096 and s.seed == 1)
    alone = load_params(SMOKE, overrides={k: v for k, v in LADDER.items() if k.startswith(("sae.", "stats."))})
    ref = next(s for s in alone.sae_specs(role="small") if s.tokens == 4096 and s.seed == 1)
    train.train_unit(alone, [ref], StoreSource(store_dir(smoke_out, "small")), tmp_path, "m", 64, progress=False)
    a = load_file(sae_dir(tiny["out"], spec.sae_id) / "sae_weights.safetensors")
    b = load_file(sae_dir(tmp_path, ref.sae_id) / "sae_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_retrains_only_what_is_missing(tiny, tmp_path, one_thread):
    p, src = tiny["p"], tiny["out"]
    out = tmp_path / "copy"
    shutil.copytree(src, out, symlinks=True)
    unit = next(u for u in units(p, out, out / "p.yaml") if u.uid.startswith("sae-large-L1+L2-"))
    victim = next(i for i in unit.sae_ids if "-L2-" in i)
    shutil.rmtree(sae_dir(out, victim))
    metrics_path(out, victim).unlink()
    before = json.loads(metrics_path(src, victim).read_text())
    trained = _run_sae_units(p, out, only=unit.uid)
    assert [m["sae_id"] for m in trained] == [victim]
    after = json.loads(metrics_path(out, victim).read_text())
    for key in ("ce_sae", "ce_rec", "r2", "kl", "swd", "l0", "dead_frac"):
        assert after[key] == before[key], key
    agg = aggregate.run_aggregate(p, out)
    for name in ("pairs", "phase2_table", "claims"):
        pd.testing.assert_frame_equal(agg[name], tiny["agg"][name])


def test_per_setting_tables(tiny):
    p, agg = tiny["p"], tiny["agg"]
    settings = p.settings()
    assert [s.label for s in settings] == ["xs-small@h1", "xs-small@h2", "small-large@h1", "small-large@h2"]
    metrics = {s.sae_id: json.loads(metrics_path(tiny["out"], s.sae_id).read_text()) for s in p.sae_specs()}
    pairs = agg["pairs"]
    assert list(pairs.columns[:3]) == ladder.SETTING_COLUMNS
    for s in settings:
        rows = pairs[pairs["setting"] == s.label]
        assert len(rows) == len(p.sae.k) * len(p.sae.tokens) * len(p.sae.seeds)
        for r in rows.itertuples():
            small, large = metrics[r.sae_id_small], metrics[r.sae_id_large]
            assert (small["model_role"], small["hook"]) == (s.small, p.hook(s.small, s.layer_small))
            assert (large["model_role"], large["hook"]) == (s.large, p.hook(s.large, s.layer_large))
            assert (small["k"], small["tokens"], small["seed"]) == (large["k"], large["tokens"], large["seed"])
            assert r.d_ce_rec == large["ce_rec"] - small["ce_rec"] and r.d_r2 == large["r2"] - small["r2"]
        table = agg["phase2_table"][agg["phase2_table"]["setting"] == s.label]
        assert table["n"].tolist() == [2, 2]
        for t in table.itertuples():
            d = rows[rows["tokens"] == t.tokens]["d_ce_rec"].to_numpy()
            half = scipy_t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
            assert t.d_ce_rec_mean == pytest.approx(d.mean()) and t.d_ce_rec_lo == pytest.approx(d.mean() - half)
    claims = agg["claims"]
    per = claims[claims["setting"] != ladder.SUMMARY_LABEL]
    assert len(per) == 4 * 6 and set(per["setting"]) == {s.label for s in settings}
    summary = claims[claims["setting"] == ladder.SUMMARY_LABEL].set_index("claim")
    for c, g in per.groupby("claim"):
        assert summary.loc[c, "n_supported"] == (g["status"] == "supported").sum()
        assert summary.loc[c, "n_settings"] == 4
    info = agg["settings"].set_index("setting")
    assert info.loc["xs-small@h2", "size_ratio"] == (2 * 32 ** 2) / (2 * 16 ** 2)
    assert info.loc["small-large@h1", "large_hook"] == "blocks.1.hook_resid_post"
    lad = agg["ladder"]
    assert len(lad) == 4 * len(p.sae.tokens)
    trend = agg["size_trend"]
    assert set(trend["hook"]) == {"h1", "h2"} and (trend["n_pairs"] == 2).all()
    for t in trend.itertuples():
        g = lad[(lad["hook"] == t.hook) & (lad["tokens"] == t.tokens)].sort_values("size_ratio")
        x, y = np.log10(g["size_ratio"].to_numpy()), g["d_ce_rec_mean"].to_numpy()
        assert t.d_ce_rec_slope == pytest.approx((y[1] - y[0]) / (x[1] - x[0]))
    # what the report reads back: one setting, small and large its two sides
    view = aggregate.load_aggregate(tiny["out"], p, "xs-small@h2")
    assert "setting" not in view["pairs"].columns and len(view["pairs"]) == 4
    assert sorted(view["sae_metrics"]["model_role"].unique()) == ["large", "small"]
    assert set(view["sae_metrics"]["model_name"]) == {p.models["xs"].name, p.models["small"].name}


def test_the_report_has_a_section_per_setting_and_the_ladder_summary(tiny, tmp_path, monkeypatch):
    """The report unit with one of the settings and the summary (the others are the same notebook): one page,
    the summary first; a sign-flip figure per setting and the ladder figure beside it."""
    from proxygap_helpers import plan
    from proxygap_helpers.executors import run_unit
    from proxygap_helpers.grid import report_unit

    p, out = tiny["p"], tmp_path / "out"
    shutil.copytree(tiny["out"], out, symlinks=True)
    # the report's next-budget cost reads plan's calibration: seeded with made-up rates (calibrating three models
    # would take half a minute), in the session cache that the report's kernel reads too
    monkeypatch.setenv("PROXYGAP_THREADS", "1")
    monkeypatch.setattr(plan, "_calibrate_units", lambda p, role: {"sae_tok_s": 1e5, "sae_aux_tok_s": 5e4,
                                                                   "eval_forward_tok_s": 1e5, "threads": 1})
    monkeypatch.setattr(plan, "_calibrate_lm", lambda p, role: {"forward_tok_s": 1e5, "train_tok_s": 1e4})
    plan.calibration(p, out)
    (out / "params.resolved.yaml").write_text(tiny["path"].read_text())
    unit = report_unit(p, {"params_path": str(out / "params.resolved.yaml"), "out_dir": str(out)})
    unit.runs = (unit.runs[-2], unit.runs[-1])  # small-large@h2, then the summary
    res = run_unit(str(out / "params.resolved.yaml"), str(out), unit, threads=1)
    assert res["ok"], res.get("message")
    html = (out / "reports" / "report.html").read_text()
    assert html.index("Across the ladder") < html.index("Setting small-large@h2")
    assert "Claims across the ladder" in html and "size ratio" in html
    assert "Across model families" not in html and "One family" not in html  # one family: no such section
    published = {f.name for f in (out / "reports").iterdir()}
    assert {"ladder.png", "ladder.csv", "size_trend.csv", "settings.csv"} <= published
    assert {f"sign_flip_{s.label}.png" for s in p.settings()} <= published
