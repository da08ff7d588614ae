"""The fast SAE engine: a *set* of TopK SAEs trained from one shared activation stream, with a sparse step.

A set is every training run of one role (all hook x k x seed x budget), or a shard of them. The stream
(``source.chunks``: a store read once, or one LM forward per row on the hub path) is shared; with several hooks
a chunk holds every hook's rows (``{layer: Tensor}``: the stores of one LM pass read in step, or one forward for
all hooks online) and each run reads its own hook's: each chunk is
visited by every run still training, each in its own order ``numpy.random.default_rng([seed, chunk])``, so
seeds differ in data order (and in init: ``training.make_sae`` seeds it). A run's numbers depend only on its
own spec and the stream, never on which other runs share the set: a shard trains the same SAEs, bit for
bit on CPU, as the whole set.

Per run, as SAELens' ``SAETrainer`` does it (``training.py`` keeps that trainer as the parity baseline,
``sae.trainer: saelens``): the first ``norm_estimate_batches`` batches estimate the activation scaling
factor sqrt(d_in) / mean ||x|| (not trained on); then ``steps = tokens // batch_size`` steps of
:func:`sparse_step.sparse_forward` (TopK, sparse decode and backward, AuxK over latents that have not fired
for ``dead_tokens_window`` tokens), gradient-norm clipping at 1, Adam (fused where torch has it), and
SAELens' own learning-rate scheduler (``get_lr_scheduler``: warm-up, constant, linear decay, per
``budget_mode``). Checkpoints at each budget are folded (activation scaling) and saved in SAELens format by
SAELens itself, so ``SAE.load_from_disk`` reads them.

On CUDA, ``sae.precision`` may ask for TF32 matmuls or bf16 autocast, and ``sae.kernel: triton`` runs the step
as Triton kernels (:mod:`proxygap_helpers.triton_step`); activations stay on the GPU (a store
that fits in the buffer, ``Params.buffer_rows``, is copied there once). The choice is recorded in each ``train_meta.json``.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from . import training
from .params import Params, SAESpec
from .sparse_step import sparse_forward


class Run:
    """One training run of the set: specs sharing (role, layer, k, seed), checkpointed at each spec's budget."""

    def __init__(self, p: Params, specs: list[SAESpec], out_dir: Path, model_name: str, context_size: int,
                 device: str, sizes: tuple[int, int]):
        self.p, self.specs, self.out_dir = p, sorted(specs, key=lambda s: s.tokens), out_dir
        s0 = self.specs[0]
        self.role, self.k, self.seed, self.layer = s0.role, s0.k, s0.seed, s0.layer
        self.model_name, self.context_size, self.device = model_name, context_size, device
        self.bs = p.sae.batch_size
        self.steps = max(1, self.specs[-1].tokens // self.bs)
        self.pending = [(max(1, s.tokens // self.bs), s) for s in self.specs]
        self.norm_batches = p.sae.norm_estimate_batches if training.estimates_from_data(p) else 0
        self.window = max(1, p.sae.dead_tokens_window // self.bs)  # SAELens' dead_feature_window, in steps
        self.set_size, self.unit_saes = sizes
        self.step = 0
        self.rows: list[torch.Tensor] = []  # the estimate batches (scaling factor, mean, b_dec init)
        self.scale: float | None = None if self.norm_batches else 1.0
        self.shift: torch.Tensor | float = 0.0  # the scaled mean that centring subtracts (sae.center_activations)
        self.carry: torch.Tensor | None = None
        self.log: list[dict] = []
        self.metas: list[dict] = []
        self.started = False
        self.epochs_used = 1
        self.lm_tokens: int | None = None  # the shared stream's LM tokens so far (online source; None for a store)

    # ------------------------------------------------------------------ state
    def _start(self) -> None:
        """Init exactly as SAELens does for this seed (``training.make_sae``), then our tensors and optimizer."""
        from sae_lens.training.optim import get_lr_scheduler

        sae = training.make_sae(self.p, self.role, self.k, self.seed, self.model_name, self.context_size, self.layer)
        dev = self.device
        self.W_enc = sae.W_enc.detach().t().contiguous().to(dev).requires_grad_()  # [d_sae, d_in]: row per latent
        self.b_enc = sae.b_enc.detach().clone().to(dev).requires_grad_()
        self.W_dec = sae.W_dec.detach().clone().to(dev).requires_grad_()
        self.b_dec = sae.b_dec.detach().clone().to(dev).requires_grad_()
        self.params = [self.W_enc, self.b_enc, self.W_dec, self.b_dec]
        d_sae = self.W_dec.shape[0]
        self.since_fired = torch.zeros(d_sae, device=dev)
        self.act_freq = torch.zeros(d_sae, device=dev)
        self.n_frac_active = 0
        sched = training.schedule(self.p, self.specs[-1].tokens, d_sae)
        self.lr = sched["lr"]
        self.opt = torch.optim.Adam(self.params, lr=self.lr, betas=(0.9, 0.999), **_adam_kwargs(dev))
        self.sched = get_lr_scheduler("constant", optimizer=self.opt, training_steps=sched["steps"], lr=self.lr,
                                      warm_up_steps=sched["warm_up_steps"], decay_steps=sched["decay_steps"],
                                      lr_end=self.lr, num_cycles=1)
        self.t0 = time.time()
        self.started = True

    @property
    def done(self) -> bool:
        return not self.pending

    # ------------------------------------------------------------------ data
    def consume(self, c: int, chunk: torch.Tensor | dict[int, torch.Tensor], precision: str, progress) -> None:
        """Visit chunk ``c`` (this run's hook's rows of it) in this run's order; train until the chunk is used up
        or the run is done."""
        if isinstance(chunk, dict):
            chunk = chunk[self.layer]
        if not self.started:
            self._start()
        order = torch.from_numpy(np.random.default_rng([self.seed, c]).permutation(len(chunk))).to(chunk.device)
        pos = 0
        if self.carry is not None:  # rows left from the previous chunk start this one's first batch
            need = self.bs - len(self.carry)
            batch = torch.cat([self.carry, chunk[order[:need]]])
            pos, self.carry = need, None
            if len(batch) < self.bs:
                self.carry = batch
                return
            self._batch(batch, precision, progress)
        while not self.done and pos + self.bs <= len(chunk):
            self._batch(chunk[order[pos:pos + self.bs]], precision, progress)
            pos += self.bs
        if not self.done and pos < len(chunk):
            self.carry = chunk[order[pos:]]

    def _batch(self, x: torch.Tensor, precision: str, progress) -> None:
        if self.scale is None:  # the norm-estimate batches (SAELens' estimate_scaling_factor), not trained on
            self.rows.append(x)
            if len(self.rows) == self.norm_batches:
                self._estimate(torch.cat(self.rows))
                self.rows = []
            return
        self._train_step(x, precision)
        progress.update()

    @torch.no_grad()
    def _estimate(self, rows: torch.Tensor) -> None:
        """From the estimate batches' rows ``[n, d_in]``: the mean that centring subtracts, the scaling factor
        sqrt(d_in) / mean ||x - mean|| (SAELens' without centring) and b_dec at step 0 (``training.b_dec_init``)."""
        s = self.p.sae
        if s.center_activations:
            mean = rows.double().mean(0)
            norms = (rows.double() - mean).norm(dim=-1)
        else:
            mean, norms = 0.0, rows.norm(dim=-1)  # (as SAELens: float32 norms, a float64 mean)
        self.scale = rows.shape[1] ** 0.5 / norms.double().mean().item() if s.normalize_activations != "none" else 1.0
        self.shift = (mean * self.scale).float() if s.center_activations else 0.0
        if s.b_dec_init != "zeros":
            self.b_dec.copy_(training.b_dec_init(rows.double() * self.scale - self.shift, s.b_dec_init).to(self.b_dec))

    # ------------------------------------------------------------------ the step
    def _train_step(self, x: torch.Tensor, precision: str) -> None:
        self.step += 1
        if self.step > 1 and (self.step - 1) % self.window == 0:  # SAELens' maybe_reset_sparsity
            self.act_freq.zero_()
            self.n_frac_active = 0
        dead = self.since_fired > self.window
        dead_ids = dead.nonzero().squeeze(1)
        with _matmul_precision(precision):  # the whole step, the backward's GEMMs included
            with _autocast(x.device.type, precision):  # the forward (autograd runs its casts' backward in kind)
                s = self.p.sae
                out = sparse_forward(x * self.scale - self.shift, self.W_enc, self.b_enc, self.W_dec, self.b_dec,
                                     self.k, dead_ids, s.aux_k_coefficient, kernel=s.kernel, precision=precision,
                                     k_aux=s.k_aux, aux_normalization=s.aux_k_normalization,
                                     aux_rectified=s.aux_k_rectified)
            with torch.no_grad():
                fired = torch.bincount(out.idx[out.v > 0], minlength=self.W_dec.shape[0])
                self.since_fired.add_(1).masked_fill_(fired > 0, 0)
                self.act_freq.add_(fired)
                self.n_frac_active += len(x)
            out.loss.backward()
        if self.p.sae.decoder_unit_norm:
            _remove_parallel_grad(self.W_dec)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        if self.p.sae.decoder_unit_norm:
            with torch.no_grad():
                self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True))
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        log_step = self.step % self.p.sae.log_every == 0 or self.step == self.steps
        if log_step or self.device == "cpu":  # a host sync on a GPU: checked at log steps only there
            loss = out.loss.item()
            if not math.isfinite(loss):
                when = "at step" if self.device == "cpu" else "at or before step"
                raise training.TrainingError(
                    f"SAE {self.specs[0].sae_id}: training loss is {loss} {when} {self.step} (token "
                    f"{self.step * self.bs}); nothing was saved for this SAE")
        if log_step:
            self.log.append({"step": self.step, "tokens": self.step * self.bs, "loss": loss, "lr": lr,
                             "l0": (out.v > 0).sum(-1).float().mean().item(), "dead_frac": dead.float().mean().item(),
                             "mse_loss": out.mse_loss.item(), "auxiliary_reconstruction_loss": out.aux_loss.item()})
        while self.pending and self.pending[0][0] == self.step:
            self._checkpoint(self.pending.pop(0)[1], precision)

    # ------------------------------------------------------------------ saving
    def _checkpoint(self, spec: SAESpec, precision: str) -> None:
        if training.is_trained(self.out_dir, spec.sae_id):  # reused from an earlier, interrupted run
            return
        sae = self.to_saelens()
        meta = training.train_meta(self.p, spec, steps=self.step, tokens_seen=self.step * self.bs,
                                   seconds=time.time() - self.t0, epochs_used=self.epochs_used, extra={
                                       "trainer": "fast", "device": self.device, "precision": precision,
                                       "kernel": self.p.sae.kernel,
                                       "deterministic": self.device == "cpu", "scaling_factor": self.scale,
                                       "buffer_tokens": self.p.buffer_rows(self.role), "set_runs": self.set_size,
                                       "set_saes": self.unit_saes, "stream_lm_tokens": self.lm_tokens})
        training.save_sae(self.out_dir, spec, sae, [r for r in self.log if r["step"] <= self.step], meta)
        self.metas.append(meta)

    @torch.no_grad()
    def to_saelens(self):
        """This run's SAE now, as a SAELens ``TopKTrainingSAE`` on the CPU with the activation scaling folded in
        and SAELens' end-of-training metadata (``l0``, ``num_dead_features``) set."""
        sae = training.make_sae(self.p, self.role, self.k, self.seed, self.model_name, self.context_size, self.layer)
        sae.W_enc.copy_(self.W_enc.detach().t().cpu())
        sae.b_enc.copy_(self.b_enc.detach().cpu())
        sae.W_dec.copy_(self.W_dec.detach().cpu())
        sae.b_dec.copy_((self.b_dec.detach() + self.shift).cpu())  # centring folded: the SAE reads x * scale
        if self.norm_batches:
            sae.fold_activation_norm_scaling_factor(self.scale)
        if self.n_frac_active > 0:
            sae.cfg.metadata.l0 = (self.act_freq / self.n_frac_active).sum().item()
            sae.cfg.metadata.num_dead_features = int((self.since_fired > self.window).sum().item())
        return sae

    def release(self) -> None:
        """Free the weights and optimizer state of a finished run (a set may hold many)."""
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "params", "opt", "sched", "since_fired", "act_freq", "shift"):
            self.__dict__.pop(name, None)


@torch.no_grad()
def _remove_parallel_grad(W_dec: torch.Tensor) -> None:
    """Gao et al.'s projection (openai/sparse_autoencoder ``unit_norm_decoder_grad_adjustment_``): from each decoder
    row's gradient remove its component along the (unit-norm) row, ``g -= <g, w> w``, so the step moves the row
    along its sphere before it is renormalised."""
    w = W_dec / W_dec.norm(dim=-1, keepdim=True)
    W_dec.grad.sub_((W_dec.grad * w).sum(-1, keepdim=True) * w)


def _adam_kwargs(device: str) -> dict:
    """Fused Adam where torch has it for the device (CPU and CUDA in torch >= 2.4), else foreach."""
    return {"fused": True} if torch.device(device).type in ("cpu", "cuda") else {"foreach": True}


@contextmanager
def _autocast(device_type: str, precision: str):
    """``bf16``: autocast the forward's matmuls to bfloat16 (fp32 master weights and accumulation); else nothing."""
    if precision == "bf16":
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            yield
        return
    yield


@contextmanager
def _matmul_precision(precision: str):
    """``tf32``: TF32 CUDA matmuls (``torch.backends.cuda.matmul.allow_tf32``; CPU matmuls ignore it) for as long as
    the context lasts: the whole step, forward and backward; other precisions leave the flag as it is."""
    if precision != "tf32":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def train_set(p: Params, specs: list[SAESpec], source, out_dir: Path, model_name: str, context_size: int,
              device: str = "cpu", progress: bool = True) -> list[dict]:
    """Train every SAE of ``specs`` that is not already saved, from one pass over ``source.chunks``.

    ``specs`` may mix hooks, k, seeds and budgets of one role (a unit); with several hooks ``source.chunks``
    yields ``{layer: Tensor}``. Runs are grouped as ``training.runs_for``
    does (one per spec in ``separate`` mode, one per (hook, k, seed) in ``ladder`` mode); a run whose SAEs are all
    saved is skipped, an unfinished one restarts from its seed (resume after a kill). Returns the train_meta
    of each SAE saved now.

    Raises ``training.TrainingError`` on a non-finite loss (naming the SAE and step; its SAEs are not saved)
    and ``activations.StoreError`` when an online source runs out of text.
    """
    from .progress import tqdm

    out_dir = Path(out_dir)
    todo = [run for run in training.runs_for(p, specs)
            if not all(training.is_trained(out_dir, s.sae_id) for s in run)]
    if not todo:
        return []
    sizes = (len(todo), sum(len(r) for r in todo))
    runs = [Run(p, r, out_dir, model_name, context_size, device, sizes) for r in todo]
    precision = p.sae.precision
    total = sum(r.steps for r in runs)
    bar = tqdm(total=total, desc=f"train {runs[0].role}: {len(runs)} SAE runs, steps", disable=not progress,
               mininterval=1.0)
    chunks = source.chunks(p.buffer_rows(runs[0].role), seed=p.data.seed, device=device)
    try:
        for c, chunk in chunks:
            for run in runs:
                if not run.done:
                    run.epochs_used = getattr(source, "epochs_used", 1)
                    run.lm_tokens = getattr(source, "lm_tokens", None)
                    run.consume(c, chunk, precision, bar)
                    if run.done:
                        run.release()
            if all(r.done for r in runs):
                break
    finally:
        chunks.close()
        bar.close()
    return [m for r in runs for m in r.metas]


def calibration_step(p: Params, role: str, k: int, device: str = "cpu", dead_fraction: float = 0.0):
    """A callable that runs one engine train step (batch ``sae.batch_size``) on random activations of
    ``role``'s shapes, for ``plan`` and the benchmarks; ``dead_fraction`` of the latents count as dead at
    every call, so AuxK runs over that many. Nothing is saved."""
    spec = p.sae_specs(role=role, k=k)[0]
    run = Run(p, [spec], Path("unused"), "calibration", p.data.context_size, device, (1, 1))
    run._start()
    run.scale, run.pending = 1.0, []
    x = torch.randn(p.sae.batch_size, p.d_in(role), device=device)
    n_dead = int(dead_fraction * p.d_sae(role))

    def step() -> None:
        run.since_fired.zero_()[:n_dead] = run.window + 1
        run._train_step(x, p.sae.precision)
    return step
