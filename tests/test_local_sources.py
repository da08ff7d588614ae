"""Local copies for the reference grid: text files (``data.pile_files``: jsonl, jsonl.zst, parquet) and checkpoint
folders (``models.<role>.path``). What they give (the same documents and rows whatever the format; splits from file
names as ``datasets`` infers them; rows packed by hand-worked rules) and how bad ones are refused (exit 2 before any
work, naming the key or the file). The whole path with them runs in tests/test_hub_rehearsal.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from proxygap_helpers import data
from proxygap_helpers.params import DataParams, ParamsError, load_params

REPO = Path(__file__).resolve().parents[1]
PYTHIA_RAW = yaml.safe_load((REPO / "params" / "phase2_pythia.yaml").read_text())
DOCS = [{"text": f"document {i}: " + " ".join(f"w{(i * j) % 97}" for j in range(5 + 7 * i)), "meta": {"i": i}}
        for i in range(40)]


def write(path: Path, recs: list[dict], array: bool = False) -> Path:
    """Records in the format the suffix says (.jsonl / .json, plain or .gz, .bz2, .xz, .zst; .parquet): JSON lines,
    or (``array``) one JSON array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(recs), path)
        return path
    text = (json.dumps(recs, indent=1) if array else "".join(json.dumps(r) + "\n" for r in recs)).encode()
    if path.name.endswith(".zst"):
        import zstandard

        text = zstandard.ZstdCompressor().compress(text)
    else:
        import bz2
        import gzip
        import lzma

        text = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}.get(path.suffix, bytes)(text)
    path.write_bytes(text)
    return path


def source(pile_files) -> data.TextSource:
    return data.text_source(DataParams(source="pile", pile_files=pile_files))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from proxygap_helpers.models import load_tokenizer

    d = tmp_path_factory.mktemp("tok")
    data.train_tokenizer(data.EOT.join(r["text"] for r in DOCS) + data.EOT, 300, d)
    return load_tokenizer(str(d))


# --------------------------------------------------------------------------- what local text gives
@pytest.mark.parametrize("suffix", [".jsonl.zst", ".parquet"])
def test_formats_give_the_same_documents_and_rows(tmp_path, tokenizer, suffix):
    ref = source({"train": str(write(tmp_path / "a" / "train.jsonl", DOCS[:30])),
                  "validation": str(write(tmp_path / "a" / "val.jsonl", DOCS[30:]))})
    other = source({"train": str(write(tmp_path / "b" / f"train{suffix}", DOCS[:30])),
                    "validation": str(write(tmp_path / "b" / f"val{suffix}", DOCS[30:]))})
    assert data.check_text_source(other) == {"train": 1, "validation": 1}
    for split, want in (("train", DOCS[:30]), ("validation", DOCS[30:])):
        assert list(data.text_docs(other, split)) == [r["text"] for r in want]
        a = list(data.text_rows(ref, tokenizer, 16, split))
        b = list(data.text_rows(other, tokenizer, 16, split))
        assert len(a) > 5 and np.array_equal(np.stack(a), np.stack(b))


def test_folder_splits_from_names(tmp_path):
    """``train.jsonl`` + ``validation.jsonl.zst``; and the Pile's own layout ``train/00.jsonl.zst ...`` +
    ``val.jsonl.zst`` (+ ``test``, not read), files sorted, other files (README) skipped."""
    write(tmp_path / "a" / "train.jsonl", DOCS[:2])
    write(tmp_path / "a" / "validation.jsonl.zst", DOCS[2:3])
    (tmp_path / "a" / "README.md").write_text("a card")
    src = source(str(tmp_path / "a"))
    assert {s: [Path(f).name for f in fs] for s, fs in src.files.items()} == {
        "train": ["train.jsonl"], "validation": ["validation.jsonl.zst"]}
    for name in ("01.jsonl.zst", "00.jsonl.zst"):
        write(tmp_path / "pile" / "train" / name, DOCS[:2])
    write(tmp_path / "pile" / "val.jsonl.zst", DOCS[2:4])
    write(tmp_path / "pile" / "test.jsonl.zst", DOCS[4:5])
    src = source(str(tmp_path / "pile"))
    assert [Path(f).relative_to(tmp_path / "pile").as_posix() for f in src.files["train"]] == [
        "train/00.jsonl.zst", "train/01.jsonl.zst"]
    assert [Path(f).name for f in src.files["validation"]] == ["val.jsonl.zst"]
    assert [len(list(data.text_docs(src, s))) for s in ("train", "validation")] == [4, 2]
    per_split = source({"train": str(tmp_path / "pile" / "train"),
                        "validation": str(tmp_path / "pile" / "val.jsonl.zst")})
    assert per_split.files == src.files


def test_every_json_form_datasets_reads_is_read_and_other_data_is_refused_by_name(tmp_path):
    """A folder of shards in every form the json builder reads (lines or an array; plain, gzip, bz2, xz, zstd)
    gives all of their documents; a data file in a form that is not read is refused naming it (never skipped)."""
    root = tmp_path / "shards"
    forms = [("train/00.jsonl", False), ("train/01.json", True), ("train/02.json.gz", False),
             ("train/03.jsonl.bz2", False), ("train/04.json.xz", True), ("train/05.jsonl.zst", False),
             ("train/06.json", False), ("train/07.jsonl.gz", False)]
    for i, (name, array) in enumerate(forms):
        write(root / name, DOCS[2 * i:2 * i + 2], array=array)
    write(root / "validation.json.gz", DOCS[30:33], array=True)
    (root / "README.md").write_text("a card")
    src = source(str(root))
    assert data.check_text_source(src) == {"train": 8, "validation": 1}
    assert list(data.text_docs(src, "train")) == [r["text"] for r in DOCS[:16]]
    assert list(data.text_docs(src, "validation")) == [r["text"] for r in DOCS[30:33]]
    write(root / "train" / "08.jsonl.lz4", DOCS[:1])
    expect_refusal(str(root), "data.pile_files", "08.jsonl.lz4", "not read")
    (root / "train" / "08.jsonl.lz4").unlink()
    (root / "train" / "notes.txt").write_text("x")
    expect_refusal(str(root), "notes.txt", "move it out of the folder")
    (root / "train" / "notes.txt").unlink()
    bad = write(root / "train" / "09.json", [1, 2], array=True)
    expect_refusal(str(root), str(bad), "array holds a JSON int")


class CharTokenizer:
    """Ids = character codes; EOT = 0: rows can be worked out by hand. ``bos``: a BOS id it puts first in every
    text when asked for special tokens (as Llama's and Gemma's tokenizers do)."""

    eos_token_id = 0

    def __init__(self, bos: int | None = None):
        self.bos_token_id = bos

    def __call__(self, texts, add_special_tokens=True):
        head = [self.bos_token_id] if add_special_tokens and self.bos_token_id is not None else []
        encode = lambda t: head + [ord(c) for c in t]  # noqa: E731
        return {"input_ids": encode(texts) if isinstance(texts, str) else [encode(t) for t in texts]}


@pytest.mark.parametrize("batch_docs", [1, 2, 64])
def test_pack_rows_by_hand(batch_docs):
    """Documents joined by EOT (after each), cut into rows of ctx, the tail dropped; a row whose hash is excluded is
    skipped and the packing goes on unchanged. Independent of how many documents are tokenized at once."""
    docs = ["ab", "cde", "fghij", "k"]  # a b 0 c d e 0 f g h i j 0 k 0
    rows = [r.tolist() for r in data.pack_rows(docs, CharTokenizer(), 4, batch_docs=batch_docs)]
    assert rows == [[97, 98, 0, 99], [100, 101, 0, 102], [103, 104, 105, 106]]
    drop = frozenset({data.row_hash(np.array([100, 101, 0, 102]))})
    kept = [r.tolist() for r in data.pack_rows(docs, CharTokenizer(), 4, exclude=drop, batch_docs=batch_docs)]
    assert kept == [rows[0], rows[2]]
    assert data.row_hash(np.array(rows[1], dtype=np.int64)) in drop, "the hash is of the int32 row, any input dtype"


def test_rows_start_with_the_bos_where_the_tokenizer_puts_one():
    """A tokenizer that puts a BOS first (Llama, Gemma): each row is that BOS and ctx - 1 packed tokens; one that
    has a BOS but does not put it first (GPT-2, Pythia) gets none."""
    docs = ["ab", "cde", "fghij", "k"]  # a b 0 c d e 0 f g h i j 0 k 0
    assert data.bos_to_prepend(CharTokenizer(bos=1)) == 1 and data.bos_to_prepend(CharTokenizer()) is None
    rows = [r.tolist() for r in data.pack_rows(docs, CharTokenizer(bos=1), 4)]
    assert rows == [[1, 97, 98, 0], [1, 99, 100, 101], [1, 0, 102, 103], [1, 104, 105, 106], [1, 0, 107, 0]]

    class Unused(CharTokenizer):  # has a BOS token, but its encodings do not start with it
        def __call__(self, texts, add_special_tokens=True):
            return super().__call__(texts, add_special_tokens=False)
    assert data.bos_to_prepend(Unused(bos=1)) is None


# --------------------------------------------------------------------------- what is refused, and how
def expect_refusal(pile_files, *must: str, text_field: str = "text") -> None:
    with pytest.raises(ParamsError) as ei:
        data.check_text_source(data.text_source(DataParams(source="pile", pile_files=pile_files,
                                                           text_field=text_field)))
    for s in must:
        assert s in str(ei.value), str(ei.value)


def test_bad_local_text_is_refused(tmp_path):
    good = str(write(tmp_path / "ok" / "val.jsonl", DOCS[:3]))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    expect_refusal(str(empty_dir), "data.pile_files", "empty dataset")
    (tmp_path / "cards").mkdir()
    (tmp_path / "cards" / "train.md").write_text("x")
    expect_refusal(str(tmp_path / "cards"), "data.pile_files", "holds no .jsonl, .jsonl.gz", ".parquet files")
    write(tmp_path / "unnamed" / "00.jsonl", DOCS[:3])
    expect_refusal(str(tmp_path / "unnamed"), "data.pile_files", "no train / validation split", "'no split': 1")
    write(tmp_path / "only_train" / "train.jsonl", DOCS[:3])
    expect_refusal(str(tmp_path / "only_train"), "no validation split", "{train: PATH, validation: PATH}")
    expect_refusal(good, "is one file", "train", "validation")
    bad_type = tmp_path / "train.csv"
    bad_type.write_text("text\nx\n")
    expect_refusal({"train": str(bad_type), "validation": good}, "data.pile_files.train", "unsupported file type",
                   ".jsonl.zst")
    expect_refusal({"train": str(write(tmp_path / "e" / "a.jsonl", [])), "validation": good},
                   "train split has no records", "empty dataset")
    expect_refusal({"train": str(write(tmp_path / "z" / "a.jsonl.zst", [])), "validation": good}, "no records")
    no_field = write(tmp_path / "f" / "a.jsonl", [{"content": "x", "id": 1}])
    expect_refusal({"train": str(no_field), "validation": good}, str(no_field), "no `text` field", "content, id",
                   "data.text_field")
    pq_field = write(tmp_path / "f" / "a.parquet", [{"body": "x"}])
    expect_refusal({"train": str(pq_field), "validation": good}, "no `text` field", "body")
    expect_refusal({"train": good, "validation": good}, "no `body` field", text_field="body")
    not_text = write(tmp_path / "g" / "a.jsonl", [{"text": 5}])
    expect_refusal({"train": str(not_text), "validation": good}, "holds int, not text")
    not_json = tmp_path / "h" / "a.jsonl"
    not_json.parent.mkdir()
    not_json.write_text("\n{not json}\n")
    expect_refusal({"train": str(not_json), "validation": good}, "line 2 is not JSON")
    mixed = tmp_path / "mixed"
    write(mixed / "a.jsonl", DOCS[:1])
    write(mixed / "b.parquet", DOCS[:1])
    expect_refusal({"train": str(mixed), "validation": good}, "mixes JSON lines and parquet")


def _pythia(tmp_path: Path, **data_keys) -> Path:
    raw = json.loads(json.dumps(PYTHIA_RAW))
    raw["data"].update(data_keys)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_params_keys_for_local_text(tmp_path):
    """Missing paths are refused by the params themselves (naming the key); relative paths are taken from the params
    file's folder and stored absolute; pile_files needs both splits and the Pile as source."""
    with pytest.raises(ParamsError, match=r"data\.pile_files\.validation.*no such file or folder"):
        load_params(_pythia(tmp_path, pile_files={"train": str(tmp_path), "validation": str(tmp_path / "nope")}))
    with pytest.raises(ParamsError, match=r"data\.pile_files.*no such file or folder"):
        load_params(_pythia(tmp_path, pile_files="missing/pile"))
    for bad in ({"train": str(tmp_path)}, {"train": str(tmp_path), "val": str(tmp_path)}, ["a", "b"]):
        with pytest.raises(ParamsError, match=r"data\.pile_files.*\{train: PATH, validation: PATH\}"):
            load_params(_pythia(tmp_path, pile_files=bad))
    smoke = yaml.safe_load((REPO / "params" / "smoke.yaml").read_text())
    smoke["data"]["pile_files"] = str(tmp_path)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(smoke))
    with pytest.raises(ParamsError, match=r"data\.pile_files.*data\.source 'pile'"):
        load_params(tmp_path / "s.yaml")
    write(tmp_path / "pile" / "train.jsonl", DOCS[:2])
    p = load_params(_pythia(tmp_path, pile_files="pile"))
    assert p.data.pile_files == str(tmp_path / "pile")


def neox_folder(path: Path, model_type: str = "gpt_neox", weights: bool = True) -> Path:
    """A checkpoint folder as the params check sees it: config.json and (``weights``) a weights file by name."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": model_type, "num_hidden_layers": 4,
                                                  "hidden_size": 48, "num_attention_heads": 6}))
    if weights:
        (path / "model.safetensors").write_bytes(b"")
    return path


def test_params_keys_for_local_checkpoints(tmp_path):
    """``path``: shapes (layers, width, heads; hence the mid layer, d_in, d_sae) from the folder's config.json, any
    name; refused when the folder has no config.json or no weights, its model_type is not a supported family, it is
    given a `family` (an embedded model's key) or a hub revision is asked for too."""
    folder = neox_folder(tmp_path / "ckpt")
    raw = json.loads(json.dumps(PYTHIA_RAW))
    raw["models"]["small"] = {"source": "hub", "name": "my-own-pythia", "path": "ckpt", "layer": "mid"}
    raw["models"]["large"] = {"source": "hub", "name": "EleutherAI/pythia-410m", "path": str(folder), "layer": 3}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    p = load_params(path)
    assert p.models["small"].path == str(folder)
    assert (p.layer("small"), p.d_in("small"), p.d_sae("small"), p.models["small"].n_heads) == (1, 48, 32 * 48, 6)
    for mutate, must in (
            (lambda m: m.update(path="nowhere"), r"models\.small\.path.*config\.json"),
            (lambda m: m.update(path=str(neox_folder(tmp_path / "mamba", "mamba"))),
             r"models\.small\.path.*model_type 'mamba'.*supported model_types: gpt_neox, gpt2, llama, qwen2, gemma2"),
            (lambda m: m.update(path=str(neox_folder(tmp_path / "empty", weights=False))),
             r"models\.small\.path.*no weights"),
            (lambda m: m.update(family="llama"), r"`family`.*key of embedded models"),
            (lambda m: m.update(revision="step1000"), r"models\.small.*revision.*local"),
            (lambda m: m.update(layer=4), r"models\.small\.layer.*\[0, 3\]")):
        bad = json.loads(json.dumps(raw))
        mutate(bad["models"]["small"])
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(ParamsError, match=must):
            load_params(path)


def test_cli_refuses_bad_local_text_before_any_work(tmp_path):
    """``run`` with a text file whose records lack the text field: exit 2, one paragraph naming the file and
    ``data.text_field``, no traceback, the output folder never created."""
    good = write(tmp_path / "val.jsonl", DOCS[:3])
    bad = write(tmp_path / "train.jsonl", [{"body": "x"}])
    params = _pythia(tmp_path, pile_files={"train": str(bad), "validation": str(good)})
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "proxygap_helpers", "run", str(params), "--out", str(out)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    err = res.stderr.strip()
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert str(bad) in err and "data.text_field" in err and "Nothing was run or written" in err, err
    assert not out.exists()


def test_extract_refuses_text_or_tokenizers_that_cannot_serve(tmp_path):
    """The eval rows need enough validation text, and both models one tokenizer (the rows are tokenized once):
    extract says which, before writing anything."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from proxygap_helpers.extract import EVAL_TOKENS, run_extract
    from proxygap_helpers.models import load_tokenizer

    texts = data.EOT.join(r["text"] for r in DOCS) + data.EOT
    folders = {}
    for name, vocab in (("a", 300), ("b", 300), ("c", 320)):
        d = tmp_path / name
        data.train_tokenizer(texts, vocab, d)
        torch.manual_seed(0)
        GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=32)).save_pretrained(d)
        folders[name] = str(d)
    raw = json.loads(json.dumps(PYTHIA_RAW))
    raw["data"].update(pile_files={"train": str(write(tmp_path / "t.jsonl", DOCS[:30])),
                                   "validation": str(write(tmp_path / "v.jsonl", DOCS[30:]))},
                       context_size=16, eval_sequences=4)
    raw["models"] = {r: {"source": "hub", "name": f"tiny-{r}", "path": folders[f], "layer": 1}
                     for r, f in (("small", "a"), ("large", "b"))}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    info = run_extract(load_params(path), tmp_path / "ok", progress=False)
    tok = load_tokenizer(folders["a"])
    want = np.stack(list(data.pack_rows([r["text"] for r in DOCS[30:]], tok, 16))[:4])
    assert np.array_equal(np.load(tmp_path / "ok" / EVAL_TOKENS), want)
    assert info["eval_tokens_hash"] == data.token_hash(want) and info["eval_sequences"] == 4
    n_rows = len(list(data.pack_rows([r["text"] for r in DOCS[30:]], tok, 16)))
    raw["data"]["eval_sequences"] = n_rows + 1
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=rf"only {n_rows} rows of 16 tokens.*data\.eval_sequences = {n_rows + 1}"):
        run_extract(load_params(path), tmp_path / "short", progress=False)
    raw["data"]["eval_sequences"] = 4
    raw["models"]["large"]["path"] = folders["c"]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"models\.large.*tokenizer of tiny-large differs from the one of tiny-small"):
        run_extract(load_params(path), tmp_path / "differ", progress=False)
    assert not (tmp_path / "short" / EVAL_TOKENS).exists() and not (tmp_path / "differ" / EVAL_TOKENS).exists()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "proxygap_helpers", "run", str(path), "--out", str(tmp_path / "cli")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "`models.large`" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "cli").exists(), "refused before any work"
