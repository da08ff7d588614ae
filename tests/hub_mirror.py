"""The offline hub of the rehearsals (tests/test_hub_rehearsal.py, tests/test_hub_families.py): a socket guard for
every Python process of a run, a Pile-shaped local corpus, and checkpoints saved where ``from_pretrained(repo,
revision=r)`` finds them with ``HF_HUB_OFFLINE=1``."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

# Loaded by every Python process of the rehearsal (PYTHONPATH): refuses and records any connection or name lookup
# that leaves the machine; records that it was loaded, with the process's command line (kernels: ipykernel_launcher).
GUARD = r'''
import errno, ipaddress, os, socket, sys

_DIR = os.environ["PROXYGAP_NET_LOG"]


def _note(kind, what):
    with open(os.path.join(_DIR, f"{os.getpid()}.log"), "a") as f:
        f.write(f"{kind}\t{what!r}\n")


def _loopback(host):
    if host in (None, "", "localhost", b"localhost"):
        return True
    try:
        return ipaddress.ip_address(str(host.decode() if isinstance(host, bytes) else host).split("%")[0]).is_loopback
    except ValueError:
        return False  # a host name: resolving it would use the network


def _local(address):
    return not isinstance(address, tuple) or _loopback(address[0])  # AF_UNIX paths are local


_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def connect(self, address):
    if not _local(address):
        _note("connect", address)
        raise OSError(errno.ENETUNREACH, f"offline rehearsal: connection to {address!r} refused")
    return _connect(self, address)


def connect_ex(self, address):
    if not _local(address):
        _note("connect_ex", address)
        return errno.ENETUNREACH
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    if not _loopback(host):
        _note("getaddrinfo", host)
        raise socket.gaierror(socket.EAI_NONAME, f"offline rehearsal: lookup of {host!r} refused")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
_note("loaded", " ".join(sys.orig_argv))
'''


def _words(rng: random.Random, n: int) -> list[str]:
    syll = ["ka", "to", "ri", "men", "sul", "an", "de", "vo", "ix", "pre", "lo", "tha", "um", "gre", "zo", "ne"]
    return ["".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(n)]


def _document(rng: random.Random, lexicon: list[str], n_words: int) -> str:
    out, line = [], []
    for i in range(n_words):
        line.append(rng.choice(lexicon))
        if rng.random() < 0.08:
            out.append(" ".join(line).capitalize() + rng.choice([".", "!", "?", ","]))
            line = []
        if rng.random() < 0.01:
            out.append(f"\n\n{rng.randint(0, 9999)} café — {i}\n")
    return " ".join(out + line)


def write_pile(folder: Path, train_bytes: int = 2_500_000, validation_bytes: int = 250_000) -> dict[str, list[dict]]:
    """A Pile-shaped corpus (records ``{"text", "meta": {"pile_set_name"}}``) in train.jsonl and validation.jsonl.
    The first validation document is also the first train document (a duplicate across splits)."""
    rng = random.Random(15)
    lexicon = _words(rng, 3000)
    docs = {}
    for split, size in (("validation", validation_bytes), ("train", train_bytes)):
        recs, total = [], 0
        while total < size:
            text = _document(rng, lexicon, 600 if not recs and split == "validation" else rng.randint(10, 700))
            recs.append({"text": text, "meta": {"pile_set_name": rng.choice(["Pile-CC", "ArXiv", "Github"])}})
            total += len(text)
        docs[split] = recs
    docs["train"].insert(0, docs["validation"][0])
    folder.mkdir(parents=True, exist_ok=True)
    for split, recs in docs.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return docs


def cache_snapshot(hub: Path, repo: str, revisions: tuple[str, ...], model, tokenizer) -> Path:
    """Save a checkpoint where ``from_pretrained(repo, revision=r)`` finds it offline: ``refs/<r>`` holds a commit
    hash, ``snapshots/<hash>/`` the files (the real cache links them to ``blobs/``; plain files resolve the same)."""
    root = hub / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo}@{'+'.join(revisions)}".encode()).hexdigest()
    snap = root / "snapshots" / commit
    model.save_pretrained(snap)
    tokenizer.save_pretrained(snap)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    for rev in revisions:
        (root / "refs" / rev).write_text(commit)
    return snap


def guarded_env(tmp: Path) -> tuple[dict, Path]:
    """An environment whose Python processes load :data:`GUARD` (offline variables set too), and its log folder."""
    guard, netlog = tmp / "guard", tmp / "netlog"
    guard.mkdir()
    netlog.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD)
    env = {**os.environ, **OFFLINE_ENV, "PROXYGAP_THREADS": "1", "PROXYGAP_NET_LOG": str(netlog),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(guard), os.environ.get("PYTHONPATH")]))}
    return env, netlog
