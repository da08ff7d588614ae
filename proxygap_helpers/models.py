"""Language models: the embedded tiny models (GPT-NeoX, Llama or GPT-2 family), the one loader for hub names and
local dirs, and the one adapter every stage reads and splices a decoder layer's output through.

All model loading lives here (TransformerLens 3.9 deprecates ``HookedTransformer`` in favour of
``TransformerBridge``: that switch should touch this file only).

Two views of one checkpoint:

* ``load_hf`` -> an HF ``*ForCausalLM`` of any supported family (:data:`params.FAMILIES`): the fast path (fused
  attention) used for extraction and evaluation. :func:`layer_list` finds its decoder layers generically (EleutherAI
  sparsify's ``get_layer_list``: the one ``nn.ModuleList`` of ``num_hidden_layers`` modules under ``base_model``:
  ``gpt_neox.layers``, GPT-2's ``transformer.h``, Llama / Qwen2 / Gemma2's ``model.layers``); the output of layer L
  (a tensor, or the first element of a tuple in older releases) is ``blocks.L.hook_resid_post`` in every family.
* ``load_hooked`` -> ``HookedTransformer``: TransformerLens' view with its hook names, used by the
  SAELens evaluator and as the cross-check in tests.
"""

from __future__ import annotations

import math
import time
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .params import FAMILIES, EmbeddedModel


class ModelFamilyError(ValueError):
    """A checkpoint whose decoder layers cannot be found generically, or whose family is not supported."""


class DeviceError(ValueError):
    """The params ask for a device this machine does not have."""


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` where torch sees a GPU, else ``cpu``; ``cuda`` on a machine without one raises
    :class:`DeviceError` (naming the key, the torch build and what to use instead)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        build = f"torch {torch.__version__}, " + ("a CPU-only build" if torch.version.cuda is None
                                                  else f"built for CUDA {torch.version.cuda}, but it finds no GPU")
        raise DeviceError(f"key `device` = 'cuda': this machine has no CUDA device ({build}); use `device: auto` "
                          "(the GPU where there is one, else the CPU) or `device: cpu`, or install a CUDA build of "
                          "torch on a GPU machine (README, Development)")
    return device


def check_kernel(kernel: str, device: str) -> None:
    """``sae.kernel: triton`` needs Triton and a GPU to run it on: CUDA, or Triton's CPU interpreter
    (``TRITON_INTERPRET=1``, slow, for tests). Raises :class:`DeviceError` otherwise; ``torch`` runs anywhere."""
    if kernel != "triton":
        return
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None:
        raise DeviceError("key `sae.kernel` = 'triton': the package `triton` is not installed (it comes with torch's "
                          "CUDA builds on Linux; `pip install triton`), or use `kernel: torch`")
    if resolve_device(device) != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise DeviceError("key `sae.kernel` = 'triton': the Triton kernels run on a CUDA GPU and this run is on the "
                          "CPU; use `kernel: torch` (the default), or set TRITON_INTERPRET=1 to run them under "
                          "Triton's interpreter (slow: for tests)")


# --------------------------------------------------------------------------- embedded models: training
def neox_config(m: EmbeddedModel, vocab_size: int, context_size: int):
    """A Pythia-architecture config: parallel residual, partial rotary, untied embeddings, GELU MLP 4x."""
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=m.d_model, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, intermediate_size=4 * m.d_model, hidden_act="gelu",
        max_position_embeddings=context_size, use_parallel_residual=True, tie_word_embeddings=False,
        rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": m.rotary_pct, "rope_type": "default"},
        bos_token_id=0, eos_token_id=0, pad_token_id=1, architectures=["GPTNeoXForCausalLM"],
    )


def swiglu_width(d_model: int) -> int:
    """A Llama MLP's hidden width for ``d_model``: 8/3 d rounded up to a multiple of 16, so that its three matrices
    hold about the parameters of a 4x GELU MLP's two (the recipe of the Llama paper)."""
    return 16 * math.ceil(8 * d_model / 3 / 16)


def llama_config(m: EmbeddedModel, vocab_size: int, context_size: int):
    """A Llama-architecture config: pre-RMSNorm, full rotary, SwiGLU MLP (:func:`swiglu_width`), untied embeddings,
    as many key/value heads as query heads, no biases."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=m.d_model, num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_heads, intermediate_size=swiglu_width(m.d_model), hidden_act="silu",
        max_position_embeddings=context_size, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        bos_token_id=0, eos_token_id=0, pad_token_id=1, architectures=["LlamaForCausalLM"],
    )


def gpt2_config(m: EmbeddedModel, vocab_size: int, context_size: int):
    """A GPT-2-architecture config: learned absolute positions, pre-LayerNorm, GELU MLP 4x, tied embeddings, no
    dropout (as the other embedded families: the training recipe is the same for all)."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size, n_embd=m.d_model, n_layer=m.n_layers, n_head=m.n_heads, n_inner=4 * m.d_model,
        n_positions=context_size, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=1, architectures=["GPT2LMHeadModel"],
    )


EMBEDDED_CONFIGS = {"neox": neox_config, "llama": llama_config, "gpt2": gpt2_config}


def embedded_config(m: EmbeddedModel, vocab_size: int, context_size: int):
    """The HF config of an embedded model of family ``m.family`` (``neox``, ``llama`` or ``gpt2``)."""
    return EMBEDDED_CONFIGS[m.family](m, vocab_size, context_size)


def new_model(config):
    """A randomly initialised HF causal LM of ``config``'s family (seed torch first for a deterministic init)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config)


def lr_at(step: int, total: int, lr: float, warmup_frac: float = 0.05, floor: float = 0.1) -> float:
    """Linear warm-up then cosine decay to ``floor * lr``."""
    warm = max(1, int(warmup_frac * total))
    if step < warm:
        return lr * (step + 1) / warm
    prog = (step - warm) / max(1, total - warm)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * prog)))


def train_lm(m: EmbeddedModel, vocab_size: int, train_seqs: np.ndarray, seed: int,
             desc: str = "LM", progress: bool = True):
    """Train a tiny model of family ``m.family`` on rows of ``train_seqs`` (sampled by a seeded generator) for
    ``m.train_tokens``, by the same recipe in every family (AdamW, warm-up and cosine decay, clipping at 1).

    Deterministic on CPU for the same inputs, seed and thread count. Returns (model, log rows).
    """
    from .progress import tqdm

    torch.manual_seed(seed)
    ctx = train_seqs.shape[1]
    model = new_model(embedded_config(m, vocab_size, ctx))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=m.lr, betas=(0.9, 0.95), weight_decay=0.01)
    steps = max(1, m.train_tokens // (m.batch_size * ctx))
    gen = torch.Generator().manual_seed(seed)
    seqs = torch.from_numpy(train_seqs.astype(np.int64))
    log = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=1.0)
    t0 = time.time()
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, m.lr)
        idx = torch.randint(len(seqs), (m.batch_size,), generator=gen)
        batch = seqs[idx]
        loss = model(input_ids=batch, labels=batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            log.append({"step": step, "tokens": (step + 1) * m.batch_size * ctx, "loss": loss.item(),
                        "seconds": time.time() - t0})
    model.eval()
    return model, log


@contextmanager
def hf_progress(show: bool) -> Iterator[None]:
    """transformers' own progress bars (saving and loading shards) on or off for the block: a model saved in a worker
    process would otherwise draw its bar on the runner's terminal."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not show:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not show:
            hf_logging.enable_progress_bar()


@torch.no_grad()
def lm_eval_loss(model, seqs: np.ndarray, batch: int = 16) -> float:
    """Mean next-token CE over every prediction of every row (ctx - 1 per row)."""
    tot, n = 0.0, 0
    for i in range(0, len(seqs), batch):
        x = torch.from_numpy(seqs[i:i + batch].astype(np.int64)).to(model.device)
        logits = model(input_ids=x).logits[:, :-1].float()
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                               reduction="sum")
        tot += ce.item()
        n += x[:, 1:].numel()
    return tot / n


# --------------------------------------------------------------------------- loading
# ``source`` is a local HF-format folder or a hub id; ``revision`` (a branch such as Pythia's ``step143000``, a tag
# or a commit) selects the hub checkpoint and is ignored for a folder. With ``HF_HUB_OFFLINE=1`` a hub id resolves
# from the Hugging Face cache ($HF_HOME/hub) without the network.
def _revision(source: str, revision: str) -> dict:
    return {} if Path(source).is_dir() else {"revision": revision}


def _files_dir(source: str, revision: str) -> str:
    """The local folder holding a checkpoint's tokenizer files: ``source`` itself, or a hub id's snapshot in the
    Hugging Face cache at ``revision`` (fetched first where needed). TransformerLens re-loads the tokenizer it is
    given from its ``name_or_path`` without a revision (``get_tokenizer_with_bos``): a hub id would give it
    ``main``'s tokenizer, and offline with only ``stepN`` cached it would fail."""
    if Path(source).is_dir():
        return source
    from huggingface_hub import try_to_load_from_cache

    load_tokenizer(source, revision)  # puts the files in the cache
    found = try_to_load_from_cache(source, "tokenizer_config.json", revision=revision)
    return str(Path(found).parent) if isinstance(found, str) else source


def load_hf(source: str, revision: str = "main", device: str = "cpu", dtype=torch.float32):
    """The HF causal LM of a local HF-format dir or a hub id at ``revision`` (any family of
    :data:`params.FAMILIES`; :func:`layer_list` raises :class:`ModelFamilyError` for one whose layers it cannot
    find)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **_revision(source, revision))
    layer_list(model)  # refuse a checkpoint whose decoder layers cannot be found, before any work on it
    return model.to(device).eval()


def load_tokenizer(source: str, revision: str = "main"):
    """The checkpoint's tokenizer (a local HF-format dir, or a hub id at ``revision``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, **_revision(source, revision))


def load_hooked(source: str, revision: str = "main", device: str = "cpu", dtype=torch.float32, hf_model=None):
    """``HookedTransformer`` for a local HF-format dir or a hub id at ``revision``, through one code path, for the
    families TransformerLens converts from a config (GPT-NeoX, GPT-2, Llama, Qwen2; its Gemma 2 loads only Google's
    own checkpoints by name: it raises NotImplementedError for others).

    ``HookedTransformer.from_pretrained`` does not take a local directory, so the config and state dict
    are built from the HF model with TransformerLens' own converters; no weight processing (no LN
    folding, no centering), so hook activations equal the HF hidden states. ``hf_model`` (already loaded from
    the same source and revision) saves loading the weights twice.
    """
    import json
    import tempfile

    from transformer_lens import HookedTransformer, loading_from_pretrained as lfp

    hf = hf_model if hf_model is not None else load_hf(source, revision, "cpu", dtype)
    # TransformerLens picks the architecture from the *name* when it contains 'llama' or 'gemma' (then only its own
    # official checkpoints load) and from config.json otherwise: it reads the config from a folder of a neutral name
    # (GPT-2's converter also wants n_ctx, which transformers 5 no longer keeps)
    hf_cfg = hf.config.to_dict()
    if hf_cfg.get("model_type") == "gpt2":
        hf_cfg.setdefault("n_ctx", hf_cfg.get("n_positions"))
    with tempfile.TemporaryDirectory() as tmp:
        neutral = Path(tmp) / "checkpoint"
        neutral.mkdir()
        (neutral / "config.json").write_text(json.dumps(hf_cfg))
        cfg = lfp.get_pretrained_model_config(str(neutral), hf_cfg=hf_cfg, fold_ln=False, device=device, dtype=dtype,
                                              default_prepend_bos=False)
        sd = lfp.get_pretrained_state_dict(str(neutral), cfg, hf)
    model = HookedTransformer(cfg, load_tokenizer(_files_dir(source, revision), revision), move_to_device=False)
    model.load_and_process_state_dict(sd, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False)
    return model.to(device).eval()


# --------------------------------------------------------------------------- the adapter: layers and the hook
class _Stop(Exception):
    pass


_LAYERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its decoder layers (found once)


def layer_list(model) -> torch.nn.ModuleList:
    """The decoder layers of an HF causal LM: the one ``nn.ModuleList`` of ``config.num_hidden_layers`` modules under
    ``model.base_model`` (EleutherAI sparsify's ``get_layer_list``). Raises :class:`ModelFamilyError` naming the
    model_type when there is none or more than one (the layers cannot be told apart from other module lists)."""
    if model in _LAYERS:
        return _LAYERS[model]
    n = getattr(model.config, "num_hidden_layers", None)
    kind = getattr(model.config, "model_type", "?")
    found = [name for name, mod in model.base_model.named_modules()
             if isinstance(mod, torch.nn.ModuleList) and len(mod) == n]
    if len(found) != 1:
        what = f"{len(found)} module lists ({', '.join(found)})" if found else "none"
        raise ModelFamilyError(f"model_type {kind!r}: its decoder layers are not one nn.ModuleList of "
                               f"num_hidden_layers = {n} modules under base_model (found {what}); supported families: "
                               f"{', '.join(FAMILIES)}")
    _LAYERS[model] = model.base_model.get_submodule(found[0])
    return _LAYERS[model]


def resid_post(model, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
    """``blocks.{layer}.hook_resid_post`` (the output of decoder layer ``layer``) via the HF model, stopping after
    that layer. [batch, ctx, d]."""
    return resid_posts(model, input_ids, [layer])[layer]


@torch.no_grad()
def resid_posts(model, input_ids: torch.Tensor, layers) -> dict[int, torch.Tensor]:
    """``blocks.{L}.hook_resid_post`` for every L of ``layers`` from one forward that stops after the deepest
    of them: {L: [batch, ctx, d]}. (Each block returns a new tensor, so an earlier capture is not changed by
    the blocks after it.)"""
    layers = sorted(set(layers))
    out: dict[int, torch.Tensor] = {}
    last = layers[-1]

    def grab(layer):
        def hook(_mod, _inp, output):
            out[layer] = output[0] if isinstance(output, tuple) else output
            if layer == last:
                raise _Stop
        return hook

    handles = [layer_list(model)[L].register_forward_hook(grab(L)) for L in layers]
    try:
        model.base_model(input_ids=input_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return out


@contextmanager
def patched(model, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, the output of layer ``layer`` (its resid_post) is replaced by ``fn(resid_post)``."""

    def hook(_mod, _inp, output):
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    h = layer_list(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()
