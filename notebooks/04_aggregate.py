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
# # 04 · Aggregate: paired deltas, confidence intervals, mismatch rates, sign flip, proxy leaderboard, claims
#
# * **Deduplicate** by (role, hook, k, T, seed), keeping the newest result (what was dropped is listed).
# * **Pair** small and large SAEs by (k, T, seed): ΔX = X(large) − X(small) for every metric; the mismatch
#   indicator is 1[ΔR² > 0 and ΔCE_rec < 0]. A grid with a ladder of models or several hooks per model does all of
#   this per *setting* (a pair of models at one matched hook; `setting`, `pair` and `hook` columns in front) and
#   adds the size-ratio summary (`ladder.csv`, `size_trend.csv`) and each claim's count over the settings.
# * **Phase-2 table** per (k, T): n, mean and Student-t 95% CI of ΔCE_rec and ΔR² (n = 1 gives the point as
#   both bounds, flagged *directional*), mismatch rate, secondary deltas.
# * **Sign flip**: the budget T* where mean ΔCE_rec crosses zero (interpolated in log T), bootstrap interval.
# * **Budget curves**: each model's CE_rec(T) and R²(T) per k fitted with a saturating power law; T* where the
#   fitted curves cross (extrapolated past the data, or "cannot be said" with the reason); the next budget.
# * **Gate D2**: each proxy's delta predicts ΔCE_rec of *held-out* cells (leave-one-budget-out,
#   leave-one-k-out), scored by sign accuracy, Spearman and MAE, with paired bootstrap CIs against ΔR².
#   Proxies: reconstruction (ΔR², Δcosine, Δrel. error, ΔNMSE), geometry-aware (ΔSWD, ΔGWD), dimensionality
#   (Δdim, gate D3), optimisation state (Δdead fraction); ΔKL and Δrandom-error ratio are behavioural references.
# * **Gate D3**: `d_dim` per pair (Δ of the share of the input's participation ratio that the reconstruction
#   keeps) against ΔCE_rec, by claim C6's rule.
# * **Claims** from the explicit rules in params: supported / pending / rejected, with evidence.

# %% tags=["parameters"]
params_path = "params/smoke.yaml"
out_dir = None
threads = 0  # torch threads: 0 means executor.threads of the params (what the numbers depend on)

# %% tags=["imports"]
from IPython.display import Markdown

from proxygap_helpers import aggregate, budget_curves, grid, ladder, layout

# %%
p, out, device = grid.setup(params_path, out_dir, threads)
agg = aggregate.run_aggregate(p, out)
keys = [c for c in ladder.SETTING_COLUMNS if c in agg["claims"].columns]  # several settings: which one
print(f"{len(agg['sae_metrics'])} SAEs, {len(agg['pairs'])} pairs, {len(agg['phase2_table'])} cells; "
      f"{len(agg['dropped_duplicates'])} duplicates dropped, {len(agg['unpaired'])} SAEs without a partner")

# %% [markdown]
# ## The phase-2 table (primary endpoint ΔCE_rec, tertiary ΔR²)

# %%
Markdown((layout.aggregate_dir(out) / "phase2_table.md").read_text())

# %% [markdown]
# ## Sign flip of ΔCE_rec over the budget

# %%
agg["sign_flip"].round(4).set_index(keys) if keys else agg["sign_flip"].round(4)

# %% [markdown]
# ## Budget curves: where the fitted gap changes sign

# %%
ladder.per_setting(budget_curves.tstar_frame, agg["tstar"])

# %% [markdown]
# ## Gate D2: held-out proxy leaderboard (positive `*_vs_r2` = better than ΔR²)

# %%
cols = [*keys, "scheme", "proxy", "n_cells", "sign_acc", "spearman", "mae", "mae_vs_r2", "mae_vs_r2_lo",
        "mae_vs_r2_hi", "beats_r2", "rank"]
agg["proxy_leaderboard"][cols].round(4) if len(agg["proxy_leaderboard"]) else "no pairs yet"

# %% [markdown]
# ## Claims

# %%
agg["claims"][[*keys[:1], "claim", "gate", "status", "evidence"]]
