"""The report's framing sections (what was run, the study's table, scope) and readable tables.

``run_summary`` reads the grid's params, ``aggregate/summary.json`` and the units' ``done.json`` records;
everything it writes is derived from them (no timestamps beyond the provenance it quotes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from . import stats
from .files import read_json, read_json_field
from .ladder import SIDES
from .layout import aggregate_dir, done_files, metrics_files
from .params import Params, Setting, format_tokens



CE_REC_TEXT = {"relative": "2 − CE_sae / CE_clean (the study's relative definition)",
               "zero_norm": "(CE_zero − CE_sae) / (CE_zero − CE_clean) (SAELens' ce_loss_score)"}
BUDGET_MODE_TEXT = {"separate": "each budget is its own run with its own learning-rate schedule, as in the study",
                    "ladder": "one run per (k, seed), checkpointed at each budget, schedule independent of T"}
TRAINER_TEXT = {"fast": "proxygap's engine: every SAE of a unit from one shared activation stream, sparse TopK step, "
                        "SAELens' TopK semantics",
                "saelens": "SAELens' own SAETrainer, one SAE at a time"}


def _provenance(p: Params, out_dir: Path) -> dict:
    """Git commit(s), versions, machine and compute time over the units' done.json and this grid's metrics (its
    SAE ids under its evaluation: an output folder may hold other grids' SAEs, or another evaluation's)."""
    recs = [read_json(f) for f in done_files(out_dir)]
    _, metrics = stats.grid_records(map(read_json, metrics_files(out_dir)), (s.sae_id for s in p.sae_specs()),
                                    p.eval_hash)
    prov = [r["provenance"] for r in recs if "provenance" in r] + [m["provenance"] for m in metrics]
    commits = sorted({f"{p.get('git_commit', '?')[:10]}{' (dirty)' if p.get('git_dirty') else ''}" for p in prov})
    return {"commits": commits, "versions": prov[0]["versions"] if prov else {},
            "machine": prov[0]["machine"] if prov else {},
            "train_seconds": float(sum(m.get("train_seconds", 0) for m in metrics)),
            "eval_seconds": float(sum(m.get("eval_seconds", 0) for m in metrics)), "n_metrics": len(metrics)}


def _clean_loss(sae_metrics: pd.DataFrame | None) -> dict[str, str]:
    """Each model's next-token CE on the eval tokens, unpatched (``ce_clean``, the same for all its SAEs)."""
    if sae_metrics is None or not len(sae_metrics) or "ce_clean" not in sae_metrics:
        return {}
    return {r: f"{v:.4f}" for r, v in sae_metrics.groupby("model_role")["ce_clean"].mean().items()}


def _setting(p: Params, setting: str | None) -> Setting:
    settings = {s.label: s for s in p.settings()}
    return settings[setting] if setting is not None else next(iter(settings.values()))


def run_summary(p: Params, out_dir: Path, agg: dict[str, pd.DataFrame], setting: str | None = None) -> dict[str, str]:
    """Markdown blocks: ``header`` (title, what was run, provenance), ``study_table``, ``footer`` (scope).
    ``agg`` is one setting's view (``ladder.setting_view``); ``setting`` its label (None: the grid's only one). In a
    grid with several settings the header's title names the setting, whose two models are the report's
    small and large sides."""
    prov = _provenance(p, out_dir)
    clean = _clean_loss(agg.get("sae_metrics"))
    s = _setting(p, setting)
    sides = {"small": (s.small, s.layer_small), "large": (s.large, s.layer_large)}
    models = "\n".join(f"| {side if r == side else f'{side} ({r})'} | `{p.models[r].name}` ({p.models[r].source}) | "
                       f"`{p.hook(r, L)}` | {L + 1}/{p.models[r].n_layers} = {p.depth(r, L):.2f} | "
                       f"{clean.get(side, '—')} | {p.d_in(r)} | {p.d_sae(r)} |" for side, (r, L) in sides.items())
    v = prov["versions"]
    m = prov["machine"]
    several = len(p.settings()) > 1
    title = (f"Setting {s.label}: {p.models[s.small].name} vs {p.models[s.large].name}"
             f"{f', hook {s.hook}' if s.hook else ''}" if several else p.report.title)
    intro = (f"One setting of the grid '{p.name}': the two models below are this section's small and large sides."
             if several else p.description)
    header = f"""# {title}

{intro}

| role | model | hook | depth (blocks up to the hook) | held-out CE (nats) | d_in | d_sae (TopK {p.sae.expansion}x) |
|---|---|---|---|---|---|---|
{models}

**Grid:** k ∈ {{{', '.join(map(str, p.sae.k))}}}, SAE token budgets T ∈ {{{', '.join(format_tokens(t) for t in p.sae.tokens)}}},
seeds {{{', '.join(map(str, p.sae.seeds))}}} — {len(p.sae_specs())} SAEs. **Budget mode:** `{p.sae.budget_mode}`
({BUDGET_MODE_TEXT[p.sae.budget_mode]}). **Trainer:** `{p.sae.trainer}` ({TRAINER_TEXT[p.sae.trainer]}{
'' if p.sae.precision == 'fp32' else f', {p.sae.precision}'}).
**Primary endpoint:** ΔCE_rec with CE_rec = {CE_REC_TEXT[p.evaluation.ce_rec]};
Δ = large − small, so ΔCE_rec < 0 means the large model's SAE preserves behaviour *worse*. Evaluated on
{p.data.eval_sequences} held-out sequences of {p.data.context_size} tokens.

**Provenance:** params hash `{p.params_hash()}`, code {', '.join(f'`{c}`' for c in prov['commits']) or 'unknown'};
python {v.get('python', '?')}, torch {v.get('torch', '?')}, sae-lens {v.get('sae-lens', '?')},
transformer-lens {v.get('transformer-lens', '?')}; {m.get('cpu', '?')} ({m.get('cpu_count', '?')} cores){', GPU ' + m['gpu'] if m.get('gpu') else ''};
{prov['n_metrics']} SAEs evaluated, {prov['train_seconds'] / 60:.1f} min of SAE training and
{prov['eval_seconds'] / 60:.1f} min of evaluation in total.
"""
    # the pinned text of an embedded grid, as its aggregate recorded it ("sympy==1.14.0"; absent before it did)
    corpus = read_json_field(aggregate_dir(out_dir) / "summary.json", "corpus")
    pin = f"`{corpus}`, pinned" if corpus else "pinned"
    ref = stats.reference_table()
    if p.report.reference_table:
        intro = ("## Side by side with the study\nThe study's published aggregate (Pythia-70m vs Pythia-410m on "
                 "the Pile) and ours, cell by cell:\n\n")
    else:
        intro = ("## The study's published table, for context\nThe numbers below are the study's (Pythia-70m vs "
                 "Pythia-410m on the Pile, budgets 10M–100M tokens), not this grid's: this grid is a different, "
                 "much smaller setting, so compare shapes (signs, trends), not values.\n\n")
    footer = f"""## Scope and how to run the reference grid

{'This report comes from the **embedded** setting: tiny GPT-NeoX models trained here on the Python source code '
 f"of SymPy ({pin}), with SAE budgets of thousands rather than millions of "
 "tokens. It tests whether the study's *pattern* appears in a small, fully reproducible setting; it is not "
 "Pythia on the Pile. " if p.embedded else ''}
The study's own grid is `params/phase2_pythia.yaml` (pythia-70m `blocks.3` vs pythia-410m `blocks.12`,
k ∈ {{8, 16, 32}}, 10M/50M/100M tokens, 4 seeds). It needs internet and a GPU:
`python -m proxygap_helpers run params/phase2_pythia.yaml` (README, "Reference grid"). Every number here is
in `results/{p.name}/aggregate/` and, per SAE, in `results/{p.name}/runs/<sae id>/metrics.json`.
"""
    return {"header": header, "study_table": intro + stats.phase2_markdown(ref), "footer": footer}


def sign_flip_frame(flips: pd.DataFrame) -> pd.DataFrame:
    """Readable sign-flip table: T* and its bootstrap interval in tokens."""
    if flips is None or not len(flips):
        return pd.DataFrame({"status": ["pending: no complete pairs yet"]})
    fmt = lambda x: "—" if pd.isna(x) else ("∞" if np.isinf(x) else format_tokens(int(round(x))))  # noqa: E731
    return pd.DataFrame({"k": flips["k"], "status": flips["status"], "direction": flips["direction"].fillna("—"),
                         "T*": flips["t_star"].map(fmt),
                         "95% interval": [f"[{fmt(a)}, {fmt(b)}]" if pd.notna(a) else "—"
                                          for a, b in zip(flips["t_star_lo"], flips["t_star_hi"])]}
                        ).set_index("k")


def leaderboard_frame(board: pd.DataFrame) -> pd.DataFrame:
    """Readable D2 leaderboard: pooled scheme first, scores and MAE gain over ΔR² with its CI."""
    if board is None or not len(board):
        return pd.DataFrame({"status": ["pending: no complete pairs yet"]})
    b = board.copy()
    b["MAE gain vs ΔR² (95% CI)"] = [
        "—" if pd.isna(d) else f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]"
        for d, lo, hi in zip(b["mae_vs_r2"], b["mae_vs_r2_lo"], b["mae_vs_r2_hi"])]
    b["scheme"] = pd.Categorical(b["scheme"], ["pooled", "leave-one-budget-out", "leave-one-k-out"], ordered=True)
    b = b.sort_values(["scheme", "rank"])
    cols = {"scheme": "scheme", "proxy": "proxy", "n_cells": "held-out cells", "sign_acc": "sign accuracy",
            "spearman": "Spearman", "mae": "MAE", "MAE gain vs ΔR² (95% CI)": "MAE gain vs ΔR² (95% CI)",
            "beats_r2": "beats ΔR²"}
    return b[list(cols)].rename(columns=cols).round(4).set_index(["scheme", "proxy"])


MODEL_COLUMNS = {"hook": "hook", "sst_per_token": "SST per token", "act_norm_mean": "mean ‖x‖",
                 "act_sq_norm_mean": "mean ‖x‖²", "pr_act": "participation ratio", "twonn_dim": "TwoNN dimension",
                 "twonn_points": "TwoNN points"}


def model_frame(sae_metrics: pd.DataFrame | None) -> pd.DataFrame:
    """Per model and hook (one row per role): the scale R² divides by and the D3 dimensionality of the eval
    activations. These are the same in every SAE record of a role (they do not depend on the SAE): the
    first record is shown. A 'large / small' row gives the ratios."""
    m = sae_metrics if sae_metrics is not None else pd.DataFrame()
    cols = [c for c in MODEL_COLUMNS if c in m.columns]
    if not len(m) or "model_role" not in m.columns or "sst_per_token" not in cols or m["sst_per_token"].isna().all():
        return pd.DataFrame({"status": ["pending: no per-model statistics yet"]})
    rows = m.dropna(subset=["sst_per_token"]).groupby("model_role").first()
    out = rows.reindex([r for r in SIDES if r in rows.index])[cols]
    if {"small", "large"} <= set(out.index):
        numeric = [c for c in cols if c not in ("hook", "twonn_points")]
        ratio = out.loc["large", numeric].astype(float) / out.loc["small", numeric].astype(float)
        out.loc["large / small"] = {**ratio.to_dict(), "hook": "", "twonn_points": np.nan}
    out.index.name = "model"
    return out.rename(columns=MODEL_COLUMNS).round(3)


def _role_mean(m: pd.DataFrame, col: str, role: str) -> float:
    if col not in m.columns or "model_role" not in m.columns:
        return float("nan")
    return float(pd.to_numeric(m.loc[m["model_role"] == role, col], errors="coerce").mean())


def scale_section(sae_metrics: pd.DataFrame | None, pairs: pd.DataFrame | None) -> str:
    """Markdown: SST per token of each model beside the mean ΔR² and ΔNMSE over the pairs (the study's "SST
    inflation" reading of ΔR² > 0), the D3 dimensionality of each model, and the random-error baseline's mean
    ratio per model. Deterministic; says 'pending' where the numbers are missing."""
    m = sae_metrics if sae_metrics is not None else pd.DataFrame()
    pr = pairs if pairs is not None else pd.DataFrame()
    sst = {r: _role_mean(m, "sst_per_token", r) for r in SIDES}
    if any(np.isnan(v) for v in sst.values()):
        return "Pending: no per-model activation statistics yet."
    d = {c: float(pr[c].mean()) if c in pr.columns and len(pr) else float("nan") for c in ("d_r2", "d_nmse")}
    text = [f"**SST inflation.** R² divides the squared error by SST, the activations' variance around their mean: "
            f"{sst['small']:.4g} per token in the small model and {sst['large']:.4g} in the large one "
            f"({sst['large'] / sst['small']:.3g}×; the study's Pythia pair: 226.7 vs 4131.1, 18×). Over the "
            f"{len(pr)} pairs the mean ΔR² is {d['d_r2']:+.3f}; the scale-free ΔNMSE (squared error over the "
            f"uncentred Σ‖x‖²) is {d['d_nmse']:+.3g} (negative = the large model's SAE has the smaller relative "
            f"error)."]
    dims = {c: {r: _role_mean(m, c, r) for r in SIDES} for c in ("pr_act", "twonn_dim", "pr_recon_frac")}
    text.append(f"**Dimensionality (gate D3).** Participation ratio of the activation covariance "
                f"{dims['pr_act']['small']:.3g} (small) vs {dims['pr_act']['large']:.3g} (large); TwoNN intrinsic "
                f"dimension {dims['twonn_dim']['small']:.3g} vs {dims['twonn_dim']['large']:.3g}. These are one "
                f"number per model, so they cannot rank pairs; claim C6 uses the per-SAE share of the input's "
                f"participation ratio that the reconstruction keeps (mean {dims['pr_recon_frac']['small']:.3g} "
                f"small, {dims['pr_recon_frac']['large']:.3g} large), as Δ per pair (`d_dim`).")
    ratio = {r: _role_mean(m, "random_error_ratio", r) for r in SIDES}
    if not any(np.isnan(v) for v in ratio.values()):
        text.append(f"**Random-error baseline (Gurnee 2024).** Spliced in, the SAE's error raises KL "
                    f"{ratio['small']:.3g}× (small) and {ratio['large']:.3g}× (large) as much as a random error of "
                    f"the same norm per token (mean over SAEs; Gurnee found 2–4.5×); > 1 "
                    f"means the error points where the model is sensitive. The figure shows its trend over budget.")
    return "\n\n".join(text)


def proxy_glossary() -> str:
    """One paragraph: what each leaderboard proxy measures, and which are behavioural references."""
    from .leaderboard import BEHAVIOURAL_REFERENCES, DEFAULT_PROXIES, PROXY_KINDS, PROXY_TEXT

    parts = [f"`{p}` ({PROXY_KINDS[p]}): {PROXY_TEXT[p]}" for p in DEFAULT_PROXIES]
    refs = " and ".join(f"`{p}`" for p in BEHAVIOURAL_REFERENCES)
    return ("**What the proxies measure.** " + "; ".join(parts) + f". {refs} need the reconstruction patched into "
            "the model, so they are behavioural references (how close a measurement of behaviour itself comes), not "
            "cheap proxies; `d_swd` and `d_gwd` need the model's derivatives at the clean run but no patched "
            "forward; the others need only the activations and the reconstruction.")


def regime_frame(table: pd.DataFrame | None) -> pd.DataFrame:
    """Per (k, T) cell: where the budget sits in tokens per latent (T / d_sae, each model), the dead fraction of
    each model's SAEs on the eval tokens (mean over seeds), and the two uncertainties of the mean ΔCE_rec: the
    seeds' standard error (what the CIs use) and the eval set's (``stats.eval_noise``)."""
    need = {"tokens_per_latent_small", "tokens_per_latent_large", "dead_frac_small_mean", "dead_frac_large_mean"}
    if table is None or not len(table) or not need <= set(table.columns):
        return pd.DataFrame({"status": ["pending: no complete pairs yet"]})
    t = table.sort_values(["k", "tokens"])
    se = lambda c: t[c] if c in t.columns else np.nan  # noqa: E731
    out = pd.DataFrame({
        "k": t["k"], "T": t["tokens"].map(lambda x: format_tokens(int(x))),
        "tokens / latent (small, large)": [f"{a:.0f}, {b:.0f}" for a, b in
                                           zip(t["tokens_per_latent_small"], t["tokens_per_latent_large"])],
        "dead latents (small, large)": [f"{a:.1%}, {b:.1%}" for a, b in
                                        zip(t["dead_frac_small_mean"], t["dead_frac_large_mean"])],
        "seed SE of mean ΔCE_rec": se("d_ce_rec_seed_se"), "eval-sampling SE": se("d_ce_rec_eval_se"),
        "eval / seed": se("eval_to_seed_se")})
    return out.set_index(["k", "T"]).round(5)


def regime_text(table: pd.DataFrame | None, dead_target: float = 0.10) -> str:
    """Markdown: how far the grid's top budget reaches against the study's lowest, how many latents are dead
    there, and whether the eval set or the seeds limit the precision of ΔCE_rec."""
    if table is None or not len(table) or "tokens_per_latent_large" not in table.columns:
        return "_Pending: no complete pairs yet._"
    top = table[table["tokens"] == table["tokens"].max()]
    lowest = stats.reference_table()["tokens_per_latent_large"].min()  # the study's 10M tokens: 305 per latent
    reach = top["tokens_per_latent_large"].iloc[0] / lowest
    lines = [f"The largest budget, {format_tokens(int(top['tokens'].iloc[0]))} tokens, is "
             f"{top['tokens_per_latent_large'].iloc[0]:.0f} tokens per latent for the large model's SAE and "
             f"{top['tokens_per_latent_small'].iloc[0]:.0f} for the small one's: {reach:.2f}x the study's *lowest* "
             f"budget (10M tokens = 305 per latent for pythia-410m, 610 for pythia-70m)."]
    worst = top[["dead_frac_small_mean", "dead_frac_large_mean"]].max(axis=None)
    dead = (f"At that budget at most {worst:.1%} of a model's latents are dead on the eval tokens (mean over seeds"
            f"; per cell below), {'under' if worst < dead_target else 'above'} the {dead_target:.0%} aimed for.")
    if worst >= dead_target:
        dead += (" Why not lower: the dead-latent sweep (`benchmarks/dead_latents.py`, `reports/dead_latents.md`) found"
                 " no training recipe that keeps every cell of the default pair under it at 300 tokens per latent;"
                 " turning AuxK off came closest at k = 8, and the learning rate moves the quality most.")
    lines.append(dead)
    if "eval_to_seed_se" in table.columns and table["eval_to_seed_se"].notna().any():
        r = table["eval_to_seed_se"]
        lines.append(f"The eval set's sampling error of the mean ΔCE_rec is {r.min():.2f}-{r.max():.2f} times the "
                     "seeds' standard error across cells" + (": the eval set is not what limits the precision."
                                                             if r.max() < 1 else
                                                             "; where it exceeds 1 more eval tokens would help more "
                                                             "than more seeds."))
    return " ".join(lines)
