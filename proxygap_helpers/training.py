"""TopK SAE training over token budgets: what both trainers share, and SAELens' ``SAETrainer`` path.

Two trainers (``sae.trainer`` in params, recorded in every train_meta): ``fast`` (the default,
``engine.py``: every SAE of a unit from one shared activation stream, sparse step) and ``saelens`` (each SAE
alone through SAELens' ``TopKTrainingSAE`` + ``SAETrainer``: the parity baseline). Both start from the same
seeded SAELens init (:func:`make_sae`), use the same schedule (:func:`schedule`) and save the same way
(:func:`save_sae`).

Budget modes (recorded in every result):

* ``separate`` (the study's): each budget T is its own run, with its own schedule: linear warm-up over
  ``lr_warmup_fraction`` of the steps, constant, then linear decay to 0 over the last ``lr_decay_fraction``.
* ``ladder``: one run per (role, hook, k, seed) up to the largest budget, checkpointed at each smaller budget;
  the schedule does not depend on T (warm-up over ``ladder_warmup_tokens``, then constant).

Choices from Gao et al. (2024), all in params: lr = 2e-4 / sqrt(d_sae / 2^14) unless given, AuxK loss
for dead latents (coefficient ``aux_k_coefficient``; a latent is dead after ``dead_tokens_window`` tokens
without firing), unit-norm decoder treatment (SAELens' ``rescale_acts_by_decoder_norm``), activation
normalisation to expected norm sqrt(d_in) (folded into the weights at the end).

We drive ``SAETrainer`` through its public seams (``step``, ``maybe_reset_sparsity``,
``set_final_sae_metadata``) rather than ``fit()`` so that each SAE gets a training log, a NaN stop that
names the step, and checkpoints at exact budgets.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Iterable

import torch

from .files import atomic_dir, read_json, write_json_atomic
from .layout import sae_dir
from .params import Params, SAESpec

TRAIN_META = "train_meta.json"
TRAIN_LOG = "train_log.json"


class TrainingError(RuntimeError):
    """Training of one SAE failed (e.g. a non-finite loss); the message names the SAE and the step."""


def is_trained(out_dir: Path, sae_id: str) -> bool:
    """Complete = the directory exists with weights, cfg and our train_meta (written inside it, renamed whole)."""
    d = sae_dir(out_dir, sae_id)
    return all((d / f).is_file() for f in ("cfg.json", "sae_weights.safetensors", TRAIN_META))


def make_sae(p: Params, role: str, k: int, seed: int, model_name: str, context_size: int, layer: int | None = None):
    """A fresh, seeded ``TopKTrainingSAE`` for one role, hook (``layer``: the role's only one by default) and k."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(seed)
    cfg = TopKTrainingSAEConfig(
        d_in=p.d_in(role), d_sae=p.d_sae(role), k=k, aux_loss_coefficient=p.sae.aux_k_coefficient,
        rescale_acts_by_decoder_norm=True, decoder_init_norm=p.sae.decoder_init_norm,
        normalize_activations=p.sae.normalize_activations, apply_b_dec_to_input=True,
        dtype="float32", device="cpu",
    )
    cfg.metadata.model_name = model_name
    cfg.metadata.hook_name = p.hook(role, layer)
    cfg.metadata.context_size = context_size
    cfg.metadata.prepend_bos = False
    return TopKTrainingSAE(cfg)


def schedule(p: Params, total_tokens: int, d_sae: int) -> dict:
    """Steps, learning rate (Gao et al.: it depends on ``d_sae``) and SAELens scheduler arguments of a run to
    ``total_tokens`` (budget modes: module docstring)."""
    s = p.sae
    steps = max(1, total_tokens // s.batch_size)
    if s.budget_mode == "separate":
        warm, decay = int(s.lr_warmup_fraction * steps), int(s.lr_decay_fraction * steps)
    else:
        # not capped at `steps`: the schedule must not depend on the largest budget (a warm-up longer than the
        # run just ends the run while still warming up, exactly like the same steps of a longer run)
        warm, decay = s.ladder_warmup_tokens // s.batch_size, 0
    return {"steps": steps, "warm_up_steps": warm, "decay_steps": decay,
            "lr": s.lr_for(d_sae)}


def estimates_from_data(p: Params) -> bool:
    """Whether a run reads its first ``norm_estimate_batches`` batches as estimates (not trained on): for the
    activation scaling factor, the mean that centring subtracts, or b_dec's init."""
    s = p.sae
    return s.normalize_activations != "none" or s.center_activations or s.b_dec_init != "zeros"


@torch.no_grad()
def b_dec_init(rows: torch.Tensor, how: str, iters: int = 100, tol: float = 1e-7) -> torch.Tensor:
    """b_dec at step 0 from activation rows ``[n, d_in]`` (scaled, and centred when centring is on): ``mean``, or
    ``geometric_median`` (argmin_m sum_i ||x_i - m||, by Weiszfeld's iterations from the mean, float64, until the
    step is below ``tol`` times the data's mean norm; the init Gao et al. (2024) use); returns ``[d_in]`` float64.
    Raises ``ValueError`` for another ``how``."""
    x = rows.double()
    m = x.mean(0)
    if how == "mean":
        return m
    if how != "geometric_median":
        raise ValueError(f"b_dec init {how!r}: use mean or geometric_median")
    size = x.norm(dim=-1).mean().clamp_min(1e-30)
    for _ in range(iters):
        w = 1 / (x - m).norm(dim=-1).clamp_min(1e-12)
        new = (w[:, None] * x).sum(0) / w.sum()
        done = (new - m).norm() < tol * size
        m = new
        if done:
            break
    return m


def make_trainer(p: Params, sae, total_tokens: int, device: str, data_provider):
    """A ``SAETrainer`` with the schedule of the budget mode (see module docstring)."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    s = p.sae
    sch = schedule(p, total_tokens, sae.cfg.d_sae)
    lr = sch["lr"]
    window = max(1, s.dead_tokens_window // s.batch_size)
    cfg = SAETrainerConfig(
        total_training_samples=sch["steps"] * s.batch_size, train_batch_size_samples=s.batch_size, lr=lr,
        lr_end=lr, lr_scheduler_name="constant", lr_warm_up_steps=sch["warm_up_steps"],
        lr_decay_steps=sch["decay_steps"], device=device, dead_feature_window=window,
        feature_sampling_window=window, n_batches_for_norm_estimate=s.norm_estimate_batches,
    )
    sae.to(device)  # fit() would do this; run_training drives step() directly
    return SAETrainer(cfg=cfg, sae=sae, data_provider=data_provider)


def _finalised(trainer):
    """A copy of the trainer's SAE with the activation normalisation folded into its weights."""
    sae = copy.deepcopy(trainer.sae)
    if trainer.activation_scaler.scaling_factor is not None:
        sae.fold_activation_norm_scaling_factor(trainer.activation_scaler.scaling_factor)
    if trainer.n_frac_active_samples > 0:
        sae.cfg.metadata.l0 = trainer.feature_sparsity.sum().item()
        sae.cfg.metadata.num_dead_features = int(trainer.dead_neurons.sum().item())
    return sae


def save_sae(out_dir: Path, spec: SAESpec, sae, log: list[dict], meta: dict) -> None:
    """Save a finished SAE (SAELens format) with its training log and train_meta, atomically (one rename)."""
    with atomic_dir(sae_dir(out_dir, spec.sae_id)) as tmp:
        sae.save_model(tmp)
        write_json_atomic(tmp / TRAIN_LOG, log)
        write_json_atomic(tmp / TRAIN_META, meta)


def run_training(p: Params, specs: list[SAESpec], source, out_dir: Path, model_name: str, context_size: int,
                 device: str = "cpu", progress: bool = True) -> list[dict]:
    """Train one SAE run for ``specs`` that share (role, layer, k, seed); save a checkpoint at each spec's budget.

    In ``separate`` mode ``specs`` has one element; in ``ladder`` mode the run goes to the largest budget.
    Returns the train_meta of each saved SAE.
    """
    from .progress import tqdm

    specs = sorted(specs, key=lambda s: s.tokens)
    role, k, seed, layer = specs[0].role, specs[0].k, specs[0].seed, specs[0].layer
    assert all((s.role, s.k, s.seed, s.layer) == (role, k, seed, layer) for s in specs)
    total = specs[-1].tokens
    sae = make_sae(p, role, k, seed, model_name, context_size, layer)
    batches = source.batches(p.sae.batch_size, total + p.sae.norm_estimate_batches * p.sae.batch_size, seed)
    trainer = make_trainer(p, sae, total, device, batches)
    t0 = time.time()
    if trainer.sae.cfg.normalize_activations == "expected_average_only_in":
        trainer.activation_scaler.scaling_factor = _scaling_factor(batches, sae.cfg.d_in, p.sae.norm_estimate_batches)
    pending = [(max(1, s.tokens // p.sae.batch_size), s) for s in specs]
    steps = pending[-1][0]
    log: list[dict] = []
    bar = tqdm(total=steps, desc=f"{role} k={k} seed={seed}", disable=not progress, mininterval=1.0, leave=False)
    metas = []
    for step in range(1, steps + 1):
        trainer.maybe_reset_sparsity()
        out = trainer.step(next(batches))
        trainer.n_training_steps += 1
        loss = out.loss.item()
        if not math.isfinite(loss):
            raise TrainingError(f"SAE {specs[0].sae_id}: training loss is {loss} at step {step} "
                                f"(token {step * p.sae.batch_size}); nothing was saved for this SAE")
        if step % p.sae.log_every == 0 or step == steps:
            log.append(_log_row(trainer, out, step, p.sae.batch_size))
            bar.set_postfix(mse=f"{log[-1]['mse_loss']:.4g}", dead=f"{log[-1]['dead_frac']:.2f}")
        bar.update()
        while pending and pending[0][0] == step:
            _, spec = pending.pop(0)
            meta = train_meta(p, spec, steps=trainer.n_training_steps, tokens_seen=trainer.n_training_samples,
                              seconds=time.time() - t0, epochs_used=getattr(source, "epochs_used", 1),
                              extra={"trainer": "saelens", "device": device, "precision": "fp32",
                                     "deterministic": device == "cpu", "scaling_factor":
                                     trainer.activation_scaler.scaling_factor})
            save_sae(out_dir, spec, _finalised(trainer), [r for r in log if r["step"] <= step], meta)
            metas.append(meta)
    bar.close()
    return metas


def _scaling_factor(batches, d_in: int, n_batches: int) -> float:
    """sqrt(d_in) / mean ||x|| over the first ``n_batches`` (SAELens' ``estimate_scaling_factor``, without its bar)."""
    norms = torch.cat([next(batches).norm(dim=-1) for _ in range(n_batches)])
    return d_in**0.5 / norms.double().mean().item()


def _log_row(trainer, out, step: int, batch_size: int) -> dict:
    with torch.no_grad():
        l0 = (out.feature_acts > 0).float().sum(-1).mean().item()
    row = {"step": step, "tokens": step * batch_size, "loss": out.loss.item(),
           "lr": trainer.optimizer.param_groups[0]["lr"], "l0": l0,
           "dead_frac": trainer.dead_neurons.float().mean().item()}
    row.update({name: float(v.item() if torch.is_tensor(v) else v) for name, v in out.losses.items()})
    return row


def train_meta(p: Params, spec: SAESpec, steps: int, tokens_seen: int, seconds: float, epochs_used: int,
               extra: dict) -> dict:
    """What ``train_meta.json`` records of one SAE: its spec, shapes, schedule facts, trainer and timing."""
    return {"sae_id": spec.sae_id, "model_role": spec.role, "k": spec.k, "tokens": spec.tokens, "seed": spec.seed,
            "hook": p.hook(spec.role, spec.layer), "d_in": p.d_in(spec.role), "d_sae": p.d_sae(spec.role),
            "tokens_per_latent": spec.tokens / p.d_sae(spec.role),
            "budget_mode": p.sae.budget_mode, "steps": steps, "tokens_seen": tokens_seen,
            "lr": p.sae.lr_for(p.d_sae(spec.role)), "epochs_used": epochs_used, "train_seconds": seconds,
            "threads": torch.get_num_threads(),  # CPU numbers depend on it (``executor.threads``)
            **extra, "sae_params": p.sae.model_dump(mode="json"),
            "sae_hash": p.sae_hash(spec.role, spec.k, spec.tokens, spec.seed, spec.layer)}


def runs_for(p: Params, specs: Iterable[SAESpec]) -> list[list[SAESpec]]:
    """Group SAE specs into training runs: one per spec (separate) or per (role, layer, k, seed) (ladder)."""
    specs = list(specs)
    if p.sae.budget_mode == "separate":
        return [[s] for s in specs]
    groups: dict[tuple, list[SAESpec]] = {}
    for s in specs:
        groups.setdefault((s.role, s.layer, s.k, s.seed), []).append(s)
    return list(groups.values())


def load_sae(out_dir: Path, sae_id: str, device: str = "cpu"):
    """Load a finished SAE (SAELens format) and its train_meta; refuse a half-written directory."""
    from sae_lens import SAE

    d = sae_dir(out_dir, sae_id)
    if not is_trained(out_dir, sae_id):
        raise TrainingError(f"{d} is missing or incomplete (no cfg.json / weights / {TRAIN_META})")
    return SAE.load_from_disk(str(d), device=device), read_json(d / TRAIN_META)
