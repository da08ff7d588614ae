"""The reference grid's path (Pythia by hub id and revision, the Pile, the online source), rehearsed offline.

A Hugging Face cache is built in the session's ``$HF_HOME`` (tests/conftest.py) in the layout that
``from_pretrained`` resolves with ``HF_HUB_OFFLINE=1`` (``hub/models--EleutherAI--pythia-70m/refs/<revision>``
holding a commit hash, ``snapshots/<hash>/`` the files). It holds tiny GPT-NeoX checkpoints under the real ids
``EleutherAI/pythia-70m`` and ``EleutherAI/pythia-410m`` with Pythia's architecture (parallel residual, rotary on
a quarter of each head, untied embeddings, GELU MLP 4x, Pythia's 6 and 24 layers) but widths of 32 and 64, and a
GPT-NeoX fast tokenizer (byte-level BPE, ``<|endoftext|>`` id 0, ``<|padding|>`` id 1) with a 512-token vocabulary.
``pythia-70m`` has two revisions: ``step1000`` (the one the grid asks for, width 32) and ``main`` (width 64, a
384-token vocabulary): a load that ignored the revision would get the wrong shapes and fail. "The Pile" is a few MB
of generated JSON lines, split into train and validation files; the first validation document is planted at the
start of the train file too (the real Pile has such duplicates), so the eval rows' exclusion from training is tested.

``python -m proxygap_helpers run`` then goes through extract -> train (online source) -> evaluate -> aggregate ->
report on a phase2_pythia.yaml-derived grid (tiny budgets, ctx 64), in a subprocess whose Python processes (the
runner and every notebook kernel) carry a ``sitecustomize`` that refuses and records any socket connection or name
lookup beyond the loopback. The other tests read its results or load the same checkpoints in this process (under
an in-process socket guard).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from hub_mirror import OFFLINE_ENV, cache_snapshot, guarded_env, write_pile

from proxygap_helpers.params import set_dotted

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SMALL, LARGE = "EleutherAI/pythia-70m", "EleutherAI/pythia-410m"
STEP = "step1000"
CTX, EVAL_SEQ, BUFFER, BATCH, NORM_BATCHES = 64, 8, 4096, 256, 2
REHEARSAL = {  # phase2_pythia.yaml, shrunk: same models, hooks, text source kind and report; tiny budgets
    "name": "rehearsal-phase2",
    "device": "cpu",
    "data.context_size": CTX,
    "data.eval_sequences": EVAL_SEQ,
    "models.small.revision": STEP,
    "sae.k": [8, 32],
    "sae.tokens": [4096, 8192],
    "sae.seeds": [0, 1],
    "sae.batch_size": BATCH,
    "sae.buffer_tokens": BUFFER,
    "sae.dead_tokens_window": 2048,
    "sae.norm_estimate_batches": NORM_BATCHES,
    "sae.log_every": 8,
    "evaluation.batch_sequences": EVAL_SEQ,
    "stats.bootstrap": 50,
    "executor.kind": "local",
    "executor.jobs": 2,
}


# ------------------------------------------------------------------------------------------ the local mirror
def neox_tokenizer(texts: list[str], vocab_size: int):
    """A GPT-NeoX fast tokenizer (``GPTNeoXTokenizer``: NFC, byte-level BPE, Pythia's special tokens) trained here."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GPTNeoXTokenizer

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    return GPTNeoXTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])


def pythia_like(d_model: int, n_layers: int, n_heads: int, vocab_size: int, seed: int):
    """A randomly initialised GPT-NeoX with Pythia's architecture and config keys, shrunk in width."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
        intermediate_size=4 * d_model, hidden_act="gelu", max_position_embeddings=2048, use_parallel_residual=True,
        tie_word_embeddings=False, layer_norm_eps=1e-5, initializer_range=0.02,
        rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.25, "rope_type": "default"},
        bos_token_id=0, eos_token_id=0, architectures=["GPTNeoXForCausalLM"])
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> dict:
    """The hub cache in $HF_HOME and the local Pile folder. The cache entries are removed after this module: other
    tests read the real Pythia shapes (params take a cached checkpoint's config.json over the table)."""
    import huggingface_hub.constants as hf

    hub = Path(os.environ["HF_HOME"]) / "hub"
    assert Path(hf.HF_HUB_CACHE) == hub, "huggingface_hub was imported before tests/conftest.py set HF_HOME"
    entries = [hub / f"models--{repo.replace('/', '--')}" for repo in (SMALL, LARGE)]
    for entry in entries:
        shutil.rmtree(entry, ignore_errors=True)
    root = tmp_path_factory.mktemp("mirror")
    docs = write_pile(root / "pile")
    sample = [d["text"] for d in docs["train"][:300]]
    tok = neox_tokenizer(sample, 512)
    old_tok = neox_tokenizer(sample, 384)
    snaps = {
        (SMALL, STEP): cache_snapshot(hub, SMALL, (STEP,), pythia_like(32, 6, 4, len(tok), seed=1), tok),
        (SMALL, "main"): cache_snapshot(hub, SMALL, ("main",), pythia_like(64, 6, 4, len(old_tok), seed=2), old_tok),
        (LARGE, "main"): cache_snapshot(hub, LARGE, ("main",), pythia_like(64, 24, 8, len(tok), seed=3), tok),
    }
    yield {"root": root, "pile": root / "pile", "docs": docs, "snapshots": snaps}
    for entry in entries:
        shutil.rmtree(entry, ignore_errors=True)


def write_rehearsal_params(path: Path, pile) -> Path:
    raw = yaml.safe_load((REPO / "params" / "phase2_pythia.yaml").read_text())
    set_dotted(raw, {**REHEARSAL, "data.pile_files": pile})
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_guard_refuses_and_records(tmp_path):
    """The guard of the rehearsal's processes: a lookup of a host name and a connection beyond the loopback are
    refused (before anything is sent) and recorded; the loopback stays usable."""
    env, netlog = guarded_env(tmp_path)
    probe = (
        "import socket, sys\n"
        "assert socket.getaddrinfo.__module__ == 'sitecustomize', 'guard not loaded'\n"  # else nothing is tried
        "for call in (lambda: socket.getaddrinfo('example.invalid', 80),\n"
        "             lambda: socket.socket().connect(('192.0.2.1', 9))):\n"
        "    try:\n"
        "        call()\n"
        "        sys.exit('not refused')\n"
        "    except OSError:\n"
        "        pass\n"
        "srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen()\n"
        "socket.create_connection(srv.getsockname(), timeout=5).close()\n")
    res = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = [line for f in netlog.glob("*.log") for line in f.read_text().splitlines()]
    assert [line.split("\t")[0] for line in lines] == ["loaded", "getaddrinfo", "connect"], lines
    assert "example.invalid" in lines[1] and "192.0.2.1" in lines[2]


@pytest.fixture(scope="module")
def rehearsal(mirror, tmp_path_factory) -> dict:
    """``python -m proxygap_helpers run`` on the rehearsal grid, offline, every Python process guarded."""
    tmp = tmp_path_factory.mktemp("rehearsal")
    params = write_rehearsal_params(tmp / "rehearsal.yaml", str(mirror["pile"]))
    env, netlog = guarded_env(tmp)
    out = tmp / "out"
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "proxygap_helpers", "run", str(params), "--out", str(out)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    seconds = time.time() - t0
    print(f"rehearsal run took {seconds:.1f}s")
    return {"params": params, "out": out, "res": res, "seconds": seconds, "netlog": netlog}


def _explain(res) -> str:
    return f"exit {res.returncode}\n--- stdout ---\n{res.stdout[-5000:]}\n--- stderr ---\n{res.stderr[-5000:]}"


def _metrics(out: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted((out / "runs").glob("*/metrics.json"))]


def _train_metas(out: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted((out / "saes").glob("*/train_meta.json"))]


@pytest.fixture
def no_network(monkeypatch):
    """This process, offline: a socket connection or name lookup beyond the loopback raises and is recorded."""
    import socket

    attempts: list = []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def is_local(host) -> bool:
        import ipaddress

        if host in (None, "", "localhost"):
            return True
        try:
            return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
        except ValueError:
            return False

    def guarded_connect(self, address):
        if isinstance(address, tuple) and not is_local(address[0]):
            attempts.append(address)
            raise OSError(f"no network in this test: {address!r}")
        return connect(self, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if not is_local(host):
            attempts.append(host)
            raise socket.gaierror(f"no network in this test: {host!r}")
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    yield attempts
    assert not attempts, f"network access attempted: {attempts}"


# ------------------------------------------------------------------------------------------ the run itself
def test_rehearsal_runs_the_reference_path_offline(rehearsal):
    """Every unit done, exit 0; no Python process of the run (runner, every notebook kernel) tried the network;
    the report shows the study's table beside this grid's."""
    from proxygap_helpers import report, stats
    from proxygap_helpers.grid import is_complete, units
    from proxygap_helpers.params import load_params

    res, out = rehearsal["res"], rehearsal["out"]
    assert res.returncode == 0, _explain(res)
    p = load_params(rehearsal["params"])
    us = units(p, out, out / "params.resolved.yaml")
    shards = p.executor.shards  # phase2_pythia's: each role's SAEs in shards, each its own set and LM stream
    assert [u.stage for u in us] == ["extract"] + ["sae"] * 2 * shards + ["aggregate", "report"]
    assert all(is_complete(p, out, u) for u in us)

    logs = {f.stem: f.read_text().splitlines() for f in rehearsal["netlog"].glob("*.log")}
    attempts = [line for lines in logs.values() for line in lines if not line.startswith("loaded\t")]
    assert not attempts, f"network access attempted: {attempts}"
    kernels = [pid for pid, lines in logs.items() if any("ipykernel_launcher" in line for line in lines)]
    assert len(kernels) >= len(us), f"the guard must be active in every unit's kernel: {logs}"

    html = (out / "reports" / "report.html").read_text()
    assert p.report.title in html and "Side by side with the study" in html
    study = stats.reference_table()
    for row in study.itertuples():  # the study's cells ...
        assert stats.format_mean_ci(row.d_ce_rec_mean, row.d_ce_rec_lo, row.d_ce_rec_hi) in html, row
    table = pd.read_csv(out / "aggregate" / "phase2_table.csv")
    assert len(table) == 4 and (table["n"] == 2).all(), table  # ... and this grid's: 2 k x 2 budgets, 2 seeds each
    shown = report.table_frame(table)
    (column,) = [c for c in shown.columns if c.startswith("ΔCE_rec")]
    for cell in shown[column]:
        assert cell in html, cell


def test_rehearsal_used_the_checkpoints_the_params_name(rehearsal):
    """Shapes, hooks and revision: pythia-70m at step1000 (width 32; main is 64 wide), pythia-410m at main
    (width 64, 24 layers), hooks blocks.3 and blocks.12; every metric finite."""
    assert rehearsal["res"].returncode == 0, _explain(rehearsal["res"])
    out = rehearsal["out"]
    recs = _metrics(out)
    assert len(recs) == 16
    want = {"small": ("EleutherAI/pythia-70m", "blocks.3.hook_resid_post", 32), "large":
            ("EleutherAI/pythia-410m", "blocks.12.hook_resid_post", 64)}
    for r in recs:
        assert (r["model_name"], r["hook"], r["d_in"]) == want[r["model_role"]], r["sae_id"]
        assert r["d_sae"] == 32 * r["d_in"] and r["l0"] == pytest.approx(r["k"])
        for key in ("ce_clean", "ce_sae", "ce_rec", "r2", "cosine", "kl", "swd"):
            assert np.isfinite(r[key]), (r["sae_id"], key)
    meta = json.loads((out / "data" / "eval_tokens.json").read_text())
    assert meta["tokenizer"] == f"{SMALL}@{STEP}" and meta["split"] == "validation"
    assert meta["text"]["text_field"] == "text" and set(meta["text"]["files"]) == {"train", "validation"}


def test_rehearsal_one_lm_pass_per_sae_set(rehearsal):
    """Each SAE set (a role's shard: one unit) trained from one shared LM stream: the LM tokens recorded at each
    save cover that SAE's own batches (norm estimate + steps), and the set's stream is one pass over its largest
    budget (plus at most a chunk and an LM batch), well below the sum over its SAEs (one pass per SAE)."""
    from proxygap_helpers.grid import shards
    from proxygap_helpers.params import load_params

    assert rehearsal["res"].returncode == 0, _explain(rehearsal["res"])
    p = load_params(rehearsal["params"])
    metas = {m["sae_id"]: m for m in _train_metas(rehearsal["out"])}
    assert len(metas) == 16
    lm_batch = 32 * CTX  # OnlineSource's batch_sequences rows per forward
    sets = [s for role in ("small", "large") for s in shards(p, role, p.executor.shards)]
    assert len(sets) == 2 * p.executor.shards and sum(len(s) for s in sets) == 16
    for specs in sets:
        ms = [metas[s.sae_id] for s in specs]
        assert all(m["trainer"] == "fast" and m["set_saes"] == len(ms) for m in ms)
        need = [(m["steps"] + NORM_BATCHES) * BATCH for m in ms]
        seen = [m["stream_lm_tokens"] for m in ms]
        assert all(s >= n for s, n in zip(seen, need)), (seen, need)
        total = max(seen)
        assert total <= max(need) + BUFFER + lm_batch, (total, need)
        assert total < sum(need) / 2, (total, sum(need))


def test_rehearsal_eval_hygiene(rehearsal, no_network):
    """The eval rows are the first rows of the validation split, recorded by hash, the same for both models and
    every SAE; no eval row is in the rows the SAEs were trained on, although the text holds one (the duplicated
    document), which the training stream dropped."""
    from proxygap_helpers import data, extract
    from proxygap_helpers.params import load_params

    assert rehearsal["res"].returncode == 0, _explain(rehearsal["res"])
    out = rehearsal["out"]
    p = load_params(out / "params.resolved.yaml")
    eval_rows = extract.load_eval_tokens(out)
    assert eval_rows.shape == (EVAL_SEQ, CTX)
    h = data.token_hash(eval_rows)
    assert json.loads((out / "data" / "eval_tokens.json").read_text())["eval_tokens_hash"] == h
    recs = _metrics(out)
    assert {r["provenance"]["eval_tokens_hash"] for r in recs} == {h}
    assert {r["eval_tokens"] for r in recs} == {EVAL_SEQ * CTX}

    tok = {r: extract.load_tokenizer(p, out, r) for r in ("small", "large")}
    assert tok["small"].get_vocab() == tok["large"].get_vocab()
    src = data.text_source(p.data)
    first = np.stack(list(islice(data.text_rows(src, tok["small"], CTX, "validation"), EVAL_SEQ)))
    assert np.array_equal(first, eval_rows)

    eval_hashes = {data.row_hash(r) for r in eval_rows}
    consumed = max(m["stream_lm_tokens"] for m in _train_metas(out)) // CTX
    for role in ("small", "large"):
        trained = list(islice(extract.training_rows(p, out, tok[role]), consumed))
        assert len(trained) == consumed
        assert not eval_hashes & {data.row_hash(r) for r in trained}, role
    raw = list(islice(data.text_rows(src, tok["small"], CTX, "train"), consumed + EVAL_SEQ))
    planted = [data.row_hash(r) in eval_hashes for r in raw]
    assert planted[0], "the duplicated document makes the train split's first row an eval row"
    kept = [r for r, dup in zip(raw, planted) if not dup][:consumed]
    assert np.array_equal(np.stack(kept), np.stack(trained)), "the training stream = the train rows minus eval rows"


# ------------------------------------------------------------------------------------------ loaders, local folders
def test_revision_is_honoured_by_every_loader(mirror, no_network):
    """Model, tokenizer and HookedTransformer load the revision asked for; params take the shapes from the cached
    checkpoint's config.json, and from the Pythia table when the cache does not hold that revision."""
    from proxygap_helpers import models
    from proxygap_helpers.params import HubModel

    step, main = models.load_hf(SMALL, STEP), models.load_hf(SMALL)
    assert (step.config.hidden_size, main.config.hidden_size) == (32, 64)
    assert (len(models.load_tokenizer(SMALL, STEP)), len(models.load_tokenizer(SMALL))) == (512, 384)
    hooked = models.load_hooked(SMALL, STEP, hf_model=step)
    alone = models.load_hooked(SMALL, STEP)  # loads the weights itself, at the revision
    assert (hooked.cfg.d_model, hooked.cfg.n_layers, alone.cfg.d_model) == (32, 6, 32)
    assert models.load_hooked(SMALL).cfg.d_model == 64
    x = torch.randint(0, 512, (2, 16))
    _, cache = alone.run_with_cache(x, names_filter="blocks.3.hook_resid_post")
    torch.testing.assert_close(cache["blocks.3.hook_resid_post"], models.resid_post(step, x, 3), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(alone(x), step(input_ids=x).logits, atol=1e-4, rtol=1e-4)
    assert len(alone.tokenizer) == 512

    shapes = lambda m: (m.n_layers, m.d_model, m.n_heads)  # noqa: E731
    assert shapes(HubModel(source="hub", name=SMALL, revision=STEP)) == (6, 32, 4)  # from the cached config.json
    assert shapes(HubModel(source="hub", name=SMALL)) == (6, 64, 4)
    assert shapes(HubModel(source="hub", name=SMALL, revision="step2000")) == (6, 512, 8)  # not cached: the table
    assert shapes(HubModel(source="hub", name=LARGE)) == (24, 64, 8)


def test_local_folders_run_the_hub_path(mirror, rehearsal, tmp_path, no_network):
    """A params file naming local checkpoint folders (``path``) and local text files per split (parquet for train,
    jsonl.zst for validation) runs the same path offline: shapes from the folders' config.json, the same eval rows
    as the hub-id run, and the same activation stream."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    from proxygap_helpers import extract
    from proxygap_helpers.params import load_params

    assert rehearsal["res"].returncode == 0, _explain(rehearsal["res"])
    models_dir = tmp_path / "models"
    shutil.copytree(mirror["snapshots"][(SMALL, STEP)], models_dir / "pythia-70m-step1000")
    shutil.copytree(mirror["snapshots"][(LARGE, "main")], models_dir / "pythia-410m")
    text = tmp_path / "text"
    text.mkdir()
    pq.write_table(pa.Table.from_pylist(mirror["docs"]["train"]), text / "pile-train.parquet")
    (text / "pile-val.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        (mirror["pile"] / "validation.jsonl").read_bytes()))
    raw = yaml.safe_load(rehearsal["params"].read_text())
    raw["name"] = "rehearsal-local"
    raw["models"]["small"] = {"source": "hub", "name": SMALL, "path": "models/pythia-70m-step1000", "layer": 3}
    raw["models"]["large"] = {"source": "hub", "name": LARGE, "path": "models/pythia-410m", "layer": 12}
    raw["data"]["pile_files"] = {"train": "text/pile-train.parquet", "validation": "text/pile-val.jsonl.zst"}
    params = tmp_path / "local.yaml"
    params.write_text(yaml.safe_dump(raw))
    p = load_params(params)  # relative paths: from the params file's folder
    assert p.models["small"].path == str(models_dir / "pythia-70m-step1000")
    assert (p.d_in("small"), p.d_in("large"), p.models["large"].n_layers) == (32, 64, 24)

    out = tmp_path / "out"
    info = extract.run_extract(p, out, progress=False)
    assert info["checkpoints"]["small"]["source"] == str(models_dir / "pythia-70m-step1000")
    assert np.array_equal(extract.load_eval_tokens(out), extract.load_eval_tokens(rehearsal["out"]))
    hub_p = load_params(rehearsal["out"] / "params.resolved.yaml")
    for role in ("small", "large"):
        local_chunk = next(extract.online_source(p, out, role, "cpu").chunks(BUFFER))[1]
        hub_chunk = next(extract.online_source(hub_p, rehearsal["out"], role, "cpu").chunks(BUFFER))[1]
        assert local_chunk.shape == (BUFFER, p.d_in(role))
        assert torch.equal(local_chunk, hub_chunk), role
