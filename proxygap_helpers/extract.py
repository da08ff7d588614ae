"""Stage 1: the models, the held-out eval tokens and the activation stores of a grid.

Embedded grids: text -> tokenizer -> tiny GPT-NeoX models (two or more, one per role), trained here and cached
under ``<results>/.cache/models/<hash>`` (keyed by corpus, tokenizer and model config), copied to
``<out>/models/<role>/``; one LM pass per model writes the store of every hook of that model. Hub grids: the
Pythia checkpoints by hub id and revision (or from a local folder, ``path``); the eval rows are the first rows of
the text's validation split, and activations come from the online source (the train split, minus any row equal
to an eval row) at training time, so no store is written.

Both write ``data/eval_tokens.npy`` (the eval rows: the same for every model and SAE) and
``data/eval_tokens.json`` (its hash, shape and where the text came from).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from . import data, models
from .activations import StoreError, remove_store, store_dir, verify_store, write_stores
from .files import read_json, write_json_atomic
from .layout import EVAL_META, EVAL_TOKENS, cache_root, model_dir
from .params import Params, hashed, short_hash

MODEL_META = "proxygap_model.json"


def model_source(p: Params, out_dir: Path, role: str) -> str:
    """What ``models.load_hf`` takes for a role: a local dir (embedded, or a hub model's ``path``) or the hub id."""
    m = p.models[role]
    if m.source == "embedded":
        return str(model_dir(out_dir, role))
    return m.path or m.name


def model_revision(p: Params, role: str) -> str:
    """The hub revision of a role's checkpoint (``main`` for local folders, where it is not used)."""
    return getattr(p.models[role], "revision", "main")


def load_model(p: Params, out_dir: Path, role: str, device: str = "cpu"):
    """A role's HF causal LM (source and revision as the params say; any supported family): what every stage
    runs."""
    return models.load_hf(model_source(p, out_dir, role), model_revision(p, role), device)


def load_tokenizer(p: Params, out_dir: Path, role: str):
    return models.load_tokenizer(model_source(p, out_dir, role), model_revision(p, role))


def model_name(p: Params, role: str) -> str:
    return p.models[role].name


def _tokenizer(p: Params, out_dir: Path, corpus) -> tuple[Path, object]:
    """The embedded tokenizer of this corpus and vocabulary: its (cached) folder and the loaded tokenizer."""
    d = p.data
    key = short_hash({"corpus": corpus.content_hash, "vocab": d.vocab_size, "v": 1})
    tok_dir = cache_root(out_dir) / "tokenizers" / key
    if not (tok_dir / "tokenizer.json").is_file():
        tmp = tok_dir.with_name(key + f".tmp{os.getpid()}")
        data.train_tokenizer(corpus.train_text, d.vocab_size, tmp)
        shutil.rmtree(tok_dir, ignore_errors=True)
        os.replace(tmp, tok_dir)
    return tok_dir, models.load_tokenizer(str(tok_dir))


def _tokenized(p: Params, out_dir: Path, progress: bool):
    """Corpus, tokenizer dir (cached) and the token streams of both splits."""
    corpus = data.load_corpus(p.data.eval_fraction, p.data.max_chars)
    tok_dir, tok = _tokenizer(p, out_dir, corpus)
    return corpus, tok_dir, tok, data.encode(tok, corpus.train_text), data.encode(tok, corpus.eval_text)


def split_tokens(p: Params, out_dir: Path) -> dict[str, int]:
    """Tokens of an embedded grid's ``train`` and ``eval`` splits, ``{"train": n, "eval": n, "eval_files": n}``
    (cached beside the tokenizer, which is trained and cached for the extract stage if it is not yet: one encode of
    the text, ~15 s for the default's)."""
    d = p.data
    corpus = data.load_corpus(d.eval_fraction, d.max_chars)
    tok_dir, tok = _tokenizer(p, out_dir, corpus)
    path = tok_dir / f"split_tokens-{short_hash({'eval_fraction': d.eval_fraction, 'max_chars': d.max_chars})}.json"
    if not path.is_file():
        write_json_atomic(path, {"train": len(data.encode(tok, corpus.train_text)),
                                 "eval": len(data.encode(tok, corpus.eval_text)), "eval_files": len(corpus.eval_files)})
    return read_json(path)


def store_rows(p: Params, train_tokens: int, role: str) -> int:
    """Rows of ``context_size`` tokens ``role``'s activation stores are written from: enough for
    ``Params.store_tokens`` activations after its skipped first positions (``Params.skip_positions``), at most the
    train split's rows (what :func:`run_extract` writes). Every role's rows are a prefix of one seeded order, so
    models that skip nothing read the same rows whatever the other models of the grid skip."""
    per_row = p.data.context_size - p.skip_positions(role)
    return min(train_tokens // p.data.context_size, -(-p.store_tokens // per_row))


def check_eval_sequences(p: Params, out_dir: Path) -> int:
    """An embedded grid's held-out split holds at least ``data.eval_sequences`` rows of ``context_size`` tokens;
    raises ParamsError naming the key and how many there are. Returns that number."""
    from .params import ParamsError

    d = p.data
    counts = split_tokens(p, out_dir)
    n = counts["eval"] // d.context_size
    if n < d.eval_sequences:
        raise ParamsError(f"key `data.eval_sequences` = {d.eval_sequences}: the held-out split ({counts['eval_files']} "
                          f"files at data.eval_fraction = {d.eval_fraction}) holds only {n} sequences of "
                          f"{d.context_size} tokens; ask for at most {n}, or raise data.eval_fraction or data.max_chars")
    return n


def _model_key(p: Params, role: str, corpus, tok_dir: Path) -> str:
    """The cache key of a role's trained model: the model's entry as written (``layer`` too, as before ladders, so
    existing caches stay valid; with ``depths`` every layer is the default 'mid', so a depth sweep reuses the same
    trained model), the text, the tokenizer, torch and the thread count (CPU results depend on it)."""
    d = p.data
    return short_hash({"corpus": corpus.content_hash, "tok": tok_dir.name, "model": hashed(p.models[role]),
                       "ctx": d.context_size, "seed": d.seed, "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "v": 1})


def _train_into_cache(m, vocab: int, train_seqs: np.ndarray, eval_seqs: np.ndarray, seed: int, role: str,
                      key: str, cached: Path, tok_dir: Path, corpus_hash: str, threads: int, progress: bool) -> None:
    """Train one role's model with ``threads`` torch threads and save it, its tokenizer and its meta to ``cached``
    (renamed into place whole). Runs in this process or in a worker of :func:`_train_models`."""
    torch.set_num_threads(threads)
    t0 = time.time()
    lm, log = models.train_lm(m, vocab, train_seqs, seed=seed, desc=f"train {role} LM", progress=progress)
    tmp = cached.with_name(key + f".tmp{os.getpid()}")
    with models.hf_progress(progress):
        lm.save_pretrained(tmp)
    models.load_tokenizer(str(tok_dir)).save_pretrained(tmp)
    meta = {"role": role, "name": m.name, "config": m.model_dump(), "cache_key": key,
            "train_seconds": time.time() - t0, "train_log": log, "train_tokens_available": int(train_seqs.size),
            "threads": threads, "eval_loss": models.lm_eval_loss(lm, eval_seqs), "corpus_hash": corpus_hash}
    write_json_atomic(tmp / MODEL_META, meta)
    shutil.rmtree(cached, ignore_errors=True)
    os.replace(tmp, cached)


def _train_models(p: Params, out_dir: Path, corpus, tok_dir: Path, tok, train_ids, eval_seqs, progress: bool,
                  processes: int = 1, device: str = "cpu"):
    """Train (or reuse from cache) each role's model and copy it to ``<out>/models/<role>``.

    Models missing from the cache train at once in up to ``processes`` worker processes on a CPU (each with the
    params' thread count, so the same weights as one after the other: only the thread count shapes them)."""
    d = p.data
    train_seqs = data.to_sequences(train_ids, d.context_size)
    keys = {role: _model_key(p, role, corpus, tok_dir) for role in p.roles}
    cached = {role: cache_root(out_dir) / "models" / key for role, key in keys.items()}
    todo = [r for r in p.roles if not (cached[r] / MODEL_META).is_file()]
    args = {r: (p.models[r], len(tok), train_seqs, eval_seqs, d.seed, r, keys[r], cached[r], tok_dir,
                corpus.content_hash, torch.get_num_threads()) for r in todo}
    n = min(processes, len(todo)) if device == "cpu" else 1
    if n > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        print(f"training {len(todo)} models, {n} at a time ({torch.get_num_threads()} thread(s) each): "
              f"{', '.join(todo)}", file=sys.stderr, flush=True)
        with ProcessPoolExecutor(n, mp_context=mp.get_context("spawn")) as pool:
            for fut in [pool.submit(_train_into_cache, *args[r], False) for r in todo]:
                fut.result()
    else:
        for r in todo:
            _train_into_cache(*args[r], progress)
    metas = {}
    for role in p.roles:
        dest = model_dir(out_dir, role)
        if not (dest / MODEL_META).is_file() or read_json(dest / MODEL_META)["cache_key"] != keys[role]:
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(cached[role], dest)
        metas[role] = read_json(dest / MODEL_META)
    return metas


def run_extract(p: Params, out_dir: Path, device: str = "cpu", progress: bool = True, processes: int = 1) -> dict:
    """Make everything later stages read; idempotent (a complete, intact store is kept). ``processes``: embedded
    models that are not cached yet train this many at once (on a CPU; the notebook passes ``Params.jobs``)."""
    out_dir = Path(out_dir)
    d = p.data
    t0 = time.time()
    if not p.embedded:
        return _extract_hub(p, out_dir, t0)

    corpus, tok_dir, tok, train_ids, eval_ids = _tokenized(p, out_dir, progress)
    eval_seqs = data.to_sequences(eval_ids, d.context_size, d.eval_sequences)
    if len(eval_seqs) < d.eval_sequences:  # (``run`` refuses this before any work: check_eval_sequences)
        raise ValueError(f"data.eval_sequences = {d.eval_sequences}, but the held-out split holds only "
                         f"{len(eval_seqs)} sequences of {d.context_size} tokens: ask for at most that many")
    _save_eval(out_dir, eval_seqs, {"text": {"corpus_hash": corpus.content_hash,
                                             "eval_files": len(corpus.eval_files)}})
    model_metas = _train_models(p, out_dir, corpus, tok_dir, tok, train_ids, eval_seqs, progress, processes, device)

    all_rows = data.to_sequences(train_ids, d.context_size)
    order = np.random.default_rng(d.seed).permutation(len(all_rows))
    stores = {}
    for role in p.roles:
        store_seqs = all_rows[np.sort(order[:store_rows(p, len(train_ids), role)])]
        stores |= _role_stores(p, out_dir, role, store_seqs, data.token_hash(store_seqs),
                               model_metas[role]["cache_key"], device, progress)
    return {"corpus_hash": corpus.content_hash, "train_files": len(corpus.train_files),
            "eval_files": len(corpus.eval_files), "train_tokens": int(len(train_ids)),
            "eval_tokens_hash": data.token_hash(eval_seqs), "eval_sequences": int(len(eval_seqs)),
            "models": {r: {k: v for k, v in m.items() if k != "train_log"} for r, m in model_metas.items()},
            "stores": {r: {k: s[k] for k in ("shape", "dtype", "content_hash", "hook")} for r, s in stores.items()},
            "seconds": time.time() - t0}


def store_path(p: Params, out_dir: Path, role: str, layer: int) -> Path:
    """The store of one hook: ``activations/<role>/``, or ``activations/<role>/L<layer>/`` with several hooks."""
    return store_dir(out_dir, role, layer if p.multi_hook else None)


def _role_stores(p: Params, out_dir: Path, role: str, seqs: np.ndarray, tokens_hash: str, model_key: str,
                 device: str, progress: bool) -> dict[str, dict]:
    """Every hook's store of one role: intact ones are kept, the others written by one LM pass (all of them in
    one forward per batch). Keyed by role, or ``<role> L<layer>`` with several hooks per model."""
    kept, todo = {}, {}
    skip = p.skip_positions(role)
    for layer in p.layers(role):
        sdir = store_path(p, out_dir, role, layer)
        want = {"tokens_hash": tokens_hash, "hook": p.hook(role, layer), "model_key": model_key,
                "dtype": p.data.store_dtype}
        try:
            kept[layer] = verify_store(sdir, want)
            if kept[layer].get("skip_positions", 0) != skip:
                raise StoreError(f"{sdir}: written skipping the first {kept[layer].get('skip_positions', 0)} "
                                 f"positions, data.skip_positions is {skip} for {role} now")
            continue
        except StoreError as e:
            kept.pop(layer, None)
            if (sdir / "meta.json").exists() or (sdir / "acts.bin").exists():
                print(f"rebuilding activation store: {e}", file=sys.stderr)
            remove_store(sdir)
        todo[layer] = (sdir, {"role": role, "model": model_source(p, out_dir, role), **want,
                              "model_name": model_name(p, role)})
    if todo:
        lm = load_model(p, out_dir, role, device)
        kept |= write_stores(lm, todo, seqs, dtype=p.data.store_dtype, progress=progress, skip=skip)
    return {f"{role} L{layer}" if p.multi_hook else role: kept[layer] for layer in p.layers(role)}


def check_tokenizers(p: Params, out_dir: Path) -> dict:
    """Hub grids: every model reads the same token ids (the eval rows are tokenized once), so all their tokenizers
    have the same vocabulary and end-of-text id; raises ParamsError naming the two models' keys otherwise. Returns
    the tokenizers by role (loaded from the local folders or the Hugging Face cache)."""
    from .params import ParamsError

    first = p.roles[0]
    toks = {r: load_tokenizer(p, out_dir, r) for r in p.roles}
    for r in p.roles[1:]:
        if toks[r].get_vocab() != toks[first].get_vocab() or toks[r].eos_token_id != toks[first].eos_token_id:
            raise ParamsError(f"key `models.{r}`: the tokenizer of {p.models[r].name} differs from the one of "
                              f"{p.models[first].name} (`models.{first}`): all models must read the same token ids "
                              "(the eval rows are tokenized once); pair models of one family and tokenizer")
    return toks


def _extract_hub(p: Params, out_dir: Path, t0: float) -> dict:
    """Hub grids: check the text source and the models' tokenizers (all the same), then write the eval rows (first
    rows of the validation split, tokenized once: the same ids for every model)."""
    d = p.data
    src = data.text_source(d)
    data.check_text_source(src)
    first = p.roles[0]
    toks = check_tokenizers(p, out_dir)
    rows = data.text_rows(src, toks[first], d.context_size, "validation")
    eval_rows = list(islice(rows, d.eval_sequences))
    if len(eval_rows) < d.eval_sequences:
        raise ValueError(f"the validation split holds only {len(eval_rows)} rows of {d.context_size} tokens, but "
                         f"data.eval_sequences = {d.eval_sequences}: lower it or give more validation text")
    eval_seqs = np.stack(eval_rows)
    tokenizer = f"{model_source(p, out_dir, first)}@{model_revision(p, first)}"
    meta = _save_eval(out_dir, eval_seqs, {"text": src.describe(), "split": "validation", "tokenizer": tokenizer,
                                           "bos_prepended": data.bos_to_prepend(toks[first])})
    checkpoints = {r: {"name": p.models[r].name, "source": model_source(p, out_dir, r),
                       "revision": model_revision(p, r), "n_layers": p.models[r].n_layers,
                       "d_model": p.models[r].d_model,
                       **({"hooks": [p.hook(r, L) for L in p.layers(r)]} if p.multi_hook else {"hook": p.hook(r)})}
                   for r in p.roles}
    return {**meta, "checkpoints": checkpoints, "stores": {}, "seconds": time.time() - t0}


def _save_eval(out_dir: Path, eval_seqs: np.ndarray, meta: dict) -> dict:
    """Write the eval rows and, beside them, their hash and where they came from; returns that record."""
    path = Path(out_dir) / EVAL_TOKENS
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("eval_tokens.tmp.npy")
    np.save(tmp, eval_seqs.astype(np.int32))
    os.replace(tmp, path)
    rec = {"eval_tokens_hash": data.token_hash(eval_seqs.astype(np.int32)), "eval_sequences": int(len(eval_seqs)),
           "context_size": int(eval_seqs.shape[1]), **meta}
    write_json_atomic(Path(out_dir) / EVAL_META, rec)
    return rec


def load_eval_tokens(out_dir: Path) -> np.ndarray:
    path = Path(out_dir) / EVAL_TOKENS
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the extract stage (notebooks/01_extract) first")
    return np.load(path, allow_pickle=False)


def training_rows(p: Params, out_dir: Path, tokenizer):
    """The hub path's SAE training text: rows of the train split, every row equal to an eval row
    (``data/eval_tokens.npy``) dropped, so no eval row is ever trained on. The same rows on every call."""
    exclude = frozenset(data.row_hash(r) for r in load_eval_tokens(out_dir))
    return data.text_rows(data.text_source(p.data), tokenizer, p.data.context_size, "train", exclude)


def online_source(p: Params, out_dir: Path, role: str, device: str, layers: list[int] | None = None):
    """Activations streamed from a role's model over :func:`training_rows` (the reference grid): its only hook,
    or (``layers``) several hooks from one forward per batch (chunks ``{layer: Tensor}``).

    The text stream is the same for every seed; each SAE's seed drives its own order within a chunk.
    """
    from .activations import OnlineSource

    lm = load_model(p, out_dir, role, device)
    tok = load_tokenizer(p, out_dir, role)
    return OnlineSource(lm, p.layer(role) if layers is None else list(layers),
                        lambda seed: training_rows(p, out_dir, tok), skip=p.skip_positions(role))


def activation_source(p: Params, out_dir: Path, role: str, layers: list[int], device: str):
    """What a unit of ``role`` trains from, for the hooks ``layers`` of its SAEs: the store (embedded grids) or
    the online source (hub grids), one hook as in a single-hook grid, several as one shared stream (a
    ``StoreSet`` of their stores; one LM forward per batch for all of them online)."""
    from .activations import StoreSet, StoreSource

    layers = sorted(set(layers))
    if not p.multi_hook:
        return StoreSource(store_path(p, out_dir, role, layers[0])) if p.embedded else \
            online_source(p, out_dir, role, device)
    if p.embedded:
        return StoreSet({L: store_path(p, out_dir, role, L) for L in layers})
    return online_source(p, out_dir, role, device, layers)
