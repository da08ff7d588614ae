"""The embedded text (the pinned SymPy sources), the BPE tokenizer and the token streams."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from proxygap_helpers import data
from proxygap_helpers.data import EOT, PAD

REPO = Path(__file__).resolve().parents[1]
SKIPPED = {"__pycache__", "test", "tests", "benchmarks", "_antlr"}


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


def test_pinned_version_is_the_lock_and_pyproject_pin():
    lock = dict(line.split("==") for line in (REPO / "requirements.lock").read_text().split() if "==" in line)
    assert lock[data.CORPUS_PACKAGE] == data.CORPUS_VERSION
    assert f'"{data.CORPUS_PACKAGE}=={data.CORPUS_VERSION}"' in (REPO / "pyproject.toml").read_text()


def test_package_sources_are_the_packages_own_python_files():
    version, location, files = data.package_sources()
    assert version == data.CORPUS_VERSION and len(files) > 700
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    for name, path in files.items():
        parts = Path(name).parts
        assert parts[0] == "sympy" and name.endswith(".py") and path.is_file(), name
        assert not SKIPPED.intersection(parts[1:-1]), name
        assert path.resolve() == (location / name).resolve()
        assert stdlib not in path.resolve().parents, path  # not the interpreter's standard library
    assert "sympy/core/expr.py" in files and "sympy/__init__.py" in files
    assert not any("/tests/" in n or "/_antlr/" in n for n in files)


def test_corpus_does_not_come_from_the_interpreter(monkeypatch, tmp_path):
    """Pointing the interpreter's standard-library path elsewhere (an empty folder) changes nothing."""
    pinned = data.pinned_sources()
    real = sysconfig.get_paths

    def elsewhere(*args, **kwargs):
        return {**real(*args, **kwargs), "stdlib": str(tmp_path), "platstdlib": str(tmp_path)}

    monkeypatch.setattr(sysconfig, "get_paths", elsewhere)
    again = data.pinned_sources()
    assert again == pinned and data.corpus_hash(again[1]) == data.CORPUS_SHA256


def _other_python_311s() -> list[str]:
    """Every other Python 3.11 interpreter on this machine (system, pyenv, conda), one per patch release."""
    found = {}
    candidates = [shutil.which("python3.11"), "/usr/bin/python3.11", "/usr/local/bin/python3.11",
                  *glob.glob(os.path.expanduser("~/.pyenv/versions/3.11.*/bin/python3.11")),
                  *glob.glob("/opt/conda/envs/*/bin/python3.11"), *glob.glob("/opt/*/bin/python3.11")]
    for exe in filter(None, candidates):
        try:
            v = subprocess.run([exe, "-c", "import platform; print(platform.python_version())"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
        except OSError:
            continue
        if v.startswith("3.11.") and v != f"3.11.{sys.version_info.micro}":
            found.setdefault(v, exe)
    return sorted(found.values())


def test_corpus_hash_is_the_same_under_every_python_311_patch_release():
    """The corpus (pinned sources and a max_chars subset) under this interpreter and under every other 3.11
    patch release found here (3.11.2 and 3.11.7 on the development machine), all reading this environment's
    installed packages: one hash. Only the running interpreter where no other 3.11 exists."""
    code = ("import json, platform; from proxygap_helpers import data; "
            "label, texts = data.pinned_sources(); c = data.load_corpus(0.1, 1_500_000); "
            "print(json.dumps([platform.python_version(), label, data.corpus_hash(texts), c.content_hash, "
            "c.eval_files]))")
    site = [p for p in sys.path if p.endswith("site-packages")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *site])}
    runs = [json.loads(subprocess.run([exe, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                                      check=True).stdout) for exe in [sys.executable, *_other_python_311s()]]
    versions = [r[0] for r in runs]
    assert len(set(versions)) == len(versions), versions
    assert all(r[1:] == runs[0][1:] for r in runs), runs
    assert runs[0][2] == data.CORPUS_SHA256
    print("corpus hash identical under Python", ", ".join(versions))


def _sources_with(monkeypatch, tmp_path, version=None, change=None):
    """package_sources() as installed, but with another version and/or one file's text changed (a copy)."""
    real_version, location, files = data.package_sources()
    files = dict(files)
    if change:
        copy = tmp_path / "changed.py"
        copy.write_text(files[change].read_text(encoding="utf-8") + "\n# edited\n", encoding="utf-8")
        files[change] = copy
    monkeypatch.setattr(data, "package_sources", lambda package=data.CORPUS_PACKAGE: (version or real_version,
                                                                                       location, files))


def test_a_changed_source_file_is_detected_by_the_pinned_hash(monkeypatch, tmp_path):
    _sources_with(monkeypatch, tmp_path, change="sympy/core/expr.py")
    with pytest.raises(data.CorpusError) as err:
        data.load_corpus(0.1, max_chars=20_000)
    msg = str(err.value)
    assert f"sympy {data.CORPUS_VERSION} in" in msg and data.CORPUS_SHA256 in msg and "reinstall" in msg, msg


def test_another_version_is_refused_naming_found_and_expected(monkeypatch, tmp_path):
    _sources_with(monkeypatch, tmp_path, version="1.13.3")
    with pytest.raises(data.CorpusError) as err:
        data.pinned_sources()
    msg = str(err.value)
    assert re.search(r"sympy==1\.14\.0 \(as pinned in requirements\.lock\), but sympy 1\.13\.3 in \S+ is installed",
                     msg), msg


def test_missing_package_is_refused(monkeypatch):
    monkeypatch.setattr(data, "CORPUS_PACKAGE", "no-such-package-proxygap")
    with pytest.raises(data.CorpusError, match="not installed"):
        data.pinned_sources()


def test_corpus_split_disjoint_by_file_and_joined_with_eot(corpus):
    _, location, files = data.package_sources()
    assert corpus.source == f"sympy=={data.CORPUS_VERSION}"
    assert corpus.train_files and corpus.eval_files
    assert not set(corpus.train_files) & set(corpus.eval_files)
    assert list(corpus.train_files) == sorted(corpus.train_files)
    assert list(corpus.eval_files) == sorted(corpus.eval_files)
    total = len(corpus.train_text) + len(corpus.eval_text)
    assert 200_000 <= total < 200_000 + 500_000  # the budget, plus at most one (large) last file
    for names, text in ((corpus.train_files, corpus.train_text), (corpus.eval_files, corpus.eval_text)):
        docs = text.split(EOT)
        assert text.endswith(EOT) and docs[-1] == ""
        assert len(docs) - 1 == len(names)  # one EOT after each file, none inside
        for name, doc in zip(names, docs):
            assert doc == (location / name).read_text(encoding="utf-8", errors="replace").replace(EOT, "")
    assert set(corpus.train_files + corpus.eval_files) <= set(files)


def test_corpus_deterministic_content_hash(corpus):
    again = data.load_corpus(0.1, max_chars=200_000)
    assert again.content_hash == corpus.content_hash
    assert again.train_files == corpus.train_files and again.eval_text == corpus.eval_text
    other = data.load_corpus(0.1, max_chars=20_000)
    assert other.content_hash != corpus.content_hash
    split = data.load_corpus(0.3, max_chars=200_000)  # same files, another split: the text hash is the same
    assert set(split.train_files + split.eval_files) == set(corpus.train_files + corpus.eval_files)
    assert len(split.eval_files) >= len(corpus.eval_files)
    assert split.content_hash == corpus.content_hash


def test_corpus_hash_follows_content():
    texts = {f"m{i}.py": f"x = {i}\n" * 50 for i in range(6)}
    a = data.load_corpus(0.3, sources=("fake", texts))
    b = data.load_corpus(0.3, sources=("fake", {**texts, "m3.py": "x = 'changed'\n"}))
    assert a.content_hash != b.content_hash
    assert a.eval_files and a.train_files  # tiny sets still get both splits


@pytest.mark.parametrize("params, rows", [("smoke.yaml", 32), ("default.yaml", 512)])
def test_eval_split_holds_the_eval_sequences_of_the_params(params, rows, tmp_path):
    """The held-out files give at least ``rows`` sequences of context_size tokens: data.eval_sequences of
    smoke (32 x 64) and what the default study will use (512 x 128; 64 today). Counted with a BPE of the
    params' vocabulary trained on the eval text itself, which compresses that text at least as well as the
    pipeline's tokenizer (trained on the train split): a lower bound on the pipeline's count."""
    from proxygap_helpers.models import load_tokenizer
    from proxygap_helpers.params import load_params

    d = load_params(REPO / "params" / params).data
    assert d.eval_sequences <= rows
    c = data.load_corpus(d.eval_fraction, d.max_chars)
    data.train_tokenizer(c.eval_text, d.vocab_size, tmp_path)
    n_tokens = len(data.encode(load_tokenizer(str(tmp_path)), c.eval_text))
    assert n_tokens // d.context_size >= rows, (params, len(c.eval_files), len(c.eval_text), n_tokens)


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


def test_run_refuses_a_changed_corpus_before_any_work(monkeypatch, tmp_path, capsys):
    """``proxygap run`` on an embedded grid checks the corpus package first: exit 2, one paragraph, no output."""
    from proxygap_helpers import cli

    _sources_with(monkeypatch, tmp_path, version="1.13.3")
    out = tmp_path / "out"
    assert cli.main(["run", str(REPO / "params" / "smoke.yaml"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "sympy 1.13.3" in err and "sympy==1.14.0" in err and "requirements.lock" in err, err
    assert len(err.splitlines()) == 1 and not out.exists()
