"""The training recipe's levers (issue 27): b_dec init, input centring, AuxK's size and normalisation, each against
an independent computation, and the params rules around them (ids of earlier grids unchanged, the saelens trainer
refusing what it does not run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from proxygap_helpers import training
from proxygap_helpers.params import SAELENS_RECIPE, ParamsError, hashed, load_params
from proxygap_helpers.sparse_step import aux_k, aux_loss, sparse_forward

SMOKE = Path(__file__).resolve().parents[1] / "params" / "smoke.yaml"


def test_geometric_median_is_scipys_minimiser_of_the_summed_distances():
    """Weiszfeld's iterations reach the minimiser of sum_i ||x_i - m|| that scipy finds from another start, on data
    with outliers (where the median and the mean differ), and stay close to the mean on symmetric data."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 6))
    x[:40] += 25.0  # 10% outliers in one corner
    ours = training.b_dec_init(torch.from_numpy(x), "geometric_median").numpy()
    ref = minimize(lambda m: np.linalg.norm(x - m, axis=1).sum(), x0=np.zeros(6), method="Nelder-Mead",
                   options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 40_000, "maxfev": 40_000}).x
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    assert np.linalg.norm(ours - x.mean(0)) > 1.0  # the mean is pulled by the outliers, the median is not
    np.testing.assert_allclose(training.b_dec_init(torch.from_numpy(x), "mean").numpy(), x.mean(0), rtol=1e-12)
    with pytest.raises(ValueError, match="b_dec init"):
        training.b_dec_init(torch.from_numpy(x), "zeros")


@pytest.mark.parametrize("size,n_dead,expected", [
    ("half_d_in", 10, (10, 10 / 32)), ("half_d_in", 100, (32, 1.0)),   # SAELens: d_in // 2 = 32
    (256, 100, (100, 100 / 256)), (256, 1000, (256, 1.0)),               # Gao et al.'s 256
    ("all_dead", 7, (7, 1.0)), ("all_dead", 1000, (1000, 1.0)),
])
def test_aux_k_sizes(size, n_dead, expected):
    assert aux_k(64, n_dead, size) == expected


def test_aux_loss_normalised_by_the_residual_variance():
    """``residual_variance``: the summed error over the residual's total variance (Gao et al., sparsify), times the
    input's: by hand; the gradient is the unnormalised one times that constant ratio."""
    torch.manual_seed(0)
    x, e = torch.randn(16, 8), 0.3 * torch.randn(16, 8)
    a = torch.randn(16, 8, requires_grad=True)
    plain = aux_loss(a, e, x, 0.5, 0.25)
    norm = aux_loss(a, e, x, 0.5, 0.25, "residual_variance")
    err = ((a - e) ** 2).sum(-1).mean()
    ratio = ((x - x.mean(0)) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    torch.testing.assert_close(plain, 0.5 * 0.25 * err)
    torch.testing.assert_close(norm, 0.5 * 0.25 * err * ratio)
    (g_plain,) = torch.autograd.grad(plain, a)
    (g_norm,) = torch.autograd.grad(norm, a)
    torch.testing.assert_close(g_norm, g_plain * ratio)


def test_sparse_forward_applies_the_aux_options():
    """The step's AuxK term with every latent dead and ``all_dead``: k_aux = d_sae, scale 1; its value matches the
    dense formula (every latent's pre-activation reconstructs the residual)."""
    torch.manual_seed(1)
    d_in, d_sae, k = 8, 24, 3
    x = torch.randn(32, d_in, dtype=torch.float64)
    W_enc = torch.randn(d_sae, d_in, dtype=torch.float64)
    W_dec = torch.nn.functional.normalize(torch.randn(d_sae, d_in, dtype=torch.float64), dim=-1)
    b_enc, b_dec = torch.randn(d_sae, dtype=torch.float64), torch.randn(d_in, dtype=torch.float64)
    dead = torch.arange(d_sae)
    out = sparse_forward(x, W_enc, b_enc, W_dec, b_dec, k, dead, 1.0, k_aux="all_dead",
                         aux_normalization="residual_variance")
    pre = (x - b_dec) @ W_enc.T + b_enc
    residual = x - out.x_hat
    err = ((pre @ W_dec - residual) ** 2).sum(-1).mean()
    ratio = ((x - x.mean(0)) ** 2).sum() / ((residual - residual.mean(0)) ** 2).sum()
    torch.testing.assert_close(out.aux_loss, err * ratio)


def test_recipe_keys_keep_earlier_ids_and_the_saelens_trainer_refuses_departures():
    """Giving the former (SAELens) values explicitly leaves the params and SAE hashes as they were before the keys
    existed; other values change them; the saelens trainer accepts only SAELens' own recipe."""
    former = load_params(SMOKE, {f"sae.{k}": v for k, v in SAELENS_RECIPE.items()})
    live = load_params(SMOKE, {"sae.center_activations": True})
    assert not set(hashed(former.sae)) & set(SAELENS_RECIPE)  # hashed as before the keys existed
    assert hashed(live.sae)["center_activations"] is True
    spec = former.sae_specs()[0]
    assert former.sae_hash(spec.role, spec.k, spec.tokens, spec.seed, spec.layer) != \
        live.sae_hash(spec.role, spec.k, spec.tokens, spec.seed, spec.layer)
    with pytest.raises(ParamsError, match="sae.center_activations"):
        load_params(SMOKE, {"sae.trainer": "saelens", "sae.center_activations": True})
    load_params(SMOKE, {"sae.trainer": "saelens", **{f"sae.{k}": v for k, v in SAELENS_RECIPE.items()}})
    with pytest.raises(ParamsError, match="sae.k_aux"):
        load_params(SMOKE, {"sae.k_aux": 0})


def test_unit_norm_projection_removes_the_parallel_component():
    """Gao et al.'s decoder gradient adjustment: the adjusted gradient is orthogonal to each row, and the rest of
    it is unchanged (g = g_par + g_perp)."""
    from proxygap_helpers.engine import _remove_parallel_grad

    torch.manual_seed(2)
    W = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(10, 6, dtype=torch.float64)
    W.grad = g.clone()
    _remove_parallel_grad(W)
    w = W.detach() / W.detach().norm(dim=-1, keepdim=True)
    torch.testing.assert_close((W.grad * w).sum(-1), torch.zeros(10, dtype=torch.float64))
    torch.testing.assert_close(W.grad + (g * w).sum(-1, keepdim=True) * w, g)
