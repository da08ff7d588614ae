# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Train: TopK SAEs over token budgets
#
# One SAELens `TopKTrainingSAE` per (role, k, budget T, seed), expansion from params (32x by default),
# trained with SAELens' `SAETrainer` on the activation store (or the online source), shuffled by the SAE's
# seed. Choices from Gao et al. (2024) are in params and recorded in each SAE's `train_meta.json`:
# learning rate scaled with the number of latents, AuxK loss for dead latents, decoder-norm treatment,
# warm-up and decay, activation normalisation. In `separate` budget mode (the study's) each T is its own
# run with its own schedule; in `ladder` mode one run per seed is checkpointed at each budget.
#
# SAEs are saved in SAELens format under `saes/<sae id>/` (`SAE.load_from_disk` loads them); a finished
# SAE is never retrained unless `force` is set. Run by the grid runner with `role` and `seed` set; a plain
# "Run All" trains every SAE of the grid.

# %% tags=["parameters"]
params_path = "params/smoke.yaml"
out_dir = None
role = None  # None: both roles
k = None  # None: every k of the grid
seed = None  # None: every seed
force = False
threads = 0  # torch threads: 0 keeps the default

# %% tags=["imports"]
import pandas as pd

from proxygap_helpers import extract, grid, training
from proxygap_helpers.activations import StoreSource, store_dir
from proxygap_helpers.files import read_json

# %%
# NBVAL_IGNORE_OUTPUT
# (output is volatile: progress bars, and whether the work ran or was found already done)
p, out, device = grid.setup(params_path, out_dir, threads)
roles = [role] if role else ["small", "large"]
ks = [k] if k else p.sae.k
for r in roles:
    source = StoreSource(store_dir(out, r)) if p.embedded else extract.online_source(p, out, r, device)
    for kk in ks:
        training.train_unit(p, r, kk, source, out, extract.model_name(p, r), p.data.context_size,
                            device=device, force=force, seed=seed)

# %% [markdown]
# ## The SAEs of this unit
# Final training-log row of each SAE: MSE (on normalised activations), L0 (must equal k for TopK) and
# the fraction of latents dead over the last window (short runs leave many dead latents — a caveat the
# report repeats).

# %%
rows = []
for s in p.sae_specs():
    if s.role in roles and s.k in ks and seed in (None, s.seed):
        last = read_json(training.sae_dir(out, s.sae_id) / training.TRAIN_LOG)[-1]
        meta = read_json(training.sae_dir(out, s.sae_id) / training.TRAIN_META)
        rows.append({"role": s.role, "k": s.k, "tokens": s.tokens, "seed": s.seed, "steps": meta["steps"],
                     "epochs": meta["epochs_used"], "mse": last["mse_loss"], "l0": last["l0"],
                     "dead_frac": last["dead_frac"]})
pd.DataFrame(rows).round(4)
