"""Command line: ``python -m proxygap_helpers run | plan | status | report | verify PARAMS [--out DIR] ...``.

Exit codes: 0 every unit succeeded (``verify``: every table agrees with the published one); 1 some unit failed
(the others finished; rerun retries only those; ``verify``: some table differs or is missing);
2 bad parameters or invocation, or an embedded grid whose corpus package is not the pinned one (one
paragraph on stderr, nothing run or written); 130 interrupted by Ctrl-C (one line; the same command resumes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import progress as progress_file
from .data import CorpusError
from .files import write_text_atomic
from .grid import Unit, is_complete, resolve, state, units
from .layout import DONE, report_dir, resolved_params
from .params import ParamsError, dump_resolved
from .runlock import LockError, RunLock


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="proxygap", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run the whole grid (resumable)"), ("plan", "list units, tokens, disk, time"),
                       ("status", "done / failed / pending / running per unit"),
                       ("report", "re-render aggregate + report from finished runs"),
                       ("verify", "compare a finished run's tables with a published report, cell by cell")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("params", help="params YAML file, e.g. params/smoke.yaml")
        sp.add_argument("--out", default=None, help="output directory (default results/<grid name>)")
        if name == "run":
            sp.add_argument("--jobs", type=int, default=None, help="parallel units (local executor)")
            sp.add_argument("--executor", choices=("local", "submitit"), default=None)
            sp.add_argument("--force", action="store_true", help="redo complete units")
        if name == "plan":
            sp.add_argument("--recalibrate", action="store_true",
                            help="re-time this machine's calibration instead of using the cached one")
        if name == "verify":
            sp.add_argument("--against", default=None, help="published report folder (default reports/<grid name>)")
            sp.add_argument("--mode", choices=("auto", "exact", "noise"), default="auto",
                            help="exact: bit for bit (same CPU, torch, threads); noise: within seed noise; auto: "
                                 "exact when the provenance of run and reference says they computed alike")
    return ap


def _fail(msg: str, code: int = 2) -> int:
    print(f"proxygap: {msg}", file=sys.stderr)
    return code


def _writable(out: Path) -> None:
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        what = "is not a directory" if not probe.is_dir() else "is not writable"
        raise ParamsError(f"output directory {str(out)!r} cannot be created: {str(probe)!r} {what}; "
                          "choose another with --out")


def _check_text(p, params_path: str) -> None:
    """A local copy of the text (``data.pile_files``): its splits, files and text field, before any work."""
    from .data import check_text_source, text_source

    try:
        check_text_source(text_source(p.data))
    except ParamsError as e:
        raise ParamsError(f"{params_path}: {e}. Nothing was run or written.") from None


def _check_machine(p, out: Path, params_path: str, command: str) -> None:
    """What the params ask of this machine and its data, before any work: an embedded grid's held-out split holds the
    eval sequences asked for (so that ``plan`` costs, and ``run`` evaluates, what is asked); for ``run``, the device
    exists (and runs the kernels asked for), (offline) every hub checkpoint is in the local cache at its revision, and all models of a hub grid
    share one tokenizer."""
    from .models import DeviceError, check_kernel, resolve_device
    from .params import check_offline_cache

    try:
        if command == "run":
            resolve_device(p.device)
            check_kernel(p.sae.kernel, p.device)
            check_offline_cache(p)
            if not p.embedded:
                from .extract import check_tokenizers

                check_tokenizers(p, out)
        if p.embedded:
            from .extract import check_eval_sequences

            check_eval_sequences(p, out)
    except (DeviceError, ParamsError) as e:
        raise ParamsError(f"{params_path}: {e}. Nothing was run or written.") from None


def main(argv: list[str] | None = None) -> int:
    """The command line; Ctrl-C anywhere ends it with one line and exit code 130 (the units that were running
    record it: ``status`` shows them as interrupted, and the same command resumes)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return _fail("interrupted; run the same command to resume (finished units and SAEs are kept)", 130)


def _main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        p, out = resolve(args.params, args.out)
        if args.command in ("run", "report"):
            _writable(out)
        if args.command in ("run", "plan") and not p.embedded:
            _check_text(p, args.params)
        if args.command == "run" and args.jobs is not None and not 1 <= args.jobs <= 64:
            raise ParamsError(f"--jobs = {args.jobs}: must be an integer in [1, 64]")
        if args.command == "run" and p.embedded:
            from .data import pinned_sources

            pinned_sources()  # the installed corpus package is the pinned one, before any work starts
        if args.command in ("run", "plan"):
            _check_machine(p, out, args.params, args.command)
    except (ParamsError, CorpusError) as e:
        return _fail(str(e))
    if args.command == "plan":
        from .plan import print_plan

        print_plan(p, out, recalibrate=args.recalibrate)
        return 0
    if args.command == "verify":
        return _verify(p, out, args.against, args.mode)
    resolved = resolved_params(out)
    todo = units(p, out, resolved)
    if args.command == "status":
        return _status(p, out, todo)
    try:
        return _locked(args, p, out, resolved, todo)
    except LockError as e:
        return _fail(str(e))


def _locked(args, p, out: Path, resolved: Path, todo: list[Unit]) -> int:
    """``run`` or ``report`` under the output folder's lock."""
    with RunLock(out):
        text = dump_resolved(p)
        if not resolved.is_file() or resolved.read_text() != text:  # a no-op rerun changes no file
            write_text_atomic(resolved, text)
        if args.command == "report":
            todo = [u for u in todo if u.stage in ("aggregate", "report")]
            rc = _run(p, out, resolved, todo, "local", 1, force=True)
            if rc == 0:
                _print_next_budget(p, out)
            return rc
        kind = args.executor or p.executor.kind
        return _run(p, out, resolved, todo, kind, args.jobs or p.jobs, args.force)


def _verify(p, out: Path, against: str | None, mode: str = "auto") -> int:
    """The run's published tables (``report_dir``) against ``against`` (default ``reports/<grid>``)."""
    from .layout import REPO
    from .verify import compare_dirs, print_results

    mine, ref = report_dir(p.name, out), Path(against) if against else REPO / "reports" / p.name
    if mine.resolve() == ref.resolve():
        return _fail(f"the run's report folder is the reference itself ({ref}): run the grid into another --out "
                     "(make verify uses results/verify/<grid>) and verify that")
    try:
        results, info = compare_dirs(mine, ref, mode)
    except FileNotFoundError as e:
        return _fail(f"--against: {e}; give a published report folder such as reports/{p.name}")
    return 0 if print_results(results, info, mine, ref) else 1


def _status(p, out: Path, todo: list[Unit]) -> int:
    """One line per unit: its state and detail; units sent to Slurm show their task's job id and state
    (one squeue call for all of them)."""
    from .files import read_json
    from .slurm import describe

    counts: dict[str, int] = {}
    rows = [(u, *state(p, out, u)) for u in todo]
    on_slurm = describe(out, [u for u, st, _ in rows if st != "done"])
    for u, st, detail in rows:
        if st == "done" and (task := read_json(u.run_dir(out) / "done.json").get("slurm")):
            detail = f"{detail}, slurm {task['job_id']} on {task['node']}"
        elif u.uid in on_slurm:
            live, where = on_slurm[u.uid]
            st, detail = (live, where) if live else (st, f"{detail}  ({where})" if detail else where)
        counts[st] = counts.get(st, 0) + 1
        print(f"{st:8s} {u.uid:40s} {detail}")
    print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"  ({out})")
    return 0


def _line(res: dict) -> str:
    if not res.get("ok"):
        return f"FAILED {res['uid']}: {res.get('message', '?')}"
    task = f", slurm {res['slurm']['job_id']} on {res['slurm']['node']}" if res.get("slurm") else ""
    return (f"done   {res['uid']}  {res['wall_seconds']:.1f}s wall, "
            f"{res.get('compute_seconds', 0):.1f}s in-notebook compute{task}")


def _run(p, out: Path, params_file: Path, todo: list[Unit], kind: str, jobs: int, force: bool) -> int:
    from tqdm.auto import tqdm

    if force:
        for u in todo:
            (u.run_dir(out) / DONE).unlink(missing_ok=True)
            if u.stage == "sae":  # the notebooks skip finished SAEs / metrics unless told to redo them
                u.parameters["force"] = True
    total = len(todo)
    complete = {u.uid for u in todo if is_complete(p, out, u)}
    if len(complete) == total:
        print(f"proxygap: all {total} units of grid '{p.name}' are complete in {out}; nothing to do.")
        return 0
    counted = _already_complete(todo, complete)
    interactive = sys.stderr.isatty()
    how = f"{kind}, {jobs} job(s)" if kind == "local" else f"{kind}: the SAE units as one job array"
    print(f"proxygap: grid '{p.name}': {len(counted)}/{total} units already complete; running the rest "
          f"({how}) into {out}", flush=True)  # before the bar, which would cut this line in two
    bar = tqdm(total=total, initial=len(counted), desc=f"grid {p.name}", unit="unit", disable=not interactive,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} units [{elapsed}<{remaining}]{postfix}")
    t0, failed = time.time(), []

    def count(uid: str, line: str) -> None:
        if uid not in counted:
            counted.add(uid)
            bar.update()
        msg = f"[{len(counted)}/{total} {time.time() - t0:6.0f}s] {line}"
        tqdm.write(msg) if interactive else print(msg, flush=True)

    def on_done(res: dict) -> None:
        count(res["uid"], _line(res))
        if not res.get("ok"):
            failed.append(res)

    watch = _ProgressWatch(out, todo, bar, interactive, t0)
    try:
        _stages(p, out, params_file, todo, kind, jobs, force, counted, count, on_done, failed)
    finally:
        watch.stop()
    bar.close()
    wall = time.time() - t0
    if failed:
        print(f"proxygap: {len(failed)} of {total} units failed after {wall:.0f}s:", file=sys.stderr)
        for f in failed:
            print(f"  - {f['uid']}: {f.get('message', '?')} (see {out}/runs/{f['uid']}/)", file=sys.stderr)
        print("proxygap: fix the cause and rerun the same command: only failed and missing units run again.",
              file=sys.stderr)
        return 1
    print(f"proxygap: grid '{p.name}' complete in {wall:.0f}s; report: {_report_path(p, out)}")
    return 0


def _stages(p, out: Path, params_file: Path, todo: list[Unit], kind: str, jobs: int, force: bool, counted: set,
            count, on_done, failed: list) -> None:
    """The stages in order, each unit that is not complete executed (SAE units ``jobs`` at a time)."""
    from .executors import execute

    for stage in ("extract", "sae", "aggregate", "report"):
        stage_units = [u for u in todo if u.stage == stage]
        pending = [u for u in stage_units if force or not is_complete(p, out, u)]
        for u in stage_units:
            if u.uid not in {v.uid for v in pending} | counted:  # e.g. an aggregate whose inputs did not change
                count(u.uid, f"up to date {u.uid} (its inputs did not change)")
        pending.sort(key=lambda u: -u.tokens * _sae_cost(p, u))
        before = {"sae": "extract", "report": "aggregate"}.get(stage)  # a stage that cannot run without it
        if before and any(f["uid"].startswith(before) for f in failed):
            for u in pending:
                on_done({"uid": u.uid, "ok": False, "message": f"skipped: the {before} unit failed"})
            continue
        execute(kind if stage == "sae" else "local", str(params_file), str(out), pending, p,
                jobs if stage == "sae" else 1, on_done)


class _ProgressWatch:
    """Shows what the running units report from inside (``runs/<unit>/progress.json``: :mod:`.progress`): in the
    runner's bar on a terminal (every POLL_S), else as one ``[progress]`` line every LOG_S at most (a log file
    gets a line a minute, not a bar redrawn)."""

    POLL_S, LOG_S = 2.0, 60.0

    def __init__(self, out: Path, todo: list[Unit], bar, interactive: bool, t0: float):
        import threading

        self.files = {u.uid: u.run_dir(out) / progress_file.FILE for u in todo}
        self.bar, self.interactive, self.t0 = bar, interactive, t0
        self.last_log = time.time()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.done.wait(self.POLL_S):
            notes = [f"{uid}: {d}" for uid, f in self.files.items() if self._fresh(f)
                     and (d := progress_file.describe(f))]
            if self.interactive:
                self.bar.set_postfix_str("; ".join(notes), refresh=True)
            elif notes and time.time() - self.last_log >= self.LOG_S:
                self.last_log = time.time()
                print(f"[progress {time.time() - self.t0:6.0f}s] " + "; ".join(notes), flush=True)

    def _fresh(self, f: Path) -> bool:
        """Written by this run (a failed unit of an earlier run leaves its last progress behind)."""
        try:
            return f.stat().st_mtime >= self.t0
        except OSError:
            return False

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def _sae_cost(p, u: Unit) -> int:
    """Relative cost per training token of a unit's SAEs (d_in x d_sae: the encoder GEMM), 1 for other stages."""
    role = u.parameters.get("role")
    return p.d_in(role) * p.d_sae(role) if role else 1


def _already_complete(todo: list[Unit], complete: set[str]) -> set[str]:
    """The complete units that this run will not redo: aggregate and report are redone whenever a unit before
    them runs (their inputs change), so they count as complete only when every unit before them is."""
    counted, upstream_ok = set(), True
    for u in todo:  # in dependency order
        if u.uid in complete and (upstream_ok or u.stage not in ("aggregate", "report")):
            counted.add(u.uid)
        upstream_ok = upstream_ok and u.uid in complete
    return counted


def _print_next_budget(p, out: Path) -> None:
    """The last line of ``report``: the proposed next budget (``aggregate/next_budget.csv``) with
    ``plan``'s cost estimate. Its calibration is cached by then (the report notebook used it); the torch
    thread count, part of the cache key, is set as the report unit's kernel had it (``executor.threads``)."""
    import torch

    from .aggregate import load_aggregate
    from .budget_curves import next_budget_text, proposal
    from .plan import budget_cost

    torch.set_num_threads(p.threads)
    settings = [s.label for s in p.settings()]
    costs: dict[tuple, dict] = {}  # settings that propose the same budget share its cost (the whole grid's)
    for label in settings:  # one proposal per setting (pair x hook) of a grid with several
        table = load_aggregate(out, p, label)["next_budget"]
        chosen = proposal(table)
        if len(chosen):
            key = (tuple(chosen["tokens"].astype(int).tolist()), int(chosen["n_new_seeds"].max()))
            if key not in costs:
                costs[key] = budget_cost(p, out, list(key[0]), key[1])
            cost = costs[key]
            where = f"{label}: " if len(settings) > 1 else ""
            print(f"proxygap: {where}{next_budget_text(table, cost, markdown=False)}")


def _report_path(p, out: Path) -> Path:
    return report_dir(p.name, out) / "report.html"


if __name__ == "__main__":
    raise SystemExit(main())
