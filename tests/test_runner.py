"""The grid runner end to end, through its command line (``python -m proxygap_helpers ...``) in subprocesses.

A *micro* grid (params/smoke.yaml made smaller: 1 k, 2 budgets, 2 seeds, tiny LMs) runs once into a baseline
output directory (session fixture). The other tests work on copies of it, or on copies that keep only the
extract stage, so that the whole file costs about four grid runs:

* end to end: every unit done, provenance, executed notebooks, metrics, aggregate; a second run is a no-op;
* SIGKILL (runner and kernels) at four random moments of one run (extract, inside an SAE unit, after one,
  aggregate/report), resuming each time: finished units reused untouched, stale lock recognised, the same
  numbers, stores and weights as the uninterrupted run;
* failure isolation: one unit fails (a corrupted SAE weight file), the others finish, exit 1, error.json and
  the executed notebook kept; after removing the cause only that unit (+ aggregate, report) runs again;
* the lock: a live lock refuses (exit 2, nothing written), a dead one is replaced;
* ``--force`` and parameter-change invalidation (``sae.lr`` -> new unit and SAE ids, ``report.title`` -> only
  ``report``);
* the submitit executor (its local cluster really starts processes) gives the same numbers;
* stdout that is not a terminal: one plain line per finished unit.

``PROXYGAP_CACHE`` points at a session directory (the tiny LMs train once) and ``PROXYGAP_THREADS=1`` keeps
every kernel on one thread: results are then bit-identical across executors and processes, and a loaded
2-core machine is not oversubscribed.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from microgrid import (GRID, REPO, RUN_TIMEOUT, UNIT_LINE, assert_same_numbers, cli, copy_out, done_mtimes, explain,
                       finished_lines, grid_units, kill_tree, snapshot, write_params)

pytestmark = pytest.mark.slow

PROVENANCE_KEYS = ("params_hash", "git_commit", "git_dirty", "versions", "machine")
TIMING_KEYS = ("start", "end", "wall_seconds", "peak_rss_mb", "compute_seconds", "overhead_fraction")
METRIC_KEYS = ("sae_id", "model_role", "model_name", "hook", "k", "tokens", "seed", "d_in", "d_sae", "eval_tokens",
               "ce_clean", "ce_sae", "ce_zero", "ce_mean_ablation", "ce_rec", "ce_rec_relative", "ce_rec_zero_norm",
               "r2", "cosine", "rel_err_norm", "kl", "swd", "l0", "dead_frac", "train_seconds", "provenance")
AGGREGATES = ("sae_metrics.csv", "pairs.csv", "phase2_table.csv", "phase2_table.md", "proxy_leaderboard.csv",
              "claims.csv")


# ------------------------------------------------------------------------------------------------ tests


def test_end_to_end_provenance_and_noop_rerun(env, micro, baseline, base_out):
    out = base_out
    p, us = grid_units(micro, out)
    # one SAE unit per role (executor.shards = 1): every k, seed and budget of the role from one stream
    assert [u.stage for u in us] == ["extract", "sae", "sae", "aggregate", "report"]
    assert [(u.parameters["role"], sorted(u.parameters["sae_ids"])) for u in us if u.stage == "sae"] == \
        [(r, sorted(s.sae_id for s in p.sae_specs(role=r))) for r in ("small", "large")]
    assert (out / "params.resolved.yaml").is_file() and (out / "data" / "eval_tokens.npy").is_file()
    for role in ("small", "large"):
        assert (out / "models" / role / "config.json").is_file()
        assert (out / "activations" / role / "meta.json").is_file()
    for u in us:
        rd = u.run_dir(out)
        rec = json.loads((rd / "done.json").read_text())
        flat = {**rec, **rec.get("provenance", {})}
        missing = [k for k in PROVENANCE_KEYS + TIMING_KEYS if k not in flat]
        assert not missing, f"{u.uid}: done.json lacks {missing}"
        assert flat["params_hash"] == p.params_hash()
        assert re.fullmatch(r"[0-9a-f]{40}|unknown", flat["git_commit"])
        assert isinstance(flat["git_dirty"], bool) or flat["git_dirty"] is None
        for pkg in ("torch", "sae-lens", "transformer-lens", "papermill"):
            assert flat["versions"].get(pkg), f"{u.uid}: no version of {pkg}"
        assert flat["machine"]["host"] == socket.gethostname() and flat["machine"]["cpu"]
        assert flat["wall_seconds"] > 0 and flat["peak_rss_mb"] > 0
        assert 0 < flat["compute_seconds"] <= flat["wall_seconds"] and 0 <= flat["overhead_fraction"] < 1
        assert not (rd / "error.json").exists() and not (rd / "running.json").exists()
        for nb_name in u.notebooks:  # the executed notebooks are kept, without error outputs
            nb = json.loads((rd / f"{nb_name}.ipynb").read_text())
            assert "papermill" in nb["metadata"], f"{u.uid}/{nb_name}.ipynb was not executed by papermill"
            errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
            assert not errors, f"{u.uid}/{nb_name}.ipynb has error outputs: {errors[:1]}"
    specs = p.sae_specs()
    assert len(specs) == 8
    for s in specs:
        assert (out / "saes" / s.sae_id / "cfg.json").is_file()
        rec = json.loads((out / "runs" / s.sae_id / "metrics.json").read_text())
        assert not [k for k in METRIC_KEYS if k not in rec], s.sae_id
        assert (rec["sae_id"], rec["model_role"], rec["k"], rec["tokens"], rec["seed"]) == \
            (s.sae_id, s.role, s.k, s.tokens, s.seed)
        assert rec["l0"] == pytest.approx(8.0)
        # the per-sequence CE sums behind the eval-noise bootstrap add up to the metrics (ratio of means)
        seq = json.loads((out / "runs" / s.sae_id / "sequence_ce.json").read_text())
        n = sum(seq["predictions"])
        assert n == rec["eval_predictions"] and len(seq["ce_sae"]) == p.data.eval_sequences
        assert sum(seq["ce_sae"]) / n == pytest.approx(rec["ce_sae"], rel=1e-12)
        assert sum(seq["ce_clean"]) / n == pytest.approx(rec["ce_clean"], rel=1e-12)
        assert sum(seq["ce_zero"]) / n == pytest.approx(rec["ce_zero"], rel=1e-12)
        assert rec["tokens_per_latent"] == s.tokens / p.d_sae(s.role)
    for name in AGGREGATES:
        assert (out / "aggregate" / name).is_file(), name
    assert len((out / "aggregate" / "pairs.csv").read_text().strip().splitlines()) == 1 + 4  # (k, T, seed)
    table = (out / "aggregate" / "phase2_table.csv").read_text().splitlines()
    assert table[0].startswith("k,tokens,n,d_ce_rec_mean,d_ce_rec_lo,d_ce_rec_hi,d_r2_mean") and len(table) == 3
    import pandas as pd

    cells = pd.read_csv(out / "aggregate" / "phase2_table.csv")
    for col in ("tokens_per_latent_small", "tokens_per_latent_large", "dead_frac_small_mean",
                "dead_frac_large_mean", "d_ce_rec_eval_se", "d_ce_rec_seed_se"):
        assert cells[col].notna().all(), col
    assert (cells["tokens_per_latent_large"] == cells["tokens"] / p.d_sae("large")).all()
    assert not (out / ".proxygap.lock").exists()
    assert not list((out / "runs").glob("*/progress.json")), "a finished unit leaves no in-unit progress file"
    html = out / "reports" / "report.html"  # published beside the results, never into the repo's reports/
    assert html.is_file() and p.report.title in html.read_text()
    assert str(html) in baseline["res"].stdout.strip().splitlines()[-1]
    assert not (REPO / "reports" / GRID).exists()

    # a second run finds everything complete and touches nothing
    before = snapshot(out)
    res = cli(env, "run", micro, "--out", out)
    assert res.returncode == 0, explain(res)
    assert "complete" in res.stdout and "nothing to do" in res.stdout, res.stdout
    assert not finished_lines(res.stdout)
    assert snapshot(out) == before

    res = cli(env, "status", micro, "--out", out)
    assert res.returncode == 0, explain(res)
    rows = {line.split()[1]: line.split()[0] for line in res.stdout.splitlines() if len(line.split()) > 1
            and line.split()[0] in ("done", "failed", "running", "pending")}
    assert rows == {u.uid: "done" for u in us}, res.stdout
    assert f"{len(us)} done" in res.stdout


def test_output_without_terminal_is_one_plain_line_per_unit(micro, baseline, base_out):
    res = baseline["res"]
    for stream in (res.stdout, res.stderr):
        assert "\r" not in stream and "\x1b[" not in stream, "progress bar / ANSI escapes in captured output"
    _, us = grid_units(micro, base_out)
    lines = [line for line in res.stdout.splitlines() if UNIT_LINE.match(line)]
    counters = [int(UNIT_LINE.match(line).group(1)) for line in lines]
    assert counters == list(range(1, len(us) + 1)), res.stdout
    assert all(int(UNIT_LINE.match(line).group(2)) == len(us) for line in lines)
    assert sorted(finished_lines(res.stdout)) == sorted(("done", u.uid) for u in us), res.stdout


# Kill points of one grid run: (what must have happened, at most how many seconds more to wait, drawn
# uniformly). They fall in the extract stage, inside the first SAE unit, after an SAE unit has finished and
# inside the aggregate/report stages.
KILL_POINTS = (
    ("extract started", lambda out: bool(list((out / "runs").glob("extract-*/running.json"))), 6.0),
    ("an SAE unit started", lambda out: bool(list((out / "runs").glob("sae-*/running.json"))), 20.0),
    ("an SAE unit finished", lambda out: bool(list((out / "runs").glob("sae-*/done.json"))), 10.0),
    ("aggregate started", lambda out: (out / "runs" / "aggregate").is_dir(), 4.0),
)


def run_and_kill(env, micro, out: Path, log: Path, trigger, max_extra: float, rng) -> dict:
    """Start a run; once it has printed its first line (it holds the lock: a stale one was reported) and
    ``trigger(out)`` holds, wait a random 0..max_extra s and SIGKILL the whole tree. (A trigger that already
    holds when the run starts, e.g. a directory an earlier killed run left, must not kill it before that.)"""
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "proxygap_helpers", "run", str(micro), "--out", str(out)],
                                cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            deadline = time.time() + RUN_TIMEOUT
            while not ("proxygap: " in log.read_text() and trigger(out)) and proc.poll() is None:
                assert time.time() < deadline, "kill point never reached"
                time.sleep(0.05)
            extra = rng.uniform(0, max_extra)
            t_end = time.time() + extra
            while time.time() < t_end and proc.poll() is None:
                time.sleep(0.05)
            finished_first = proc.poll() is not None
        finally:
            kill_tree(proc)
    return {"pid": proc.pid, "extra_s": round(extra, 2), "finished_first": finished_first,
            "log": log.read_text()}


def test_killed_at_random_moments_and_resumed_gives_the_uninterrupted_numbers(env, micro, base_out, tmp_path):
    """One grid run from an empty output directory, SIGKILLed (runner and kernels) at several random moments
    and resumed each time: every finished unit is reused untouched, a killed runner's lock is reported
    stale and replaced, nothing half-written survives, and the end state has the baseline's numbers.
    The kill moments are random per run; PROXYGAP_KILL_SEED replays one (the seed is in every message)."""
    seed = int(os.environ.get("PROXYGAP_KILL_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    out = tmp_path / "out"
    p, us = grid_units(micro, out)
    history: list[str] = []
    prev_lock_pid = None
    for i, (what, trigger, max_extra) in enumerate(KILL_POINTS):
        finished = done_mtimes(out) if (out / "runs").is_dir() else {}
        reused = {s: snapshot(out / "saes" / s) for u in us if u.uid in finished for s in u.sae_ids}
        r = run_and_kill(env, micro, out, tmp_path / f"run{i}.log", trigger, max_extra, rng)
        why = f"kill seed {seed}, {history + [what]}:\n{r['log'][-4000:]}"
        history.append(f"{what} +{r['extra_s']}s -> {len(done_mtimes(out))}/{len(us)} done"
                       + (" (finished before the kill)" if r["finished_first"] else ""))
        if prev_lock_pid is not None:  # this run found the previous killed runner's lock
            assert f"stale lock of dead process {prev_lock_pid}" in r["log"], why
        if finished:
            assert f"{len(finished)}/{len(us)} units already complete" in r["log"], why
        after = done_mtimes(out)
        assert {u: after[u] for u in finished} == finished, why  # finished units untouched
        assert {s: snapshot(out / "saes" / s) for s in reused} == reused, why
        lock = out / ".proxygap.lock"
        prev_lock_pid = json.loads(lock.read_text())["pid"] if lock.exists() and lock.read_text() else None
        assert prev_lock_pid in (None, r["pid"]), why

    res = cli(env, "run", micro, "--out", out)
    why = f"kill seed {seed}, kills: {history}"
    print(why)  # shown with -s / -rP: where the kills landed
    assert res.returncode == 0, why + "\n" + explain(res)
    assert set(done_mtimes(out)) == {u.uid for u in us}, why
    assert not list((out / "runs").glob("*/running.json")) and not (out / ".proxygap.lock").exists(), why
    assert not [q for q in out.rglob("*") if ".tmp" in q.name], why  # no half-written leftovers
    assert_same_numbers(out, base_out, [s.sae_id for s in p.sae_specs()])
    for role in ("small", "large"):
        meta, ref = (json.loads((o / "activations" / role / "meta.json").read_text()) for o in (out, base_out))
        assert meta["content_hash"] == ref["content_hash"], why
    for s in p.sae_specs():
        a, b = (json.loads((o / "saes" / s.sae_id / "cfg.json").read_text()) for o in (out, base_out))
        assert a == b, why
        assert (out / "saes" / s.sae_id / "sae_weights.safetensors").read_bytes() == \
            (base_out / "saes" / s.sae_id / "sae_weights.safetensors").read_bytes(), why


def test_ctrl_c_is_one_line_and_the_unit_shows_as_interrupted(env, micro, base_out, tmp_path):
    """Ctrl-C (SIGINT to the foreground process group, as a terminal sends it) while SAE units run: exit 130 with one
    line and no traceback; ``status`` shows the running units as interrupted (not failed); the same command
    resumes them."""
    out = copy_out(base_out, tmp_path / "out", extract_only=True)
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "proxygap_helpers", "run", str(micro), "--out", str(out)],
                                cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            deadline = time.time() + RUN_TIMEOUT
            while not list((out / "runs").glob("sae-*/running.json")) and proc.poll() is None:
                assert time.time() < deadline, "no SAE unit started"
                time.sleep(0.05)
            time.sleep(1.0)
            os.killpg(proc.pid, signal.SIGINT)
            rc = proc.wait(timeout=120)
        finally:
            kill_tree(proc)
    text = log.read_text()
    assert rc == 130, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert text.strip().splitlines()[-1] == ("proxygap: interrupted; run the same command to resume (finished units "
                                             "and SAEs are kept)"), text
    status = cli(env, "status", micro, "--out", out)
    states = {line.split()[1]: line.split()[0] for line in status.stdout.splitlines()[:-1]}
    assert "interrupted" in states.values() and "failed" not in states.values(), status.stdout
    assert "run the same command to resume" in status.stdout
    res = cli(env, "run", micro, "--out", out)
    assert res.returncode == 0, explain(res)


def test_failed_unit_is_isolated_and_retried_alone(env, micro, base_out, tmp_path):
    """A new ``sae.lr`` gives new SAE units (extract reused); one SAE's weight file is corrupt, so its unit
    fails in 03_evaluate while every other unit finishes; removing the file makes a rerun retry only it."""
    out = copy_out(base_out, tmp_path / "out")
    params = write_params(tmp_path / "lr.yaml", sae__lr=0.002)
    p_old, old_units = grid_units(micro, out)
    p, us = grid_units(params, out)
    old_sae = {u.uid for u in old_units if u.stage == "sae"}
    new_sae = [u for u in us if u.stage == "sae"]
    assert us[0].uid == old_units[0].uid  # extract: same id
    assert not old_sae & {u.uid for u in new_sae}
    assert not {s.sae_id for s in p_old.sae_specs()} & {s.sae_id for s in p.sae_specs()}
    victim_unit = next(u for u in new_sae if "-small-" in u.uid)
    victim = victim_unit.sae_ids[0]
    shutil.copytree(out / "saes" / p_old.sae_specs(role="small")[0].sae_id, out / "saes" / victim)
    (out / "saes" / victim / "sae_weights.safetensors").write_bytes(b"not a safetensors file")
    extract_done = (us[0].run_dir(out) / "done.json").stat().st_mtime_ns

    res = cli(env, "run", params, "--out", out)
    assert res.returncode == 1, explain(res)
    assert (us[0].run_dir(out) / "done.json").stat().st_mtime_ns == extract_done  # extract reused
    assert victim_unit.uid in res.stderr and "failed" in res.stderr, res.stderr
    assert ("FAILED", victim_unit.uid) in finished_lines(res.stdout), res.stdout
    err = json.loads((victim_unit.run_dir(out) / "error.json").read_text())
    assert err["message"] and err["notebook"], err
    executed = out / err["notebook"]
    assert executed.is_file()
    assert any(o.get("output_type") == "error" for c in json.loads(executed.read_text())["cells"]
               for o in c.get("outputs", []))
    assert not (victim_unit.run_dir(out) / "done.json").exists()
    others = [u for u in us if u.uid != victim_unit.uid]
    for u in others:
        assert (u.run_dir(out) / "done.json").is_file(), f"{u.uid} did not finish beside the failed unit"
    for s in next(u for u in new_sae if u is not victim_unit).sae_ids:
        assert (out / "runs" / s / "metrics.json").is_file()
    status = cli(env, "status", params, "--out", out)
    assert re.search(rf"^failed +{re.escape(victim_unit.uid)}", status.stdout, re.M), status.stdout

    # remove the cause: only the failed unit runs again, then aggregate and report (their inputs changed)
    shutil.rmtree(out / "saes" / victim)
    before = done_mtimes(out)
    res = cli(env, "run", params, "--out", out)
    assert res.returncode == 0, explain(res)
    assert {uid for _, uid in finished_lines(res.stdout)} == {victim_unit.uid, "aggregate", "report"}, res.stdout
    # the partial grid's aggregate and report are redone, so not "already complete": N-3, then N-2 .. N of N
    assert f"{len(us) - 3}/{len(us)} units already complete" in res.stdout, res.stdout
    counters = [line.split()[0].lstrip("[") for line in res.stdout.splitlines() if UNIT_LINE.match(line)]
    assert counters == [f"{n}/{len(us)}" for n in range(len(us) - 2, len(us) + 1)], res.stdout
    after = done_mtimes(out)
    for u in us[:3]:
        if u is not victim_unit:
            assert after[u.uid] == before[u.uid], f"{u.uid} was redone"
    assert not (victim_unit.run_dir(out) / "error.json").exists()
    assert len((out / "aggregate" / "pairs.csv").read_text().strip().splitlines()) == 1 + 4


def test_live_lock_refuses_and_dead_lock_is_replaced(env, micro, base_out, tmp_path):
    out = tmp_path / "locked"
    out.mkdir()
    lock = out / ".proxygap.lock"
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "start": "earlier"}))
        res = cli(env, "run", micro, "--out", out)
        assert res.returncode == 2, explain(res)
        assert str(lock) in res.stderr and f"pid {sleeper.pid}" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
        assert sorted(p.name for p in out.iterdir()) == [".proxygap.lock"]  # nothing written
        assert json.loads(lock.read_text())["pid"] == sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()

    # another host's lock is never judged from here
    done = copy_out(base_out, tmp_path / "done")
    (done / ".proxygap.lock").write_text(json.dumps({"pid": sleeper.pid, "host": "elsewhere.invalid"}))
    res = cli(env, "run", micro, "--out", done)
    assert res.returncode == 2 and "elsewhere.invalid" in res.stderr, explain(res)

    # the same lock with the (now dead) pid on this host is stale: replaced, and the run proceeds
    (done / ".proxygap.lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
    res = cli(env, "run", micro, "--out", done)
    assert res.returncode == 0, explain(res)
    assert "stale lock" in res.stdout and "nothing to do" in res.stdout, res.stdout
    assert not (done / ".proxygap.lock").exists()


def test_param_change_invalidates_only_what_it_shapes(env, micro, base_out, tmp_path):
    out = copy_out(base_out, tmp_path / "out")
    _, us = grid_units(micro, out)
    # sae.lr: extract stays done, both SAE units get new ids (pending); not run here (see the failure test)
    lr = write_params(tmp_path / "lr.yaml", sae__lr=0.002)
    res = cli(env, "status", lr, "--out", out)
    assert res.returncode == 0, explain(res)
    rows = dict(line.split()[:2][::-1] for line in res.stdout.splitlines()
                if line.split()[:1] in (["done"], ["pending"], ["failed"]))
    _, lr_units = grid_units(lr, out)
    assert rows[us[0].uid] == "done" and lr_units[0].uid == us[0].uid
    for u in lr_units[1:3]:
        assert rows[u.uid] == "pending" and u.uid not in {v.uid for v in us}

    # report.title: only the report runs again
    before = done_mtimes(out)
    title = write_params(tmp_path / "title.yaml", report__title="another title")
    res = cli(env, "run", title, "--out", out)
    assert res.returncode == 0, explain(res)
    assert finished_lines(res.stdout) == [("done", "report")], res.stdout
    after = done_mtimes(out)
    assert {u: t for u, t in after.items() if u != "report"} == {u: t for u, t in before.items() if u != "report"}
    assert after["report"] != before["report"]
    assert "another title" in (out / "reports" / "report.html").read_text()


def test_force_with_submitit_reruns_every_unit_with_identical_results(env, micro, base_out, tmp_path):
    """``--force`` redoes every unit (SAEs retrained, not just their notebooks re-executed); the SAE units go
    through submitit (``cluster='local'`` starts real processes) and reproduce the local executor's numbers."""
    out = copy_out(base_out, tmp_path / "out")
    p, us = grid_units(micro, out)
    before = done_mtimes(out)
    sae_ids = [s.sae_id for s in p.sae_specs()]
    weights = {s: (out / "saes" / s / "sae_weights.safetensors").stat().st_mtime_ns for s in sae_ids}
    res = cli(env, "run", micro, "--out", out, "--executor", "submitit", "--force",
              extra_env={"PROXYGAP_SUBMITIT_CLUSTER": "local"})
    assert res.returncode == 0, explain(res)
    assert "submitit" in res.stdout
    assert sorted(uid for _, uid in finished_lines(res.stdout)) == sorted(u.uid for u in us), res.stdout
    after = done_mtimes(out)
    assert all(after[u.uid] != before[u.uid] for u in us), "--force left some done.json untouched"
    assert all((out / "saes" / s / "sae_weights.safetensors").stat().st_mtime_ns != weights[s] for s in sae_ids)
    for s in sae_ids:  # retrained in another process, by another executor: the same bytes
        assert (out / "saes" / s / "sae_weights.safetensors").read_bytes() == \
            (base_out / "saes" / s / "sae_weights.safetensors").read_bytes(), s
    assert list((out / "submitit").rglob("*_result.pkl")), "no submitit job ran"
    assert_same_numbers(out, base_out, sae_ids)


def test_another_evaluation_into_the_same_out_never_leaves_stale_metrics(env, micro, base_out, tmp_path):
    """The same SAEs (equal ids) evaluated with ``evaluation.ce_rec: zero_norm`` into the same ``--out``, then the
    first params again: the first grid's SAE units are pending (not done with the other setting's numbers), its
    rerun re-evaluates without retraining and its aggregate reports its own ``ce_rec``; and the other way round."""
    import pandas as pd

    out = copy_out(base_out, tmp_path / "out")
    zero = write_params(tmp_path / "zero.yaml", evaluation__ce_rec="zero_norm")
    p, us = grid_units(micro, out)
    q, _ = grid_units(zero, out)
    assert [s.sae_id for s in p.sae_specs()] == [s.sae_id for s in q.sae_specs()]
    weights = {s.sae_id: (out / "saes" / s.sae_id / "sae_weights.safetensors").stat().st_mtime_ns
               for s in p.sae_specs()}

    def ce_rec(params) -> dict[str, float]:
        table = pd.read_csv(out / "aggregate" / "sae_metrics.csv")
        assert (table["ce_rec_definition"] == params.evaluation.ce_rec).all()
        return dict(zip(table["sae_id"], table["ce_rec"]))

    first = ce_rec(p)
    for params_file, params, column in ((zero, q, "ce_rec_zero_norm"), (micro, p, "ce_rec_relative"),
                                        (zero, q, "ce_rec_zero_norm")):
        status = cli(env, "status", params_file, "--out", out)
        states = dict(line.split()[:2][::-1] for line in status.stdout.splitlines() if line[:1].isalpha()
                      and line.split()[0] in ("done", "pending", "failed"))
        _, pus = grid_units(params_file, out)
        assert [states[u.uid] for u in pus if u.stage == "sae"] == ["pending", "pending"], status.stdout
        res = cli(env, "run", params_file, "--out", out)
        assert res.returncode == 0, explain(res)
        got = ce_rec(params)
        table = pd.read_csv(out / "aggregate" / "sae_metrics.csv")
        assert got == dict(zip(table["sae_id"], table[column]))
    assert got != first  # zero_norm's values, not the relative ones
    assert {s: (out / "saes" / s / "sae_weights.safetensors").stat().st_mtime_ns for s in weights} == weights
