"""The micro grid shared by the end-to-end tests (test_runner.py, test_slurm.py): params, CLI helpers and the
session fixtures (``env``, ``micro``, ``baseline``, ``base_out``, registered in conftest.py).

The micro grid is params/smoke.yaml made smaller (1 k, 2 budgets, 2 seeds, tiny LMs). ``baseline`` runs it
once, uninterrupted, with the local executor; the other tests work on copies of it (or of its extract stage).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from proxygap_helpers.grid import units
from proxygap_helpers.params import load_params, set_dotted

REPO = Path(__file__).resolve().parents[1]
GRID = "runner-test-micro"
RUN_TIMEOUT = 1800  # seconds per command; the micro grid takes a few minutes on 2 loaded cores
MICRO = {
    "name": GRID,
    "data.max_chars": 250_000,
    "data.eval_sequences": 16,
    "models.small.train_tokens": 30_000,
    "models.large.train_tokens": 30_000,
    "sae.k": [8],
    "sae.tokens": [2048, 4096],
    "sae.seeds": [0, 1],
    "stats.bootstrap": 50,
    "executor.jobs": 2,
}
UNIT_LINE = re.compile(r"^\[(\d+)/(\d+) +\d+s\] (done|FAILED) +(\S+?):?(\s|$)")


# ------------------------------------------------------------------------------------------------ helpers


def write_params(path: Path, **overrides) -> Path:
    """params/smoke.yaml with the micro-grid overrides and ``overrides`` (dotted keys, ``__`` for ``.``)."""
    raw = yaml.safe_load((REPO / "params" / "smoke.yaml").read_text())
    set_dotted(raw, {**MICRO, **{k.replace("__", "."): v for k, v in overrides.items()}})
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def cli(env: dict, *args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m proxygap_helpers *args`` from the repository root; stdout/stderr captured (not a tty)."""
    return subprocess.run([sys.executable, "-m", "proxygap_helpers", *map(str, args)], cwd=REPO,
                          env={**env, **(extra_env or {})}, capture_output=True, text=True, timeout=RUN_TIMEOUT,
                          stdin=subprocess.DEVNULL)


def explain(res: subprocess.CompletedProcess) -> str:
    return f"exit {res.returncode}\n--- stdout ---\n{res.stdout[-6000:]}\n--- stderr ---\n{res.stderr[-6000:]}"


def grid_units(params: Path, out: Path):
    p = load_params(params)
    return p, units(p, out, out / "params.resolved.yaml")


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """relative path -> (mtime_ns, sha256) of every file under ``root``."""
    snap = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            snap[str(path.relative_to(root))] = (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return snap


def done_mtimes(out: Path) -> dict[str, int]:
    return {d.parent.name: d.stat().st_mtime_ns for d in (out / "runs").glob("*/done.json")}


def finished_lines(stdout: str) -> list[tuple[str, str]]:
    """(status, unit id) of every per-unit progress line."""
    return [(m.group(3), m.group(4)) for line in stdout.splitlines() if (m := UNIT_LINE.match(line))]


def metric_values(out: Path, sae_ids) -> dict[str, dict[str, float]]:
    """Every numeric value of each SAE's metrics.json except timings (which differ run to run)."""
    res = {}
    for sid in sae_ids:
        rec = json.loads((out / "runs" / sid / "metrics.json").read_text())
        res[sid] = {k: v for k, v in rec.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith("_seconds")}
        assert len(res[sid]) >= 15, f"{sid}: too few numeric metrics: {sorted(res[sid])}"
    return res


def assert_same_numbers(out: Path, ref: Path, sae_ids) -> None:
    assert metric_values(out, sae_ids) == metric_values(ref, sae_ids)
    for table in ("pairs.csv", "phase2_table.csv"):
        assert (out / "aggregate" / table).read_text() == (ref / "aggregate" / table).read_text(), table


def copy_out(src: Path, dst: Path, extract_only: bool = False) -> Path:
    """A copy of a finished output directory (mtimes kept); ``extract_only`` keeps just the extract stage."""
    shutil.copytree(src, dst, symlinks=True)
    if extract_only:
        for name in ("saes", "aggregate"):
            shutil.rmtree(dst / name, ignore_errors=True)
        for run in (dst / "runs").iterdir():
            if not run.name.startswith("extract-"):
                shutil.rmtree(run)
    return dst


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the runner's process group and every descendant (papermill kernels run in their own sessions)."""
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for kid in kids:
        try:
            kid.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    psutil.wait_procs(kids, timeout=30)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def env(tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("proxygap-cache")
    e = {k: v for k, v in os.environ.items() if not k.startswith("PROXYGAP_")}
    e.update(PROXYGAP_CACHE=str(cache), PROXYGAP_THREADS="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    return e


@pytest.fixture(scope="session")
def micro(tmp_path_factory) -> Path:
    return write_params(tmp_path_factory.mktemp("params") / "micro.yaml")


@pytest.fixture(scope="session")
def baseline(env, micro, tmp_path_factory):
    """One uninterrupted run of the micro grid (local executor, 2 jobs)."""
    out = tmp_path_factory.mktemp("baseline") / "out"
    t0 = time.time()
    res = cli(env, "run", micro, "--out", out)
    return {"out": out, "res": res, "wall": time.time() - t0}


@pytest.fixture
def base_out(baseline) -> Path:
    if baseline["res"].returncode != 0:
        pytest.fail("the baseline run of the micro grid failed:\n" + explain(baseline["res"]))
    return baseline["out"]
