"""The (row, latent) pairs a TopK SAE step's backward sums over, shared by :class:`sparse_step.SparseTopK` and
:class:`triton_step.TritonTopK` (their own modules differ only in the kernels that do the sums)."""

from __future__ import annotations

import torch


def aux_code_grad(da: torch.Tensor, aux_v: torch.Tensor, aux_relu: bool) -> torch.Tensor:
    """AuxK's code gradients ``da [B, k_aux]`` (``<g_aux_b, W_dec[j]>``), through the ReLU when its codes ``aux_v``
    are rectified (``sae.aux_k_rectified``: zero where the code is), else as they are (SAELens' un-rectified codes)."""
    return da * (aux_v > 0) if aux_relu else da


def stack_pairs(idx: torch.Tensor, v: torch.Tensor, dv: torch.Tensor, g: torch.Tensor, aux_idx: torch.Tensor,
                aux_v: torch.Tensor, da: torch.Tensor | None, g_aux: torch.Tensor | None, aux_relu: bool):
    """The main term's pairs and AuxK's side by side: ``(idx_all, d_all, vals_all, g_rows, dec_rows)``.

    ``idx, v, dv`` ``[B, k]``: the selected latents, their codes and code gradients; ``aux_idx, aux_v, da``
    ``[B, k_aux]``: AuxK's (``da`` None: the main term's pairs alone, as with ``k_aux = 0`` or an AuxK term summed
    elsewhere); ``g, g_aux`` ``[B, d_in]``: the gradients of the reconstruction and of AuxK's. Returns ``idx_all
    [B, k + k_aux]``, the code gradients ``d_all`` (AuxK's by :func:`aux_code_grad`), the codes ``vals_all``,
    ``g_rows`` (``g`` then ``g_aux``: ``[2B, d_in]``, or ``g`` alone) and ``dec_rows``, the row of ``g_rows`` that
    each pair's decoder gradient takes (``b`` for the main term, ``B + b`` for AuxK's)."""
    B, k = idx.shape
    rows = torch.arange(B, device=idx.device)[:, None]
    if da is None:
        return idx, dv, v, g, rows.expand(B, k)
    return (torch.cat([idx, aux_idx], 1), torch.cat([dv, aux_code_grad(da, aux_v, aux_relu)], 1),
            torch.cat([v, aux_v], 1), torch.cat([g, g_aux]),
            torch.cat([rows.expand(B, k), (rows + B).expand(B, aux_idx.shape[1])], 1))
