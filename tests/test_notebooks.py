"""The notebooks: each .py (jupytext py:percent, the source of truth) is in sync with its .ipynb twin, and
each has a `parameters` cell (papermill) whose defaults are the smoke grid. nbval executes the .ipynb
files themselves in `make test` (see the Makefile)."""

from pathlib import Path

import jupytext
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.py"))


def test_all_six_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS] == ["01_extract", "02_train", "03_evaluate", "04_aggregate", "05_report",
                                           "06_ladder"]


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_py_and_ipynb_in_sync(py):
    ipynb = py.with_suffix(".ipynb")
    assert ipynb.is_file(), f"{ipynb} missing: run `make sync`"
    a, b = jupytext.read(py), jupytext.read(ipynb)
    src = lambda nb: [(c.cell_type, c.source.strip()) for c in nb.cells]  # noqa: E731
    assert src(a) == src(b), f"{py.name} and {ipynb.name} differ: run `make sync`"


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_defaults_to_smoke(py):
    nb = jupytext.read(py)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "exactly one cell tagged `parameters`"
    assert 'params_path = "params/smoke.yaml"' in params[0].source
    assert "threads = 0" in params[0].source
