"""Helpers for tests that train or evaluate one-off SAEs on the session's smoke extract (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

from proxygap_helpers.params import load_params

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "params" / "smoke.yaml"


def one_sae_params(smoke_params, k: int = 8, **over):
    """The smoke grid cut to one SAE per role (k, seed 0, 8192 tokens) with ``over`` (dotted keys) on top;
    store_tokens pinned to the smoke store's, so that the extract hash, hence the stores, stay the session's."""
    base = {"sae.k": [k], "sae.seeds": [0], "sae.tokens": [8192], "data.store_tokens": smoke_params.store_tokens}
    return load_params(SMOKE, overrides={**base, **over})


def shared_out(tmp: Path, smoke_out: Path) -> Path:
    """An output dir that shares the smoke models, eval tokens and stores (read-only) and has its own saes/runs."""
    tmp.mkdir(parents=True, exist_ok=True)
    for sub in ("models", "data", "activations"):
        (tmp / sub).symlink_to(smoke_out / sub, target_is_directory=True)
    return tmp
