"""Metrics of one SAE spliced into one model: behaviour (CE, KL), geometry (SWD) and reconstruction proxies.

Everything is computed on the HF fast path (``GPTNeoXForCausalLM`` with a forward hook on
``gpt_neox.layers[L]``, whose output is ``blocks.L.hook_resid_post``); the tests check it against
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

``eval_tokens`` counts the token positions that enter r2 / cosine / rel_err_norm / l0 / dead_frac and
the ablation mean; ``eval_predictions`` counts the predictions that enter CE / KL / SWD.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from .models import patched

METRIC_KEYS = ("ce_clean", "ce_sae", "ce_zero", "ce_mean_ablation", "ce_rec_relative", "ce_rec_zero_norm",
               "r2", "cosine", "rel_err_norm", "kl", "swd", "l0", "dead_frac", "eval_tokens",
               "eval_predictions")


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


def prediction_mask(tokens: torch.Tensor, special_ids: Iterable[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """(token mask ``[B, ctx]``, prediction mask ``[B, ctx-1]``) excluding special ids.

    A token position is kept iff its id is not special; a prediction t -> t+1 is kept iff both its input
    token ``tokens[t]`` and its target ``tokens[t+1]`` are not special. No special ids: all True.
    """
    ids = list(special_ids)
    if not ids:
        tok = torch.ones_like(tokens, dtype=torch.bool)
    else:
        tok = ~torch.isin(tokens, torch.tensor(ids, dtype=tokens.dtype, device=tokens.device))
    return tok, tok[:, :-1] & tok[:, 1:]


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


# --------------------------------------------------------------------------- the evaluator
@torch.no_grad()
def activation_mean(model, layer: int, eval_tokens, batch_sequences: int = 16, special_ids: Iterable[int] = (),
                    progress: bool = False) -> torch.Tensor:
    """float64 per-dimension mean of ``blocks.{layer}.hook_resid_post`` over the eval tokens (special ids left out)."""
    from tqdm.auto import tqdm

    from .models import resid_post

    toks = _as_tensor_tokens(eval_tokens)
    dev = next(model.parameters()).device
    total, n = None, 0
    for i in tqdm(range(0, len(toks), batch_sequences), desc="activation mean", disable=not progress,
                  mininterval=1.0, leave=False):
        ids = toks[i:i + batch_sequences].to(dev)
        tok_mask, _ = prediction_mask(ids, special_ids)
        x = resid_post(model, ids, layer)[tok_mask].to(torch.float64)
        s = x.sum(0)
        total = s if total is None else total + s
        n += x.shape[0]
    if n == 0:
        raise ValueError("no eval tokens left after excluding special ids")
    return total / n


def evaluate_sae(model, layer: int, sae, eval_tokens, batch_sequences: int = 16, swd: bool = True,
                 exclude_special_tokens: bool = False, special_ids: Iterable[int] = (), progress: bool = True,
                 activation_scaler=None) -> dict[str, float]:
    """All metrics of one SAE at ``blocks.{layer}.hook_resid_post`` of an HF GPT-NeoX, on ``eval_tokens``.

    Args:
        model: ``GPTNeoXForCausalLM`` in eval mode (any dtype; float32 expected; not modified).
        layer: hook layer; the SAE reads and replaces the output of ``model.gpt_neox.layers[layer]``.
        sae: anything with ``encode(x) -> f`` and ``decode(f) -> x_hat`` (a SAELens ``SAE`` or
            ``TrainingSAE``); raw activations go in, unless ``activation_scaler`` (SAELens
            ``ActivationScaler``-like: ``scale``/``unscale``) is given.
        eval_tokens: int ids ``[n_seq, ctx]`` (numpy or torch). No BOS is prepended.
        batch_sequences: sequences per forward pass. Results do not depend on it (float64 sums).
        swd: compute the SWD (one extra forward-mode JVP pass per batch, run with SDPA's math backend, or
            eager attention, because the fused kernels have no forward-AD formula); ``nan`` otherwise.
        exclude_special_tokens: if true, (a) a prediction t -> t+1 is left out of CE/KL/SWD when its input
            token ``tokens[t]`` or its target ``tokens[t+1]`` is in ``special_ids``; (b) token positions whose
            id is special are left out of r2/cosine/rel_err_norm/l0/dead_frac and of the ablation mean. The
            SAE / zero / mean replacement is still applied at *every* position (unlike SAELens, which
            leaves special positions un-replaced and masks CE by the input token only).
        special_ids: the ids that count as special (required when ``exclude_special_tokens``).
        progress: show a tqdm bar.

    Two passes: (1) the float64 mean of the hook activation over the eval tokens (forward stops at the
    layer); (2) per batch: clean forward (captures ``x``), SAE / zero / mean-patched forwards, and, if
    ``swd``, one JVP forward with direction ``e = x_hat - x`` (see the module docstring for every formula).

    Returns floats keyed by :data:`METRIC_KEYS`: ``ce_clean, ce_sae, ce_zero, ce_mean_ablation,
    ce_rec_relative, ce_rec_zero_norm, r2, cosine, rel_err_norm, kl, swd, l0, dead_frac, eval_tokens,
    eval_predictions``.
    """
    from tqdm.auto import tqdm

    toks = _as_tensor_tokens(eval_tokens)
    ids_special = list(special_ids) if exclude_special_tokens else []
    if exclude_special_tokens and not ids_special:
        raise ValueError("exclude_special_tokens=True needs the special ids (special_ids=...)")
    if batch_sequences < 1:
        raise ValueError(f"batch_sequences must be >= 1, got {batch_sequences}")
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    try:
        mean = activation_mean(model, layer, toks, batch_sequences, ids_special, progress)
        recon = ReconstructionAccumulator(center=mean)
        sums = {k: 0.0 for k in ("ce_clean", "ce_sae", "ce_zero", "ce_mean_ablation", "kl", "swd")}
        n_pred, n_tok, l0_sum = 0, 0, 0.0
        fired: torch.Tensor | None = None
        starts = range(0, len(toks), batch_sequences)
        for i in tqdm(starts, desc=f"evaluate L{layer}", disable=not progress, mininterval=1.0):
            ids = toks[i:i + batch_sequences].to(dev)
            tok_mask, pred_mask = prediction_mask(ids, ids_special)
            with torch.no_grad():
                logits_clean, x = _capture_layer(model, layer, ids)
                f, x_hat = sae_reconstruct(sae, x, activation_scaler)
                if x_hat.shape != x.shape:
                    raise ValueError(f"SAE output shape {tuple(x_hat.shape)} != activation shape {tuple(x.shape)}")
                logits_sae = _forward_logits(model, ids, layer, lambda out: x_hat)
                logits_zero = _forward_logits(model, ids, layer, lambda out: torch.zeros_like(out))
                logits_mean = _forward_logits(model, ids, layer,
                                              lambda out: mean.to(device=out.device, dtype=out.dtype).expand_as(out))

                pm = pred_mask
                sums["ce_clean"] += next_token_ce(logits_clean, ids)[pm].double().sum().item()
                sums["ce_sae"] += next_token_ce(logits_sae, ids)[pm].double().sum().item()
                sums["ce_zero"] += next_token_ce(logits_zero, ids)[pm].double().sum().item()
                sums["ce_mean_ablation"] += next_token_ce(logits_mean, ids)[pm].double().sum().item()
                sums["kl"] += kl_per_prediction(logits_clean, logits_sae)[pm].double().sum().item()
                del logits_sae, logits_zero, logits_mean
                n_pred += int(pm.sum())

                recon.add(x[tok_mask], x_hat[tok_mask])
                fk = f.to(x.device)[tok_mask] != 0
                l0_sum += fk.sum(-1).double().sum().item()
                hit = fk.any(0)
                fired = hit if fired is None else fired | hit
                n_tok += int(tok_mask.sum())

            if swd:
                primal, tangent = jvp_logits(model, layer, ids, x_hat - x)
                sums["swd"] += fisher_quadratic(primal, tangent)[pm].double().sum().item()
                del primal, tangent
    finally:
        model.train(was_training)

    nan = float("nan")
    ce = {k: (sums[k] / n_pred if n_pred else nan) for k in ("ce_clean", "ce_sae", "ce_zero", "ce_mean_ablation")}
    rs = recon.result()
    out = {
        **ce,
        "ce_rec_relative": 2.0 - ce["ce_sae"] / ce["ce_clean"],
        "ce_rec_zero_norm": (ce["ce_zero"] - ce["ce_sae"]) / (ce["ce_zero"] - ce["ce_clean"])
        if ce["ce_zero"] != ce["ce_clean"] else nan,
        "r2": rs["r2"], "cosine": rs["cosine"], "rel_err_norm": rs["rel_err_norm"],
        "kl": sums["kl"] / n_pred if n_pred else nan,
        "swd": (sums["swd"] / n_pred if n_pred else nan) if swd else nan,
        "l0": l0_sum / n_tok if n_tok else nan,
        "dead_frac": float(1.0 - fired.double().mean().item()) if fired is not None else nan,
        "eval_tokens": float(n_tok),
        "eval_predictions": float(n_pred),
    }
    return {k: float(out[k]) for k in METRIC_KEYS}

