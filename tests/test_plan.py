"""``plan``: only pending units are costed, the calibration is re-timed when the machine's speed moved (or when asked),
the store is sized by the text there is, memory per unit is the buffer plus the SAEs' Adam state, and the
"needs internet" note only where the hub is needed. Made-up throughputs stand in for the timed calibration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxygap_helpers import plan
from proxygap_helpers.files import write_json_atomic
from proxygap_helpers.grid import units
from proxygap_helpers.layout import DONE, metrics_path, store_dir
from proxygap_helpers.params import load_params

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "params" / "smoke.yaml"
CAL = {r: {"sae_tok_s": 1000.0, "sae_aux_tok_s": 500.0, "eval_forward_tok_s": 7000.0, "forward_tok_s": 1e5,
           "train_tok_s": 1e4} for r in ("small", "large")}


def _mark_done(p, out: Path, unit) -> None:
    """What a finished unit leaves that ``grid.is_complete`` reads (its done.json; an SAE unit's metrics of this
    evaluation; an extract's store metas)."""
    write_json_atomic(unit.run_dir(out) / DONE, {"unit": unit.uid, "wall_seconds": 1.0})
    for sae_id in unit.sae_ids:
        write_json_atomic(metrics_path(out, sae_id), {"sae_id": sae_id, "eval_hash": p.eval_hash})
    if unit.stage == "extract":
        for r in p.roles:
            write_json_atomic(store_dir(out, r) / "meta.json", {"role": r})


def test_only_pending_units_are_costed(tmp_path):
    p = load_params(SMOKE, {"executor.jobs": 1})
    out = tmp_path / "out"
    us = units(p, out, Path("params.resolved.yaml"))
    full = plan.estimate(p, out, CAL)
    assert full["extract_s"] > 0 and set(full["pending"]) == {u.uid for u in us} and full["done"] == []
    per_unit = plan._sae_unit_seconds(p, CAL, [u for u in us if u.stage == "sae"])
    assert full["sae_wall_s"] == pytest.approx(sum(per_unit.values()))

    extract, small = us[0], next(u for u in us if u.stage == "sae" and "small" in u.uid)
    _mark_done(p, out, extract)
    _mark_done(p, out, small)
    part = plan.estimate(p, out, CAL)
    assert part["extract_s"] == 0 and set(part["done"]) == {extract.uid, small.uid}
    assert part["sae_wall_s"] == pytest.approx(sum(v for k, v in per_unit.items() if k != small.uid))
    assert {"aggregate", "report"} <= set(part["pending"]), "they re-run after any unit before them"

    for u in us:
        _mark_done(p, out, u)
    (out / "runs" / "aggregate" / DONE).unlink()  # (aggregate/report also check their inputs' hash: not faked)
    rest = plan.estimate(p, out, CAL)
    assert rest["extract_s"] == 0 and rest["sae_wall_s"] == 0 and "aggregate" in rest["pending"]


def test_plan_prints_states_and_costs_the_pending(tmp_path, monkeypatch, capsys):
    p = load_params(SMOKE, {"executor.jobs": 1})
    out = tmp_path / "out"
    monkeypatch.setattr(plan, "calibration_entry", lambda *a, **k: ({"rates": CAL, "measured_at": "then"}, ""))
    extract = units(p, out, Path("params.resolved.yaml"))[0]
    _mark_done(p, out, extract)
    plan.print_plan(p, out)
    text = capsys.readouterr().out
    states = [line.split()[1] for line in text.splitlines() if line.split()[:1] and line.split()[0] in
              {u.uid for u in units(p, out, Path("params.resolved.yaml"))}]
    assert states == ["done", "pending", "pending", "pending", "pending"]
    assert "of the 4 pending units (1 done)" in text and "calibration: cached (then;" in text
    assert "memory per SAE unit: small up to" in text and "needs internet" not in text


def test_calibration_is_retimed_when_the_machine_speed_moved(tmp_path, monkeypatch):
    p = load_params(SMOKE)
    timed = []
    monkeypatch.setattr(plan, "_calibrate_units", lambda p, r: timed.append(r) or {"sae_tok_s": 1.0 + len(timed)})
    monkeypatch.setattr(plan, "_calibrate_lm", lambda p, r: {"forward_tok_s": 1.0})
    rate = {"now": 1e9}
    monkeypatch.setattr(plan, "probe_rate", lambda threads: rate["now"])
    load = {"now": 0.0}
    monkeypatch.setattr(plan.os, "getloadavg", lambda: (load["now"], 0.0, 0.0))
    monkeypatch.setenv("PROXYGAP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"

    first, note = plan.calibration_entry(p, out, recheck=True)
    assert "timed now" in note and len(timed) == 2 and first["probe_flops"] == 1e9
    again, note = plan.calibration_entry(p, out, recheck=True)
    assert note == "" and again == first and len(timed) == 2, "within PROBE_DRIFT: the cache is used"
    rate["now"] = 1e9 / 1.2
    assert plan.calibration_entry(p, out, recheck=True)[1] == "" and len(timed) == 2
    rate["now"] = 1e9 / 2  # the machine is half as fast as when the cache was timed (or the cache was timed busy)
    slower, note = plan.calibration_entry(p, out, recheck=True)
    assert note.startswith("re-timed: this machine's matmul rate is now 0.50x") and len(timed) == 4
    assert slower["probe_flops"] == 1e9 / 2 and slower["rates"] != first["rates"]
    assert plan.calibration_entry(p, out)[1] == "" and len(timed) == 4, "the report's reads do not re-check"
    assert plan.calibration_entry(p, out, recalibrate=True)[1] == "re-timed (--recalibrate)" and len(timed) == 6
    load["now"] = 64.0
    busy, note = plan.calibration_entry(p, out, recalibrate=True)
    assert "the machine was busy (load average 64.0" in note and busy["load_avg"] == 64.0
    cached = json.loads((tmp_path / "cache" / "calibration.json").read_text())
    assert len(cached) == 1 and set(next(iter(cached.values()))) == {"rates", "probe_flops", "load_avg",
                                                                      "measured_at"}


def test_lm_calibration_times_whole_eval_batches(monkeypatch):
    """The forward is timed on full-length batches (the old 4 short sequences timed mostly call overhead), as the
    median of CAL_REPS calls."""
    p = load_params(SMOKE)
    shapes = []
    real = plan._time_it

    def spy(fn, reps):
        shapes.append(reps)
        return real(fn, 1)
    monkeypatch.setattr(plan, "_time_it", spy)
    import transformers

    calls = []
    forward = transformers.GPTNeoXForCausalLM.forward
    monkeypatch.setattr(transformers.GPTNeoXForCausalLM, "forward",
                        lambda self, input_ids=None, **kw: calls.append(tuple(input_ids.shape)) or forward(
                            self, input_ids=input_ids, **kw))
    cal = plan._calibrate_lm(p, "small")
    assert cal["forward_tok_s"] > 0 and cal["train_tok_s"] > 0 and shapes == [plan.CAL_REPS] * 2
    assert calls[0] == (max(16, p.evaluation.batch_sequences), p.data.context_size)


def test_median_timing(monkeypatch):
    """The median of the timed calls: a fast and a slow outlier move it not at all (best-of would say 0.5 s)."""
    clock = {"t": 0.0}
    durations = iter([9.0, 9.0, 0.5, 1.0, 1.0, 1.0, 100.0])  # two warm-ups, then the timed calls

    def fn():
        clock["t"] += next(durations)
    monkeypatch.setattr(plan.time, "perf_counter", lambda: clock["t"])
    assert plan._time_it(fn, 5) == 1.0


def test_store_is_sized_by_the_text_there_is(tmp_path, cache_dir):
    """A budget beyond the text: the store holds the train split's rows, and plan's disk and extract time follow
    it (they used to cost the asked tokens)."""
    from proxygap_helpers.extract import split_tokens, store_rows

    p = load_params(SMOKE, {"sae.tokens": [8192, 10_240_000]})
    out = tmp_path / "out"
    train = split_tokens(p, out)["train"]
    assert 0 < train < p.store_tokens
    assert store_rows(p, train, "large") == train // 64 and plan._store_tokens(p, out) == train // 64 * 64
    disk = plan.disk_bytes(p, plan._store_tokens(p, out))
    assert disk["large"]["store"] == train // 64 * 64 * 64 * 4 < plan.disk_bytes(p)["large"]["store"]
    est = plan.estimate(p, out, CAL)
    by_hand = sum(p.models[r].train_tokens / 1e4 + train // 64 * 64 / 1e5 for r in p.roles) + 25.0
    assert est["extract_s"] == pytest.approx(by_hand)


def test_memory_per_unit_and_the_byte_capped_buffer():
    """The buffer holds at most sae.buffer_bytes of float32 rows per hook (1 GiB: 2^18 rows at d_in 1024, where
    2^21 rows were 8 GiB); the SAE ids of grids whose buffer the cap does not bind are unchanged."""
    p = load_params(REPO / "params" / "phase2_pythia.yaml")
    assert p.buffer_rows("small") == 2**19 and p.buffer_rows("large") == 2**18
    m = plan.unit_memory_bytes(p, "large", n_runs=9)
    assert m["buffer"] == 2**30
    assert m["saes"] == 9 * 4 * 4 * (2 * 1024 * 32768 + 32768 + 1024)
    assert m["model"] > 0 and m["total"] == m["buffer"] + m["saes"] + m["model"]
    smoke = load_params(SMOKE)
    assert smoke.buffer_rows("large") == 2**21
    assert plan.unit_memory_bytes(smoke, "large", 1, store_tokens=5000)["buffer"] == 5000 * 64 * 4
    tight = load_params(SMOKE, {"sae.buffer_bytes": 2**20})
    assert tight.buffer_rows("large") == 2**20 // (4 * 64)
    assert tight.sae_specs()[-1].sae_id != smoke.sae_specs()[-1].sae_id, "the rows shape the stream: in the hash"
    loose = load_params(SMOKE, {"sae.buffer_bytes": 2**31})
    assert [s.sae_id for s in loose.sae_specs()] == [s.sae_id for s in smoke.sae_specs()], "a cap that does not bind"


def test_needs_internet_only_for_the_hub(tmp_path):
    pythia = load_params(REPO / "params" / "phase2_pythia.yaml")
    assert plan._needs_internet(pythia) and not plan._needs_internet(load_params(SMOKE))
    raw = __import__("yaml").safe_load((REPO / "params" / "phase2_pythia.yaml").read_text())
    for role, (layers, width, heads) in (("small", (6, 32, 4)), ("large", (8, 64, 4))):
        folder = tmp_path / role
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({
            "model_type": "gpt_neox", "num_hidden_layers": layers, "hidden_size": width,
            "num_attention_heads": heads, "intermediate_size": 4 * width, "vocab_size": 512}))
        (folder / "model.safetensors").write_bytes(b"")  # (the params check looks for weights by name)
        raw["models"][role] = {"source": "hub", "name": role, "path": str(folder)}
    (tmp_path / "pile").mkdir()
    (tmp_path / "pile" / "train.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "pile" / "validation.jsonl").write_text('{"text": "b"}\n')
    raw["data"]["pile_files"] = str(tmp_path / "pile")
    local = tmp_path / "local.yaml"
    local.write_text(__import__("yaml").safe_dump(raw))
    assert not plan._needs_internet(load_params(local))
