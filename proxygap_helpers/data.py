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
end-of-text token. A byte-level BPE tokenizer is trained on the train split.

Reference grid: the Pile (or any corpus with a text field), tokenized with the Pythia tokenizer and packed
into rows of ``context_size`` tokens, documents joined by EOT. Read with ``datasets`` in streaming mode (nothing
is converted or cached) from a hub dataset id (``data.pile_dataset``, needs internet) or from local files
(``data.pile_files``: JSON lines or arrays ``.jsonl`` / ``.json``, plain or ``.gz`` / ``.bz2`` / ``.xz`` /
``.zst``, and ``.parquet``; a folder's splits from its file names). SAEs
train on the ``train`` split; the eval rows are the first rows of the ``validation`` split, and training rows
equal to an eval row are dropped.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .params import DataParams, ParamsError

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


# --------------------------------------------------------------------------- the reference grid's text
# suffix -> datasets builder: what its json builder reads (JSON lines, or a JSON array of records, each plain or
# compressed as fsspec infers from the suffix) and parquet
COMPRESSIONS = ("", ".gz", ".bz2", ".xz", ".zst")
TEXT_FORMATS = {**{f"{base}{c}": "json" for base in (".jsonl", ".json") for c in COMPRESSIONS}, ".parquet": "parquet"}
# files a folder of text may hold that are data in a form not read: refused by name rather than skipped
_DATA_LIKE = re.compile(r"\.(jsonl?|parquet|csv|tsv|txt|arrow|zst|gz|bz2|xz|lz4|zip|tar)(\.|$)", re.IGNORECASE)
SPLITS = ("train", "validation")


@dataclass(frozen=True)
class TextSource:
    """Where the reference grid's text comes from: a hub dataset id (``files`` empty) or local files per split."""

    hub_id: str | None
    files: dict[str, tuple[str, ...]] = field(default_factory=dict)
    text_field: str = "text"

    def describe(self) -> dict:
        """For provenance: the hub id, or each split's files with their sizes and modification times."""
        if self.hub_id:
            return {"hub_dataset": self.hub_id, "text_field": self.text_field}
        return {"text_field": self.text_field, "files": {
            split: [{"path": f, "bytes": os.path.getsize(f), "mtime": int(os.path.getmtime(f))} for f in fs]
            for split, fs in self.files.items()}}


def _format(path: str | Path) -> str | None:
    name = str(path).lower()
    return next((b for suf, b in TEXT_FORMATS.items() if name.endswith(suf)), None)


def _text_files(path: Path, key: str) -> tuple[str, ...]:
    """A supported file, or every supported file under a folder (sorted, hidden ones skipped)."""
    if path.is_file():
        if _format(path) is None:
            raise ParamsError(f"key `{key}` = {str(path)!r}: unsupported file type; give {', '.join(TEXT_FORMATS)} "
                              "files (or a folder of them)")
        return (str(path),)
    visible = [f for f in sorted(path.rglob("*")) if f.is_file()
               and not any(part.startswith(".") for part in f.relative_to(path).parts)]
    if unread := [str(f) for f in visible if not _format(f) and _DATA_LIKE.search(f.name)]:
        raise ParamsError(f"key `{key}` = {str(path)!r}: {unread[0]!r}{f' (and {len(unread) - 1} more)' if len(unread) > 1 else ''} "
                          f"looks like data in a format that is not read; give {', '.join(TEXT_FORMATS)} files, or "
                          "move it out of the folder")
    found = [str(f) for f in visible if _format(f)]
    if not found:
        raise ParamsError(f"key `{key}` = {str(path)!r}: the folder holds no {', '.join(TEXT_FORMATS)} files "
                          "(an empty dataset)")
    return tuple(found)


_SPLIT_WORDS = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                "val": "validation", "dev": "validation", "test": "test", "testing": "test"}


def _split_of(rel: Path) -> str | None:
    """The split a file's name says, else its nearest folder's: names are cut at ``-``, ``.``, ``_``, spaces and
    digits and a word is looked up in the keywords ``datasets`` uses (``train``/``training``, ``validation``/
    ``valid``/``val``/``dev``, ``test``)."""
    for part in reversed(rel.parts):
        for word in re.split(r"[-._ 0-9]+", part.lower()):
            if word in _SPLIT_WORDS:
                return _SPLIT_WORDS[word]
    return None


def _folder_splits(root: Path) -> dict[str, tuple[str, ...]]:
    """The train and validation files of a local folder, by name (:func:`_split_of`): ``train.jsonl`` +
    ``validation.jsonl.zst``, or the Pile's own layout ``train/00.jsonl.zst ...`` + ``val.jsonl.zst``. Test files
    and files that name no split are not read."""
    key = "data.pile_files"
    files = _text_files(root, key)
    splits: dict[str | None, list[str]] = {}
    for f in files:
        splits.setdefault(_split_of(Path(f).relative_to(root)), []).append(f)
    missing = [s for s in SPLITS if not splits.get(s)]
    if missing:
        seen = {s or "no split": len(fs) for s, fs in splits.items()}
        raise ParamsError(
            f"key `{key}` = {str(root)!r}: no {' / '.join(missing)} split among its {', '.join(TEXT_FORMATS)} files "
            f"(files per split: {seen}). Name the files by split, e.g. train.jsonl.zst and validation.jsonl.zst (or "
            "folders train/ and val/), or give `data.pile_files: {train: PATH, validation: PATH}`")
    return {s: tuple(splits[s]) for s in SPLITS}


def text_source(d: DataParams) -> TextSource:
    """The reference grid's text source from params; raises ParamsError (naming the key) for a local copy whose
    files cannot serve: unsupported types, no files, no train or validation split, one builder per split."""
    if d.pile_files is None:
        return TextSource(d.pile_dataset, {}, d.text_field)
    if isinstance(d.pile_files, str):
        root = Path(d.pile_files)
        if root.is_file():
            raise ParamsError(f"key `data.pile_files` = {d.pile_files!r} is one file, but the grid needs a train and a "
                              "validation split: give a folder with files named by split, or "
                              "`{train: FILE_OR_FOLDER, validation: FILE_OR_FOLDER}`")
        files = _folder_splits(root)
    else:
        files = {s: _text_files(Path(d.pile_files[s]), f"data.pile_files.{s}") for s in SPLITS}
    for split, fs in files.items():
        kinds = {_format(f) for f in fs}
        if len(kinds) > 1:
            raise ParamsError(f"key `data.pile_files`: the {split} split mixes JSON lines and parquet files; keep one "
                              "format per split")
    return TextSource(None, files, d.text_field)


def _first_record(path: str) -> dict | None:
    """The first record of a local text file (None when it has none), reading only its start."""
    if _format(path) == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if pf.metadata.num_rows == 0:
            return None
        return {name: None for name in pf.schema_arrow.names}  # the fields; the type is checked below
    with _open_text(path) as f:
        head = f.read(1 << 16)
        if head.lstrip().startswith("["):  # a JSON array of records: its first element
            return _first_array_record(path, head, f)
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    raise ParamsError(f"{path}: line {n} is not JSON ({e}); give JSON lines, one record per line "
                                      "with a text field") from None
                if not isinstance(rec, dict):
                    raise ParamsError(f"{path}: line {n} is a JSON {type(rec).__name__}, not a record with a text "
                                      "field")
                return rec
    return None


def _open_text(path: str):
    """A local text file as text, decompressed by its suffix (gzip, bz2, xz, zstd), as ``datasets`` reads it."""
    import bz2
    import gzip
    import lzma

    low = path.lower()
    if low.endswith(".zst"):
        import zstandard

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True,
                                                                            closefd=True), encoding="utf-8")
    for suffix, module in ((".gz", gzip), (".bz2", bz2), (".xz", lzma)):
        if low.endswith(suffix):
            return module.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _first_array_record(path: str, head: str, f) -> dict | None:
    """The first element of a file holding one JSON array (read until that element is complete)."""
    buf, dec = head.lstrip()[1:], json.JSONDecoder()
    while True:
        body = buf.lstrip()
        if body.startswith("]"):
            return None
        try:
            rec, _ = dec.raw_decode(body)
            break
        except ValueError as e:
            more = f.read(1 << 20)
            if not more:
                raise ParamsError(f"{path}: not a JSON array of records ({e}); give JSON lines or an array of "
                                  "records with a text field") from None
            buf += more
    if not isinstance(rec, dict):
        raise ParamsError(f"{path}: its array holds a JSON {type(rec).__name__}, not records with a text field")
    return rec


def check_text_source(src: TextSource) -> dict[str, int]:
    """Peek into every local file (its first record only) before any work: each split must hold records, and every
    file's first record must have the text field. Raises ParamsError naming the file and the key to change.
    Returns the number of files per split (nothing to check for a hub id, which needs the network)."""
    if src.hub_id:
        return {}
    for split, files in src.files.items():
        firsts = {f: _first_record(f) for f in files}
        if all(r is None for r in firsts.values()):
            raise ParamsError(f"key `data.pile_files`: the {split} split has no records (empty dataset: "
                              f"{', '.join(files[:3])}{' ...' if len(files) > 3 else ''})")
        for f, rec in firsts.items():
            if rec is not None and src.text_field not in rec:
                raise ParamsError(f"{f}: its records have no `{src.text_field}` field (fields: "
                                  f"{', '.join(sorted(rec)) or 'none'}); set `data.text_field` to the field that "
                                  "holds the text")
            if rec is not None and rec[src.text_field] is not None and not isinstance(rec[src.text_field], str):
                raise ParamsError(f"{f}: its `{src.text_field}` field holds {type(rec[src.text_field]).__name__}, "
                                  "not text; set `data.text_field` to the field that holds the text")
    return {s: len(fs) for s, fs in src.files.items()}


def text_docs(src: TextSource, split: str) -> Iterator[str]:
    """The documents of a split, in order, streamed with ``datasets`` (a hub id needs the network)."""
    from datasets import load_dataset

    if src.hub_id:
        ds = load_dataset(src.hub_id, split=split, streaming=True)
    else:
        builder = _format(src.files[split][0])
        extra = {"columns": [src.text_field]} if builder == "parquet" else {}
        ds = load_dataset(builder, data_files={split: list(src.files[split])}, split=split, streaming=True, **extra)
    for doc in ds:
        text = doc[src.text_field]
        if text:
            yield text


def row_hash(row: np.ndarray) -> str:
    """Hash of one row of token ids (as int32): what tells an eval row in the training stream."""
    return hashlib.blake2b(np.ascontiguousarray(row, dtype=np.int32).tobytes(), digest_size=12).hexdigest()


def bos_to_prepend(tokenizer) -> int | None:
    """The BOS id a family's tokenizer puts first in every text it encodes (Llama's, Gemma's), or None where it puts
    none (GPT-2's, Pythia's, Qwen2's, the embedded tokenizer): what :func:`pack_rows` then starts each row with, so
    that every row reads as the model saw text in training."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    with_special = tokenizer("a")["input_ids"]
    return bos if with_special[:1] == [bos] and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos] \
        else None


def pack_rows(docs: Iterable[str], tokenizer, context_size: int, exclude: frozenset[str] = frozenset(),
              batch_docs: int = 64) -> Iterator[np.ndarray]:
    """Token rows ``[context_size]`` (int32) of documents joined by EOT (each document's ids, then EOT), packed
    without padding; a row whose :func:`row_hash` is in ``exclude`` is skipped. Where the tokenizer prepends a BOS
    (:func:`bos_to_prepend`), each row is that BOS and ``context_size - 1`` packed tokens. Documents are tokenized
    ``batch_docs`` at a time (the fast tokenizer's batch path)."""
    eot = tokenizer.eos_token_id
    bos = bos_to_prepend(tokenizer)
    head = [] if bos is None else [bos]
    width = context_size - len(head)
    buf: list[int] = []
    docs = iter(docs)
    while True:
        batch = [d for _, d in zip(range(batch_docs), docs)]
        if not batch:
            return
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            buf.extend(ids)
            buf.append(eot)
        start = 0
        while len(buf) - start >= width:
            row = np.asarray(head + buf[start:start + width], dtype=np.int32)
            start += width
            if not exclude or row_hash(row) not in exclude:
                yield row
        del buf[:start]


def text_rows(src: TextSource, tokenizer, context_size: int, split: str,
              exclude: frozenset[str] = frozenset()) -> Iterator[np.ndarray]:
    """Rows of ``context_size`` tokens of a split (see :func:`pack_rows`); the same rows every time."""
    return pack_rows(text_docs(src, split), tokenizer, context_size, exclude)
