"""Stage 2b: evaluate the trained SAEs of a unit on the held-out eval tokens -> runs/<sae id>/metrics.json.

A metrics.json is written last and atomically, with the SAE's training facts, the evaluation options and
provenance; one that exists for the same evaluation hash is kept (resumable). Before it, each SAE's per eval
sequence CE sums go to ``runs/<sae id>/sequence_ce.json`` (the eval-sampling bootstrap of ``stats.eval_noise``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import provenance
from .data import token_hash
from .extract import load_eval_tokens, load_model, model_name
from .files import read_json, read_json_field, write_json_atomic
from .layout import metrics_path, sequence_ce_path
from .params import Params
from .training import load_sae


def special_ids(config) -> tuple[int, ...]:
    """A hub model's special token ids (BOS, EOS, padding; a family may give a list for one of them): what
    ``evaluation.exclude_special_tokens`` leaves out."""
    ids = []
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(config, key, None)
        ids += [i for i in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(i, int)]
    return tuple(dict.fromkeys(ids))


def is_evaluated(p: Params, out_dir: Path, sae_id: str) -> bool:
    """A metrics.json of this evaluation (``Params.eval_hash``) exists: one written under other ``evaluation.*``
    settings of the same SAE is stale, and is replaced."""
    return read_json_field(metrics_path(out_dir, sae_id), "eval_hash") == p.eval_hash


def evaluate_unit(p: Params, role: str, out_dir: Path, sae_ids=None, device: str = "cpu", force: bool = False,
                  progress: bool = True) -> list[dict]:
    """Evaluate the SAEs of ``role`` (those of ``sae_ids`` when given) that have no current metrics.json;
    return all their metrics.

    All of them are evaluated together, one ``metrics.evaluate_saes`` call per hook, so the per-model work
    (activation statistics, clean forward and gradient, ablations) is done once per hook; ``eval_seconds`` is
    each SAE's share of the unit's evaluation (``eval_unit_seconds`` over ``provenance.saes_evaluated_together``).
    """
    from .metrics import evaluate_saes

    out_dir = Path(out_dir)
    specs = [s for s in p.sae_specs(role=role) if sae_ids is None or s.sae_id in sae_ids]
    todo = [s for s in specs if force or not is_evaluated(p, out_dir, s.sae_id)]
    if not todo:
        return [read_json(metrics_path(out_dir, s.sae_id)) for s in specs]
    t0, started = time.time(), provenance.now()
    tokens = load_eval_tokens(out_dir)
    tokens_hash = token_hash(tokens)  # the same eval rows for every model and SAE: recorded with each
    model = load_model(p, out_dir, role, device)
    special = (0, 1) if p.embedded else special_ids(model.config)
    ev = p.evaluation
    done = []  # (spec, train_meta, metrics, per-sequence CE of the SAE, per-sequence sums of its hook)
    for layer in sorted({s.layer for s in todo}):
        here = [s for s in todo if s.layer == layer]
        loaded = [load_sae(out_dir, spec.sae_id, device) for spec in here]
        per_seq: dict = {}
        results = evaluate_saes(model, layer, [sae for sae, _ in loaded], tokens, sequence_sums=per_seq,
                                batch_sequences=ev.batch_sequences, swd=ev.swd, gwd=ev.gwd,
                                random_error_draws=ev.random_error_draws,
                                random_error_sequences=ev.random_error_sequences, twonn_points=ev.twonn_points,
                                seed=ev.seed, exclude_special_tokens=ev.exclude_special_tokens, special_ids=special,
                                skip_positions=p.skip_positions(role), progress=progress)
        done += [(spec, meta, m, ce_sae, per_seq) for spec, (_, meta), m, ce_sae in
                 zip(here, loaded, results, per_seq["ce_sae"])]
    total = time.time() - t0
    for spec, train_meta, m, ce_sae, per_seq in done:
        write_json_atomic(sequence_ce_path(out_dir, spec.sae_id), {
            "sae_id": spec.sae_id, "eval_hash": p.eval_hash, "ce_sae": ce_sae.tolist(),
            **{k: per_seq[k].tolist() for k in ("ce_clean", "ce_zero", "predictions")}})
        m["ce_rec"] = m["ce_rec_relative"] if ev.ce_rec == "relative" else m["ce_rec_zero_norm"]
        rec = {"sae_id": spec.sae_id, "model_role": role, "model_name": model_name(p, role),
               "hook": p.hook(role, spec.layer), "k": spec.k, "tokens": spec.tokens, "seed": spec.seed,
               "d_in": p.d_in(role), "d_sae": p.d_sae(role),
               **m, "ce_rec_definition": ev.ce_rec, "skip_positions": p.skip_positions(role),
               "model_type": p.models[role].model_type,
               "tokens_per_latent": spec.tokens / p.d_sae(role), "trainer": train_meta.get("trainer", "saelens"),
               "train_seconds": train_meta["train_seconds"], "budget_mode": train_meta["budget_mode"],
               "epochs_used": train_meta["epochs_used"], "eval_hash": p.eval_hash,
               "eval_seconds": total / len(todo), "eval_unit_seconds": total, "finished_at": provenance.now(),
               "provenance": provenance.record(p.params_hash(), sae_hash=train_meta["sae_hash"], started=started,
                                               eval_tokens_shape=list(np.shape(tokens)), eval_tokens_hash=tokens_hash,
                                               evaluation=ev.model_dump(), saes_evaluated_together=len(todo),
                                               peak_rss_mb=provenance.peak_rss_mb())}
        write_json_atomic(metrics_path(out_dir, spec.sae_id), rec)
    return [read_json(metrics_path(out_dir, s.sae_id)) for s in specs]
