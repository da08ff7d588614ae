"""The dead-latent study (issue 27): which training choices keep TopK latents alive on the default pair.

On the default study's pair and stores (``params/default.yaml``), at its top budget (1,228,800 tokens: 300 per
latent of the large SAE, 600 of the small one) and k in {8, 16}, one lever at a time is moved from the study's
former recipe (SAELens' TopK trainer with unit-norm init: b_dec at zero, no centring, AuxK 1/32 on the summed
error over d_in / 2 latents, a 40,960-token dead window, Gao et al.'s lr), then the levers that helped together.
Each SAE is evaluated as the study evaluates it (``evaluate.evaluate_unit``): dead fraction on the 65,536 eval
tokens, MSE, R^2, CE_rec. gamma = ||mu|| / ||sigma|| (Simon et al. 2026) is measured per model on its store.

    python benchmarks/dead_latents.py                 # every variant, seed 0 (about 55 min on 2 cores)
    python benchmarks/dead_latents.py --seeds 0 1 2 --only former recipe   # more seeds for a few variants

Writes ``reports/dead_latents.{csv,md,png}`` (full precision CSV, one row per SAE); the SAEs and the
pair's models and stores are kept under ``--out`` (resumable: finished SAEs are reused).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARAMS = ROOT / "params" / "default.yaml"
REPORTS = ROOT / "reports"
TOP = 1_228_800
BASE = {"sae.tokens": [TOP], "sae.k": [8, 16], "evaluation.swd": False, "evaluation.gwd": False,
        "evaluation.random_error_draws": 0, "executor.threads": 1}
FORMER = {"sae.b_dec_init": "zeros", "sae.center_activations": False, "sae.decoder_unit_norm": False,
          "sae.aux_k_coefficient": 1 / 32, "sae.aux_k_normalization": "none", "sae.k_aux": "half_d_in",
          "sae.aux_k_rectified": False,
          "sae.dead_tokens_window": 40960}
# name -> (the lever, overrides on top of FORMER); lr: x times Gao et al.'s 2e-4 / sqrt(d_sae / 2^14), per role
VARIANTS: dict[str, tuple[str, dict]] = {
    "former": ("the published studies' recipe", {}),
    "b_dec_mean": ("b_dec init", {"sae.b_dec_init": "mean"}),
    "b_dec_median": ("b_dec init", {"sae.b_dec_init": "geometric_median"}),
    "centred": ("input centring", {"sae.center_activations": True}),
    "aux_gao": ("AuxK coefficient", {"sae.aux_k_normalization": "residual_variance"}),
    "aux_1": ("AuxK coefficient", {"sae.aux_k_coefficient": 1.0}),
    "aux_8": ("AuxK coefficient", {"sae.aux_k_coefficient": 8.0}),
    "k_aux_256": ("k_aux", {"sae.k_aux": 256}),
    "k_aux_all": ("k_aux", {"sae.k_aux": "all_dead"}),
    "window_10k": ("dead window", {"sae.dead_tokens_window": 10240}),
    "window_160k": ("dead window", {"sae.dead_tokens_window": 163840}),
    "lr_x0.5": ("learning rate", {"lr_scale": 0.5}),
    "lr_x2": ("learning rate", {"lr_scale": 2.0}),
    "unit_norm": ("decoder constraint", {"sae.decoder_unit_norm": True}),
    "aux_0": ("AuxK coefficient", {"sae.aux_k_coefficient": 0.0}),
    "window_640k": ("dead window", {"sae.dead_tokens_window": 655360}),
    "window_160k_unit_norm": ("combined", {"sae.dead_tokens_window": 163840, "sae.decoder_unit_norm": True}),
    "aux_relu": ("AuxK codes", {"sae.aux_k_rectified": True}),
    "aux_relu_1": ("combined", {"sae.aux_k_rectified": True, "sae.aux_k_coefficient": 1.0}),
    "lr_x4": ("learning rate", {"lr_scale": 4.0}),
    "lr_x2_window_640k": ("combined", {"lr_scale": 2.0, "sae.dead_tokens_window": 655360}),
    "lr_x2_window_160k": ("combined", {"lr_scale": 2.0, "sae.dead_tokens_window": 163840}),
}


def params_for(name: str, seeds: list[int]):
    """The default study's params for one variant (lr_scale: per role, so one params per role)."""
    from proxygap_helpers.params import load_params

    over = {**BASE, **FORMER, "sae.seeds": seeds}
    lever = dict(VARIANTS[name][1])
    scale = lever.pop("lr_scale", None)
    over.update(lever)
    p = load_params(PARAMS, over)
    if scale is None:
        return {role: p for role in p.roles}
    return {role: load_params(PARAMS, {**over, "sae.lr": scale * p.sae.lr_for(p.d_sae(role))}) for role in p.roles}


def run_variant(name: str, out: str, seeds: list[int]) -> list[dict]:
    """Train and evaluate one variant's SAEs (both roles, k 8 and 16) and return one row per SAE."""
    import torch

    from proxygap_helpers import evaluate, extract, train
    from proxygap_helpers.files import read_json
    from proxygap_helpers.layout import sae_dir

    torch.set_num_threads(1)
    out_dir = Path(out)
    rows = []
    for role, p in params_for(name, seeds).items():
        specs = p.sae_specs(role=role)
        src = extract.activation_source(p, out_dir, role, [s.layer for s in specs], "cpu")
        train.train_unit(p, specs, src, out_dir, extract.model_name(p, role), p.data.context_size, progress=False)
        metrics = {m["sae_id"]: m for m in evaluate.evaluate_unit(p, role, out_dir, {s.sae_id for s in specs},
                                                                    progress=False)}
        for s in specs:
            m, meta = metrics[s.sae_id], read_json(sae_dir(out_dir, s.sae_id) / "train_meta.json")
            log = read_json(sae_dir(out_dir, s.sae_id) / "train_log.json")
            rows.append({"variant": name, "lever": VARIANTS[name][0], "role": role, "k": s.k, "seed": s.seed,
                         "tokens": s.tokens, "tokens_per_latent": s.tokens / p.d_sae(role), "d_sae": p.d_sae(role),
                         "dead_frac": m["dead_frac"], "live_latents": round((1 - m["dead_frac"]) * p.d_sae(role)),
                         "dead_frac_train": log[-1]["dead_frac"], "mse": m["mse"], "r2": m["r2"],
                         "ce_rec": m["ce_rec"], "lr": meta["lr"] if p.sae.lr is None else p.sae.lr,
                         "train_seconds": meta["train_seconds"], "sae_id": s.sae_id})
    return rows


def gamma(out_dir: Path) -> dict:
    """gamma = ||mu|| / ||sigma|| per model at the hook over its store's rows (Simon et al. 2026): the mean's norm
    over the root of the total variance."""
    import numpy as np

    p = params_for("former", [0])["small"]
    res = {}
    for role in p.roles:
        x = _store(p, out_dir, role)
        res[role] = float(np.linalg.norm(x.mean(0)) / np.sqrt(x.var(0).sum()))
    return res


def _store(p, out_dir: Path, role: str):
    import numpy as np

    from proxygap_helpers.activations import StoreSource
    from proxygap_helpers.extract import store_path

    return np.asarray(StoreSource(store_path(p, out_dir, role, p.layer(role))).arr, dtype=np.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "results" / "dead_latents"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)))
    args = ap.parse_args()
    import pandas as pd

    from proxygap_helpers import extract

    out = Path(args.out)
    t0 = time.time()
    p = params_for("former", args.seeds)["small"]
    extract.run_extract(p, out, device="cpu", progress=True)
    print(f"models and stores ready in {time.time() - t0:.0f}s", flush=True)
    rows = []
    with ProcessPoolExecutor(args.jobs) as pool:
        futs = {name: pool.submit(run_variant, name, str(out), args.seeds) for name in args.only}
        for name, f in futs.items():
            rows += f.result()
            print(f"{name}: done at {time.time() - t0:.0f}s", flush=True)
    df = pd.DataFrame(rows)
    path = REPORTS / "dead_latents.csv"
    if path.exists():  # keep the rows of variants and seeds not run now
        old = pd.read_csv(path)
        df = pd.concat([old[~old.sae_id.isin(df.sae_id)], df], ignore_index=True)
    df = df.sort_values(["variant", "role", "k", "seed"]).reset_index(drop=True)
    g = gamma(out)
    write(df, g, time.time() - t0)


def write(df, g: dict, seconds: float) -> None:
    """reports/dead_latents.{csv,md,png} from the rows of every SAE run so far."""
    from proxygap_helpers import provenance

    df.to_csv(REPORTS / "dead_latents.csv", index=False, float_format="%.17g")
    table = summary(df)
    md = [f"# Dead latents on the default pair at the top budget ({TOP:,} tokens: 300 per latent of the large SAE)",
          "", f"Generated {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')} by "
          f"`python benchmarks/dead_latents.py` ({seconds / 60:.0f} min); commit {provenance.git_state()['git_commit'][:10]}.",
          "Dead fraction on the 65,536 eval tokens; mean over seeds; deltas against the `former` recipe.",
          "", f"gamma = ||mu|| / ||sigma|| at the hook: small {g['small']:.3f}, large {g['large']:.3f}.", "",
          "## Per variant", "", "Sorted by the largest dead fraction over the four cells (small/large x k 8/16); "
          "'worse' cells: MSE above the former recipe's, or CE_rec below it, by more than 2 sqrt(2) seed SDs (the "
          "SD of the default study's three seeds at this budget; one seed per variant here); mean_d_mse_pct: the "
          "mean relative change of MSE.",
          "", md_table(ranking(table)), "", "## Per cell", "", md_table(table), ""]
    (REPORTS / "dead_latents.md").write_text("\n".join(md))
    figure(df)


def seed_sd() -> "pd.DataFrame":
    """Seed SD of MSE and CE_rec per (role, k) at the top budget, from the default study's published SAEs (the
    former recipe, three seeds): the noise of one seed's value."""
    import pandas as pd

    m = pd.read_csv(REPORTS / "default" / "sae_metrics.csv")
    top = m[m["tokens"] == TOP].rename(columns={"model_role": "role"})
    return top.groupby(["role", "k"])[["mse", "ce_rec"]].std().add_suffix("_sd")


def ranking(table):
    """One row per variant: the largest dead fraction over its cells, the cells under 10%, and the cells where MSE
    or CE_rec is worse than the former recipe's by more than 2 sqrt(2) seed SDs (both single seeds; ``seed_sd``);
    sorted by the largest dead fraction."""
    t = table.join(seed_sd(), on=["role", "k"])
    t["worse_mse"] = t["d_mse"] > 2 * 2**0.5 * t["mse_sd"]
    t["worse_ce_rec"] = t["d_ce_rec"] < -2 * 2**0.5 * t["ce_rec_sd"]
    g = t.groupby("variant")
    out = g.agg(lever=("lever", "first"), max_dead=("dead_frac", "max"), mean_dead=("dead_frac", "mean"),
                cells_under_10pct=("dead_frac", lambda d: int((d < 0.10).sum())), cells=("dead_frac", "size"),
                cells_worse_mse=("worse_mse", "sum"), cells_worse_ce_rec=("worse_ce_rec", "sum"),
                mean_d_mse_pct=("d_mse", lambda d: float((d / (t.loc[d.index, "mse"] - d)).mean() * 100)))
    return out.reset_index().sort_values("max_dead")


def md_table(df) -> str:
    """A markdown table of ``df`` (floats to 4 significant digits)."""
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in df.itertuples(index=False)]
    return "\n".join(["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
                     + ["| " + " | ".join(r) + " |" for r in cells])


def summary(df):
    """One row per (variant, role, k): mean dead fraction, MSE, R^2, CE_rec over seeds, and deltas vs former."""
    cols = ["dead_frac", "mse", "r2", "ce_rec"]
    m = df.groupby(["variant", "lever", "role", "k"], as_index=False)[cols].mean()
    m["seeds"] = df.groupby(["variant", "lever", "role", "k"]).seed.count().values
    base = m[m.variant == "former"].set_index(["role", "k"])[cols]
    for c in ("mse", "ce_rec"):
        m[f"d_{c}"] = m[c].values - base.loc[list(zip(m.role, m.k)), c].values
    order = {n: i for i, n in enumerate(VARIANTS)}
    return m.sort_values(["variant", "role", "k"], key=lambda s: s.map(order) if s.name == "variant" else s)


def figure(df) -> None:
    """Dead fraction (bars) per variant, role and k, with the 10% line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    m = df.groupby(["variant", "role", "k"], as_index=False).dead_frac.mean()
    m["cell"] = m.role + " k=" + m.k.astype(str)
    order = [v for v in VARIANTS if v in set(m.variant)]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    sns.barplot(m, x="variant", y="dead_frac", hue="cell", order=order, ax=ax)
    ax.axhline(0.10, color="k", lw=1, ls="--", label="10%")
    ax.set(ylabel="dead fraction (eval tokens)", xlabel="", title=f"Dead latents at {TOP:,} tokens by training recipe")
    ax.tick_params(axis="x", rotation=40)
    for t in ax.get_xticklabels():
        t.set_ha("right")
    ax.legend(ncols=5, fontsize=8)
    fig.tight_layout()
    fig.savefig(REPORTS / "dead_latents.png", dpi=120)


if __name__ == "__main__":
    main()
