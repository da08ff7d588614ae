"""Faults survived with nothing lost: a disk that fills mid-write, a kernel that dies, a partial grid.

(Bad params, corrupted stores, half-written SAE dirs and NaN activations are in test_params.py,
test_activations.py and test_training.py; killed and concurrent runners in test_runner.py.)
"""

import errno
import json
import os

import nbformat
import pytest

from proxygap_helpers import aggregate, executors, files
from proxygap_helpers.grid import Unit
from proxygap_helpers.params import load_params

SMOKE = "params/smoke.yaml"


def test_disk_full_mid_write_keeps_the_previous_result(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    files.write_json_atomic(path, {"ce_rec": 0.9})
    real_dump = json.dump

    def dump_then_fill(obj, f, **kw):
        real_dump({"partial": True}, f)  # some bytes reach the disk, then it is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.json, "dump", dump_then_fill)
    with pytest.raises(OSError, match="No space left"):
        files.write_json_atomic(path, {"ce_rec": 0.1})
    monkeypatch.setattr(files.json, "dump", real_dump)
    assert json.loads(path.read_text()) == {"ce_rec": 0.9}, "the earlier result must be intact"


def test_atomic_dir_failure_leaves_the_old_directory(tmp_path):
    d = tmp_path / "saes" / "x"
    with files.atomic_dir(d) as tmp:
        (tmp / "cfg.json").write_text("{}")
    with pytest.raises(OSError):
        with files.atomic_dir(d) as tmp:
            (tmp / "cfg.json").write_text('{"new": 1}')
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (d / "cfg.json").read_text() == "{}"
    assert not (d.parent / "x.partial").exists()


def _notebook(path, code):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("params_path = None\nout_dir = None\nthreads = 0",
                                          metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(code)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.mark.parametrize("code, expect", [
    ("import os\nos._exit(1)", "kernel"),  # the kernel dies
    ("raise RuntimeError('store is corrupted: rebuild it')", "RuntimeError: store is corrupted"),
])
def test_a_failing_notebook_marks_only_its_unit_failed(tmp_path, monkeypatch, code, expect):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    _notebook(nbdir / "99_fault.ipynb", code)
    monkeypatch.setattr(executors, "NOTEBOOKS", nbdir)
    out = tmp_path / "out"
    unit = Unit("fault-unit", "extract", ("99_fault",), {"params_path": SMOKE, "out_dir": str(out)})
    res = executors.run_unit(SMOKE, str(out), unit, threads=1)
    assert res["ok"] is False
    err = json.loads((out / "runs" / "fault-unit" / "error.json").read_text())
    assert expect.lower() in err["message"].lower(), err["message"]
    assert not (out / "runs" / "fault-unit" / "done.json").exists()
    assert not (out / "runs" / "fault-unit" / "running.json").exists()
    assert (out / "runs" / "fault-unit" / "99_fault.ipynb").is_file(), "the executed notebook is kept"


def test_a_units_notebooks_share_one_fresh_kernel(tmp_path, monkeypatch):
    """Both notebooks of a unit run in one kernel (the second skips start-up and imports); the next unit
    gets a fresh one, and no kernel outlives its unit."""
    import psutil

    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    for name in ("98_first", "99_second"):
        _notebook(nbdir / f"{name}.ipynb", "import os, pathlib\n"
                  f"pathlib.Path(out_dir, '{name}.pid').write_text(str(os.getpid()))")
    monkeypatch.setattr(executors, "NOTEBOOKS", nbdir)
    pids = []
    for uid in ("unit-a", "unit-b"):
        out = tmp_path / uid
        out.mkdir()
        unit = Unit(uid, "sae", ("98_first", "99_second"), {"params_path": SMOKE, "out_dir": str(out)})
        res = executors.run_unit(SMOKE, str(out), unit, threads=1)
        assert res["ok"], res
        first, second = (int((out / f"{n}.pid").read_text()) for n in ("98_first", "99_second"))
        assert first == second, "the unit's second notebook ran in another kernel"
        assert not psutil.pid_exists(first) or psutil.Process(first).status() == psutil.STATUS_ZOMBIE
        pids.append(first)
    assert pids[0] != pids[1], "two units shared a kernel"


def _fake_metrics(spec, ce_rec, r2):
    return {"sae_id": spec.sae_id, "model_role": spec.role, "model_name": "m", "hook": "h", "k": spec.k,
            "tokens": spec.tokens, "seed": spec.seed, "d_in": 1, "d_sae": 2, "eval_tokens": 10, "ce_clean": 4.0,
            "ce_sae": 4.0 * (2 - ce_rec), "ce_zero": 9.0, "ce_mean_ablation": 8.0, "ce_rec": ce_rec,
            "ce_rec_relative": ce_rec, "ce_rec_zero_norm": 0.9, "r2": r2, "cosine": 0.9, "rel_err_norm": 0.3,
            "kl": 0.1, "swd": 0.1, "l0": spec.k, "dead_frac": 0.1, "train_seconds": 1.0, "budget_mode": "separate",
            "epochs_used": 1, "finished_at": "2026-01-01T00:00:00+00:00", "provenance": {"params_hash": "x"},
            "eval_hash": load_params(SMOKE).eval_hash}


def test_aggregate_of_a_partial_grid_reports_missing_cells_as_pending(tmp_path):
    p = load_params(SMOKE)
    out = tmp_path / "out"
    # only the smallest budget has both roles, and only for k = 8
    for s in p.sae_specs(k=8):
        if s.tokens == min(p.sae.tokens):
            files.write_json_atomic(out / "runs" / s.sae_id / "metrics.json",
                                    _fake_metrics(s, 0.9 if s.role == "small" else 0.8 + 0.01 * s.seed,
                                                  0.5 if s.role == "small" else 0.6))
    agg = aggregate.run_aggregate(p, out)
    table = agg["phase2_table"]
    assert list(zip(table["k"], table["tokens"])) == [(8, min(p.sae.tokens))]
    assert table["mismatch_rate"].iloc[0] == 1.0 and table["n"].iloc[0] == len(p.sae.seeds)
    status = dict(zip(agg["claims"]["claim"], agg["claims"]["status"]))
    assert "supported" not in {status["C2"], status["C3"], status["C4"], status["C5"]}
    assert status["C2"] == "pending"  # needs a second budget
    for name in aggregate.TABLES:
        assert (out / "aggregate" / f"{name}.csv").is_file()


def test_aggregate_ignores_metrics_of_other_params(tmp_path):
    """A metrics.json of an SAE id that the params do not define, or of a grid SAE evaluated under other
    ``evaluation.*`` settings (another eval hash), is left out; with nothing left, the aggregate refuses instead of
    writing empty tables and reporting done."""
    p = load_params(SMOKE)
    out = tmp_path / "out"
    s, t = p.sae_specs()[:2]
    stale = _fake_metrics(s, 0.5, 0.5) | {"sae_id": "small-k8-t8192-s0-deadbeef"}
    files.write_json_atomic(out / "runs" / stale["sae_id"] / "metrics.json", stale)
    files.write_json_atomic(out / "runs" / t.sae_id / "metrics.json", _fake_metrics(t, 0.5, 0.5) | {"eval_hash": "0ther"})
    with pytest.raises(aggregate.AggregateError, match="no SAE of grid 'smoke' has metrics of this evaluation"):
        aggregate.run_aggregate(p, out)
    assert not (out / "aggregate" / "phase2_table.csv").exists()
    files.write_json_atomic(out / "runs" / s.sae_id / "metrics.json", _fake_metrics(s, 0.9, 0.6))
    agg = aggregate.run_aggregate(p, out)
    assert list(agg["sae_metrics"]["sae_id"]) == [s.sae_id] and len(agg["phase2_table"]) == 0
    assert (agg["claims"]["status"] == "pending").all()
    assert json.loads((out / "aggregate" / "summary.json").read_text())["n_stale_evaluation"] == 1
    assert os.path.isfile(out / "aggregate" / "phase2_table.md")


def test_the_report_quotes_the_corpus_the_aggregate_recorded(tmp_path):
    """An embedded grid's pinned text reaches the report through ``aggregate/summary.json`` (summary.py reads
    records and tables, not data.py); an aggregate written before it was recorded leaves the version out."""
    from proxygap_helpers import data
    from proxygap_helpers.summary import run_summary

    p = load_params(SMOKE)
    assert p.embedded
    out = tmp_path / "out"
    s = p.sae_specs()[0]
    rec = _fake_metrics(s, 0.9, 0.6) | {"provenance": {"params_hash": "x", "versions": {}, "machine": {}}}
    files.write_json_atomic(out / "runs" / s.sae_id / "metrics.json", rec)
    aggregate.run_aggregate(p, out)
    pinned = f"{data.CORPUS_PACKAGE}=={data.CORPUS_VERSION}"
    path = out / "aggregate" / "summary.json"
    assert json.loads(path.read_text())["corpus"] == pinned == "sympy==1.14.0"
    assert f"on the Python source code of SymPy (`{pinned}`, pinned), with" in run_summary(p, out, {})["footer"]
    files.write_json_atomic(path, {k: v for k, v in json.loads(path.read_text()).items() if k != "corpus"})
    assert "on the Python source code of SymPy (pinned), with" in run_summary(p, out, {})["footer"]


def test_csvs_keep_full_precision_phase2_table_recomputed_from_sae_metrics_csv(tmp_path):
    """Each aggregate CSV round-trips its floats exactly; the phase-2 table recomputed independently from
    ``sae_metrics.csv`` (pairing by hand, numpy mean, sample SD and scipy's t quantile) equals
    ``phase2_table.csv`` to 1e-12."""
    import numpy as np
    import pandas as pd
    from scipy import stats as sps

    p = load_params(SMOKE)
    out = tmp_path / "out"
    rng = np.random.default_rng(7)
    for s in p.sae_specs():  # values with all 17 significant digits, small deltas between the roles
        files.write_json_atomic(out / "runs" / s.sae_id / "metrics.json",
                                _fake_metrics(s, float(0.9 + 0.01 * rng.standard_normal()),
                                              float(0.6 + 0.01 * rng.standard_normal())))
    agg = aggregate.run_aggregate(p, out)
    for name in ("sae_metrics", "pairs", "phase2_table"):
        back = pd.read_csv(out / "aggregate" / f"{name}.csv")
        num = agg[name].select_dtypes("number").columns
        assert np.array_equal(back[num].to_numpy(float), agg[name][num].to_numpy(float), equal_nan=True), name

    m = pd.read_csv(out / "aggregate" / "sae_metrics.csv")
    table = pd.read_csv(out / "aggregate" / "phase2_table.csv")
    assert len(table) == len(p.sae.k) * len(p.sae.tokens)
    for row in table.itertuples():
        cell = m[(m["k"] == row.k) & (m["tokens"] == row.tokens)]
        small, large = (cell[cell["model_role"] == r].set_index("seed").sort_index() for r in ("small", "large"))
        for metric, col in (("ce_rec", "d_ce_rec"), ("r2", "d_r2")):
            d = (large[metric] - small[metric]).to_numpy()
            half = sps.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
            for got, want in ((getattr(row, f"{col}_mean"), d.mean()), (getattr(row, f"{col}_lo"), d.mean() - half),
                              (getattr(row, f"{col}_hi"), d.mean() + half)):
                assert abs(got - want) <= 1e-12, (row.k, row.tokens, col, got, want)
        mism = ((large["r2"] - small["r2"] > 0) & (large["ce_rec"] - small["ce_rec"] < 0)).mean()
        assert row.n == len(small) and row.mismatch_rate == mism


class _FakeGrid:
    """Unit states for cli._run without notebooks: a finished SAE unit makes aggregate and report stale, a
    finished aggregate makes report stale (their inputs changed), as the real input hashes do."""

    def __init__(self, us, incomplete, failing=()):
        self.done = {u.uid: u.uid not in incomplete for u in us}
        self.failing = set(failing)

    def is_complete(self, p, out, u):
        return self.done[u.uid]

    def execute(self, kind, params_path, out_dir, todo, p, jobs, on_done):
        for u in todo:
            ok = u.uid not in self.failing
            if ok:
                self.done[u.uid] = True
                stale = {"sae": ("aggregate", "report"), "aggregate": ("report",)}.get(u.stage, ())
                self.done.update({s: False for s in stale})
            on_done({"uid": u.uid, "ok": ok, "wall_seconds": 1.0, "message": "boom"})


@pytest.mark.parametrize("fixed", [True, False], ids=["cause-removed", "fails-again"])
def test_progress_after_a_partly_failed_run_counts_each_unit_once(tmp_path, monkeypatch, capsys, fixed):
    """A rerun after one SAE unit failed (the issue's 5-unit grid): aggregate and report of the partial grid
    will be redone, so they are not 'already complete'; the counter starts at the units truly complete (2/5)
    and ends at [5/5] (it used to print 4/5, then count to [7/5])."""
    from proxygap_helpers import cli
    from proxygap_helpers.grid import units

    p = load_params(SMOKE)
    us = units(p, tmp_path, tmp_path / "params.resolved.yaml")
    assert [u.stage for u in us] == ["extract", "sae", "sae", "aggregate", "report"]
    victim = us[1].uid
    grid = _FakeGrid(us, incomplete={victim}, failing=() if fixed else {victim})
    monkeypatch.setattr(cli, "is_complete", grid.is_complete)
    monkeypatch.setattr(executors, "execute", grid.execute)

    code = cli._run(p, tmp_path, tmp_path / "params.resolved.yaml", us, "local", 1, force=False)
    lines = capsys.readouterr().out.splitlines()
    assert "2/5 units already complete" in lines[0], lines
    progress = [line.split()[0].lstrip("[") for line in lines[1:] if line.startswith("[")]
    assert progress == ["3/5", "4/5", "5/5"], lines
    assert code == (0 if fixed else 1)
    if fixed:
        assert all(grid.done.values())
    else:  # aggregate and report of the partial grid are current: counted, not rerun, and said so
        assert [line.split("s] ")[1].split()[:2] for line in lines[2:4]] == [["up", "to"]] * 2, lines


def test_progress_of_a_fresh_run_and_of_a_report_only_rerun(tmp_path, monkeypatch, capsys):
    from proxygap_helpers import cli
    from proxygap_helpers.grid import units

    p = load_params(SMOKE)
    us = units(p, tmp_path, tmp_path / "params.resolved.yaml")
    for incomplete, start in (({u.uid for u in us}, 0), ({"report"}, len(us) - 1)):
        grid = _FakeGrid(us, incomplete)
        monkeypatch.setattr(cli, "is_complete", grid.is_complete)
        monkeypatch.setattr(executors, "execute", grid.execute)
        assert cli._run(p, tmp_path, tmp_path / "params.resolved.yaml", us, "local", 1, force=False) == 0
        lines = capsys.readouterr().out.splitlines()
        assert f"{start}/{len(us)} units already complete" in lines[0]
        progress = [line.split()[0].lstrip("[") for line in lines[1:] if line.startswith("[")]
        assert progress == [f"{n}/{len(us)}" for n in range(start + 1, len(us) + 1)], lines


def test_the_report_header_counts_this_grids_saes_only(tmp_path):
    """The header's "N SAEs evaluated" and compute time count the grid's own SAEs under its evaluation, not every
    metrics.json of the output folder (another grid's SAE, or this SAE evaluated with other settings)."""
    from proxygap_helpers.summary import run_summary

    p = load_params(SMOKE)
    out = tmp_path / "out"
    mine, other = p.sae_specs()[:2]
    prov = {"provenance": {"params_hash": "x", "versions": {}, "machine": {}}}
    files.write_json_atomic(out / "runs" / mine.sae_id / "metrics.json", _fake_metrics(mine, 0.9, 0.6) | prov)
    files.write_json_atomic(out / "runs" / "foreign-sae" / "metrics.json",
                            _fake_metrics(mine, 0.9, 0.6) | prov | {"sae_id": "foreign-sae"})
    files.write_json_atomic(out / "runs" / other.sae_id / "metrics.json",
                            _fake_metrics(other, 0.9, 0.6) | prov | {"eval_hash": "another-evaluation"})
    assert "1 SAEs evaluated, 0.0 min of SAE training" in run_summary(p, out, {})["header"]
