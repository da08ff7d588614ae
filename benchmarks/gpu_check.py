"""The CUDA path on a GPU machine: the pipeline on Pythia-shaped models, CPU parity, GPU throughput ratios.

Not part of ``make test`` or ``make bench`` (CI has no GPU). Usage::

    python benchmarks/gpu_check.py --out /tmp/gpu-check [--json reports/gpu_check.json]

1. Pipeline: an embedded grid whose two models have the shapes of pythia-70m (6 layers, d 512, 8 heads) and
   pythia-410m (24 layers, d 1024, 16 heads), randomly initialised (one LM step; no hub download), the
   embedded tokenizer (vocab 2048, not Pythia's 50304), mid-layer resid_post, TopK 32x. Extraction, SAE
   training and evaluation run on CUDA through the same helpers the notebooks call, then the aggregate.
2. Parity: the largest SAE of each role is evaluated again on the CPU; every metric must agree.
3. Throughput on the GPU, side by side: the fast engine (``sae.trainer: fast``; the store copied to the GPU
   once) at fp32, TF32 and bf16 vs a plain SAELens ``SAETrainer.fit`` on activations already in GPU memory
   vs the encoder GEMM alone (the engine's one dense op: the bound); our store extraction vs a bare forward
   to the hook layer.
4. The reference grid's projected GPU-hours (``params/phase2_pythia.yaml``: 1.92B SAE tokens per role, one
   LM pass per unit) at each measured rate.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proxygap_helpers import aggregate, evaluate, extract, provenance, train, training  # noqa: E402
from proxygap_helpers.activations import StoreSource, store_dir  # noqa: E402
from proxygap_helpers.params import validate_params  # noqa: E402
from run import shuffled_batches  # noqa: E402  (benchmarks/run.py, beside this file)

DEV = "cuda"  # --device: "cpu" only for a dry run of this script on a machine without a GPU
PARITY_KEYS = ("ce_clean", "ce_sae", "ce_zero", "ce_rec", "r2", "cosine", "rel_err_norm", "kl", "swd", "l0",
               "nmse", "gwd", "random_error_ratio", "pr_recon", "pr_act", "twonn_dim", "sst_per_token")
RTOL, ATOL = 1e-3, 1e-5  # CUDA vs CPU float32: different kernels and summation orders, same formulas


def gpu_params(tokens: list[int], small: bool = False) -> dict:
    shape = {"source": "embedded", "train_tokens": 128, "batch_size": 1, "rotary_pct": 0.25}
    d, heads, layers = ((32, 64), (2, 4), (2, 4)) if small else ((512, 1024), (8, 16), (6, 24))
    return {
        "name": "gpu-check", "description": "Pythia-70m/410m-shaped random GPT-NeoX pair on CUDA",
        "device": DEV,
        "data": {"source": "sympy", "context_size": 128, "vocab_size": 2048, "eval_sequences": 32,
                 "max_chars": 1_500_000 if small else 12_000_000},
        "models": {r: {**shape, "d_model": d[i], "n_layers": layers[i], "n_heads": heads[i]}
                   for i, r in enumerate(("small", "large"))},
        "sae": {"expansion": 32, "k": [16, 32], "tokens": tokens, "seeds": [0], "batch_size": 256 if small else 4096,
                "dead_tokens_window": 200_000, "norm_estimate_batches": 4, "log_every": 20},
        "evaluation": {"ce_rec": "relative", "batch_sequences": 16},
        "stats": {"bootstrap": 200}, "executor": {"kind": "local", "jobs": 1},
    }


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def pipeline(p, out: Path) -> dict:
    t = {}
    t0 = time.perf_counter()
    info = extract.run_extract(p, out, device=DEV, progress=False)
    t["extract_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for role in ("small", "large"):
        train.train_unit(p, p.sae_specs(role=role), StoreSource(store_dir(out, role)), out,
                            extract.model_name(p, role), p.data.context_size, device=DEV, progress=False)
    t["train_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    recs = [r for role in ("small", "large") for r in evaluate.evaluate_unit(p, role, out, device=DEV, progress=False)]
    t["evaluate_s"] = time.perf_counter() - t0
    tables = aggregate.run_aggregate(p, out)
    return {"timings": t, "stores": info["stores"], "metrics": recs,
            "pairs": tables["pairs"].to_dict(orient="records")}


def parity(p, out: Path, gpu_recs: list[dict]) -> dict:
    """Re-evaluate the largest-budget, largest-k SAE of each role on the CPU; max relative difference."""
    cpu_out = out.parent / (out.name + "-cpu")
    shutil.rmtree(cpu_out, ignore_errors=True)
    cpu_out.mkdir()
    for name in ("models", "saes", extract.EVAL_TOKENS):
        (cpu_out / name).parent.mkdir(parents=True, exist_ok=True)
        (cpu_out / name).symlink_to((out / name).resolve())
    res = {}
    for role in ("small", "large"):
        spec = max(p.sae_specs(role=role), key=lambda s: (s.k, s.tokens))
        (cpu,) = evaluate.evaluate_unit(p, role, cpu_out, sae_ids=[spec.sae_id], device="cpu", progress=False)
        gpu = next(r for r in gpu_recs if r["sae_id"] == spec.sae_id)
        diffs = {k: abs(cpu[k] - gpu[k]) for k in PARITY_KEYS}
        excess = {k: diffs[k] / (RTOL * abs(cpu[k]) + ATOL) for k in PARITY_KEYS}  # <= 1 passes
        res[role] = {"sae_id": spec.sae_id, "ok": max(excess.values()) <= 1, "worst": max(excess, key=excess.get),
                     "max_abs_diff": max(diffs.values()), "abs_diff": diffs,
                     "cpu": {k: cpu[k] for k in diffs}, "gpu": {k: gpu[k] for k in diffs}}
    return res


def throughput(p, out: Path, role: str, k: int, tokens: int, repeats: int = 3) -> dict:
    """The fast engine (fp32 / tf32 / bf16) vs plain SAELens fit() vs the encoder GEMM alone, interleaved, on the
    GPU; extraction vs bare forward."""
    import numpy as np

    from proxygap_helpers import models
    from proxygap_helpers.params import validate_params

    d_in, d_sae, bsz = p.d_in(role), p.d_sae(role), p.sae.batch_size
    src = StoreSource(store_dir(out, role))
    acts = torch.from_numpy(np.array(src.arr)).to(DEV)
    n_total = tokens + p.sae.norm_estimate_batches * bsz
    raw = p.model_dump(mode="json")

    def engine(precision: str):
        q = validate_params({**raw, "sae": {**raw["sae"], "precision": precision, "k": [k], "tokens": [tokens],
                                            "seeds": [0]}})
        (spec,) = q.sae_specs(role=role)

        def run():
            tmp = out.parent / "bench-train"
            shutil.rmtree(tmp, ignore_errors=True)
            train.train_unit(q, [spec], src, tmp, "bench", q.data.context_size, device=DEV, progress=False)
        return run

    def saelens():
        sae = training.make_sae(p, role, k, 0, "bench", p.data.context_size)
        tr = training.make_trainer(p, sae, tokens, DEV, shuffled_batches(acts, bsz, n_total, 0))
        with contextlib.redirect_stderr(io.StringIO()):  # fit()'s own progress bars
            tr.fit()

    x, w, b = torch.randn(bsz, d_in, device=DEV), torch.randn(d_sae, d_in, device=DEV), torch.randn(d_sae, device=DEV)

    def encoder():  # the engine's one O(batch d_in d_sae) op, for this budget's steps
        for _ in range(tokens // bsz):
            torch.addmm(b, x, w.t())

    runs = {"fp32": engine("fp32"), "tf32": engine("tf32"), "bf16": engine("bf16"), "saelens": saelens,
            "encoder": encoder}
    for fn in runs.values():  # warm-up: kernels, allocator, cuBLAS handles
        fn()
    t = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t[name].append(timed(fn))
    med = {name: statistics.median(v) for name, v in t.items()}
    res = {"role": role, "d_in": d_in, "d_sae": d_sae, "k": k, "batch_size": bsz, "tokens": tokens,
           "saelens_tokens_per_s": tokens / med["saelens"], "encoder_gemm_tokens_per_s": tokens / med["encoder"]}
    for prec in ("fp32", "tf32", "bf16"):
        res[f"ours_{prec}_tokens_per_s"] = tokens / med[prec]
        res[f"sae_train_vs_saelens_ratio_{prec}"] = statistics.median([s / o for o, s in zip(t[prec], t["saelens"])])
        res[f"sae_train_encoder_bound_fraction_{prec}"] = statistics.median(
            [e / o for o, e in zip(t[prec], t["encoder"])])

    lm = models.load_hf(extract.model_source(p, out, role), device=DEV)
    rows = np.random.default_rng(0).integers(2, p.data.vocab_size, (512, p.data.context_size))
    from proxygap_helpers.activations import write_store

    def ext():
        write_store(lm, p.layer(role), rows, out.parent / "bench-store", meta={"role": role}, progress=False)

    def bare():
        with torch.no_grad():
            for i in range(0, len(rows), 32):
                models.resid_post(lm, torch.from_numpy(rows[i:i + 32]).to(DEV), p.layer(role))
    ext(), bare()
    te, tb = [], []
    for _ in range(repeats):
        te.append(timed(ext))
        tb.append(timed(bare))
    res["extract_overhead_ratio"] = statistics.median([e / b for e, b in zip(te, tb)])
    res["extract_tokens_per_s"] = rows.size / statistics.median(te)
    res["lm_forward_to_hook_tokens_per_s"] = rows.size / statistics.median(tb)
    return res


def reference_grid_hours(throughput: list[dict]) -> dict:
    """GPU-hours of params/phase2_pythia.yaml's SAE training at each measured rate: 1.92B SAE tokens per role,
    plus the LM forward of each unit's one pass (its longest run's tokens) at the measured forward rate."""
    from proxygap_helpers.params import load_params

    ref = load_params(ROOT / "params" / "phase2_pythia.yaml")
    out = {}
    for t, role in zip(throughput, ("small", "large")):
        sae_tokens = sum(s.tokens for s in ref.sae_specs(role=role))
        lm_tokens = ref.executor.shards * (max(ref.sae.tokens) + ref.sae.norm_estimate_batches * ref.sae.batch_size)
        lm_h = lm_tokens / t["lm_forward_to_hook_tokens_per_s"] / 3600
        for name in ("fp32", "tf32", "bf16"):
            out[f"{role}_{name}_hours"] = sae_tokens / t[f"ours_{name}_tokens_per_s"] / 3600 + lm_h
        out[f"{role}_saelens_hours"] = sae_tokens / t["saelens_tokens_per_s"] / 3600 + lm_h * len(ref.sae_specs(role=role))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--tokens", type=int, nargs="+", default=[262_144, 1_048_576])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--small", action="store_true", help="tiny shapes (a quick dry run of this script)")
    a = ap.parse_args(argv)
    global DEV
    DEV = a.device
    if DEV == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; this script proves the CUDA path and needs one", file=sys.stderr)
        return 2
    p = validate_params(gpu_params(a.tokens, a.small))
    a.out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu", "machine": provenance.machine(),
              "versions": provenance.versions(), "git": provenance.git_state(), "tf32": torch.backends.cuda.matmul.allow_tf32}
    t0 = time.perf_counter()
    report["pipeline"] = pipeline(p, a.out)
    print("pipeline timings:", json.dumps(report["pipeline"]["timings"]), flush=True)
    for r in report["pipeline"]["metrics"]:
        print(f"  {r['sae_id']:32s} ce_clean {r['ce_clean']:.4f} ce_sae {r['ce_sae']:.4f} r2 {r['r2']:.4f} "
              f"cos {r['cosine']:.4f} l0 {r['l0']:.1f} train {r['train_seconds']:.1f}s eval {r['eval_seconds']:.1f}s",
              flush=True)
    report["parity"] = parity(p, a.out, report["pipeline"]["metrics"])
    for role, v in report["parity"].items():
        print(f"parity {role}: {'ok' if v['ok'] else 'MISMATCH'}, max abs diff {v['max_abs_diff']:.2e}, "
              f"worst {v['worst']}: cpu {v['cpu'][v['worst']]:.6g} vs gpu {v['gpu'][v['worst']]:.6g}", flush=True)
    report["throughput"] = [throughput(p, a.out, role, max(p.sae.k), max(p.sae.tokens)) for role in ("small", "large")]
    for t in report["throughput"]:
        print("throughput", json.dumps(t), flush=True)
    report["reference_grid_gpu_hours"] = reference_grid_hours(report["throughput"])
    print("reference grid GPU-hours:", json.dumps(report["reference_grid_gpu_hours"]), flush=True)
    report["seconds"] = time.perf_counter() - t0
    text = json.dumps(report, indent=1, default=str)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(text)
    print(f"done in {report['seconds']:.0f}s")
    return 0 if all(v["ok"] for v in report["parity"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
