"""The two reference grids on other families, rehearsed offline as tests/test_hub_rehearsal.py rehearses Pythia's:
``params/phase2_gpt2.yaml`` (GPT-2) and ``params/phase2_smollm2.yaml`` (SmolLM2, Llama architecture).

Tiny random checkpoints under the real hub ids (``openai-community/gpt2``, ``openai-community/gpt2-medium``,
``HuggingFaceTB/SmolLM2-135M``, ``HuggingFaceTB/SmolLM2-360M``) with the real configs' layer counts (12, 24, 30, 32),
heads and key/value heads, but widths of 32-64, and a byte-level BPE tokenizer shared by each pair, sit in the
session's Hugging Face cache; each grid, shrunk to tiny budgets, runs ``python -m proxygap_helpers run`` offline in a
subprocess whose every Python process refuses and records any network access (tests/hub_mirror.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hub_mirror import cache_snapshot, guarded_env, write_pile

from proxygap_helpers.params import set_dotted

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CTX, EVAL_SEQ = 32, 8
SHRINK = {"device": "cpu", "data.context_size": CTX, "data.eval_sequences": EVAL_SEQ, "sae.k": [8],
          "sae.tokens": [2048, 4096], "sae.seeds": [0, 1], "sae.batch_size": 256, "sae.buffer_tokens": 4096,
          "sae.dead_tokens_window": 2048, "sae.norm_estimate_batches": 2, "sae.log_every": 8,
          "evaluation.batch_sequences": EVAL_SEQ, "stats.bootstrap": 50, "executor.kind": "local",
          "executor.jobs": 2, "executor.shards": 1}
# grid -> {hub id: (n_layers, width, heads, kv heads)}: the real configs' depths and head counts, tiny widths;
# the hook each grid's 'mid' gives, and the first positions skipped (data.skip_positions auto)
GRIDS = {
    "phase2_gpt2": {"ids": {"openai-community/gpt2": (12, 32, 4, 4), "openai-community/gpt2-medium": (24, 64, 8, 8)},
                    "hooks": ("blocks.5.hook_resid_post", "blocks.11.hook_resid_post"), "skip": 0, "type": "gpt2"},
    "phase2_smollm2": {"ids": {"HuggingFaceTB/SmolLM2-135M": (30, 36, 9, 3), "HuggingFaceTB/SmolLM2-360M": (32, 60, 15, 5)},
                       "hooks": ("blocks.14.hook_resid_post", "blocks.15.hook_resid_post"), "skip": 1, "type": "llama"},
}


def bpe_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE fast tokenizer with GPT-2's special token (``<|endoftext|>``, id 0: BOS, EOS and UNK, put
    first by nothing), as GPT-2's and SmolLM2's own tokenizers are."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def tiny(kind: str, shape: tuple[int, int, int, int], vocab: int, seed: int):
    """A random checkpoint of the family with the real config's depth and heads (GPT-2: learned positions up to
    1024, tied embeddings; SmolLM2: Llama with grouped key/value heads, rope_theta 1e5, tied embeddings)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    n_layers, d, heads, kv = shape
    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=d, n_layer=n_layers, n_head=heads, n_positions=1024, n_ctx=1024,
                         bos_token_id=0, eos_token_id=0, architectures=["GPT2LMHeadModel"])
        return GPT2LMHeadModel(cfg).eval()
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=n_layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=8 * d // 3, max_position_embeddings=8192,
                      rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}, tie_word_embeddings=True,
                      bos_token_id=0, eos_token_id=0, architectures=["LlamaForCausalLM"])
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> dict:
    """Both grids' checkpoints in the session's hub cache (removed after this module) and a local Pile."""
    hub = Path(os.environ["HF_HOME"]) / "hub"
    root = tmp_path_factory.mktemp("families_mirror")
    docs = write_pile(root / "pile", train_bytes=1_000_000, validation_bytes=100_000)
    tok = bpe_tokenizer([d["text"] for d in docs["train"][:300]], 400)
    entries = []
    for g, grid in GRIDS.items():
        for seed, (repo, shape) in enumerate(grid["ids"].items()):
            cache_snapshot(hub, repo, ("main",), tiny(grid["type"], shape, len(tok), seed), tok)
            entries.append(hub / f"models--{repo.replace('/', '--')}")
    yield {"pile": root / "pile", "tokenizer": tok}
    for entry in entries:
        shutil.rmtree(entry, ignore_errors=True)


@pytest.fixture(scope="module", params=sorted(GRIDS))
def rehearsal(request, mirror, tmp_path_factory) -> dict:
    grid = request.param
    tmp = tmp_path_factory.mktemp(f"rehearsal_{grid}")
    raw = yaml.safe_load((REPO / "params" / f"{grid}.yaml").read_text())
    set_dotted(raw, {**SHRINK, "name": f"rehearsal-{grid}", "data.pile_files": str(mirror["pile"])})
    params = tmp / f"{grid}.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    env, netlog = guarded_env(tmp)
    out = tmp / "out"
    res = subprocess.run([sys.executable, "-m", "proxygap_helpers", "run", str(params), "--out", str(out)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    plan = subprocess.run([sys.executable, "-m", "proxygap_helpers", "plan", str(REPO / "params" / f"{grid}.yaml"),
                           "--out", str(tmp / "plan")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    return {"grid": grid, "params": params, "out": out, "res": res, "plan": plan, "netlog": netlog}


def _explain(res) -> str:
    return f"exit {res.returncode}\n--- stdout ---\n{res.stdout[-5000:]}\n--- stderr ---\n{res.stderr[-5000:]}"


def test_the_reference_grid_runs_offline_on_its_family(rehearsal):
    """Every unit done, exit 0, no process tried the network; every SAE evaluated at the hook the real config's
    'mid' gives, on the model the params name, with the family's first positions skipped; every metric finite."""
    from proxygap_helpers.grid import is_complete, units
    from proxygap_helpers.params import load_params

    res, out, grid = rehearsal["res"], rehearsal["out"], GRIDS[rehearsal["grid"]]
    assert res.returncode == 0, _explain(res)
    p = load_params(rehearsal["params"])
    assert all(is_complete(p, out, u) for u in units(p, out, out / "params.resolved.yaml"))
    attempts = [line for f in rehearsal["netlog"].glob("*.log") for line in f.read_text().splitlines()
                if not line.startswith("loaded\t")]
    assert not attempts, f"network access attempted: {attempts}"
    recs = [json.loads(f.read_text()) for f in sorted((out / "runs").glob("*/metrics.json"))]
    assert len(recs) == 8
    names = list(grid["ids"])
    for r in recs:
        i = ("small", "large").index(r["model_role"])
        assert (r["model_name"], r["hook"], r["d_in"]) == (names[i], grid["hooks"][i], grid["ids"][names[i]][1])
        assert r["model_type"] == grid["type"] and r["skip_positions"] == grid["skip"]
        assert r["eval_tokens"] == EVAL_SEQ * (CTX - grid["skip"]) and r["l0"] == pytest.approx(8)
        for key in ("ce_clean", "ce_sae", "ce_rec", "r2", "cosine", "kl", "swd", "gwd"):
            assert np.isfinite(r[key]), (r["sae_id"], key)
    meta = json.loads((out / "data" / "eval_tokens.json").read_text())
    assert meta["bos_prepended"] is None, "neither tokenizer puts a BOS first"
    assert (out / "reports" / "report.html").is_file()


def test_plan_gives_the_grid_s_gpu_hours(rehearsal):
    """``plan`` of the real grid (not the shrunk one) prints its projected GPU-hours from the measured rates."""
    from proxygap_helpers import plan
    from proxygap_helpers.params import load_params

    res = rehearsal["plan"]
    assert res.returncode == 0, _explain(res)
    hours = plan.gpu_hours(load_params(REPO / "params" / f"{rehearsal['grid']}.yaml"))
    assert f"about {hours['total_fp32_hours']:.1f} GPU-hours in fp32" in res.stdout, res.stdout
    assert "72 SAEs" in res.stdout and "needs internet" in res.stdout
