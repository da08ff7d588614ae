#!/usr/bin/env python
"""Ratio benchmarks of the pipeline: ``make bench`` (or ``python benchmarks/run.py [--quick]``).

Every figure is a RATIO of two measurements taken in the same run, on the same shapes, interleaved
(A, B, A, B, ...), each repeated; the figure is the median of the per-repeat ratios. Absolute timings on a
shared 2-core machine mean little; ratios taken side by side survive the noise much better.

Writes ``reports/benchmarks.json`` (flat keys -> floats) and ``reports/benchmarks.md`` (machine, versions,
each figure with its target and what was compared, and the notes of ``benchmarks/notes.md``).
Scratch space: ``results/bench/`` (ignored by git; safe to delete).

Figures (see the table in reports/benchmarks.md):
  extract_overhead_ratio            write_store / bare HF forward (to the hook layer) on the same tokens
  sae_train_vs_saelens_ratio        the fast engine's tokens/s / SAELens SAETrainer.fit() in memory (worst shape)
  peer_trainer_ratio                the fast engine's tokens/s / EleutherAI sparsify's Trainer (worst shape)
  sae_train_encoder_bound_fraction  the fast engine's tokens/s / what the encoder GEMM alone allows (worst shape)
  lm_tokens_per_sae_token           hub path: LM tokens computed / SAE tokens trained, one unit of N SAEs
  grid_vs_naive_speedup             naive per-SAE pipeline (LanguageModelSAETrainingRunner) / our `run`
  orchestration_overhead_fraction   sum(unit wall - in-notebook compute) / sum(unit wall) of our `run`
  rss_growth_ratio                  peak RSS training at 4x a budget / at 1x (fresh subprocesses)
  time_vs_budget_exponent           slope of log(train time) on log(budget) over 3 budgets
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import importlib.metadata as md
import io
import json
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
WORK = ROOT / "results" / "bench"
GRID = HERE / "grid.yaml"
REPORT_JSON = ROOT / "reports" / "benchmarks.json"
REPORT_MD = ROOT / "reports" / "benchmarks.md"
ROLE = "large"  # extraction and training benchmarks use the large model's shapes (d_in 128, d_sae 4096)
AUXK_WINDOW = 512  # scaling children: latents count as dead after one step, so AuxK runs from the start at
#                   every budget (with 4 AuxK-free steps the 1x budget had 20% cheap steps, the 4x 5%: slope > 1)
SCALING_ROLE = "small"  # RSS / budget scaling: the small model's shapes (d_in 64), 4x cheaper per token

TARGETS = {
    "extract_overhead_ratio": ("<=", 1.15),
    "sae_train_vs_saelens_ratio": (">=", 4.0),
    "peer_trainer_ratio": (">=", 1.5),
    "sae_train_encoder_bound_fraction": (">=", 0.5),
    "lm_tokens_per_sae_token": ("<= 1/N", None),  # N = SAEs per unit, measured with the figure
    "grid_vs_naive_speedup": (">=", 3.0),
    "orchestration_overhead_fraction": ("<=", 0.10),
    "rss_growth_ratio": ("<=", 1.2),
    "time_vs_budget_exponent": ("in", (0.9, 1.1)),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def median(xs):
    return float(statistics.median(xs))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@contextlib.contextmanager
def quiet():
    """Silence stdout/stderr of chatty libraries (tqdm bars, prints) inside a measurement."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield


def bench_params(overrides: dict | None = None):
    from proxygap_helpers.params import load_params

    return load_params(GRID, overrides)


# --------------------------------------------------------------------------- setup
def setup(quick: bool) -> dict:
    """Models (trained once, cached under results/bench/.cache), eval tokens and stores of the bench grid."""
    from proxygap_helpers import extract

    os.environ["PROXYGAP_CACHE"] = str(WORK / ".cache")
    p = bench_params()
    out = WORK / "setup"
    t0 = time.time()
    info = extract.run_extract(p, out, device="cpu", progress=False)
    log(f"setup: models and stores ready in {time.time() - t0:.1f}s ({out})")
    return {"out": out, "p": p, "info": info}


_ROWS: dict = {}


def store_seqs(p, out: Path):
    """(all training rows, the rows the bench store was built from), as extract.run_extract selects them."""
    import numpy as np

    from proxygap_helpers import data, extract

    key = (str(out), p.data.context_size)
    if key in _ROWS:
        return _ROWS[key]
    _, _, _, train_ids, _ = extract._tokenized(p, out, False)
    rows = data.to_sequences(train_ids, p.data.context_size)
    n_rows = min(len(rows), -(-p.store_tokens // p.data.context_size))
    pick = np.sort(np.random.default_rng(p.data.seed).permutation(len(rows))[:n_rows])
    _ROWS[key] = (rows, rows[pick])
    return _ROWS[key]


# --------------------------------------------------------------------------- 1. extraction
def bench_extract(ctx: dict, repeats: int, n_rows: int) -> dict:
    """write_store vs a bare HF forward (truncated after the hook layer, no hook) on the same rows and batches."""
    import numpy as np
    import torch

    from proxygap_helpers import models
    from proxygap_helpers.activations import write_store

    p, out = ctx["p"], ctx["out"]
    all_rows, _ = store_seqs(p, out)
    seqs = np.ascontiguousarray(all_rows[:n_rows])
    layer = p.layer(ROLE)
    model = models.load_hf(str(out / "models" / ROLE))
    bare = copy.deepcopy(model.base_model)  # any family: the decoder stack without its LM head
    del models.layer_list(bare)[layer + 1:]
    bs = 32  # write_store's default batch_sequences

    @torch.no_grad()
    def run_bare(m):
        for i in range(0, len(seqs), bs):
            x = torch.from_numpy(seqs[i:i + bs].astype(np.int64))
            m(input_ids=x, use_cache=False)

    @torch.no_grad()
    def run_full():
        for i in range(0, len(seqs), bs):
            x = torch.from_numpy(seqs[i:i + bs].astype(np.int64))
            model(input_ids=x, use_cache=False)

    tmp = Path(tempfile.mkdtemp(dir=WORK, prefix="extract-"))
    run_bare(bare)  # warm-up (allocator, oneDNN primitives)
    write_store(model, layer, seqs[:bs], tmp, meta={"role": ROLE}, progress=False)
    t_bare, t_ext, t_full = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter(); run_bare(bare); t_bare.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        write_store(model, layer, seqs, tmp, meta={"role": ROLE}, progress=False)
        t_ext.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); run_full(); t_full.append(time.perf_counter() - t0)
    shutil.rmtree(tmp, ignore_errors=True)
    tokens = seqs.size
    return {
        "extract_overhead_ratio": median([e / b for e, b in zip(t_ext, t_bare)]),
        "extract_vs_full_forward_ratio": median([e / f for e, f in zip(t_ext, t_full)]),
        "extract_tokens_per_s": tokens / median(t_ext),
        "bare_forward_to_layer_tokens_per_s": tokens / median(t_bare),
        "full_forward_tokens_per_s": tokens / median(t_full),
        "extract_tokens": float(tokens),
    }


# --------------------------------------------------------------------------- 2-4, 8. SAE training
def shuffled_batches(acts, bsz: int, n_total: int, seed: int):
    """The plain baseline's data: ``n_total`` rows of in-memory ``acts`` in batches of ``bsz``, reshuffled
    each epoch on the tensor's own device (CPU here, the GPU in gpu_check.py)."""
    import torch

    gen = torch.Generator(device=acts.device).manual_seed(seed)
    done = 0
    while done < n_total:
        perm = torch.randperm(len(acts), generator=gen, device=acts.device)
        for i in range(0, len(perm) - bsz + 1, bsz):
            yield acts[perm[i:i + bsz]]
            done += bsz
            if done >= n_total:
                return


TRAIN_SHAPES = tuple((role, k) for role in ("small", "large") for k in (8, 16, 32))  # d_in 64 / 128, default.yaml's k


def bench_training(ctx: dict, repeats: int, tokens: int, seed: int = 0) -> dict:
    """Ours (the fast engine) vs SAELens fit() vs the encoder GEMM alone vs sparsify's Trainer, interleaved,
    on the same activations, SAE shapes and budget, at every (d_in, k) of TRAIN_SHAPES.

    Each headline figure is the *worst* shape's (the target must hold everywhere); every shape's value is in
    the JSON (``..._d<d_in>_k<k>``)."""
    per_shape = {}
    for role, k in TRAIN_SHAPES:
        per_shape[(role, k)] = _bench_training_shape(ctx, role, k, repeats, tokens, seed)
        r = per_shape[(role, k)]
        log(f"  d_in {r['d_in']:.0f} k {k}: ours/saelens {r['vs_saelens']:.2f}, ours/encoder bound "
            f"{r['encoder_fraction']:.2f}" + (f", ours/sparsify {r['vs_peer']:.2f}" if "vs_peer" in r else ""))
    out = {}
    for (role, k), r in per_shape.items():
        tag = f"_d{r['d_in']:.0f}_k{k}"
        out.update({f"sae_train_vs_saelens_ratio{tag}": r["vs_saelens"],
                    f"sae_train_encoder_bound_fraction{tag}": r["encoder_fraction"],
                    f"sae_train_tokens_per_s{tag}": r["ours_tps"], f"saelens_fit_tokens_per_s{tag}": r["saelens_tps"],
                    f"encoder_gemm_tokens_per_s{tag}": r["encoder_tps"]})
        if "vs_peer" in r:
            out[f"peer_trainer_ratio{tag}"] = r["vs_peer"]
            out[f"peer_trainer_tokens_per_s{tag}"] = r["peer_tps"]
    rs = list(per_shape.values())
    out["sae_train_vs_saelens_ratio"] = min(r["vs_saelens"] for r in rs)
    out["sae_train_encoder_bound_fraction"] = min(r["encoder_fraction"] for r in rs)
    if all("vs_peer" in r for r in rs):
        out["peer_trainer_ratio"] = min(r["vs_peer"] for r in rs)
    out.update({"sae_train_tokens": float(tokens), "sae_batch_size": float(ctx["p"].sae.batch_size)})
    return out


def _bench_training_shape(ctx: dict, role: str, k: int, repeats: int, tokens: int, seed: int) -> dict:
    import numpy as np
    import torch

    from proxygap_helpers import train, training
    from proxygap_helpers.activations import StoreSource, store_dir

    out = ctx["out"]
    p = bench_params({"sae.tokens": [tokens], "sae.k": [k], "sae.seeds": [seed]})
    spec = p.sae_specs(role=role)[0]
    d_in, d_sae, bsz = p.d_in(role), p.d_sae(role), p.sae.batch_size
    sdir = store_dir(out, role)
    acts = torch.from_numpy(np.array(StoreSource(sdir).arr))  # the same activations, in memory
    n_total = tokens + p.sae.norm_estimate_batches * bsz

    def ours() -> float:
        tmp = Path(tempfile.mkdtemp(dir=WORK, prefix="train-"))
        t0 = time.perf_counter()
        train.train_unit(p, [spec], StoreSource(sdir), tmp, "bench", p.data.context_size, progress=False)
        dt_ = time.perf_counter() - t0
        shutil.rmtree(tmp, ignore_errors=True)
        return dt_

    def saelens() -> float:
        t0 = time.perf_counter()
        sae = training.make_sae(p, role, k, seed, "bench", p.data.context_size)
        trainer = training.make_trainer(p, sae, tokens, "cpu", shuffled_batches(acts, bsz, n_total, seed))
        with quiet():
            trainer.fit()
        return time.perf_counter() - t0

    x, w, b = torch.randn(bsz, d_in), torch.randn(d_sae, d_in), torch.randn(d_sae)

    def encoder_seconds(n_steps: int = 40) -> float:
        """What the encoder GEMM alone (the step's one O(batch d_in d_sae) op) takes for this budget."""
        for _ in range(3):
            torch.addmm(b, x, w.t())
        t0 = time.perf_counter()
        for _ in range(n_steps):
            torch.addmm(b, x, w.t())
        return (time.perf_counter() - t0) / n_steps * (tokens / bsz)

    peer = _peer_setup(ctx, p, role, tokens, k, seed)
    ours()  # warm-up (first-call costs: imports inside, oneDNN primitives)
    res: dict[str, list[float]] = {"ours": [], "saelens": [], "encoder": [], "peer": []}
    steps = [lambda: res["ours"].append(ours()), lambda: res["saelens"].append(saelens()),
             lambda: res["encoder"].append(encoder_seconds())]
    if peer is not None:
        steps.append(lambda: res["peer"].append(peer()))
    for r in range(repeats):
        for fn in steps[r % len(steps):] + steps[:r % len(steps)]:  # rotate: nobody always runs first
            fn()
    got = {"d_in": float(d_in), "ours_tps": tokens / median(res["ours"]),
           "saelens_tps": tokens / median(res["saelens"]), "encoder_tps": tokens / median(res["encoder"]),
           "vs_saelens": median([s / o for o, s in zip(res["ours"], res["saelens"])]),
           "encoder_fraction": median([e / o for o, e in zip(res["ours"], res["encoder"])])}
    if peer is not None:
        got["vs_peer"] = median([pt / o for o, pt in zip(res["ours"], res["peer"])])
        got["peer_tps"] = tokens / median(res["peer"])
    return got


class _StoredActivations:
    """What EleutherAI sparsify's Trainer takes as a model, serving stored activations: "token ids" are row
    numbers of the activation store, and the hooked module ``layers.0`` returns those rows. sparsify then
    reads the same in-memory activations as our engine and SAELens do (no language model in the timing)."""

    def __new__(cls, acts, ctx_len: int):
        import torch

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.table = torch.nn.Embedding.from_pretrained(acts, freeze=True)
                self.layers = torch.nn.ModuleList([torch.nn.Identity()])
                self.dummy_inputs = {"input_ids": torch.zeros(1, ctx_len, dtype=torch.long)}

            @property
            def base_model(self):
                return self

            @property
            def device(self):
                return self.table.weight.device

            def forward(self, input_ids, **_):
                return self.layers[0](self.table(input_ids))

        return Model()


def _peer_setup(ctx: dict, p, role: str, tokens: int, k: int, seed: int):
    """EleutherAI sparsify's own Trainer (optional ``bench`` extra) on the store's activations: a callable
    returning its wall seconds, or None when sparsify is not installed. sparsify decodes with its Triton kernel
    whenever ``triton`` imports, which on a machine without a GPU fails ("0 active drivers"); the CPU bench asks
    for its eager decoder (its own switch), as it used before triton was in the lock."""
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # read when sparsify is imported
    try:
        import sparsify  # noqa: F401
    except ImportError as e:
        ctx["peer_note"] = f"sparsify is not installed ({e}); `pip install -e '.[bench]'` adds it"
        return None
    import numpy as np
    import torch
    from datasets import Dataset

    from proxygap_helpers.activations import StoreSource, store_dir

    acts = torch.from_numpy(np.array(StoreSource(store_dir(ctx["out"], role)).arr))
    ctxlen = p.data.context_size
    seq_per_batch = max(1, p.sae.batch_size // ctxlen)
    n_rows = -(-tokens // ctxlen)
    ids = np.random.default_rng(seed).permutation(len(acts) // ctxlen * ctxlen)
    rows = np.resize(ids, n_rows * ctxlen).reshape(n_rows, ctxlen).astype(np.int64)  # row numbers, cycled
    ds = Dataset.from_dict({"input_ids": rows.tolist()}).with_format("torch")
    model = _StoredActivations(acts, ctxlen)
    steps = n_rows // seq_per_batch
    lr = p.sae.lr_for(p.d_sae(role))
    ctx["peer_note"] = (f"sparsify {md.version('eai-sparsify')} Trainer (loss fvu, Adam, AuxK {p.sae.aux_k_coefficient:g}, "
                        f"32x, {seq_per_batch} x {ctxlen} tokens per step), reading the store's activations through "
                        "a stand-in model whose hooked layer returns stored rows (no LM forward in its timing)")

    def run() -> float:
        from sparsify import SaeConfig, Trainer, TrainConfig

        tmp = tempfile.mkdtemp(dir=WORK, prefix="peer-")
        cfg = TrainConfig(SaeConfig(expansion_factor=p.sae.expansion, k=k), batch_size=seq_per_batch,
                          optimizer="adam", lr=lr, lr_warmup_steps=int(p.sae.lr_warmup_fraction * steps),
                          auxk_alpha=p.sae.aux_k_coefficient, dead_feature_threshold=p.sae.dead_tokens_window,
                          hookpoints=["layers.0"], init_seeds=[seed], log_to_wandb=False,
                          save_every=10**9, save_dir=tmp)
        prec = torch.get_float32_matmul_precision()
        t0 = time.perf_counter()
        with quiet():
            Trainer(cfg, ds, model).fit()
        t_peer = time.perf_counter() - t0
        torch.set_float32_matmul_precision(prec)  # sparsify's fit() sets "high" globally
        shutil.rmtree(tmp, ignore_errors=True)
        return t_peer

    return run


# --------------------------------------------------------------------------- the hub path's LM stream
def bench_lm_stream(ctx: dict) -> dict:
    """One unit of N SAEs on the online source (the hub path's): LM tokens run per SAE token read, for the fast
    engine (one shared stream) and for the saelens trainer (each SAE re-runs the LM)."""
    import numpy as np

    from proxygap_helpers import models, train
    from proxygap_helpers.activations import OnlineSource

    out = ctx["out"]
    p = bench_params({"sae.tokens": [10_240], "sae.k": [8, 16], "sae.seeds": [0, 1], "sae.buffer_tokens": 4096})
    lm = models.load_hf(str(out / "models" / ROLE))
    _, rows = store_seqs(p, out)

    def text(seed):  # the same token rows for every SAE, cycled (the Pile's stream in a real run)
        i = 0
        while True:
            yield rows[i % len(rows)]
            i += 1
    specs = p.sae_specs(role=ROLE)
    read = len(specs) * (p.sae.norm_estimate_batches * p.sae.batch_size + 10_240)  # rows the SAEs consume
    got = {}
    for trainer in ("fast", "saelens"):
        q = bench_params({"sae.tokens": [10_240], "sae.k": [8, 16], "sae.seeds": [0, 1], "sae.buffer_tokens": 4096,
                          "sae.trainer": trainer})
        src = OnlineSource(lm, p.layer(ROLE), text, batch_sequences=32, buffer_tokens=4096)
        tmp = Path(tempfile.mkdtemp(dir=WORK, prefix="online-"))
        t0 = time.perf_counter()
        train.train_unit(q, q.sae_specs(role=ROLE), src, tmp, "bench", p.data.context_size, progress=False)
        got[trainer] = (src.lm_tokens / read, time.perf_counter() - t0)
        shutil.rmtree(tmp, ignore_errors=True)
    _LM_SAES[0] = float(len(specs))
    return {"lm_tokens_per_sae_token": got["fast"][0], "lm_tokens_per_sae_token_saelens": got["saelens"][0],
            "lm_stream_saes_per_unit": float(len(specs)), "lm_stream_fast_seconds": got["fast"][1],
            "lm_stream_saelens_seconds": got["saelens"][1]}


# --------------------------------------------------------------------------- 5-6. RSS and budget scaling
def child_train(args) -> None:
    """Subprocess: train one SAE at ``--budget`` tokens from the bench store; print JSON on the last line."""
    os.environ["PROXYGAP_CACHE"] = str(WORK / ".cache")
    from proxygap_helpers import train
    from proxygap_helpers.activations import StoreSource, store_dir

    import sae_lens  # noqa: F401  (imported before the clock starts: a per-process cost, not a per-token one)

    # AuxK runs only once latents are dead (after dead_tokens_window tokens) and makes a step ~2x dearer on
    # CPU; a short window keeps the per-step work the same at every budget, so the slope measures the
    # pipeline, not where the budgets fall relative to the window (see notes.md).
    p = bench_params({"sae.tokens": [args.budget], "sae.k": [16], "sae.seeds": [0],
                      "sae.dead_tokens_window": AUXK_WINDOW})
    spec = p.sae_specs(role=SCALING_ROLE)[0]
    src = StoreSource(store_dir(WORK / "setup", SCALING_ROLE))
    rss0 = peak_rss_mb()
    tmp = Path(tempfile.mkdtemp(dir=WORK, prefix="child-"))
    def cpu() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    t0, c0 = time.perf_counter(), cpu()
    train.train_unit(p, [spec], src, tmp, "bench", p.data.context_size, progress=False)
    secs, cpu_secs = time.perf_counter() - t0, cpu() - c0
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"budget": args.budget, "train_seconds": secs, "cpu_seconds": cpu_secs,
                      "peak_rss_mb": peak_rss_mb(),
                      "peak_rss_before_training_mb": rss0}))


def bench_scaling(repeats: int, base_budget: int) -> dict:
    budgets = [base_budget, 2 * base_budget, 4 * base_budget]
    runs: dict[int, list[dict]] = {b: [] for b in budgets}
    for r in range(repeats):
        order = budgets[r % 3:] + budgets[:r % 3]  # rotate, so no budget always runs first
        for b in order:
            res = subprocess.run([sys.executable, str(Path(__file__)), "_train_child", "--budget", str(b)],
                                 capture_output=True, text=True, cwd=ROOT)
            if res.returncode:
                raise RuntimeError(f"training subprocess failed:\n{res.stderr[-3000:]}")
            runs[b].append(json.loads(res.stdout.strip().splitlines()[-1]))
        log(f"  scaling repeat {r + 1}/{repeats}: " + ", ".join(
            f"{b}: {runs[b][-1]['train_seconds']:.1f}s ({runs[b][-1]['cpu_seconds']:.1f} cpu-s) "
            f"{runs[b][-1]['peak_rss_mb']:.0f}MB" for b in budgets))
    t = [median([x["train_seconds"] for x in runs[b]]) for b in budgets]
    c = [median([x["cpu_seconds"] for x in runs[b]]) for b in budgets]
    rss = {b: median([x["peak_rss_mb"] for x in runs[b]]) for b in budgets}

    def slope(vals):
        xs, ys = [math.log(b) for b in budgets], [math.log(v) for v in vals]
        mx, my = sum(xs) / 3, sum(ys) / 3
        return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)

    return {
        "rss_growth_ratio": rss[budgets[2]] / rss[budgets[0]],
        # CPU seconds of the training process: the subprocesses run one after another, so wall time would
        # carry every change in the machine's load between them (see notes.md); wall slope reported beside it
        "time_vs_budget_exponent": slope(c),
        "time_vs_budget_exponent_wall": slope(t),
        "train_cpu_seconds_1x": c[0], "train_cpu_seconds_2x": c[1], "train_cpu_seconds_4x": c[2],
        "rss_peak_mb_1x": rss[budgets[0]], "rss_peak_mb_4x": rss[budgets[2]],
        "rss_before_training_mb_1x": median([x["peak_rss_before_training_mb"] for x in runs[budgets[0]]]),
        "budget_1x_tokens": float(budgets[0]),
        "train_seconds_1x": t[0], "train_seconds_2x": t[1], "train_seconds_4x": t[2],
    }


# --------------------------------------------------------------------------- 7. grid vs naive
def child_naive(args) -> None:
    """Subprocess: the naive pipeline over the bench grid's SAEs, SAELens-style.

    For each SAE: SAELens' ``LanguageModelSAETrainingRunner`` on the local ``HookedTransformer`` re-runs the
    language model over token rows for that SAE's own activations and trains it (same SAE config and
    schedule as ours), then the SAE is evaluated with the same evaluator as ours on the same eval tokens.
    Generous to the baseline: one process (one import), the token rows come pre-tokenized, and each SAE's
    activation buffer is sized for its budget rather than SAELens' default 20 batches.
    """
    import numpy as np

    t_start = time.perf_counter()
    os.environ["PROXYGAP_CACHE"] = str(WORK / ".cache")
    from datasets import Dataset
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
    from sae_lens.config import LoggingConfig

    from proxygap_helpers import models, training
    from proxygap_helpers.extract import load_eval_tokens
    from proxygap_helpers.metrics import evaluate_sae

    p = bench_params()
    src, out = WORK / "setup", Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = np.load(args.rows)
    ds = Dataset.from_dict({"input_ids": rows.astype(np.int64).tolist()})
    eval_tokens = load_eval_tokens(src)
    s, ctxlen = p.sae, p.data.context_size
    per_sae = []
    for role in ("small", "large"):
        mdir = str(src / "models" / role)
        for spec in p.sae_specs(role=role):
            t0 = time.perf_counter()
            hooked = models.load_hooked(mdir)  # a fresh run per SAE, as with one runner invocation per SAE
            sae = training.make_sae(p, role, spec.k, spec.seed, "bench", ctxlen)
            steps = max(1, spec.tokens // s.batch_size)
            window = max(1, s.dead_tokens_window // s.batch_size)
            lr = s.lr_for(p.d_sae(role))
            cfg = LanguageModelSAERunnerConfig(
                sae=sae.cfg, model_name=f"bench-{role}", hook_name=p.hook(role), dataset_path="local-rows",
                is_dataset_tokenized=True, streaming=False, context_size=ctxlen,
                training_tokens=steps * s.batch_size, train_batch_size_tokens=s.batch_size,
                lr=lr, lr_end=lr, lr_scheduler_name="constant", lr_warm_up_steps=int(s.lr_warmup_fraction * steps),
                lr_decay_steps=int(s.lr_decay_fraction * steps), n_batches_in_buffer=args.buffer_batches,
                store_batch_size_prompts=p.evaluation.batch_sequences, device="cpu", prepend_bos=False,
                logger=LoggingConfig(log_to_wandb=False), n_checkpoints=0, checkpoint_path=None,
                output_path=str(out / "saes" / spec.sae_id), n_batches_for_norm_estimate=s.norm_estimate_batches,
                dead_feature_window=window, feature_sampling_window=window, seed=spec.seed, verbose=False)
            with quiet():
                trained = LanguageModelSAETrainingRunner(cfg, override_dataset=ds, override_model=hooked,
                                                         override_sae=sae).run()
            t_train = time.perf_counter() - t0
            hf = models.load_hf(mdir)
            with quiet():
                m = evaluate_sae(hf, p.layer(role), trained, eval_tokens, batch_sequences=p.evaluation.batch_sequences,
                                 swd=p.evaluation.swd, progress=False)
            (out / f"{spec.sae_id}.json").write_text(json.dumps(m))
            per_sae.append({"sae_id": spec.sae_id, "train_seconds": t_train,
                            "total_seconds": time.perf_counter() - t0})
    print(json.dumps({"wall_seconds": time.perf_counter() - t_start, "per_sae": per_sae}))


def _our_grid(out: Path) -> dict:
    env = {**os.environ, "PROXYGAP_CACHE": str(WORK / ".cache")}
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "proxygap_helpers", "run", str(GRID), "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise RuntimeError(f"`proxygap run` failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    # "[i/N   12s] done   sae-..." lines: elapsed seconds when each unit finished
    sae_done = [float(m.group(1)) for m in re.finditer(r"^\[\d+/\d+\s+(\d+)s\] done\s+sae-", res.stdout, re.M)]
    units = [json.loads(f.read_text()) for f in sorted((out / "runs").glob("*/done.json"))]
    imports = 0.0  # in-notebook cells tagged "imports" (start-up cost, counted as overhead by executors.py)
    for nbf in (out / "runs").glob("*/*.ipynb"):
        nb = json.loads(nbf.read_text())
        imports += sum(float(c["metadata"].get("papermill", {}).get("duration") or 0) for c in nb["cells"]
                       if "imports" in c["metadata"].get("tags", []))
    wall_u = sum(u["wall_seconds"] for u in units)
    comp_u = sum(u["compute_seconds"] for u in units)
    return {"wall": wall, "through_evaluate": max(sae_done) if sae_done else wall,
            "unit_wall": wall_u, "unit_compute": comp_u, "n_units": len(units), "imports": imports,
            "n_notebooks": len(list((out / "runs").glob("*/*.ipynb"))),
            "n_saes": len(list((out / "runs").glob("*/metrics.json")))}


def _naive_grid(out: Path, rows_file: Path, buffer_batches: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, str(Path(__file__)), "_naive", "--out", str(out), "--rows", str(rows_file),
                          "--buffer-batches", str(buffer_batches)], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise RuntimeError(f"naive pipeline failed:\n{res.stderr[-3000:]}")
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    rec["wall"] = wall
    return rec


def bench_grid(ctx: dict, repeats: int) -> dict:
    import numpy as np

    p = ctx["p"]
    _, rows = store_seqs(p, ctx["out"])
    rows_file = WORK / "naive_rows.npy"
    np.save(rows_file, rows)
    buffer_batches = 8
    ours, naive = [], []
    for r in range(repeats):
        pair = [("ours", lambda: _our_grid(WORK / "grid-ours")),
                ("naive", lambda: _naive_grid(WORK / "grid-naive", rows_file, buffer_batches))]
        if r % 2:
            pair.reverse()
        for name, fn in pair:
            (ours if name == "ours" else naive).append(fn())
        log(f"  grid repeat {r + 1}/{repeats}: ours {ours[-1]['wall']:.0f}s wall ({ours[-1]['through_evaluate']:.0f}s "
            f"through evaluation), naive {naive[-1]['wall']:.0f}s")
    n_saes = len(p.sae_specs())
    assert all(o["n_saes"] == n_saes for o in ours), "our run did not produce every metrics.json"
    per_sae_train = median([median([s["train_seconds"] for s in n["per_sae"]]) for n in naive])
    return {
        "grid_vs_naive_speedup": median([n["wall"] / o["through_evaluate"] for o, n in zip(ours, naive)]),
        "grid_vs_naive_speedup_full_run": median([n["wall"] / o["wall"] for o, n in zip(ours, naive)]),
        "orchestration_overhead_fraction": median([(o["unit_wall"] - o["unit_compute"]) / o["unit_wall"] for o in ours]),
        "orchestration_overhead_seconds_per_unit": median(
            [(o["unit_wall"] - o["unit_compute"]) / o["n_units"] for o in ours]),
        "orchestration_imports_seconds_per_notebook": median([o["imports"] / o["n_notebooks"] for o in ours]),
        "orchestration_other_seconds_per_notebook": median(
            [(o["unit_wall"] - o["unit_compute"] - o["imports"]) / o["n_notebooks"] for o in ours]),
        "grid_ours_wall_seconds": median([o["wall"] for o in ours]),
        "grid_ours_through_evaluate_seconds": median([o["through_evaluate"] for o in ours]),
        "grid_naive_wall_seconds": median([n["wall"] for n in naive]),
        "grid_naive_train_seconds_per_sae": per_sae_train,
        "grid_n_saes": float(n_saes), "grid_n_units": float(ours[0]["n_units"]),
    }


# --------------------------------------------------------------------------- report
def machine() -> dict:
    """The project's provenance facts (CPU, cores, threads, versions) plus the date, load and the peer's version."""
    from proxygap_helpers import provenance

    m, vers = provenance.machine(), dict(provenance.versions())
    try:
        vers["eai-sparsify"] = md.version("eai-sparsify")
    except md.PackageNotFoundError:
        vers["eai-sparsify"] = "not installed"
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu": m["cpu"],
            "cores": m["cpu_count"], "torch_threads": m["torch_threads"], "platform": m["platform"],
            "load_average_start": os.getloadavg(), "versions": vers}


COMPARED = {
    "extract_overhead_ratio": "`activations.write_store` (HF forward with the stopping hook, copy to float32 numpy, "
                              "finite check, blake2b hash, memmap write) / the bare HF `GPTNeoXModel` forward cut after "
                              "the hook layer, same rows, 32 sequences per batch (time ratio: lower is better)",
    "sae_train_vs_saelens_ratio": "tokens/s of the fast engine (`train.train_unit`, `sae.trainer: fast`, from a "
                                  "`StoreSource`, init and save included) / `SAETrainer(...).fit()` on the same "
                                  "activations held in memory; same seeded init, schedule, budget, batch; the worst "
                                  "of d_in 64 and 128 x k 8, 16, 32 (each in the JSON)",
    "peer_trainer_ratio": "tokens/s of the fast engine / EleutherAI sparsify `Trainer.fit()` reading the same stored "
                          "activations through a stand-in model (no LM in either timing); same shapes and budget; "
                          "worst shape",
    "sae_train_encoder_bound_fraction": "tokens/s of the fast engine / tokens/s of the encoder GEMM alone "
                                        "(`addmm` of batch x d_in by d_in x d_sae, the step's one dense op) at the "
                                        "same shapes, timed between repeats; worst shape",
    "lm_tokens_per_sae_token": "hub path (`OnlineSource`, the bench grid's large model as the LM): LM tokens run / "
                               "SAE tokens read (norm-estimate batches included) when one unit trains N SAEs; the "
                               "saelens trainer's value beside it in the JSON",
    "grid_vs_naive_speedup": "naive pipeline wall (per SAE: `LanguageModelSAETrainingRunner` on a `HookedTransformer` "
                             "re-runs the LM for its activations, then the same evaluator) / our `run` wall up to the "
                             "last SAE unit done (extract + train + evaluate; aggregate/report excluded, see "
                             "`grid_vs_naive_speedup_full_run`)",
    "orchestration_overhead_fraction": "sum over units of (wall - in-notebook compute) / sum of unit walls, from "
                                       "done.json of our `run` on the bench grid",
    "rss_growth_ratio": "peak RSS (ru_maxrss) of a fresh subprocess training one SAE (small model, d_in 64) at 4x "
                        "the budget / at 1x",
    "time_vs_budget_exponent": "least-squares slope of log(fast-engine training CPU seconds) on log(budget) over "
                               "1x, 2x, 4x (fresh subprocesses run one after another, medians; dead window of one "
                               "step so AuxK runs at every budget; wall-time slope in `_wall`)",
}


def verdict(key: str, value: float | None) -> str:
    op, tgt = TARGETS[key]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not measured"
    if op == "<=":
        return "met" if value <= tgt else "MISSED"
    if op == ">=":
        return "met" if value >= tgt else "MISSED"
    if op == "in":
        return "met" if tgt[0] <= value <= tgt[1] else "MISSED"
    if op == "<= 1/N":
        return "met" if value <= 1.0 / _LM_SAES[0] + 1e-12 else "MISSED"
    return "reported"


_LM_SAES = [float("nan")]  # N of lm_tokens_per_sae_token's target, set when it is measured or read back


def target_text(key: str) -> str:
    op, tgt = TARGETS[key]
    if op == "in":
        return f"{tgt[0]} - {tgt[1]}"
    if op == "<= 1/N":
        return f"<= 1/{_LM_SAES[0]:.0f}"
    return "reported" if op == "reported" else f"{op} {tgt}"


def write_reports(results: dict, info: dict, notes: list[str], quick: bool, seconds: float) -> None:
    flat = {k: float(v) for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    flat["bench_seconds"] = float(seconds)
    flat["quick"] = 1.0 if quick else 0.0
    REPORT_JSON.parent.mkdir(parents=True, exist_ok=True)
    REPORT_JSON.write_text(json.dumps(flat, indent=2, sort_keys=True) + "\n")
    lines = ["# Benchmarks", "",
             f"Written by `make bench` (`benchmarks/run.py{' --quick' if quick else ''}`) on {info['date']} in "
             f"{seconds / 60:.1f} min{info.get('partial', '')}. Every figure is a ratio of two measurements taken in the same run, on the same "
             "shapes, interleaved, repeated; the figure is the median of the per-repeat ratios. Raw numbers: "
             "`reports/benchmarks.json`." + (" **Quick mode: fewer repeats and tokens; indicative only.**" if quick
                                               else ""), "",
             "## Machine", "",
             "| | |", "|---|---|",
             f"| CPU | {info['cpu']} |", f"| cores | {info['cores']} |", f"| torch threads | {info['torch_threads']} |",
             f"| platform | {info['platform']} |",
             f"| load average at start / end | {', '.join(f'{x:.1f}' for x in info['load_average_start'])} / "
             f"{', '.join(f'{x:.1f}' for x in info['load_average_end'])} |",
             "| versions | " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + " |", "",
             "## Figures", "",
             "| figure | value | target | verdict | what was compared |", "|---|---|---|---|---|"]
    for key in TARGETS:
        v = flat.get(key)
        shown = "—" if v is None else f"{v:.3f}"
        lines.append(f"| `{key}` | {shown} | {target_text(key)} | {verdict(key, v)} | {COMPARED[key]} |")
    lines += ["", "## Shapes and raw measurements", "", "| key | value |", "|---|---|"]
    lines += [f"| `{k}` | {v:.4g} |" for k, v in sorted(flat.items()) if k not in TARGETS]
    if notes:
        lines += ["", "## Notes from this run", ""] + [f"- {n}" for n in notes]
    static = HERE / "notes.md"
    if static.is_file():
        lines += ["", static.read_text().rstrip()]
    REPORT_MD.write_text("\n".join(lines) + "\n")


def arithmetic(p) -> dict:
    """FLOPs per token: LM forward to the hook layer vs one TopK SAE train step (12 d_in d_sae)."""
    def lm(d, layers, ctx_):
        return layers * (24 * d * d + 4 * ctx_ * d)  # 12 d^2 weights x 2, attention scores + mix (causal: ~half)
    out = {}
    for role in ("small", "large"):
        m = p.models[role]
        out[f"flops_lm_to_hook_per_token_{role}"] = float(lm(m.d_model, p.layer(role) + 1, p.data.context_size))
        out[f"flops_sae_step_per_token_{role}"] = float(12 * m.d_model * p.d_sae(role))
    return out


def derived_notes(r: dict) -> list[str]:
    """Arithmetic from this run's own numbers (see benchmarks/notes.md for the discussion)."""
    out = []
    if "bare_forward_to_layer_tokens_per_s" in r and "sae_train_tokens_per_s_d128_k16" in r:
        lm_t, sae_t = 1 / r["bare_forward_to_layer_tokens_per_s"], 1 / r["sae_train_tokens_per_s_d128_k16"]
        flop = r["flops_lm_to_hook_per_token_large"] / r["flops_sae_step_per_token_large"]
        out.append(f"per token of the large model (d_in 128): HF forward to the hook layer {lm_t * 1e6:.0f} us "
                   f"(extraction section) vs one fast-engine SAE train step, k 16, {sae_t * 1e6:.0f} us (training section); the two "
                   f"are measured minutes apart, under whatever load each moment had. By FLOPs the ratio is "
                   f"{flop:.2f} ({r['flops_lm_to_hook_per_token_large'] / 1e6:.2f}M vs "
                   f"{r['flops_sae_step_per_token_large'] / 1e6:.2f}M). With TransformerLens at 0.46x HF "
                   f"(DESIGN.md), the naive pipeline's per-SAE LM pass adds {lm_t / 0.46 / sae_t:.2f} (these "
                   f"timings) or {flop / 0.46:.2f} (FLOPs at equal efficiency) of the SAE step's cost per token; "
                   f"naive / ours is bounded by about 1 + that, plus parallel units and fixed costs.")
    if "orchestration_overhead_seconds_per_unit" in r:
        per = r["orchestration_overhead_seconds_per_unit"]
        out.append(f"orchestration: {per:.1f} s per unit outside in-notebook compute "
                   f"({r.get('orchestration_imports_seconds_per_notebook', float('nan')):.1f} s of imports cells and "
                   f"{r.get('orchestration_other_seconds_per_notebook', float('nan')):.1f} s of kernel start-up / papermill "
                   f"per notebook); <= 10% needs >= {9 * per:.0f} s of compute per unit.")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repeats (a check that it runs)")
    ap.add_argument("--only", default="", help="comma list of: extract,training,stream,scaling,grid (default all)")
    sub = ap.add_subparsers(dest="child")
    c1 = sub.add_parser("_train_child")
    c1.add_argument("--budget", type=int, required=True)
    c2 = sub.add_parser("_naive")
    c2.add_argument("--out", required=True)
    c2.add_argument("--rows", required=True)
    c2.add_argument("--buffer-batches", type=int, default=8)
    args = ap.parse_args(argv)
    if args.child == "_train_child":
        child_train(args)
        return 0
    if args.child == "_naive":
        child_naive(args)
        return 0

    t_start = time.time()
    WORK.mkdir(parents=True, exist_ok=True)
    only = set(filter(None, args.only.split(","))) or {"extract", "training", "stream", "scaling", "grid"}
    q = args.quick
    reps = 1 if q else 3
    info = machine()
    log(f"{info['cpu']}, {info['cores']} cores, torch threads {info['torch_threads']}, load {info['load_average_start']}")
    ctx = setup(q)
    results: dict = {**arithmetic(ctx["p"])}
    notes: list[str] = []
    if "extract" in only:
        log("extraction vs bare forward ...")
        results.update(bench_extract(ctx, 3 if q else 5, 64 if q else 1024))  # 131k tokens: fixed costs amortised
    if "training" in only:
        log("SAE training: ours vs SAELens fit vs GEMM vs peer ...")
        results.update(bench_training(ctx, reps, 10_240 if q else 40_960))
        if "peer_note" in ctx:
            notes.append(f"peer trainer: {ctx['peer_note']}")
    if "stream" in only:
        log("hub path: LM tokens per SAE token ...")
        results.update(bench_lm_stream(ctx))
    if "scaling" in only:
        log("RSS and time vs budget (fresh subprocesses) ...")
        results.update(bench_scaling(reps, 5_120 if q else 40_960))  # 80-320 steps: transients amortised
    if "grid" in only:
        log("grid: ours vs naive ...")
        results.update(bench_grid(ctx, 1 if q else 2))  # each repeat is minutes: the naive pipeline is slow
    notes += derived_notes(results)
    info["load_average_end"] = os.getloadavg()
    seconds = time.time() - t_start
    if args.only and REPORT_JSON.is_file():  # a partial rerun updates the previous full report
        prev = json.loads(REPORT_JSON.read_text())
        info["partial"] = (f" (a partial rerun of `--only {args.only}`, merged into the previous run's other "
                           "figures)")
        prev.pop("bench_seconds", None)
        results = {**prev, **results}
    if "lm_stream_saes_per_unit" in results:
        _LM_SAES[0] = results["lm_stream_saes_per_unit"]
        notes = [n for n in notes if not n.startswith(("per token", "orchestration:"))] + derived_notes(results)
    write_reports(results, info, notes, q, seconds)
    log(f"wrote {REPORT_JSON.relative_to(ROOT)} and {REPORT_MD.relative_to(ROOT)} in {seconds / 60:.1f} min")
    for key in TARGETS:
        if key in results:
            log(f"  {key:34s} {results[key]:8.3f}  target {target_text(key):10s} {verdict(key, results[key])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
