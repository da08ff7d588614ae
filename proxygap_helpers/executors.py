"""Running units: one unit = its notebooks executed with papermill, in one fresh kernel per unit.

``run_unit`` is what every executor calls (in a worker process or a Slurm job). It records
``running.json`` while it works, then either ``done.json`` (provenance, timings, the split between
in-notebook compute and kernel/IO overhead) or ``error.json`` (the failing cell's error, the executed
notebook is kept). Executors: ``local`` (a process pool; torch threads divided among jobs) and
``submitit`` (Slurm job arrays, followed by ``slurm.run_array``; or submitit's local executor where there
is no Slurm). Inside a Slurm task the records also carry ``slurm: {job_id, node, ...}`` (see ``slurm.py``).

Threads per unit: ``executor.threads`` (default 1) on every executor, whatever the machine's core count
(``$PROXYGAP_THREADS`` overrides it as a params value: ``grid.resolve``). CPU numbers depend on the thread count
and on nothing else of the machine, so a fixed count reproduces a published report bit for bit on any core count;
``executor.jobs`` (``auto``: cores // threads) fills the cores with units instead. On Slurm, give
``slurm.cpus_per_task`` at least ``threads``.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

from . import progress as progress_file
from . import provenance, slurm
from .files import write_json_atomic
from .grid import Unit, input_hash
from .layout import DONE, ERROR, NOTEBOOKS, RUNNING
from .params import Params, load_params

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PROXYGAP_THREADS")


def _compute_seconds(nb) -> float:
    """Sum of papermill's per-cell durations, excluding cells tagged ``imports`` (start-up cost)."""
    total = 0.0
    for cell in nb.cells:
        if cell.cell_type != "code" or "imports" in cell.metadata.get("tags", []):
            continue
        total += float(cell.metadata.get("papermill", {}).get("duration") or 0.0)
    return total


def _error_message(exc: BaseException) -> str:
    """The notebook's own error (ename: evalue) when papermill raised, else the exception text."""
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename:
        return f"{ename}: {evalue}"
    return f"{type(exc).__name__}: {exc}"


@contextmanager
def _kernel():
    """One fresh kernel for all the notebooks of a unit, shut down after the last one.

    A unit's notebooks form one session, like "Run All" on each in turn in one JupyterLab kernel. The
    second notebook then skips a kernel start and the imports of torch and SAELens, about 10 s here.
    Each notebook still defines everything it uses (nbval runs each one alone, in its own kernel). The
    first notebook's client starts the kernel exactly as papermill would (this process's environment,
    with the thread variables, and cwd notebooks/); it does not own the manager, so it leaves the kernel
    running for the next notebook.
    """
    import shutil
    import tempfile

    from jupyter_client.manager import AsyncKernelManager
    from nbclient.util import run_sync

    # IPC transport (Unix sockets in a private temporary folder): the kernel is local, and over TCP ipykernel warns
    # on every start that the channel is unencrypted (seven lines of noise per run in the runner's output)
    sockets = tempfile.mkdtemp(prefix="proxygap-kernel-")
    km = AsyncKernelManager(kernel_name="python3", transport="ipc", ip=os.path.join(sockets, "k"))
    try:
        yield km
    finally:
        if km.has_kernel:
            run_sync(km.shutdown_kernel)(now=True)
        shutil.rmtree(sockets, ignore_errors=True)


def run_unit(params_path: str, out_dir: str, unit: Unit, threads: int, progress: bool = False) -> dict:
    """Execute a unit's notebooks; never raises for a notebook failure (it is recorded in error.json)."""
    import papermill as pm

    out = Path(out_dir)
    rd = unit.run_dir(out)
    rd.mkdir(parents=True, exist_ok=True)
    for name in (DONE, ERROR):
        (rd / name).unlink(missing_ok=True)
    p = load_params(params_path)
    ihash = input_hash(p, out, unit)
    start, t0 = provenance.now(), time.time()
    task = {"slurm": job} if (job := slurm.job_env()) else {}  # the Slurm task this unit runs as, if any
    write_json_atomic(rd / RUNNING, {"pid": os.getpid(), "host": os.uname().nodename, "start": start, **task})
    env_before = {v: os.environ.get(v) for v in (*THREAD_VARS, progress_file.ENV)}
    os.environ.update({v: str(threads) for v in THREAD_VARS})
    os.environ[progress_file.ENV] = str(rd / progress_file.FILE)  # the unit's bars report there (progress.py)
    (rd / progress_file.FILE).unlink(missing_ok=True)
    compute, notebooks = 0.0, []
    try:
        with _kernel() as km:
            for name, copy, extra in unit.executions():
                target = rd / f"{copy}.ipynb"
                notebooks.append(str(target.relative_to(out)))
                nb = pm.execute_notebook(
                    str(NOTEBOOKS / f"{name}.ipynb"), str(target),
                    parameters={**unit.parameters, **extra, "threads": threads},
                    cwd=str(NOTEBOOKS), progress_bar=progress, log_output=False, kernel_name="python3", km=km,
                )
                compute += _compute_seconds(nb)
        if unit.stage == "report":
            from .publish import publish

            publish(p, out, [out / n for n in notebooks])
    except BaseException as exc:  # noqa: BLE001 - recorded, then the runner moves on
        # Ctrl-C: not a failure (status shows it as interrupted), whether it reached this process or the kernel
        stopped = isinstance(exc, KeyboardInterrupt) or getattr(exc, "ename", None) == "KeyboardInterrupt"
        rec = {"unit": unit.uid, "message": "interrupted (Ctrl-C)" if stopped else _error_message(exc),
               "notebook": notebooks[-1] if notebooks else None, "interrupted": stopped,
               "traceback": "" if stopped else traceback.format_exc(limit=5), "start": start, "end": provenance.now(),
               "wall_seconds": time.time() - t0, **task}
        write_json_atomic(rd / ERROR, rec)
        (rd / RUNNING).unlink(missing_ok=True)
        if stopped:
            raise KeyboardInterrupt from None
        return {"uid": unit.uid, "ok": False, **rec}
    finally:
        for v, old in env_before.items():
            os.environ.pop(v, None) if old is None else os.environ.__setitem__(v, old)
    wall = time.time() - t0
    rec = {"unit": unit.uid, "stage": unit.stage, "notebooks": notebooks, "input_hash": ihash,
           "start": start, "end": provenance.now(), "wall_seconds": wall, "compute_seconds": compute,
           "overhead_fraction": max(0.0, (wall - compute) / wall) if wall else 0.0,
           "threads": threads, "peak_rss_mb": provenance.peak_rss_mb(),
           "provenance": provenance.record(p.params_hash()), **task}
    write_json_atomic(rd / DONE, rec)
    (rd / RUNNING).unlink(missing_ok=True)
    (rd / progress_file.FILE).unlink(missing_ok=True)
    return {"uid": unit.uid, "ok": True, **rec}


def _worker_init() -> None:
    """A pool worker: unbuffered output; Ctrl-C (SIGINT to the whole foreground group) is ignored while it waits for
    a unit, so that only the units it runs stop (:func:`_pool_unit` restores it for them), without tracebacks."""
    import signal

    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pool_unit(params_path: str, out_dir: str, unit: Unit, threads: int) -> dict:
    """:func:`run_unit` in a pool worker, interruptible by Ctrl-C as in the runner itself."""
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return run_unit(params_path, out_dir, unit, threads)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_local(params_path: str, out_dir: str, todo: list[Unit], jobs: int,
              on_done: Callable[[dict], None]) -> list[dict]:
    """Run units in a process pool of ``jobs`` workers, each kernel with the params' ``executor.threads``."""
    threads = load_params(params_path).threads
    results = []
    if jobs == 1 or len(todo) == 1:
        for u in todo:
            results.append(run_unit(params_path, out_dir, u, threads))
            on_done(results[-1])
        return results
    pool = cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init)
    try:
        futs = [pool.submit(_pool_unit, params_path, out_dir, u, threads) for u in todo]
        for f in cf.as_completed(futs):
            results.append(f.result())
            on_done(results[-1])
    except KeyboardInterrupt:  # the running units got the same Ctrl-C and record it; the queued ones never start
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results


def _say(msg: str) -> None:
    """One line for the person watching the launcher (above the progress bar on a terminal)."""
    from tqdm.auto import tqdm

    tqdm.write(msg) if sys.stderr.isatty() else print(msg, flush=True)


def submitit_executor(p: Params, out_dir: str, cluster: str | None = None):
    """The submitit executor for ``p.executor.slurm``: ``cluster`` None picks Slurm where ``srun`` exists.

    Params -> sbatch: ``time_min`` -> ``--time``, ``cpus_per_task`` -> ``--cpus-per-task``, ``mem_gb`` ->
    ``--mem``, ``gpus_per_node`` -> ``--gpus-per-node`` (only when > 0), ``array_parallelism`` -> the ``%N``
    of ``--array``, ``partition`` -> ``--partition``. Logs and the sbatch script go to ``<out>/submitit/``.
    """
    import submitit

    s = p.executor.slurm
    ex = submitit.AutoExecutor(folder=str(Path(out_dir) / "submitit" / "%j"), cluster=cluster)
    ex.update_parameters(timeout_min=s.time_min, cpus_per_task=s.cpus_per_task, mem_gb=s.mem_gb,
                         slurm_array_parallelism=s.array_parallelism, name=f"proxygap-{p.name}")
    if s.gpus_per_node:
        ex.update_parameters(gpus_per_node=s.gpus_per_node)
    if s.partition and ex.cluster == "slurm":
        ex.update_parameters(slurm_partition=s.partition)
    return ex


def run_submitit(params_path: str, out_dir: str, todo: list[Unit], p: Params,
                 on_done: Callable[[dict], None], cluster: str | None = None) -> list[dict]:
    """Submit units as one Slurm job array (``cluster='local'``: as local processes through submitit).

    On Slurm the tasks are followed with squeue and a relaunched launcher waits for the tasks of an
    earlier one instead of resubmitting them (``slurm.run_array``). Threads per unit: ``executor.threads``.
    """
    ex = submitit_executor(p, out_dir, cluster)
    if ex.cluster == "slurm":
        try:
            return slurm.run_array(ex, run_unit, params_path, out_dir, todo, p.threads, on_done, _say)
        except slurm.SlurmError as exc:  # sbatch or squeue failed before anything was followed
            results = [{"uid": u.uid, "ok": False, "message": str(exc)} for u in todo]
            for res in results:
                on_done(res)
            return results
    # submitit's local cluster starts every job at once: they share the cores
    jobs = ex.map_array(run_unit, [params_path] * len(todo), [out_dir] * len(todo), todo, [p.threads] * len(todo))
    results = []
    for job, u in zip(jobs, todo):
        try:
            res = job.result()
        except Exception as exc:  # noqa: BLE001 - a job that died outside the notebook
            res = {"uid": u.uid, "ok": False, "message": f"submitit job {job.job_id} failed: {exc}"}
            write_json_atomic(u.run_dir(Path(out_dir)) / ERROR, {"unit": u.uid, "message": res["message"]})
        results.append(res)
        on_done(res)
    return results


def execute(kind: str, params_path: str, out_dir: str, todo: Iterable[Unit], p: Params, jobs: int,
            on_done: Callable[[dict], None]) -> list[dict]:
    todo = list(todo)
    if not todo:
        return []
    if kind == "local":
        return run_local(params_path, out_dir, todo, jobs, on_done)
    return run_submitit(params_path, out_dir, todo, p, on_done,
                        cluster=os.environ.get("PROXYGAP_SUBMITIT_CLUSTER"))
