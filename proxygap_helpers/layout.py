"""Where a grid's files live: the result-folder layout of DESIGN.md ("Files a run leaves"), in one place.

A leaf: every layer may import it, and it imports nothing else from the package. ``out`` is a grid's output
directory (``results/<grid>/`` by default)::

    <out>/params.resolved.yaml          resolved_params(out)
    <out>/models/<role>/                model_dir(out, role)      embedded models: HF-format dir
    <out>/data/eval_tokens.npy          <out> / EVAL_TOKENS       held-out eval token ids [n_seq, ctx]
    <out>/data/eval_tokens.json         <out> / EVAL_META         their hash, shape and text source
    <out>/activations/<role>/           store_dir(out, role)      activation store (acts.bin + meta.json)
    <out>/activations/<role>/L<layer>/  store_dir(out, role, L)   one store per hook (several hooks per model)
    <out>/saes/<sae id>/                sae_dir(out, sae_id)      SAELens format
    <out>/runs/<unit or sae id>/        run_dir(out, uid)         done.json / error.json / running.json,
                                                                  executed notebooks
    <out>/runs/<sae id>/metrics.json    metrics_path(out, sae_id)
    <out>/runs/<sae id>/sequence_ce.json  sequence_ce_path(out, sae_id)  per eval sequence CE sums
    <out>/aggregate/                    aggregate_dir(out)        the tables of the aggregate stage
    <out>/../.cache/                    cache_root(out)           tokenizers, trained models, calibration
                                                                  ($PROXYGAP_CACHE overrides it)
    reports/<grid>/                     report_dir(grid, out)     the published report (default out only)
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
EVAL_TOKENS = "data/eval_tokens.npy"  # relative to the output directory
EVAL_META = "data/eval_tokens.json"  # their hash, shape and where the text came from
DONE, ERROR, RUNNING = "done.json", "error.json", "running.json"  # a unit's state files in its run dir


def default_out(grid: str) -> Path:
    """The default output directory of grid ``grid``, relative to the repository root."""
    return Path("results") / grid


def resolved_params(out_dir: Path) -> Path:
    return Path(out_dir) / "params.resolved.yaml"


def model_dir(out_dir: Path, role: str) -> Path:
    return Path(out_dir) / "models" / role


def store_dir(out_dir: Path, role: str, layer: int | None = None) -> Path:
    """A role's activation store: ``activations/<role>/``, or ``activations/<role>/L<layer>/`` for one of
    several hooks of the model (``layer`` given only in grids with several hooks per model)."""
    base = Path(out_dir) / "activations" / role
    return base if layer is None else base / f"L{layer}"


def sae_dir(out_dir: Path, sae_id: str) -> Path:
    return Path(out_dir) / "saes" / sae_id


def run_dir(out_dir: Path, uid: str) -> Path:
    return Path(out_dir) / "runs" / uid


def metrics_path(out_dir: Path, sae_id: str) -> Path:
    return run_dir(out_dir, sae_id) / "metrics.json"


def sequence_ce_path(out_dir: Path, sae_id: str) -> Path:
    """Per eval sequence CE sums of one SAE and its model (``metrics.evaluate_saes``'s ``sequence_sums``)."""
    return run_dir(out_dir, sae_id) / "sequence_ce.json"


def metrics_files(out_dir: Path) -> list[Path]:
    """Every finished ``runs/*/metrics.json``, sorted."""
    return sorted((Path(out_dir) / "runs").glob("*/metrics.json"))


def done_files(out_dir: Path) -> list[Path]:
    """Every finished unit's ``runs/*/done.json``, sorted."""
    return sorted((Path(out_dir) / "runs").glob(f"*/{DONE}"))


def aggregate_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "aggregate"


def cache_root(out_dir: Path) -> Path:
    """Caches shared by the grids of one results folder: ``$PROXYGAP_CACHE``, else ``<out>/../.cache``."""
    return Path(os.environ.get("PROXYGAP_CACHE") or Path(out_dir).resolve().parent / ".cache")


def report_dir(grid: str, out_dir: Path) -> Path:
    """Where grid ``grid``'s report is published: ``reports/<grid>/`` for the default output directory, else
    ``<out>/reports/`` (so that test and scratch runs never overwrite the published report)."""
    if Path(out_dir).resolve() == (REPO / default_out(grid)).resolve():
        return REPO / "reports" / grid
    return Path(out_dir) / "reports"
