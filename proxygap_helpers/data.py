"""Text and tokens.

Embedded default: the running interpreter's standard-library ``.py`` sources (no site-packages, no test
folders, no caches), split into train/eval *by file* (disjoint), each split sorted by path and joined with
the end-of-text token. A byte-level BPE tokenizer is trained on the train split. Reference grid: the
Pile, streamed with ``datasets`` and tokenized with the Pythia tokenizer (needs internet).
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

EOT = "<|endoftext|>"
PAD = "<|padding|>"
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


@dataclass(frozen=True)
class Corpus:
    """The embedded text: files of each split, the joined text and a content hash."""

    train_files: tuple[str, ...]
    eval_files: tuple[str, ...]
    train_text: str
    eval_text: str
    content_hash: str
    stdlib: str


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Sorted ``.py`` files of the standard library, without site-packages, tests and caches."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]) and p.is_file())


def _unit_hash(name: str) -> float:
    """A stable number in [0, 1) from a relative path: decides the split and the max_chars subset."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:12], 16) / 16**12


def load_corpus(eval_fraction: float, max_chars: int | None = None, root: Path | None = None) -> Corpus:
    """Read the stdlib sources; a file goes to eval when its path hash < eval_fraction.

    ``max_chars`` keeps a deterministic subset (files in path-hash order until the budget is used), for
    smoke runs. Both splits are guaranteed non-empty.
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = {str(p.relative_to(root)): p for p in stdlib_files(root)}
    names = sorted(files, key=lambda n: (_unit_hash("subset:" + n), n))
    texts: dict[str, str] = {}
    total = 0
    for n in names:
        t = files[n].read_text(encoding="utf-8", errors="replace").replace(EOT, "")
        texts[n] = t
        total += len(t)
        if max_chars is not None and total >= max_chars:
            break
    chosen = sorted(texts)
    evals = [n for n in chosen if _unit_hash(n) < eval_fraction]
    if not evals:  # tiny subsets: take the file with the smallest hash
        evals = [min(chosen, key=_unit_hash)]
    trains = [n for n in chosen if n not in set(evals)]
    join = lambda ns: EOT.join(texts[n] for n in ns) + EOT  # noqa: E731
    train_text, eval_text = join(trains), join(evals)
    h = hashlib.sha256()
    for n in chosen:
        h.update(n.encode() + b"\0" + texts[n].encode() + b"\0")
    return Corpus(tuple(trains), tuple(evals), train_text, eval_text, h.hexdigest()[:16], str(root))


def train_tokenizer(text: str, vocab_size: int, out_dir: Path) -> str:
    """Train a byte-level BPE (GPT-NeoX style, EOT id 0, PAD id 1) and save it in HF format.

    Returns the hash of the saved ``tokenizer.json`` (training is deterministic for the same text).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.split(EOT), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT,
                                   pad_token=PAD, model_max_length=1 << 30)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return hashlib.sha256((out_dir / "tokenizer.json").read_bytes()).hexdigest()[:16]


def encode(tokenizer, text: str) -> np.ndarray:
    """Token ids of a text that is joined by EOT: each document encoded, EOT id appended after each."""
    eot = tokenizer.convert_tokens_to_ids(EOT)
    docs = text.split(EOT)[:-1] if text.endswith(EOT) else text.split(EOT)
    enc = tokenizer(docs, add_special_tokens=False)["input_ids"]
    out = np.fromiter((t for ids in enc for t in (*ids, eot)), dtype=np.int32)
    return out


def to_sequences(ids: np.ndarray, context_size: int, n: int | None = None) -> np.ndarray:
    """Cut a token stream into non-overlapping rows [n_seq, context_size] (the tail is dropped)."""
    n_avail = len(ids) // context_size
    n = n_avail if n is None else min(n, n_avail)
    return np.ascontiguousarray(ids[: n * context_size].reshape(n, context_size))


def token_hash(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()[:16]


def pile_sequences(dataset: str, tokenizer, context_size: int, split: str = "train",
                   skip_docs: int = 0) -> Iterator[np.ndarray]:
    """Stream the Pile (needs internet) as rows of ``context_size`` tokens, documents joined by EOT."""
    from datasets import load_dataset

    ds = load_dataset(dataset, split=split, streaming=True).skip(skip_docs)
    eot = tokenizer.eos_token_id
    buf: list[int] = []
    for doc in ds:
        buf.extend(tokenizer(doc["text"], add_special_tokens=False)["input_ids"])
        buf.append(eot)
        while len(buf) >= context_size:
            yield np.asarray(buf[:context_size], dtype=np.int32)
            del buf[:context_size]
