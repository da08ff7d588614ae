"""The TopK SAE step as Triton kernels (``sae.kernel: triton``), behind :class:`sparse_step.SparseTopK`'s contract.

The formulas are :mod:`proxygap_helpers.sparse_step`'s (SAELens' ``TopKTrainingSAE`` semantics); only the passes
that cost memory bandwidth on a GPU change:

* **Encode with a block-max epilogue** (:func:`encode`): one tiled GEMM writes ``hidden = (c W_enc^T + b_enc) * n``
  ``[B, d_sae]`` and, from the same registers, the maximum of every group of :data:`GROUP` consecutive columns
  ``[B, d_sae / GROUP]``. The ``k`` groups with the largest maxima hold a row's exact top ``k`` (``k`` elements are
  at least the ``k``-th chosen maximum, and no element outside the chosen groups exceeds it), so the top-k reads
  ``k * GROUP`` candidates a row instead of a second full pass over ``hidden`` (:func:`topk_from_groups`).
  The idea is OpenAI ``sparse_autoencoder``'s and sparsify's block-wise top-k; the kernel is ours.
* **Sparse decode** ``out_b = sum_j w_bj W[idx_bj]`` (:func:`gather_rows`): the reconstruction, AuxK's, and the
  input gradient ``dc_b = sum_j d_bj W_enc[idx_bj]``.
* **Dense-dense with sparse output** ``out_bj = <W[idx_bj], g_b>`` (:func:`rowdot`): the code gradients.
* **Sparse-transpose-dense** ``out_j = sum_{(b, j)} w_bj X_b`` (:func:`segment_sum`): both weight gradients and the
  encoder bias gradient, over the (row, latent) pairs sorted by latent (one stable sort, no atomics: deterministic).

Precision: ``fp32`` runs the GEMM in IEEE fp32, ``tf32`` in TF32, ``bf16`` casts ``c`` and ``W_enc`` to bf16 for the
GEMM (``hidden`` stored in bf16); every kernel accumulates in fp32 and the weights and their gradients stay fp32.
Without CUDA the kernels run under Triton's interpreter (``TRITON_INTERPRET=1`` before this module is imported),
in fp32: that is how ``tests/test_triton_step.py`` checks them against the torch path and the float64 formula.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .topk_pairs import stack_pairs

GROUP = 16  # columns per block-max group of the encode epilogue
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DOT_PRECISION = {"fp32": "ieee", "tf32": "tf32", "bf16": "ieee"}


@triton.jit
def _encode_kernel(c_ptr, w_ptr, b_ptr, n_ptr, h_ptr, g_ptr, B, N, NP, D, s_c, s_w, s_h, s_g,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                   PRECISION: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < B, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < D
        a = tl.load(c_ptr + rm[:, None] * s_c + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rn[None, :] * s_w + rk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    norm = tl.load(n_ptr + rn, mask=n_ok, other=1.0)
    bias = tl.load(b_ptr + rn, mask=n_ok, other=0.0)
    h = ((acc + bias[None, :]) * norm[None, :]).to(h_ptr.dtype.element_ty)
    h = tl.where(n_ok[None, :], h, float("-inf"))  # padding columns up to a whole group never win
    tl.store(h_ptr + rm[:, None] * s_h + rn[None, :], h, mask=m_ok[:, None] & (rn < NP)[None, :])
    gmax = tl.max(tl.reshape(h.to(tl.float32), (BLOCK_M, BLOCK_N // GROUP, GROUP)), axis=2)
    rg = tl.program_id(1) * (BLOCK_N // GROUP) + tl.arange(0, BLOCK_N // GROUP)
    tl.store(g_ptr + rm[:, None] * s_g + rg[None, :], gmax, mask=m_ok[:, None] & (rg < NP // GROUP)[None, :])


@triton.jit
def _gather_rows_kernel(idx_ptr, w_ptr, W_ptr, out_ptr, K, D, s_W,
                        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = rd < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        ids = tl.load(idx_ptr + b * K + rk, mask=k_ok, other=0)
        w = tl.load(w_ptr + b * K + rk, mask=k_ok, other=0.0).to(tl.float32)
        rows = tl.load(W_ptr + ids[:, None] * s_W + rd[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(w[:, None] * rows.to(tl.float32), axis=0)
    tl.store(out_ptr + b * D + rd, acc, mask=d_ok)


@triton.jit
def _rowdot_kernel(idx_ptr, W_ptr, g_ptr, out_ptr, K, D, s_W, s_g,
                   BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = rk < K
    ids = tl.load(idx_ptr + b * K + rk, mask=k_ok, other=0)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        d_ok = rd < D
        rows = tl.load(W_ptr + ids[:, None] * s_W + rd[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        g = tl.load(g_ptr + b * s_g + rd, mask=d_ok, other=0.0)
        acc += tl.sum(rows.to(tl.float32) * g.to(tl.float32)[None, :], axis=1)
    tl.store(out_ptr + b * K + rk, acc, mask=k_ok)


@triton.jit
def _segment_sum_kernel(rows_ptr, w_ptr, X_ptr, start_ptr, out_ptr, sum_ptr, D, s_X,
                        BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    j = tl.program_id(0)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = rd < D
    lo = tl.load(start_ptr + j)
    hi = tl.load(start_ptr + j + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    total = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for p0 in range(lo, hi, BLOCK_P):
        rp = p0 + tl.arange(0, BLOCK_P)
        p_ok = rp < hi
        r = tl.load(rows_ptr + rp, mask=p_ok, other=0)
        w = tl.load(w_ptr + rp, mask=p_ok, other=0.0).to(tl.float32)
        x = tl.load(X_ptr + r[:, None] * s_X + rd[None, :], mask=p_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(w[:, None] * x.to(tl.float32), axis=0)
        total += w
    tl.store(out_ptr + j * D + rd, acc, mask=d_ok)
    tl.store(sum_ptr + j, tl.sum(total, axis=0), mask=tl.program_id(1) == 0)


def _blocks(n: int, cap: int) -> int:
    """The power of two that covers ``n`` (at least 16: ``tl.dot``'s minimum), at most ``cap``."""
    return max(16, min(cap, triton.next_power_of_2(n)))


def encode(c: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, dec_norm: torch.Tensor,
           precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden [B, G * GROUP], gmax [B, G])`` with ``G = ceil(d_sae / GROUP)``: SAELens' ``hidden_pre`` times
    the decoder norms, ``(c @ W_enc.T + b_enc) * dec_norm`` for ``c [B, d_in]``, ``W_enc [d_sae, d_in]``, its
    padding columns ``-inf``, and each group's maximum. ``precision`` (``sae.precision``) picks the GEMM's inputs:
    fp32 (IEEE), tf32 or bf16 (``hidden`` then bf16); the accumulation is fp32."""
    if precision == "bf16":
        c, W_enc = c.to(torch.bfloat16), W_enc.to(torch.bfloat16)
        if INTERPRET:  # the interpreter has no bf16: the same rounded inputs, held in fp32 (hidden stays fp32)
            c, W_enc = c.float(), W_enc.float()
    c, W_enc = c.contiguous(), W_enc.contiguous()
    (B, D), N = c.shape, W_enc.shape[0]
    G = triton.cdiv(N, GROUP)
    hidden = torch.empty((B, G * GROUP), dtype=c.dtype, device=c.device)
    gmax = torch.empty((B, G), dtype=torch.float32, device=c.device)
    bm, bn, bk = (_blocks(B, 32), _blocks(G * GROUP, 32), _blocks(D, 32)) if INTERPRET else (64, 128, 32)
    grid = (triton.cdiv(B, bm), triton.cdiv(G * GROUP, bn))
    _encode_kernel[grid](c, W_enc, b_enc.float().contiguous(), dec_norm.float().contiguous(), hidden, gmax,
                         B, N, G * GROUP, D, c.stride(0), W_enc.stride(0), hidden.stride(0), gmax.stride(0),
                         BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP=GROUP, PRECISION=_DOT_PRECISION[precision],
                         **({} if INTERPRET else {"num_warps": 4, "num_stages": 3}))
    return hidden, gmax


def topk_from_groups(hidden: torch.Tensor, gmax: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact row-wise top ``k`` of ``hidden [B, G * GROUP]`` (values, column indices; unsorted; among equal
    values any index may be chosen) from the ``k`` groups with the largest maxima ``gmax [B, G]``: ``k * GROUP``
    candidates a row. Falls back to ``torch.topk`` when ``G < 2k`` (no saving)."""
    B, G = gmax.shape
    if G < 2 * k:
        return hidden.topk(k, dim=1, sorted=False)
    chosen = gmax.topk(k, dim=1, sorted=False).indices                                        # [B, k] groups
    cand = hidden.view(B, G, GROUP).gather(1, chosen[:, :, None].expand(B, k, GROUP)).reshape(B, k * GROUP)
    values, j = cand.topk(k, dim=1, sorted=False)
    return values, chosen.gather(1, j // GROUP) * GROUP + j % GROUP


def gather_rows(idx: torch.Tensor, w: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``out[b] = sum_j w[b, j] W[idx[b, j]]`` -> ``[B, d]`` fp32 for ``idx, w [B, K]`` and ``W [n, d]``
    (``embedding_bag(idx, W, per_sample_weights=w, mode='sum')``)."""
    B, K = idx.shape
    D = W.shape[1]
    out = torch.empty((B, D), dtype=torch.float32, device=W.device)
    if K == 0:
        return out.zero_()
    bk, bd = _blocks(K, 32), _blocks(D, 128)
    _gather_rows_kernel[(B, triton.cdiv(D, bd))](idx.contiguous(), w.contiguous(), W.contiguous(), out, K, D,
                                                 W.stride(0), BLOCK_K=bk, BLOCK_D=bd)
    return out


def rowdot(idx: torch.Tensor, W: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``out[b, j] = <W[idx[b, j]], g[b]>`` -> ``[B, K]`` fp32 (``sparse_step._rowdot``)."""
    B, K = idx.shape
    out = torch.empty((B, K), dtype=torch.float32, device=W.device)
    if K == 0:
        return out
    g, W = g.contiguous(), W.contiguous()
    bk, bd = _blocks(K, 32), _blocks(W.shape[1], 128)
    _rowdot_kernel[(B, triton.cdiv(K, bk))](idx.contiguous(), W, g, out, K, W.shape[1], W.stride(0), g.stride(0),
                                            BLOCK_K=bk, BLOCK_D=bd)
    return out


def segment_sum(rows: torch.Tensor, w: torch.Tensor, X: torch.Tensor, starts: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [n, d], sums [n])``: ``out[j] = sum_p w[p] X[rows[p]]`` and ``sums[j] = sum_p w[p]`` over the pairs
    ``p in [starts[j], starts[j + 1])`` (pairs sorted by latent; ``starts [n + 1]``), both fp32. A latent without
    pairs gets zeros. One program per (latent, column block): no atomics, so the sums are deterministic."""
    n, D = starts.numel() - 1, X.shape[1]
    X = X.contiguous()
    out = torch.empty((n, D), dtype=torch.float32, device=X.device)
    sums = torch.empty(n, dtype=torch.float32, device=X.device)
    bd = _blocks(D, 128)
    _segment_sum_kernel[(n, triton.cdiv(D, bd))](rows.contiguous(), w.contiguous(), X, starts.contiguous(), out,
                                                 sums, D, X.stride(0), BLOCK_P=16, BLOCK_D=bd)
    return out, sums


class TritonTopK(torch.autograd.Function):
    """:class:`sparse_step.SparseTopK` with the kernels above: the same arguments (``precision`` in place of
    ``dense_aux``), outputs ``(recon, aux_recon, v, idx)`` and gradients; recon and the gradients are fp32."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, c, W_enc, b_enc, W_dec, dec_norm, k: int, dead_ids, k_aux: int, precision: str,
                aux_relu: bool = False):
        n = W_enc.shape[0]
        hidden, gmax = encode(c, W_enc, b_enc, dec_norm, precision)
        top, idx = topk_from_groups(hidden, gmax, k)
        v = (top.float() / dec_norm[idx]).relu_()
        recon = gather_rows(idx, v, W_dec)
        if k_aux > 0:
            dead_top, local = hidden[:, :n].index_select(1, dead_ids).topk(k_aux, dim=1, sorted=False)
            aux_idx = dead_ids[local]
            aux_v = dead_top.float() / dec_norm[aux_idx]
            if aux_relu:
                aux_v = aux_v.relu()
            aux_recon = gather_rows(aux_idx, aux_v, W_dec)
        else:
            aux_idx, aux_v = idx.new_empty((c.shape[0], 0)), v.new_empty((c.shape[0], 0))
            aux_recon = torch.zeros_like(recon)
        ctx.save_for_backward(c, W_enc, W_dec, idx, v, aux_idx, aux_v)
        ctx.aux_relu = aux_relu
        ctx.mark_non_differentiable(v, idx)
        return recon, aux_recon, v, idx

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g, g_aux, _gv, _gidx):
        c, W_enc, W_dec, idx, v, aux_idx, aux_v = ctx.saved_tensors
        g = g.float().contiguous()
        dv = rowdot(idx, W_dec, g) * (v > 0)
        da = None
        if aux_idx.shape[1]:
            g_aux = g_aux.float().contiguous()
            da = rowdot(aux_idx, W_dec, g_aux)
        idx_all, d_all, vals_all, g_rows, dec_rows = stack_pairs(idx, v, dv, g, aux_idx, aux_v, da, g_aux,
                                                                 ctx.aux_relu)
        flat = idx_all.reshape(-1)
        order = torch.argsort(flat, stable=True)
        starts = torch.zeros(W_enc.shape[0] + 1, dtype=torch.long, device=c.device)
        starts[1:] = torch.bincount(flat, minlength=W_enc.shape[0]).cumsum(0)
        enc_rows = torch.arange(idx_all.shape[0], device=c.device)[:, None].expand_as(idx_all).reshape(-1)[order]
        grad_W_enc, grad_b_enc = segment_sum(enc_rows, d_all.reshape(-1)[order], c, starts)
        grad_W_dec, _ = segment_sum(dec_rows.reshape(-1)[order], vals_all.reshape(-1)[order], g_rows, starts)
        grad_c = gather_rows(idx_all, d_all, W_enc).to(c.dtype)
        return grad_c, grad_W_enc, grad_b_enc, grad_W_dec, None, None, None, None, None, None
