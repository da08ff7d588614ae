# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Evaluate: every metric of the study on held-out tokens
#
# For each SAE, on `data/eval_tokens.npy` (the held-out split, never trained on):
#
# * behaviour: next-token CE with the hook activation left as is (`ce_clean`), replaced at every position
#   by the SAE reconstruction (`ce_sae`), by zeros (`ce_zero`) or by its mean over eval tokens
#   (`ce_mean_ablation`); `ce_rec_relative = 2 - ce_sae / ce_clean` (the study's) and
#   `ce_rec_zero_norm = (ce_zero - ce_sae) / (ce_zero - ce_clean)` (SAELens' ce_loss_score); `kl`;
# * reconstruction proxies: `r2`, `cosine`, `rel_err_norm`;
# * the pullback proxy `swd` = mean 1/2 (J e)^T (diag p - p p^T) (J e), one forward-mode JVP per batch;
# * the first-order gradient-weighted distortion `gwd` = mean (g_t^T e_t)^2, g_t = dCE_seq/dx_t on the
#   clean run (the study author's "SWD"; one backward per batch, shared by all SAEs of the model);
# * the random-error baseline (Gurnee 2024): `random_error_ratio` = KL with the SAE error spliced in / KL
#   with a random error of the same norm per token (seeded isotropic directions, `kl_random_sd` their spread);
# * scale and dimensionality: `mse`, `nmse` = MSE / mean ||x||^2; per model `sst_per_token` (what R² divides
#   by), `act_norm_mean`, the participation ratio `pr_act` and TwoNN dimension `twonn_dim` (gate D3); per
#   SAE `pr_recon`, the participation ratio of the reconstruction;
# * sparsity: `l0`, `dead_frac`.
#
# The per-model work (activation statistics, clean forward and gradient, ablations) runs once for all SAEs
# of a model. Each SAE's numbers go to `runs/<sae id>/metrics.json` with provenance, written atomically.

# %% tags=["parameters"]
params_path = "params/smoke.yaml"
out_dir = None
role = None  # None: every model
sae_ids = None  # None: every SAE of the role(s); else the ids of this unit
force = False
threads = 0  # torch threads: 0 means executor.threads of the params (what the numbers depend on)

# %% tags=["imports"]
import pandas as pd

from proxygap_helpers import evaluate, grid

# %%
# NBVAL_IGNORE_OUTPUT
# (output is volatile: progress bars, and whether the work ran or was found already done)
p, out, device = grid.setup(params_path, out_dir, threads)
records = []
for r in [role] if role else p.roles:  # one call per model: its SAEs share the per-model passes (per hook)
    records += evaluate.evaluate_unit(p, r, out, sae_ids=sae_ids, device=device, force=force)

# %% [markdown]
# ## Metrics of this unit (`ce_rec` is the primary definition named in params)

# %%
cols = ["model_role", *(["hook"] if p.multi_hook else []), "k", "tokens", "seed", "ce_clean", "ce_sae", "ce_rec",
        "r2", "cosine", "rel_err_norm", "nmse", "kl", "swd", "gwd", "random_error_ratio", "pr_recon", "l0", "dead_frac"]
pd.DataFrame(records)[cols].round(4)

# %% [markdown]
# ## Per model and hook: the scale R² divides by, and dimensionality (gate D3)

# %%
model_cols = ["model_role", "hook", "sst_per_token", "act_norm_mean", "pr_act", "twonn_dim", "twonn_points"]
pd.DataFrame(records)[model_cols].drop_duplicates(["model_role", "hook"]).round(4)
