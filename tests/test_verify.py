"""``verify``: a run's published tables against a published report (proxygap_helpers/verify.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from microgrid import cli, explain

from proxygap_helpers.verify import compare_dirs, print_results, seed_sd

REPO = Path(__file__).resolve().parents[1]
SMOKE_REPORT = REPO / "reports" / "smoke"


def _copy(tmp_path: Path, name: str = "run") -> Path:
    dest = tmp_path / name
    shutil.copytree(SMOKE_REPORT, dest)
    return dest


def _problems(run: Path, mode: str = "auto", ref: Path = SMOKE_REPORT) -> list[str]:
    results, _ = compare_dirs(run, ref, mode)
    return [p for r in results for p in r.problems]


def test_a_published_report_agrees_with_itself_cell_by_cell(tmp_path):
    results, info = compare_dirs(_copy(tmp_path), SMOKE_REPORT)
    assert info["mode"] == "exact" and info["why"].startswith("same cpu")  # the same provenance: bit for bit
    assert {r.name for r in results} == {f.name for f in SMOKE_REPORT.glob("*.csv")}
    assert all(not r.problems and not r.notes for r in results), [r.problems for r in results]
    assert sum(r.n_cells for r in results) > 1000
    assert all(d == 0 for r in results for d, *_ in r.columns.values())


def test_the_seed_sd_pools_the_cells_but_the_wildest():
    t = pd.DataFrame({"k": [8, 8, 8, 16, 16, 32, 32], "seed": [0, 1, 2, 0, 1, 0, 1],
                      "x": [1.0, 2.0, 4.0, 10.0, 10.5, 0.0, 1000.0]})
    # cells k=8 (var 7/3 on 2 df), k=16 (0.125 on 1 df), k=32 (500,000 on 1 df: left out) -> (14/3 + 0.125) / 3
    assert seed_sd(t, "x", ["k", "seed"]) == pytest.approx(np.sqrt((14 / 3 + 0.125) / 3), rel=1e-12)
    assert seed_sd(t.iloc[:5], "x", ["k", "seed"]) == pytest.approx(np.sqrt((14 / 3 + 0.125) / 3), rel=1e-12), \
        "two cells: both pooled"
    rng = np.random.default_rng(0)  # and it estimates the SD of normal draws (a little low: the top tenth is gone)
    big = pd.DataFrame({"k": np.repeat(np.arange(400), 3), "seed": np.tile([0, 1, 2], 400),
                        "x": rng.normal(0, 2.0, 1200)})
    assert 0.8 * 2.0 < seed_sd(big, "x", ["k", "seed"]) < 2.0


def _shift(run: Path, table: str, row: int, col: str, by: float) -> None:
    df = pd.read_csv(run / table)
    df.loc[row, col] += by
    df.to_csv(run / table, index=False)


def test_exact_mode_catches_a_last_digit_and_noise_mode_a_shift_beyond_seed_noise(tmp_path):
    """Same provenance: any change beyond the last bits is caught. Noise mode (another CPU or thread count): a tenth
    of a seed SD passes, and so does one seed alone moved by several (a single SAE cannot be told from seed noise),
    but every seed of a cell moved by 10 seed SDs is caught and named with its z."""
    run = _copy(tmp_path)
    pairs = pd.read_csv(run / "pairs.csv")
    sd = seed_sd(pairs, "d_ce_rec", ["k", "tokens", "seed"])
    _shift(run, "pairs.csv", 2, "d_ce_rec", 0.1 * sd)
    exact = _problems(run)
    assert len(exact) == 1 and exact[0].startswith("pairs.csv[row 2].d_ce_rec: run "), exact
    assert _problems(run, "noise") == []
    cell = pairs.index[(pairs["k"] == pairs.loc[2, "k"]) & (pairs["tokens"] == pairs.loc[2, "tokens"])]
    for row in cell:
        _shift(run, "pairs.csv", row, "d_ce_rec", 10 * sd)
    (noise,) = _problems(run, "noise")
    assert noise.startswith(f"pairs.csv[cell k={pairs.loc[2, 'k']}, tokens={pairs.loc[2, 'tokens']}].d_ce_rec: |z| = ")


def test_a_summary_is_held_to_the_noise_of_the_seeds_it_summarises(tmp_path):
    """phase2_table's d_ce_rec_mean moves within sigma sqrt(2/n) of pairs' d_ce_rec (sigma: the larger of the pooled
    seed SD and its cell's): 1 SE passes, 6 SEs fail."""
    run = _copy(tmp_path)
    pairs, table = pd.read_csv(SMOKE_REPORT / "pairs.csv"), pd.read_csv(SMOKE_REPORT / "phase2_table.csv")
    cell = pairs[(pairs["k"] == table.loc[0, "k"]) & (pairs["tokens"] == table.loc[0, "tokens"])]
    sigma = max(seed_sd(pairs, "d_ce_rec", ["k", "tokens", "seed"]), cell["d_ce_rec"].std(ddof=1))
    se = sigma * np.sqrt(2 / table.loc[0, "n"])
    _shift(run, "phase2_table.csv", 0, "d_ce_rec_mean", 1.0 * se)
    assert _problems(run, "noise") == []
    _shift(run, "phase2_table.csv", 0, "d_ce_rec_mean", 5.0 * se)
    (problem,) = _problems(run, "noise")
    assert problem.startswith("phase2_table.csv[row 0].d_ce_rec_mean: |z| = 6.00"), problem


def test_a_changed_conclusion_fails_exact_and_is_named_in_noise_mode(tmp_path, capsys):
    run = _copy(tmp_path)
    claims = pd.read_csv(run / "claims.csv")
    claims.loc[0, "status"] = "supported" if claims.loc[0, "status"] != "supported" else "rejected"
    claims.to_csv(run / "claims.csv", index=False)
    assert [p for p in _problems(run) if p.startswith("claims.csv[row 0].status")]
    results, info = compare_dirs(run, SMOKE_REPORT, "noise")
    assert print_results(results, info, run, SMOKE_REPORT)
    out = capsys.readouterr().out
    assert "conclusions that moved" in out and "claims.csv[row 0].status" in out and "all tables agree" in out


def test_a_missing_table_and_a_missing_row_are_reported(tmp_path):
    run = _copy(tmp_path)
    (run / "tstar.csv").unlink()
    pd.read_csv(run / "sae_metrics.csv").iloc[:-1].to_csv(run / "sae_metrics.csv", index=False)
    for mode in ("exact", "noise"):
        problems = _problems(run, mode)
        assert any(p.startswith("tstar.csv: missing from the run") for p in problems), problems
        assert any(p.startswith("sae_metrics.csv: ") and "rows in the run" in p for p in problems), problems


def test_another_cpu_is_noise_mode(tmp_path):
    run = _copy(tmp_path)
    metrics = pd.read_csv(run / "sae_metrics.csv")
    metrics["provenance.machine.cpu"] = "Some Other CPU"
    metrics.to_csv(run / "sae_metrics.csv", index=False)
    _, info = compare_dirs(run, SMOKE_REPORT)
    assert info["mode"] == "noise" and "Some Other CPU" in info["why"] and 4 < info["z_max"] < 6


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
    assert "1 of " in res.stdout and "tables differ" in res.stdout and "mode exact" in res.stdout, explain(res)
    res = cli(env, "verify", micro, "--out", out, "--against", ref, "--mode", "noise")
    assert res.returncode == 0 and "mode noise" in res.stdout, explain(res)  # 0.01 of R2 is within this grid's noise
    sd = seed_sd(pairs, "r2_large", ["k", "tokens", "seed"])
    pairs["r2_large"] += 20 * sd  # a shift of every SAE (the reference computed R2 otherwise), not of one seed
    pairs.to_csv(ref / "pairs.csv", index=False)
    res = cli(env, "verify", micro, "--out", out, "--against", ref, "--mode", "noise")
    assert res.returncode == 1 and "pairs.csv[cell k=8, tokens=2048].r2_large: |z| = " in res.stdout, explain(res)
    empty = tmp_path / "empty"
    empty.mkdir()
    res = cli(env, "verify", micro, "--out", out, "--against", empty)
    assert res.returncode == 2 and "--against" in res.stderr and "no CSV tables" in res.stderr, explain(res)
