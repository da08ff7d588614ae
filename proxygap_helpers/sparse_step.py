"""The sparse TopK SAE training step: a dense encoder GEMM, then only O(batch x k x d_in) work.

SAE semantics are SAELens 6.54's ``TopKTrainingSAE`` with ``rescale_acts_by_decoder_norm=True`` and
``apply_b_dec_to_input=True`` (DESIGN.md, "The SAE engine"). For a batch ``x_s`` of *scaled* activations
``[B, d_in]`` (the activation scaler applied), decoder row norms ``n_j = ||W_dec[j]||`` and ``c = x_s - b_dec``:

* ``hidden = c @ (W_enc * n).T + b_enc * n`` ``[B, d_sae]`` -- SAELens' ``hidden_pre * W_dec.norm()``, the one
  dense GEMM; the top ``k`` entries of each row are the active set ``S_b``;
* codes ``v_bj = relu(hidden_bj) / n_j = relu(pre_bj)`` for ``j in S_b`` with ``pre = c @ W_enc.T + b_enc``;
* ``x_hat_b = sum_{j in S_b} v_bj W_dec[j] + b_dec`` (a sparse decode: ``embedding_bag``);
* AuxK (Gao et al. 2024, SAELens' ``calculate_topk_aux_loss``): over the dead latents ``D`` (``|D| > 0``),
  ``k_aux = min(d_in // 2, |D|)``, ``scale = min(|D| / (d_in // 2), 1)``; the top ``k_aux`` dead latents of
  ``hidden`` with their *un-rectified* values ``pre_bj`` reconstruct the detached residual ``x_s - x_hat``
  without bias: ``aux = coef * scale * mean_b ||sum_{j in A_b} pre_bj W_dec[j] - (x_s - x_hat)_b||^2``
  (AuxK's size and a variance normalisation as Gao et al.'s are options: :func:`aux_k`, :func:`aux_loss`).
* loss ``= mean_b ||x_hat_b - x_s_b||^2 + aux``.

Since ``n_j > 0``, ``relu(pre_j n_j) / n_j = relu(pre_j)``: the decoder norms only decide *which* latents are
selected; the value and every gradient are those of the formula above, and SAELens' gradient through ``n``
cancels exactly (its two terms are ``+relu(pre)/n`` and ``-relu(pre)/n``). :class:`SparseTopK` is encoder
and decoder as one ``torch.autograd.Function`` whose backward touches only the selected latents of each row
(the idea of EleutherAI sparsify's ``FusedEncoder``, extended to the decoder and AuxK):
``dW_enc[j] += dv_bj c_b``, ``db_enc[j] += dv_bj``, ``dc_b = sum_j dv_bj W_enc[j]``, ``dW_dec[j] += v_bj g_b``,
``dv_bj = <g_b, W_dec[j]>``. ``tests/test_engine.py`` checks it against autograd of the dense formula in
float64 and by finite differences, and the whole step against SAELens' ``TopKTrainingSAE``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .topk_pairs import aux_code_grad, stack_pairs


class SparseTopK(torch.autograd.Function):
    """Encoder and decoder of a TopK SAE as one Function whose backward touches only the selected latents.

    Forward args: ``c [B, d_in]`` (centred, scaled input), ``W_enc [d_sae, d_in]`` (one row per latent, the
    transpose of SAELens' ``W_enc``), ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``dec_norm [d_sae]``
    (``||W_dec[j]||``, no gradient), ``k``, ``dead_ids`` (int64 indices of dead latents, possibly empty),
    ``k_aux`` and ``dense_aux`` (the AuxK term as dense GEMMs over the dead latents: ``_add_dense_aux``).
    Returns ``recon [B, d_in]`` (``sum_{j in S_b} v_bj W_dec[j]``, no bias), ``aux_recon [B, d_in]``
    (``sum_{j in A_b} pre_bj W_dec[j]``: AuxK's, zeros when ``k_aux == 0``), and, without gradient, ``v [B, k]``
    (``relu(pre)`` of the selected latents) and ``idx [B, k]``.

    Backward, with ``g = dL/drecon`` and ``g_aux = dL/daux_recon``: ``dv_bj = <g_b, W_dec[j]>`` (0 where
    ``v_bj == 0``: the ReLU), ``da_bj = <g_aux_b, W_dec[j]>``; then per latent ``j``: ``dW_dec[j] = sum v_bj g_b +
    sum pre_bj g_aux_b``, ``dW_enc[j] = sum (dv_bj + da_bj) c_b``, ``db_enc[j] = sum (dv_bj + da_bj)``; and
    ``dc_b = sum_j (dv_bj + da_bj) W_enc[j]``. The per-latent sums run over the (row, latent) pairs sorted by
    latent (one stable sort, shared by both weight gradients) as ``embedding_bag`` sums, which is several times
    faster on a CPU than ``index_add_`` and deterministic.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, c, W_enc, b_enc, W_dec, dec_norm, k: int, dead_ids, k_aux: int, dense_aux: bool,
                aux_relu: bool = False):
        hidden = torch.addmm(b_enc * dec_norm, c, (W_enc * dec_norm[:, None]).t())
        top, idx = topk_rows(hidden, k)
        v = (top / dec_norm[idx]).relu_()
        recon = F.embedding_bag(idx, W_dec, per_sample_weights=v, mode="sum")
        local = idx.new_empty((c.shape[0], 0))
        if k_aux > 0:
            dead_top, local = topk_rows(hidden.index_select(1, dead_ids), k_aux)
            aux_idx = dead_ids[local]
            aux_v = dead_top / dec_norm[aux_idx]
            if aux_relu:  # sparsify's and dictionary_learning's AuxK codes: post-ReLU, as the main term's
                aux_v = aux_v.relu()
            if dense_aux:
                aux_recon = (_dense_rows(local, aux_v, len(dead_ids)) @ W_dec.index_select(0, dead_ids)).to(recon.dtype)
            else:
                aux_recon = F.embedding_bag(aux_idx, W_dec, per_sample_weights=aux_v, mode="sum")
        else:
            aux_idx, aux_v = idx.new_empty((c.shape[0], 0)), v.new_empty((c.shape[0], 0))
            aux_recon = torch.zeros_like(recon)
        ctx.save_for_backward(c, W_enc, W_dec, idx, v, aux_idx, aux_v, dead_ids, local)
        ctx.dense_aux = dense_aux and k_aux > 0
        ctx.aux_relu = aux_relu
        ctx.mark_non_differentiable(v, idx)
        return recon, aux_recon, v, idx

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g, g_aux, _gv, _gidx):
        c, W_enc, W_dec, idx, v, aux_idx, aux_v, dead_ids, local = ctx.saved_tensors
        dv = _rowdot(W_dec, idx, g) * (v > 0)
        if ctx.dense_aux:
            grads = _sparse_grads(c, W_enc, *stack_pairs(idx, v, dv, g, aux_idx, aux_v, None, None, False))
            return (*_add_dense_aux(grads, c, W_enc, W_dec, g_aux, dead_ids, local, aux_v, ctx.aux_relu), None, None,
                    None, None, None, None)
        da = _rowdot(W_dec, aux_idx, g_aux) if aux_idx.shape[1] else None
        return (*_sparse_grads(c, W_enc, *stack_pairs(idx, v, dv, g, aux_idx, aux_v, da, g_aux, ctx.aux_relu)),
                None, None, None, None, None, None)


def _sparse_grads(c, W_enc, idx_all, d_all, vals_all, g_rows, dec_rows):
    """``(grad_c, grad_W_enc, grad_b_enc, grad_W_dec)`` over the (row, latent) pairs ``idx_all [B, K]``: their
    codes ``vals_all``, code gradients ``d_all`` and the rows ``dec_rows`` of ``g_rows`` that their decoder
    gradients take; the pairs are sorted by latent once and summed per latent with ``embedding_bag``."""
    B = idx_all.shape[0]
    flat = idx_all.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offsets = torch.zeros(W_enc.shape[0], dtype=torch.long, device=c.device)
    offsets[1:] = torch.bincount(flat, minlength=W_enc.shape[0]).cumsum(0)[:-1]
    enc_rows = (torch.arange(B, device=c.device)[:, None].expand_as(idx_all)).reshape(-1)[order]
    d_sorted = d_all.reshape(-1)[order]
    grad_W_enc = F.embedding_bag(enc_rows, c, offsets, per_sample_weights=d_sorted, mode="sum")
    grad_W_dec = F.embedding_bag(dec_rows.reshape(-1)[order], g_rows, offsets,
                                 per_sample_weights=vals_all.reshape(-1)[order], mode="sum")
    grad_b_enc = torch.zeros(W_enc.shape[0], dtype=d_all.dtype, device=c.device).index_add_(0, flat, d_all.reshape(-1))
    grad_c = F.embedding_bag(idx_all, W_enc, per_sample_weights=d_all, mode="sum")
    return grad_c, grad_W_enc, grad_b_enc, grad_W_dec


def _dense_rows(local: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, n]`` zeros with ``values [B, K]`` at columns ``local [B, K]`` (distinct per row)."""
    return values.new_zeros((local.shape[0], n)).scatter_(1, local, values)


def _add_dense_aux(grads, c, W_enc, W_dec, g_aux, dead_ids, local, aux_v, aux_relu: bool = False):
    """AuxK's gradients as dense GEMMs over the ``n`` dead latents, added to the main term's ``grads``: with
    ``A [B, n]`` the AuxK codes (``aux_v`` at columns ``local``) and ``D [B, n]`` their gradients
    ``<g_aux_b, W_dec[j]>`` there, ``dW_dec[dead] += A^T g_aux``, ``dW_enc[dead] += D^T c``, ``db_enc[dead] += sum_b D``
    and ``dc += D W_enc[dead]``. The same sums as the sparse path; on a GPU with ``k_aux = d_in / 2`` latents per
    row they are far cheaper as GEMMs than as gathers (``reports/gpu_check.md``)."""
    grad_c, grad_W_enc, grad_b_enc, grad_W_dec = grads
    n = len(dead_ids)
    W_dead = W_dec.index_select(0, dead_ids)
    A = _dense_rows(local, aux_v.to(g_aux.dtype), n)
    da = (g_aux @ W_dead.t()).gather(1, local)
    D = _dense_rows(local, aux_code_grad(da, aux_v, aux_relu), n)
    grad_W_dec = grad_W_dec.index_add(0, dead_ids, (A.t() @ g_aux).to(grad_W_dec.dtype))
    grad_W_enc = grad_W_enc.index_add(0, dead_ids, (D.t() @ c).to(grad_W_enc.dtype))
    grad_b_enc = grad_b_enc.index_add(0, dead_ids, D.sum(0).to(grad_b_enc.dtype))
    grad_c = grad_c + (D @ W_enc.index_select(0, dead_ids)).to(grad_c.dtype)
    return grad_c, grad_W_enc, grad_b_enc, grad_W_dec


def topk_rows(x: torch.Tensor, k: int, block: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.topk(k, dim=1, sorted=False)`` of a ``[B, n]`` matrix, exactly (the same values; among equal values
    any index may be chosen), 1.3-2x faster on a CPU for the shapes of an SAE step.

    The ``n`` columns are cut into ``G = ceil(n / block)`` strided groups (column ``j`` in group ``j % G``,
    ``-inf`` padding). The k groups with the largest maxima hold the row's top k: there are k elements at
    least as large as the k-th largest group maximum, and every element outside those groups is at most that
    maximum. So one pass (a vectorised elementwise max over ``block`` slices), a top-k over the G maxima and
    a top-k over the ``k * block`` candidates replace the top-k over all ``n``. Falls back to ``torch.topk``
    when ``G < 2k`` (no saving) or off the CPU.
    """
    B, n = x.shape
    G = -(-n // block)
    if x.device.type != "cpu" or G < 2 * k:
        return x.topk(k, dim=1, sorted=False)
    if G * block != n:
        x = F.pad(x, (0, G * block - n), value=-torch.inf)
    groups = x.view(B, block, G)
    chosen = groups.amax(1).topk(k, dim=1, sorted=False).indices           # [B, k] group numbers
    cand = groups.gather(2, chosen.unsqueeze(1).expand(B, block, k)).reshape(B, block * k)
    values, j = cand.topk(k, dim=1, sorted=False)
    return values, (j // k) * G + chosen.gather(1, j % k)


def _rowdot(W: torch.Tensor, idx: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``out[b, j] = <W[idx[b, j]], g[b]>`` -> ``[B, K]``.

    The kernel that computes ``embedding_bag``'s gradient with respect to ``per_sample_weights`` is exactly this
    sum, without gathering ``W[idx]`` (8x faster on a CPU than ``bmm`` over the gathered rows). It is an ATen op
    (``_embedding_bag_per_sample_weights_backward``, in torch since 1.x), not a documented Python API; the tests
    pin its result against the dense formula."""
    B, K = idx.shape
    bags = torch.arange(B, device=idx.device)
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        g, W, idx.reshape(-1), bags * K, bags.repeat_interleave(K), 0, -1).view(B, K)


@dataclass
class StepOutput:
    """What one forward of :func:`sparse_forward` returns (``loss`` is differentiable)."""

    loss: torch.Tensor
    mse_loss: torch.Tensor
    aux_loss: torch.Tensor
    v: torch.Tensor         # [B, k] codes of the selected latents (0 where relu cut them)
    idx: torch.Tensor       # [B, k] selected latents
    x_hat: torch.Tensor     # [B, d_in] reconstruction of the scaled input


def aux_k(d_in: int, n_dead: int, size: int | str = "half_d_in") -> tuple[int, float]:
    """AuxK's size and scale over ``n_dead`` dead latents. ``size`` ``half_d_in`` (SAELens, sparsify): ``k_aux =
    min(d_in // 2, n_dead)``, ``scale = min(n_dead / (d_in // 2), 1)``; a number ``m`` (Gao et al.: 256): the
    same with ``m`` for ``d_in // 2``; ``all_dead``: ``k_aux = n_dead``, ``scale = 1``."""
    target = d_in // 2 if size == "half_d_in" else n_dead if size == "all_dead" else int(size)
    return min(target, n_dead), min(n_dead / target, 1.0)


def aux_loss(aux_recon: torch.Tensor, residual: torch.Tensor, x_s: torch.Tensor, coefficient: float, scale: float,
             normalization: str = "none") -> torch.Tensor:
    """AuxK's loss: ``coefficient * scale * mean_b ||aux_recon_b - residual_b||^2`` (SAELens, ``normalization``
    ``none``), or with that error divided by the residual's variance ``sum_b ||e_b - mean(e)||^2`` as Gao et al.
    (2024) and sparsify normalise it (``residual_variance``), times the batch's ``sum_b ||x_b - mean(x)||^2`` so the
    term sits on the main loss's scale: then ``coefficient`` weighs it against the FVU as Gao et al.'s 1/32 does.
    Both variances are constants (no gradient). Shapes ``[B, d_in]``; returns a scalar."""
    err = (aux_recon - residual).pow(2).sum(-1).mean()
    if normalization == "residual_variance":
        with torch.no_grad():
            ratio = (x_s - x_s.mean(0)).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
        err = err * ratio
    return coefficient * scale * err


def sparse_forward(x_s: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
                   b_dec: torch.Tensor, k: int, dead_ids: torch.Tensor | None = None,
                   aux_coefficient: float = 0.0, dense_aux: bool | None = None, kernel: str = "torch",
                   precision: str = "fp32", k_aux: int | str = "half_d_in",
                   aux_normalization: str = "none", aux_rectified: bool = False) -> StepOutput:
    """Loss of one TopK SAE on scaled activations ``x_s [B, d_in]`` (module docstring for the formulas).

    ``W_enc`` is ``[d_sae, d_in]`` (rows per latent), ``W_dec`` ``[d_sae, d_in]``; ``dead_ids`` are the dead
    latents' indices (None or empty: no AuxK term). ``dense_aux``: the AuxK term as dense GEMMs over the dead
    latents instead of gathers of its ``k_aux`` latents per row (the same sums; default: on CUDA, where the
    gathers cost 5x the whole step without AuxK, ``reports/gpu_check.md``; on a CPU the gathers are cheaper).
    ``kernel``: ``torch`` (:class:`SparseTopK`) or ``triton`` (:class:`triton_step.TritonTopK`, which applies
    ``precision`` to its GEMM itself; ``dense_aux`` is the torch path's). ``k_aux`` and ``aux_normalization``: AuxK's
    size (:func:`aux_k`) and error normalisation (:func:`aux_loss`); ``aux_rectified``: AuxK's codes through the
    ReLU (``relu(pre_bj)``, as sparsify and dictionary_learning; SAELens uses ``pre_bj`` itself).
    """
    with torch.no_grad():
        dec_norm = W_dec.norm(dim=-1)
    n_dead = 0 if dead_ids is None else int(dead_ids.numel())
    k_aux, scale = aux_k(x_s.shape[1], n_dead, k_aux) if n_dead and aux_coefficient > 0 else (0, 0.0)
    if dead_ids is None:
        dead_ids = torch.empty(0, dtype=torch.long, device=x_s.device)
    c = x_s - b_dec
    if kernel == "triton":
        from .triton_step import TritonTopK

        recon, aux_recon, v, idx = TritonTopK.apply(c, W_enc, b_enc, W_dec, dec_norm, k, dead_ids, k_aux, precision,
                                                    aux_rectified)
    else:
        dense_aux = x_s.is_cuda if dense_aux is None else dense_aux
        recon, aux_recon, v, idx = SparseTopK.apply(c, W_enc, b_enc, W_dec, dec_norm, k, dead_ids, k_aux, dense_aux,
                                                    aux_rectified)
    x_hat = recon + b_dec
    mse = (x_hat - x_s).pow(2).sum(-1).mean()
    if k_aux:
        aux = aux_loss(aux_recon, (x_s - x_hat).detach(), x_s, aux_coefficient, scale, aux_normalization)
    else:
        aux = mse.new_zeros(())
    return StepOutput(mse + aux, mse, aux, v, idx, x_hat)


@torch.no_grad()
def encode_decode(x_s: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
                  b_dec: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inference: ``(v [B, k], idx [B, k], x_hat [B, d_in])`` for scaled activations (no AuxK, no graph)."""
    dec_norm = W_dec.norm(dim=-1)
    hidden = torch.addmm(b_enc * dec_norm, x_s - b_dec, (W_enc * dec_norm[:, None]).t())
    top, idx = topk_rows(hidden, k)
    v = (top / dec_norm[idx]).relu_()
    return v, idx, F.embedding_bag(idx, W_dec, per_sample_weights=v, mode="sum") + b_dec
