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
# # 01 · Extract: the models, held-out eval tokens and activation stores
#
# The study compares SAEs trained on the same mid-layer residual stream (`blocks.L.hook_resid_post`) of a
# *small* and a *large* model of one family; a grid may also hold a ladder of sizes and several hooks per model
# (`params/ladder.yaml`). This notebook makes everything the later stages read:
#
# * **embedded grids** (`params/smoke.yaml`, `params/default.yaml`): the `.py` sources of the pinned SymPy
#   package as text (content hash checked; split into train/eval *by file*), a byte-level BPE tokenizer and
#   tiny GPT-NeoX (Pythia-architecture) models trained here, deterministically, and cached;
# * **the reference grid** (`params/phase2_pythia.yaml`): Pythia checkpoints from the hub (or local folders)
#   and the Pile (streamed, or a local copy); the eval rows are the first rows of its validation split, and
#   activations are streamed from its train split at training time instead of stored.
#
# Outputs: `models/<role>/` (HF format), `data/eval_tokens.npy` (never trained on; its hash and source in
# `data/eval_tokens.json`) and `activations/<role>/` (a memmap store with `meta.json`; a truncated or corrupted
# store is rebuilt), or `activations/<role>/L<layer>/` per hook when models have several (all of a model's stores
# from one pass of the model).

# %% tags=["parameters"]
params_path = "params/smoke.yaml"  # relative paths resolve from the repository root
out_dir = None  # default: results/<grid name>
threads = 0  # torch threads: 0 means executor.threads of the params (what the numbers depend on)

# %% tags=["imports"]
import pandas as pd

from proxygap_helpers import extract, grid

# %%
# NBVAL_IGNORE_OUTPUT
# (output is volatile: progress bars, and whether the work ran or was found already done)
p, out, device = grid.setup(params_path, out_dir, threads)
info = extract.run_extract(p, out, device=device, processes=p.jobs)  # models train p.jobs at a time

# %% [markdown]
# ## What was built
# For an embedded grid the large model must reach a clearly lower held-out loss than the small one:
# otherwise "scaling up" means nothing here.

# %%
rows = [{"role": role, "model": extract.model_name(p, role),
         "hook": ", ".join(p.hook(role, L) for L in p.layers(role)), "d_in": p.d_in(role), "d_sae": p.d_sae(role),
         **({"eval loss (nats)": round(info["models"][role]["eval_loss"], 3)} if "models" in info else {})}
        for role in p.roles]
pd.DataFrame(rows).set_index("role")

# %%
pd.DataFrame({role: {"tokens x d_in": " x ".join(map(str, s["shape"])), "dtype": s["dtype"]}
              for role, s in info["stores"].items()}).T if info["stores"] else "online source (no store)"
