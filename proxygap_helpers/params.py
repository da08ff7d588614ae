"""Typed, validated study parameters (YAML -> pydantic), and every value derived from them.

Everything that other modules need to know about a grid is computed here, once: the model roles (two or more,
ordered by size), each role's hooks and layers, the pairs of roles and the settings (pair x hook) the analysis
compares, d_in and d_sae, the SAE specs and their ids, and the hashes that key units of work. Bad input raises
:class:`ParamsError`, a one-paragraph message that names the key, the value and what is allowed; the command line
turns it into exit code 2 before any work starts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator,
                      model_serializer, model_validator)

TWO_ROLES = ("small", "large")  # the two-model form of ``models`` (every params file before model ladders)
ROLE_NAME = r"^[A-Za-z0-9_]+$"  # a role names folders and starts SAE and unit ids: no '-', no '/'

@dataclass(frozen=True)
class Family:
    """A supported model family (an HF ``model_type``): its name in reports, the embedded family trained here
    (``EmbeddedModel.family``) if any, and whether its models put a residual of enormous norm at the first position
    of every sequence (the BOS / attention-sink position of Llama- and Gemma-style models, Sun et al. 2024
    "Massive activations"), which ``data.skip_positions: auto`` then drops."""

    model_type: str
    label: str
    embedded: str | None
    massive_first: bool


# The families proxygap reads and splices through one adapter (models.layer_list), each tested offline on tiny
# random checkpoints built from transformers' own configs (tests/test_families.py).
FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("gpt_neox", "GPT-NeoX (Pythia)", "neox", False),
    Family("gpt2", "GPT-2", "gpt2", False),
    Family("llama", "Llama (SmolLM2)", "llama", True),
    Family("qwen2", "Qwen2", None, True),
    Family("gemma2", "Gemma 2", None, True),
)}
EMBEDDED_FAMILY_TYPE = {f.embedded: t for t, f in FAMILIES.items() if f.embedded}  # 'neox' -> 'gpt_neox'

# Architecture facts of the hub checkpoints the reference grids name (from their config.json), so that a hub grid
# can be validated and planned without network access.  name -> (n_layers, d_model, n_heads, vocab, model_type)
HUB_SHAPES: dict[str, tuple[int, int, int, int, str]] = {
    "gpt2": (12, 768, 12, 50257, "gpt2"),
    "gpt2-medium": (24, 1024, 16, 50257, "gpt2"),
    "SmolLM2-135M": (30, 576, 9, 49152, "llama"),
    "SmolLM2-360M": (32, 960, 15, 49152, "llama"),
}
# The Pythia family (from the model cards).  name -> (n_layers, d_model, n_heads)
PYTHIA_SHAPES: dict[str, tuple[int, int, int]] = {
    "pythia-14m": (6, 128, 4),
    "pythia-31m": (6, 256, 8),
    "pythia-70m": (6, 512, 8),
    "pythia-160m": (12, 768, 12),
    "pythia-410m": (24, 1024, 16),
    "pythia-1b": (16, 2048, 8),
    "pythia-1.4b": (24, 2048, 16),
    "pythia-2.8b": (32, 2560, 32),
    "pythia-6.9b": (32, 4096, 32),
    "pythia-12b": (36, 5120, 40),
}

# The claim rules and the options each one takes: what the ``claims:`` mapping may override. The rules and
# their default thresholds are ``claims.DEFAULT_RULES`` (same names and options, in this order; a test keeps
# the two in step), which merges these overrides over them.
CLAIM_OPTIONS: dict[str, tuple[str, ...]] = {
    "C1": ("min_mismatch_rate",),
    "C2": ("k", "max_mismatch_rate_at_highest"),
    "C3": ("min_d_r2_lo",),
    "C4": ("k", "tokens"),
    "C5": ("proxies", "scheme", "min_cells"),
    "C6": ("column", "min_abs_rho", "alpha", "min_pairs"),
}


class ParamsError(ValueError):
    """A parameter problem, phrased for the person who wrote the params file."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _layer_list(v: Any) -> Any:
    """A list of explicit layers (several hooks of one model): non-empty, distinct, returned sorted."""
    if isinstance(v, list):
        if not v or not all(isinstance(x, int) and not isinstance(x, bool) for x in v) or len(set(v)) != len(v):
            raise ValueError(f"give one layer (an integer, or 'mid') or a list of distinct integer layers; got {v}")
        return sorted(v)
    return v


# A model's hook(s): one block index, 'mid' (the block that ends the first half), or a list of block indices.
Layer = Annotated[int | Literal["mid"] | list[int], BeforeValidator(_layer_list)]


class EmbeddedModel(_Strict):
    """A tiny model trained here on the embedded text: ``family`` ``neox`` (GPT-NeoX, Pythia's architecture: the
    default), ``llama`` (pre-RMSNorm, full rotary, SwiGLU) or ``gpt2`` (learned positions, LayerNorm, tied
    embeddings), each by the same recipe (``models.train_lm``)."""

    source: Literal["embedded"]
    family: Literal["neox", "llama", "gpt2"] = "neox"
    d_model: int = Field(ge=8, le=4096)
    n_layers: int = Field(ge=1, le=48)
    n_heads: int = Field(ge=1, le=64)
    rotary_pct: float = Field(default=0.25, gt=0, le=1)
    train_tokens: int = Field(gt=0)
    lr: float = Field(default=1e-3, gt=0, lt=1)
    batch_size: int = Field(default=32, ge=1)
    layer: Layer = "mid"

    @model_validator(mode="after")
    def _heads_divide(self) -> "EmbeddedModel":
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.family != "neox" and "rotary_pct" in self.model_fields_set:
            raise ValueError(f"`rotary_pct` is a GPT-NeoX key (partial rotary); family {self.family!r} "
                             f"{'rotates every dimension' if self.family == 'llama' else 'has learned positions'}: "
                             "remove it")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        """``rotary_pct`` only in a GPT-NeoX model's dump (the resolved params of a Llama or GPT-2 model then load
        again, and its hashes do not carry a key that does nothing)."""
        out = handler(self)
        if self.family != "neox":
            out.pop("rotary_pct", None)
        return out

    @property
    def name(self) -> str:
        return f"tiny-{self.family}-d{self.d_model}-l{self.n_layers}"

    @property
    def model_type(self) -> str:
        """The HF model_type of its family (``gpt_neox``, ``llama``, ``gpt2``)."""
        return EMBEDDED_FAMILY_TYPE[self.family]


class HubModel(_Strict):
    """A pretrained checkpoint of a supported family (:data:`FAMILIES`: GPT-NeoX/Pythia, GPT-2, Llama/SmolLM2, Qwen2,
    Gemma 2): by hub id (``name`` at ``revision``, e.g. Pythia's ``stepN`` checkpoints), or from a local HF-format
    folder (``path``: what ``save_pretrained`` writes, or a clone of the hub repository), in which case ``name`` is
    only its label. Its family is its ``config.json``'s ``model_type`` (an embedded model's ``family`` key does not
    apply).

    Shapes (layers, width, heads, vocabulary, model_type) come from the checkpoint's ``config.json`` where it is on
    disk (the folder, or the Hugging Face cache for ``name`` at ``revision``), else from :data:`HUB_SHAPES` /
    :data:`PYTHIA_SHAPES` (so a grid can be validated and planned before anything is downloaded).
    """

    source: Literal["hub"]
    path: str | None = None  # (before name and revision: their checks read it)
    family: str | None = None  # refused: named only so that the refusal can say why (see _no_family)
    name: str
    revision: str = "main"
    layer: Layer = "mid"

    @field_validator("family")
    @classmethod
    def _no_family(cls, v: str | None) -> None:
        if v is not None:
            raise ValueError(f"`family` ({v!r}) is a key of embedded models; a hub model's family is its "
                             f"config.json's model_type (supported: {', '.join(FAMILIES)}): remove it")
        return v

    @field_validator("name")
    @classmethod
    def _known(cls, v: str, info) -> str:
        if info.data.get("path") is None and _known_shapes(v) is None:
            raise ValueError(f"unknown model {v!r}; known hub models: {', '.join(HUB_SHAPES)} and Pythia's "
                             f"{', '.join(PYTHIA_SHAPES)} (or give `path`, a local HF-format folder, whose config.json "
                             "then gives the shapes)")
        return v

    @field_validator("revision")
    @classmethod
    def _hub_only(cls, v: str, info) -> str:
        if info.data.get("path") is not None and v != "main":
            raise ValueError(f"`revision` selects a checkpoint on the hub, but `path` is a local folder holding one "
                             "checkpoint: drop `revision` or `path`")
        return v

    @cached_property
    def config(self) -> dict | None:
        """The checkpoint's ``config.json`` where it is on disk (None where only the hub has it)."""
        if self.path is not None:
            file = Path(self.path) / "config.json"
        else:
            from huggingface_hub import try_to_load_from_cache

            try:
                found = try_to_load_from_cache(self.name, "config.json", revision=self.revision)
            except ValueError:  # not a valid repository id
                found = None
            file = Path(found) if isinstance(found, str) else None
        if file is None or not file.is_file():
            return None
        try:
            return json.loads(file.read_text())
        except ValueError as e:
            raise ParamsError(f"{file} is not valid JSON ({e}): the checkpoint of {self.name!r} is damaged") from None

    def _shape(self, i: int, keys: tuple[str, ...]):
        """Field ``i`` of the shape: from config.json (the first of ``keys`` it has: GPT-2 names them n_layer, n_embd,
        n_head), else from the table of known hub models."""
        cfg = self.config
        if cfg is not None:
            for key in keys:
                if key in cfg:
                    return cfg[key]
        return _known_shapes(self.name)[i]

    @property
    def n_layers(self) -> int:
        return int(self._shape(0, ("num_hidden_layers", "n_layer")))

    @property
    def d_model(self) -> int:
        return int(self._shape(1, ("hidden_size", "n_embd", "d_model")))

    @property
    def n_heads(self) -> int:
        return int(self._shape(2, ("num_attention_heads", "n_head")))

    @property
    def vocab_size(self) -> int:
        return int(self._shape(3, ("vocab_size",)))

    @property
    def model_type(self) -> str:
        return str(self._shape(4, ("model_type",)))


def _pythia_base(name: str) -> str:
    """'EleutherAI/pythia-70m-deduped' -> 'pythia-70m' (the key of PYTHIA_SHAPES)."""
    return name.split("/")[-1].removesuffix("-deduped")


def _known_shapes(name: str) -> tuple[int, int, int, int, str] | None:
    """(n_layers, d_model, n_heads, vocab, model_type) of a known hub id (by its name after the organisation)."""
    base = name.split("/")[-1]
    if base in HUB_SHAPES:
        return HUB_SHAPES[base]
    if _pythia_base(name) in PYTHIA_SHAPES:
        return (*PYTHIA_SHAPES[_pythia_base(name)], 50304, "gpt_neox")
    return None


class DataParams(_Strict):
    source: Literal["sympy", "pile"] = "sympy"
    pile_dataset: str = "monology/pile-uncopyrighted"  # a hub dataset id, streamed (needs internet)
    # a local copy instead: a folder (splits from its file and folder names: data.py) or {train, validation},
    # each a file or folder of JSON lines or arrays (.jsonl / .json, plain or .gz / .bz2 / .xz / .zst) or .parquet
    # (data.TEXT_FORMATS)
    pile_files: str | dict[str, str] | None = None
    text_field: str = Field(default="text", min_length=1)
    context_size: int = Field(default=128, ge=8, le=8192)
    vocab_size: int = Field(default=4096, ge=260, le=65536)
    eval_fraction: float = Field(default=0.1, gt=0, lt=0.5)
    eval_sequences: int = Field(default=64, ge=1)
    max_chars: int | None = Field(default=None, ge=10_000)
    store_tokens: int | None = Field(default=None, gt=0)
    store_dtype: Literal["float32", "float16"] = "float32"
    # leading positions of every row dropped from SAE training and from every metric's means (the SAE does not
    # replace them; Params.skip_positions): 'auto' drops the first where the model's family puts a residual of
    # enormous norm there (Family.massive_first: Llama, Qwen2, Gemma 2), none elsewhere
    skip_positions: int | Literal["auto"] = "auto"
    allow_epochs: bool = True
    seed: int = 0

    @field_validator("pile_files", mode="before")
    @classmethod
    def _pile_files(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, dict) and set(v) == {"train", "validation"} and all(isinstance(x, str) for x in v.values()):
            return v
        raise ValueError("give a folder whose files are named by split, or both splits as {train: PATH, validation: "
                         "PATH} (the SAE training text and the held-out eval text; each a file or a folder)")

    @field_validator("source", mode="before")
    @classmethod
    def _stdlib_alias(cls, v: Any) -> Any:
        """``stdlib`` (older params files) names the embedded text, which is now the pinned SymPy sources
        (:mod:`proxygap_helpers.data`): the interpreter's standard library differed between patch releases."""
        return "sympy" if v == "stdlib" else v


# the training choices of SAELens' TopK SAETrainer among the keys below (the saelens trainer accepts no other)
SAELENS_RECIPE = {"k_aux": "half_d_in", "aux_k_normalization": "none", "b_dec_init": "zeros",
                  "center_activations": False, "decoder_unit_norm": False, "aux_k_rectified": False}


class SAEParams(_Strict):
    architecture: Literal["topk"] = "topk"
    trainer: Literal["fast", "saelens"] = "fast"  # engine.py (shared stream, sparse step) | SAELens' SAETrainer
    # the shared activation stream held at once (fast trainer), per hook: at most ``buffer_tokens`` rows and at most
    # ``buffer_bytes`` of float32 (1 GiB: 2^21 rows at d_in 128, 2^18 at pythia-410m's 1024); Params.buffer_rows
    buffer_tokens: int = Field(default=2**21, ge=1)
    buffer_bytes: int = Field(default=2**30, ge=2**20)
    precision: Literal["fp32", "tf32", "bf16"] = "fp32"  # fast trainer: TF32 matmuls (CUDA) or bf16 autocast
    # the fast trainer's step: torch ops (sparse_step.py) or Triton kernels (triton_step.py; CUDA, or the CPU under
    # TRITON_INTERPRET=1, Triton's interpreter, for tests). torch stays the default until the kernels' GPU parity and
    # speed are measured (README, "Triton kernels")
    kernel: Literal["torch", "triton"] = "torch"
    expansion: int = Field(default=32, ge=1)
    k: list[int] = Field(min_length=1)
    tokens: list[int] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)
    budget_mode: Literal["separate", "ladder"] = "separate"
    batch_size: int = Field(default=4096, ge=1)
    lr: float | None = Field(default=None, gt=0, lt=1)
    lr_warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    lr_decay_fraction: float = Field(default=0.2, ge=0, lt=1)
    ladder_warmup_tokens: int = Field(default=20_000, ge=0)
    aux_k_coefficient: float = Field(default=1 / 32, ge=0)
    # AuxK's size: SAELens' and sparsify's d_in // 2 (``half_d_in``), a number (Gao et al.: 256), or every dead latent
    k_aux: int | Literal["half_d_in", "all_dead"] = "half_d_in"
    # AuxK's error term as SAELens sums it (``none``), or divided by the residual's variance as Gao et al. and sparsify
    # do (``residual_variance``: then on the main loss's scale, times the batch's variance; sparse_step.aux_loss)
    aux_k_normalization: Literal["none", "residual_variance"] = "none"
    # AuxK's codes: SAELens' un-rectified pre-activations (false), or through the ReLU as sparsify and
    # dictionary_learning take them (true)
    aux_k_rectified: bool = False
    dead_tokens_window: int = Field(default=100_000, gt=0)
    # b_dec at step 0 (pre-encoder bias): SAELens' zeros, or the mean or geometric median of the activations of the
    # norm-estimate batches (sparsify, dictionary_learning; Gao et al. use the geometric median)
    b_dec_init: Literal["zeros", "mean", "geometric_median"] = "zeros"
    # subtract the activations' mean (from the norm-estimate batches) before scaling, and scale the centred rows to
    # norm sqrt(d_in) (Simon et al. 2026); folded into b_dec when saved, so the SAE reads raw activations
    center_activations: bool = False
    # Gao et al.'s decoder constraint: rows renormalised to unit norm after every step, the gradient's component
    # along each row removed before it (SAELens' TopK leaves the norms free and divides them out in the forward)
    decoder_unit_norm: bool = False
    normalize_activations: Literal["expected_average_only_in", "none"] = "expected_average_only_in"
    norm_estimate_batches: int = Field(default=8, ge=1)
    # the decoder rows' norm at init (W_enc = W_dec^T): Gao et al.'s unit norm; SAELens' own default 0.1 left 42-95%
    # of the embedded pairs' latents dead (README, "The published default study")
    decoder_init_norm: float | None = Field(default=1.0, gt=0)
    log_every: int = Field(default=10, ge=1)

    @field_validator("k", "tokens")
    @classmethod
    def _positive(cls, v: list[int], info) -> list[int]:
        bad = [x for x in v if x < 1]
        if bad:
            what = "k must be >= 1" if info.field_name == "k" else "a token budget must be > 0"
            raise ValueError(f"{what}; got {bad[0]}")
        if len(set(v)) != len(v):
            raise ValueError(f"values must be distinct; got {v}")
        return sorted(v)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if any(s < 0 for s in v) or len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct integers >= 0; got {v}")
        return sorted(v)

    @model_validator(mode="after")
    def _whole_batches(self) -> "SAEParams":
        """Every budget is a whole number of batches (the engine trains ``tokens // batch_size`` steps: 1023 tokens
        at batch 128 would train 896 and be recorded as 1023), and the precision is one the trainer applies."""
        bad = [t for t in self.tokens if t % self.batch_size]
        if bad:
            t, bs = bad[0], self.batch_size
            lo, hi = t // bs * bs, -(-t // bs) * bs
            g = math.gcd(*self.tokens)
            fits = max(d for d in range(1, bs + 1) if g % d == 0)
            near = f"{lo} or {hi}" if lo else f"{hi}"
            raise ValueError(f"key `sae.tokens`: budget {t} is not a whole number of batches (sae.batch_size = {bs}: "
                             f"{t / bs:.2f} batches), so it would train fewer tokens than its label says; use {near}, or "
                             f"a batch size that divides every budget (the largest one up to {bs} is {fits})")
        if self.trainer == "saelens" and self.precision != "fp32":
            raise ValueError(f"key `sae.precision` = {self.precision!r}: the saelens trainer (the parity baseline) trains "
                             "in fp32 only; use `precision: fp32` with it, or `trainer: fast`")
        if isinstance(self.k_aux, int) and self.k_aux < 1:
            raise ValueError(f"key `sae.k_aux` = {self.k_aux}: AuxK's size must be >= 1, `half_d_in` (SAELens' and "
                             "sparsify's d_in // 2) or `all_dead`")
        if self.trainer == "saelens":
            departs = {key: getattr(self, key) for key, v in SAELENS_RECIPE.items() if getattr(self, key) != v}
            if departs:
                raise ValueError(
                    f"key `sae.trainer` = 'saelens' runs SAELens' own recipe, which these keys depart from: "
                    + ", ".join(f"`sae.{k}` = {v!r}" for k, v in departs.items()) + "; set "
                    + ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in SAELENS_RECIPE.items() if k in departs)
                    + " with it (the fast trainer then gives the same SAEs: the parity test), or use `trainer: fast`")
        if self.trainer == "saelens" and self.kernel != "torch":
            raise ValueError(f"key `sae.kernel` = {self.kernel!r}: the saelens trainer runs SAELens' own step; the "
                             "kernels are the fast trainer's (`trainer: fast`)")
        return self

    def lr_for(self, d_sae: int) -> float:
        """Gao et al. (2024): lr = 2e-4 / sqrt(n_latents / 2**14) unless given."""
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(d_sae / 2**14)


class EvalParams(_Strict):
    ce_rec: Literal["relative", "zero_norm"] = "relative"
    batch_sequences: int = Field(default=16, ge=1)
    exclude_special_tokens: bool = False
    swd: bool = True
    gwd: bool = True  # first-order gradient-weighted distortion: one backward per eval batch, shared by the SAEs
    random_error_draws: int = Field(default=4, ge=0, le=64)  # Gurnee's random-error baseline; 0 turns it off
    random_error_sequences: int = Field(default=16, ge=1)  # its fixed, evenly spaced subset of eval sequences
    twonn_points: int = Field(default=2048, ge=3, le=65536)  # seeded positions for the TwoNN dimension (D3)
    seed: int = Field(default=0, ge=0)  # seeds the TwoNN subsample and the random directions


class StatsParams(_Strict):
    ci: float = Field(default=0.95, gt=0.5, lt=1)
    bootstrap: int = Field(default=0, ge=0)
    seed: int = 0


class SlurmParams(_Strict):
    partition: str | None = None
    time_min: int = Field(default=120, ge=1)
    gpus_per_node: int = Field(default=0, ge=0)
    mem_gb: int = Field(default=16, ge=1)
    cpus_per_task: int = Field(default=4, ge=1)
    array_parallelism: int = Field(default=16, ge=1)


class ExecutorParams(_Strict):
    """How units run. ``threads``: torch (and BLAS) intra-op threads of every unit, whatever the machine: on a
    CPU the numbers depend on the thread count (float sums split across threads), so it is part of the params and
    of every id; ``jobs``: units at once (``auto``: the machine's cores divided by ``threads``)."""

    kind: Literal["local", "submitit"] = "local"
    threads: int = Field(default=1, ge=1, le=256)
    jobs: int | Literal["auto"] = "auto"
    shards: int = Field(default=1, ge=1, le=4096)  # SAE units per role (each streams its role's activations once)
    slurm: SlurmParams = SlurmParams()

    @field_validator("jobs", mode="before")
    @classmethod
    def _jobs(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 64):
            return v
        raise ValueError(f"give an integer in [1, 64] or 'auto' (the cores divided by executor.threads); got {v!r}")


class ReportParams(_Strict):
    title: str = "proxygap: do SAE reconstruction proxies agree with behaviour as models grow?"
    reference_table: bool = False


class Setting(NamedTuple):
    """One comparison of the analysis: a pair of models (``small`` < ``large`` by size) at one matched hook.

    ``label`` names it in tables, file names and the report (``small-large``, plus ``@d0.25`` / ``@h1`` for a
    grid with several hooks per model); ``hook`` is the hook's own label (``d0.25`` for a relative depth,
    ``h1``, ``h2``, ... for the i-th shallowest explicit layer; empty for one hook per model)."""

    label: str
    pair: str
    hook: str
    small: str
    large: str
    layer_small: int
    layer_large: int


class Params(_Strict):
    """The whole study. ``models``: two or more models ordered by size, as a list of entries with a ``role``
    each (``- {role: p70m, source: hub, name: EleutherAI/pythia-70m}``) or a mapping role -> model in that
    order (the two-model form ``{small: ..., large: ...}`` of the first params files). ``depths`` gives every
    model the hooks at these relative depths; without it each model's ``layer`` (one, or a list) says.
    ``pairs``: ``consecutive`` sizes (default), or ``with_smallest`` (also each larger model against the smallest)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataParams = DataParams()
    models: dict[str, Annotated[EmbeddedModel | HubModel, Field(discriminator="source")]]
    depths: list[float] | None = None
    pairs: Literal["consecutive", "with_smallest", "within_family"] = "consecutive"
    sae: SAEParams
    evaluation: EvalParams = EvalParams()
    stats: StatsParams = StatsParams()
    claims: dict[str, Any] = Field(default_factory=dict)
    executor: ExecutorParams = ExecutorParams()
    report: ReportParams = ReportParams()

    @field_validator("models", mode="before")
    @classmethod
    def _models_in_order(cls, v: Any) -> Any:
        """The list form -> a mapping role -> model in list order; the two-role mapping -> small, then large."""
        if isinstance(v, list):
            out: dict[str, Any] = {}
            for i, entry in enumerate(v):
                if not isinstance(entry, dict) or not isinstance(entry.get("role"), str):
                    raise ValueError(f"entry {i} of the list needs a `role`: a short name for the model used in ids "
                                     "and folders (letters, digits, '_'), e.g. `role: p70m`")
                entry = dict(entry)
                role = entry.pop("role")
                if role in out:
                    raise ValueError(f"role {role!r} is given twice: every model needs its own role")
                out[role] = entry
            return out
        if isinstance(v, dict) and set(v) == set(TWO_ROLES):
            return {r: v[r] for r in TWO_ROLES}
        return v

    @field_validator("depths")
    @classmethod
    def _depths(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return v
        if not v or any(not 0 < d < 1 for d in v) or len(set(v)) != len(v):
            raise ValueError(f"give distinct relative depths strictly between 0 and 1 (e.g. [0.25, 0.5, 0.75]: "
                             f"the hook after that share of a model's blocks); got {v}")
        return sorted(v)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Params":
        import re

        if len(self.models) < 2:
            raise ValueError(f"key `models` defines {sorted(self.models)}: give two or more models ordered by size, "
                             "as a list of entries with a `role` each, or the two roles 'small' and 'large'")
        bad = [r for r in self.models if not re.fullmatch(ROLE_NAME, r)]
        if bad:
            raise ValueError(f"key `models`: role {bad[0]!r} is not a valid name: use letters, digits and '_' only "
                             "(roles start SAE and unit ids and name folders)")
        sources = {m.source for m in self.models.values()}
        if len(sources) != 1:
            raise ValueError(f"key `models.<role>.source`: all models must have the same source ('embedded' or "
                             f"'hub'); got {sorted(sources)}")
        if "embedded" in sources and self.data.source != "sympy":
            raise ValueError("key `data.source`: embedded models are trained on the embedded text (the pinned SymPy "
                             "sources): data.source must be 'sympy'")
        if "hub" in sources and self.data.source != "pile":
            raise ValueError("key `data.source`: hub models are evaluated on the Pile: data.source must "
                             "be 'pile'")
        if self.data.pile_files is not None and self.data.source != "pile":
            raise ValueError("key `data.pile_files`: a local copy of the Pile is read only with data.source 'pile' "
                             "(hub models); remove it for embedded models")
        if self.depths is not None:
            explicit = [r for r, m in self.models.items() if m.layer != "mid"]  # ('mid' is the default: the
            # resolved params, params.resolved.yaml, write it out for every model)
            if explicit:
                raise ValueError(f"key `models.{explicit[0]}.layer`: with `depths` every model's hooks are at those "
                                 "relative depths; remove the model's `layer` (or remove `depths`)")
        return self

    # ---- derived values (the one place they are computed) ----
    @property
    def roles(self) -> tuple[str, ...]:
        """The model roles, smallest model first (``("small", "large")`` for the two-model form)."""
        return tuple(self.models)

    def n_params(self, role: str) -> int:
        """Non-embedding parameters of a role's model, 12 x n_layers x d_model^2 (Kaplan et al. 2020, eq. 2.1):
        what orders models by size and gives the size ratio of a pair."""
        m = self.models[role]
        return 12 * m.n_layers * m.d_model ** 2

    def layers(self, role: str) -> list[int]:
        """The block indices of a role's hooks, shallowest first: the ``depths`` (relative depth d -> the block
        that ends that share of the model, ``ceil(d * n_layers) - 1``: 0.5 of 4 layers is ``blocks.1``, 0.25 of 8
        is ``blocks.1``), else the model's ``layer`` (``mid`` = ``ceil(n_layers / 2) - 1``, the same as depth
        0.5; an integer; or a list of integers)."""
        m = self.models[role]
        if self.depths is not None:
            return [depth_layer(d, m.n_layers) for d in self.depths]
        if m.layer == "mid":
            return [depth_layer(0.5, m.n_layers)]
        return list(m.layer) if isinstance(m.layer, list) else [m.layer]

    @property
    def n_hooks(self) -> int:
        """Hooks per model (the same for every model: hooks pair up by position, shallowest first)."""
        return len(self.layers(self.roles[0]))

    @property
    def multi_hook(self) -> bool:
        """Several hooks per model: SAE ids, unit ids and store folders then carry the layer."""
        return self.n_hooks > 1

    def hook_label(self, i: int) -> str:
        """Label of the i-th hook of every model: ``d0.25`` (from ``depths``), ``h1``, ``h2``, ... (explicit
        layers); empty when each model has one hook."""
        if not self.multi_hook:
            return ""
        return f"d{self.depths[i]:g}" if self.depths is not None else f"h{i + 1}"

    def layer(self, role: str) -> int:
        """The block index of a role's only hook (``layers`` gives all of them). ``mid`` is the block that ends
        the first half of the model: ``ceil(n_layers / 2) - 1``, relative depth ``(layer + 1) / n_layers`` = 0.5
        for an even layer count (4 layers: ``blocks.1``; 8: ``blocks.3``; 24: ``blocks.11``), never the last
        block (2 layers or more). Raises ValueError in a grid with several hooks per model."""
        layers = self.layers(role)
        if len(layers) != 1:
            raise ValueError(f"the {role} model has {len(layers)} hooks ({layers}): name the layer")
        return layers[0]

    def depth(self, role: str, layer: int | None = None) -> float:
        """Relative depth of a hook: blocks before it, included, over all blocks (Pythia-70m ``blocks.3``:
        4/6 = 0.67; Pythia-410m ``blocks.12``: 13/24 = 0.54)."""
        return ((self.layer(role) if layer is None else layer) + 1) / self.models[role].n_layers

    def hook(self, role: str, layer: int | None = None) -> str:
        """TransformerLens' name of the hook: ``blocks.<layer>.hook_resid_post`` (the only hook by default)."""
        return f"blocks.{self.layer(role) if layer is None else layer}.hook_resid_post"

    def family(self, role: str) -> str:
        """The HF model_type of a role's model (``gpt_neox``, ``gpt2``, ``llama``, ...; :data:`FAMILIES`)."""
        return self.models[role].model_type

    def family_groups(self) -> dict[str, list[str]]:
        """Roles by family, in params order (one group unless ``pairs: within_family`` mixes families)."""
        out: dict[str, list[str]] = {}
        for r in self.roles:
            out.setdefault(self.family(r), []).append(r)
        return out

    def pair_list(self) -> list[tuple[str, str]]:
        """(smaller, larger) roles compared: consecutive sizes, then (``pairs: with_smallest``) the smallest
        against every model two or more steps above it; with ``pairs: within_family``, consecutive sizes within
        each family (a pair never mixes families)."""
        if self.pairs == "within_family":
            return [pair for group in self.family_groups().values() for pair in zip(group[:-1], group[1:])]
        r = self.roles
        out = list(zip(r[:-1], r[1:]))
        if self.pairs == "with_smallest":
            out += [(r[0], b) for b in r[2:]]
        return out

    def settings(self) -> list[Setting]:
        """Every (pair, hook) the analysis compares, pair by pair, shallowest hook first; hooks match by
        position (the i-th hook of one model with the i-th of the other: the same relative depth with
        ``depths``)."""
        out = []
        for small, large in self.pair_list():
            for i, (ls, ll) in enumerate(zip(self.layers(small), self.layers(large))):
                hook = self.hook_label(i)
                pair = f"{small}-{large}"
                out.append(Setting(f"{pair}@{hook}" if hook else pair, pair, hook, small, large, ls, ll))
        return out

    def d_in(self, role: str) -> int:
        return self.models[role].d_model

    def buffer_rows(self, role: str) -> int:
        """Rows of ``role``'s shared activation buffer per hook (fast trainer): ``sae.buffer_tokens``, capped at
        ``sae.buffer_bytes`` of float32 rows of width ``d_in``. The buffer's host memory is rows x d_in x 4 bytes
        per hook; for a store it decides how the rows are chunked, so it is part of the SAE hash."""
        return max(1, min(self.sae.buffer_tokens, self.sae.buffer_bytes // (4 * self.d_in(role))))

    def d_sae(self, role: str) -> int:
        return self.sae.expansion * self.d_in(role)

    @property
    def threads(self) -> int:
        """Intra-op threads of every unit (``executor.threads``; ``$PROXYGAP_THREADS`` overrides it in
        ``grid.resolve``, and then it is in the resolved params and the ids like any other value)."""
        return self.executor.threads

    @property
    def jobs(self) -> int:
        """Units the local executor runs at once: ``executor.jobs``, or for ``auto`` the machine's cores divided by
        the threads per unit (at least 1, at most 64). Never changes a number: only ``threads`` does."""
        if self.executor.jobs != "auto":
            return self.executor.jobs
        return max(1, min(64, (os.cpu_count() or 1) // self.threads))

    @property
    def embedded(self) -> bool:
        return self.models[self.roles[0]].source == "embedded"

    def skip_positions(self, role: str) -> int:
        """Leading positions of each row that ``role``'s SAEs never see and no metric counts (``data.skip_positions``;
        ``auto``: 1 for a family with a massive-norm first position, :attr:`Family.massive_first`, else 0)."""
        n = self.data.skip_positions
        return (1 if FAMILIES[self.models[role].model_type].massive_first else 0) if n == "auto" else n

    @property
    def store_tokens(self) -> int:
        """Tokens of activations kept on disk per role and hook (default: the largest budget plus the batches
        used to estimate the activation norm, so that no budget needs a second epoch)."""
        return self.data.store_tokens or max(self.sae.tokens) + self.sae.norm_estimate_batches * self.sae.batch_size

    @cached_property
    def extract_hash(self) -> str:
        """Everything that shapes the models, the text and the activation stores (and, through them, every SAE and
        metric: the thread count too, since CPU numerics depend on it)."""
        shaped = {"data": hashed(self.data), "models": {r: hashed(m) for r, m in self.models.items()},
                  "store_tokens": self.store_tokens}
        if self.depths is not None:
            shaped["depths"] = self.depths
        if self.threads != ExecutorParams.model_fields["threads"].default:  # CPU numbers depend on it (one thread:
            shaped["threads"] = self.threads  # the ids of every grid from before the key)
        return short_hash(shaped)

    def sae_hash(self, role: str, k: int, tokens: int, seed: int, layer: int | None = None) -> str:
        """Everything that shapes one SAE's weights. In ladder mode the schedule does not depend on the budget,
        so the checkpoint at T is the same whatever the largest budget is. With several hooks per model the
        layer is part of it (with one, the extract hash already fixes the hook)."""
        unused = {"buffer_tokens", "precision"} if self.sae.trainer == "saelens" else set()
        sae = {key: value for key, value in hashed(self.sae).items()
               if key not in {"k", "tokens", "seeds", "log_every", "buffer_bytes"} | unused}
        if "buffer_tokens" in sae:  # the rows the buffer holds (the byte cap applied): what shapes the stream
            sae["buffer_tokens"] = self.buffer_rows(role)
        shaped = {"extract": self.extract_hash, "role": role, "k": k, "tokens": tokens, "seed": seed, "sae": sae,
                  "lr": self.sae.lr_for(self.d_sae(role))}
        if self.multi_hook:
            shaped["layer"] = self.layer(role) if layer is None else layer
        return short_hash(shaped)

    def sae_id(self, role: str, k: int, tokens: int, seed: int, layer: int | None = None) -> str:
        """``<role>-k<k>-t<tokens>-s<seed>-<hash>``; ``<role>-L<layer>-k...`` with several hooks per model."""
        site = f"{role}-L{self.layer(role) if layer is None else layer}" if self.multi_hook else role
        return f"{site}-k{k}-t{format_tokens(tokens)}-s{seed}-{self.sae_hash(role, k, tokens, seed, layer)}"

    def sae_specs(self, role: str | None = None, k: int | None = None, seed: int | None = None,
                  layer: int | None = None) -> list["SAESpec"]:
        """Every SAE of the grid (or those of one role / k / seed / layer), ordered role, layer, k, seed, budget."""
        return [SAESpec(r, kk, t, s, self.sae_id(r, kk, t, s, L), L)
                for r in self.roles if role in (None, r)
                for L in self.layers(r) if layer in (None, L)
                for kk in self.sae.k if k in (None, kk)
                for s in self.sae.seeds if seed in (None, s) for t in self.sae.tokens]

    @cached_property
    def eval_hash(self) -> str:
        return short_hash({"evaluation": self.evaluation.model_dump(), "extract": self.extract_hash})

    def params_hash(self) -> str:
        return short_hash(hashed(self, mode="json"))


def depth_layer(depth: float, n_layers: int) -> int:
    """The block that ends the first ``depth`` of a model's ``n_layers`` blocks: ``ceil(depth * n_layers) - 1``
    (to 1e-9, so 0.3 x 10 is block 2), so that its relative depth ``(layer + 1) / n_layers`` is the smallest one
    >= ``depth``. May be the last block: the params check refuses it."""
    return math.ceil(depth * n_layers - 1e-9) - 1


# Keys added after results existed: they enter the hashes (extract, SAE and unit ids) only when set to something
# other than their default, so grids that do not use them keep their ids and results.
_LATER_KEYS = {DataParams: ("pile_files", "text_field", "skip_positions"), HubModel: ("path", "family"), EmbeddedModel: ("family",),
               Params: ("depths", "pairs"),
               ExecutorParams: ("threads",), SAEParams: ("buffer_bytes", "kernel", "k_aux", "aux_k_normalization",
                                                          "b_dec_init", "center_activations",
                                                          "decoder_unit_norm", "aux_k_rectified")}


# later keys whose default has since changed: left out at the value that every result before them had
_OMITTED_AT = {"k_aux": "half_d_in", "aux_k_normalization": "none", "b_dec_init": "zeros",
               "center_activations": False, "decoder_unit_norm": False, "aux_k_rectified": False}


def hashed(m: BaseModel, mode: str = "python") -> dict:
    """``m``'s dump as the hashes see it: a key added after results existed is left out while it has its default
    (:data:`_LATER_KEYS`), so that grids which do not use it keep their ids, caches and results."""
    dump = m.model_dump(mode=mode)
    for key in _LATER_KEYS.get(type(m), ()):
        if dump[key] == _OMITTED_AT.get(key, type(m).model_fields[key].default):
            del dump[key]
    if isinstance(m, Params):  # (params_hash: the executor's later keys too; the other sections as they were)
        dump["executor"] = hashed(m.executor, mode)
        dump["sae"] = hashed(m.sae, mode)
        dump["models"] = {r: hashed(model, mode) for r, model in m.models.items()}
        for key in _LATER_IN_DATA:  # (the data section's older later keys were in the params hash from the start)
            if dump["data"][key] == DataParams.model_fields[key].default:
                del dump["data"][key]
    return dump


_LATER_IN_DATA = ("skip_positions",)  # data keys added after the params hash covered the data section as it was


class SAESpec:
    """One SAE of the grid: its role, sparsity, budget, seed, readable id and the layer of its hook."""

    __slots__ = ("role", "k", "tokens", "seed", "sae_id", "layer")

    def __init__(self, role: str, k: int, tokens: int, seed: int, sae_id: str, layer: int):
        self.role, self.k, self.tokens, self.seed, self.sae_id, self.layer = role, k, tokens, seed, sae_id, layer

    def __repr__(self) -> str:
        return f"SAESpec({self.sae_id})"


def format_tokens(n: int) -> str:
    """1_000_000 -> '1M', 250_000 -> '250k', 1500 -> '1500'."""
    for unit, div in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def short_hash(obj: Any, n: int = 8) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


_MODEL_TAGS = {"embedded": EmbeddedModel, "hub": HubModel}


def _key_path(loc: tuple) -> tuple[str, ...]:
    """The dotted key of an error location, without pydantic's discriminator tag (``models.small.embedded.x``)."""
    parts = [str(p) for p in loc]
    if len(parts) >= 3 and parts[0] == "models" and parts[2] in _MODEL_TAGS:
        del parts[2]
    return tuple(p for p in parts if not p.startswith(("EmbeddedModel", "HubModel")))


def _allowed_keys(loc: tuple) -> list[str] | None:
    """The keys allowed beside the unknown key at ``loc`` (None where the model cannot be told)."""
    model: Any = Params
    parts = [str(p) for p in loc[:-1]]
    if len(parts) >= 3 and parts[0] == "models" and parts[2] in _MODEL_TAGS:
        return sorted(_MODEL_TAGS[parts[2]].model_fields)
    for part in parts:
        field = getattr(model, "model_fields", {}).get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return sorted(model.model_fields)


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(_key_path(err["loc"]))
    value = err.get("input")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        import difflib

        allowed = _allowed_keys(err["loc"])
        close = difflib.get_close_matches(str(err["loc"][-1]), allowed or [], n=1, cutoff=0.5)
        guess = f": did you mean `{'.'.join((*_key_path(err['loc'])[:-1], close[0]))}`?" if close else ""
        where = f"allowed keys here: {', '.join(allowed)}" if allowed else "check its spelling"
        return f"unknown key `{key}`{guess} ({where})"
    if err["type"] == "missing":
        return f"required key `{key}` is missing"
    if not key or msg.startswith("key `"):  # a cross-check (of the file or a section): its message names the keys
        return msg
    shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
    return f"key `{key}` = {shown}: {msg}"


def _rotary_dims(head_dim: int, rotary_pct: float) -> int | None:
    """The rotated dimensions per head, head_dim x rotary_pct, when that is an even integer, else None.

    HF GPT-NeoX rotates ``int(head_dim * rotary_pct)`` dimensions, TransformerLens ``round(...)``, and rotary
    embeddings pair dimensions: only an even integer product means the same model in both.
    """
    dims = head_dim * rotary_pct
    n = round(dims)
    return n if abs(dims - n) < 1e-9 and n % 2 == 0 and n > 0 else None


def _check_paths(p: Params) -> None:
    """Every local path the params name exists (what is inside a text folder is ``data.check_text_source``'s)."""
    files = p.data.pile_files
    named = {"data.pile_files": files} if isinstance(files, str) else {f"data.pile_files.{k}": v
                                                                       for k, v in (files or {}).items()}
    for key, path in named.items():
        if not Path(path).exists():
            raise ParamsError(f"key `{key}` = {path!r}: no such file or folder (give a .jsonl, .jsonl.zst or .parquet "
                              "file, or a folder of them)")
    for role in p.roles:
        m = p.models[role]
        if getattr(m, "path", None) is None:
            continue
        key = f"models.{role}.path"
        if not (Path(m.path) / "config.json").is_file():
            raise ParamsError(f"key `{key}` = {m.path!r}: not a folder with a config.json (give a local HF-format "
                              "checkpoint: the folder `save_pretrained` writes, or a clone of the hub repository)")
        if not any(any(Path(m.path).glob(pattern)) for pattern in WEIGHT_FILES):
            raise ParamsError(f"key `{key}` = {m.path!r}: the folder has a config.json but no weights "
                              f"({' or '.join(WEIGHT_FILES)}); give the whole checkpoint folder")
    for role in p.roles:
        m = p.models[role]
        if isinstance(m, HubModel) and (m.path is not None or m.config is not None):
            _check_family(f"models.{role}.{'path' if m.path else 'name'}", m.path or m.name, m.model_type)


WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")


def _check_family(key: str, value: str, kind: str | None) -> None:
    if kind not in FAMILIES:
        raise ParamsError(f"key `{key}` = {value!r}: its config.json says model_type {kind!r}, which proxygap does not "
                          f"read; supported model_types: {', '.join(FAMILIES)} (README, 'Across model families')")


def _offline() -> bool:
    """The Hugging Face hub is off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set to a true value)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _cached_revisions(name: str) -> list[str]:
    """The branches and tags of hub model ``name`` that the local Hugging Face cache holds (``refs/``)."""
    from huggingface_hub import constants

    refs = Path(constants.HF_HUB_CACHE) / f"models--{name.replace('/', '--')}" / "refs"
    return sorted(str(f.relative_to(refs)) for f in refs.rglob("*") if f.is_file()) if refs.is_dir() else []


def check_offline_cache(p: Params) -> None:
    """Offline, every hub model (by id, not ``path``) must be in the local cache at its revision: name both and the
    revisions that are there, instead of the generic error the hub library gives at extract time. (``run`` checks
    it before any work; loading and ``plan`` do not need the checkpoint: shapes come from :data:`PYTHIA_SHAPES`.)"""
    if not _offline():
        return
    for role in p.roles:
        m = p.models[role]
        if isinstance(m, HubModel) and m.path is None and m.config is None:
            have = _cached_revisions(m.name)
            there = f"the cache holds {', '.join(have)}" if have else "the cache holds no revision of it"
            raise ParamsError(f"key `models.{role}.revision` = {m.revision!r}: {m.name} at revision {m.revision!r} is not "
                              f"in the offline Hugging Face cache ({there}); download it with the hub reachable, give "
                              "`path` (a local folder), or unset HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE")


def _absolute_paths(raw: dict[str, Any], base: Path) -> None:
    """Local paths in ``raw`` (``data.pile_files``, ``models.<role>.path``), relative to the params file's folder,
    made absolute in place, so that the resolved params (``params.resolved.yaml``) mean the same files anywhere."""
    def fix(v):
        if not isinstance(v, str):
            return v
        return os.path.abspath(base / os.path.expanduser(v))

    data = raw.get("data")
    if isinstance(data, dict) and "pile_files" in data:
        pf = data["pile_files"]
        data["pile_files"] = {k: fix(v) for k, v in pf.items()} if isinstance(pf, dict) else fix(pf)
    models = raw.get("models")
    for m in models.values() if isinstance(models, dict) else models if isinstance(models, list) else ():
        if isinstance(m, dict) and "path" in m:
            m["path"] = fix(m["path"])


def _check_hooks(p: Params, role: str) -> None:
    """A role's hooks exist in its model: 'mid' needs 2+ layers, explicit layers lie in range, a relative depth
    lands on a block that is not the last one, and distinct depths on distinct blocks."""
    m = p.models[role]
    n = m.n_layers
    if p.depths is not None:
        layers = p.layers(role)
        for d, layer in zip(p.depths, layers):
            if layer >= n - 1:
                raise ParamsError(f"key `depths` = {p.depths}: depth {d:g} of the {role} model ({n} layers) is block "
                                  f"ceil({d:g} x {n}) - 1 = {layer}, the last block; depths must be at most "
                                  f"{n - 1}/{n} = {(n - 1) / n:.3g} for this model (a hook is never on the last "
                                  "block)")
        if len(set(layers)) != len(layers):
            raise ParamsError(f"key `depths` = {p.depths}: the {role} model has only {n} layers, so these depths land "
                              f"on the blocks {layers}, not all distinct; use fewer or further apart depths, or "
                              "deeper models")
        return
    if m.layer == "mid" and n < 2:
        raise ParamsError(f"key `models.{role}.layer` = 'mid': a model with {n} layer has no middle "
                          "layer (its only block is the last one); give it 2 or more layers, or an integer "
                          "layer")
    for layer in [] if m.layer == "mid" else m.layer if isinstance(m.layer, list) else [m.layer]:
        if not 0 <= layer < n:
            raise ParamsError(f"key `models.{role}.layer` = {m.layer}: a hook layer must be 'mid' or an integer "
                              f"in [0, {n - 1}] for a model with {n} layers")


def _check_ladder(p: Params) -> None:
    """Models are ordered by size (non-embedding parameters never decreasing: checkpoints of one model may share a
    size), in the list form and the two-role form ``{small, large}`` alike; every model has the same number of
    hooks. With ``pairs: within_family`` the order holds within each family, and each family has two or more
    models; otherwise all models are of one family (a pair never mixes families)."""
    groups = p.family_groups()
    if p.pairs != "within_family" and len(groups) > 1:
        raise ParamsError(f"key `pairs` = {p.pairs!r}: the models are of {len(groups)} families "
                          f"({'; '.join(t + ': ' + ', '.join(rs) for t, rs in groups.items())}) and a pair compares two "
                          "models of one family: set `pairs: within_family`")
    if p.pairs == "within_family" and (alone := [t for t, rs in groups.items() if len(rs) < 2]):
        raise ParamsError(f"key `models`: with `pairs: within_family` every family needs two or more models; "
                          f"{', '.join(alone)} has one ({', '.join(groups[alone[0]])})")
    for roles in groups.values():
        sizes = [p.n_params(r) for r in roles]
        for (a, na), (b, nb) in zip(zip(roles, sizes), zip(roles[1:], sizes[1:])):
            if nb < na and p.roles == TWO_ROLES:  # every delta is large - small: swapped models flip every sign
                raise ParamsError(f"key `models`: `large` ({nb:,} non-embedding parameters, 12 x n_layers x "
                                  f"d_model^2) is smaller than `small` ({na:,}); swap the two models (every delta is "
                                  "large - small)")
            if nb < na:
                raise ParamsError(f"key `models`: models must be ordered by size, smallest first"
                                  f"{' within each family' if len(groups) > 1 else ''}, but {b!r} ({nb:,} "
                                  f"non-embedding parameters, 12 x n_layers x d_model^2) is smaller than {a!r} "
                                  f"({na:,}); reorder them")
    counts = {r: len(p.layers(r)) for r in p.roles}
    if len(set(counts.values())) != 1:
        raise ParamsError(f"key `models.<role>.layer`: every model needs the same number of hooks (they pair up by "
                          f"position, shallowest first); got {counts}")


def _check_model_dependent(p: Params) -> None:
    _check_paths(p)
    n, ctx = p.data.skip_positions, p.data.context_size
    if n != "auto" and not 0 <= n <= ctx - 2:
        raise ParamsError(f"key `data.skip_positions` = {n}: give 'auto' or an integer in [0, {ctx - 2}] (a row of "
                          f"data.context_size = {ctx} tokens must keep two positions: one prediction)")
    for role in p.roles:
        m = p.models[role]
        if isinstance(m, EmbeddedModel) and m.family == "neox" and _rotary_dims(m.d_model // m.n_heads,
                                                                                 m.rotary_pct) is None:
            head_dim = m.d_model // m.n_heads
            ok = [f"{n / head_dim:g}" for n in range(2, head_dim + 1, 2)]
            raise ParamsError(f"key `models.{role}.rotary_pct` = {m.rotary_pct}: head_dim x rotary_pct must be an "
                              f"even integer (the rotated dimensions per head come in pairs), but head_dim = "
                              f"d_model / n_heads = {m.d_model} / {m.n_heads} = {head_dim} gives "
                              f"{head_dim} x {m.rotary_pct} = {head_dim * m.rotary_pct:g}; allowed values for this "
                              f"shape: {', '.join(ok[:8])}{', ...' if len(ok) > 8 else ''}")
        _check_hooks(p, role)
        for k in p.sae.k:
            if k >= p.d_sae(role):
                raise ParamsError(f"key `sae.k` = {k}: k must be smaller than d_sae = expansion x d_model = "
                                  f"{p.sae.expansion} x {m.d_model} = {p.d_sae(role)} for the {role} model")
    _check_ladder(p)
    if p.embedded and p.data.vocab_size > 65536:
        raise ParamsError("key `data.vocab_size` too large")
    largest = max(p.sae.tokens)
    if not p.data.allow_epochs and p.store_tokens < largest:
        raise ParamsError(f"key `sae.tokens` = {largest}: this budget is larger than the activation store "
                          f"(`data.store_tokens` = {p.store_tokens}) and `data.allow_epochs` is false; raise "
                          "store_tokens, lower the budget or allow epochs")


class _DuplicateKey(yaml.constructor.ConstructorError):
    """A key given twice in one mapping (YAML itself would keep the last one silently)."""


class _SafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader: never constructs Python objects (``!!python/...`` tags are refused), and refuses a key
    given twice in one mapping (``models: {a: ..., b: ..., b: ...}`` would silently drop a model)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges: their keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise _DuplicateKey(None, None, f"key {key!r} is given twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def set_dotted(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Set each dotted key of ``values`` (``"sae.k"``) in the nested mapping ``raw``, creating mappings on the
    way; returns ``raw`` (changed in place)."""
    for dotted, value in values.items():
        node = raw
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return raw


def load_params(path: str | Path, overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate a params file; raise ParamsError (one paragraph) on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file {str(path)!r} does not exist (give a YAML file such as params/smoke.yaml)")
    try:
        raw = yaml.load(path.read_text(), Loader=_SafeLoader)
    except _DuplicateKey as e:
        mark = e.problem_mark
        raise ParamsError(f"{path}: {e.problem} (line {mark.line + 1}); remove or rename one of them (every role, "
                          "model and option appears once)") from None
    except yaml.constructor.ConstructorError as e:
        raise ParamsError(f"{path}: refused to load a YAML tag that would construct an object ({e.problem}); "
                          "params files hold plain values only") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ParamsError(f"{path}: YAML syntax error{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    set_dotted(raw, overrides or {})
    _absolute_paths(raw, path.resolve().parent)
    return validate_params(raw, source=str(path))


def validate_params(raw: dict[str, Any], source: str = "params") -> Params:
    try:
        p = Params.model_validate(raw)
    except ValidationError as e:
        # an unknown key first: a misspelled required key (`kk:`) also makes the real one (`k`) missing
        errs = sorted(e.errors(), key=lambda err: (err["type"] != "extra_forbidden", len(err["loc"])))
        first = _describe(errs[0])
        more = f" ({len(errs) - 1} more problem(s) after this one)" if len(errs) > 1 else ""
        raise ParamsError(f"{source}: {first}{more}. Nothing was run or written.") from None
    try:
        _check_model_dependent(p)
        check_claim_overrides(p.claims)
    except ParamsError as e:
        raise ParamsError(f"{source}: {e}. Nothing was run or written.") from None
    return p


def check_claim_overrides(overrides: dict[str, Any]) -> None:
    """The ``claims:`` overrides (rule name -> partial option dict) must name known rules and options
    (:data:`CLAIM_OPTIONS`). Raises ParamsError naming unknown rule names, unknown option keys, or a rule
    given as a non-mapping."""
    unknown = sorted(set(overrides) - set(CLAIM_OPTIONS))
    if unknown:
        raise ParamsError(f"claims: unknown rule(s) {', '.join(unknown)}; known rules: {', '.join(CLAIM_OPTIONS)}")
    for name, options in overrides.items():
        if not isinstance(options, dict):
            raise ParamsError(f"claims.{name}: expected a mapping of options, got {options!r}")
        bad = sorted(set(options) - set(CLAIM_OPTIONS[name]))
        if bad:
            raise ParamsError(f"claims.{name}: unknown option(s) {', '.join(bad)}; "
                              f"known options: {', '.join(CLAIM_OPTIONS[name])}")


def dump_resolved(p: Params) -> str:
    return yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False)
