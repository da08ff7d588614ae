"""``plan``: the units of a grid, their tokens, the disk they need and an estimated wall time here.

The time estimate comes from a short calibration on this machine (a few SAELens train steps at each role's
shapes, a few LM train steps and forwards for embedded models), cached in
``<results>/.cache/calibration.json`` per (machine, torch version, shapes). Hub models are calibrated on
randomly initialised models of the same shapes (no download).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from . import provenance
from .files import read_json, write_json_atomic
from .grid import is_complete, units
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
    """Median of ``reps`` timed calls after two warm-up calls (robust to a call disturbed by other load either
    way, where the best of a few calls understated a loaded machine's time and the mean overstated a blip)."""
    fn(), fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
    from .models import embedded_config, new_model

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
    model = new_model(embedded_config(m, p.data.vocab_size, p.data.context_size)).eval()
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
    matmul rate; a hub model's vocabulary is its config's (Pythia's 50304), an embedded model's ``data.vocab_size``."""
    m = p.models[role]
    vocab = m.vocab_size if m.source == "hub" else p.data.vocab_size
    flops = 2 * (12 * m.n_layers * m.d_model ** 2 + 2 * vocab * m.d_model)
    return _gemm_rate(512, m.d_model, 4 * m.d_model) / flops


def _calibrate_lm(p: Params, role: str) -> dict:
    """LM forward (tokens/s) and, for embedded models, train-step throughput, timed on a randomly initialised
    model of the same config; hub (Pythia) shapes are estimated from FLOPs (2 x parameters per token)."""
    import torch

    from .models import embedded_config, new_model

    m = p.models[role]
    if m.source == "hub":
        return {"forward_tok_s": _flop_forward_rate(p, role)}
    torch.set_num_threads(p.threads)
    model = new_model(embedded_config(m, p.data.vocab_size, p.data.context_size))
    # the extract's forwards: whole batches of full-length sequences (4 short ones timed mostly call overhead and
    # put the small model's forward below the large one's)
    x = torch.randint(0, p.data.vocab_size, (max(16, p.evaluation.batch_sequences), p.data.context_size))
    with torch.no_grad():
        out = {"forward_tok_s": x.numel() / _time_it(lambda: model(input_ids=x), CAL_REPS)}
    xb = torch.randint(0, p.data.vocab_size, (m.batch_size, p.data.context_size))
    opt = torch.optim.AdamW(model.parameters())

    def step():
        model(input_ids=xb, labels=xb).loss.backward()
        opt.step()
        opt.zero_grad()
    out["train_tok_s"] = xb.numel() / _time_it(step, CAL_REPS)
    return out


CAL_REPS = 7  # timed calls per LM measurement (median)
PROBE_DRIFT = 1.3  # a cached calibration is re-timed when the probe's rate now differs from then by more than this


def probe_rate(threads: int) -> float:
    """FLOP/s of a fixed [256, 512] @ [512, 512] float32 matmul with ``threads`` torch threads, the median of 9
    calls (~10 ms in all): the machine's speed *now*, recorded with a calibration and compared when it is reused."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(256, 512), torch.randn(512, 512)
        return 2 * 256 * 512 * 512 / _time_it(lambda: a @ b, 9)
    finally:
        torch.set_num_threads(before)


def _calibration_key(p: Params) -> str:
    import torch

    shapes = {r: {"d_in": p.d_in(r), "d_sae": p.d_sae(r), "bs": p.sae.batch_size,
                  "model": p.models[r].model_dump(), "ctx": p.data.context_size, "vocab": p.data.vocab_size}
              for r in p.roles}
    return short_hash({"machine": provenance.machine(), "torch": torch.__version__, "shapes": shapes,
                       "unit_threads": p.threads, "window": p.sae.dead_tokens_window,
                       "eval_batch": p.evaluation.batch_sequences, "jobs": p.jobs,
                       "trainer": p.sae.trainer, "precision": p.sae.precision, "v": 4,
                       **({"kernel": p.sae.kernel} if p.sae.kernel != "torch" else {})})


def calibration_entry(p: Params, out_dir: Path, recheck: bool = False, recalibrate: bool = False) -> tuple[dict, str]:
    """The cached calibration of this grid's shapes on this machine, timed now when there is none (or when
    ``recalibrate``), and with ``recheck`` also when :func:`probe_rate` now differs from the probe recorded with it
    by more than PROBE_DRIFT (the machine was busy then, or is now). Returns the entry (``rates`` per role,
    ``probe_flops``, ``load_avg`` and ``measured_at`` of its timing) and a note on what was done ('' when the cache
    was used as it was)."""
    key = _calibration_key(p)
    path = cache_root(out_dir) / "calibration.json"
    cache = read_json(path) if path.is_file() else {}
    entry, note = cache.get(key), ""
    if entry is not None and recalibrate:
        note = "re-timed (--recalibrate)"
    elif entry is not None and recheck:
        now = probe_rate(p.threads)
        drift = now / entry["probe_flops"]
        if not 1 / PROBE_DRIFT <= drift <= PROBE_DRIFT:
            note = (f"re-timed: this machine's matmul rate is now {drift:.2f}x the one of the cached calibration "
                    f"({entry['measured_at']}, load average {entry['load_avg']:.1f})")
    elif entry is None:
        note = "timed now (first plan of these shapes here)"
    if entry is None or note.startswith("re-timed"):
        load = os.getloadavg()[0]
        probe = probe_rate(p.threads)
        rates = {r: {**_calibrate_units(p, r), **_calibrate_lm(p, r)} for r in p.roles}
        entry = {"rates": rates, "probe_flops": probe, "load_avg": load, "measured_at": provenance.now()}
        cache[key] = entry
        write_json_atomic(path, cache)
        if load > 0.5 * (os.cpu_count() or 1):
            note += f"; the machine was busy (load average {load:.1f} on {os.cpu_count()} cores): estimates run long"
    return entry, note


def calibration(p: Params, out_dir: Path) -> dict:
    """Measured throughputs per role for this grid's shapes on this machine (cached: :func:`calibration_entry`)."""
    return calibration_entry(p, out_dir)[0]["rates"]


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


def _store_tokens(p: Params, out_dir: Path) -> int:
    """Tokens each activation store holds: ``Params.store_tokens``, at most the train split's whole rows (embedded
    grids; the split's size is cached beside the tokenizer: :func:`extract.split_tokens`)."""
    from .extract import split_tokens, store_rows

    train = split_tokens(p, out_dir)["train"]
    return max(store_rows(p, train, r) * (p.data.context_size - p.skip_positions(r)) for r in p.roles)


def estimate(p: Params, out_dir: Path, cal: dict | None = None) -> dict:
    """Estimated seconds per stage and in total of the units still to do (``jobs`` SAE units at a time, longest
    first): a finished extract, SAE unit or aggregate costs nothing; aggregate and report re-run whenever a unit
    before them does. ``pending`` lists the uids costed, ``done`` the others."""
    cal = cal or calibration(p, out_dir)
    us = units(p, out_dir, Path("params.resolved.yaml"))
    complete = {u.uid for u in us if is_complete(p, out_dir, u)}
    upstream = any(u.uid not in complete for u in us if u.stage in ("extract", "sae"))
    pending = [u for u in us if u.uid not in complete or (upstream and u.stage in ("aggregate", "report"))]
    t_extract = 0.0
    if p.embedded and any(u.stage == "extract" for u in pending):
        t_extract += sum(p.models[r].train_tokens / cal[r]["train_tok_s"] for r in p.roles)
        # one LM pass per model writes the stores of all its hooks
        store = _store_tokens(p, out_dir)
        t_extract += sum(store / cal[r]["forward_tok_s"] for r in p.roles) + 25.0  # + text, tokenizer
    t_sae = _sae_unit_seconds(p, cal, [u for u in pending if u.stage == "sae"])
    sae_wall = _makespan(sorted(t_sae.values(), reverse=True), p.jobs)
    n_nb = sum(len(u.executions()) for u in pending)
    other_nb = n_nb - sum(len(u.executions()) for u in pending if u.stage == "sae")
    # + aggregate and report compute, per setting (pair x hook)
    t_after = 20.0 * len(p.settings()) if any(u.stage == "aggregate" for u in pending) else 0.0
    total = t_extract + sae_wall + other_nb * NOTEBOOK_OVERHEAD_S + t_after
    return {"extract_s": t_extract, "sae_s": t_sae, "sae_wall_s": sae_wall, "notebooks": n_nb, "total_s": total,
            "calibration": cal, "pending": [u.uid for u in pending],
            "done": [u.uid for u in us if u not in pending]}


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


def disk_bytes(p: Params, store_tokens: int | None = None) -> dict:
    """Bytes per role: ``store`` (the activation stores of its hooks, ``store_tokens`` rows each, default
    ``Params.store_tokens``; 0 for a hub grid, whose activations are streamed) and ``saes`` (float32 weights)."""
    per = {}
    rows = p.store_tokens if store_tokens is None else store_tokens
    for r in p.roles:
        store = rows * p.d_in(r) * (4 if p.data.store_dtype == "float32" else 2) if p.embedded else 0
        store *= len(p.layers(r))  # one store per hook
        sae = (2 * p.d_in(r) * p.d_sae(r) + p.d_sae(r) + p.d_in(r)) * 4
        per[r] = {"store": store, "saes": sae * len(p.sae_specs(role=r))}
    return per


def unit_memory_bytes(p: Params, role: str, n_runs: int, store_tokens: int | None = None) -> dict:
    """Host memory of one SAE unit of ``role`` training ``n_runs`` runs at once (fast trainer): the shared
    activation buffer (``Params.buffer_rows`` float32 rows per hook, or the whole store when it is smaller) and,
    per run, the SAE's weights, their gradients and Adam's two moments (4 float32 copies); a hub grid adds the
    model (float32). The saelens trainer holds one run at a time and its own buffer: ``n_runs`` is then 1."""
    d_in, d_sae = p.d_in(role), p.d_sae(role)
    rows = p.buffer_rows(role) if store_tokens is None else min(p.buffer_rows(role), store_tokens)
    buffer = rows * d_in * 4 * len(p.layers(role))
    sae = 4 * (2 * d_in * d_sae + d_sae + d_in) * 4
    runs = n_runs if p.sae.trainer == "fast" else 1
    model = 0
    if not p.embedded:
        m = p.models[role]
        model = 4 * (12 * m.n_layers * m.d_model ** 2 + 2 * m.vocab_size * m.d_model)
    return {"buffer": buffer, "saes": runs * sae, "model": model, "total": buffer + runs * sae + model}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def _fmt_s(s: float) -> str:
    return f"{s / 3600:.1f} h" if s > 5400 else f"{s / 60:.1f} min" if s > 90 else f"{s:.0f} s"


def _makespan_note(p: Params) -> str:
    """How a grid's units spread over GPUs (one unit per GPU, e.g. a Slurm array)."""
    n = len(p.roles) * p.executor.shards
    return f"{n} SAE units, one GPU each as a Slurm array"


def _needs_internet(p: Params) -> bool:
    """A hub model without a local ``path`` (or ``config``), or the Pile without local ``pile_files``."""
    hub_model = any(p.models[r].source == "hub" and p.models[r].path is None for r in p.roles)
    return hub_model or (p.data.source == "pile" and not p.data.pile_files)


def print_plan(p: Params, out_dir: Path, recalibrate: bool = False) -> None:
    """What ``plan`` prints: the grid, its units (done or pending), disk, memory per SAE unit and the time of the
    pending units here, from the cached calibration (re-timed when the machine's speed moved: see
    :func:`calibration_entry`)."""
    from .training import runs_for

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
    entry, note = calibration_entry(p, out_dir, recheck=True, recalibrate=recalibrate)
    est = estimate(p, out_dir, entry["rates"])
    pending = set(est["pending"])
    width = max(34, *(len(u.uid) for u in us))
    print(f"{'unit':{width}s} {'state':8s} {'notebooks':28s} {'SAEs':>5s} {'train tokens':>13s}")
    for u in us:
        nbs = ", ".join(u.notebooks) + (f" ({len(u.executions())} runs)" if u.runs else "")
        st = "pending" if u.uid in pending else "done"
        print(f"{u.uid:{width}s} {st:8s} {nbs:28s} {len(u.sae_ids):5d} {format_tokens(u.tokens):>13s}")
    once = " (each unit streams its role's activations once" + (", for all its hooks)" if p.multi_hook else ")")
    print(f"SAE trainer: {p.sae.trainer}" + (once
                                              if p.sae.trainer == "fast" else " (each SAE reads its own stream)"))
    store = _store_tokens(p, out_dir) if p.embedded else None
    disk = disk_bytes(p, store)
    total_disk = sum(v for d in disk.values() for v in d.values())
    short = f"; the train split holds {format_tokens(store)} tokens" if store is not None and store < p.store_tokens \
        else ""
    print(f"\ndisk: {_fmt_bytes(total_disk)} ("
          + ", ".join(f"{r}: store {_fmt_bytes(d['store'])}, SAEs {_fmt_bytes(d['saes'])}" for r, d in disk.items())
          + ("" if p.embedded else "; activations streamed, not stored") + short + ")")
    specs = {s.sae_id: s for s in p.sae_specs()}
    mem = {}
    for u in us:
        if u.stage == "sae":
            role = u.parameters["role"]
            n_runs = len(runs_for(p, [specs[i] for i in u.sae_ids]))
            m = unit_memory_bytes(p, role, n_runs, store)
            if m["total"] > mem.get(role, {"total": -1})["total"]:
                mem[role] = m
    print("memory per SAE unit: " + ", ".join(
        f"{r} up to {_fmt_bytes(m['total'])} (activation buffer {_fmt_bytes(m['buffer'])}, SAEs with Adam "
        f"{_fmt_bytes(m['saes'])}" + (f", model {_fmt_bytes(m['model'])}" if m["model"] else "") + ")"
        for r, m in mem.items()) + f"; {p.jobs} unit(s) at once")
    dev = provenance.machine()
    n_done = len(us) - len(pending)
    what = f"the {len(pending)} pending units ({n_done} done)" if n_done else f"all {len(us)} units"
    print(f"estimated wall time on this machine ({dev['cpu']}, {dev['cpu_count']} cores, {p.jobs} job(s)) of "
          f"{what}: {_fmt_s(est['total_s'])} (extract {_fmt_s(est['extract_s'])}, SAEs {_fmt_s(est['sae_wall_s'])}, "
          f"{est['notebooks']} notebook starts)")
    print(f"calibration: {note or 'cached'} ({entry['measured_at']}; `plan --recalibrate` re-times it)")
    if (gpu := gpu_hours(p)) is not None:
        print(f"on a GPU ({gpu['device']}, rates measured by benchmarks/gpu_check.py, scaled to these shapes): about "
              f"{gpu['total_fp32_hours']:.1f} GPU-hours in fp32 ({gpu['total_bf16_hours']:.1f} with sae.precision "
              "bf16): " + ", ".join(f"{r} {gpu[f'{r}_fp32_hours']:.1f} h" for r in p.roles)
              + f"; {_makespan_note(p)}")
    if _needs_internet(p):
        print("note: this grid loads its models or text from the Hugging Face hub: it needs internet (or a local "
              "cache), and a GPU to finish in hours rather than weeks (README: 'Reference grid').")
    elif not p.embedded:
        print("note: this grid reads local checkpoints and text (no internet); a GPU finishes it in hours rather "
              "than weeks (README: 'Reference grid').")


GPU_CHECK = "reports/gpu_check.json"  # benchmarks/gpu_check.py's measured GPU rates (Pythia-shaped models)


def gpu_hours(p: Params, measured: dict | None = None) -> dict | None:
    """Projected GPU-hours of a hub grid's SAE units (the fast trainer: one LM pass per unit) from the rates measured
    on a GPU (``measured``: :data:`GPU_CHECK`'s record; None when there is none, or for an embedded grid).

    Per role: its SAE tokens (every budget of every k and seed; a ladder run's longest budget) at the measured SAE
    train rate of the nearest measured shape, scaled by ``d_in x d_sae`` (the encoder GEMM's work per token), plus
    each unit's one LM pass (its longest run and the norm-estimate batches) at the measured forward-to-the-hook rate
    scaled by the FLOPs to the hook (``12 (L + 1) d^2`` per token). Returns ``{device, <role>_<precision>_hours,
    total_<precision>_hours}`` for ``fp32`` and ``bf16``. At the measured shapes it gives gpu_check's own
    ``reference_grid_gpu_hours``."""
    import math

    from .layout import REPO
    from .training import runs_for

    path = REPO / GPU_CHECK
    if measured is None and (p.embedded or not path.is_file()):
        return None
    rec = measured or read_json(path)
    hooks = {r: int(v["hook"].split(".")[1]) for r, v in rec["pipeline"]["stores"].items()}
    out: dict = {"device": rec["device"]}
    for role in p.roles:
        d_in, d_sae = p.d_in(role), p.d_sae(role)
        ref_role, ref = min(zip(("small", "large"), rec["throughput"]),
                            key=lambda rt: abs(math.log(rt[1]["d_in"] * rt[1]["d_sae"] / (d_in * d_sae))))
        sae_scale = ref["d_in"] * ref["d_sae"] / (d_in * d_sae)
        lm_scale = (hooks[ref_role] + 1) * ref["d_in"] ** 2 / ((max(p.layers(role)) + 1) * d_in ** 2)
        specs = p.sae_specs(role=role)
        sae_tokens = sum(max(s.tokens for s in run) for run in runs_for(p, specs))
        lm_tokens = p.executor.shards * (max(p.sae.tokens) + p.sae.norm_estimate_batches * p.sae.batch_size)
        lm_h = lm_tokens / (ref["lm_forward_to_hook_tokens_per_s"] * lm_scale) / 3600
        for prec in ("fp32", "bf16"):
            out[f"{role}_{prec}_hours"] = sae_tokens / (ref[f"ours_{prec}_tokens_per_s"] * sae_scale) / 3600 + lm_h
    for prec in ("fp32", "bf16"):
        out[f"total_{prec}_hours"] = sum(out[f"{r}_{prec}_hours"] for r in p.roles)
    return out


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
    bs = p.sae.batch_size  # a proposal is a round number (10M); it trains whole batches: costed as it would run
    raw["sae"] |= {"tokens": sorted({-(-int(t) // bs) * bs for t in tokens}), "seeds": list(range(max(1, n_seeds)))}
    extra = Params.model_validate(raw)
    per_unit = _sae_unit_seconds(extra, cal, units(extra, out_dir, Path("params.resolved.yaml"))).values()
    note = ""
    if p.embedded and max(tokens) > p.store_tokens:
        note = (f"a budget above the activation store ({format_tokens(p.store_tokens)} tokens per model) needs a "
                "larger store, and adding it to this grid's `sae.tokens` changes the extract hash, so the whole "
                "grid re-runs (`plan` on the edited params gives that cost)")
    return {"total_s": _makespan(sorted(per_unit, reverse=True), p.jobs), "n_saes": len(extra.sae_specs()),
            "jobs": p.jobs, "store_note": note}
