"""Shared fixtures: a session-wide model/tokenizer cache, the smoke params and the smoke extract (trained once).

``PROXYGAP_CACHE`` points at a session tmp dir before anything imports ``proxygap_helpers.extract``, so the
tests never write under ``results/`` and the smoke models are trained once per session. Every test writes its
outputs under pytest's ``tmp_path`` (or a session tmp dir for the shared smoke outputs).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "params" / "smoke.yaml"

# Set at import time (before any test module runs) so that subprocesses started by the tests inherit it too.
# PROXYGAP_TEST_CACHE (optional) keeps trained models between sessions while developing tests.
_OWN_CACHE = not os.environ.get("PROXYGAP_TEST_CACHE")
_SESSION_CACHE = Path(os.environ.get("PROXYGAP_TEST_CACHE") or tempfile.mkdtemp(prefix="proxygap-test-cache-"))
os.environ["PROXYGAP_CACHE"] = str(_SESSION_CACHE)
# A Hugging Face cache of the session's own (never the developer's): tests that need hub checkpoints build them
# there (tests/test_hub_rehearsal.py), and nothing else can find a model that the session did not make.
os.environ["HF_HOME"] = str(_SESSION_CACHE / "hf_home")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def pytest_unconfigure(config):
    """Remove the session cache this conftest created (never one given through PROXYGAP_TEST_CACHE)."""
    if _OWN_CACHE:
        import shutil

        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return _SESSION_CACHE


@pytest.fixture(scope="session")
def smoke_params():
    from proxygap_helpers.params import load_params

    return load_params(SMOKE)


@pytest.fixture(scope="session")
def smoke_out(tmp_path_factory, smoke_params) -> Path:
    """The smoke grid's extract stage (models, eval tokens, activation stores), built once per session."""
    import torch

    from proxygap_helpers.extract import run_extract

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic, and faster for these tiny shapes
    try:
        out = tmp_path_factory.mktemp("smoke_out")
        info = run_extract(smoke_params, out, progress=False)
    finally:
        torch.set_num_threads(threads)
    (out / "_extract_info.json").write_text(__import__("json").dumps(info, default=str))
    return out


@pytest.fixture(scope="session")
def smoke_info(smoke_out) -> dict:
    import json

    return json.loads((smoke_out / "_extract_info.json").read_text())


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is much faster here (and makes float sums reproducible)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# The micro grid's session fixtures (its uninterrupted local baseline run is shared by test_runner.py and
# test_slurm.py, so it runs once per session).
from microgrid import base_out, baseline, env, micro  # noqa: E402,F401
