"""The embedded model pair (smoke grid): quality, HF format and architecture, TransformerLens agreement with the
HF fast path, deterministic training, and the extract cache."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from proxygap_helpers import models
from proxygap_helpers.extract import MODEL_META, load_eval_tokens, run_extract
from proxygap_helpers.params import TWO_ROLES as ROLES, EmbeddedModel  # ROLES: the smoke grid's two models

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def eval_tokens(smoke_out):
    return load_eval_tokens(smoke_out)


@pytest.fixture(scope="module")
def hf_models(smoke_out):
    return {r: models.load_hf(str(smoke_out / "models" / r)) for r in ROLES}


def test_large_model_is_clearly_better(smoke_out, hf_models, eval_tokens):
    loss = {r: models.lm_eval_loss(hf_models[r], eval_tokens) for r in ROLES}
    meta = {r: json.loads((smoke_out / "models" / r / MODEL_META).read_text()) for r in ROLES}
    msg = f"eval CE small {loss['small']:.4f}, large {loss['large']:.4f}"
    assert loss["large"] < loss["small"] - 0.05, msg
    # both learned something: far below the uniform-guess CE log(vocab)
    assert loss["small"] < np.log(len(models.load_tokenizer(str(smoke_out / "models" / "small")))) - 1.0, msg
    for r in ROLES:  # the recorded eval loss is the loss of the saved weights on the saved eval tokens
        assert meta[r]["eval_loss"] == pytest.approx(loss[r], abs=1e-4), (r, meta[r]["eval_loss"], loss[r])
        assert meta[r]["train_log"][-1]["loss"] < meta[r]["train_log"][0]["loss"] - 1.0


def test_models_dir_is_hf_format_gpt_neox(smoke_out, smoke_params):
    for r in ROLES:
        d = smoke_out / "models" / r
        for f in ("config.json", "model.safetensors", "tokenizer.json", MODEL_META):
            assert (d / f).is_file(), f"{d}/{f} missing"
        cfg = json.loads((d / "config.json").read_text())
        m = smoke_params.models[r]
        assert cfg["model_type"] == "gpt_neox"
        assert cfg["architectures"] == ["GPTNeoXForCausalLM"]
        assert cfg["use_parallel_residual"] is True
        assert cfg["tie_word_embeddings"] is False
        assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == \
               (m.d_model, m.n_layers, m.n_heads)
        rotary = cfg.get("rope_parameters", {}).get("partial_rotary_factor", cfg.get("rotary_pct"))
        assert rotary == pytest.approx(m.rotary_pct) and 0 < rotary < 1, "Pythia uses partial rotary"
        assert cfg["vocab_size"] == smoke_params.data.vocab_size
    # one tokenizer for the pair
    assert (smoke_out / "models/small/tokenizer.json").read_bytes() == \
           (smoke_out / "models/large/tokenizer.json").read_bytes()


def test_eval_tokens_are_held_out(smoke_out, smoke_params, eval_tokens):
    d = smoke_params.data
    assert eval_tokens.dtype == np.int32
    assert eval_tokens.shape == (d.eval_sequences, d.context_size)
    assert eval_tokens.min() >= 0 and eval_tokens.max() < d.vocab_size


@pytest.mark.parametrize("role", ROLES)
def test_transformer_lens_matches_hf(smoke_out, smoke_params, hf_models, eval_tokens, role):
    hf = hf_models[role]
    tl = models.load_hooked(str(smoke_out / "models" / role), hf_model=hf)
    x = torch.from_numpy(eval_tokens[:8].astype(np.int64))
    layer, hook = smoke_params.layer(role), smoke_params.hook(role)
    with torch.no_grad():
        hf_logits = hf(input_ids=x).logits
        tl_logits, cache = tl.run_with_cache(x, names_filter=[hook])
    err = (tl_logits - hf_logits).abs().max().item()
    assert err < 1e-4, f"{role}: TransformerLens vs HF logits differ by {err:.2e}"
    ours = models.resid_post(hf, x, layer)
    err_h = (cache[hook] - ours).abs().max().item()
    assert ours.shape == (8, smoke_params.data.context_size, smoke_params.d_in(role))
    assert err_h < 1e-5, f"{role}: {hook} differs from models.resid_post by {err_h:.2e}"


def test_patched_identity_and_replacement(hf_models, eval_tokens, smoke_params):
    hf = hf_models["small"]
    x = torch.from_numpy(eval_tokens[:4].astype(np.int64))
    layer = smoke_params.layer("small")
    with torch.no_grad():
        clean = hf(input_ids=x).logits
        with models.patched(hf, layer, lambda a: a):
            same = hf(input_ids=x).logits
        with models.patched(hf, layer, torch.zeros_like):
            zero = hf(input_ids=x).logits
        after = hf(input_ids=x).logits
    assert torch.equal(clean, same) and torch.equal(clean, after)  # the hook is removed on exit
    assert (zero - clean).abs().max() > 1e-2


def _tiny_train(seed: int):
    m = EmbeddedModel(source="embedded", d_model=16, n_layers=1, n_heads=2, train_tokens=400, batch_size=4, lr=3e-3)
    rng = np.random.default_rng(0)
    seqs = rng.integers(0, 40, (24, 16)).astype(np.int32)
    model, log = models.train_lm(m, 40, seqs, seed=seed, progress=False)
    return model.state_dict(), log


def test_train_lm_deterministic():
    a, log_a = _tiny_train(0)
    b, log_b = _tiny_train(0)
    c, _ = _tiny_train(1)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
    assert any(not torch.equal(a[k], c[k]) for k in a), "another seed must give other weights"
    assert log_a[-1]["tokens"] == 6 * 4 * 16  # steps = train_tokens // (batch * ctx)


def test_lr_schedule():
    lrs = [models.lr_at(s, 100, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.2) and lrs[4] == pytest.approx(1.0)  # 5 warm-up steps
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[-1] >= 0.1 - 1e-9


def test_second_extract_reuses_cache(smoke_out, smoke_params, smoke_info):
    files = [smoke_out / "models" / r / "model.safetensors" for r in ROLES]
    files += [smoke_out / "activations" / r / name for r in ROLES for name in ("acts.bin", "meta.json")]
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    t0 = time.time()
    info = run_extract(smoke_params, smoke_out, progress=False)
    seconds = time.time() - t0
    assert info["stores"] == smoke_info["stores"]
    assert info["corpus_hash"] == smoke_info["corpus_hash"]
    assert info["eval_tokens_hash"] == smoke_info["eval_tokens_hash"]
    for r in ROLES:
        assert info["models"][r]["cache_key"] == smoke_info["models"][r]["cache_key"]
    for f in files:
        assert f.stat().st_mtime_ns == mtimes[f], f"{f} was rewritten"
    assert seconds < smoke_info["seconds"] / 2, (seconds, smoke_info["seconds"])
