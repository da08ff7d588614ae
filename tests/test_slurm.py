"""The grid on a real Slurm cluster: a one-node cluster (munge, slurmctld, slurmd; tests/slurm_cluster.py) that
this module starts and tears down, and the launcher run as a user runs it (``--executor submitit`` with
``PROXYGAP_SUBMITIT_CLUSTER=slurm``) on a copy of the micro grid's extract stage.

One scenario, whose steps the tests below check (they share its module fixtures: it runs once, about
3.5 minutes here, not once per test):

1. First launch: the SAE units (the micro grid in two shards per role: four) go out as one job array.
   While it runs, one task is cancelled (``scancel``). Another is made to hang (SIGSTOP) and its time limit
   is lowered to 0 (``scontrol``), so Slurm kills it for running past its time limit (``TIMEOUT``). The
   launcher reports both failures, finishes the other units, aggregate and report, and exits 1.
2. Relaunch: only the two failed units are submitted. The launcher is SIGKILLed while their tasks run;
   ``status`` shows each task's job id and state.
3. Third launch: it waits for those two tasks instead of submitting them again, then aggregates. Every
   number equals the local executor's (the micro baseline, one unit per role), and every SAE unit ran as
   exactly one completed Slurm task.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from microgrid import (REPO, UNIT_LINE, assert_same_numbers, cli, copy_out, done_mtimes, explain, finished_lines,
                       grid_units, kill_tree, write_params)
from slurm_cluster import PARTITION, NotAvailable, SlurmCluster, ensure_installed

from proxygap_helpers.executors import submitit_executor
from proxygap_helpers.params import load_params

pytestmark = pytest.mark.slow

WAIT_S = 300  # bound on every wait for the cluster (a unit takes ~40 s here)
SLURM = {"partition": PARTITION, "cpus_per_task": 1, "mem_gb": 1, "time_min": 10, "array_parallelism": 2}
SHARDS = 2  # SAE units per role: 4 tasks, so that two finish beside the two that fail


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def cluster():
    try:
        ensure_installed()
        root = Path(tempfile.mkdtemp(prefix="pgslurm-"))  # short: munge's and slurmd's unix sockets live here
        c = SlurmCluster(root)
        c.start()
    except NotAvailable as exc:
        pytest.fail(f"Slurm tests: {exc}", pytrace=False)
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def params(tmp_path_factory) -> Path:
    return write_params(tmp_path_factory.mktemp("slurm-params") / "slurm.yaml", executor__shards=SHARDS,
                        executor__slurm=SLURM)  # executor.kind stays local: --executor submitit picks Slurm


@pytest.fixture(scope="module")
def slurm_env(env, cluster) -> dict:
    return {**env, **cluster.env, "PROXYGAP_SUBMITIT_CLUSTER": "slurm"}


def launch(slurm_env, params: Path, out: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "proxygap_helpers", "run", str(params), "--out", str(out),
                                 "--executor", "submitit"],
                                cwd=REPO, env=slurm_env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def running_tasks(out: Path) -> dict[str, dict]:
    """unit id -> running.json of SAE units that run as a Slurm task now (the task's own record)."""
    res = {}
    for path in (out / "runs").glob("sae-*/running.json"):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if rec.get("slurm"):
            res[path.parent.name] = rec
    return res


def wait_for(what: str, check, proc: subprocess.Popen | None, log: Path):
    deadline = time.time() + WAIT_S
    while not (found := check()):
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the launcher exited (rc {proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.time() > deadline:
            pytest.fail(f"{what}: not within {WAIT_S}s:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    return found


def stop_tree(pid: int) -> list[int]:
    """SIGSTOP a process and its descendants: the unit hangs (its Slurm task keeps running)."""
    procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    for p in procs:
        p.send_signal(signal.SIGSTOP)
    return [p.pid for p in procs]


def task_table(cluster: SlurmCluster) -> dict[str, str]:
    """Every task the controller knows (MinJobAge keeps ended ones): job id -> state."""
    res = cluster.run("squeue", "--noheader", "--array", "--states=all", "--format=%i %T")
    assert res.returncode == 0, res.stderr
    return dict(line.split() for line in res.stdout.splitlines())


def stray_processes(cluster: SlurmCluster) -> list[str]:
    """Processes started through the cluster other than its daemons (job steps, units, kernels)."""
    daemons = {p.pid for p in cluster.procs.values()}
    daemons |= {c.pid for pid in list(daemons) if psutil.pid_exists(pid) for c in psutil.Process(pid).children()}
    stray = []
    for pid in cluster.marked_processes():
        if pid not in daemons:
            try:
                stray.append(f"{pid} {' '.join(psutil.Process(pid).cmdline())[:120]}")
            except psutil.NoSuchProcess:
                pass
    return stray


@pytest.fixture(scope="module")
def first_launch(cluster, slurm_env, params, baseline, tmp_path_factory) -> dict:
    """Launch 1: one task cancelled, one timed out, the rest finish; the launcher exits on its own."""
    if baseline["res"].returncode != 0:
        pytest.fail("the baseline run of the micro grid failed:\n" + explain(baseline["res"]))
    root = tmp_path_factory.mktemp("slurm-run")
    out = copy_out(baseline["out"], root / "out", extract_only=True)
    log = root / "launch1.log"
    t0 = time.time()
    proc = launch(slurm_env, params, out, log)
    try:
        cancelled = wait_for("a first SAE task running", lambda: running_tasks(out), proc, log)
        c_uid, c_rec = sorted(cancelled.items())[0]
        res = cluster.run("scancel", c_rec["slurm"]["job_id"])
        assert res.returncode == 0, res.stderr
        slow = wait_for("a second SAE task running",
                        lambda: {u: r for u, r in running_tasks(out).items() if u != c_uid}, proc, log)
        s_uid, s_rec = sorted(slow.items())[0]
        stopped = stop_tree(s_rec["pid"])  # it hangs, so it is still running when its limit is checked
        res = cluster.run("scontrol", "update", f"JobId={s_rec['slurm']['job_id']}", "TimeLimit=0")
        assert res.returncode == 0, res.stderr
        rc = proc.wait(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    return {"out": out, "params": params, "rc": rc, "log": log.read_text(), "wall": time.time() - t0,
            "cancelled": (c_uid, c_rec["slurm"]["job_id"]), "timed_out": (s_uid, s_rec["slurm"]["job_id"]),
            "stopped": stopped, "done": done_mtimes(out)}


@pytest.fixture(scope="module")
def relaunch(cluster, slurm_env, first_launch, tmp_path_factory) -> dict:
    """Launch 2 is SIGKILLed while the two resubmitted tasks run; ``status`` then; launch 3 finishes."""
    out, params = first_launch["out"], first_launch["params"]
    failed = {first_launch["cancelled"][0], first_launch["timed_out"][0]}
    root = out.parent
    log = root / "launch2.log"
    t0 = time.time()
    proc = launch(slurm_env, params, out, log)
    try:
        def both_running():
            tasks = running_tasks(out)
            submitted = {u: json.loads((out / "runs" / u / "slurm.json").read_text())["job_id"] for u in failed}
            return submitted if all(tasks.get(u, {}).get("slurm", {}).get("job_id") == submitted[u]
                                    for u in failed) else None

        tasks = wait_for("both resubmitted tasks running", both_running, proc, log)
    finally:
        kill_tree(proc)
    killed_log = log.read_text()
    queue = task_table(cluster)
    status = cli(slurm_env, "status", params, "--out", out)
    third = cli(slurm_env, "run", params, "--out", out, "--executor", "submitit")
    (root / "status.txt").write_text(status.stdout + status.stderr)  # for a person reading a failure
    (root / "launch3.log").write_text(third.stdout + third.stderr)
    return {"tasks": tasks, "killed_log": killed_log, "queue_after_kill": queue, "status": status,
            "third": third, "wall": time.time() - t0}


# ------------------------------------------------------------------------------------------------ tests


def test_sbatch_script_requests_what_the_params_say(cluster, tmp_path):
    """gpus_per_node -> --gpus-per-node (none at 0), partition, time, memory, CPUs: the script submitit writes."""
    p = load_params(write_params(tmp_path / "gpu.yaml", executor__slurm={
        "partition": "gpu", "gpus_per_node": 2, "cpus_per_task": 8, "mem_gb": 64, "time_min": 240,
        "array_parallelism": 3}))
    text = submitit_executor(p, str(tmp_path), cluster="slurm")._executor._make_submission_file_text("CMD", "x")
    for line in ("--gpus-per-node=2", "--partition=gpu", "--cpus-per-task=8", "--mem=64GB", "--time=240"):
        assert f"#SBATCH {line}\n" in text, text
    cpu = load_params(write_params(tmp_path / "cpu.yaml"))
    assert "gpus" not in submitit_executor(cpu, str(tmp_path), cluster="slurm")._executor. \
        _make_submission_file_text("CMD", "x")


def test_cancelled_task_is_a_failed_unit_with_slurm_state_and_log(first_launch):
    r = first_launch
    uid, jid = r["cancelled"]
    assert r["rc"] == 1, r["log"]
    err = json.loads((r["out"] / "runs" / uid / "error.json").read_text())
    assert (err["slurm_state"], err["slurm_job_id"]) == ("CANCELLED", jid), err
    assert Path(err["log"]).is_file() and err["log"] in err["message"] and "CANCELLED" in err["message"], err
    assert not (r["out"] / "runs" / uid / "done.json").exists()
    assert not (r["out"] / "runs" / uid / "running.json").exists()
    assert ("FAILED", uid) in finished_lines(r["log"]), r["log"]
    assert re.search(rf"^  - {re.escape(uid)}: Slurm job {jid} CANCELLED", r["log"], re.M), r["log"]


def test_timed_out_task_is_a_failed_unit_with_slurm_state_and_log(first_launch):
    r = first_launch
    uid, jid = r["timed_out"]
    err = json.loads((r["out"] / "runs" / uid / "error.json").read_text())
    assert (err["slurm_state"], err["slurm_job_id"]) == ("TIMEOUT", jid), err
    assert "time limit" in err["message"] and Path(err["log"]).is_file(), err
    assert not (r["out"] / "runs" / uid / "done.json").exists()
    assert ("FAILED", uid) in finished_lines(r["log"]), r["log"]
    assert not [pid for pid in r["stopped"] if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE], "the hung unit outlived its task"


def test_launcher_goes_on_and_the_other_units_ran_as_array_tasks(first_launch):
    r = first_launch
    _, us = grid_units(r["params"], r["out"])
    failed = {r["cancelled"][0], r["timed_out"][0]}
    assert f"1/{len(us)} units already complete" in r["log"], r["log"]  # the copied extract stage is reused
    finished = dict((uid, status) for status, uid in finished_lines(r["log"]))
    assert finished == {**{u.uid: "done" for u in us[1:] if u.uid not in failed}, **dict.fromkeys(failed, "FAILED")}
    sae = [u for u in us if u.stage == "sae"]
    submitted = {u.uid: json.loads((u.run_dir(r["out"]) / "slurm.json").read_text()) for u in sae}
    tasks = {rec["job_id"] for rec in submitted.values()}
    assert {j.split("_")[0] for j in tasks} == {r["cancelled"][1].split("_")[0]}, f"not one job array: {tasks}"
    assert {j.split("_")[1] for j in tasks} == {str(i) for i in range(len(sae))}, tasks
    for u in sae:
        if u.uid not in failed:  # the task's own record: it ran as the task the launcher submitted
            done = json.loads((u.run_dir(r["out"]) / "done.json").read_text())
            assert done["slurm"]["job_id"] == submitted[u.uid]["job_id"], (done["slurm"], submitted[u.uid])
            assert done["slurm"]["partition"] == PARTITION and done["slurm"]["node"], done["slurm"]
    script = Path(submitted[sae[0].uid]["sbatch_script"]).read_text()
    for line in (f"--array=0-{len(sae) - 1}%2", "--cpus-per-task=1", "--mem=1GB", "--time=10",
                 f"--partition={PARTITION}"):
        assert f"#SBATCH {line}\n" in script, script
    # visibility: one line about accounting instead of submitit's warning on every sacct poll
    assert "Bypassing" not in r["log"], r["log"]
    assert r["log"].count("Slurm accounting is unavailable") == 1 and "squeue" in r["log"], r["log"]


def test_rerun_after_kill_waits_for_live_tasks_and_ends_with_the_local_numbers(cluster, first_launch, relaunch,
                                                                                base_out):
    r, out = relaunch, first_launch["out"]
    p, us = grid_units(first_launch["params"], out)
    failed = {first_launch["cancelled"][0], first_launch["timed_out"][0]}
    # launch 2 submitted only the failed units, as one new array; killing it left their tasks running
    assert re.search(r"submitted 2 unit\(s\) as Slurm job array", r["killed_log"]), r["killed_log"]
    for uid, jid in r["tasks"].items():
        assert r["queue_after_kill"][jid] == "RUNNING", r["queue_after_kill"]
    # status: the running units with their task's job id and state
    assert r["status"].returncode == 0, explain(r["status"])
    for uid, jid in r["tasks"].items():
        assert re.search(rf"^running +{re.escape(uid)} +slurm {jid} RUNNING ", r["status"].stdout, re.M), \
            r["status"].stdout
    # launch 3 waited for both tasks (no new submission), then aggregated
    third = r["third"]
    assert third.returncode == 0, explain(third)
    assert "submitted" not in third.stdout, third.stdout
    for uid, jid in r["tasks"].items():
        assert f"{uid}: Slurm job {jid} of an earlier launcher is RUNNING; waiting for it" in third.stdout, third.stdout
    assert {uid for _, uid in finished_lines(third.stdout)} == failed | {"aggregate", "report"}, third.stdout
    counters = [m.groups()[:2] for line in third.stdout.splitlines() if (m := UNIT_LINE.match(line))]
    assert counters[-1] == (str(len(us)), str(len(us))), third.stdout  # aggregate/report redone: not 9/7
    done = done_mtimes(out)
    assert {u: t for u, t in done.items() if u not in failed | {"aggregate", "report"}} == \
        {u: t for u, t in first_launch["done"].items() if u not in {"aggregate", "report"}}, "a finished unit ran again"
    # every SAE unit ran as exactly one completed task (plus the cancelled and the timed-out one): none twice
    queue = task_table(cluster)
    sae = [u for u in us if u.stage == "sae"]
    ran = [json.loads((u.run_dir(out) / "done.json").read_text())["slurm"]["job_id"] for u in sae]
    assert {r["tasks"][u] for u in failed} <= set(ran)
    assert all(queue[j] == "COMPLETED" for j in ran), queue
    assert sorted(queue.values()) == sorted(["COMPLETED"] * len(sae) + ["CANCELLED", "TIMEOUT"]), queue
    assert not list((out / "runs").glob("*/running.json")) and not (out / ".proxygap.lock").exists()
    deadline = time.time() + 30  # slurmstepd exits a moment after its task
    while stray_processes(cluster) and time.time() < deadline:
        time.sleep(0.5)
    assert not stray_processes(cluster), "processes of ended tasks are still alive"
    # Slurm and the local executor give the same numbers, bit for bit
    assert_same_numbers(out, base_out, [s.sae_id for s in p.sae_specs()])
    print(f"slurm scenario: launch 1 {first_launch['wall']:.0f}s, launches 2+3 {r['wall']:.0f}s")


# ------------------------------------------------------------------------------------------------ the follower's rules


def test_follower_judges_a_task_by_its_own_records_and_slurms_final_state(tmp_path):
    """done.json counts only when the task itself wrote it; error.json of a task that Slurm ended gets Slurm's
    state, reason and log; a notebook error in a task that ran to its end keeps the unit's own message."""
    from proxygap_helpers.grid import Unit
    from proxygap_helpers.slurm import Follower, TaskState

    unit = Unit("sae-x", "sae", ("02_train",))
    rd = unit.run_dir(tmp_path)
    rd.mkdir(parents=True)
    rec = {"job_id": "7_1", "stderr": "/logs/7_1_0_log.err", "stdout": "/logs/7_1_0_log.out"}
    f = Follower(tmp_path, accounting=False, say=print)
    (rd / "done.json").write_text(json.dumps({"slurm": {"job_id": "3_0"}}))  # an earlier attempt's
    assert f.outcome(unit, rec, TaskState("7_1", "RUNNING")) is None
    assert f.outcome(unit, rec, None) is None  # squeue not asked yet
    (rd / "running.json").write_text(json.dumps({"pid": 1, "slurm": {"job_id": "7_1"}}))
    res = f.outcome(unit, rec, TaskState("7_1", "TIMEOUT", "TimeLimit", "10:00", "10:00", "n1"))
    assert res["ok"] is False and res["slurm_state"] == "TIMEOUT" and res["log"] == rec["stderr"]
    assert res["message"].startswith("Slurm job 7_1 TIMEOUT [TimeLimit]: ran past its time limit")
    assert json.loads((rd / "error.json").read_text())["slurm_state"] == "TIMEOUT"
    assert not (rd / "running.json").exists()

    (rd / "error.json").write_text(json.dumps({"message": "ValueError: bad store", "slurm": {"job_id": "7_1"}}))
    assert f.outcome(unit, rec, TaskState("7_1", "COMPLETING")) is None  # wait until Slurm has ended it
    res = f.outcome(unit, rec, TaskState("7_1", "COMPLETED"))
    assert res["message"] == "ValueError: bad store" and res["slurm_state"] == "COMPLETED"

    (rd / "done.json").write_text(json.dumps({"wall_seconds": 1.0, "slurm": {"job_id": "7_1"}}))
    assert f.outcome(unit, rec, TaskState("7_1", "RUNNING"))["ok"] is True  # done as soon as it is written


def test_job_env_names_the_array_task():
    from proxygap_helpers.slurm import job_env

    assert job_env({}) is None
    env = {"SLURM_JOB_ID": "12", "SLURM_ARRAY_JOB_ID": "9", "SLURM_ARRAY_TASK_ID": "3", "SLURMD_NODENAME": "n1",
           "SLURM_JOB_PARTITION": "gpu"}
    assert job_env(env) | {"cluster": None} == {"job_id": "9_3", "raw_job_id": "12", "node": "n1", "cluster": None,
                                                "partition": "gpu"}
    assert job_env({"SLURM_JOB_ID": "12"})["job_id"] == "12"
