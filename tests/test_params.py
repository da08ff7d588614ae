"""Params: a catalogue of bad params files run through the command line (exit 2, one paragraph naming the key
and what is allowed, no traceback, nothing written), and the values derived from the good ones."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from proxygap_helpers.params import ParamsError, load_params, set_dotted

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params"
SMOKE_RAW = yaml.safe_load((PARAMS / "smoke.yaml").read_text())
PYTHIA_RAW = yaml.safe_load((PARAMS / "phase2_pythia.yaml").read_text())


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "proxygap_helpers", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _mutated(base: dict, fn) -> str:
    raw = copy.deepcopy(base)
    fn(raw)
    return yaml.safe_dump(raw, sort_keys=False)


def _set(path: str, value):
    return lambda raw: set_dotted(raw, {path: value})


def _drop(path: str):
    def fn(raw):
        node = raw
        *parents, last = path.split(".")
        for part in parents:
            node = node[part]
        del node[last]
    return fn


# id -> (params text, or None for "no such file"; substrings stderr must contain (key first, then allowed values))
BAD: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "unknown-top-level-key": (_mutated(SMOKE_RAW, _set("bogus", 1)), ("bogus", "models", "sae")),
    "misspelled-nested-key": (_mutated(SMOKE_RAW, _set("sae.expansoin", 32)), ("sae.expansoin", "expansion")),
    "misspelled-model-key": (_mutated(SMOKE_RAW, _set("models.small.widht", 3)),
                             ("models.small.widht", "d_model")),
    "k-wrong-type": (_mutated(SMOKE_RAW, _set("sae.k", "eight")), ("sae.k", "list")),
    "k-item-wrong-type": (_mutated(SMOKE_RAW, _set("sae.k", ["eight"])), ("sae.k", "integer")),
    "k-below-1": (_mutated(SMOKE_RAW, _set("sae.k", [0, 8])), ("sae.k", ">= 1")),
    "k-not-below-d_sae": (_mutated(SMOKE_RAW, _set("sae.k", [8, 1024])), ("sae.k", "d_sae", "1024")),
    "expansion-below-1": (_mutated(SMOKE_RAW, _set("sae.expansion", 0)), ("sae.expansion", "1")),
    "seeds-empty": (_mutated(SMOKE_RAW, _set("sae.seeds", [])), ("sae.seeds", "at least 1")),
    "seeds-duplicated": (_mutated(SMOKE_RAW, _set("sae.seeds", [0, 1, 1])), ("sae.seeds", "distinct")),
    "tokens-zero": (_mutated(SMOKE_RAW, _set("sae.tokens", [0, 8192])), ("sae.tokens", "> 0")),
    "tokens-negative": (_mutated(SMOKE_RAW, _set("sae.tokens", [-100])), ("sae.tokens", "> 0")),
    "layer-beyond-model": (_mutated(SMOKE_RAW, _set("models.small.layer", 9)), ("models.small.layer", "[0, 1]")),
    "heads-do-not-divide": (_mutated(SMOKE_RAW, _set("models.large.n_heads", 3)), ("models.large", "n_heads")),
    "ce_rec-unknown": (_mutated(SMOKE_RAW, _set("evaluation.ce_rec", "absolute")),
                       ("evaluation.ce_rec", "relative", "zero_norm")),
    "budget_mode-unknown": (_mutated(SMOKE_RAW, _set("sae.budget_mode", "staircase")),
                            ("sae.budget_mode", "separate", "ladder")),
    "context-too-small": (_mutated(SMOKE_RAW, _set("data.context_size", 4)), ("data.context_size", "8")),
    "jobs-zero": (_mutated(SMOKE_RAW, _set("executor.jobs", 0)), ("executor.jobs", "1")),
    "name-with-spaces": (_mutated(SMOKE_RAW, _set("name", "my grid")), ("name", "pattern")),
    "yaml-syntax-error": ("name: smoke\nsae: {k: [8, 16\nmodels: ]\n", ("YAML syntax error", "line")),
    "top-level-not-mapping": ("- 1\n- 2\n", ("mapping",)),
    "duplicate-key": ("name: smoke\nmodels:\n  small: {source: embedded}\n  small: {source: hub}\n",
                      ("'small' is given twice", "line 4")),
    "missing-file": (None, ("does not exist", "params/smoke.yaml")),
    "python-object-tag": ("name: !!python/object/apply:os.system ['touch {tmp}/PWNED']\n", ("construct",)),
    "only-one-role": (_mutated(SMOKE_RAW, _drop("models.large")), ("models", "small", "large")),
    "ladder-not-ordered-by-size": (_mutated(SMOKE_RAW, lambda r: _set("models", [
        {"role": "big", **r["models"]["large"]}, {"role": "tiny", **r["models"]["small"]}])(r)),
        ("models", "ordered by size", "'tiny'")),
    "mixed-sources": (_mutated(SMOKE_RAW, _set("models.large", {"source": "hub", "name": "EleutherAI/pythia-70m"})),
                      ("source", "embedded", "hub")),
    "unknown-source": (_mutated(SMOKE_RAW, _set("models.large.source", "local")),
                       ("models.large", "embedded", "hub")),
    "unknown-hub-model": (_mutated(PYTHIA_RAW, _set("models.small.name", "EleutherAI/pythia-71m")),
                          ("models.small.name", "pythia-70m", "pythia-410m")),
    "hub-with-stdlib-data": (_mutated(PYTHIA_RAW, _set("data.source", "stdlib")), ("data.source", "pile")),
    # HF rotates int(16 x 0.3) = 4 dims, TransformerLens round(4.8) = 5 (and crashes); 20 x 0.25 = 5 is odd
    "rotary-not-an-integer": (_mutated(SMOKE_RAW, _set("models.large.rotary_pct", 0.3)),
                              ("models.large.rotary_pct", "even integer", "16 x 0.3 = 4.8", "0.25")),
    "rotary-odd": (_mutated(SMOKE_RAW, lambda r: _set("models.small", {**r["models"]["small"], "d_model": 80,
                                                                       "n_heads": 4, "rotary_pct": 0.25})(r)),
                   ("models.small.rotary_pct", "even integer", "20 x 0.25 = 5", "0.1, 0.2, 0.3")),
    "budget-beyond-store-no-epochs": (_mutated(SMOKE_RAW, lambda r: (_set("data.allow_epochs", False)(r),
                                                                      _set("data.store_tokens", 1000)(r))),
                                      ("sae.tokens", "store_tokens", "allow_epochs")),
    # a misspelled required key is named as unknown first, with the closest allowed key (not as "`sae.k` missing")
    "misspelled-required-key": (_mutated(SMOKE_RAW, lambda r: r["sae"].__setitem__("kk", r["sae"].pop("k"))),
                                ("unknown key `sae.kk`", "did you mean `sae.k`?")),
    "misspelled-models": (_mutated(SMOKE_RAW, lambda r: r.__setitem__("modles", r.pop("models"))),
                          ("unknown key `modles`", "did you mean `models`?")),
    # the two-role form is ordered by size too: swapped, every delta would flip its sign
    "two-roles-swapped": (_mutated(SMOKE_RAW, lambda r: r.__setitem__("models", {"small": r["models"]["large"],
                                                                                 "large": r["models"]["small"]})),
                          ("models", "`large`", "smaller than `small`", "swap")),
    # budgets are whole batches: 8000 at batch 256 would train 7936 tokens labelled 8000
    "tokens-not-whole-batches": (_mutated(SMOKE_RAW, _set("sae.tokens", [8000, 32768])),
                                 ("sae.tokens", "8000", "7936 or 8192")),
    "tokens-below-one-batch": (_mutated(SMOKE_RAW, lambda r: (_set("sae.batch_size", 128)(r),
                                                              _set("sae.tokens", [100, 1000, 1023])(r))),
                               ("sae.tokens", "100", "128")),
    "saelens-trainer-bf16": (_mutated(SMOKE_RAW, lambda r: (_set("sae.trainer", "saelens")(r),
                                                            _set("sae.precision", "bf16")(r))),
                             ("sae.precision", "fp32 only")),
    "saelens-trainer-triton-kernel": (_mutated(SMOKE_RAW, lambda r: (_set("sae.trainer", "saelens")(r),
                                                                     _set("sae.kernel", "triton")(r))),
                                      ("sae.kernel", "'triton'", "trainer: fast")),
    "claims-unknown-rule": (_mutated(SMOKE_RAW, _set("claims", {"C9": {}})), ("claims", "C9", "C1")),
    "claims-unknown-option": (_mutated(SMOKE_RAW, _set("claims", {"C1": {"min_rate": 0.5}})),
                              ("claims.C1", "min_rate", "min_mismatch_rate")),
}


def _assert_clean_refusal(res: subprocess.CompletedProcess, must: tuple[str, ...]) -> None:
    err = res.stderr.strip()
    assert res.returncode == 2, f"exit {res.returncode}, stderr:\n{res.stderr}\nstdout:\n{res.stdout}"
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr
    assert err, "no message on stderr"
    assert "\n\n" not in err and len(err.splitlines()) <= 3, f"not one paragraph:\n{err}"
    for s in must:
        assert s in err, f"{s!r} not in the message:\n{err}"


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_params_exit_2(case, tmp_path, capsys):
    """``run`` in a subprocess (the real command line: exit code, stderr, nothing written); ``plan`` through the
    same ``cli.main`` in-process (one Python start per case keeps the catalogue fast on 2 cores)."""
    from proxygap_helpers import cli

    text, must = BAD[case]
    path = tmp_path / "params.yaml"
    if text is not None:
        path.write_text(text.replace("{tmp}", str(tmp_path)))
    out = tmp_path / "out"
    res = _cli("run", str(path), "--out", str(out))
    _assert_clean_refusal(res, must)
    assert not out.exists(), f"run wrote {list(out.rglob('*'))}"

    capsys.readouterr()
    code = cli.main(["plan", str(path), "--out", str(out)])
    cap = capsys.readouterr()
    _assert_clean_refusal(subprocess.CompletedProcess([], code, cap.out, cap.err), must)
    assert not out.exists(), f"plan wrote {list(out.rglob('*'))}"
    assert not (tmp_path / "PWNED").exists(), "a YAML tag executed a command"
    # the library raises the same ParamsError (what the notebooks see)
    with pytest.raises(ParamsError) as ei:
        load_params(path)
    assert must[0] in str(ei.value)


# id -> (params text, the commands that refuse it, substrings of the message): what only this machine or its data
# can tell, checked by the command line before any work (the library loads these params)
MACHINE_BAD: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    # CUDA_VISIBLE_DEVICES is empty in _cli's environment: no GPU even on a machine that has one
    "cuda-without-a-gpu": (_mutated(SMOKE_RAW, _set("device", "cuda")), ("run",), ("device", "'cuda'", "auto", "cpu")),
    # TRITON_INTERPRET is dropped from _cli's environment: the kernels need a GPU, or the interpreter asked for
    "triton-kernel-on-the-cpu": (_mutated(SMOKE_RAW, _set("sae.kernel", "triton")), ("run",),
                                 ("sae.kernel", "'triton'", "CUDA", "kernel: torch", "TRITON_INTERPRET=1")),
    "eval-sequences-beyond-the-split": (_mutated(SMOKE_RAW, _set("data.eval_sequences", 100_000)), ("run", "plan"),
                                        ("data.eval_sequences", "100000", "holds only", "sequences of 64 tokens")),
    "hub-revision-not-in-the-offline-cache": (_mutated(PYTHIA_RAW, _set("models.small.revision", "step143000")),
                                              ("run",), ("models.small.revision", "'step143000'",
                                                         "EleutherAI/pythia-70m", "offline")),
}


@pytest.mark.parametrize("case", sorted(MACHINE_BAD))
def test_refused_by_the_command_line_before_any_work(case, tmp_path):
    """Params that load but cannot run here: ``run`` (and ``plan`` where it would cost the wrong thing) exits 2
    with one paragraph naming the key, before writing anything into the output folder."""
    text, commands, must = MACHINE_BAD[case]
    path = tmp_path / "params.yaml"
    path.write_text(text)
    load_params(path)  # valid params: it is the machine or the data that refuses them
    out = tmp_path / "out"
    for command in commands:
        res = _cli(command, str(path), "--out", str(out))
        _assert_clean_refusal(res, must)
        assert not out.exists(), f"{command} wrote {list(out.rglob('*'))}"


def test_unwritable_out_dir_exit_2(tmp_path):
    """``--out`` below a regular file cannot be created (even by root): exit 2, a clear message, no traceback."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = blocker / "sub"
    res = _cli("run", str(PARAMS / "smoke.yaml"), "--out", str(out))
    _assert_clean_refusal(res, (str(out),))
    assert blocker.read_text() == "not a directory"


def test_overrides_are_validated(tmp_path):
    with pytest.raises(ParamsError, match=r"sae\.budget_mode"):
        load_params(PARAMS / "smoke.yaml", overrides={"sae.budget_mode": "staircase"})
    p = load_params(PARAMS / "smoke.yaml", overrides={"sae.budget_mode": "ladder", "sae.k": [4]})
    assert p.sae.budget_mode == "ladder" and p.sae.k == [4]


# --------------------------------------------------------------------------- good params and derived values
@pytest.mark.parametrize("name", ["smoke", "default", "phase2_pythia"])
def test_params_files_load(name):
    p = load_params(PARAMS / f"{name}.yaml")
    assert p.name == name
    assert set(p.models) == {"small", "large"}
    assert p.d_in("small") < p.d_in("large")
    specs = p.sae_specs()
    ids = [s.sae_id for s in specs]
    assert len(ids) == len(set(ids)) == 2 * len(p.sae.k) * len(p.sae.tokens) * len(p.sae.seeds)
    for s in specs:
        assert re.fullmatch(rf"{s.role}-k{s.k}-t[0-9]+[kMB]?-s{s.seed}-[0-9a-f]{{8}}", s.sae_id), s.sae_id
        assert p.d_sae(s.role) == p.sae.expansion * p.d_in(s.role)
        assert s.k < p.d_sae(s.role)
        assert 0 <= p.layer(s.role) < p.models[s.role].n_layers


def test_data_source_stdlib_of_older_params_files_is_the_pinned_corpus():
    old = load_params(PARAMS / "smoke.yaml", overrides={"data.source": "stdlib"})
    new = load_params(PARAMS / "smoke.yaml")
    assert old.data.source == new.data.source == "sympy"
    assert old.extract_hash == new.extract_hash  # the same text, the same models and stores


def test_rotary_pct_accepted_exactly_when_head_dim_times_it_is_an_even_integer():
    """Every value the refusal message lists for head_dim 16 is accepted; the issue's cases are refused."""
    def rotary(d_model, n_heads, pct):
        return {"models.small.d_model": d_model, "models.small.n_heads": n_heads, "models.small.rotary_pct": pct}

    with pytest.raises(ParamsError) as err:
        load_params(PARAMS / "smoke.yaml", overrides=rotary(64, 4, 0.3))
    listed = re.search(r"allowed values for this shape: ((?:[0-9.]+, )*\d+(?:\.\d+)?)", str(err.value))
    listed = listed.group(1).split(", ")
    assert listed == ["0.125", "0.25", "0.375", "0.5", "0.625", "0.75", "0.875", "1"]
    for pct in listed:
        m = load_params(PARAMS / "smoke.yaml", overrides=rotary(64, 4, float(pct))).models["small"]
        assert (m.d_model // m.n_heads) * m.rotary_pct % 2 == 0
    for bad in ((64, 4, 0.3), (80, 4, 0.25), (64, 4, 0.0625), (96, 4, 0.3)):  # 4.8, 5, 1, 7.2
        with pytest.raises(ParamsError, match=r"models\.small\.rotary_pct.*even integer"):
            load_params(PARAMS / "smoke.yaml", overrides=rotary(*bad))
    load_params(PARAMS / "smoke.yaml", overrides={**rotary(96, 4, 0.25), "models.large.d_model": 128})  # 24 x 0.25 = 6


def test_phase2_pythia_derived():
    p = load_params(PARAMS / "phase2_pythia.yaml")
    assert not p.embedded
    assert p.hook("small") == "blocks.3.hook_resid_post"
    assert p.hook("large") == "blocks.12.hook_resid_post"
    assert (p.d_in("small"), p.d_in("large")) == (512, 1024)
    assert (p.d_sae("small"), p.d_sae("large")) == (32 * 512, 32 * 1024)
    assert p.sae.k == [8, 16, 32] and p.sae.tokens == [10_000_000, 50_000_000, 100_000_000]
    ids = {s.sae_id for s in p.sae_specs()}
    assert len(ids) == 72
    assert any(i.startswith("small-k8-t10M-s0-") for i in ids)
    assert any(i.startswith("large-k32-t100M-s3-") for i in ids)


@pytest.mark.parametrize("n_layers,layer", [(2, 0), (3, 1), (4, 1), (6, 2), (8, 3), (24, 11)])
def test_mid_layer_ends_the_first_half_and_is_never_the_last_block(n_layers, layer):
    p = load_params(PARAMS / "smoke.yaml", overrides={"models.small.n_layers": n_layers, "models.large.n_layers": 24})
    assert p.layer("small") == layer and p.hook("small") == f"blocks.{layer}.hook_resid_post"
    assert p.layer("small") < n_layers - 1
    assert p.depth("small") == pytest.approx((layer + 1) / n_layers)
    if n_layers % 2 == 0:
        assert p.depth("small") == 0.5
    pythia = load_params(PARAMS / "phase2_pythia.yaml")  # the study's explicit hooks: 4/6 and 13/24 of the blocks
    assert (pythia.depth("small"), pythia.depth("large")) == (4 / 6, 13 / 24)


def test_mid_layer_of_a_one_layer_model_is_refused(tmp_path):
    with pytest.raises(ParamsError, match=r"models\.small\.layer.*no middle layer"):
        load_params(PARAMS / "smoke.yaml", overrides={"models.small.n_layers": 1})


def test_sae_ids_depend_on_what_shapes_the_sae():
    base = load_params(PARAMS / "smoke.yaml")
    ids = [s.sae_id for s in base.sae_specs()]
    lr = load_params(PARAMS / "smoke.yaml", overrides={"sae.lr": 1e-3})
    title = load_params(PARAMS / "smoke.yaml", overrides={"report.title": "another title"})
    logs = load_params(PARAMS / "smoke.yaml", overrides={"sae.log_every": 7})
    assert not set(ids) & {s.sae_id for s in lr.sae_specs()}, "changing sae.lr must change every SAE id"
    assert ids == [s.sae_id for s in title.sae_specs()], "the report title must not change SAE ids"
    assert ids == [s.sae_id for s in logs.sae_specs()], "the log interval must not change SAE ids"
    assert base.params_hash() != title.params_hash()
    assert base.extract_hash == lr.extract_hash == title.extract_hash
    model = load_params(PARAMS / "smoke.yaml", overrides={"models.small.train_tokens": 123456})
    assert model.extract_hash != base.extract_hash
    assert not set(ids) & {s.sae_id for s in model.sae_specs()}


def test_plan_phase2_pythia_offline(tmp_path, monkeypatch):
    """``plan`` of the reference grid works offline (no hub, no Pile) and lists the 72 SAEs.

    The machine calibration of a pythia-410m-shaped model costs ~2 CPU minutes here, so it is pre-seeded
    (through plan's own cache, with made-up throughputs); the command itself runs for real in a subprocess."""
    from proxygap_helpers import plan

    cache = tmp_path / "cache"
    monkeypatch.setenv("PROXYGAP_CACHE", str(cache))
    monkeypatch.setattr(plan, "_calibrate_units",
                        lambda p, role: {"sae_tok_s": 1e6, "sae_aux_tok_s": 5e5, "eval_forward_tok_s": 1e6})
    monkeypatch.setattr(plan, "_calibrate_lm", lambda p, role: {"forward_tok_s": 1e6})
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the calibration key includes torch's thread count
    p = load_params(PARAMS / "phase2_pythia.yaml")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plan.calibration(p, tmp_path / "out")
    finally:
        torch.set_num_threads(threads)
    assert (cache / "calibration.json").is_file()
    t0 = time.time()
    res = _cli("plan", "params/phase2_pythia.yaml", "--out", str(tmp_path / "out"))
    print(f"plan took {time.time() - t0:.1f}s")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    out = res.stdout
    assert "72 SAEs" in out, out
    assert "k [8, 16, 32]" in out, out
    assert "'10M', '50M', '100M'" in out, out
    assert "blocks.3.hook_resid_post" in out and "blocks.12.hook_resid_post" in out, out
    assert "d_sae 16384" in out and "d_sae 32768" in out, out
    assert not (tmp_path / "out").exists(), "plan writes nothing"


def test_plan_time_model_by_hand():
    """``plan``'s arithmetic on made-up throughputs: plain steps up to the dead window, AuxK steps after it,
    a fixed cost per run, EVAL_MODEL_FORWARD_EQUIV forwards per eval token once per model and
    EVAL_FORWARD_EQUIV plus the random-error draws per SAE; units packed longest-first onto ``jobs`` workers."""
    from proxygap_helpers import plan

    p = load_params(PARAMS / "smoke.yaml")  # window 8192, budgets 8192 and 32768, eval 32 x 64 tokens
    cal = {r: {"sae_tok_s": 1000.0, "sae_aux_tok_s": 500.0, "eval_forward_tok_s": 7000.0} for r in ("small", "large")}
    short, long_ = (next(s for s in p.sae_specs(role="small", k=8, seed=0) if s.tokens == t) for t in (8192, 32768))
    # random-error draws: 4 forwards over 16 of the 32 eval sequences = 2 forwards per SAE
    assert plan.eval_forwards_per_sae(p) == pytest.approx(plan.EVAL_FORWARD_EQUIV + 4 * 16 / 32)
    model = plan.EVAL_MODEL_FORWARD_EQUIV * 32 * 64 / 7000
    evaluation = (plan.EVAL_FORWARD_EQUIV + 2) * 32 * 64 / 7000
    assert plan.sae_seconds(p, cal, [short]) == pytest.approx(8.192 + 1 + model + evaluation)
    assert plan.sae_seconds(p, cal, [long_]) == pytest.approx(8.192 + 24576 / 500 + 1 + model + evaluation)
    assert plan.sae_seconds(p, cal, [short, long_]) == pytest.approx(
        2 * 8.192 + 24576 / 500 + 2 + model + 2 * evaluation)  # the per-model passes once for both SAEs
    ladder = load_params(PARAMS / "smoke.yaml", overrides={"sae.budget_mode": "ladder"})
    run = ladder.sae_specs(role="small", k=8, seed=0)  # one run to 32768 with a checkpoint at 8192
    assert plan.sae_seconds(ladder, cal, run) == pytest.approx(8.192 + 24576 / 500 + 1 + model + 2 * evaluation)
    assert plan._makespan([5, 4, 3, 3], 2) == 8 and plan._makespan([5, 4, 3, 3], 1) == 15
    assert plan._makespan([5, 4, 3, 3], 8) == 5


def test_unit_calibration_runs_jobs_processes_at_once():
    """With ``jobs: 2`` the SAE-unit calibration runs in two processes started together (barrier), each with
    the threads a unit gets (``executor.threads``), and averages their rates."""
    from proxygap_helpers import plan

    p = load_params(PARAMS / "smoke.yaml", overrides={"executor.jobs": 2, "executor.threads": 1})
    cal = plan._calibrate_units(p, "small")
    assert set(cal) == {"sae_tok_s", "sae_aux_tok_s", "eval_forward_tok_s", "threads"}
    assert all(v > 0 and v == v for v in cal.values())
    assert cal["threads"] == 1
