"""Tests of proxygap_helpers.metrics on a tiny GPT-NeoX and a briefly trained TopK SAE.

Cross-checks: hand-worked reconstruction numbers, SAELens' own evaluator (``run_evals`` on a
HookedTransformer), a TransformerLens splice, a dense-Jacobian SWD, the KL -> SWD limit, and batching.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from proxygap_helpers import metrics as M
from proxygap_helpers.models import load_hf, load_hooked, neox_config, patched, resid_post
from proxygap_helpers.params import EmbeddedModel

D, LAYERS, HEADS, VOCAB, CTX = 32, 2, 4, 128, 16
LAYER = 0  # one block, the final LN and the unembedding lie downstream
HOOK = f"blocks.{LAYER}.hook_resid_post"
EOT = 0


def _patterned(rng: np.random.Generator, n: int) -> np.ndarray:
    """Arithmetic progressions mod VOCAB (start, step in 1..3) with EOT (id 0) at random spots: learnable."""
    start = rng.integers(0, VOCAB, (n, 1))
    step = rng.integers(1, 4, (n, 1))
    seq = (start + step * np.arange(CTX)[None]) % VOCAB
    seq[rng.random(seq.shape) < 0.08] = EOT
    return seq.astype(np.int64)


def _save_tokenizer(out_dir, vocab_size: int = VOCAB) -> None:
    """A word-level tokenizer of ``vocab_size`` ids (EOT 0, padding 1, then ``t2``, ``t3``, ...) in ``out_dir``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<|padding|>": 1, **{f"t{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>", pad_token="<|padding|>").save_pretrained(out_dir)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is faster and does not spin against other processes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world(tmp_path_factory, _one_thread):
    """A tiny GPT-NeoX (trained 60 steps on patterned sequences), its HF dir, eval tokens and a TopK SAE."""
    from sae_lens import SAE, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = neox_config(EmbeddedModel(source="embedded", d_model=D, n_layers=LAYERS, n_heads=HEADS, train_tokens=1),
                      VOCAB, CTX)
    model = GPTNeoXForCausalLM(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        batch = torch.from_numpy(_patterned(rng, 32))
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model_dir = tmp_path_factory.mktemp("tiny_neox")
    model.save_pretrained(model_dir)
    _save_tokenizer(model_dir)
    hf = load_hf(str(model_dir))

    eval_tokens = _patterned(rng, 8)
    eval_tokens[0, 0] = EOT  # make sure a special id sits at an input and a target position
    eval_tokens[1, 5] = EOT

    # TopK SAE, a few hundred Adam steps on activations of other sequences (so it is not trivial)
    acts = resid_post(hf, torch.from_numpy(_patterned(rng, 32)), LAYER).reshape(-1, D)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=8 * D, k=8, metadata=SAEMetadata(hook_name=HOOK)))
    sopt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for _ in range(100):
        loss = (sae.decode(sae.encode(acts)) - acts).pow(2).sum(-1).mean()
        sopt.zero_grad()
        loss.backward()
        sopt.step()
    sae_dir = tmp_path_factory.mktemp("sae")
    sae.save_model(sae_dir)
    loaded = SAE.load_from_disk(sae_dir).eval()
    metrics = M.evaluate_sae(hf, LAYER, loaded, eval_tokens, batch_sequences=4, progress=False)
    return {"dir": str(model_dir), "hf": hf, "tokens": eval_tokens, "sae": loaded, "sae_dir": str(sae_dir),
            "metrics": metrics}


@pytest.fixture(scope="module")
def hooked(world):
    return load_hooked(world["dir"], hf_model=world["hf"])


class IdentitySAE:
    """A perfect "SAE": encode and decode return their input."""

    def encode(self, x):
        return x

    def decode(self, f):
        return f


class ScaledErrorSAE:
    """x_hat = x + eps * (sae(x) - x): the SAE's error direction scaled by eps."""

    def __init__(self, sae, eps):
        self.sae, self.eps = sae, eps

    def encode(self, x):
        return x

    def decode(self, x):
        return x + self.eps * (self.sae.decode(self.sae.encode(x)).to(x.dtype) - x)


# --------------------------------------------------------------------------- pure reconstruction metrics
def test_reconstruction_stats_hand_worked():
    # x = (2,0), (0,2), (2,2); x_hat = (2,0), (0,1), (2,0)
    # mean(x) = (4/3, 4/3); deviations (2/3,-4/3), (-4/3,2/3), (2/3,2/3): squared norms 20/9, 20/9, 8/9
    #   -> SST = 48/9 = 16/3
    # errors (0,0), (0,1), (0,2): squared norms 0, 1, 4 -> SSE = 5; r2 = 1 - 5/(16/3) = 1 - 15/16 = 1/16
    # cos: (2,0).(2,0)/(2*2) = 1; (0,2).(0,1)/(2*1) = 1; (2,2).(2,0)/(2*sqrt2*2) = 1/sqrt2 -> mean (2 + 1/sqrt2)/3
    # ||err||/||x||: 0/2, 1/2, 2/(2*sqrt2) = 1/sqrt2 -> mean (1/2 + 1/sqrt2)/3; mse = 5/3
    x = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    x_hat = torch.tensor([[2.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    s = M.reconstruction_stats(x, x_hat)
    assert s["r2"] == pytest.approx(1 / 16, abs=1e-12)
    assert s["cosine"] == pytest.approx((2 + 1 / math.sqrt(2)) / 3, abs=1e-12)
    assert s["rel_err_norm"] == pytest.approx((0.5 + 1 / math.sqrt(2)) / 3, abs=1e-12)
    assert s["mse"] == pytest.approx(5 / 3, abs=1e-12)
    assert s["n"] == 3


def test_accumulator_batches_equal_one_shot():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1000, 7, generator=g, dtype=torch.float64) + 300.0  # large mean: cancellation-prone
    x_hat = x + 0.3 * torch.randn(1000, 7, generator=g, dtype=torch.float64)
    centred = x - x.mean(0)
    r2_direct = 1 - (x - x_hat).pow(2).sum() / centred.pow(2).sum()
    one = M.reconstruction_stats(x, x_hat)
    for center in (None, x[:5].mean(0)):  # the centre changes rounding only, never the value
        acc = M.ReconstructionAccumulator(center=center)
        for chunk in (slice(0, 1), slice(1, 333), slice(333, 334), slice(334, 1000)):
            acc.add(x[chunk], x_hat[chunk])
        res = acc.result()
        tol = 1e-7 if center is None else 1e-12  # without a centre, SST = E||x||^2 - ||Ex||^2 loses ~1e-9
        assert res["r2"] == pytest.approx(r2_direct.item(), abs=tol)
        for k in ("cosine", "rel_err_norm", "mse"):
            assert res[k] == pytest.approx(one[k], rel=1e-12)
    assert one["r2"] == pytest.approx(r2_direct.item(), abs=1e-12)


def test_keys_and_counts(world):
    m = world["metrics"]
    assert tuple(m) == M.METRIC_KEYS
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    n_seq, ctx = world["tokens"].shape
    assert m["eval_tokens"] == n_seq * ctx
    assert m["eval_predictions"] == n_seq * (ctx - 1)
    assert m["ce_rec_relative"] == pytest.approx(2 - m["ce_sae"] / m["ce_clean"], rel=1e-12)
    # the model has learnt the pattern (ablations hurt); the SAE is imperfect but close
    assert m["ce_clean"] < m["ce_mean_ablation"] < m["ce_zero"] and m["ce_sae"] < m["ce_mean_ablation"]
    assert 0.3 < m["r2"] < 0.999 and m["kl"] > 1e-4 and m["swd"] > 1e-4
    assert 0 < m["l0"] <= 8 and 0 <= m["dead_frac"] < 1


# --------------------------------------------------------------------------- SAELens' evaluator
class _TokenStore:
    """The slice of ``ActivationsStore`` that ``sae_lens.evals.run_evals`` uses: fixed token batches in order."""

    def __init__(self, tokens: np.ndarray, batch: int):
        self.tokens = torch.from_numpy(tokens)
        self.store_batch_size_prompts = batch
        self.context_size = tokens.shape[1]
        self._i = 0

    def get_batch_tokens(self, n: int) -> torch.Tensor:
        out = self.tokens[self._i:self._i + n]
        self._i += n
        return out

    def reset_input_dataset(self) -> None:
        self._i = 0


def test_matches_saelens_run_evals(world, hooked):
    """CE (clean / SAE / zero), ce_loss_score, explained variance, cossim and l0 equal SAELens' run_evals.

    Options: exclude_special_tokens=False, no BOS (the HookedTransformer has default_prepend_bos=False and
    SAELens passes token tensors), identity ActivationScaler, all 8 eval sequences in 2 batches of 4.
    SAELens' explained_variance = 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2) is our r2 exactly; its
    cossim is our cosine. SAELens runs the HookedTransformer (unfused attention), we run HF: the
    differences are float32 rounding (~1e-6).
    """
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    toks = world["tokens"]
    cfg = EvalConfig(batch_size_prompts=4, n_eval_reconstruction_batches=2, n_eval_sparsity_variance_batches=2,
                     compute_kl=True, compute_ce_loss=True, compute_sparsity_metrics=True,
                     compute_variance_metrics=True)
    ref, _ = run_evals(world["sae"], _TokenStore(toks, 4), hooked, ActivationScaler(), cfg,
                       exclude_special_tokens=False)
    m = world["metrics"]
    perf = ref["model_performance_preservation"]
    assert m["ce_clean"] == pytest.approx(perf["ce_loss_without_sae"], abs=1e-5)
    assert m["ce_sae"] == pytest.approx(perf["ce_loss_with_sae"], abs=1e-5)
    assert m["ce_zero"] == pytest.approx(perf["ce_loss_with_ablation"], abs=1e-5)
    assert m["ce_rec_zero_norm"] == pytest.approx(perf["ce_loss_score"], abs=1e-5)
    rq = ref["reconstruction_quality"]
    assert m["r2"] == pytest.approx(rq["explained_variance"], abs=1e-6)
    assert m["cosine"] == pytest.approx(rq["cossim"], abs=1e-6)
    assert m["l0"] == pytest.approx(ref["sparsity"]["l0"], abs=1e-9)
    # SAELens' kl_div_with_sae averages over all ctx positions (the last one too); ours over the ctx - 1
    # positions that have a target. On the same positions the per-token KLs agree:
    from sae_lens.evals import get_recons_loss

    per_tok = get_recons_loss(world["sae"], hooked, ActivationScaler(), torch.from_numpy(toks),
                              compute_kl=True, compute_ce_loss=False)["kl_div_with_sae"]
    assert per_tok.shape == toks.shape
    assert m["kl"] == pytest.approx(per_tok[:, :-1].double().mean().item(), rel=1e-4, abs=1e-7)


def test_hf_fast_path_equals_transformerlens(world, hooked):
    toks = torch.from_numpy(world["tokens"])
    sae = world["sae"]

    def splice(act, hook):
        return sae.decode(sae.encode(act)).to(act.dtype)

    with torch.no_grad():
        clean = hooked(toks, return_type="loss", loss_per_token=True)
        spliced = hooked.run_with_hooks(toks, return_type="loss", loss_per_token=True, fwd_hooks=[(HOOK, splice)])
    m = world["metrics"]
    assert m["ce_clean"] == pytest.approx(clean.double().mean().item(), abs=1e-4)
    assert m["ce_sae"] == pytest.approx(spliced.double().mean().item(), abs=1e-4)


# --------------------------------------------------------------------------- special cases and invariances
def test_perfect_reconstruction(world):
    m = M.evaluate_sae(world["hf"], LAYER, IdentitySAE(), world["tokens"], batch_sequences=4, progress=False)
    assert m["ce_rec_relative"] == pytest.approx(1.0, abs=1e-6)
    assert m["ce_rec_zero_norm"] == pytest.approx(1.0, abs=1e-6)
    assert m["r2"] == pytest.approx(1.0, abs=1e-6)
    assert m["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert m["rel_err_norm"] == pytest.approx(0.0, abs=1e-6)
    assert m["kl"] == pytest.approx(0.0, abs=1e-6)
    assert m["swd"] == pytest.approx(0.0, abs=1e-6)


def test_mean_ablation_and_zero_by_hand(world):
    hf, toks = world["hf"], torch.from_numpy(world["tokens"])
    with torch.no_grad():
        x = resid_post(hf, toks, LAYER)
        mean = x.double().reshape(-1, D).mean(0).float()
        with patched(hf, LAYER, lambda out: mean.expand_as(out)):
            ce_mean = M.next_token_ce(hf(input_ids=toks).logits, toks).double().mean().item()
        with patched(hf, LAYER, torch.zeros_like):
            ce_zero = M.next_token_ce(hf(input_ids=toks).logits, toks).double().mean().item()
    assert world["metrics"]["ce_mean_ablation"] == pytest.approx(ce_mean, abs=1e-6)
    assert world["metrics"]["ce_zero"] == pytest.approx(ce_zero, abs=1e-6)


def test_exclude_special_tokens(world):
    hf, toks_np, sae = world["hf"], world["tokens"], world["sae"]
    toks = torch.from_numpy(toks_np)
    m = M.evaluate_sae(hf, LAYER, sae, toks_np, batch_sequences=3, exclude_special_tokens=True,
                       special_ids=[EOT], progress=False)
    special = toks == EOT
    keep_pred = ~special[:, :-1] & ~special[:, 1:]
    assert special.any() and m["eval_predictions"] == keep_pred.sum().item() < toks[:, 1:].numel()
    assert m["eval_tokens"] == (~special).sum().item()
    with torch.no_grad():
        ce = M.next_token_ce(hf(input_ids=toks).logits, toks)
        x = resid_post(hf, toks, LAYER)
        x_hat = sae.decode(sae.encode(x))
    assert m["ce_clean"] == pytest.approx(ce[keep_pred].double().mean().item(), abs=1e-6)
    xs, xh = x[~special].double(), x_hat[~special].double()
    r2 = 1 - (xs - xh).pow(2).sum() / (xs - xs.mean(0)).pow(2).sum()
    assert m["r2"] == pytest.approx(r2.item(), abs=1e-6)
    with pytest.raises(ValueError, match="special"):
        M.evaluate_sae(hf, LAYER, sae, toks_np, exclude_special_tokens=True, progress=False)


def test_batching_invariance(world):
    a = M.evaluate_sae(world["hf"], LAYER, world["sae"], world["tokens"], batch_sequences=1, progress=False)
    b = world["metrics"]  # batch_sequences=4
    for k in M.METRIC_KEYS:
        assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-6), k


# --------------------------------------------------------------------------- SWD
def _input_and_error(model, sae, toks):
    """The hook's activations x and the SAE's reconstruction error e = x_hat - x on ``toks`` (no grad)."""
    with torch.no_grad():
        x = resid_post(model, toks, LAYER)
        return x, sae.decode(sae.encode(x)) - x


@pytest.fixture(scope="module")
def world64(world):
    from sae_lens import SAE

    return copy.deepcopy(world["hf"]).double(), SAE.load_from_disk(world["sae_dir"], dtype="float64").eval()


def test_swd_equals_dense_jacobian(world, world64):
    model, sae = world64
    toks = torch.from_numpy(world["tokens"][:1, :6])
    m = M.evaluate_sae(model, LAYER, sae, toks, batch_sequences=1, progress=False)
    x, e = _input_and_error(model, sae, toks)
    with torch.no_grad():
        p = torch.softmax(model(input_ids=toks).logits, -1)[0]  # [T, V]

    def logits_of(h):
        with patched(model, LAYER, lambda out: h):
            return model(input_ids=toks).logits

    jac = torch.autograd.functional.jacobian(logits_of, x.clone(), vectorize=True)  # [1, T, V, 1, T, d]
    je = torch.einsum("atvbsd,bsd->tv", jac, e)  # [T, V]
    quad = [0.5 * je[t] @ (torch.diag(p[t]) - torch.outer(p[t], p[t])) @ je[t] for t in range(toks.shape[1] - 1)]
    swd_dense = torch.stack(quad).mean().item()
    assert swd_dense > 0
    assert m["swd"] == pytest.approx(swd_dense, rel=1e-6)


def test_kl_over_eps_squared_tends_to_swd(world, world64):
    model, sae = world64
    toks = world["tokens"]
    swd = M.evaluate_sae(model, LAYER, sae, toks, batch_sequences=4, progress=False)["swd"]
    eps = 1e-2
    kl = M.evaluate_sae(model, LAYER, ScaledErrorSAE(sae, eps), toks, batch_sequences=4, swd=False,
                        progress=False)["kl"]
    assert kl / eps**2 == pytest.approx(swd, rel=0.05)
    # and the float32 SWD agrees with the float64 one
    assert world["metrics"]["swd"] == pytest.approx(swd, rel=1e-3)


# --------------------------------------------------------------------------- shared per-model work
def test_several_saes_at_once_equal_one_at_a_time(world):
    """evaluate_saes shares the per-model passes; every SAE's numbers equal its own evaluate_sae call."""
    together = M.evaluate_saes(world["hf"], LAYER, [world["sae"], IdentitySAE()], world["tokens"],
                               batch_sequences=4, progress=False)
    alone = M.evaluate_sae(world["hf"], LAYER, IdentitySAE(), world["tokens"], batch_sequences=4, progress=False)
    for k in M.METRIC_KEYS:
        assert together[0][k] == pytest.approx(world["metrics"][k], rel=1e-12, abs=1e-12, nan_ok=True), k
        assert together[1][k] == pytest.approx(alone[k], rel=1e-12, abs=1e-12, nan_ok=True), k
    for k in M.MODEL_KEYS:
        assert together[0][k] == together[1][k], k


# --------------------------------------------------------------------------- scale, nmse, D3 per model and SAE
def test_scale_and_dimensionality_by_hand(world):
    hf, toks, sae, m = world["hf"], torch.from_numpy(world["tokens"]), world["sae"], world["metrics"]
    with torch.no_grad():
        x = resid_post(hf, toks, LAYER).reshape(-1, D).double().numpy()
        x_hat = sae.decode(sae.encode(resid_post(hf, toks, LAYER))).reshape(-1, D).double().numpy()
    n = len(x)
    assert m["sst_per_token"] == pytest.approx(((x - x.mean(0)) ** 2).sum() / n, rel=1e-9)
    assert m["act_norm_mean"] == pytest.approx(np.linalg.norm(x, axis=1).mean(), rel=1e-9)
    assert m["act_sq_norm_mean"] == pytest.approx((x**2).sum(1).mean(), rel=1e-9)
    assert m["mse"] == pytest.approx(((x - x_hat) ** 2).sum() / n, rel=1e-5)
    assert m["nmse"] == pytest.approx(((x - x_hat) ** 2).sum() / (x**2).sum(), rel=1e-5)
    # 1 - r2 = SSE / SST, so nmse / (1 - r2) = SST / sum ||x||^2
    assert m["nmse"] / (1 - m["r2"]) == pytest.approx(m["sst_per_token"] / m["act_sq_norm_mean"], rel=1e-5)
    lam = np.linalg.eigvalsh(np.cov(x, rowvar=False, bias=True))
    lam_hat = np.linalg.eigvalsh(np.cov(x_hat, rowvar=False, bias=True))
    assert m["pr_act"] == pytest.approx(lam.sum() ** 2 / (lam**2).sum(), rel=1e-9)
    assert m["pr_recon"] == pytest.approx(lam_hat.sum() ** 2 / (lam_hat**2).sum(), rel=1e-4)
    assert m["pr_recon_frac"] == pytest.approx(m["pr_recon"] / m["pr_act"], rel=1e-12)
    assert 1 <= m["pr_act"] <= D and 1 <= m["pr_recon"] <= D
    # TwoNN on every eval position (the subsample of 2048 covers all 128 of them)
    from proxygap_helpers.dimensionality import twonn_dimension

    assert m["twonn_points"] == n
    assert m["twonn_dim"] == pytest.approx(twonn_dimension(x), rel=1e-9)


def test_twonn_subsample_is_seeded(world):
    kw = dict(batch_sequences=4, progress=False, swd=False, gwd=False, random_error_draws=0, twonn_points=40)
    a = M.evaluate_sae(world["hf"], LAYER, IdentitySAE(), world["tokens"], seed=1, **kw)
    b = M.evaluate_sae(world["hf"], LAYER, IdentitySAE(), world["tokens"], seed=1, **{**kw, "batch_sequences": 3})
    c = M.evaluate_sae(world["hf"], LAYER, IdentitySAE(), world["tokens"], seed=2, **kw)
    assert a["twonn_points"] == 40 and a["twonn_dim"] == pytest.approx(b["twonn_dim"], rel=1e-12)
    assert a["twonn_dim"] != c["twonn_dim"]
    assert math.isnan(a["gwd"]) and math.isnan(a["swd"]) and math.isnan(a["random_error_ratio"])


# --------------------------------------------------------------------------- GWD (first-order)
def _sequence_total_ce(model, toks, x_new):
    with torch.no_grad(), patched(model, LAYER, lambda out: x_new):
        return M.next_token_ce(model(input_ids=toks).logits, toks).sum().item()


def test_gwd_equals_finite_differences(world, world64):
    """(g_t^T e_t) by central differences of the sequence's total CE, moving position t alone along e_t."""
    model, sae = world64
    toks = torch.from_numpy(world["tokens"][:2, :7])
    m = M.evaluate_sae(model, LAYER, sae, toks, batch_sequences=1, progress=False)
    x, e = _input_and_error(model, sae, toks)
    h, terms = 1e-4, []
    for b in range(toks.shape[0]):
        for t in range(toks.shape[1] - 1):
            step = torch.zeros_like(x)
            step[b, t] = h * e[b, t]
            up, down = _sequence_total_ce(model, toks, x + step), _sequence_total_ce(model, toks, x - step)
            terms.append((up - down) / (2 * h))
    gwd_fd = float(np.mean(np.square(terms)))
    assert gwd_fd > 0
    assert m["gwd"] == pytest.approx(gwd_fd, rel=1e-6)


def test_gradient_is_the_first_order_ce_change(world, world64):
    """CE(x + eps e) - CE(x) = eps g^T e + O(eps^2): central difference of the evaluator's ce_sae."""
    model, sae = world64
    toks = world["tokens"]
    t = torch.from_numpy(toks)
    x, e = _input_and_error(model, sae, t)
    _, x_clean, g = M.clean_pass(model, LAYER, t, torch.ones(t.shape[0], t.shape[1] - 1, dtype=torch.bool))
    assert torch.allclose(x_clean, x) and g[:, -1].abs().max() < 1e-12  # the last position feeds no prediction
    first_order = (g * e).sum().item() / (t.shape[0] * (t.shape[1] - 1))  # per prediction
    eps, kw = 1e-4, dict(batch_sequences=4, progress=False, swd=False, gwd=False, random_error_draws=0)
    up = M.evaluate_sae(model, LAYER, ScaledErrorSAE(sae, eps), toks, **kw)
    down = M.evaluate_sae(model, LAYER, ScaledErrorSAE(sae, -eps), toks, **kw)
    assert abs(first_order) > 1e-6
    assert (up["ce_sae"] - down["ce_sae"]) / (2 * eps) == pytest.approx(first_order, rel=1e-5)
    # and the model's parameters are left as they were (requires_grad restored)
    assert all(p.requires_grad for p in model.parameters())


# --------------------------------------------------------------------------- random-error baseline
def test_random_error_baseline_by_hand(world):
    hf, toks_np, sae = world["hf"], world["tokens"], world["sae"]
    kw = dict(batch_sequences=3, progress=False, swd=False, random_error_draws=3, random_error_sequences=4, seed=7)
    m = M.evaluate_sae(hf, LAYER, sae, toks_np, **kw)
    rows = M.random_error_rows(len(toks_np), 4)
    assert list(rows) == [0, 2, 5, 7]
    toks = torch.from_numpy(toks_np[rows])
    with torch.no_grad():
        clean = hf(input_ids=toks).logits
        x, e = _input_and_error(hf, sae, toks)
        with patched(hf, LAYER, lambda out: x + e):
            kl_sae = M.kl_per_prediction(clean, hf(input_ids=toks).logits).double().mean().item()
        kls = []
        for draw in range(3):
            u = M.random_directions(rows, toks.shape[1], D, draw, 7)
            assert torch.allclose(u.norm(dim=-1), torch.ones(()).double())
            x_rand = (x.double() + e.double().norm(dim=-1, keepdim=True) * u).float()
            with patched(hf, LAYER, lambda out: x_rand):
                kls.append(M.kl_per_prediction(clean, hf(input_ids=toks).logits).double().mean().item())
    assert m["random_error_predictions"] == len(rows) * (toks.shape[1] - 1)
    assert m["kl_random"] == pytest.approx(np.mean(kls), rel=1e-5)
    assert m["kl_random_sd"] == pytest.approx(np.std(kls, ddof=1), rel=1e-3)
    assert m["random_error_ratio"] == pytest.approx(kl_sae / np.mean(kls), rel=1e-5)
    assert m["random_error_ratio_sd"] == pytest.approx(np.std(kl_sae / np.array(kls), ddof=1), rel=1e-3)
    assert m["kl_random_sd"] > 0 and m["random_error_ratio"] > 0


def test_random_directions_are_seeded_and_isotropic():
    a = M.random_directions([3, 9], 500, 40, draw=0, seed=1)
    assert torch.equal(a[1], M.random_directions([9], 500, 40, draw=0, seed=1)[0])  # per sequence, not per batch
    assert not torch.equal(a, M.random_directions([3, 9], 500, 40, draw=1, seed=1))
    flat = a.reshape(-1, 40)
    assert flat.mean(0).abs().max() < 0.03  # mean of 1000 unit vectors in 40 dims: SD 1/sqrt(40000) per coordinate
    assert torch.allclose(flat.T @ flat / len(flat), torch.eye(40, dtype=flat.dtype) / 40, atol=0.02)
    assert list(M.random_error_rows(10, 0)) == [] and list(M.random_error_rows(3, 64)) == [0, 1, 2]
