"""Units as Slurm job-array tasks: submit, follow with ``squeue``, and pick up what an earlier launcher left.

submitit writes the sbatch script and runs each unit in one task of a job array. Following the tasks is
done here, because submitit follows them with ``sacct``, which needs Slurm's accounting database. Small
clusters often have none (``AccountingStorageType=accounting_storage/none``). There submitit warns
("Bypassing sacct error ...") on every poll, and it never learns that a task was cancelled or timed out,
so ``job.result()`` waits for ever.

Files per unit, in ``runs/<unit id>/``:

- ``slurm.json``, written by the launcher when it submits: the task's job id ``<array>_<task>``, its log
  files (submitit's ``<out>/submitit/<array>_<task>/<array>_<task>_0_log.{out,err}``) and the sbatch script.
- ``running.json``, ``done.json`` and ``error.json``, written by the task itself (``executors.run_unit``), carry
  ``slurm: {job_id, ...}`` read from the task's own environment. This shows that the unit ran as that task.

Following: the launcher looks for the task's ``done.json`` every ``POLL_S`` seconds and asks Slurm for every
task's state every ``SQUEUE_S`` seconds, with one ``squeue --states=all`` call. squeue keeps listing tasks
that ended for ``MinJobAge`` seconds (300 by default). ``sacct`` is used only for tasks that squeue no longer
knows, and only where accounting works. A unit is finished when its task has written ``done.json``
(success). It has failed when Slurm says its task ended without one (CANCELLED, TIMEOUT, OUT_OF_MEMORY,
NODE_FAIL, or a notebook error recorded by the task). Then ``error.json`` holds Slurm's state and reason,
the log paths, and any error the task recorded itself.

A relaunched launcher (the first one was killed, or its terminal was closed) *waits* for the tasks that an
earlier launcher submitted and that Slurm still has queued or running; it does not cancel and resubmit
them. Those tasks are the expensive units (hours on a GPU for the reference grid). They run whether or
not a launcher is alive, and they write their results atomically, so killing them would gain nothing.
The launcher never submits a unit while its task is alive, so two copies of one unit never run at once.
It never submits again a unit whose task has written ``done.json``, so no finished unit runs twice.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import provenance
from .files import read_json, write_json_atomic
from .grid import DONE, ERROR, RUNNING, Unit

RECORD = "slurm.json"
POLL_S = 1.0  # seconds between looks for done.json
SQUEUE_S = 5.0  # seconds between squeue calls (one call for every task)
FS_GRACE_S = 60.0  # a COMPLETED task's done.json may take this long to show on a network filesystem
UNREACHABLE_S = 600.0  # squeue failing this long: the remaining units are reported failed
# Job states in which a task may still run (squeue --states help; the rest are final)
ACTIVE = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED",
                    "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD",
                    "POWER_UP_NODE"})
MEANING = {
    "CANCELLED": "cancelled (scancel, by you or an administrator)",
    "TIMEOUT": "ran past its time limit (executor.slurm.time_min)",
    "OUT_OF_MEMORY": "ran out of memory (executor.slurm.mem_gb)",
    "NODE_FAIL": "its node failed",
    "FAILED": "its batch script exited non-zero",
    "PREEMPTED": "was preempted",
    "BOOT_FAIL": "its node failed to boot",
    "DEADLINE": "missed its deadline",
    "COMPLETED": "ended without writing done.json",
    "UNKNOWN": "is no longer known to squeue (older than MinJobAge) and sacct is unavailable",
}


class SlurmError(RuntimeError):
    """squeue / sacct could not be run or failed."""


@dataclass(frozen=True)
class TaskState:
    """One task as Slurm reports it: ``job_id`` is ``<array>_<task>``; ``elapsed`` and ``limit`` as squeue prints."""

    job_id: str
    state: str
    reason: str = ""
    elapsed: str = ""
    limit: str = ""
    node: str = ""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


def job_env(environ: dict | None = None) -> dict | None:
    """The Slurm task this process runs in (from ``SLURM_*`` variables), or None outside Slurm."""
    env = os.environ if environ is None else environ
    if not env.get("SLURM_JOB_ID"):
        return None
    array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    return {"job_id": f"{array}_{task}" if array and task else env["SLURM_JOB_ID"],
            "raw_job_id": env["SLURM_JOB_ID"], "node": env.get("SLURMD_NODENAME") or socket.gethostname(),
            "cluster": env.get("SLURM_CLUSTER_NAME"), "partition": env.get("SLURM_JOB_PARTITION")}


def _command(cmd: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise SlurmError(f"{cmd[0]} is not installed here") from exc
    except subprocess.TimeoutExpired as exc:
        raise SlurmError(f"{cmd[0]} did not answer within {timeout:.0f}s") from exc


def _array_ids(job_ids) -> list[str]:
    return sorted({j.split("_")[0] for j in job_ids})


def squeue(job_ids) -> dict[str, TaskState]:
    """Every task of the arrays of ``job_ids`` that the controller still knows, ended ones included.

    Raises SlurmError when squeue cannot be run or fails (an unknown job id alone is not a failure: the
    task simply is not in the result).
    """
    arrays = _array_ids(job_ids)
    if not arrays:
        return {}
    res = _command(["squeue", "--noheader", "--array", "--states=all", f"--jobs={','.join(arrays)}",
                    "--format=%i|%T|%r|%M|%l|%N"])
    if res.returncode != 0:
        if "Invalid job id" in res.stderr:
            return {}
        raise SlurmError(f"squeue failed: {res.stderr.strip() or res.stdout.strip()}")
    states = {}
    for line in res.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 6:
            jid, state, reason, elapsed, limit, node = parts
            states[jid] = TaskState(jid, state.split()[0], "" if reason == "None" else reason, elapsed, limit, node)
    return states


def accounting_error() -> str | None:
    """None when ``sacct`` works here; else why not (e.g. "Slurm accounting storage is disabled")."""
    try:
        res = _command(["sacct", "--noheader", "--jobs=1", "--format=JobID"], timeout=30)
    except SlurmError as exc:
        return str(exc)
    if res.returncode == 0:
        return None
    return (res.stderr.strip() or res.stdout.strip() or f"exit {res.returncode}").splitlines()[0]


def sacct(job_ids) -> dict[str, TaskState]:
    """Final states from Slurm's accounting, for tasks that squeue has forgotten ({} when it fails)."""
    if not job_ids:
        return {}
    try:
        res = _command(["sacct", "--noheader", "--parsable2", "--allocations", f"--jobs={','.join(job_ids)}",
                        "--format=JobID,State,Elapsed,Timelimit,NodeList"])
    except SlurmError:
        return {}
    states = {}
    for line in res.stdout.splitlines() if res.returncode == 0 else []:
        parts = line.strip().split("|")
        if len(parts) == 5:
            jid, state, elapsed, limit, node = parts
            states[jid] = TaskState(jid, state.split()[0], "", elapsed, limit, node)
    return states


def task_states(job_ids, accounting: bool) -> dict[str, TaskState]:
    """States of ``job_ids``: squeue, then sacct (when ``accounting``) for those squeue no longer knows;
    a task known to neither is UNKNOWN (final). Raises SlurmError when squeue fails."""
    states = squeue(job_ids)
    missing = [j for j in job_ids if j not in states]
    if missing and accounting:
        states.update(sacct(missing))
    return {j: states.get(j, TaskState(j, "UNKNOWN")) for j in job_ids}


def read_record(run_dir: Path) -> dict | None:
    """The ``slurm.json`` of a unit's last submission, or None."""
    try:
        return read_json(Path(run_dir) / RECORD)
    except (OSError, ValueError):
        return None


def _own(path: Path, job_id: str) -> dict | None:
    """The JSON record at ``path`` when the task ``job_id`` wrote it (not an earlier attempt)."""
    try:
        rec = read_json(path)
    except (OSError, ValueError):
        return None
    return rec if (rec.get("slurm") or {}).get("job_id") == job_id else None


# ------------------------------------------------------------------------------------------------ launcher


class Follower:
    """Follows submitted units until each has finished or failed; calls ``on_done`` once per unit, as it ends."""

    def __init__(self, out_dir: Path, accounting: bool, say: Callable[[str], None]):
        self.out, self.accounting, self.say = Path(out_dir), accounting, say
        self.ended_at: dict[str, float] = {}  # job id -> when Slurm first reported it final

    def follow(self, units: list[Unit], records: dict[str, dict], on_done: Callable[[dict], None]) -> list[dict]:
        waiting = {u.uid: u for u in units}
        results: list[dict] = []
        states: dict[str, TaskState] = {}
        last_query, failing_since, said_failing = float("-inf"), None, False
        while waiting:
            if time.time() - last_query >= SQUEUE_S:
                last_query = time.time()
                try:
                    states = task_states([records[uid]["job_id"] for uid in waiting], self.accounting)
                    failing_since = None
                except SlurmError as exc:
                    failing_since = failing_since or time.time()
                    if not said_failing:
                        self.say(f"proxygap: {exc}; retrying every {SQUEUE_S:.0f}s (gives up after "
                                 f"{UNREACHABLE_S:.0f}s)")
                        said_failing = True
                    if time.time() - failing_since > UNREACHABLE_S:
                        states = {records[uid]["job_id"]: TaskState(records[uid]["job_id"], "UNKNOWN",
                                                                    f"squeue failing: {exc}") for uid in waiting}
            for uid in list(waiting):
                rec = records[uid]
                res = self.outcome(waiting[uid], rec, states.get(rec["job_id"]))
                if res is not None:
                    del waiting[uid]
                    results.append(res)
                    on_done(res)
            if waiting:
                time.sleep(POLL_S)
        return results

    def outcome(self, unit: Unit, rec: dict, st: TaskState | None) -> dict | None:
        """The unit's result once its task has ended (writing error.json for a failure), else None."""
        rd, jid = unit.run_dir(self.out), rec["job_id"]
        done = _own(rd / DONE, jid)
        if done is not None:
            return {"uid": unit.uid, "ok": True, **done}
        if st is None or st.active:
            return None
        own_error = _own(rd / ERROR, jid)
        first = self.ended_at.setdefault(jid, time.time())
        if st.state == "COMPLETED" and own_error is None and time.time() - first < FS_GRACE_S:
            return None  # its done.json / error.json may still be on the way (network filesystem)
        err = {**(own_error or {}), **failure(unit, rec, st, own_error)}
        write_json_atomic(rd / ERROR, err)
        (rd / RUNNING).unlink(missing_ok=True)
        return {"uid": unit.uid, "ok": False, **err}


def failure(unit: Unit, rec: dict, st: TaskState, own_error: dict | None) -> dict:
    """error.json fields for a task that ended without done.json: Slurm's state, reason, logs, message."""
    unit_msg = (own_error or {}).get("message")
    if st.state == "COMPLETED" and unit_msg:
        message = unit_msg  # the unit's own failure (a notebook error): Slurm ran the task to its end
    else:
        # a cancelled task keeps the reason it last waited for (e.g. Resources): not worth showing
        reason = f" [{st.reason}]" if st.reason and st.state != "CANCELLED" else ""
        message = (f"Slurm job {st.job_id} {st.state}{reason}: {MEANING.get(st.state, 'ended')}; log: {rec['stderr']}"
                   + (f"; the unit reported: {unit_msg}" if unit_msg else ""))
    return {"unit": unit.uid, "message": message, "slurm_job_id": st.job_id, "slurm_state": st.state,
            "slurm_reason": st.reason, "slurm_elapsed": st.elapsed, "slurm_time_limit": st.limit,
            "log": rec["stderr"], "log_out": rec["stdout"], "end": (own_error or {}).get("end") or provenance.now()}


_ACCOUNTING_SAID = False


def accounting_note(say: Callable[[str], None]) -> bool:
    """Whether sacct works; when it does not, say so once per process (and that squeue is used)."""
    global _ACCOUNTING_SAID
    why = accounting_error()
    if why and not _ACCOUNTING_SAID:
        say(f"proxygap: Slurm accounting is unavailable here (sacct: {why}); following the tasks with squeue.")
        _ACCOUNTING_SAID = True
    return why is None


def run_array(ex, fn: Callable, params_path: str, out_dir: str, todo: list[Unit], threads: int,
              on_done: Callable[[dict], None], say: Callable[[str], None]) -> list[dict]:
    """Run ``todo`` as tasks of one job array of the submitit Slurm executor ``ex``; return one result per unit.

    Units whose task from an earlier submission is still queued or running (or has just written done.json)
    are followed, not submitted again. ``fn(params_path, out_dir, unit, threads)`` runs in each task.
    """
    out = Path(out_dir)
    accounting = accounting_note(say)
    earlier = {u.uid: r for u in todo if (r := read_record(u.run_dir(out))) and r.get("job_id")}
    states = task_states([r["job_id"] for r in earlier.values()], accounting) if earlier else {}
    records: dict[str, dict] = {}
    for u in todo:
        r = earlier.get(u.uid)
        if r is None:
            continue
        st = states[r["job_id"]]
        if st.active or _own(u.run_dir(out) / DONE, r["job_id"]) is not None:
            records[u.uid] = r
            say(f"proxygap: {u.uid}: Slurm job {r['job_id']} of an earlier launcher is {st.state}; "
                "waiting for it (not submitting the unit again)")
    new = [u for u in todo if u.uid not in records]
    if new:
        records.update(submit(ex, fn, params_path, out, new, threads, say))
    return Follower(out, accounting, say).follow(todo, records, on_done)


def submit(ex, fn: Callable, params_path: str, out: Path, units: list[Unit], threads: int,
           say: Callable[[str], None]) -> dict[str, dict]:
    """Submit ``units`` as one job array; write each unit's ``slurm.json``; return unit id -> record."""
    from submitit.core.utils import JobPaths

    for u in units:  # an earlier attempt's error is replaced by this one's outcome
        u.run_dir(out).mkdir(parents=True, exist_ok=True)
        (u.run_dir(out) / ERROR).unlink(missing_ok=True)
    n = len(units)
    try:
        jobs = ex.map_array(fn, [params_path] * n, [str(out)] * n, units, [threads] * n)
    except Exception as exc:  # noqa: BLE001 - submitit raises its own errors with sbatch's message
        raise SlurmError(f"sbatch refused the job array: {str(exc).strip()}") from exc
    array = jobs[0].job_id.split("_")[0]
    script = JobPaths(ex.folder, job_id=array).submission_file
    records = {}
    for job, u in zip(jobs, units):
        rec = {"job_id": job.job_id, "submitted": provenance.now(), "stdout": str(job.paths.stdout),
               "stderr": str(job.paths.stderr), "sbatch_script": str(script),
               "launcher": {"pid": os.getpid(), "host": socket.gethostname()}}
        write_json_atomic(u.run_dir(out) / RECORD, rec)
        records[u.uid] = rec
    say(f"proxygap: submitted {n} unit(s) as Slurm job array {array} (tasks {array}_0..{array}_{n - 1}); "
        f"logs in {Path(ex.folder).parent}/{array}_<task>/")
    return records


# ------------------------------------------------------------------------------------------------ status


def describe(out_dir: Path, units: list[Unit]) -> dict[str, tuple[str | None, str]]:
    """For each unit with a Slurm record: (running | pending | None, detail) from one squeue call.

    ``running``/``pending`` when its task is alive (RUNNING/COMPLETING, or queued), None when the task has
    ended (the unit's files then say done or failed). Detail: job id, state, elapsed time and node, log.
    """
    records = {u.uid: r for u in units if (r := read_record(u.run_dir(out_dir))) and r.get("job_id")}
    if not records:
        return {}
    try:
        states = squeue([r["job_id"] for r in records.values()])
        why = None
    except SlurmError as exc:
        states, why = {}, str(exc)
    res = {}
    for uid, r in records.items():
        st = states.get(r["job_id"])
        if st is None:
            res[uid] = (None, f"slurm {r['job_id']} ({why or 'no longer in squeue'})")
        elif st.active:
            where = f" on {st.node}" if st.node else (f" ({st.reason})" if st.reason else "")
            kind = "running" if st.state in ("RUNNING", "COMPLETING", "CONFIGURING") else "pending"
            res[uid] = (kind, f"slurm {st.job_id} {st.state} {st.elapsed}{where}; log {r['stderr']}")
        else:
            res[uid] = (None, f"slurm {st.job_id} {st.state}")
    return res
