"""The embedded text (stdlib sources), the BPE tokenizer and the token streams."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from proxygap_helpers import data
from proxygap_helpers.data import EOT, PAD

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SKIPPED = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


@pytest.fixture(scope="session")
def corpus():
    return data.load_corpus(0.1, max_chars=200_000)


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory, corpus):
    d = tmp_path_factory.mktemp("tok")
    h = data.train_tokenizer(corpus.train_text, 320, d / "a")
    return d, h


@pytest.fixture(scope="session")
def tokenizer(tok_dir):
    from proxygap_helpers.models import load_tokenizer

    return load_tokenizer(str(tok_dir[0] / "a"))


def test_stdlib_files_exclude_site_packages_tests_caches():
    files = data.stdlib_files()
    assert len(files) > 300
    assert files == sorted(files)
    for f in files:
        rel = f.relative_to(STDLIB)
        assert f.suffix == ".py" and f.is_file()
        assert not SKIPPED.intersection(rel.parts[:-1]), rel
    names = {str(f.relative_to(STDLIB)) for f in files}
    assert "os.py" in names and "json/__init__.py" in names


def test_stdlib_files_filter_on_a_fake_tree(tmp_path):
    for rel in ("a.py", "pkg/b.py", "pkg/notes.txt", "site-packages/x.py", "test/t.py", "pkg/tests/t.py",
                "pkg/__pycache__/b.py", "idlelib/idle_test/t.py", "dist-packages/y.py", "testing/c.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\n")
    got = [str(p.relative_to(tmp_path)) for p in data.stdlib_files(tmp_path)]
    assert got == ["a.py", "pkg/b.py", "testing/c.py"]


def test_corpus_split_disjoint_by_file_and_joined_with_eot(corpus):
    assert corpus.train_files and corpus.eval_files
    assert not set(corpus.train_files) & set(corpus.eval_files)
    assert list(corpus.train_files) == sorted(corpus.train_files)
    assert list(corpus.eval_files) == sorted(corpus.eval_files)
    total = len(corpus.train_text) + len(corpus.eval_text)
    assert 200_000 <= total < 200_000 + 2_000_000  # the budget, plus at most one (large) last file
    for files, text in ((corpus.train_files, corpus.train_text), (corpus.eval_files, corpus.eval_text)):
        docs = text.split(EOT)
        assert text.endswith(EOT) and docs[-1] == ""
        assert len(docs) - 1 == len(files)  # one EOT after each file, none inside
        for name, doc in zip(files, docs):
            assert doc == (STDLIB / name).read_text(encoding="utf-8", errors="replace").replace(EOT, "")
    for name in corpus.train_files + corpus.eval_files:
        assert not SKIPPED.intersection(Path(name).parts[:-1])


def test_corpus_deterministic_content_hash(corpus):
    again = data.load_corpus(0.1, max_chars=200_000)
    assert again.content_hash == corpus.content_hash
    assert again.train_files == corpus.train_files and again.eval_text == corpus.eval_text
    other = data.load_corpus(0.1, max_chars=20_000)
    assert other.content_hash != corpus.content_hash
    split = data.load_corpus(0.3, max_chars=200_000)  # same files, another split: the text hash is the same
    assert set(split.train_files + split.eval_files) == set(corpus.train_files + corpus.eval_files)
    assert len(split.eval_files) >= len(corpus.eval_files)


def test_corpus_hash_follows_content(tmp_path):
    for i in range(6):
        (tmp_path / f"m{i}.py").write_text(f"x = {i}\n" * 50)
    a = data.load_corpus(0.3, root=tmp_path)
    (tmp_path / "m3.py").write_text("x = 'changed'\n")
    b = data.load_corpus(0.3, root=tmp_path)
    assert a.content_hash != b.content_hash
    assert a.eval_files and a.train_files  # tiny trees still get both splits


def test_tokenizer_training_deterministic(tok_dir, corpus):
    d, h = tok_dir
    h2 = data.train_tokenizer(corpus.train_text, 320, d / "b")
    assert h == h2
    assert (d / "a" / "tokenizer.json").read_bytes() == (d / "b" / "tokenizer.json").read_bytes()
    h3 = data.train_tokenizer(corpus.train_text, 300, d / "c")
    assert h3 != h


def test_tokenizer_special_ids_and_round_trip(tokenizer):
    assert tokenizer.convert_tokens_to_ids(EOT) == 0
    assert tokenizer.convert_tokens_to_ids(PAD) == 1
    assert len(tokenizer) == 320
    text = 'def f(x):\n    """Docstring: naïve café ✓."""\n\treturn {"a": x ** 2}  # done\n'
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # BPE merged something


def test_encode_appends_eot_after_each_document(tokenizer):
    docs = ["import os\n", "x = 1\n", "print('hi')\n"]
    ids = data.encode(tokenizer, EOT.join(docs) + EOT)
    assert ids.dtype == np.int32
    assert (ids == 0).sum() == 3 and ids[-1] == 0
    pieces = np.split(ids, np.flatnonzero(ids == 0) + 1)[:-1]
    assert [tokenizer.decode(p[:-1].tolist()) for p in pieces] == docs
    # the same without the trailing EOT
    assert np.array_equal(data.encode(tokenizer, EOT.join(docs)), ids)


def test_to_sequences_shapes():
    ids = np.arange(1000, dtype=np.int32)
    s = data.to_sequences(ids, 64)
    assert s.shape == (15, 64) and s.flags.c_contiguous
    assert np.array_equal(s.reshape(-1), ids[:960])  # tail dropped
    assert data.to_sequences(ids, 64, 4).shape == (4, 64)
    assert data.to_sequences(ids, 64, 100).shape == (15, 64)  # capped at what exists
    assert data.to_sequences(ids[:10], 64).shape == (0, 64)


def test_token_hash():
    a = np.arange(100, dtype=np.int32).reshape(10, 10)
    assert data.token_hash(a) == data.token_hash(a.copy())
    b = a.copy()
    b[3, 3] += 1
    assert data.token_hash(a) != data.token_hash(b)
