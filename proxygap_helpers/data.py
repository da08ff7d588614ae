"""Text and tokens.

Embedded default: the ``.py`` sources of one pinned, pure-Python package, SymPy (``CORPUS_PACKAGE`` at
``CORPUS_VERSION``, as pinned in ``requirements.lock``), read from its installed distribution (the files its
wheel's RECORD lists, under ``sympy/``; no test, benchmark or generated-parser folders; never the network).
SymPy ships one ``py3-none-any`` wheel, so these files are the same on every platform and every Python 3.11
patch release (the interpreter's own standard library, the previous source, was not: 16 of the 93 files of
the smoke subset differ between 3.11.2 and 3.11.7). The sources' content hash is pinned (``CORPUS_SHA256``)
and checked at load time: another version or a modified installation stops with :class:`CorpusError`.

Size (sympy 1.14.0): 818 files, 15.85M characters. At eval_fraction 0.1 the eval split holds 96 files,
1.92M characters; with the default 2048-token byte-level BPE that is 4.58M train and 0.63M eval tokens
(4927 eval sequences of 128). ``data.max_chars`` 1.5M (smoke) keeps 90 files, 1.51M characters.

The files are split into train/eval *by file* (disjoint), each split sorted by path and joined with the
end-of-text token. A byte-level BPE tokenizer is trained on the train split. Reference grid: the Pile,
streamed with ``datasets`` and tokenized with the Pythia tokenizer (needs internet).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

EOT = "<|endoftext|>"
PAD = "<|padding|>"

CORPUS_PACKAGE = "sympy"
CORPUS_VERSION = "1.14.0"  # == requirements.lock (tests/test_data.py checks it)
CORPUS_SHA256 = "d7abd038a7f948c9"  # corpus_hash() of every file of package_sources() at CORPUS_VERSION
_SKIP_DIRS = {"__pycache__", "test", "tests", "benchmarks", "_antlr"}


class CorpusError(RuntimeError):
    """The installed corpus package is missing, another version, or differs from the pinned content."""


@dataclass(frozen=True)
class Corpus:
    """The embedded text: files of each split, the joined text, a content hash of the chosen files and where
    they came from (``package==version``)."""

    train_files: tuple[str, ...]
    eval_files: tuple[str, ...]
    train_text: str
    eval_text: str
    content_hash: str
    source: str


def package_sources(package: str = CORPUS_PACKAGE) -> tuple[str, Path, dict[str, Path]]:
    """(installed version, install location, {path such as ``sympy/core/expr.py``: file}) of the package's
    ``.py`` sources as its RECORD lists them, under the package's own folder, without test, benchmark and
    generated-parser folders and caches.

    Raises CorpusError when the package is not installed or lists no files."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise CorpusError(f"the embedded corpus is the Python sources of {package}=={CORPUS_VERSION}, which is not "
                          f"installed: install the pinned environment (make venv, or pip install -c "
                          f"requirements.lock {package}=={CORPUS_VERSION})") from None
    files = {str(f): Path(f.locate()) for f in dist.files or ()
             if f.suffix == ".py" and f.parts[0] == package and not _SKIP_DIRS.intersection(f.parts[1:-1])}
    if not files:
        raise CorpusError(f"the installed {package} {dist.version} lists no .py files (no RECORD): reinstall it "
                          f"with pip install --force-reinstall -c requirements.lock {package}=={CORPUS_VERSION}")
    return dist.version, Path(dist.locate_file("")), files


def read_sources(files: dict[str, Path]) -> dict[str, str]:
    """Text of each file (UTF-8, undecodable bytes replaced, EOT removed), by name."""
    return {n: files[n].read_text(encoding="utf-8", errors="replace").replace(EOT, "") for n in sorted(files)}


def corpus_hash(texts: dict[str, str]) -> str:
    """16 hex digits of sha256 over the files in name order (name, NUL, text, NUL)."""
    h = hashlib.sha256()
    for n in sorted(texts):
        h.update(n.encode() + b"\0" + texts[n].encode() + b"\0")
    return h.hexdigest()[:16]


def pinned_sources() -> tuple[str, dict[str, str]]:
    """(``package==version``, texts) of the embedded corpus, after checking version and content against the pins.

    Raises CorpusError naming the package, the version found and the one expected (requirements.lock)."""
    version, location, files = package_sources(CORPUS_PACKAGE)
    where = f"{CORPUS_PACKAGE} {version} in {location}"
    if version != CORPUS_VERSION:
        raise CorpusError(f"the embedded corpus is the Python sources of {CORPUS_PACKAGE}=={CORPUS_VERSION} (as "
                          f"pinned in requirements.lock), but {where} is installed: install the pinned environment "
                          f"(pip install -c requirements.lock {CORPUS_PACKAGE}=={CORPUS_VERSION})")
    texts = read_sources(files)
    got = corpus_hash(texts)
    if got != CORPUS_SHA256:
        raise CorpusError(f"the Python sources of {where} differ from the pinned corpus of {CORPUS_PACKAGE}=="
                          f"{CORPUS_VERSION} (content hash {got}, expected {CORPUS_SHA256}; {len(texts)} files): the "
                          f"installation was modified or is not the PyPI wheel; reinstall it with pip install "
                          f"--force-reinstall -c requirements.lock {CORPUS_PACKAGE}=={CORPUS_VERSION}")
    return f"{CORPUS_PACKAGE}=={version}", texts


def _unit_hash(name: str) -> float:
    """A stable number in [0, 1) from a relative path: decides the split and the max_chars subset."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:12], 16) / 16**12


def load_corpus(eval_fraction: float, max_chars: int | None = None,
                sources: tuple[str, dict[str, str]] | None = None) -> Corpus:
    """The embedded corpus; a file goes to eval when its path hash < eval_fraction.

    ``sources`` is ``(label, {name: text})``, by default :func:`pinned_sources` (checked against the pins;
    raises CorpusError). ``max_chars`` keeps a deterministic subset (files in path-hash order until the budget
    is used), for smoke runs. Both splits are guaranteed non-empty.
    """
    label, all_texts = sources if sources is not None else pinned_sources()
    names = sorted(all_texts, key=lambda n: (_unit_hash("subset:" + n), n))
    texts: dict[str, str] = {}
    total = 0
    for n in names:
        texts[n] = all_texts[n]
        total += len(all_texts[n])
        if max_chars is not None and total >= max_chars:
            break
    chosen = sorted(texts)
    evals = [n for n in chosen if _unit_hash(n) < eval_fraction]
    if not evals:  # tiny subsets: take the file with the smallest hash
        evals = [min(chosen, key=_unit_hash)]
    trains = [n for n in chosen if n not in set(evals)]
    join = lambda ns: EOT.join(texts[n] for n in ns) + EOT  # noqa: E731
    return Corpus(tuple(trains), tuple(evals), join(trains), join(evals), corpus_hash(texts), label)


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
