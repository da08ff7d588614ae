"""The package's layers import one way, and the result-folder layout lives in one leaf module.

Face (cli) -> Orchestration (grid, executors, plan) -> Stages (extract, train, evaluate, aggregate, publish) ->
Science and Analysis -> Config (params, files, layout). A module may import modules of its own layer or
below, never above; no import cycle at all (module-level and function-level imports alike, read with
``ast``, so nothing is executed); the Config modules are leaves that import nothing else from the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from proxygap_helpers import layout

PKG = Path(__file__).resolve().parents[1] / "proxygap_helpers"

LAYERS: dict[str, tuple[str, ...]] = {  # top to bottom
    "face": ("__main__", "cli"),
    "orchestration": ("grid", "executors", "slurm", "plan", "runlock"),
    "stages": ("extract", "train", "evaluate", "aggregate", "publish"),
    "science and analysis": ("data", "models", "activations", "training", "engine", "sparse_step", "topk_pairs",
                             "triton_step", "metrics", "dimensionality", "progress",
                             "stats", "leaderboard", "claims", "budget_curves", "decomposition", "ladder", "families",
                             "plots", "report", "summary", "verify"),
    "config": ("params", "files", "layout", "provenance"),
}
RANK = {m: len(LAYERS) - i for i, mods in enumerate(LAYERS.values()) for m in mods}  # config = 1, face = 5
# Within "science and analysis": the analysis works on tables (metrics records, the aggregate's CSVs and
# summary.json, params), never on text, models, activations or training; what it says about them (which
# corpus, which versions) comes from those records.
SCIENCE = ("data", "models", "activations", "training", "engine", "sparse_step", "topk_pairs", "triton_step",
           "metrics", "dimensionality", "progress")
ANALYSIS = ("stats", "leaderboard", "claims", "budget_curves", "decomposition", "ladder", "families", "plots", "report",
            "summary", "verify")


def package_imports(source: str, modules: set[str]) -> set[str]:
    """Names of the package's modules that ``source`` imports anywhere (top level or inside functions):
    ``from .x import y``, ``from . import x``, ``import proxygap_helpers.x``, ``from proxygap_helpers.x import y``,
    ``from proxygap_helpers import x``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "proxygap_helpers" and len(parts) > 1:
                    found.add(parts[1])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and not (node.module or "").startswith("proxygap_helpers"):
                continue  # a third-party import
            parts = (node.module or "").split(".")
            sub = parts[1] if node.level == 0 and len(parts) > 1 else parts[0] if node.level else ""
            if sub:
                found.add(sub)
            else:  # from . import x / from proxygap_helpers import x: x is a module (or a package attribute)
                found |= {a.name for a in node.names if a.name in modules}
    return found & modules


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path ``[a, b, ..., a]``, or None when it has none (depth-first)."""
    state: dict[str, str] = {}  # absent = unvisited, "open" = on the current path, "done"
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = "open"
        path.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                return path[path.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        state[m] = "done"
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = {f.stem for f in PKG.glob("*.py") if f.stem != "__init__"}
    return {m: package_imports((PKG / f"{m}.py").read_text(), modules) - {m} for m in modules}


def test_the_checker_sees_every_import_form_and_finds_cycles():
    mods = {"a", "b", "c", "d", "e"}
    src = ("from .a import x\nfrom . import b, os\nimport proxygap_helpers.c\nimport numpy\n"
           "def f():\n    from proxygap_helpers.d import y\n    from proxygap_helpers import e\n")
    assert package_imports(src, mods) == mods
    assert package_imports("import json\nfrom pathlib import Path\nfrom proxygap_helpers import x\n", mods) == set()
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None


def test_every_module_has_a_layer(graph):
    declared = set(RANK)
    assert set(graph) - declared == set(), "new module(s): add them to LAYERS in tests/test_layering.py"
    assert declared - set(graph) == set(), "LAYERS names module(s) the package no longer has"


def test_the_package_imports_known_function_level_imports(graph):
    """The graph is the real one: imports inside functions count (these are all function-level)."""
    assert {"report", "plots"} <= graph["publish"]
    assert "claims" in graph["report"]
    assert "publish" in graph["executors"] and "plan" in graph["cli"] and "engine" in graph["train"]


def test_no_import_cycle(graph):
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_each_module_imports_only_its_layer_or_below(graph):
    upward = [f"{m} ({_layer(m)}) imports {t} ({_layer(t)})" for m in sorted(graph) for t in sorted(graph[m])
              if RANK[t] > RANK[m]]
    assert upward == []


def test_analysis_works_on_tables(graph):
    """No analysis module imports a science module (e.g. summary quotes the corpus from the aggregate's
    summary.json, not from data.py)."""
    assert sorted(SCIENCE + ANALYSIS) == sorted(LAYERS["science and analysis"])
    assert {m: sorted(graph[m] & set(SCIENCE)) for m in ANALYSIS if graph[m] & set(SCIENCE)} == {}


def test_config_modules_are_leaves(graph):
    assert {m: graph[m] for m in LAYERS["config"] if graph[m]} == {}


def _layer(m: str) -> str:
    return next(name for name, mods in LAYERS.items() if m in mods)


def test_layout_is_the_files_a_run_leaves(tmp_path, monkeypatch):
    """The result-folder contract (DESIGN.md "Files a run leaves"), path by path."""
    out = tmp_path / "results" / "g"
    assert layout.resolved_params(out) == out / "params.resolved.yaml"
    assert layout.model_dir(out, "small") == out / "models" / "small"
    assert out / layout.EVAL_TOKENS == out / "data" / "eval_tokens.npy"
    assert layout.store_dir(out, "large") == out / "activations" / "large"
    assert layout.sae_dir(out, "small-k8-x") == out / "saes" / "small-k8-x"
    assert layout.run_dir(out, "extract-1") == out / "runs" / "extract-1"
    assert layout.metrics_path(out, "small-k8-x") == out / "runs" / "small-k8-x" / "metrics.json"
    assert layout.aggregate_dir(out) == out / "aggregate"
    monkeypatch.delenv("PROXYGAP_CACHE", raising=False)
    assert layout.cache_root(out) == tmp_path / "results" / ".cache"
    monkeypatch.setenv("PROXYGAP_CACHE", str(tmp_path / "c"))
    assert layout.cache_root(out) == tmp_path / "c"
    for name in ("b", "a"):
        layout.metrics_path(out, name).parent.mkdir(parents=True)
        layout.metrics_path(out, name).write_text("{}")
    (layout.run_dir(out, "a") / layout.DONE).write_text("{}")
    assert layout.metrics_files(out) == [layout.metrics_path(out, "a"), layout.metrics_path(out, "b")]
    assert layout.done_files(out) == [out / "runs" / "a" / "done.json"]
    # published into the repository only from the default output directory
    assert layout.default_out("g") == Path("results") / "g"
    assert layout.report_dir("g", layout.REPO / "results" / "g") == layout.REPO / "reports" / "g"
    assert layout.report_dir("g", out) == out / "reports"
