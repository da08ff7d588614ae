"""``verify``: a run's published tables against a published report (proxygap_helpers/verify.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from microgrid import cli, explain

from proxygap_helpers.verify import FRACTION, _seed_sd, compare_dirs, noise_scales

REPO = Path(__file__).resolve().parents[1]
SMOKE_REPORT = REPO / "reports" / "smoke"


def _copy(tmp_path: Path, name: str = "run") -> Path:
    dest = tmp_path / name
    shutil.copytree(SMOKE_REPORT, dest)
    return dest


def _problems(run: Path, ref: Path = SMOKE_REPORT) -> list[str]:
    return [p for r in compare_dirs(run, ref) for p in r.problems]


def test_a_published_report_agrees_with_itself_cell_by_cell(tmp_path):
    results = compare_dirs(_copy(tmp_path), SMOKE_REPORT)
    assert {r.name for r in results} == {f.name for f in SMOKE_REPORT.glob("*.csv")}
    assert all(not r.problems for r in results), [r.problems for r in results]
    assert sum(r.n_cells for r in results) > 1000
    assert all(d == 0 for r in results for d, *_ in r.columns.values())


def test_the_seed_sd_is_the_pooled_within_cell_sd():
    t = pd.DataFrame({"k": [8, 8, 8, 16, 16], "seed": [0, 1, 2, 0, 1], "x": [1.0, 2.0, 4.0, 10.0, 10.5]})
    # cell k=8: var = 7/3 on 2 df; cell k=16: var = 0.125 on 1 df -> pooled (14/3 + 0.125) / 3
    assert _seed_sd(t, "x", ["k", "seed"]) == pytest.approx(np.sqrt((14 / 3 + 0.125) / 3), rel=1e-12)
    summary = pd.DataFrame({"k": [8, 16], "x_mean": [2.0, 3.0], "x_lo": [1.0, 2.0], "other": [5.0, 9.0]})
    noise = noise_scales(summary, {"x": 0.7})
    assert noise["x_mean"] == noise["x_lo"] == 0.7  # a summary of a pairs column takes that column's seed SD
    assert noise["other"] == pytest.approx(np.std([5.0, 9.0], ddof=1))  # else its spread across the rows


def test_a_perturbed_cell_is_caught_and_named(tmp_path):
    run = _copy(tmp_path)
    pairs = pd.read_csv(run / "pairs.csv")
    sd = _seed_sd(pairs, "d_ce_rec", ["k", "tokens", "seed"])
    small = pairs.copy()
    small.loc[2, "d_ce_rec"] += 0.1 * FRACTION * sd  # well inside the tolerance
    small.to_csv(run / "pairs.csv", index=False)
    assert _problems(run) == []
    pairs.loc[2, "d_ce_rec"] += 2 * FRACTION * sd  # twice the tolerance: a tenth of a seed SD
    pairs.to_csv(run / "pairs.csv", index=False)
    problems = _problems(run)
    assert len(problems) == 1 and problems[0].startswith("pairs.csv[row 2].d_ce_rec: run "), problems


def test_a_changed_conclusion_is_caught_even_when_every_number_agrees(tmp_path):
    run = _copy(tmp_path)
    claims = pd.read_csv(run / "claims.csv")
    claims.loc[0, "status"] = "supported" if claims.loc[0, "status"] != "supported" else "rejected"
    claims.to_csv(run / "claims.csv", index=False)
    assert [p for p in _problems(run) if p.startswith("claims.csv[row 0].status")]


def test_a_missing_table_and_a_missing_row_are_reported(tmp_path):
    run = _copy(tmp_path)
    (run / "tstar.csv").unlink()
    pd.read_csv(run / "sae_metrics.csv").iloc[:-1].to_csv(run / "sae_metrics.csv", index=False)
    problems = _problems(run)
    assert any(p.startswith("tstar.csv: missing from the run") for p in problems), problems
    assert any(p.startswith("sae_metrics.csv: ") and "rows in the run" in p for p in problems), problems


def test_the_command_verifies_a_real_run_and_refuses_bad_references(env, micro, base_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(base_out, out)
    ref = tmp_path / "published"
    shutil.copytree(out / "reports", ref)
    res = cli(env, "report", micro, "--out", out)  # the aggregate and report recomputed from the finished runs
    assert res.returncode == 0, explain(res)
    res = cli(env, "verify", micro, "--out", out, "--against", ref)
    assert res.returncode == 0 and "all tables agree" in res.stdout, explain(res)
    pairs = pd.read_csv(ref / "pairs.csv")
    pairs.loc[1, "r2_large"] += 0.01
    pairs.to_csv(ref / "pairs.csv", index=False)
    res = cli(env, "verify", micro, "--out", out, "--against", ref)
    assert res.returncode == 1 and "pairs.csv[row 1].r2_large" in res.stdout, explain(res)
    assert "1 of " in res.stdout and "tables differ" in res.stdout, explain(res)
    empty = tmp_path / "empty"
    empty.mkdir()
    res = cli(env, "verify", micro, "--out", out, "--against", empty)
    assert res.returncode == 2 and "--against" in res.stderr and "no CSV tables" in res.stderr, explain(res)
