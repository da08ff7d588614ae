"""Metrics of SAEs spliced into one model: behaviour (CE, KL), geometry (SWD, GWD), the random-error
baseline, reconstruction proxies and the model's own activation statistics (D3, SST).

Everything is computed on the HF fast path (the family's ``*ForCausalLM`` with a forward hook on decoder layer
L, found by ``models.layer_list``, whose output is ``blocks.L.hook_resid_post``); the tests check it against
TransformerLens and against SAELens' own evaluator (``sae_lens.evals.run_evals``).

Notation. ``tokens`` is ``[n_seq, ctx]``; ``x`` is the hook activation ``[n_seq, ctx, d]``;
``x_hat = sae.decode(sae.encode(x))``; ``e = x_hat - x``. A *prediction* is the pair (position t,
target token ``tokens[:, t+1]``) for ``t = 0 .. ctx-2``: there are ``ctx - 1`` per sequence, the last
position (which has no target) is never used by CE, KL or SWD.

Definitions (ratio of means: every sum runs over all eval sequences, never a mean of batch means):

* ``ce_clean | ce_sae | ce_zero | ce_mean_ablation`` = mean over predictions of
  ``-log softmax(logits_t)[tokens[t+1]]`` with the hook activation left as is | replaced at *every*
  position by ``x_hat`` | by 0 | by ``mean(x)`` (the per-dimension mean over the eval tokens, computed
  in a first pass).
* ``ce_rec_relative = 1 - (ce_sae - ce_clean) / ce_clean = 2 - ce_sae / ce_clean``.
* ``ce_rec_zero_norm = (ce_zero - ce_sae) / (ce_zero - ce_clean)`` (SAELens' ``ce_loss_score``).
* ``r2 = 1 - sum_n ||x_n - x_hat_n||^2 / sum_n ||x_n - mean(x)||^2`` (= SAELens' ``explained_variance``).
* ``cosine = mean_n cos(x_n, x_hat_n)``; ``rel_err_norm = mean_n ||x_n - x_hat_n|| / ||x_n||``.
* ``kl = mean over predictions of KL(p_clean,t || p_sae,t) = sum_v p_clean log(p_clean / p_sae)``.
* ``swd = mean over predictions of 1/2 (J e)_t^T (diag p_t - p_t p_t^T) (J e)_t`` where ``J`` is the
  Jacobian of all logits of the sequence w.r.t. all hook activations of the sequence and ``p_t`` the
  clean next-token distribution. With ``u = (J e)_t`` this equals ``1/2 Var_{p_t}(u) = 1/2 (sum_v p_v u_v^2
  - (sum_v p_v u_v)^2)``; it is computed in the centred form ``1/2 sum_v p_v (u_v - sum_w p_w u_w)^2``
  (same value, no cancellation). It is the second-order term of the KL: ``KL(p || p(x + eps e)) =
  eps^2 swd + O(eps^3)``. ``J e`` is one forward-mode JVP per batch (``torch.autograd.forward_ad``),
  no dense Jacobian. Fused attention kernels have no forward-AD formula (PyTorch 2.13 raises
  ``NotImplementedError`` for ``_scaled_dot_product_flash_attention_for_cpu``), so the JVP pass runs
  SDPA with its composite *math* backend (``torch.nn.attention.sdpa_kernel([SDPBackend.MATH])``); a model
  with another attention implementation (e.g. flash_attention_2) is switched to ``"eager"`` for that
  pass and restored. The other passes keep the model's own (fused) attention.
* ``l0`` = mean over eval tokens of the number of latents with ``f != 0``; ``dead_frac`` = fraction of
  the ``d_sae`` latents that are 0 on every eval token.
* ``mse = sum_n ||x_n - x_hat_n||^2 / N`` (SAELens' ``mse``: squared activation units per token);
  ``nmse = sum_n ||x_n - x_hat_n||^2 / sum_n ||x_n||^2`` (= mse / ``act_sq_norm_mean``; dimensionless, the
  scale-free alternative to ``1 - r2``, which divides by the *centred* variance instead).
* ``gwd`` (gradient-weighted distortion; the study author's "SWD" E[(g^T delta)^2], a *first-order* proxy,
  not the Fisher ``swd`` above) = mean over predictions t of ``(g_t^T e_t)^2`` in nats^2, where
  ``g_t = dL/dx_t`` on the clean run and ``L`` is the sequence's *total* next-token CE (sum over its
  predictions, in nats). ``g_t^T e_t`` is the first-order change of the sequence's total CE when only
  position t gets the SAE error: ``L(x + eps e) - L(x) = eps sum_t g_t^T e_t + O(eps^2)``. One backward
  pass per eval batch, shared by every SAE (:func:`clean_pass`).
* Random-error baseline (Gurnee 2024, "SAE reconstruction errors are (empirically) pathological"): on a
  fixed subset of eval sequences (``random_error_sequences``, evenly spaced: :func:`random_error_rows`),
  each token's SAE error is replaced by ``||e_t|| u_t`` with ``u_t`` a seeded isotropic unit vector
  (:func:`random_directions`), for ``random_error_draws`` independent draws. ``kl_random`` = mean over draws
  of the mean KL(p_clean || p_random) over the subset's predictions (``kl_random_sd``: SD over draws);
  ``random_error_ratio = KL_sae / kl_random`` with ``KL_sae`` the SAE's KL on the same predictions
  (``random_error_ratio_sd``: SD over draws of the per-draw ratio). > 1: the SAE's error hurts behaviour
  more than a random error of the same size (Gurnee found 2-4.5x). ``random_error_predictions`` counts the
  subset's predictions.
* D3 and scale, per model and hook (:func:`activation_statistics`, the same in every SAE record of a model):
  ``pr_act`` (participation ratio of the activation covariance), ``twonn_dim`` (TwoNN intrinsic
  dimension on ``twonn_points`` seeded positions), ``sst_per_token = sum_n ||x_n - mean||^2 / N`` (what r2
  divides by), ``act_norm_mean = mean_n ||x_n||``, ``act_sq_norm_mean = mean_n ||x_n||^2``; per SAE,
  ``pr_recon`` (participation ratio of the covariance of ``x_hat``) and ``pr_recon_frac = pr_recon /
  pr_act``. See :mod:`proxygap_helpers.dimensionality`.

``eval_tokens`` counts the token positions that enter r2 / cosine / rel_err_norm / l0 / dead_frac and
the ablation mean; ``eval_predictions`` counts the predictions that enter CE / KL / SWD / GWD.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .models import patched

METRIC_KEYS = ("ce_clean", "ce_sae", "ce_zero", "ce_mean_ablation", "ce_rec_relative", "ce_rec_zero_norm",
               "r2", "cosine", "rel_err_norm", "kl", "swd", "l0", "dead_frac", "eval_tokens",
               "eval_predictions", "mse", "nmse", "gwd", "kl_random", "kl_random_sd", "random_error_ratio",
               "random_error_ratio_sd", "random_error_predictions", "pr_recon", "pr_recon_frac",
               "pr_act", "twonn_dim", "twonn_points", "sst_per_token", "act_norm_mean", "act_sq_norm_mean")
# per model and hook (the same in every SAE's record of one model): what the SAE does not change
MODEL_KEYS = ("ce_clean", "ce_zero", "ce_mean_ablation", "eval_tokens", "eval_predictions", "pr_act", "twonn_dim",
              "twonn_points", "sst_per_token", "act_norm_mean", "act_sq_norm_mean")


# --------------------------------------------------------------------------- reconstruction proxies
class ReconstructionAccumulator:
    """Streaming r2, cosine, relative error norm (and MSE) over batches of token activations.

    ``add(x, x_hat)`` takes ``[..., d]`` tensors (leading dims are flattened to tokens). All sums are
    float64, so the result equals the one-shot value on the concatenated tokens up to float64 rounding:

    * ``r2 = 1 - SSE / SST`` with ``SSE = sum_n ||x_n - x_hat_n||^2`` and ``SST = sum_n ||x_n - mean||^2``,
      ``mean`` the per-dimension mean of all added ``x``. SST is accumulated around ``center`` (any
      fixed vector; pass an estimate of the mean to avoid cancellation when ``||mean|| >> spread``):
      ``SST = sum_n ||x_n - c||^2 - ||sum_n (x_n - c)||^2 / N`` (exact for every ``c``).
    * ``cosine = mean_n <x_n, x_hat_n> / (||x_n|| ||x_hat_n||)`` (a zero vector gives cosine 0).
    * ``rel_err_norm = mean_n ||x_n - x_hat_n|| / ||x_n||``.
    * ``mse = SSE / N`` (sum over dimensions, mean over tokens: SAELens' ``mse``).
    """

    def __init__(self, center: torch.Tensor | np.ndarray | None = None):
        self.center = None if center is None else torch.as_tensor(center, dtype=torch.float64)
        self.n = 0
        self.sum_dev: torch.Tensor | None = None  # sum (x - c)       [d]
        self.sum_dev_sq = 0.0                     # sum ||x - c||^2
        self.sse = 0.0                            # sum ||x - x_hat||^2
        self.sum_cos = 0.0
        self.sum_rel = 0.0

    @torch.no_grad()
    def add(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        x = torch.as_tensor(x).reshape(-1, x.shape[-1]).to(torch.float64)
        x_hat = torch.as_tensor(x_hat).reshape(-1, x.shape[-1]).to(device=x.device, dtype=torch.float64)
        if x.shape[0] == 0:
            return
        c = torch.zeros(x.shape[-1], dtype=torch.float64) if self.center is None else self.center
        dev = x - c.to(x.device)
        s = dev.sum(0).cpu()
        self.sum_dev = s if self.sum_dev is None else self.sum_dev + s
        self.sum_dev_sq += dev.pow(2).sum().item()
        err = x - x_hat
        err_norm = err.norm(dim=-1)
        x_norm = x.norm(dim=-1)
        self.sse += err_norm.pow(2).sum().item()
        denom = x_norm * x_hat.norm(dim=-1)
        cos = torch.where(denom > 0, (x * x_hat).sum(-1) / denom.clamp_min(1e-300), torch.zeros_like(denom))
        self.sum_cos += cos.sum().item()
        self.sum_rel += (err_norm / x_norm).sum().item()
        self.n += x.shape[0]

    @property
    def sst(self) -> float:
        if self.n == 0:
            return float("nan")
        return self.sum_dev_sq - self.sum_dev.pow(2).sum().item() / self.n

    def result(self) -> dict[str, float]:
        if self.n == 0:
            nan = float("nan")
            return {"r2": nan, "cosine": nan, "rel_err_norm": nan, "mse": nan, "n": 0}
        sst = self.sst
        return {"r2": 1.0 - self.sse / sst if sst > 0 else float("nan"),
                "cosine": self.sum_cos / self.n, "rel_err_norm": self.sum_rel / self.n,
                "mse": self.sse / self.n, "n": self.n}


def reconstruction_stats(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, float]:
    """One-shot r2, cosine, rel_err_norm, mse (see :class:`ReconstructionAccumulator`) over tokens ``[..., d]``."""
    x = torch.as_tensor(x, dtype=torch.float64)
    acc = ReconstructionAccumulator(center=x.reshape(-1, x.shape[-1]).mean(0))
    acc.add(x, torch.as_tensor(x_hat))
    return acc.result()


# --------------------------------------------------------------------------- per-prediction quantities
def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 logits are promoted before softmax)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def next_token_ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-prediction CE ``[B, ctx-1]``: position t predicts ``tokens[:, t+1]``."""
    lg = _wide(logits[:, :-1])
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none"
                           ).view(tokens.shape[0], -1)


def kl_per_prediction(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(logits_p) || softmax(logits_q))`` at positions 0..ctx-2 -> ``[B, ctx-1]``."""
    lp = F.log_softmax(_wide(logits_p[:, :-1]), dim=-1)
    lq = F.log_softmax(_wide(logits_q[:, :-1]), dim=-1)
    return F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)


def fisher_quadratic(logits: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """``1/2 u^T (diag p - p p^T) u`` with ``p = softmax(logits_t)``, ``u = tangent_t`` at positions 0..ctx-2.

    Computed as ``1/2 sum_v p_v (u_v - sum_w p_w u_w)^2`` (= ``1/2 (sum p u^2 - (sum p u)^2)``). -> ``[B, ctx-1]``.
    """
    p = F.softmax(_wide(logits[:, :-1]), dim=-1)
    u = _wide(tangent[:, :-1])
    m = (p * u).sum(-1, keepdim=True)
    return 0.5 * (p * (u - m).pow(2)).sum(-1)


def prediction_mask(tokens: torch.Tensor, special_ids: Iterable[int] = (), skip_positions: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(token mask ``[B, ctx]``, prediction mask ``[B, ctx-1]``) excluding special ids and the first
    ``skip_positions`` positions of every row.

    A token position is kept iff its id is not special and it is not among the first ``skip_positions``; a
    prediction t -> t+1 is kept iff both its input position t and its target position t+1 are kept. No special ids
    and no skipped positions: all True.
    """
    ids = list(special_ids)
    if not ids:
        tok = torch.ones_like(tokens, dtype=torch.bool)
    else:
        tok = ~torch.isin(tokens, torch.tensor(ids, dtype=tokens.dtype, device=tokens.device))
    if skip_positions:
        tok[:, :skip_positions] = False
    return tok, tok[:, :-1] & tok[:, 1:]


def _after(skip: int, fn):
    """``fn`` applied to the positions from ``skip`` on, the first ``skip`` left as they are (what the SAE, or an
    ablation in its place, replaces when the first positions are skipped)."""
    if not skip:
        return fn

    def spliced(out):
        new = fn(out).clone()
        new[:, :skip] = out[:, :skip]
        return new
    return spliced


# --------------------------------------------------------------------------- model plumbing
def _sae_device_dtype(sae) -> tuple[torch.device | None, torch.dtype | None]:
    try:
        p = next(iter(sae.parameters()))
        return p.device, p.dtype
    except (AttributeError, StopIteration, TypeError):
        return None, None


@torch.no_grad()
def sae_reconstruct(sae, x: torch.Tensor, activation_scaler=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f, x_hat)`` for activations ``x``: ``f = sae.encode(s(x))``, ``x_hat = s^-1(sae.decode(f))``.

    ``s`` is ``activation_scaler.scale`` (identity if None), as in SAELens' evaluator. ``x`` is moved to the
    SAE's device (SAELens casts it to the SAE dtype); ``x_hat`` comes back on ``x``'s device and dtype.
    """
    dev, _ = _sae_device_dtype(sae)
    xin = x if dev is None else x.to(dev)
    if activation_scaler is not None:
        xin = activation_scaler.scale(xin)
    f = sae.encode(xin)
    out = sae.decode(f)
    if activation_scaler is not None:
        out = activation_scaler.unscale(out)
    if getattr(f, "is_sparse", False):
        f = f.to_dense()
    return f, out.to(device=x.device, dtype=x.dtype)


def _forward_logits(model, ids: torch.Tensor, layer: int | None = None, fn=None, capture: dict | None = None):
    """Logits of the HF model; if ``fn`` is given, layer ``layer``'s output is replaced by ``fn(output)``."""
    if fn is None:
        return model(input_ids=ids, use_cache=False).logits
    with patched(model, layer, fn):
        return model(input_ids=ids, use_cache=False).logits


@contextlib.contextmanager
def _forward_ad_attention(model):
    """Attention that has forward-AD formulas: SDPA's math backend, or eager for other implementations."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    impl = getattr(model.config, "_attn_implementation", "eager")
    switched = impl not in ("eager", "sdpa")
    if switched:
        model.set_attn_implementation("eager")
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        if switched:
            model.set_attn_implementation(impl)


def jvp_logits(model, layer: int, ids: torch.Tensor, direction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, J @ direction)``: one forward-mode JVP of all logits w.r.t. layer ``layer``'s output.

    ``direction`` is ``[B, ctx, d]`` (the whole sequence at once); the primal is the clean forward.
    """
    import torch.autograd.forward_ad as fwAD

    def dual(out):
        return fwAD.make_dual(out, direction.to(device=out.device, dtype=out.dtype))

    with torch.no_grad(), _forward_ad_attention(model), fwAD.dual_level():
        logits = _forward_logits(model, ids, layer, dual)
        unpacked = fwAD.unpack_dual(logits)
        primal, tangent = unpacked.primal, unpacked.tangent
        if tangent is None:  # the patched output did not reach the logits
            tangent = torch.zeros_like(primal)
        return primal.clone(), tangent.clone()


def _as_tensor_tokens(eval_tokens) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(eval_tokens) if not torch.is_tensor(eval_tokens) else eval_tokens)
    if t.ndim != 2:
        raise ValueError(f"eval_tokens must be [n_seq, ctx], got shape {tuple(t.shape)}")
    if t.shape[1] < 2:
        raise ValueError("eval_tokens need ctx >= 2 (there is no next-token prediction otherwise)")
    return t.long()


def _capture_layer(model, layer: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean logits, layer output) from one forward."""
    box: dict[str, Any] = {}

    def grab(out):
        box["x"] = out
        return out

    logits = _forward_logits(model, ids, layer, grab)
    return logits, box["x"]


@contextlib.contextmanager
def _frozen(model):
    """Parameters without ``requires_grad`` inside the block (so a backward to the hook builds no weight graph)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def clean_pass(model, layer: int, ids: torch.Tensor, pred_mask: torch.Tensor, gradient: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(logits, x, g)`` of the clean run: logits ``[B, ctx, V]``, the hook activation ``x`` ``[B, ctx, d]``
    and, if ``gradient``, ``g = dL/dx`` ``[B, ctx, d]`` with ``L = sum over the kept predictions
    (pred_mask [B, ctx-1]) of the next-token CE`` in nats (one backward pass; else ``g`` is None).

    Sequences do not interact, so ``g[b, t]`` is the gradient of sequence b's *total* CE (sum, not mean, over
    its predictions) w.r.t. its hook activation at position t; it does not depend on the batching. By
    causality it collects every prediction at positions >= t, and ``g[:, ctx-1] = 0``.
    """
    if not gradient:
        with torch.no_grad():
            logits, x = _capture_layer(model, layer, ids)
        return logits, x, None
    box: dict[str, torch.Tensor] = {}

    def leaf(out):
        box["x"] = out.detach().requires_grad_(True)
        return box["x"]

    with torch.enable_grad(), _frozen(model):
        logits = _forward_logits(model, ids, layer, leaf)
        total = next_token_ce(logits, ids)[pred_mask].sum()
        (g,) = torch.autograd.grad(total, box["x"], allow_unused=True)
    x = box["x"].detach()
    return logits.detach(), x, (torch.zeros_like(x) if g is None else g)


def random_error_rows(n_seq: int, n_rows: int) -> np.ndarray:
    """The fixed subset of eval sequences for the random-error baseline: ``min(n_rows, n_seq)`` evenly spaced
    indices ``round(linspace(0, n_seq - 1, n_rows))`` (all sequences when ``n_rows >= n_seq``; none if 0)."""
    if n_rows <= 0:
        return np.zeros(0, dtype=np.int64)
    if n_rows >= n_seq:
        return np.arange(n_seq)
    return np.unique(np.linspace(0, n_seq - 1, n_rows).round().astype(np.int64))


def random_directions(sequences: Iterable[int], ctx: int, d: int, draw: int, seed: int) -> torch.Tensor:
    """Isotropic unit vectors ``[len(sequences), ctx, d]`` (float64): a normalised standard normal per token.

    Sequence ``s`` of draw ``draw`` always gets the same directions (its generator is seeded by
    ``SeedSequence([seed, draw, s])``), whatever the batching and whichever SAE is evaluated.
    """
    out = []
    for s in sequences:
        state = int(np.random.SeedSequence([seed, draw, int(s)]).generate_state(1)[0])
        z = torch.randn(ctx, d, generator=torch.Generator().manual_seed(state), dtype=torch.float64)
        out.append(z / z.norm(dim=-1, keepdim=True))
    return torch.stack(out) if out else torch.zeros(0, ctx, d, dtype=torch.float64)


# --------------------------------------------------------------------------- the evaluator
@torch.no_grad()
def activation_statistics(model, layer: int, tokens: torch.Tensor, tok_mask: torch.Tensor, batch_sequences: int = 16,
                          twonn_points: int = 2048, seed: int = 0, progress: bool = False
                          ) -> tuple[torch.Tensor, dict[str, float]]:
    """Per model and hook, one pass that stops at the layer: ``(mean, stats)`` over the kept eval tokens.

    ``tokens`` ``[n_seq, ctx]``, ``tok_mask`` ``[n_seq, ctx]`` (True = the position counts). ``mean`` is the
    float64 per-dimension mean of ``blocks.{layer}.hook_resid_post`` (sum / N: the mean-ablation value and
    the centre of R²'s SST). ``stats`` (see :mod:`proxygap_helpers.dimensionality` for the formulas):
    ``pr_act`` (participation ratio of the activation covariance), ``twonn_dim`` (TwoNN intrinsic dimension
    of ``twonn_points`` kept positions drawn with ``seed``; ``twonn_points`` = how many were used),
    ``sst_per_token`` (= sum ||x - mean||^2 / N, the variance R² divides by), ``act_norm_mean`` (mean ||x||)
    and ``act_sq_norm_mean`` (mean ||x||^2, what ``nmse`` divides by). Raises ValueError if no token is kept.
    """
    from .progress import tqdm

    from .dimensionality import CovarianceAccumulator, subsample_positions, twonn_dimension
    from .models import resid_post

    chosen = torch.zeros(tokens.numel(), dtype=torch.bool)
    chosen[subsample_positions(tok_mask, twonn_points, seed)] = True
    chosen = chosen.view_as(tokens)
    dev = next(model.parameters()).device
    cov, total, points = CovarianceAccumulator(), None, []
    for i in tqdm(range(0, len(tokens), batch_sequences), desc="activation statistics", disable=not progress,
                  mininterval=1.0, leave=False):
        x = resid_post(model, tokens[i:i + batch_sequences].to(dev), layer)
        kept = x[tok_mask[i:i + batch_sequences].to(x.device)]
        s = kept.to(torch.float64).sum(0)
        total = s if total is None else total + s
        cov.add(kept)
        points.append(x[chosen[i:i + batch_sequences].to(x.device)].to(torch.float64).cpu())
    if cov.n == 0:
        raise ValueError("no eval tokens left after excluding special ids")
    res = cov.result()
    pts = torch.cat(points)
    return total / cov.n, {"pr_act": res["participation_ratio"], "twonn_dim": twonn_dimension(pts),
                           "twonn_points": float(len(pts)), "sst_per_token": res["sst_per_token"],
                           "act_norm_mean": res["norm_mean"], "act_sq_norm_mean": res["sq_norm_mean"]}


class _RandomErrorAccumulator:
    """Gurnee's (2024) baseline for one SAE: KL with its error spliced in vs with a random error of the same
    norm per token, over the rows of the fixed sequence subset (see :func:`evaluate_saes`)."""

    def __init__(self, draws: int):
        self.kl_sae, self.kl_random, self.n = 0.0, np.zeros(draws), 0

    def add(self, model, layer: int, ids, x, e, logits_clean, kl_sae, pred_mask, directions) -> None:
        self.kl_sae += kl_sae[pred_mask].double().sum().item()
        self.n += int(pred_mask.sum())
        norms = e.to(torch.float64).norm(dim=-1, keepdim=True)
        for draw, u in enumerate(directions):
            x_rand = (x.to(torch.float64) + norms * u.to(x.device)).to(x.dtype)
            logits = _forward_logits(model, ids, layer, lambda out: x_rand)
            self.kl_random[draw] += kl_per_prediction(logits_clean, logits)[pred_mask].double().sum().item()

    def result(self) -> dict[str, float]:
        nan = float("nan")
        if self.n == 0 or not len(self.kl_random):
            return {"kl_random": nan, "kl_random_sd": nan, "random_error_ratio": nan, "random_error_ratio_sd": nan,
                    "random_error_predictions": float(self.n)}
        kl_sae, kl_rand = self.kl_sae / self.n, self.kl_random / self.n
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = kl_sae / kl_rand
            ratio = kl_sae / kl_rand.mean()
        sd = (lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else nan)  # noqa: E731
        return {"kl_random": float(kl_rand.mean()), "kl_random_sd": sd(kl_rand), "random_error_ratio": float(ratio),
                "random_error_ratio_sd": sd(ratios), "random_error_predictions": float(self.n)}


class _SAEAccumulator:
    """Every per-SAE sum of :func:`evaluate_saes` (float64), fed one eval batch at a time."""

    def __init__(self, sae, scaler, mean: torch.Tensor, draws: int, skip: int = 0):
        from .dimensionality import CovarianceAccumulator

        self.sae, self.scaler, self.skip = sae, scaler, skip
        self.recon = ReconstructionAccumulator(center=mean)
        self.cov = CovarianceAccumulator(center=mean)
        self.random = _RandomErrorAccumulator(draws)
        self.sums = {k: 0.0 for k in ("ce_sae", "kl", "swd", "gwd", "l0")}
        self.fired: torch.Tensor | None = None

    def add(self, model, layer: int, ids, x, logits_clean, g, tok_mask, pred_mask, rows, directions,
            swd: bool) -> None:
        with torch.no_grad():
            f, x_hat = sae_reconstruct(self.sae, x, self.scaler)
            if x_hat.shape != x.shape:
                raise ValueError(f"SAE output shape {tuple(x_hat.shape)} != activation shape {tuple(x.shape)}")
            x_hat = _after(self.skip, lambda out: x_hat)(x)  # skipped positions keep x: no error there
            logits_sae = _forward_logits(model, ids, layer, lambda out: x_hat)
            self.last_ce_sae = (next_token_ce(logits_sae, ids).double() * pred_mask).sum(1).cpu()  # per sequence
            self.sums["ce_sae"] += self.last_ce_sae.sum().item()
            kl = kl_per_prediction(logits_clean, logits_sae)
            del logits_sae
            self.sums["kl"] += kl[pred_mask].double().sum().item()
            self.recon.add(x[tok_mask], x_hat[tok_mask])
            self.cov.add(x_hat[tok_mask])
            fk = f.to(x.device)[tok_mask] != 0
            self.sums["l0"] += fk.sum(-1).double().sum().item()
            hit = fk.any(0)
            self.fired = hit if self.fired is None else self.fired | hit
            e = x_hat - x
            if g is not None:
                first_order = (g.to(torch.float64) * e.to(torch.float64)).sum(-1)[:, :-1]
                self.sums["gwd"] += first_order[pred_mask].pow(2).sum().item()
            if len(rows):
                self.random.add(model, layer, ids[rows], x[rows], e[rows], logits_clean[rows], kl[rows],
                                pred_mask[rows], directions)
        if swd:
            primal, tangent = jvp_logits(model, layer, ids, e)
            self.sums["swd"] += fisher_quadratic(primal, tangent)[pred_mask].double().sum().item()

    def result(self, base: dict[str, float], swd: bool, gwd: bool) -> dict[str, float]:
        nan = float("nan")
        n_pred, n_tok = base["eval_predictions"], base["eval_tokens"]
        per_pred = lambda k: self.sums[k] / n_pred if n_pred else nan  # noqa: E731
        ce_clean, ce_zero, ce_sae = base["ce_clean"], base["ce_zero"], per_pred("ce_sae")
        rs, pr = self.recon.result(), self.cov.result()["participation_ratio"]
        return {
            **base, "ce_sae": ce_sae,
            "ce_rec_relative": 2.0 - ce_sae / ce_clean,
            "ce_rec_zero_norm": (ce_zero - ce_sae) / (ce_zero - ce_clean) if ce_zero != ce_clean else nan,
            "r2": rs["r2"], "cosine": rs["cosine"], "rel_err_norm": rs["rel_err_norm"], "kl": per_pred("kl"),
            "swd": per_pred("swd") if swd else nan,
            "l0": self.sums["l0"] / n_tok if n_tok else nan,
            "dead_frac": float(1.0 - self.fired.double().mean().item()) if self.fired is not None else nan,
            "mse": rs["mse"], "nmse": rs["mse"] / base["act_sq_norm_mean"] if base["act_sq_norm_mean"] else nan,
            "gwd": per_pred("gwd") if gwd else nan,
            **self.random.result(),
            "pr_recon": pr, "pr_recon_frac": pr / base["pr_act"],
        }


def evaluate_saes(model, layer: int, saes: Sequence, eval_tokens, batch_sequences: int = 16, swd: bool = True,
                  gwd: bool = True, random_error_draws: int = 4, random_error_sequences: int = 16,
                  twonn_points: int = 2048, seed: int = 0, exclude_special_tokens: bool = False,
                  special_ids: Iterable[int] = (), progress: bool = True,
                  activation_scalers: Sequence | None = None,
                  sequence_sums: dict | None = None, skip_positions: int = 0) -> list[dict[str, float]]:
    """All metrics of several SAEs at ``blocks.{layer}.hook_resid_post`` of one HF causal LM, on ``eval_tokens``.

    The per-model work is done once and shared by every SAE: one pass to the layer for the activation
    mean and the D3 / SST statistics (:func:`activation_statistics`), then per eval batch one clean
    forward with one backward to the hook (``g`` for ``gwd``; :func:`clean_pass`) and the zero- and
    mean-ablated forwards; then, for each SAE, its patched forward, its JVP (``swd``) and, on the rows of the
    random-error subset only, ``random_error_draws`` randomly patched forwards. Per model: ~0.5 + 3 + 2
    forward-equivalents per eval token; per SAE: ~1 + ~3 (JVP) + the SAE itself + ``random_error_draws *
    random_error_sequences / n_seq``.

    Args:
        model: an HF causal LM of a supported family (``GPTNeoXForCausalLM``, ``LlamaForCausalLM``, ...; any dtype,
            float32 expected). Put in eval mode for the call; its parameters' ``requires_grad`` are switched off
            during the backward pass and restored.
        layer: hook layer; each SAE reads and replaces the output of decoder layer ``layer``
            (``models.layer_list``).
        saes: SAEs with ``encode(x) -> f`` and ``decode(f) -> x_hat`` (SAELens ``SAE`` / ``TrainingSAE``);
            all are held in memory for the whole call.
        eval_tokens: int ids ``[n_seq, ctx]`` (numpy or torch), as they are (a BOS, where the family has one, is
            already each row's first token: ``data.pack_rows``).
        batch_sequences: sequences per forward pass. Results do not depend on it (float64 sums).
        swd: compute the Fisher ``swd`` (a JVP per batch and SAE, SDPA math backend); ``nan`` otherwise.
        gwd: compute ``gwd`` (one backward per batch, shared); ``nan`` otherwise.
        random_error_draws: random directions per token for the random-error baseline (0: off, NaNs).
        random_error_sequences: size of its fixed subset of eval sequences (:func:`random_error_rows`).
        twonn_points: kept token positions (seeded subsample) for the TwoNN dimension.
        seed: seeds the TwoNN subsample and the random directions.
        exclude_special_tokens: if true, (a) a prediction t -> t+1 is left out of CE/KL/SWD/GWD and the
            random-error KLs when its input token ``tokens[t]`` or its target ``tokens[t+1]`` is in
            ``special_ids``; (b) token positions whose id is special are left out of r2 / cosine /
            rel_err_norm / mse / l0 / dead_frac / pr_recon and of every per-model activation statistic. The
            replacements are still applied at *every* position (unlike SAELens, which leaves special
            positions un-replaced and masks CE by the input token only).
        special_ids: the ids that count as special (required when ``exclude_special_tokens``).
        progress: show a tqdm bar.
        activation_scalers: one SAELens ``ActivationScaler``-like (``scale``/``unscale``) per SAE, or None.
        skip_positions: the first positions of every row are left out of every mean (token and prediction masks,
            :func:`prediction_mask`) and are not replaced: the SAE, the zero and the mean ablation splice from
            position ``skip_positions`` on (the massive-norm BOS / attention-sink position of Llama-style models).
        sequence_sums: a dict to fill, if given, with per eval sequence float64 arrays ``[n_seq]``: the summed
            next-token CE over the sequence's kept predictions, clean (``"ce_clean"``) and zero-ablated
            (``"ce_zero"``), their count (``"predictions"``), and ``"ce_sae"``, one such array per SAE. Summed
            over sequences and divided by the predictions they are ``ce_clean``, ``ce_zero``, ``ce_sae``; a
            bootstrap over sequences resamples them (``stats.eval_noise``).

    Returns one dict per SAE, in order, keyed by :data:`METRIC_KEYS` (the module docstring defines each).
    Raises ValueError for tokens that are not ``[n_seq, ctx >= 2]``, ``batch_sequences < 1``, missing
    special ids, no kept token, or an SAE whose output shape differs from the activation's.
    """
    from .progress import tqdm

    toks = _as_tensor_tokens(eval_tokens)
    ids_special = list(special_ids) if exclude_special_tokens else []
    if exclude_special_tokens and not ids_special:
        raise ValueError("exclude_special_tokens=True needs the special ids (special_ids=...)")
    if batch_sequences < 1:
        raise ValueError(f"batch_sequences must be >= 1, got {batch_sequences}")
    scalers = list(activation_scalers) if activation_scalers is not None else [None] * len(saes)
    tok_mask_all, pred_mask_all = prediction_mask(toks, ids_special, skip_positions)
    in_subset = np.zeros(len(toks), dtype=bool)
    in_subset[random_error_rows(len(toks), random_error_sequences if random_error_draws > 0 else 0)] = True
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    try:
        mean, model_stats = activation_statistics(model, layer, toks, tok_mask_all, batch_sequences, twonn_points,
                                                  seed, progress)
        states = [_SAEAccumulator(s, sc, mean, random_error_draws, skip_positions) for s, sc in zip(saes, scalers)]
        ce = {"ce_clean": 0.0, "ce_zero": 0.0, "ce_mean_ablation": 0.0}
        per_seq = {"ce_clean": [], "ce_zero": [], "predictions": [], "ce_sae": [[] for _ in states]}
        n_pred, n_tok = 0, 0
        for i in tqdm(range(0, len(toks), batch_sequences), desc=f"evaluate L{layer} x {len(states)} SAE(s)",
                      disable=not progress, mininterval=1.0):
            ids = toks[i:i + batch_sequences].to(dev)
            tok_mask, pm = tok_mask_all[i:i + len(ids)].to(dev), pred_mask_all[i:i + len(ids)].to(dev)
            logits_clean, x, g = clean_pass(model, layer, ids, pm, gradient=gwd)
            with torch.no_grad():
                per_seq["predictions"].append(pm.double().sum(1).cpu())
                for key, fill in (("ce_clean", None), ("ce_zero", lambda out: torch.zeros_like(out)),
                                  ("ce_mean_ablation",
                                   lambda out: mean.to(device=out.device, dtype=out.dtype).expand_as(out))):
                    logits = logits_clean if fill is None else _forward_logits(model, ids, layer,
                                                                               _after(skip_positions, fill))
                    seq = (next_token_ce(logits, ids).double() * pm).sum(1)
                    ce[key] += seq.sum().item()
                    if key in per_seq:
                        per_seq[key].append(seq.cpu())
            seqs = np.flatnonzero(in_subset[i:i + len(ids)])
            directions = [random_directions(seqs + i, x.shape[1], x.shape[2], d, seed)
                          for d in range(random_error_draws)] if len(seqs) else []
            rows = torch.from_numpy(seqs).to(dev)
            for j, st in enumerate(states):
                st.add(model, layer, ids, x, logits_clean, g, tok_mask, pm, rows, directions, swd)
                per_seq["ce_sae"][j].append(st.last_ce_sae)
            n_pred += int(pm.sum())
            n_tok += int(tok_mask.sum())
    finally:
        model.train(was_training)
    nan = float("nan")
    base = {**{k: (v / n_pred if n_pred else nan) for k, v in ce.items()}, **model_stats,
            "eval_tokens": float(n_tok), "eval_predictions": float(n_pred)}
    results = [st.result(base, swd, gwd) for st in states]
    if sequence_sums is not None:
        cat = lambda parts: torch.cat(parts).numpy() if parts else np.zeros(0)  # noqa: E731
        sequence_sums.update({k: cat(per_seq[k]) for k in ("ce_clean", "ce_zero", "predictions")},
                             ce_sae=[cat(parts) for parts in per_seq["ce_sae"]])
    return [{k: float(r[k]) for k in METRIC_KEYS} for r in results]


def evaluate_sae(model, layer: int, sae, eval_tokens, *, activation_scaler=None, **options) -> dict[str, float]:
    """All metrics of one SAE: :func:`evaluate_saes` with ``[sae]`` (same options, same keys)."""
    return evaluate_saes(model, layer, [sae], eval_tokens, activation_scalers=[activation_scaler], **options)[0]
