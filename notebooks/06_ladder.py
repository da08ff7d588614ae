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

# %% [markdown] tags=["remove"]
# # 06 · Across the ladder: every pair of models and every hook together
#
# A grid with more than two models (`models` as a list ordered by size) or several hooks per model (`depths`, or
# a list of layers per model) has several *settings*: each pair of models (consecutive sizes; with
# `pairs: with_smallest` also the smallest against each larger one) at each matched hook. `05_report` runs once
# per setting; this notebook is the summary in front of them in the published report: how ΔCE_rec and ΔR² at each
# budget change with the size ratio of the pair (non-embedding parameters, large / small), and in how many
# settings each claim of the study holds. A grid with one setting has nothing to summarise here.

# %% tags=["parameters", "remove"]
params_path = "params/smoke.yaml"
out_dir = None
threads = 0  # torch threads: 0 means executor.threads of the params (what the numbers depend on)

# %% tags=["imports", "remove"]
from IPython.display import Markdown, display

from proxygap_helpers import aggregate, families, grid, ladder, plots, report
from proxygap_helpers.params import FAMILIES

# %% tags=["remove"]
p, out, device = grid.setup(params_path, out_dir, threads)
agg = aggregate.load_aggregate(out)
plots.set_theme()
several = len(p.settings()) > 1
claims = agg["claims"] if several else agg["claims"].iloc[0:0]
summary_rows = claims[claims["setting"] == ladder.SUMMARY_LABEL] if several else claims
settings = ladder.settings_table(p)  # one row per setting: its pair, hook, size ratio and family
across = families.several(settings)  # pairs of the same sizes in several families (params/families.yaml)
labels = {t: f.label for t, f in FAMILIES.items()}

# %%
Markdown(ladder.header_markdown(p))

# %%
ladder.settings_frame(settings)

# %%
FAMILIES_INTRO = """## Across model families
With pairs built in several families (`pairs: within_family`), the first question is whether the default study's
pattern holds in every family: the signs of the mean ΔCE_rec and ΔR² per (k, budget) cell, held against the
GPT-NeoX pair's (the default study's own models), then each claim per family and the gaps themselves
(`aggregate/family_signs.csv`, `aggregate/family_gaps.csv`)."""
if across:  # a grid of one family has no such section
    display(Markdown(FAMILIES_INTRO), Markdown(families.answer(agg["family_signs"], labels)),
            report.style_status_matrix(families.claims_by_family(claims, settings, labels)),
            plots.family_figure(agg["family_gaps"], labels))

# %% [markdown]
# ## How the gaps change with the size ratio
# Per setting, the phase-2 cells (mean over seeds and 95% Student-t interval) against the pair's size ratio; the
# table gives, per hook, k and budget, the mean gaps at the smallest and the largest ratio and the least-squares
# slope per decade of size ratio over the pairs (`aggregate/size_trend.csv`; every cell in `aggregate/ladder.csv`).

# %%
Markdown(ladder.ladder_markdown(agg["size_trend"], summary_rows, settings) if several
         else "One setting: no size trend to read.")

# %%
plots.ladder_figure(agg["ladder"])

# %%
ladder.trend_frame(agg["size_trend"])

# %% [markdown]
# ## Claims across the ladder
# Each claim's rule (`proxygap_helpers/claims.py`) evaluated in every setting; the summary row per claim says in
# how many it is supported, rejected and pending (*mixed* when the settings disagree).

# %%
report.style_claims(summary_rows[["claim", "gate", "statement", "status", "evidence"]]) if several \
    else "One setting: its claim table is in its report."

# %%
report.style_status_matrix(ladder.claims_matrix(claims)) if several else "One setting: see its claim table."
