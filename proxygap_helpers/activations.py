"""Activation sources: an on-disk memmap store (embedded grids) and an online source (the Pythia grid).

Both give two interfaces:

* ``batches(batch_size, total_tokens, seed) -> Iterator[Tensor]``: shuffled batches of hook activations
  ``[batch_size, d_in]`` for *one* SAE, reshuffled per epoch when a budget exceeds the data (the SAELens
  trainer path: each SAE reads the store, or re-runs the model, on its own);
* ``chunks(buffer_tokens) -> Iterator[(chunk index, Tensor [rows, d_in])]``: the *shared* stream of the fast
  engine (``engine.py``): one store read, or one LM forward, per row for a whole set of SAEs. Each SAE then
  visits chunk ``c`` in its own order, ``numpy.random.default_rng([seed, c]).permutation(rows)``.

A store no larger than ``buffer_tokens`` is one chunk per epoch, read once and kept: SAE ``seed`` then sees
exactly the batches that ``batches(..., seed)`` gives (epoch e in the order ``rng([seed, e])``). A larger store
is cut per epoch into chunks of ``buffer_tokens`` rows of a shared permutation ``rng([data seed, epoch])``.

Store layout (``activations/<role>/``, or ``activations/<role>/L<layer>/`` with several hooks per model, all
written by one LM pass: :func:`write_stores`): ``acts.bin`` (raw little-endian rows ``[n_tokens, d_in]``) and
``meta.json`` written last (shape, dtype, model, hook, layer, token hash, content hash). A store whose size
or hash does not match its meta is reported by :func:`verify_store` and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .files import read_json, write_json_atomic
from .layout import store_dir  # noqa: F401 - where a role's store lives (callers import it from here)
from .models import resid_posts

ACTS = "acts.bin"
META = "meta.json"


class StoreError(RuntimeError):
    """The activation store is missing, truncated or corrupted."""


def write_store(model, layer: int, seqs: np.ndarray, out_dir: Path, meta: dict, dtype: str = "float32",
                batch_sequences: int = 32, progress: bool = True, skip: int = 0) -> dict:
    """Run ``model`` over rows of ``seqs`` and write ``blocks.{layer}.hook_resid_post`` for every position from
    ``skip`` on (:func:`write_stores` with one hook)."""
    return write_stores(model, {layer: (out_dir, meta)}, seqs, dtype, batch_sequences, progress, skip)[layer]


def write_stores(model, stores: dict[int, tuple[Path, dict]], seqs: np.ndarray, dtype: str = "float32",
                 batch_sequences: int = 32, progress: bool = True, skip: int = 0) -> dict[int, dict]:
    """One pass of ``model`` over rows of ``seqs`` writing one store per hook: ``stores`` maps a layer to its
    store folder and the meta to record; every batch runs the model once, up to the deepest layer, and each
    ``blocks.{layer}.hook_resid_post`` goes to its store, positions ``skip`` .. ctx-1 of every row (the first
    ``skip``, a family's massive-norm positions, are never trained on: ``data.skip_positions``). Returns
    {layer: the full meta written}; ``skip_positions`` is in it when not 0.

    Written chunk by chunk into memmaps (peak memory independent of the store size), hashed as it goes;
    each ``meta.json`` is written last, so a killed write leaves stores that :func:`verify_store` rejects.
    """
    from .progress import tqdm

    n_seq, ctx = seqs.shape
    keep = ctx - skip  # rows per sequence
    d = model.config.hidden_size
    arrs, hashes = {}, {}
    for layer, (out_dir, _) in stores.items():
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / META).unlink(missing_ok=True)
        arrs[layer] = np.memmap(out_dir / ACTS, dtype=dtype, mode="w+", shape=(n_seq * keep, d))
        hashes[layer] = hashlib.blake2b(digest_size=16)
    device = next(model.parameters()).device
    role = next(iter(stores.values()))[1].get("role", "")
    for i in tqdm(range(0, n_seq, batch_sequences), desc=f"extract {role}", disable=not progress, mininterval=1.0):
        x = torch.from_numpy(seqs[i:i + batch_sequences].astype(np.int64)).to(device)
        for layer, act in resid_posts(model, x, list(stores)).items():
            a = act[:, skip:].reshape(-1, d).to("cpu", getattr(torch, dtype)).numpy()
            if not np.isfinite(a).all():
                raise StoreError(f"non-finite activations at sequences {i}..{i + len(x) - 1}, layer {layer}: the "
                                 "model is broken")
            arrs[layer][i * keep:i * keep + len(a)] = a
            hashes[layer].update(np.ascontiguousarray(a))  # the buffer itself: no copy (same bytes as a.tobytes())
    written = {}
    for layer, (out_dir, meta) in stores.items():
        arrs[layer].flush()
        full = {**meta, "shape": [n_seq * keep, d], "dtype": dtype, "context_size": ctx, "n_sequences": n_seq,
                "layer": layer, "content_hash": hashes[layer].hexdigest(),
                "bytes": n_seq * keep * d * np.dtype(dtype).itemsize, **({"skip_positions": skip} if skip else {})}
        write_json_atomic(Path(out_dir) / META, full)
        written[layer] = full
    arrs.clear()
    return written


def verify_store(store_dir: Path, expect: dict | None = None, full_hash: bool = True) -> dict:
    """Return the store's meta if it is complete and intact; raise StoreError saying what is wrong.

    Checks: meta present, the fields in ``expect`` match (e.g. token hash, hook), the file size equals
    ``prod(shape) * itemsize``, and (``full_hash``) the content hash of the data.
    """
    store_dir = Path(store_dir)
    if not (store_dir / META).is_file():
        raise StoreError(f"{store_dir}: no {META} (the store was never finished)")
    try:
        meta = read_json(store_dir / META)
    except ValueError as e:
        raise StoreError(f"{store_dir}/{META} is not valid JSON: {e}") from None
    required = ("shape", "dtype", "bytes", "content_hash", "context_size")
    if not isinstance(meta, dict) or any(k not in meta for k in required):
        raise StoreError(f"{store_dir}/{META} lacks some of {', '.join(required)} (written by another version?)")
    for key, want in (expect or {}).items():
        if meta.get(key) != want:
            raise StoreError(f"{store_dir}: {key} is {meta.get(key)!r}, expected {want!r} (stale store)")
    path = store_dir / ACTS
    size = path.stat().st_size if path.is_file() else -1
    if size != meta["bytes"]:
        raise StoreError(f"{path}: {size} bytes on disk, meta says {meta['bytes']} (truncated or replaced)")
    if full_hash:
        arr = open_store(store_dir, meta)
        h = hashlib.blake2b(digest_size=16)
        rows, finite = meta["context_size"] * 32, True
        for i in range(0, len(arr), rows):
            block = np.ascontiguousarray(arr[i:i + rows])
            h.update(block)
            finite = finite and bool(np.isfinite(block).all())
        if h.hexdigest() != meta["content_hash"]:
            raise StoreError(f"{path}: content hash differs from meta (corrupted)")
        if not finite:
            raise StoreError(f"{path}: holds non-finite values")
    return meta


def open_store(store_dir: Path, meta: dict | None = None) -> np.memmap:
    meta = meta or read_json(Path(store_dir) / META)
    return np.memmap(Path(store_dir) / ACTS, dtype=meta["dtype"], mode="r", shape=tuple(meta["shape"]))


class StoreSource:
    """Shuffled batches from a verified store; ``epochs_used`` tells how often the data was reused."""

    def __init__(self, store_dir: Path, meta: dict | None = None):
        """Opens the store after :func:`verify_store` with the full hash and a finiteness check (one read of the
        store, about a second per GB). A store that fails it is removed, so that the next run rebuilds it (the
        extract unit is pending without it), and :class:`StoreError` says so."""
        if meta is None:
            try:
                meta = verify_store(store_dir, full_hash=True)
            except StoreError as e:
                remove_store(store_dir)
                raise StoreError(f"activation store unusable, removed: {e}; run the same command again to rebuild "
                                 "it (the extract unit is pending now)") from None
        self.meta = meta
        self.arr = open_store(store_dir, self.meta)
        self.n, self.d_in = self.arr.shape
        self.epochs_used = 0

    def batches(self, batch_size: int, total_tokens: int, seed: int) -> Iterator[torch.Tensor]:
        """Yield ``ceil(total_tokens / batch_size)`` batches; epoch e uses permutation rng(seed, e).

        The stream for a seed is a prefix-consistent sequence: the first N batches are the same whatever
        ``total_tokens`` is (ladder checkpoints rely on it).
        """
        n_batches = -(-total_tokens // batch_size)
        epoch, perm, pos = 0, None, self.n
        self.epochs_used = 1
        for _ in range(n_batches):
            idx = np.empty(0, dtype=np.int64)
            while len(idx) < batch_size:
                if pos >= self.n:
                    perm = np.random.default_rng([seed, epoch]).permutation(self.n)
                    epoch, pos = epoch + 1, 0
                    self.epochs_used = epoch
                take = perm[pos:pos + batch_size - len(idx)]
                idx = np.concatenate([idx, take])
                pos += len(take)
            yield torch.from_numpy(np.ascontiguousarray(self.arr[idx], dtype=np.float32))

    def chunks(self, buffer_tokens: int, seed: int = 0, device: str = "cpu") -> Iterator[tuple[int, torch.Tensor]]:
        """The shared stream: epochs over the store, forever (the consumer stops), as float32 chunks on ``device``.

        A store of at most ``buffer_tokens`` rows is read once and yielded whole for every epoch (chunk index =
        epoch). A larger one is cut per epoch into ``ceil(rows / buffer_tokens)`` chunks of a permutation
        ``rng([seed, epoch])`` (rows sorted within a chunk, for sequential reads); ``seed`` is the stream's,
        shared by every SAE (the data seed), not an SAE's.
        """
        if self.n <= buffer_tokens:
            whole = torch.from_numpy(np.array(self.arr, dtype=np.float32)).to(device)  # read once, kept
            epoch = 0
            while True:
                self.epochs_used = epoch + 1
                yield epoch, whole
                epoch += 1
        c, epoch = 0, 0
        while True:
            self.epochs_used = epoch + 1
            perm = np.random.default_rng([seed, epoch]).permutation(self.n)
            for i in range(0, self.n, buffer_tokens):
                rows = np.sort(perm[i:i + buffer_tokens])
                yield c, torch.from_numpy(np.ascontiguousarray(self.arr[rows], dtype=np.float32)).to(device)
                c += 1
            epoch += 1


class StoreSet:
    """The shared stream of several hooks of one model: one :class:`StoreSource` per layer, all written from the
    same rows (one LM pass: ``write_stores``), read in step. ``chunks`` yields ``(c, {layer: Tensor})`` with chunk
    c of every store: the same rows of each hook, so each hook's SAEs see exactly what they would see alone."""

    def __init__(self, stores: dict[int, Path]):
        self.sources = {layer: StoreSource(path) for layer, path in stores.items()}
        self.epochs_used = 1

    def for_layer(self, layer: int) -> StoreSource:
        return self.sources[layer]

    def chunks(self, buffer_tokens: int, seed: int = 0, device: str = "cpu"
               ) -> Iterator[tuple[int, dict[int, torch.Tensor]]]:
        streams = {layer: s.chunks(buffer_tokens, seed, device) for layer, s in self.sources.items()}
        try:
            while True:
                parts = {layer: next(st) for layer, st in streams.items()}
                c = {i for i, _ in parts.values()}.pop()
                self.epochs_used = max(s.epochs_used for s in self.sources.values())
                yield c, {layer: x for layer, (_, x) in parts.items()}
        finally:
            for st in streams.values():
                st.close()


class OnlineSource:
    """Activations straight from the model, batch by batch (for grids whose stores would not fit on disk).

    Sequences come from ``seq_iter_fn(seed)`` (e.g. the Pile, streamed); the positions from ``skip`` on of each
    (``data.skip_positions``) go through a
    shuffle buffer of ``buffer_tokens`` rows, seeded, half refilled at a time (like SAELens' mixing buffer).

    ``layer`` is one block index (chunks are tensors) or a list of them: then one forward per batch, up to the
    deepest, gives every hook's rows, and ``chunks`` yields ``{layer: Tensor}`` (the hub path's one LM pass per
    model for all its hooks).
    """

    def __init__(self, model, layer: int | list[int], seq_iter_fn, batch_sequences: int = 32,
                 buffer_tokens: int = 2**18, skip: int = 0):
        self.model, self.layer, self.seq_iter_fn, self.skip = model, layer, seq_iter_fn, skip
        self.layers = sorted(layer) if isinstance(layer, list) else [layer]
        self.batch_sequences, self.buffer_tokens = batch_sequences, buffer_tokens
        self.d_in = model.config.hidden_size
        self.epochs_used = 1
        self.lm_forwards = 0  # forward passes (of batch_sequences rows) run so far: what sharing saves
        self.lm_tokens = 0

    def for_layer(self, layer: int) -> "OnlineSource":
        """A source of one of the hooks (its own LM pass: for the trainer that reads one SAE at a time)."""
        return OnlineSource(self.model, layer, self.seq_iter_fn, self.batch_sequences, self.buffer_tokens, self.skip)

    def _acts(self, seed: int) -> Iterator[dict[int, torch.Tensor]]:
        device = next(self.model.parameters()).device
        rows = []
        for seq in self.seq_iter_fn(seed):
            rows.append(seq)
            if len(rows) == self.batch_sequences:
                x = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)
                self.lm_forwards += 1
                self.lm_tokens += x.numel()
                yield {L: a[:, self.skip:].reshape(-1, self.d_in).float()
                       for L, a in resid_posts(self.model, x, self.layers).items()}
                rows = []

    def chunks(self, buffer_tokens: int, seed: int = 0, device: str | None = None
               ) -> Iterator[tuple[int, torch.Tensor | dict[int, torch.Tensor]]]:
        """The shared stream: consecutive chunks of at least ``buffer_tokens`` rows (whole LM batches), each
        row computed once for every SAE of a set, kept on the model's device (or ``device``); per hook
        (``{layer: Tensor}``) when the source has several.

        Raises :class:`StoreError` when the text runs out (the consumer stops the stream before that).
        """
        stream = self._acts(seed)
        c = 0
        while True:
            parts, n = [], 0
            for a in stream:
                parts.append({L: x if device is None else x.to(device) for L, x in a.items()})
                n += len(a[self.layers[0]])
                if n >= buffer_tokens:
                    break
            if not parts:
                raise StoreError("the online source ran out of text before every SAE reached its budget")
            chunk = {L: torch.cat([part[L] for part in parts]) for L in self.layers}
            yield c, chunk if isinstance(self.layer, list) else chunk[self.layer]
            c += 1

    def batches(self, batch_size: int, total_tokens: int, seed: int) -> Iterator[torch.Tensor]:
        if isinstance(self.layer, list):
            raise ValueError("batches() reads one hook: use for_layer(layer)")
        gen = torch.Generator().manual_seed(seed)
        stream = (a[self.layer] for a in self._acts(seed))
        buf = torch.empty(0, self.d_in)
        done = 0
        while done < total_tokens:
            while len(buf) < self.buffer_tokens:
                try:
                    buf = torch.cat([buf, next(stream).cpu()])
                except StopIteration:
                    break
            if len(buf) < batch_size:
                raise StoreError("the online source ran out of text before the budget was reached")
            buf = buf[torch.randperm(len(buf), generator=gen)]
            half = max(batch_size, len(buf) // 2)
            out, buf = buf[:half], buf[half:]
            for b in out.split(batch_size):
                if len(b) == batch_size and done < total_tokens:
                    done += batch_size
                    yield b


def remove_store(path: Path) -> None:
    for name in (META, ACTS):
        try:
            os.remove(Path(path) / name)
        except FileNotFoundError:
            pass
