"""Activation stores (write, verify, rebuild) and the two activation sources (store, online)."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from proxygap_helpers import models
from proxygap_helpers.activations import (ACTS, META, OnlineSource, StoreError, StoreSource, open_store, store_dir,
                                          verify_store, write_store)
from proxygap_helpers.extract import load_eval_tokens, run_extract
from proxygap_helpers.files import write_json_atomic
from proxygap_helpers.params import TWO_ROLES as ROLES  # the smoke grid's two models

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_lm(smoke_out):
    return models.load_hf(str(smoke_out / "models" / "small"))


# --------------------------------------------------------------------------- the smoke stores
def test_store_meta_shape_dtype(smoke_out, smoke_params, smoke_info):
    p = smoke_params
    ctx = p.data.context_size
    for role in ROLES:
        meta = verify_store(store_dir(smoke_out, role))
        n_seq = -(-p.store_tokens // ctx)
        assert meta["shape"] == [n_seq * ctx, p.d_in(role)]
        assert meta["shape"][0] >= p.store_tokens >= max(p.sae.tokens)
        assert meta["dtype"] == p.data.store_dtype == "float32"
        assert meta["hook"] == p.hook(role) and meta["layer"] == p.layer(role)
        assert meta["context_size"] == ctx and meta["n_sequences"] == n_seq
        assert meta["bytes"] == (store_dir(smoke_out, role) / ACTS).stat().st_size == n_seq * ctx * p.d_in(role) * 4
        assert meta["model"].endswith(f"models/{role}") and meta["model_name"] == p.models[role].name
        assert meta["content_hash"] == smoke_info["stores"][role]["content_hash"]
        arr = open_store(store_dir(smoke_out, role), meta)
        assert arr.dtype == np.float32 and arr.shape == tuple(meta["shape"])
        assert np.isfinite(arr).all() and np.abs(arr).max() > 0
    # both roles see the same token rows
    m = [verify_store(store_dir(smoke_out, r), full_hash=False) for r in ROLES]
    assert m[0]["tokens_hash"] == m[1]["tokens_hash"]


@pytest.mark.parametrize("role", ROLES)
def test_store_rows_equal_resid_post(smoke_out, smoke_params, tmp_path, role):
    """write_store row (i * ctx + t) is resid_post of sequence i at position t."""
    lm = models.load_hf(str(smoke_out / "models" / role))
    seqs = load_eval_tokens(smoke_out)[:10]
    layer = smoke_params.layer(role)
    meta = write_store(lm, layer, seqs, tmp_path / "s", meta={"role": role}, batch_sequences=4, progress=False)
    arr = open_store(tmp_path / "s", meta)
    want = models.resid_post(lm, torch.from_numpy(seqs.astype(np.int64)), layer)
    assert arr.shape == (10 * seqs.shape[1], smoke_params.d_in(role))
    np.testing.assert_array_equal(arr.reshape(10, seqs.shape[1], -1), want.numpy())
    assert verify_store(tmp_path / "s", {"role": role})["content_hash"] == meta["content_hash"]
    # the same sequences in other batches give the same bytes and hash
    meta2 = write_store(lm, layer, seqs, tmp_path / "s2", meta={"role": role}, batch_sequences=3, progress=False)
    assert meta2["content_hash"] == meta["content_hash"]


def test_store_float16(small_lm, smoke_out, smoke_params, tmp_path):
    seqs = load_eval_tokens(smoke_out)[:4]
    meta = write_store(small_lm, 1, seqs, tmp_path / "h", meta={}, dtype="float16", progress=False)
    assert meta["dtype"] == "float16" and meta["bytes"] == 4 * seqs.shape[1] * smoke_params.d_in("small") * 2
    verify_store(tmp_path / "h")
    src = StoreSource(tmp_path / "h")
    assert next(src.batches(8, 8, 0)).dtype == torch.float32


def test_nan_activations_raise(small_lm, smoke_out, tmp_path):
    broken = copy.deepcopy(small_lm)
    with torch.no_grad():
        broken.gpt_neox.embed_in.weight.fill_(float("nan"))
    seqs = load_eval_tokens(smoke_out)[:4]
    with pytest.raises(StoreError, match="non-finite"):
        write_store(broken, 1, seqs, tmp_path / "nan", meta={}, progress=False)
    assert not (tmp_path / "nan" / META).exists()
    with pytest.raises(StoreError, match="never finished"):
        verify_store(tmp_path / "nan")


@pytest.fixture
def smoke_copy(smoke_out, tmp_path):
    """A private copy of the smoke extract outputs (the shared one must stay intact)."""
    out = tmp_path / "out"
    for sub in ("models", "data", "activations"):
        shutil.copytree(smoke_out / sub, out / sub)
    return out


def test_truncated_and_corrupted_stores_are_detected_and_rebuilt(smoke_copy, smoke_params, smoke_info):
    small, large = store_dir(smoke_copy, "small"), store_dir(smoke_copy, "large")
    with open(small / ACTS, "r+b") as f:  # truncated: a killed writer, a full disk
        f.truncate(f.seek(0, 2) - 1000)
    with pytest.raises(StoreError, match="truncated"):
        verify_store(small)
    size = (large / ACTS).stat().st_size
    with open(large / ACTS, "r+b") as f:  # corrupted: same size, bytes flipped in the middle
        f.seek(size // 2)
        chunk = f.read(16)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    assert (large / ACTS).stat().st_size == size
    with pytest.raises(StoreError, match="corrupted"):
        verify_store(large)
    # an SAE unit opening it refuses it and removes it, so that the extract unit is pending and rebuilds it
    from proxygap_helpers.grid import is_complete, units

    extract = next(u for u in units(smoke_params, smoke_copy, smoke_copy / "params.resolved.yaml")
                   if u.stage == "extract")
    extract.run_dir(smoke_copy).mkdir(parents=True)
    (extract.run_dir(smoke_copy) / "done.json").write_text("{}")
    assert is_complete(smoke_params, smoke_copy, extract)
    with pytest.raises(StoreError, match="corrupted.*removed|removed.*corrupted|rebuild"):
        StoreSource(large)
    assert not (large / META).exists() and not is_complete(smoke_params, smoke_copy, extract)
    # a meta.json that is not JSON, or lacks fields, is refused (not a KeyError)
    meta_text = (small / META).read_text()
    for bad in ('{"shape": [', "{}", "[1, 2]"):
        (small / META).write_text(bad)
        with pytest.raises(StoreError, match=META):
            verify_store(small)
    (small / META).write_text(meta_text)
    # a stale store (another model or token set) is refused too
    with pytest.raises(StoreError, match="stale"):
        verify_store(store_dir(smoke_copy, "small"), {"tokens_hash": "something else"})

    info = run_extract(smoke_params, smoke_copy, progress=False)
    for role in ROLES:
        meta = verify_store(store_dir(smoke_copy, role))
        assert meta["content_hash"] == smoke_info["stores"][role]["content_hash"]
        assert info["stores"][role] == smoke_info["stores"][role]


def test_a_store_with_non_finite_rows_is_never_trained_on(tmp_path):
    path = _fake_store(tmp_path / "nan", 40)
    arr = np.fromfile(path / ACTS, dtype=np.float32).reshape(40, 3)
    arr[7] = np.nan
    arr.tofile(path / ACTS)  # same size: only the hash (and here the values) tell
    with pytest.raises(StoreError, match="corrupted"):
        StoreSource(path)
    assert not (path / META).exists() and not (path / ACTS).exists()
    path = _fake_store(tmp_path / "nan2", 40)
    arr[7] = np.inf
    arr.tofile(path / ACTS)  # a meta whose hash matches the non-finite bytes (written by a broken writer)
    meta = json.loads((path / META).read_text())
    write_json_atomic(path / META, {**meta, "content_hash": hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest()})
    with pytest.raises(StoreError, match="non-finite"):
        verify_store(path)


# --------------------------------------------------------------------------- StoreSource
def _fake_store(path, n: int, d: int = 3):
    """A store whose row i is filled with i, so batches can be traced back to rows."""
    path.mkdir(parents=True, exist_ok=True)
    arr = np.repeat(np.arange(n, dtype=np.float32)[:, None], d, axis=1)
    arr.tofile(path / ACTS)
    write_json_atomic(path / META, {"shape": [n, d], "dtype": "float32", "context_size": 1, "n_sequences": n,
                                    "bytes": arr.nbytes,
                                    "content_hash": hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest()})
    return path


def _ids(batches) -> np.ndarray:
    return np.concatenate([b[:, 0].numpy() for b in batches]).astype(np.int64)


def test_fake_store_verifies(tmp_path):
    verify_store(_fake_store(tmp_path / "f", 50))


def test_store_source_deterministic_and_covers_each_row_once(tmp_path):
    src = StoreSource(_fake_store(tmp_path / "f", 100))
    a = list(src.batches(10, 100, seed=0))
    assert len(a) == 10 and all(b.shape == (10, 3) and b.dtype == torch.float32 for b in a)
    assert src.epochs_used == 1
    ids = _ids(a)
    assert sorted(ids) == list(range(100)), "one epoch = every row exactly once"
    assert not np.array_equal(ids, np.arange(100)), "rows are shuffled"
    assert np.array_equal(_ids(src.batches(10, 100, seed=0)), ids), "same seed, same stream"
    assert not np.array_equal(_ids(src.batches(10, 100, seed=1)), ids), "another seed, another order"


def test_store_source_epochs_beyond_the_store(tmp_path):
    src = StoreSource(_fake_store(tmp_path / "f", 100))
    batches = list(src.batches(30, 250, seed=3))
    assert len(batches) == 9  # ceil(250 / 30)
    ids = _ids(batches)
    assert src.epochs_used == 3
    e0, e1 = ids[:100], ids[100:200]
    assert sorted(e0) == sorted(e1) == list(range(100)), "each epoch covers every row once"
    assert not np.array_equal(e0, e1), "each epoch is reshuffled"
    assert len(set(ids[200:270])) == 70
    src.batches(30, 90, seed=3)  # a generator: nothing runs before iteration
    list(src.batches(30, 90, seed=3))
    assert src.epochs_used == 1


def test_store_source_prefix_property(tmp_path):
    src = StoreSource(_fake_store(tmp_path / "f", 100))
    short = list(src.batches(16, 160, seed=7))
    long = list(src.batches(16, 1000, seed=7))
    assert len(short) == 10 and len(long) == 63
    for a, b in zip(short, long):
        assert torch.equal(a, b)


def test_store_source_on_smoke_store(smoke_out, smoke_params):
    src = StoreSource(store_dir(smoke_out, "large"))
    b = next(src.batches(64, 640, seed=0))
    assert b.shape == (64, smoke_params.d_in("large")) and torch.isfinite(b).all()
    arr = open_store(store_dir(smoke_out, "large"))
    rows = torch.from_numpy(np.array(arr))
    dist = torch.cdist(b, rows, compute_mode="donot_use_mm_for_euclid_dist")
    assert dist.min(dim=1).values.max() == 0, "every batch row is a store row"


# --------------------------------------------------------------------------- OnlineSource
def _fake_text(n_seqs: int | None, ctx: int = 16, vocab: int = 512):
    """What ``data.text_rows`` gives: int32 rows of ``ctx`` tokens (the same text for every seed)."""
    def fn(seed):
        rng = np.random.default_rng(1234)
        i = 0
        while n_seqs is None or i < n_seqs:
            yield rng.integers(2, vocab, ctx).astype(np.int32)
            i += 1
    return fn


def test_online_source_shapes_determinism_and_rows(small_lm, smoke_params):
    layer = smoke_params.layer("small")
    src = OnlineSource(small_lm, layer, _fake_text(None), batch_sequences=4, buffer_tokens=256)
    a = list(src.batches(32, 320, seed=0))
    assert len(a) == 10 and all(b.shape == (32, smoke_params.d_in("small")) for b in a)
    assert all(b.dtype == torch.float32 and torch.isfinite(b).all() for b in a)
    b = list(src.batches(32, 320, seed=0))
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "same seed, same batches"
    c = list(src.batches(32, 320, seed=1))
    assert not all(torch.equal(x, y) for x, y in zip(a, c)), "the seed drives the shuffle"
    # every row is resid_post of some position of the text
    seqs = np.stack([s for s, _ in zip(_fake_text(None)(0), range(64))])
    acts = models.resid_post(small_lm, torch.from_numpy(seqs.astype(np.int64)), layer).reshape(-1, src.d_in)
    got = torch.cat(a)
    dist = torch.cdist(got, acts, compute_mode="donot_use_mm_for_euclid_dist")
    assert dist.min(dim=1).values.max() < 1e-5


def test_online_source_runs_out_of_text(small_lm):
    src = OnlineSource(small_lm, 1, _fake_text(8), batch_sequences=4, buffer_tokens=64)
    with pytest.raises(StoreError, match="ran out of text"):
        list(src.batches(32, 10_000, seed=0))
