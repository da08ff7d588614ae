"""Steady-state TopK SAE training steps on one GPU, side by side in one run: ours (torch and Triton kernels, fp32 and
bf16), SAELens' ``SAETrainer``, EleutherAI sparsify, dictionary_learning's TopK trainer, and the bound.

Not part of ``make test`` or ``make bench`` (CI has no GPU). Usage::

    python benchmarks/gpu_bench.py [--out reports]          # a CUDA GPU: about 6-8 minutes
    python benchmarks/gpu_bench.py --cpu-smoke --out /tmp/x  # tiny shapes on the CPU, the kernels under
                                                             # TRITON_INTERPRET=1: checks the script, measures nothing

Method (``/work/.library/device/METHOD.md``'s, the issue's): activations already in GPU memory (eight random
batches of 4096 rows, rotated, so that no batch sits in L2), every trainer's own step (forward, backward, its
optimiser, its dead-latent bookkeeping), warm-up excluded (Triton's compilation with it), CUDA events around
``STEPS`` steps, the cases of one (shape, k, dead fraction) interleaved ``REPEATS`` times, medians. Shapes: pythia-70m
(512 -> 16384) and pythia-410m (1024 -> 32768), TopK 32x, k in {8, 32}, batch 4096; with no dead latents, and with
half of them dead so that AuxK runs over 8192 / 16384 latents.

The bound at a shape is the encoder GEMM in bf16 plus one fused Adam step over the SAE's fp32 weights (both timed
here); everything else in the step is O(batch x k x d_in). ``phase2_pythia_gpu_hours`` is *projected*:
``plan.gpu_hours`` of ``params/phase2_pythia.yaml`` from the measured step rates (k 32, no dead latents) and a
measured forward to the hook of randomly initialised Pythia-shaped models; it is not a timed unit.

Peers that are not installed are reported as such (``pip install eai-sparsify``; dictionary_learning pulls nnsight,
so carry it with ``--no-deps`` to time its trainer). sparsify's forward always runs under bf16 autocast on a GPU
that has bf16, so it is compared with our bf16 step.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if "--cpu-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before proxygap_helpers.triton_step defines its kernels

import torch  # noqa: E402

from proxygap_helpers import engine, plan, sparse_step, training  # noqa: E402
from proxygap_helpers.params import load_params, validate_params  # noqa: E402

TARGETS = {"step_vs_sparsify_d1024": 2.0, "step_vs_saelens_d1024": 4.0, "step_bound_fraction_d1024": 0.5,
           "half_dead_vs_no_dead_d1024": 0.7}
TARGET_MAX = {"phase2_pythia_gpu_hours": 1.0}
GPU = {"shapes": {"d512": 512, "d1024": 1024}, "expansion": 32, "batch": 4096, "ks": (8, 32), "steps": 20,
       "repeats": 3, "warmup": 5, "buffers": 8}
SMOKE = {"shapes": {"d512": 16, "d1024": 32}, "expansion": 4, "batch": 64, "ks": (4,), "steps": 1,
         "repeats": 1, "warmup": 1, "buffers": 2}


def bench_params(cfg: dict, device: str):
    """An embedded two-model params object whose roles have the benchmark's SAE shapes (only the SAE section is
    used: nothing is trained or extracted)."""
    d = cfg["shapes"]
    model = {"source": "embedded", "train_tokens": 128, "batch_size": 1, "n_layers": 2, "rotary_pct": 1.0}
    return validate_params({
        "name": "gpu-bench", "description": "steady-state SAE steps", "device": device,
        "data": {"source": "sympy", "context_size": 128, "vocab_size": 2048, "eval_sequences": 8, "max_chars": 200_000},
        "models": {"small": {**model, "d_model": d["d512"], "n_heads": 2},
                   "large": {**model, "d_model": d["d1024"], "n_heads": 2}},
        "sae": {"expansion": cfg["expansion"], "k": list(cfg["ks"]), "tokens": [cfg["batch"] * 1000], "seeds": [0],
                "batch_size": cfg["batch"], "dead_tokens_window": cfg["batch"] * 10, "norm_estimate_batches": 1},
        "evaluation": {"ce_rec": "relative", "batch_sequences": 8}, "stats": {"bootstrap": 100},
        "executor": {"kind": "local", "jobs": 1}})


# --------------------------------------------------------------------------- the trainers' steps
def ours(p, role: str, k: int, precision: str, kernel: str, n_dead: int, xs: list, device: str):
    """The fast engine's own ``Run._train_step`` (gradient clipping, fused Adam, the LR schedule, dead-latent
    bookkeeping included); ``n_dead`` latents are marked dead before every step."""
    p = p.model_copy(update={"sae": p.sae.model_copy(update={"kernel": kernel, "precision": precision})})
    run = engine.Run(p, [p.sae_specs(role=role, k=k)[0]], Path("unused"), "bench", p.data.context_size, device, (1, 1))
    run._start()
    run.scale, run.pending = 1.0, []
    batches = itertools.cycle(xs)

    def step() -> None:
        run.since_fired.zero_()[:n_dead] = run.window + 1
        run._train_step(next(batches), precision)
    return step


def saelens(p, role: str, k: int, precision: str, n_dead: int, xs: list, device: str):
    """SAELens' ``SAETrainer.step`` (its ``TopKTrainingSAE``, Adam, clipping, scheduler), autocast for bf16."""
    sae = training.make_sae(p, role, k, 0, "bench", p.data.context_size)
    trainer = training.make_trainer(p, sae, p.sae.tokens[0], device, iter(()))
    if precision == "bf16":
        trainer.autocast_if_enabled = torch.autocast(device_type=device, dtype=torch.bfloat16)
    trainer.activation_scaler.scaling_factor = 1.0
    batches = itertools.cycle(xs)

    def step() -> None:
        trainer.n_forward_passes_since_fired[:n_dead] = trainer.cfg.dead_feature_window + 1
        trainer.step(next(batches))
        trainer.n_training_steps += 1
    return step


def sparsify(p, role: str, k: int, n_dead: int, xs: list, device: str):
    """EleutherAI sparsify's step as its ``Trainer.fit`` runs it (unit-norm decoder, FVU + AuxK / 32, the
    parallel-gradient removal, Adam, did-fire bookkeeping); None when sparsify is not installed."""
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        return None
    d_in = p.d_in(role)
    sae = SparseCoder(d_in, SparseCoderConfig(k=k, expansion_factor=p.sae.expansion), device=device,
                      dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (sae.num_latents / 2**14) ** 0.5)
    dead_mask = torch.zeros(sae.num_latents, dtype=torch.bool, device=device)
    dead_mask[:n_dead] = True
    did_fire = torch.zeros_like(dead_mask)
    batches = itertools.cycle(xs)

    def step() -> None:
        x = next(batches)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x=x, y=x, dead_mask=dead_mask if n_dead else None)
        (out.fvu + out.auxk_loss / 32).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        did_fire[out.latent_indices.flatten()] = True
    return step


def dictionary_learning(p, role: str, k: int, n_dead: int, xs: list, device: str):
    """dictionary_learning's ``TopKTrainer.update`` (its AuxK over latents dead for its own window: the dead
    fraction is not imposed on it); None when it is not installed."""
    try:
        from dictionary_learning.trainers.top_k import TopKTrainer
    except ImportError:
        return None
    trainer = TopKTrainer(steps=10**6, activation_dim=p.d_in(role), dict_size=p.d_sae(role), k=k, layer=0,
                          lm_name="bench", device=device)
    batches, n = itertools.cycle(xs), itertools.count()

    def step() -> None:
        trainer.update(next(n), next(batches))
    return step


# --------------------------------------------------------------------------- timing
def timer(device: str):
    """``measure(fn, n)``: milliseconds per call over ``n`` calls: CUDA events on a GPU (``gpu_profile.step_ms``),
    the host clock on the CPU."""
    if device == "cuda":
        from gpu_profile import step_ms  # benchmarks/gpu_profile.py, beside this file

        return step_ms

    def measure(fn, n):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) * 1e3 / n
    return measure


def bound_ms(d_in: int, d_sae: int, batch: int, device: str, measure) -> dict:
    """The encoder GEMM (bf16 and fp32 inputs) and one fused Adam step over ``2 d_sae d_in + d_sae + d_in`` fp32
    weights: the time a step cannot go below."""
    x, w = torch.randn(batch, d_in, device=device), torch.randn(d_sae, d_in, device=device)
    xb, wb = x.bfloat16(), w.bfloat16()
    params = [torch.zeros(d_sae, d_in, device=device, requires_grad=True) for _ in range(2)] + \
             [torch.zeros(d_sae, device=device, requires_grad=True), torch.zeros(d_in, device=device, requires_grad=True)]
    for t in params:
        t.grad = torch.randn_like(t)
    opt = torch.optim.Adam(params, lr=1e-4, fused=device in ("cuda", "cpu"))
    out = {}
    for name, fn in (("gemm_bf16_ms", lambda: xb @ wb.t()), ("gemm_fp32_ms", lambda: x @ w.t()), ("adam_ms", opt.step)):
        measure(fn, 3)
        out[name] = statistics.median(measure(fn, 10) for _ in range(3))
    out["bound_ms"] = out["gemm_bf16_ms"] + out["adam_ms"]
    return out


def bench_group(p, cfg, role: str, k: int, dead: float, device: str, measure) -> list[dict]:
    """Every trainer at one (shape, k, dead fraction), interleaved; ms per step and tokens/s, medians."""
    d_in, d_sae, batch = p.d_in(role), p.d_sae(role), cfg["batch"]
    g = torch.Generator(device=device).manual_seed(0)
    xs = [torch.randn(batch, d_in, device=device, generator=g) for _ in range(cfg["buffers"])]
    n_dead = int(dead * d_sae)
    cases = {}
    for precision in ("fp32", "bf16"):
        for kernel in ("torch", "triton"):
            cases[f"ours_{kernel}_{precision}"] = ours(p, role, k, precision, kernel, n_dead, xs, device)
        cases[f"saelens_{precision}"] = saelens(p, role, k, precision, n_dead, xs, device)
    cases["sparsify_bf16"] = sparsify(p, role, k, n_dead, xs, device)
    cases["dictionary_learning_fp32"] = dictionary_learning(p, role, k, n_dead, xs, device)
    times: dict[str, list[float]] = {name: [] for name, fn in cases.items() if fn is not None}
    for name in times:
        with contextlib.redirect_stdout(io.StringIO()):
            measure(cases[name], cfg["warmup"])
    for _ in range(cfg["repeats"]):
        for name in times:
            times[name].append(measure(cases[name], cfg["steps"]))
    rows = []
    for name, fn in cases.items():
        row = {"trainer": name, "d_in": d_in, "d_sae": d_sae, "k": k, "batch": batch, "dead_fraction": dead}
        if fn is None:
            row["note"] = "not installed"
        else:
            ms = statistics.median(times[name])
            row.update(step_ms=ms, tokens_per_s=batch / ms * 1e3, repeats_ms=times[name])
        rows.append(row)
    del cases, xs
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def kernel_parity(d_in: int, d_sae: int, batch: int, k: int, device: str) -> dict:
    """One fp32 step with half the latents dead through the Triton kernels and through the torch path:
    max |difference| / max |value| of the losses and the four gradients (the CPU tests check both in float64)."""
    g = torch.Generator(device=device).manual_seed(1)
    W_dec = torch.randn(d_sae, d_in, device=device, generator=g) / d_in ** 0.5
    W_enc = W_dec.clone() + 0.01 * torch.randn(d_sae, d_in, device=device, generator=g)
    b_enc, b_dec = torch.zeros(d_sae, device=device), torch.zeros(d_in, device=device)
    x = torch.randn(batch, d_in, device=device, generator=g)
    dead = torch.arange(0, d_sae, 2, device=device)
    res = {}
    for kernel in ("torch", "triton"):
        params = [t.clone().requires_grad_() for t in (W_enc, b_enc, W_dec, b_dec)]
        out = sparse_step.sparse_forward(x, *params, k=k, dead_ids=dead, aux_coefficient=1 / 32, kernel=kernel)
        res[kernel] = [out.loss.detach(), out.aux_loss.detach(), *torch.autograd.grad(out.loss, params)]
    names = ("loss", "aux_loss", "grad_W_enc", "grad_b_enc", "grad_W_dec", "grad_b_dec")
    return {n: float((a - b).abs().max() / b.abs().max()) for n, a, b in zip(names, res["triton"], res["torch"])}


def lm_forward_rate(role: str, device: str, smoke: bool) -> dict:
    """Tokens/s of a forward to the hook of ``params/phase2_pythia.yaml``'s ``role`` model, randomly initialised
    with its Pythia shape (bf16 weights on a GPU), ``models.resid_posts`` (it stops after the hook's block)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from proxygap_helpers import models

    p = load_params(ROOT / "params" / "phase2_pythia.yaml")
    layer = p.layer(role)
    d, n_layers, heads = (32, layer + 1, 2) if smoke else (p.d_in(role), layer + 1, 8 if role == "small" else 16)
    cfg = GPTNeoXConfig(vocab_size=50304, hidden_size=d, num_hidden_layers=n_layers, num_attention_heads=heads,
                        intermediate_size=4 * d, rotary_pct=0.25, use_parallel_residual=True)
    model = GPTNeoXForCausalLM(cfg).to(device).eval()
    if device == "cuda":
        model = model.bfloat16()
    ids = torch.randint(0, 50304, (2 if smoke else 32, 64 if smoke else p.data.context_size), device=device)
    measure = timer(device)
    with torch.no_grad():
        fn = lambda: models.resid_posts(model, ids, [layer])  # noqa: E731
        measure(fn, 1)
        ms = statistics.median(measure(fn, 2 if smoke else 10) for _ in range(3))
    return {"hook": f"blocks.{layer}.hook_resid_post", "tokens_per_s": ids.numel() / ms * 1e3}


def figures(rows: list[dict], bounds: dict, gpu_hours: float | None, k: int = 32) -> dict:
    """The issue's keys (module docstring) from the rows: pythia-410m's shape, k 32, bf16."""
    def tps(trainer, shape="d1024", k=k, dead=0.0):
        hit = [r for r in rows if r["trainer"] == trainer and r["shape"] == shape and r["k"] == k
               and r["dead_fraction"] == dead and "tokens_per_s" in r]
        return hit[0]["tokens_per_s"] if hit else None

    best = max((v for v in (tps("ours_triton_bf16"), tps("ours_torch_bf16")) if v), default=None)
    best_dead = max((v for v in (tps("ours_triton_bf16", dead=0.5), tps("ours_torch_bf16", dead=0.5)) if v),
                    default=None)
    ratio = lambda a, b: a / b if a and b else None  # noqa: E731
    batch = next(r["batch"] for r in rows)
    return {"step_vs_sparsify_d1024": ratio(best, tps("sparsify_bf16")),
            "step_vs_saelens_d1024": ratio(best, tps("saelens_bf16")),
            "step_bound_fraction_d1024": ratio(best, batch / bounds["d1024"]["bound_ms"] * 1e3),
            "half_dead_vs_no_dead_d1024": ratio(best_dead, best),
            "phase2_pythia_gpu_hours": gpu_hours}


def projected_hours(rows: list[dict], lm: dict, smoke: bool) -> dict | None:
    """``plan.gpu_hours`` of the reference grid from the measured rates (k 32, no dead latents; the faster kernel)."""
    if smoke:
        return None
    p = load_params(ROOT / "params" / "phase2_pythia.yaml")
    thr = []
    for role, shape in (("small", "d512"), ("large", "d1024")):
        rate = {}
        for prec in ("fp32", "bf16"):
            rate[prec] = max(r["tokens_per_s"] for r in rows if r["shape"] == shape and r["k"] == 32
                             and r["dead_fraction"] == 0 and r["trainer"] in (f"ours_torch_{prec}", f"ours_triton_{prec}")
                             and "tokens_per_s" in r)
        d_in = next(r["d_in"] for r in rows if r["shape"] == shape)
        thr.append({"d_in": d_in, "d_sae": 32 * d_in, "lm_forward_to_hook_tokens_per_s": lm[role]["tokens_per_s"],
                    "ours_fp32_tokens_per_s": rate["fp32"], "ours_bf16_tokens_per_s": rate["bf16"]})
    rec = {"device": torch.cuda.get_device_name(0), "throughput": thr,
           "pipeline": {"stores": {r: {"hook": lm[r]["hook"]} for r in ("small", "large")}}}
    return plan.gpu_hours(p, measured=rec)


def write_md(path: Path, res: dict) -> None:
    lines = [f"# GPU steady-state step benchmark ({res['device']})", "",
             f"torch {res['torch']}, triton {res['triton']}; batch {res['config']['batch']}, TopK "
             f"{res['config']['expansion']}x, {res['config']['repeats']} interleaved repeats of "
             f"{res['config']['steps']} steps, medians. Wall time {res['seconds']:.0f} s.", "",
             "| key | value | target |", "|---|---|---|"]
    for key, v in res["figures"].items():
        tgt = f">= {TARGETS[key]}" if key in TARGETS else f"<= {TARGET_MAX[key]}"
        lines.append(f"| `{key}` | {'n/a' if v is None else f'{v:.3g}'} | {tgt} |")
    lines += ["", "| shape | k | dead | trainer | ms / step | tokens/s |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        ms = f"{r['step_ms']:.3f}" if "step_ms" in r else r.get("note", "")
        tp = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else ""
        lines.append(f"| {r['shape']} | {r['k']} | {r['dead_fraction']:.0%} | {r['trainer']} | {ms} | {tp} |")
    lines += ["", "Bound per shape (ms): " + json.dumps(res["bounds"]), "",
              "Triton vs torch kernels on this GPU (fp32, half the latents dead; max |diff| / max |value|): "
              + json.dumps(res["kernel_parity"])]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "reports")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (checks the script only)")
    a = ap.parse_args(argv)
    smoke = a.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("gpu_bench: no CUDA GPU here; use --cpu-smoke to check the script", file=sys.stderr)
        return 2
    device = "cpu" if smoke else "cuda"
    cfg = SMOKE if smoke else GPU
    t0 = time.time()
    p = bench_params(cfg, device)
    measure = timer(device)
    import triton

    res = {"device": "cpu (smoke: not a measurement)" if smoke else torch.cuda.get_device_name(0),
           "torch": torch.__version__, "triton": triton.__version__, "config": cfg, "rows": [], "bounds": {}}
    for shape, role in (("d512", "small"), ("d1024", "large")):
        res["bounds"][shape] = bound_ms(p.d_in(role), p.d_sae(role), cfg["batch"], device, measure)
        for k in cfg["ks"]:
            for dead in (0.0, 0.5):
                rows = bench_group(p, cfg, role, k, dead, device, measure)
                for r in rows:
                    r["shape"] = shape
                    print(f"{shape} k={k} dead={dead:.0%} {r['trainer']:26s} "
                          + (f"{r['step_ms']:8.3f} ms  {r['tokens_per_s']:>12,.0f} tok/s" if "step_ms" in r
                             else r["note"]), flush=True)
                res["rows"] += rows
    res["kernel_parity"] = kernel_parity(p.d_in("large"), p.d_sae("large"), cfg["batch"], max(cfg["ks"]), device)
    lm = {role: lm_forward_rate(role, device, smoke) for role in ("small", "large")}
    res["lm_forward"] = lm
    hours = projected_hours(res["rows"], lm, smoke)
    res["phase2_pythia_projection"] = hours
    res["figures"] = figures(res["rows"], res["bounds"], hours["total_bf16_hours"] if hours else None, max(cfg["ks"]))
    res["seconds"] = time.time() - t0
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu_bench.json").write_text(json.dumps(res, indent=1))
    write_md(a.out / "gpu_bench.md", res)
    print(json.dumps(res["figures"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
