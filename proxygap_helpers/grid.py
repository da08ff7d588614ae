"""Units of work of a grid, keyed by the parameters that shape them, and their state on disk.

Stages run in order; units within a stage are independent:

1. ``extract``            notebooks/01_extract   models, eval tokens, activation stores
2. ``sae-<role>-<i>of<n>`` 02_train, 03_evaluate  the SAEs of one model (every hook x k x seed x budget), or
                                                  of shard i of n (``executor.shards``), from one stream;
                                                  ``sae-<role>-L1+L3-<i>of<n>`` names the hooks of a shard
                                                  when models have several
3. ``aggregate``          04_aggregate           tables, leaderboard, claims (per pair and hook)
4. ``report``             05_report [06_ladder]  reports/<grid>/report.html: 05_report once per setting (pair x
                                                  hook) when there are several, then the summary across them

A model's hooks share its unit: the hub path's online stream then runs the model once per batch for all of
them (one LM pass per unit, as with one hook), and an embedded model's stores are read in step.

A unit's id ends in a hash of exactly the resolved parameters that shape its outputs, so changing the SAE
learning rate gives new ``sae-*`` ids (and new SAE ids) while changing the report title only renames
``report``. A unit is complete when ``runs/<unit id>/done.json`` exists (written last, atomically) and its
outputs are present (an SAE unit's metrics of this very evaluation: ``metrics.json`` is keyed by SAE id, so
evaluating the same SAEs with other ``evaluation.*`` settings into the same folder makes the first grid's unit
pending again, never silently complete with the other setting's numbers). Executed notebooks stay in ``runs/<unit id>/``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .files import read_json, read_json_field
from .layout import (DONE, ERROR, NOTEBOOKS, RUNNING, aggregate_dir, default_out, metrics_files, metrics_path, run_dir,
                     store_dir)
from .params import Params, ParamsError, load_params, short_hash
from .runlock import _alive


@dataclass
class Unit:
    """One unit of work: which notebooks run, with which injected parameters, and what it produces."""

    uid: str
    stage: str
    notebooks: tuple[str, ...]
    parameters: dict = field(default_factory=dict)
    sae_ids: tuple[str, ...] = ()
    tokens: int = 0  # SAE training tokens (for plan and progress)
    # (notebook, name of the executed copy, parameters beyond ``parameters``) of each notebook run, when not
    # simply each notebook once: how the report runs 05_report once per setting
    runs: tuple[tuple[str, str, dict], ...] = ()

    def run_dir(self, out_dir: Path) -> Path:
        return run_dir(out_dir, self.uid)

    def executions(self) -> list[tuple[str, str, dict]]:
        """(notebook, executed copy's name, its parameters) of each notebook run of the unit, in order."""
        return list(self.runs) or [(nb, nb, {}) for nb in self.notebooks]


def resolve(params_path: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> tuple[Params, Path]:
    """Params and output directory as every notebook and command sees them.

    A relative ``params_path`` is looked up from the working directory, then from the repository root
    (so notebooks run from ``notebooks/`` find ``params/smoke.yaml``); the default output directory is
    ``results/<grid name>`` under the repository root.
    """
    path = Path(params_path)
    if not path.is_absolute() and not path.exists() and (NOTEBOOKS.parent / path).exists():
        path = NOTEBOOKS.parent / path
    p = load_params(path, overrides=thread_override())
    out = Path(out_dir) if out_dir else NOTEBOOKS.parent / default_out(p.name)
    return p, out.resolve()


def thread_override() -> dict:
    """``$PROXYGAP_THREADS``, when set, as an override of ``executor.threads`` (validated like the params file's
    own value, then recorded in the resolved params and the ids like it)."""
    value = os.environ.get("PROXYGAP_THREADS", "").strip()
    if not value:
        return {}
    try:
        return {"executor.threads": int(value)}
    except ValueError:
        raise ParamsError(f"environment variable PROXYGAP_THREADS = {value!r}: give a positive integer (the torch "
                          "threads of every unit, overriding `executor.threads`), or unset it") from None


def units(p: Params, out_dir: Path, params_file: Path) -> list[Unit]:
    """All units of the grid in dependency order."""
    base = {"params_path": str(params_file), "out_dir": str(out_dir)}
    out = [Unit(f"extract-{p.extract_hash}", "extract", ("01_extract",), dict(base))]
    n = p.executor.shards
    for role in p.roles:
        for i, specs in enumerate(shards(p, role, n)):
            ids = tuple(s.sae_id for s in specs)
            h = short_hash({"saes": ids, "eval": p.eval_hash})
            hooks = "+".join(f"L{L}" for L in sorted({s.layer for s in specs})) + "-" if p.multi_hook else ""
            out.append(Unit(f"sae-{role}-{hooks}{i + 1}of{n}-{h}", "sae", ("02_train", "03_evaluate"),
                            {**base, "role": role, "sae_ids": list(ids)}, ids, _train_tokens(p, specs)))
    out.append(Unit("aggregate", "aggregate", ("04_aggregate",), dict(base)))
    out.append(report_unit(p, base))
    return out


def report_unit(p: Params, base: dict) -> Unit:
    """``05_report`` on the grid's one setting; with several (pairs x hooks), once per setting (executed copies
    ``05_report-<setting>.ipynb``) and then ``06_ladder``, the summary across them."""
    settings = p.settings()
    if len(settings) == 1:
        return Unit("report", "report", ("05_report",), dict(base))
    runs = tuple(("05_report", f"05_report-{s.label}", {"setting": s.label}) for s in settings)
    return Unit("report", "report", ("05_report", "06_ladder"), dict(base),
                runs=(*runs, ("06_ladder", "06_ladder", {})))


def shards(p: Params, role: str, n: int) -> list[list]:
    """The SAE specs of ``role`` split into at most ``n`` shards of whole training runs (a ladder run's
    checkpoints stay together), balanced by training tokens: longest run first onto the lightest shard.
    Deterministic; empty shards are dropped."""
    from .training import runs_for

    runs = sorted(runs_for(p, p.sae_specs(role=role)), key=lambda r: (-max(s.tokens for s in r), r[0].sae_id))
    load, out = [0] * n, [[] for _ in range(n)]
    for run in runs:
        i = load.index(min(load))
        load[i] += max(s.tokens for s in run)
        out[i] += run
    order = {s.sae_id: j for j, s in enumerate(p.sae_specs(role=role))}
    return [sorted(sh, key=lambda s: order[s.sae_id]) for sh in out if sh]


def _train_tokens(p: Params, specs) -> int:
    """SAE training tokens of a unit: every budget (separate) or the largest per (k, seed) run (ladder)."""
    if p.sae.budget_mode == "separate":
        return sum(s.tokens for s in specs)
    runs = {(s.layer, s.k, s.seed) for s in specs}
    return len(runs) * max(p.sae.tokens)


def aggregate_inputs_hash(p: Params, out_dir: Path) -> str:
    """Hash of every finished metrics.json plus the stats/claims params, the grid's SAE ids and its settings (pairs
    x hooks): what the aggregate depends on (so dropping a seed or changing ``pairs`` re-runs it)."""
    h = hashlib.sha256(json.dumps({"stats": p.stats.model_dump(), "claims": p.claims,
                                   "saes": sorted(s.sae_id for s in p.sae_specs()),
                                   "settings": [s.label for s in p.settings()]}, sort_keys=True).encode())
    for path in metrics_files(out_dir):
        h.update(path.parent.name.encode() + path.read_bytes())
    return h.hexdigest()[:8]


def report_inputs_hash(p: Params, out_dir: Path) -> str:
    h = hashlib.sha256(json.dumps(p.report.model_dump(), sort_keys=True).encode())
    agg = aggregate_dir(out_dir)
    for path in sorted(agg.glob("*.csv")) + sorted(agg.glob("*.json")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:8]


def input_hash(p: Params, out_dir: Path, unit: Unit) -> str | None:
    """For aggregate/report: the hash of their inputs now (their uid carries no hash: inputs appear late)."""
    if unit.stage == "aggregate":
        return aggregate_inputs_hash(p, out_dir)
    if unit.stage == "report":
        return report_inputs_hash(p, out_dir)
    return None


def is_complete(p: Params, out_dir: Path, unit: Unit) -> bool:
    done = unit.run_dir(out_dir) / DONE
    if not done.is_file():
        return False
    try:
        rec = read_json(done)
    except ValueError:
        return False
    if unit.stage == "sae" and not all(read_json_field(metrics_path(out_dir, s), "eval_hash") == p.eval_hash
                                       for s in unit.sae_ids):  # metrics of another evaluation are stale
        return False
    if unit.stage in ("aggregate", "report"):
        return rec.get("input_hash") == input_hash(p, out_dir, unit)
    if unit.stage == "extract" and p.embedded:  # a store found unusable by an SAE unit was removed: rebuild it
        return all((store_dir(out_dir, r, L if p.multi_hook else None) / "meta.json").is_file()
                   for r in p.roles for L in p.layers(r))
    return True


def state(p: Params, out_dir: Path, unit: Unit) -> tuple[str, str]:
    """(done | failed | interrupted | running | pending, detail) of a unit."""
    rd = unit.run_dir(out_dir)
    if is_complete(p, out_dir, unit):
        rec = read_json(rd / DONE)
        return "done", f"{rec.get('wall_seconds', 0):.1f}s wall, {100 * rec.get('overhead_fraction', 0):.0f}% overhead"
    if (rd / RUNNING).is_file():
        info = read_json(rd / RUNNING)
        if _alive(info.get("pid", -1)) and info.get("host") == os.uname().nodename:
            return "running", f"pid {info['pid']} since {info.get('start', '?')}"
    if (rd / ERROR).is_file():
        rec = read_json(rd / ERROR)
        if rec.get("interrupted"):
            return "interrupted", f"at {rec.get('end', '?')}; run the same command to resume"
        return "failed", rec.get("message", "?")
    return "pending", ""


def setup(params_path: str, out_dir: str | None = None, threads: int = 0) -> tuple[Params, Path, str]:
    """What each notebook does first: params, output dir, torch threads, device.

    ``threads`` 0 means the params' ``executor.threads`` (``$PROXYGAP_THREADS`` overrides it: :func:`resolve`), so
    a notebook run by hand ("Run All" in JupyterLab, nbval) computes with the same thread count as the runner, and
    on a CPU the same numbers: they depend on the thread count, never on the machine's core count.
    """
    import torch

    from .models import resolve_device

    p, out = resolve(params_path, out_dir)
    torch.set_num_threads(threads or p.threads)
    out.mkdir(parents=True, exist_ok=True)
    return p, out, resolve_device(p.device)
