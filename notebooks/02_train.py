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
# # 02 · Train: TopK SAEs over token budgets
#
# One TopK SAE (SAELens' `TopKTrainingSAE` semantics) per (role, hook, k, budget T, seed), expansion from params
# (32x by default). With `sae.trainer: fast` (the default) every SAE of a role is trained from **one** pass over
# its activations (the stores of all its hooks read in step, or one LM forward per row on the hub path): each SAE
# visits the shared stream in its own seeded order, with a sparse TopK step (`proxygap_helpers/engine.py`).
# `sae.trainer: saelens` trains each SAE alone with SAELens' `SAETrainer` (the parity baseline). Choices from
# Gao et al. (2024) are in params and recorded in each SAE's `train_meta.json`: learning rate scaled with the
# number of latents, AuxK loss for dead latents, decoder-norm treatment, warm-up and decay, activation
# normalisation. In `separate` budget mode (the study's) each T is its own run with its own schedule; in
# `ladder` mode one run per (hook, k, seed) is checkpointed at each budget.
#
# SAEs are saved in SAELens format under `saes/<sae id>/` (`SAE.load_from_disk` loads them); a finished
# SAE is never retrained unless `force` is set. Run by the grid runner with `role` and `sae_ids` set (one unit:
# a model with all its hooks, or a shard of it); a plain "Run All" trains every SAE of the grid.

# %% tags=["parameters"]
params_path = "params/smoke.yaml"
out_dir = None
role = None  # None: every model
sae_ids = None  # None: every SAE of the role(s); else the ids of this unit
force = False
threads = 0  # torch threads: 0 means executor.threads of the params (what the numbers depend on)

# %% tags=["imports"]
import pandas as pd

from proxygap_helpers import extract, grid, train, training
from proxygap_helpers.files import read_json

# %%
# NBVAL_IGNORE_OUTPUT
# (output is volatile: progress bars, and whether the work ran or was found already done)
p, out, device = grid.setup(params_path, out_dir, threads)
specs = [s for s in p.sae_specs(role=role) if sae_ids is None or s.sae_id in sae_ids]
for r in sorted({s.role for s in specs}, key=p.roles.index):  # one shared stream per model, all its hooks
    mine = [s for s in specs if s.role == r]
    source = extract.activation_source(p, out, r, [s.layer for s in mine], device)
    train.train_unit(p, mine, source, out, extract.model_name(p, r), p.data.context_size, device=device,
                     force=force)

# %% [markdown]
# ## The SAEs of this unit
# Final training-log row of each SAE: MSE (on normalised activations), L0 (must equal k for TopK) and
# the fraction of latents dead over the last window (short runs leave many dead latents — a caveat the
# report repeats).

# %%
rows = []
for s in specs:
    last = read_json(training.sae_dir(out, s.sae_id) / training.TRAIN_LOG)[-1]
    meta = read_json(training.sae_dir(out, s.sae_id) / training.TRAIN_META)
    rows.append({"role": s.role, **({"hook": meta["hook"]} if p.multi_hook else {}), "k": s.k, "tokens": s.tokens,
                 "seed": s.seed, "trainer": meta["trainer"],
                 "tokens/latent": meta["tokens_per_latent"], "steps": meta["steps"], "epochs": meta["epochs_used"],
                 "mse": last["mse_loss"], "l0": last["l0"], "dead_frac": last["dead_frac"]})
pd.DataFrame(rows).round(4)
