"""Stage 2b: evaluate every trained SAE of a (role, k) on the held-out eval tokens -> runs/<sae id>/metrics.json.

A metrics.json is written last and atomically, with the SAE's training facts, the evaluation options and
provenance; one that exists for the same evaluation hash is kept (resumable).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import provenance
from .extract import load_eval_tokens, model_name, model_source
from .files import read_json, write_json_atomic
from .layout import metrics_path
from .models import load_hf
from .params import Params
from .training import load_sae


def is_evaluated(p: Params, out_dir: Path, sae_id: str) -> bool:
    path = metrics_path(out_dir, sae_id)
    try:
        return read_json(path).get("eval_hash") == p.eval_hash
    except (OSError, ValueError):
        return False


def evaluate_unit(p: Params, role: str, out_dir: Path, sae_ids=None, device: str = "cpu", force: bool = False,
                  progress: bool = True) -> list[dict]:
    """Evaluate the SAEs of ``role`` (those of ``sae_ids`` when given) that have no current metrics.json;
    return all their metrics."""
    from .metrics import evaluate_sae

    out_dir = Path(out_dir)
    specs = [s for s in p.sae_specs(role=role) if sae_ids is None or s.sae_id in sae_ids]
    todo = [s for s in specs if force or not is_evaluated(p, out_dir, s.sae_id)]
    if todo:
        tokens = load_eval_tokens(out_dir)
        model = load_hf(model_source(p, out_dir, role), device=device)
        special = (0, 1) if p.embedded else (model.config.eos_token_id,)
    for spec in todo:
        t0, started = time.time(), provenance.now()
        sae, train_meta = load_sae(out_dir, spec.sae_id, device)
        m = evaluate_sae(model, p.layer(role), sae, tokens, batch_sequences=p.evaluation.batch_sequences,
                         swd=p.evaluation.swd, exclude_special_tokens=p.evaluation.exclude_special_tokens,
                         special_ids=special, progress=progress)
        m["ce_rec"] = m["ce_rec_relative"] if p.evaluation.ce_rec == "relative" else m["ce_rec_zero_norm"]
        rec = {"sae_id": spec.sae_id, "model_role": role, "model_name": model_name(p, role), "hook": p.hook(role),
               "k": spec.k, "tokens": spec.tokens, "seed": spec.seed, "d_in": p.d_in(role), "d_sae": p.d_sae(role),
               **m, "ce_rec_definition": p.evaluation.ce_rec,
               "tokens_per_latent": spec.tokens / p.d_sae(role), "trainer": train_meta.get("trainer", "saelens"),
               "train_seconds": train_meta["train_seconds"], "budget_mode": train_meta["budget_mode"],
               "epochs_used": train_meta["epochs_used"], "eval_hash": p.eval_hash,
               "eval_seconds": time.time() - t0, "finished_at": provenance.now(),
               "provenance": provenance.record(p.params_hash(), sae_hash=train_meta["sae_hash"], started=started,
                                               eval_tokens_shape=list(np.shape(tokens)),
                                               evaluation=p.evaluation.model_dump(),
                                               peak_rss_mb=provenance.peak_rss_mb())}
        write_json_atomic(metrics_path(out_dir, spec.sae_id), rec)
    return [read_json(metrics_path(out_dir, s.sae_id)) for s in specs]
