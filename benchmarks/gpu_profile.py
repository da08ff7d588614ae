"""Where the fast engine's SAE step spends its time on a GPU: torch.profiler over engine train steps.

Not part of ``make test`` or ``make bench`` (CI has no GPU). Usage::

    python benchmarks/gpu_profile.py [--json reports/gpu_profile.json]

For the pythia-410m shape of ``gpu_check.py`` (d_in 1024, d_sae 32768, k 32, batch 4096), at fp32 and bf16,
with no dead latents and with half of them dead (AuxK over 16384 latents): the mean step time (CUDA events),
the dense encoder GEMM alone at the same shapes, and the CUDA kernels that take the most time (profiler key
averages, self CUDA time per step). This is what explains a ratio to the encoder bound far below 1. With dead
latents, both AuxK paths of ``sparse_step`` are timed (gathers of k_aux latents per row, and the dense GEMMs
CUDA uses by default), and their gradients on CUDA compared.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proxygap_helpers import engine, sparse_step  # noqa: E402
from proxygap_helpers.params import validate_params  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import gpu_params  # noqa: E402  (benchmarks/gpu_check.py: the Pythia-shaped grid)


def step_ms(fn, n: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def profile(fn, n: int, top: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile as prof

    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as pr:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in pr.key_averages():
        dev = getattr(e, "self_device_time_total", None)
        dev = e.self_cuda_time_total if dev is None else dev
        if dev > 0:
            rows.append({"name": e.key[:90], "self_cuda_ms_per_step": dev / 1e3 / n, "calls_per_step": e.count / n})
    rows.sort(key=lambda r: -r["self_cuda_ms_per_step"])
    return rows[:top]


def auxk_paths_agree(d_in: int = 1024, d_sae: int = 32768, batch: int = 4096, k: int = 32) -> dict:
    """One fp32 step's loss and gradients with AuxK over half the latents, by the gather path and by the dense
    path, on CUDA: max |difference| over max |value| per quantity (the CPU tests check both in float64)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    W_dec = torch.randn(d_sae, d_in, device="cuda", generator=g) / d_in ** 0.5
    W_enc = W_dec.clone() + 0.01 * torch.randn(d_sae, d_in, device="cuda", generator=g)
    b_enc, b_dec = torch.zeros(d_sae, device="cuda"), torch.zeros(d_in, device="cuda")
    x = torch.randn(batch, d_in, device="cuda", generator=g)
    dead = torch.arange(0, d_sae, 2, device="cuda")
    res = {}
    for dense in (False, True):
        params = [t.clone().requires_grad_() for t in (W_enc, b_enc, W_dec, b_dec)]
        out = sparse_step.sparse_forward(x, *params, k=k, dead_ids=dead, aux_coefficient=1 / 32, dense_aux=dense)
        res[dense] = [out.loss.detach(), out.aux_loss.detach(), *torch.autograd.grad(out.loss, params)]
    names = ("loss", "aux_loss", "grad_W_enc", "grad_b_enc", "grad_W_dec", "grad_b_dec")
    return {n: float((a - b).abs().max() / b.abs().max()) for n, a, b in zip(names, res[False], res[True])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args(argv)
    raw = gpu_params([524_288])
    raw["device"] = "cuda"
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cases": []}
    for precision in ("fp32", "bf16"):
        p = validate_params({**raw, "sae": {**raw["sae"], "precision": precision}})
        d_in, d_sae, bsz = p.d_in("large"), p.d_sae("large"), p.sae.batch_size
        x, w, b = (torch.randn(bsz, d_in, device="cuda"), torch.randn(d_sae, d_in, device="cuda"),
                   torch.randn(d_sae, device="cuda"))
        gemm = step_ms(lambda: torch.addmm(b, x, w.t()), 5) and step_ms(lambda: torch.addmm(b, x, w.t()), 50)
        for dead, dense in ((0.0, None), (0.5, False), (0.5, True)):
            engine.sparse_forward = functools.partial(sparse_step.sparse_forward, dense_aux=dense)
            fn = engine.calibration_step(p, "large", 32, device="cuda", dead_fraction=dead)
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            ms = step_ms(fn, a.steps)
            aux = "" if dense is None else " dense AuxK" if dense else " sparse AuxK"
            case = {"precision": precision, "dead_fraction": dead, "dense_aux": dense, "d_in": d_in, "d_sae": d_sae,
                    "k": 32, "batch_size": bsz, "step_ms": ms, "encoder_gemm_fp32_ms": gemm,
                    "encoder_bound_fraction": gemm / ms, "top_kernels": profile(fn, 10, 12)}
            out["cases"].append(case)
            print(f"{precision} dead {dead:.0%}{aux}: step {ms:.3f} ms, encoder GEMM (fp32) {gemm:.3f} ms "
                  f"({gemm / ms:.2f} of the step)", flush=True)
            for r in case["top_kernels"]:
                print(f"   {r['self_cuda_ms_per_step']:8.3f} ms  x{r['calls_per_step']:5.1f}  {r['name']}", flush=True)
    engine.sparse_forward = sparse_step.sparse_forward
    out["auxk_paths_on_cuda"] = auxk_paths_agree()
    print("AuxK paths on CUDA (fp32), max |difference| / max |value|:", json.dumps(out["auxk_paths_on_cuda"]))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
