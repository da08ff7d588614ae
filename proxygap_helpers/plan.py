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
from .files import read_json, write_json_atomic
from .grid import units
from .layout import cache_root
from .params import Params, format_tokens, short_hash

NOTEBOOK_OVERHEAD_S = 6.0  # kernel start + imports (torch, sae_lens) per executed notebook, measured here
# Evaluation in LM forwards per eval token (metrics.evaluate_saes), measured at 512 x 128 eval tokens with the
# default grid's shapes, one thread, CPU time (2026-11-30): once per unit and model, the activation statistics,
# the clean forward and its backward, the zero and mean ablations and TwoNN (5.1 large, 9.1 small); per SAE,
# its patched forward, the JVP (~3), the SAE itself and its statistics (6.7-7.1), plus the random-error draws
# on their subset. (The former one-SAE-at-a-time evaluation measured 10.5 / 15.0 per SAE there.)
EVAL_MODEL_FORWARD_EQUIV = 7.0
EVAL_FORWARD_EQUIV = 7.0
SAE_FIXED_S = 1.0  # per training run: SAE + trainer set-up, norm-estimate batches, saving


def _time_it(fn, reps: int) -> float:
    """Best of ``reps`` timed calls after two warm-up calls (the best is the least disturbed by other load)."""
    fn(), fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


SAE_GEMM_EFFICIENCY = 0.5  # SAELens train-step FLOP rate / dense matmul rate at large shapes (benchmarks: 0.35-0.9)
FAST_ENCODER_FRACTION = 0.5  # fast engine tokens/s / the encoder GEMM's alone (reports/benchmarks.md)
BIG = 2**24  # d_in * d_sae above which a shape is estimated from FLOPs instead of timed train steps


def _gemm_rate(m: int, k: int, n: int) -> float:
    """Dense matmul FLOP/s at [m, k] @ [k, n] on this machine."""
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    return 2 * m * k * n / _time_it(lambda: a @ b, 5)


PHASE_S = 2.0  # seconds per timed phase of the unit calibration
AUX_DEAD_FRACTION = 0.25  # fast trainer: its AuxK costs in proportion to the dead latents (SAELens': always all)


def _rate(fn, seconds: float) -> float:
    """Calls per second of ``fn`` over ``seconds`` of repeated calls, after one warm-up call."""
    fn()
    n, t0 = 0, time.perf_counter()
    while (dt := time.perf_counter() - t0) < seconds:
        fn()
        n += 1
    return n / dt


def _calibrate_unit(p: Params, role: str, barrier=None) -> dict:
    """What one SAE unit of ``role`` does, timed with its torch threads (``executor.threads``):
    ``sae_tok_s`` for a plain TopK train step (the params' trainer, this role's d_in, d_sae, k and batch
    size), ``sae_aux_tok_s`` for a step with AuxK on (what steps cost once ``dead_tokens_window`` tokens have
    passed; SAELens' AuxK step costs the same whatever the dead count, the fast engine's grows with it and is
    timed with AUX_DEAD_FRACTION of the latents dead), ``eval_forward_tok_s`` for an LM forward of one evaluation
    batch. ``barrier`` (when the grid runs several units at once) starts the fixed-length phases together,
    so that the rates include the contention between concurrent units. Shapes too big to time here
    (Pythia) are estimated from FLOPs: 12 d_in d_sae per SAE token at SAE_GEMM_EFFICIENCY of the matmul
    rate (AuxK adds a second decode: ~1.5x) and 2 x parameters per forward token."""
    import torch

    from .training import make_sae, make_trainer

    d_in, d_sae = p.d_in(role), p.d_sae(role)
    threads = p.threads
    torch.set_num_threads(threads)
    m = p.models[role]
    if m.source == "hub" or d_in * d_sae > BIG:
        if p.sae.trainer == "fast":  # only the encoder GEMM is O(d_in d_sae) per token
            plain = FAST_ENCODER_FRACTION * _gemm_rate(64, d_in, d_sae) / (2 * d_in * d_sae)
        else:
            plain = SAE_GEMM_EFFICIENCY * _gemm_rate(64, d_in, d_sae) / (12 * d_in * d_sae)
        return {"sae_tok_s": plain, "sae_aux_tok_s": plain / 1.5, "eval_forward_tok_s": _flop_forward_rate(p, role),
                "threads": threads}
    from transformers import GPTNeoXForCausalLM

    from .models import neox_config

    if p.sae.trainer == "fast":
        from .engine import calibration_step

        bs = p.sae.batch_size
        plain_step = calibration_step(p, role, p.sae.k[0])
        aux_step = calibration_step(p, role, p.sae.k[0], dead_fraction=AUX_DEAD_FRACTION)
    else:
        bs = min(p.sae.batch_size, 1024)
        x = torch.randn(bs, d_in)
        sae = make_sae(p, role, p.sae.k[0], 0, "calibration", p.data.context_size, p.layers(role)[0])
        tr = make_trainer(p, sae, 10 * bs, "cpu", iter(()))

        def plain_step():
            tr.step(x)

        def aux_step():
            tr.n_forward_passes_since_fired.fill_(tr.cfg.dead_feature_window + 1)  # every latent dead
            tr.step(x)
    model = GPTNeoXForCausalLM(neox_config(m, p.data.vocab_size, p.data.context_size)).eval()
    xe = torch.randint(0, p.data.vocab_size, (p.evaluation.batch_sequences, p.data.context_size))

    def forward():
        with torch.no_grad():
            model(input_ids=xe)
    if barrier is not None:
        barrier.wait()
    return {"sae_tok_s": bs * _rate(plain_step, PHASE_S), "sae_aux_tok_s": bs * _rate(aux_step, PHASE_S),
            "eval_forward_tok_s": xe.numel() * _rate(forward, PHASE_S), "threads": threads}


def _calibrate_units(p: Params, role: str) -> dict:
    """:func:`_calibrate_unit` in ``min(jobs, cpu_count)`` processes at once (as the local executor runs
    SAE units), averaged; in this process when units run one at a time."""
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    n = max(1, min(p.jobs, os.cpu_count() or 1))
    if n == 1:
        return _calibrate_unit(p, role)
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(n, mp_context=ctx) as pool:
        barrier = manager.Barrier(n)
        res = list(pool.map(_calibrate_unit, [p] * n, [role] * n, [barrier] * n))
    return {k: sum(r[k] for r in res) / n for k in res[0]}


def _flop_forward_rate(p: Params, role: str) -> float:
    """Forward tokens/s from FLOPs (2 x parameters per token: blocks, embedding and unembedding) and the
    matmul rate; Pythia's vocabulary is 50304, an embedded model's is ``data.vocab_size``."""
    m = p.models[role]
    vocab = 50304 if m.source == "hub" else p.data.vocab_size
    flops = 2 * (12 * m.n_layers * m.d_model ** 2 + 2 * vocab * m.d_model)
    return _gemm_rate(512, m.d_model, 4 * m.d_model) / flops


def _calibrate_lm(p: Params, role: str) -> dict:
    """LM forward (tokens/s) and, for embedded models, train-step throughput, timed on a randomly initialised
    model of the same config; hub (Pythia) shapes are estimated from FLOPs (2 x parameters per token)."""
    import torch
    from transformers import GPTNeoXForCausalLM

    from .models import neox_config

    m = p.models[role]
    if m.source == "hub":
        return {"forward_tok_s": _flop_forward_rate(p, role)}
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
              for r in p.roles}
    key = short_hash({"machine": provenance.machine(), "torch": torch.__version__, "shapes": shapes,
                      "unit_threads": p.threads, "window": p.sae.dead_tokens_window,
                      "eval_batch": p.evaluation.batch_sequences, "jobs": p.jobs,
                      "trainer": p.sae.trainer, "precision": p.sae.precision, "v": 3})
    path = cache_root(out_dir) / "calibration.json"
    cache = read_json(path) if path.is_file() else {}
    if key not in cache:
        cache[key] = {r: {**_calibrate_units(p, r), **_calibrate_lm(p, r)} for r in p.roles}
        write_json_atomic(path, cache)
    return cache[key]


def eval_forwards_per_sae(p: Params) -> float:
    """LM forwards per eval token that each SAE adds: EVAL_FORWARD_EQUIV plus the random-error draws, each a
    forward over its subset of ``min(random_error_sequences, eval_sequences)`` sequences."""
    ev, n_seq = p.evaluation, p.data.eval_sequences
    return EVAL_FORWARD_EQUIV + ev.random_error_draws * min(ev.random_error_sequences, n_seq) / n_seq


def sae_seconds(p: Params, cal: dict, specs) -> float:
    """Train + evaluate time of these SAEs (one unit): per training run, the tokens up to
    ``dead_tokens_window`` at the plain step rate and the rest at the AuxK rate, plus SAE_FIXED_S; per model of
    the unit and hook, EVAL_MODEL_FORWARD_EQUIV forward passes over the eval tokens, and per SAE
    ``eval_forwards_per_sae``.
    Hub models produce activations online: one LM pass per unit for the fast trainer (the longest run's rows),
    one per run for the saelens trainer."""
    from .training import runs_for

    n_eval = p.data.eval_sequences * p.data.context_size
    window = p.sae.dead_tokens_window
    norm_rows = p.sae.norm_estimate_batches * p.sae.batch_size
    t, lm_rows = 0.0, []
    t += sum(EVAL_MODEL_FORWARD_EQUIV * n_eval / cal[role]["eval_forward_tok_s"]
             for role, _ in {(s.role, s.layer) for s in specs})
    for run in runs_for(p, specs):
        c = cal[run[0].role]
        total = max(s.tokens for s in run)
        t += min(total, window) / c["sae_tok_s"] + max(0, total - window) / c["sae_aux_tok_s"] + SAE_FIXED_S
        t += len(run) * eval_forwards_per_sae(p) * n_eval / c["eval_forward_tok_s"]
        lm_rows.append(total + norm_rows)
    if not p.embedded and lm_rows:
        rows = max(lm_rows) if p.sae.trainer == "fast" else sum(lm_rows)
        t += rows / cal[specs[0].role]["forward_tok_s"]
    return t


def estimate(p: Params, out_dir: Path) -> dict:
    """Estimated seconds per stage and in total (``jobs`` SAE units at a time, longest first)."""
    cal = calibration(p, out_dir)
    us = units(p, out_dir, Path("params.resolved.yaml"))
    t_extract = 0.0
    if p.embedded:
        t_extract += sum(p.models[r].train_tokens / cal[r]["train_tok_s"] for r in p.roles)
        # one LM pass per model writes the stores of all its hooks
        t_extract += sum(p.store_tokens / cal[r]["forward_tok_s"] for r in p.roles) + 25.0  # + text, tokenizer
    t_sae = _sae_unit_seconds(p, cal, us)
    sae_wall = _makespan(sorted(t_sae.values(), reverse=True), p.jobs)
    n_nb = sum(len(u.executions()) for u in us)
    other_nb = n_nb - sum(len(u.executions()) for u in us if u.stage == "sae")
    # + aggregate and report compute, per setting (pair x hook)
    total = t_extract + sae_wall + other_nb * NOTEBOOK_OVERHEAD_S + 20.0 * len(p.settings())
    return {"extract_s": t_extract, "sae_s": t_sae, "sae_wall_s": sae_wall, "notebooks": n_nb, "total_s": total,
            "calibration": cal}


def _sae_unit_seconds(p: Params, cal: dict, us) -> dict[str, float]:
    """Seconds of each SAE unit of ``us`` (``sae_seconds`` of its SAEs plus its notebook starts), by unit id."""
    specs = {s.sae_id: s for s in p.sae_specs()}
    return {u.uid: sae_seconds(p, cal, [specs[i] for i in u.sae_ids]) + len(u.executions()) * NOTEBOOK_OVERHEAD_S
            for u in us if u.stage == "sae"}


def _makespan(durations: list[float], jobs: int) -> float:
    """Wall time of running ``durations`` in order on ``jobs`` workers, each taking the next when free."""
    free = [0.0] * max(1, jobs)
    for d in durations:
        i = free.index(min(free))
        free[i] += d
    return max(free)


def disk_bytes(p: Params) -> dict:
    per = {}
    for r in p.roles:
        store = p.store_tokens * p.d_in(r) * (4 if p.data.store_dtype == "float32" else 2) if p.embedded else 0
        store *= len(p.layers(r))  # one store per hook
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
    for r in p.roles:
        m = p.models[r]
        hooks = ", ".join(p.hook(r, L) for L in p.layers(r))
        print(f"  {r:5s}: {m.name} ({m.source}), {hooks}, d_in {p.d_in(r)}, d_sae {p.d_sae(r)}")
    if len(p.settings()) > 1:
        print(f"  pairs ({p.pairs}): {', '.join(s.label for s in p.settings())}")
    print(f"  SAEs: TopK {p.sae.expansion}x, k {p.sae.k}, tokens {[format_tokens(t) for t in p.sae.tokens]}, "
          f"seeds {p.sae.seeds}, budget mode {p.sae.budget_mode}: {len(p.sae_specs())} SAEs")
    print(f"  output: {out_dir}\n")
    width = max(34, *(len(u.uid) for u in us))
    print(f"{'unit':{width}s} {'notebooks':28s} {'SAEs':>5s} {'train tokens':>13s}")
    for u in us:
        nbs = ", ".join(u.notebooks) + (f" ({len(u.executions())} runs)" if u.runs else "")
        print(f"{u.uid:{width}s} {nbs:28s} {len(u.sae_ids):5d} {format_tokens(u.tokens):>13s}")
    once = " (each unit streams its role's activations once" + (", for all its hooks)" if p.multi_hook else ")")
    print(f"SAE trainer: {p.sae.trainer}" + (once
                                              if p.sae.trainer == "fast" else " (each SAE reads its own stream)"))
    disk = disk_bytes(p)
    total_disk = sum(v for d in disk.values() for v in d.values())
    print(f"\ndisk: {_fmt_bytes(total_disk)} ("
          + ", ".join(f"{r}: store {_fmt_bytes(d['store'])}, SAEs {_fmt_bytes(d['saes'])}" for r, d in disk.items())
          + ("" if p.embedded else "; activations streamed, not stored") + ")")
    est = estimate(p, out_dir)
    dev = provenance.machine()
    print(f"estimated wall time on this machine ({dev['cpu']}, {dev['cpu_count']} cores, "
          f"{p.jobs} job(s)): {_fmt_s(est['total_s'])} "
          f"(extract {_fmt_s(est['extract_s'])}, SAEs {_fmt_s(est['sae_wall_s'])}, "
          f"{est['notebooks']} notebook starts)")
    if not p.embedded:
        print("note: this grid loads Pythia from the hub and streams the Pile: it needs internet, and a GPU "
              "to finish in hours rather than weeks (README: 'Reference grid').")


def budget_cost(p: Params, out_dir: Path, tokens: list[int], n_seeds: int) -> dict:
    """Estimated wall time here of training and evaluating the grid's k x ``n_seeds`` seeds x every model and hook at
    the extra budget(s) ``tokens`` (the proposal of ``budget_curves.next_budget``), timed like ``estimate``'s
    SAE units: the cached calibration, the grid's units (per role or shard) with their notebook starts,
    ``jobs`` units at a time.
    For an embedded grid a budget above the activation store also needs a larger store (``store_note``): the
    store's size is part of the extract hash, so raising it re-runs the grid. Returns ``total_s``,
    ``n_saes``, ``jobs``, ``store_note``; ``{"error": text}`` when the calibration fails."""
    try:
        cal = calibration(p, out_dir)
    except Exception as err:  # noqa: BLE001 - a cost estimate must not break the report
        return {"error": f"the calibration failed ({type(err).__name__}: {err})"}
    raw = p.model_dump()
    raw["sae"] |= {"tokens": sorted({int(t) for t in tokens}), "seeds": list(range(max(1, n_seeds)))}
    extra = Params.model_validate(raw)
    per_unit = _sae_unit_seconds(extra, cal, units(extra, out_dir, Path("params.resolved.yaml"))).values()
    note = ""
    if p.embedded and max(tokens) > p.store_tokens:
        note = (f"a budget above the activation store ({format_tokens(p.store_tokens)} tokens per model) needs a "
                "larger store, and adding it to this grid's `sae.tokens` changes the extract hash, so the whole "
                "grid re-runs (`plan` on the edited params gives that cost)")
    return {"total_s": _makespan(sorted(per_unit, reverse=True), p.jobs), "n_saes": len(extra.sae_specs()),
            "jobs": p.jobs, "store_note": note}
