"""One adapter for every supported family (models.layer_list): tiny random checkpoints built from transformers' own
configs (GPT-NeoX, GPT-2, Llama, Qwen2, Gemma 2), saved in HF format and loaded as the pipeline loads them.

Per family: the decoder layers are found generically; ``blocks.L.hook_resid_post`` equals ``output_hidden_states[L + 1]``
for every layer but the last and TransformerLens' own hook (every family TransformerLens converts from a config:
not Gemma 2, whose TransformerLens loader takes Google's checkpoints by name only); the forward stops after the
deepest hooked layer; CE with a reconstruction spliced in equals a hand splice (a hook on the family's own layer
path, and TransformerLens' ``run_with_hooks``); SWD equals the dense-Jacobian formula and GWD central differences,
in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from proxygap_helpers import metrics as M
from proxygap_helpers.models import ModelFamilyError, layer_list, load_hf, load_hooked, patched, resid_post, resid_posts
from proxygap_helpers.params import FAMILIES
from test_metrics import _save_tokenizer

VOCAB, CTX, D, N_LAYERS = 96, 8, 32, 3
# family -> (its decoder layers' path, as the family's own code names it; TransformerLens converts it from a config)
FAMILY_PATHS = {"gpt_neox": ("gpt_neox.layers", True), "gpt2": ("transformer.h", True),
                "llama": ("model.layers", True), "qwen2": ("model.layers", True), "gemma2": ("model.layers", False)}


def _config(kind: str):
    from transformers import GPT2Config, Gemma2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    if kind == "gpt_neox":
        return GPTNeoXConfig(hidden_size=D, num_hidden_layers=N_LAYERS, num_attention_heads=4, intermediate_size=64,
                             max_position_embeddings=CTX, use_parallel_residual=True, tie_word_embeddings=False,
                             rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                              "rope_type": "default"}, **common)
    if kind == "gpt2":
        return GPT2Config(n_embd=D, n_layer=N_LAYERS, n_head=4, n_inner=4 * D, n_positions=CTX, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0, **common)
    gqa = dict(hidden_size=D, num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=64, max_position_embeddings=CTX, **common)
    if kind == "llama":
        return LlamaConfig(**gqa)
    if kind == "qwen2":
        return Qwen2Config(**gqa)
    return Gemma2Config(head_dim=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                        query_pre_attn_scalar=8, sliding_window=4, **gqa)  # softcaps and a window that bites


@pytest.fixture(scope="module", params=sorted(FAMILY_PATHS))
def family(request, tmp_path_factory):
    """One family's tiny checkpoint: its HF folder and the model loaded from it (float32), and a float64 copy."""
    from transformers import AutoModelForCausalLM

    kind = request.param
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(f"ckpt_{kind}")  # (named after the family: the TransformerLens loader must
    AutoModelForCausalLM.from_config(_config(kind)).save_pretrained(folder)  # not guess the family by name)
    _save_tokenizer(folder, VOCAB)
    hf = load_hf(str(folder))
    return {"kind": kind, "dir": str(folder), "hf": hf, "hf64": load_hf(str(folder), dtype=torch.float64)}


def _tokens(n: int = 2, ctx: int = CTX, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, VOCAB, (n, ctx), generator=torch.Generator().manual_seed(seed))


class LinearSAE:
    """x_hat = x + (x W + b) / 4 for a fixed random W, b: a reconstruction with a real error in every direction."""

    def __init__(self, dtype=torch.float32):
        g = torch.Generator().manual_seed(3)
        self.W = (torch.randn(D, D, generator=g) / D ** 0.5).to(dtype)
        self.b = torch.randn(D, generator=g).to(dtype)

    def encode(self, x):
        return x

    def decode(self, f):
        return f + (f @ self.W.to(f.dtype) + self.b.to(f.dtype)) / 4


def test_the_families_are_the_supported_ones():
    assert set(FAMILY_PATHS) == set(FAMILIES)


def test_layers_are_found_generically(family):
    hf = family["hf"]
    path, _ = FAMILY_PATHS[family["kind"]]
    assert layer_list(hf) is hf.get_submodule(path) and len(layer_list(hf)) == N_LAYERS
    assert hf.config.model_type == family["kind"]


def test_ambiguous_or_missing_layers_are_refused(family):
    """A second module list of num_hidden_layers modules under base_model (or none) cannot be told apart."""
    import copy

    hf = copy.deepcopy(family["hf"])
    hf.base_model.decoy = torch.nn.ModuleList([torch.nn.Identity() for _ in range(N_LAYERS)])
    with pytest.raises(ModelFamilyError, match=f"model_type '{family['kind']}'.*2 module lists"):
        layer_list(hf)
    hf.config.num_hidden_layers = N_LAYERS + 5
    with pytest.raises(ModelFamilyError, match="found none.*supported families: gpt_neox, gpt2, llama"):
        layer_list(hf)


def test_hook_is_the_hidden_state_and_transformer_lens(family):
    hf, ids = family["hf"], _tokens()
    with torch.no_grad():
        hidden = hf(input_ids=ids, output_hidden_states=True).hidden_states
    got = resid_posts(hf, ids, range(N_LAYERS))
    for L in range(N_LAYERS - 1):  # the last hidden state has the final norm applied
        torch.testing.assert_close(got[L], hidden[L + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(got[N_LAYERS - 1], hidden[N_LAYERS], atol=1e-3), "the final norm is not the hook"
    _, converts = FAMILY_PATHS[family["kind"]]
    if not converts:
        with pytest.raises(NotImplementedError):
            load_hooked(family["dir"], hf_model=hf)
        return
    tl = load_hooked(family["dir"], hf_model=hf)
    with torch.no_grad():
        _, cache = tl.run_with_cache(ids)
    for L in range(N_LAYERS):
        torch.testing.assert_close(got[L], cache[f"blocks.{L}.hook_resid_post"], rtol=0, atol=1e-4)


def test_the_forward_stops_after_the_deepest_hooked_layer(family):
    hf, ids = family["hf"], _tokens()
    calls = []
    handles = [layer.register_forward_hook(lambda *_a, i=i: calls.append(i)) for i, layer in enumerate(layer_list(hf))]
    try:
        resid_post(hf, ids, 0)
        assert calls == [0]
        calls.clear()
        resid_posts(hf, ids, [1, 0])
        assert calls == [0, 1]
    finally:
        for h in handles:
            h.remove()


def _hand_ce_from(hf, kind: str, ids: torch.Tensor, layer: int, fn, skip: int = 0) -> float:
    """Mean CE over the predictions from position ``skip`` on, with layer ``layer``'s output replaced by ``fn`` from
    position ``skip`` on (the first positions kept as they are), through a hook on the family's own layer path (not
    the adapter)."""
    target = hf.get_submodule(FAMILY_PATHS[kind][0])[layer]

    def hook(_m, _i, out):
        x = out[0] if isinstance(out, tuple) else out
        new = torch.cat([x[:, :skip], fn(x)[:, skip:]], dim=1)
        return (new, *out[1:]) if isinstance(out, tuple) else new
    h = target.register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = hf(input_ids=ids).logits
    finally:
        h.remove()
    lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    return -lp[:, skip:].mean().item()


@pytest.mark.parametrize("layer", [0, N_LAYERS - 1])
def test_ce_with_the_splice_equals_a_hand_splice(family, layer):
    hf, kind, ids, sae = family["hf"], family["kind"], _tokens(3), LinearSAE()
    m = M.evaluate_sae(hf, layer, sae, ids.numpy(), batch_sequences=2, swd=False, gwd=False, random_error_draws=0,
                       progress=False)
    recon = lambda out: sae.decode(sae.encode(out))  # noqa: E731
    assert m["ce_sae"] == pytest.approx(_hand_ce_from(hf, kind, ids, layer, recon), abs=1e-5)
    assert m["ce_clean"] == pytest.approx(_hand_ce_from(hf, kind, ids, layer, lambda out: out), abs=1e-5)
    assert m["ce_zero"] == pytest.approx(_hand_ce_from(hf, kind, ids, layer, torch.zeros_like), abs=1e-5)
    assert m["ce_sae"] != pytest.approx(m["ce_clean"], abs=1e-4), "the splice changes the loss"
    if FAMILY_PATHS[kind][1]:
        tl = load_hooked(family["dir"], hf_model=hf)
        with torch.no_grad():
            spliced = tl.run_with_hooks(ids, return_type="loss", loss_per_token=True,
                                        fwd_hooks=[(f"blocks.{layer}.hook_resid_post", lambda act, hook: recon(act))])
        assert m["ce_sae"] == pytest.approx(spliced.double().mean().item(), abs=1e-4)


def test_swd_equals_the_dense_jacobian_formula(family):
    hf, layer, ids, sae = family["hf64"], 1, _tokens(1, 5), LinearSAE(torch.float64)
    m = M.evaluate_sae(hf, layer, sae, ids.numpy(), batch_sequences=1, gwd=False, random_error_draws=0, progress=False)
    with torch.no_grad():
        x = resid_post(hf, ids, layer)
        e = sae.decode(sae.encode(x)) - x
        p = torch.softmax(hf(input_ids=ids).logits, -1)[0]

    def logits_of(h):
        with patched(hf, layer, lambda out: h):
            return hf(input_ids=ids).logits

    jac = torch.autograd.functional.jacobian(logits_of, x.clone(), vectorize=True)  # [1, T, V, 1, T, d]
    je = torch.einsum("atvbsd,bsd->tv", jac, e)
    quad = [0.5 * je[t] @ (torch.diag(p[t]) - torch.outer(p[t], p[t])) @ je[t] for t in range(ids.shape[1] - 1)]
    dense = torch.stack(quad).mean().item()
    assert dense > 0 and m["swd"] == pytest.approx(dense, rel=1e-6)


@pytest.fixture
def float64_throughout(family, monkeypatch):
    """Llama, Qwen2 and Gemma 2 compute their RMSNorm in float32 even in a float64 model (and Gemma 2's eager
    attention its softmax): central differences of the loss then carry ~1e-7 noise that h = 1e-5 amplifies to
    1e-4..1e-2. For the finite-difference test those spots keep the model's float64 (the formulas are the
    families' own)."""
    from transformers.models.gemma2 import modeling_gemma2
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2 import modeling_qwen2

    def rms(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms)
    monkeypatch.setattr(modeling_qwen2.Qwen2RMSNorm, "forward", rms)
    monkeypatch.setattr(modeling_gemma2.Gemma2RMSNorm, "forward", lambda self, x: self._norm(x) * (1.0 + self.weight))
    softmax = torch.nn.functional.softmax
    monkeypatch.setattr(torch.nn.functional, "softmax", lambda t, dim=None, dtype=None, **kw: softmax(
        t, dim=dim, dtype=t.dtype if t.dtype == torch.float64 else dtype, **kw))


def test_gwd_equals_central_differences(family, float64_throughout):
    hf, layer, ids, sae = family["hf64"], 1, _tokens(2, 5), LinearSAE(torch.float64)
    m = M.evaluate_sae(hf, layer, sae, ids.numpy(), batch_sequences=1, swd=False, random_error_draws=0,
                       progress=False)
    with torch.no_grad():
        x = resid_post(hf, ids, layer)
        e = sae.decode(sae.encode(x)) - x

    def total_ce(x_new):
        with torch.no_grad(), patched(hf, layer, lambda out: x_new):
            return M.next_token_ce(hf(input_ids=ids).logits, ids).sum().item()

    h, terms = 1e-5, []
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            step = torch.zeros_like(x)
            step[b, t] = h * e[b, t]
            terms.append((total_ce(x + step) - total_ce(x - step)) / (2 * h))
    fd = float(np.mean(np.square(terms)))
    assert fd > 0 and m["gwd"] == pytest.approx(fd, rel=1e-6)


# --------------------------------------------------------------------------- embedded families
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_embedded_families_train_by_the_same_recipe_and_load_as_checkpoints(kind, tmp_path):
    from proxygap_helpers.models import embedded_config, train_lm
    from proxygap_helpers.params import EMBEDDED_FAMILY_TYPE, EmbeddedModel

    m = EmbeddedModel(source="embedded", family=kind, d_model=32, n_layers=2, n_heads=4, train_tokens=4 * 8 * CTX,
                      batch_size=8, lr=3e-3)
    assert m.name == f"tiny-{kind}-d32-l2" and m.model_type == EMBEDDED_FAMILY_TYPE[kind] == kind
    seqs = np.random.default_rng(0).integers(2, VOCAB, (64, CTX))
    a, log = train_lm(m, VOCAB, seqs, seed=5, progress=False)
    b, _ = train_lm(m, VOCAB, seqs, seed=5, progress=False)
    assert len(log) >= 1 and all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.config.to_dict() == embedded_config(m, VOCAB, CTX).to_dict() | {"dtype": a.config.to_dict()["dtype"]}
    a.save_pretrained(tmp_path)
    loaded = load_hf(str(tmp_path))
    assert loaded.config.model_type == kind and len(layer_list(loaded)) == 2
    ids = _tokens(2)
    torch.testing.assert_close(resid_post(loaded, ids, 0), resid_post(a, ids, 0))


def test_neox_is_the_default_family_and_keeps_every_id():
    """``family: neox`` written out is the default: the same extract hash, SAE ids, unit ids and params hash as the
    file without it (every published number stays valid); another family is another model (another id)."""
    from pathlib import Path

    import yaml

    from proxygap_helpers.grid import units
    from proxygap_helpers.params import ParamsError, validate_params

    repo = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((repo / "params" / "default.yaml").read_text())
    base = validate_params(raw)
    explicit = validate_params({**raw, "models": {r: {**m, "family": "neox"} for r, m in raw["models"].items()}})
    ids = lambda p: ([s.sae_id for s in p.sae_specs()],  # noqa: E731
                     [u.uid for u in units(p, Path("/x"), Path("/x/p.yaml"))], p.extract_hash, p.params_hash())
    assert ids(explicit) == ids(base)
    llama = validate_params({**raw, "models": {r: {**m, "family": "llama"} for r, m in raw["models"].items()}})
    assert llama.extract_hash != base.extract_hash and llama.models["small"].name == "tiny-llama-d64-l4"
    with pytest.raises(ParamsError, match="rotary_pct.*GPT-NeoX key"):
        validate_params({**raw, "models": {**raw["models"], "small": {**raw["models"]["small"], "family": "gpt2",
                                                                     "rotary_pct": 0.5}}})


# --------------------------------------------------------------------------- massive-norm first positions
def test_skipped_first_positions_are_neither_replaced_nor_counted(family):
    """``skip_positions``: the SAE (and the ablations) splice from that position on, and CE, KL and every
    reconstruction metric average over the other positions only."""
    hf, kind, ids, sae, skip = family["hf"], family["kind"], _tokens(3), LinearSAE(), 2
    kw = dict(batch_sequences=2, swd=False, gwd=False, random_error_draws=0, progress=False)
    m = M.evaluate_sae(hf, 1, sae, ids.numpy(), skip_positions=skip, **kw)
    recon = lambda out: sae.decode(sae.encode(out))  # noqa: E731
    assert m["ce_sae"] == pytest.approx(_hand_ce_from(hf, kind, ids, 1, recon, skip), abs=1e-5)
    assert m["ce_clean"] == pytest.approx(_hand_ce_from(hf, kind, ids, 1, lambda out: out, skip), abs=1e-5)
    assert m["ce_zero"] == pytest.approx(_hand_ce_from(hf, kind, ids, 1, torch.zeros_like, skip), abs=1e-5)
    assert m["eval_predictions"] == 3 * (CTX - 1 - skip) and m["eval_tokens"] == 3 * (CTX - skip)
    with torch.no_grad():
        x = resid_post(hf, ids, 1)[:, skip:].reshape(-1, D).double()
        x_hat = recon(resid_post(hf, ids, 1))[:, skip:].reshape(-1, D).double()
    r2 = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert m["r2"] == pytest.approx(r2.item(), rel=1e-5)
    assert m["sst_per_token"] == pytest.approx(((x - x.mean(0)) ** 2).sum().item() / len(x), rel=1e-5)


def test_stores_and_streams_leave_the_skipped_positions_out(family, tmp_path):
    from proxygap_helpers.activations import OnlineSource, StoreSource, write_store

    hf, ids = family["hf"], _tokens(5)
    meta = write_store(hf, 1, ids.numpy(), tmp_path / "s", {"role": "x"}, batch_sequences=2, progress=False, skip=1)
    assert meta["shape"] == [5 * (CTX - 1), D] and meta["skip_positions"] == 1
    want = resid_post(hf, ids, 1)[:, 1:].reshape(-1, D)
    torch.testing.assert_close(torch.from_numpy(np.array(StoreSource(tmp_path / "s").arr)), want)
    online = OnlineSource(hf, 1, lambda seed: iter(ids.numpy()), batch_sequences=5, skip=1)
    _, chunk = next(online.chunks(1))
    torch.testing.assert_close(chunk, want)


def test_skip_positions_follow_the_family(tmp_path):
    """``auto``: 1 for a family with a massive-norm first position (Llama, Qwen2, Gemma 2), 0 for GPT-NeoX and
    GPT-2; an explicit count applies to every model; one that leaves no prediction is refused."""
    from pathlib import Path

    import yaml

    from proxygap_helpers.params import ParamsError, validate_params

    repo = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((repo / "params" / "smoke.yaml").read_text())
    fam = lambda f: {r: {**m, "family": f} for r, m in raw["models"].items()}  # noqa: E731
    assert [validate_params({**raw, "models": fam(f)}).skip_positions("small") for f in ("neox", "gpt2", "llama")] \
        == [0, 0, 1]
    assert FAMILIES["qwen2"].massive_first and FAMILIES["gemma2"].massive_first
    two = validate_params({**raw, "data": {**raw["data"], "skip_positions": 2}})
    assert two.skip_positions("large") == 2 and two.extract_hash != validate_params(raw).extract_hash
    auto = validate_params({**raw, "data": {**raw["data"], "skip_positions": "auto"}})
    assert auto.extract_hash == validate_params(raw).extract_hash, "auto is the default: no id changes"
    with pytest.raises(ParamsError, match=r"data\.skip_positions.*\[0, 62\]"):
        validate_params({**raw, "data": {**raw["data"], "skip_positions": 63}})


def test_special_ids_of_every_family(family):
    """``exclude_special_tokens`` on a hub model leaves out its BOS, EOS and padding ids, lists included (Llama 3
    gives several EOS ids)."""
    from proxygap_helpers.evaluate import special_ids

    cfg = family["hf"].config
    assert set(special_ids(cfg)) == {0, 1} and len(special_ids(cfg)) == 2
    cfg2 = type(cfg).from_dict({**cfg.to_dict(), "eos_token_id": [0, 5], "pad_token_id": None})
    assert special_ids(cfg2) == (0, 5)
