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
# * sparsity: `l0`, `dead_frac`.
#
# Each SAE's numbers go to `runs/<sae id>/metrics.json` with provenance, written atomically.

# %% tags=["parameters"]
params_path = "params/smoke.yaml"
out_dir = None
role = None  # None: both roles
sae_ids = None  # None: every SAE of the role(s); else the ids of this unit
force = False
threads = 0  # torch threads: 0 keeps the default

# %% tags=["imports"]
import pandas as pd

from proxygap_helpers import evaluate, grid

# %%
# NBVAL_IGNORE_OUTPUT
# (output is volatile: progress bars, and whether the work ran or was found already done)
p, out, device = grid.setup(params_path, out_dir, threads)
records = []
for r in [role] if role else ["small", "large"]:
    records += evaluate.evaluate_unit(p, r, out, sae_ids=sae_ids, device=device, force=force)

# %% [markdown]
# ## Metrics of this unit (`ce_rec` is the primary definition named in params)

# %%
cols = ["model_role", "k", "tokens", "seed", "ce_clean", "ce_sae", "ce_rec", "r2", "cosine", "rel_err_norm",
        "kl", "swd", "l0", "dead_frac"]
pd.DataFrame(records)[cols].round(4)
