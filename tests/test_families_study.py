"""The study across model families (``pairs: within_family``, params/families.yaml): params, the family tables by
hand, and a tiny grid end to end (smoke's GPT-NeoX pair beside the same shapes as Llama), its report included."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from proxygap_helpers import aggregate, extract, families, ladder, plots, train
from proxygap_helpers.activations import verify_store
from proxygap_helpers.evaluate import evaluate_unit
from proxygap_helpers.grid import units
from proxygap_helpers.layout import store_dir
from proxygap_helpers.params import FAMILIES, ParamsError, load_params, validate_params

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "params" / "smoke.yaml"


# --------------------------------------------------------------------------- params
def test_the_published_families_grid():
    p = load_params(REPO / "params" / "families.yaml")
    default = load_params(REPO / "params" / "default.yaml")
    assert [s.label for s in p.settings()] == ["neox_s-neox_l", "llama_s-llama_l", "gpt2_s-gpt2_l"]
    assert [p.family(r) for r in p.roles] == ["gpt_neox"] * 2 + ["llama"] * 2 + ["gpt2"] * 2
    assert [p.skip_positions(r) for r in p.roles] == [0, 0, 1, 1, 0, 0]
    for fam in ("neox", "llama", "gpt2"):  # the default study's pair and SAE grid in each family
        for side, role in (("s", "small"), ("l", "large")):
            m, d = p.models[f"{fam}_{side}"], default.models[role]
            assert (m.d_model, m.n_layers, m.n_heads, m.train_tokens) == (d.d_model, d.n_layers, d.n_heads,
                                                                          d.train_tokens)
            assert p.layers(f"{fam}_{side}") == default.layers(role)
    assert p.sae.model_dump() == default.sae.model_dump() and p.data == default.data
    assert len(p.sae_specs()) == 3 * len(default.sae_specs())
    from proxygap_helpers.params import dump_resolved

    again = validate_params(yaml.safe_load(dump_resolved(p)))  # what the notebooks read: every default written out
    assert [s.sae_id for s in again.sae_specs()] == [s.sae_id for s in p.sae_specs()]


def test_pairs_never_mix_families():
    raw = yaml.safe_load(SMOKE.read_text())
    models = [{"role": f"{f}_{r}", **m, "family": f} for f in ("neox", "llama") for r, m in raw["models"].items()]
    mixed = {**raw, "models": models}
    with pytest.raises(ParamsError, match=r"key `pairs`.*2 families.*gpt_neox: neox_small, neox_large.*within_family"):
        validate_params(mixed)
    p = validate_params({**mixed, "pairs": "within_family"})
    assert p.pair_list() == [("neox_small", "neox_large"), ("llama_small", "llama_large")]
    with pytest.raises(ParamsError, match=r"every family needs two or more models; llama has one"):
        validate_params({**mixed, "models": models[:3], "pairs": "within_family"})
    swapped = models[:2] + models[2:][::-1]
    with pytest.raises(ParamsError, match=r"ordered by size, smallest first within each family"):
        validate_params({**mixed, "models": swapped, "pairs": "within_family"})


# --------------------------------------------------------------------------- the family tables by hand
def _phase2(rows):
    return pd.DataFrame([{"setting": s, "k": k, "tokens": t, "n": 3, "d_ce_rec_mean": ce, "d_ce_rec_lo": ce - w,
                          "d_ce_rec_hi": ce + w, "d_r2_mean": r2, "d_r2_lo": r2 - 0.01, "d_r2_hi": r2 + 0.01,
                          "mismatch_rate": mm} for s, k, t, ce, w, r2, mm in rows])


SETTINGS = pd.DataFrame({"setting": ["a-b", "c-d", "e-f"], "family": ["gpt_neox", "llama", "gpt2"]})


def test_sign_agreement_and_answer_by_hand():
    phase2 = _phase2([
        ("a-b", 8, 100, -0.02, 0.01, -0.05, 0.0), ("a-b", 8, 200, -0.01, 0.02, -0.03, 0.0),
        ("c-d", 8, 100, -0.03, 0.01, -0.04, 0.0), ("c-d", 8, 200, -0.02, 0.005, -0.02, 0.0),
        ("e-f", 8, 100, 0.01, 0.02, -0.01, 0.0), ("e-f", 8, 200, -0.01, 0.02, 0.02, 1 / 3),
    ])
    gaps = families.family_gaps(phase2, SETTINGS)
    assert list(gaps["family"]) == ["gpt_neox"] * 2 + ["gpt2"] * 2 + ["llama"] * 2  # the reference first
    signs = families.sign_agreement(gaps).set_index("family")
    assert signs.loc["gpt_neox", ["n_cells", "both_same_sign", "d_ce_rec_negative", "d_ce_rec_excludes_0"]].tolist() \
        == [2, 2, 2, 1]
    assert signs.loc["llama", ["both_same_sign", "d_ce_rec_excludes_0", "mismatch_cells"]].tolist() == [2, 2, 0]
    assert signs.loc["gpt2", ["d_ce_rec_same_sign", "d_r2_same_sign", "both_same_sign", "mismatch_cells"]].tolist() \
        == [1, 1, 0, 1]
    text = families.answer(families.sign_agreement(gaps), {"llama": "Llama", "gpt_neox": "GPT-NeoX"})
    assert text.startswith("**In part: the sign pattern holds in Llama only.**")
    assert "Llama: both signs as in GPT-NeoX in 2 of 2 cells" in text and "gpt2: both signs as in GPT-NeoX in 0 of 2" \
        in text
    agree = families.sign_agreement(gaps[gaps["family"] != "gpt2"])
    assert families.answer(agree).startswith("**Yes: the sign pattern holds in every family.**")
    claims = pd.DataFrame({"setting": ["a-b", "c-d", "e-f", "a-b", "c-d", "e-f", ladder.SUMMARY_LABEL],
                           "claim": ["C1"] * 3 + ["C2"] * 3 + ["C1"],
                           "status": ["rejected", "rejected", "supported", "pending", "pending", "pending", "mixed"]})
    matrix = families.claims_by_family(claims, SETTINGS, {"llama": "Llama"})
    assert list(matrix.columns) == ["gpt_neox", "Llama", "gpt2"]
    assert matrix.loc["C1"].tolist() == ["rejected", "rejected", "supported"]
    fig = plots.family_figure(gaps, {"llama": "Llama"})
    assert len(fig.axes) == 2 and "architecture" in fig.proxygap_caption


# --------------------------------------------------------------------------- a tiny grid, end to end
def _tiny_families(tmp_path_factory, smoke_params) -> Path:
    """Smoke's pair as GPT-NeoX (the session's cached smoke models) and the same shapes as Llama (briefly trained);
    the store the size of smoke's."""
    raw = yaml.safe_load(SMOKE.read_text())
    raw.update(name="tiny-families", pairs="within_family")
    raw["data"]["store_tokens"] = smoke_params.store_tokens
    raw["sae"].update(k=[8], tokens=[2048, 4096], seeds=[0, 1])
    raw["stats"]["bootstrap"] = 50
    neox = [{"role": f"neox_{r}", **m} for r, m in raw["models"].items()]
    llama = [{"role": f"llama_{r}", **m, "family": "llama", "train_tokens": 30_000} for r, m in raw["models"].items()]
    raw["models"] = neox + llama
    path = tmp_path_factory.mktemp("params") / "tiny-families.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smoke_out, smoke_params):
    path = _tiny_families(tmp_path_factory, smoke_params)
    p = load_params(path)
    out = tmp_path_factory.mktemp("tiny_families")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # smoke_out's models were trained with one thread: the cache serves them
    try:
        info = extract.run_extract(p, out, progress=False)
        for u in units(p, out, out / "params.resolved.yaml"):
            if u.stage != "sae":
                continue
            role = u.parameters["role"]
            specs = [s for s in p.sae_specs(role=role) if s.sae_id in u.sae_ids]
            source = extract.activation_source(p, out, role, [s.layer for s in specs], "cpu")
            train.train_unit(p, specs, source, out, extract.model_name(p, role), p.data.context_size, progress=False)
            evaluate_unit(p, role, out, sae_ids=u.sae_ids, progress=False)
        agg = aggregate.run_aggregate(p, out)
    finally:
        torch.set_num_threads(threads)
    (out / "params.resolved.yaml").write_text(path.read_text())
    return {"p": p, "path": path, "out": out, "info": info, "agg": agg}


def test_each_family_reads_its_own_rows_and_positions(tiny, smoke_out):
    """The GPT-NeoX models read smoke's store rows bit for bit (what the Llama models skip changes nothing of
    theirs); the Llama stores leave each row's first position out and hold the rows for that."""
    p, out = tiny["p"], tiny["out"]
    for side in ("small", "large"):
        assert verify_store(store_dir(out, f"neox_{side}"))["content_hash"] == \
            verify_store(store_dir(smoke_out, side))["content_hash"]
        meta = verify_store(store_dir(out, f"llama_{side}"))
        assert meta["skip_positions"] == 1 and meta["shape"][0] >= p.store_tokens
        assert meta["shape"][0] == meta["n_sequences"] * (p.data.context_size - 1)
    recs = tiny["agg"]["sae_metrics"]
    assert set(recs.loc[recs["model_role"].str.startswith("llama"), "skip_positions"]) == {1}
    assert set(recs.loc[recs["model_role"].str.startswith("neox"), "model_type"]) == {"gpt_neox"}


def test_the_aggregate_reads_family_by_family(tiny):
    agg = tiny["agg"]
    assert list(agg["settings"]["family"]) == ["gpt_neox", "llama"]
    gaps, signs = agg["family_gaps"], agg["family_signs"]
    assert len(gaps) == 2 * 2 and set(gaps["family"]) == {"gpt_neox", "llama"}
    per_setting = agg["phase2_table"].set_index(["setting", "k", "tokens"])
    for row in gaps.itertuples():
        setting = {"gpt_neox": "neox_small-neox_large", "llama": "llama_small-llama_large"}[row.family]
        assert row.d_ce_rec_mean == per_setting.loc[(setting, row.k, row.tokens), "d_ce_rec_mean"]
    assert signs.set_index("family").loc["gpt_neox", "both_same_sign"] == 2
    on_disk = aggregate.load_aggregate(tiny["out"])
    pd.testing.assert_frame_equal(on_disk["family_signs"], signs, check_dtype=False)


def test_the_report_opens_with_the_families(tiny, tmp_path, monkeypatch):
    from proxygap_helpers import plan
    from proxygap_helpers.executors import run_unit
    from proxygap_helpers.grid import report_unit

    p, out = tiny["p"], tmp_path / "out"
    shutil.copytree(tiny["out"], out, symlinks=True)
    monkeypatch.setenv("PROXYGAP_THREADS", "1")  # the report's next-budget cost reads plan's calibration: made up
    monkeypatch.setattr(plan, "_calibrate_units", lambda p, role: {"sae_tok_s": 1e5, "sae_aux_tok_s": 5e4,
                                                                   "eval_forward_tok_s": 1e5, "threads": 1})
    monkeypatch.setattr(plan, "_calibrate_lm", lambda p, role: {"forward_tok_s": 1e5, "train_tok_s": 1e4})
    plan.calibration(p, out)
    unit = report_unit(p, {"params_path": str(out / "params.resolved.yaml"), "out_dir": str(out)})
    unit.runs = (unit.runs[-2], unit.runs[-1])  # the Llama setting, then the summary
    res = run_unit(str(out / "params.resolved.yaml"), str(out), unit, threads=1)
    assert res["ok"], res.get("message")
    html = (out / "reports" / "report.html").read_text()
    assert html.index("Across model families") < html.index("Setting llama_small-llama_large")
    assert families.answer(tiny["agg"]["family_signs"], {"llama": "Llama (SmolLM2)", "gpt_neox": "GPT-NeoX (Pythia)"}
                           ).split("**")[1] in html
    assert "Llama (SmolLM2)" in html and np.isfinite(tiny["agg"]["family_gaps"]["d_ce_rec_mean"]).all()


# --------------------------------------------------------------------------- the published study
def test_the_published_families_report():
    """reports/families is params/families.yaml's grid: its settings with their families, every cell of every
    setting with all seeds, and the family tables and the report's answer as the code derives them from its
    phase-2 table."""
    pub = REPO / "reports" / "families"
    p = load_params(REPO / "params" / "families.yaml")
    settings = pd.read_csv(pub / "settings.csv", keep_default_na=False)  # (one hook per model: hook is "")
    pd.testing.assert_frame_equal(settings, ladder.settings_table(p), check_dtype=False)
    table = pd.read_csv(pub / "phase2_table.csv")
    assert len(table) == len(p.settings()) * len(p.sae.k) * len(p.sae.tokens) and (table["n"] == 3).all()
    gaps = families.family_gaps(table, settings)
    pd.testing.assert_frame_equal(pd.read_csv(pub / "family_gaps.csv"), gaps, check_dtype=False)
    signs = families.sign_agreement(gaps)
    pd.testing.assert_frame_equal(pd.read_csv(pub / "family_signs.csv"), signs, check_dtype=False)
    metrics = pd.read_csv(pub / "sae_metrics.csv")
    assert len(metrics) == len(p.sae_specs()) and set(metrics["model_type"]) == {"gpt_neox", "llama", "gpt2"}
    assert set(metrics.loc[metrics["model_type"] == "llama", "skip_positions"]) == {1}
    html = (pub / "report.html").read_text()
    labels = {t: f.label for t, f in FAMILIES.items()}
    assert families.answer(signs, labels).split("**")[1] in html
    assert html.index("Across model families") < html.index("Setting neox_s-neox_l")
    assert "pairs of consecutive sizes within each model family" in html
