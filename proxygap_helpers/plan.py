"""``plan``: the units of a grid, their tokens, the disk they need and an estimated wall time here.

The time estimate comes from a short calibration on this machine (a few SAELens train steps at each role's
shapes, a few LM train steps and forwards for embedded models), cached in
``<results>/.cache/calibration.json`` per (machine, torch version, shapes). Hub models are calibrated on
randomly initialised models of the same shapes (no download).
"""

from __future__ import annotations

import time
from pathlib import Path

from . import provenance
from .extract import cache_root
from .files import read_json, write_json_atomic
from .grid import units
from .params import PYTHIA_SHAPES, ROLES, Params, format_tokens, short_hash

NOTEBOOK_OVERHEAD_S = 6.0  # kernel start + imports (torch, sae_lens) per executed notebook, measured here
EVAL_FORWARD_EQUIV = 7.0  # forwards per eval token: clean, SAE, zero, mean passes + the JVP (~3 forwards)


def _time_it(fn, reps: int) -> float:
    """Best of ``reps`` timed calls after two warm-up calls (the best is the least disturbed by other load)."""
    fn(), fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


SAE_GEMM_EFFICIENCY = 0.5  # SAE train-step FLOP rate / dense matmul rate at large shapes (benchmarks: 0.35-0.9)
BIG = 2**24  # d_in * d_sae above which a shape is estimated from FLOPs instead of timed train steps


def _gemm_rate(m: int, k: int, n: int) -> float:
    """Dense matmul FLOP/s at [m, k] @ [k, n] on this machine."""
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    return 2 * m * k * n / _time_it(lambda: a @ b, 5)


def _calibrate_sae(p: Params, role: str) -> float:
    """SAELens train-step throughput (tokens/s) at this role's d_in, d_sae, k and batch size; shapes too big to
    time quickly here (Pythia) are estimated as 12 d_in d_sae FLOPs per token at SAE_GEMM_EFFICIENCY of the
    matmul rate."""
    import torch

    from .training import make_sae, make_trainer

    d_in, d_sae = p.d_in(role), p.d_sae(role)
    if d_in * d_sae > BIG:
        return SAE_GEMM_EFFICIENCY * _gemm_rate(64, d_in, d_sae) / (12 * d_in * d_sae)
    bs = min(p.sae.batch_size, 1024)
    x = torch.randn(bs, d_in)
    sae = make_sae(p, role, p.sae.k[0], 0, "calibration", p.data.context_size)
    tr = make_trainer(p, sae, 10 * bs, "cpu", iter(()))
    return bs / _time_it(lambda: tr.step(x), 5)


def _calibrate_lm(p: Params, role: str) -> dict:
    """LM forward (tokens/s) and, for embedded models, train-step throughput, timed on a randomly initialised
    model of the same config; hub (Pythia) shapes are estimated from FLOPs (2 x parameters per token)."""
    import torch
    from transformers import GPTNeoXForCausalLM

    from .models import neox_config

    m = p.models[role]
    if m.source == "hub":
        n_layers, d, _ = PYTHIA_SHAPES[m.name.split("/")[-1].removesuffix("-deduped")]
        flops = 2 * (12 * n_layers * d * d + 2 * 50304 * d)
        return {"forward_tok_s": _gemm_rate(512, d, 4 * d) / flops}
    model = GPTNeoXForCausalLM(neox_config(m, p.data.vocab_size, p.data.context_size))
    x = torch.randint(0, p.data.vocab_size, (4, min(p.data.context_size, 256)))
    with torch.no_grad():
        out = {"forward_tok_s": x.numel() / _time_it(lambda: model(input_ids=x), 5)}
    xb = torch.randint(0, p.data.vocab_size, (m.batch_size, p.data.context_size))
    opt = torch.optim.AdamW(model.parameters())

    def step():
        model(input_ids=xb, labels=xb).loss.backward()
        opt.step()
        opt.zero_grad()
    out["train_tok_s"] = xb.numel() / _time_it(step, 5)
    return out


def calibration(p: Params, out_dir: Path) -> dict:
    """Measured throughputs for this grid's shapes on this machine (cached)."""
    import torch

    shapes = {r: {"d_in": p.d_in(r), "d_sae": p.d_sae(r), "bs": p.sae.batch_size,
                  "model": p.models[r].model_dump(), "ctx": p.data.context_size, "vocab": p.data.vocab_size}
              for r in ROLES}
    key = short_hash({"machine": provenance.machine(), "torch": torch.__version__, "shapes": shapes})
    path = cache_root(out_dir) / "calibration.json"
    cache = read_json(path) if path.is_file() else {}
    if key not in cache:
        cache[key] = {r: {"sae_tok_s": _calibrate_sae(p, r), **_calibrate_lm(p, r)} for r in ROLES}
        write_json_atomic(path, cache)
    return cache[key]


def estimate(p: Params, out_dir: Path) -> dict:
    """Estimated seconds per stage and in total (one job; ``jobs`` divides the SAE stage)."""
    cal = calibration(p, out_dir)
    us = units(p, out_dir, Path("params.resolved.yaml"))
    n_eval = p.data.eval_sequences * p.data.context_size
    t_extract = 0.0
    if p.embedded:
        t_extract += sum(p.models[r].train_tokens / cal[r]["train_tok_s"] for r in ROLES)
        t_extract += sum(p.store_tokens / cal[r]["forward_tok_s"] for r in ROLES) + 25.0  # + text, tokenizer
    t_sae = {u.uid: u.tokens / cal[u.parameters["role"]]["sae_tok_s"]
             + len(u.sae_ids) * EVAL_FORWARD_EQUIV * n_eval / cal[u.parameters["role"]]["forward_tok_s"]
             for u in us if u.stage == "sae"}
    n_nb = sum(len(u.notebooks) for u in us)
    jobs = p.executor.jobs
    sae_wall = max(sum(t_sae.values()) / jobs, max(t_sae.values()))
    total = t_extract + sae_wall + n_nb * NOTEBOOK_OVERHEAD_S / 1 + 20.0
    return {"extract_s": t_extract, "sae_s": t_sae, "sae_wall_s": sae_wall, "notebooks": n_nb, "total_s": total,
            "calibration": cal}


def disk_bytes(p: Params) -> dict:
    per = {}
    for r in ROLES:
        store = p.store_tokens * p.d_in(r) * (4 if p.data.store_dtype == "float32" else 2) if p.embedded else 0
        sae = (2 * p.d_in(r) * p.d_sae(r) + p.d_sae(r) + p.d_in(r)) * 4
        per[r] = {"store": store, "saes": sae * len(p.sae_specs(role=r))}
    return per


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def _fmt_s(s: float) -> str:
    return f"{s / 3600:.1f} h" if s > 5400 else f"{s / 60:.1f} min" if s > 90 else f"{s:.0f} s"


def print_plan(p: Params, out_dir: Path) -> None:
    us = units(p, out_dir, Path("params.resolved.yaml"))
    print(f"grid '{p.name}': {p.description}")
    for r in ROLES:
        m = p.models[r]
        print(f"  {r:5s}: {m.name} ({m.source}), {p.hook(r)}, d_in {p.d_in(r)}, d_sae {p.d_sae(r)}")
    print(f"  SAEs: TopK {p.sae.expansion}x, k {p.sae.k}, tokens {[format_tokens(t) for t in p.sae.tokens]}, "
          f"seeds {p.sae.seeds}, budget mode {p.sae.budget_mode}: {len(p.sae_specs())} SAEs")
    print(f"  output: {out_dir}\n")
    print(f"{'unit':34s} {'notebooks':28s} {'SAEs':>5s} {'train tokens':>13s}")
    for u in us:
        print(f"{u.uid:34s} {', '.join(u.notebooks):28s} {len(u.sae_ids):5d} {format_tokens(u.tokens):>13s}")
    disk = disk_bytes(p)
    total_disk = sum(v for d in disk.values() for v in d.values())
    print(f"\ndisk: {_fmt_bytes(total_disk)} ("
          + ", ".join(f"{r}: store {_fmt_bytes(d['store'])}, SAEs {_fmt_bytes(d['saes'])}" for r, d in disk.items())
          + ("" if p.embedded else "; activations streamed, not stored") + ")")
    est = estimate(p, out_dir)
    dev = provenance.machine()
    print(f"estimated wall time on this machine ({dev['cpu']}, {dev['cpu_count']} cores, "
          f"{p.executor.jobs} job(s)): {_fmt_s(est['total_s'])} "
          f"(extract {_fmt_s(est['extract_s'])}, SAEs {_fmt_s(est['sae_wall_s'])}, "
          f"{est['notebooks']} notebook starts)")
    if not p.embedded:
        print("note: this grid loads Pythia from the hub and streams the Pile: it needs internet, and a GPU "
              "to finish in hours rather than weeks (README: 'Reference grid').")
