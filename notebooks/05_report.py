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

# %% tags=["parameters", "remove"]
params_path = "params/smoke.yaml"
out_dir = None
threads = 0  # torch threads: 0 means executor.threads of the params (what the numbers depend on)
setting = None  # grids with several pairs or hooks: the setting this report is about (e.g. "m1-m2@d0.25")

# %% tags=["imports", "remove"]
from IPython.display import Markdown

from proxygap_helpers import aggregate, budget_curves, decomposition, grid, plan, plots, report, stats
from proxygap_helpers import summary as sections

# %% tags=["remove"]
p, out, device = grid.setup(params_path, out_dir, threads)
agg = aggregate.load_aggregate(out, p, setting)  # this setting's tables; small and large = its two models
plots.set_theme()
summary = sections.run_summary(p, out, agg, setting)

# %%
Markdown(summary["header"])

# %%
Markdown(report.narrative(agg["phase2_table"], agg["sign_flip"], agg["proxy_leaderboard"], agg["claims"]))

# %% [markdown]
# ## The phase-2 table
# One row per sparsity k and SAE token budget T: n complete small/large pairs, the mean and Student-t 95% CI
# of ΔCE_rec (the primary endpoint; large minus small, positive = the large model's SAE preserves behaviour
# better) and of ΔR² (tertiary), and the mismatch rate: the fraction of seeds with ΔR² > 0 and ΔCE_rec < 0.
# Rows with n = 1 are *directional*; cells with no complete pair are *pending*.

# %%
report.style_table(agg["phase2_table"])

# %%
Markdown(summary["study_table"])

# %% [markdown]
# ## Where this grid sits: tokens per latent, dead latents, eval noise
# Budgets compare across SAE widths as tokens per latent (T / d_sae): the study's SAEs saw 305-3,052 (pythia-410m)
# and 610-6,104 (pythia-70m). A grid far below that tests a regime the study never ran, with most latents still
# dead. The last two columns compare the two uncertainties of each cell's mean ΔCE_rec: the seeds' standard
# error, which the confidence intervals use, and the sampling error of the finite eval set (a bootstrap over eval
# sequences, the same draw for both models and every seed).

# %%
Markdown(sections.regime_text(agg["phase2_table"]))

# %%
sections.regime_frame(agg["phase2_table"])

# %% [markdown]
# ## Sign flip: does the gap close with more SAE training?

# %%
plots.sign_flip_figure(agg["pairs"], agg["phase2_table"], agg["sign_flip"], curves=agg["budget_curves"],
                       tstar=agg["tstar"])

# %%
sections.sign_flip_frame(agg["sign_flip"])

# %% [markdown]
# ## Where will the sign flip? Each model's budget curve, extrapolated
# Per k, each model's CE_rec(T) and R²(T) is fitted with the saturating power law y(T) = y∞ − a·T^−α (a ≥ 0,
# α > 0, y∞ ≤ 1: neither metric exceeds 1 on average; Gao et al. 2024) by least squares on the per-seed values. T* is where the two fitted curves cross,
# searched up to 100× the largest tested budget, with a 95% seed-bootstrap interval ("extrapolated" says how far
# past the data). A fit is refused — "cannot be said", nothing extrapolated — with fewer than 3 budgets, a curve
# that is not monotone, a flat or ill-conditioned fit (α at a bound), or a failed leave-one-budget-out forecast.
# The next budget is the one whose run is expected to narrow the interval most (simulated from the fitted
# curves and the observed seed noise); its cost is `plan`'s estimate on this machine.

# %% tags=["remove"]
proposed = budget_curves.proposal(agg["next_budget"])
cost = (plan.budget_cost(p, out, proposed["tokens"].astype(int).tolist(), int(proposed["n_new_seeds"].max()))
        if len(proposed) else None)

# %%
Markdown(budget_curves.markdown(agg["tstar"], agg["budget_fits"], agg["next_budget"], cost))

# %%
budget_curves.tstar_frame(agg["tstar"])

# %%
budget_curves.fits_frame(agg["budget_fits"])

# %% [markdown]
# ### The study's published table: what it can and cannot say
# Only the gaps ΔCE_rec per (k, T) are published, three budgets (10M, 50M, 100M), so the saturating law is fitted
# to the mean gap directly, under the same refusal rule.

# %%
Markdown(budget_curves.reference_markdown(budget_curves.reference_fits(stats.reference_table())))

# %% [markdown]
# ## What the gap is made of
# The study writes "proxy gap = metric mismatch + optimization state + estimation noise" and weighs the terms
# "roughly". Here they are measured, per k, budget T and metric, from the budget fits above: the observed mean
# gap = the asymptotic term Δy∞ (the gap an unlimited budget leaves: intrinsic) + the optimisation term
# (the fitted gap at T minus Δy∞: what more training removes) + the lack of fit (observed minus fitted), exactly;
# the estimation noise is the seeds' SE and the eval set's sampling SE. The verdict says, per cell, whether ΔR²
# (the proxy) and ΔCE_rec (behaviour) disagree in sign, and if so whether the disagreement is within noise, cannot
# be said (a fit refused), mediated by the optimisation state (the asymptotes agree) or a metric mismatch (the
# asymptotes disagree too). Shares are of the summed magnitudes of the three terms. Machine-readable:
# `aggregate/decomposition.csv`.

# %%
Markdown(decomposition.markdown(agg["decomposition"], decomposition.reference(stats.reference_table())))

# %%
plots.decomposition_figure(agg["decomposition"])

# %%
decomposition.frame(agg["decomposition"])

# %% [markdown]
# ## Each model on its own: CE_rec and R² against the budget

# %%
plots.per_model_figure(agg["sae_metrics"], curves=agg["budget_curves"])

# %% [markdown]
# ## Scale, dimensionality (gate D3) and the random-error baseline
# Per model and hook, on the eval activations: SST per token (the variance R² divides by), the mean
# activation norm, the participation ratio (Σλ)²/Σλ² of the activation covariance and the TwoNN intrinsic
# dimension (Facco et al. 2017, on a fixed seeded subsample). Per SAE, against the budget: the normalised MSE
# (a scale-free alternative to R²), Gurnee's random-error ratio (KL with the SAE's error spliced in over KL
# with a random error of the same norm per token) and the share of the input's participation ratio that the
# reconstruction keeps.

# %%
Markdown(sections.scale_section(agg["sae_metrics"], agg["pairs"]))

# %%
sections.model_frame(agg["sae_metrics"])

# %%
plots.per_model_figure(agg["sae_metrics"], metrics=("nmse", "random_error_ratio", "pr_recon_frac"))

# %% [markdown]
# ## Gate D2: which proxy predicts held-out ΔCE_rec?
# Each proxy's delta is fitted (least squares) to ΔCE_rec on the training cells and predicts the cells held
# out — every budget in turn (leave-one-budget-out) and every k in turn (leave-one-k-out). Scores: sign
# accuracy, Spearman correlation and mean absolute error of the predictions; `MAE gain vs ΔR²` is ΔR²'s MAE
# minus the proxy's (positive = better than R²), with a paired bootstrap 95% CI over cells.

# %%
Markdown(sections.proxy_glossary())

# %%
sections.leaderboard_frame(agg["proxy_leaderboard"])

# %%
plots.leaderboard_figure(agg["heldout_predictions"], agg["proxy_leaderboard"])

# %% [markdown]
# ## Claims
# Each claim is an explicit rule evaluated on the tables above (thresholds in `proxygap_helpers/claims.py`,
# overridable in the params file). Too little data (missing cells, n < 2) gives *pending*, never *supported*.

# %%
report.style_claims(agg["claims"])

# %% [markdown]
# ## Caveats

# %%
Markdown("\n".join(f"- {c}" for c in report.caveats(agg["phase2_table"], agg["sae_metrics"])))

# %%
Markdown(summary["footer"])
