"""TopK SAE training on the smoke store: SAELens format, logs, determinism, ladder checkpoints, NaN stop,
half-written directories, baselines, and no unpickling anywhere."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from proxygap_helpers import training
from proxygap_helpers.activations import StoreSource, store_dir
from proxygap_helpers.evaluate import evaluate_unit
from proxygap_helpers.metrics import METRIC_KEYS
from proxygap_helpers.train import train_unit
from proxygap_helpers.training import TrainingError, is_trained, load_sae, sae_dir
from smoke_share import one_sae_params
from smoke_share import shared_out as _out

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "proxygap_helpers"
ROLE, K = "small", 8


def _params(smoke_params, **over):
    return one_sae_params(smoke_params, K, **over)


def _train(p, out: Path, smoke_out: Path, role: str = ROLE, k: int = K, **kw):
    src = StoreSource(store_dir(smoke_out, role))
    return train_unit(p, p.sae_specs(role=role, k=k), src, out, p.models[role].name, p.data.context_size,
                      progress=False, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, smoke_out, smoke_params):
    """The same spec trained into two output dirs, each evaluated."""
    p = _params(smoke_params)
    outs, metas, metrics = [], [], []
    for name in ("a", "b"):
        out = _out(tmp_path_factory.mktemp(f"train_{name}"), smoke_out)
        metas.append(_train(p, out, smoke_out))
        metrics.append(evaluate_unit(p, ROLE, out, progress=False))
        outs.append(out)
    return p, outs, metas, metrics


def test_train_unit_writes_saelens_saes(trained, smoke_params):
    from sae_lens import SAE

    p, (out, _), (metas, _), _ = trained
    specs = p.sae_specs(role=ROLE, k=K)
    assert len(specs) == len(metas) == 1
    spec = specs[0]
    d = sae_dir(out, spec.sae_id)
    assert is_trained(out, spec.sae_id)
    assert not list((out / "saes").glob("*.partial")) and not list((out / "saes").glob("*.old"))
    sae = SAE.load_from_disk(str(d), device="cpu")
    assert sae.cfg.k == K
    assert sae.cfg.d_in == smoke_params.d_in(ROLE)
    assert sae.cfg.d_sae == smoke_params.sae.expansion * smoke_params.d_in(ROLE)
    assert sae.cfg.metadata.hook_name == smoke_params.hook(ROLE)
    cfg = json.loads((d / "cfg.json").read_text())
    assert cfg["k"] == K and cfg["d_in"] == sae.cfg.d_in
    log = json.loads((d / training.TRAIN_LOG).read_text())
    steps = 8192 // p.sae.batch_size
    assert [r["step"] for r in log] == list(range(p.sae.log_every, steps + 1, p.sae.log_every))
    for row in log:
        for key in ("loss", "mse_loss", "l0", "dead_frac", "tokens", "lr"):
            assert key in row and np.isfinite(row[key]), (key, row)
        assert row["l0"] <= K + 1e-6 and 0 <= row["dead_frac"] <= 1
    assert log[-1]["mse_loss"] < log[0]["mse_loss"], "the reconstruction loss fell during training"
    meta = json.loads((d / training.TRAIN_META).read_text())
    assert meta == metas[0]
    assert meta["tokens"] == 8192 and meta["steps"] == steps and meta["tokens_seen"] == 8192
    assert meta["epochs_used"] == 1 and meta["budget_mode"] == "separate"
    loaded, lmeta = load_sae(out, spec.sae_id)
    assert lmeta == meta and loaded.cfg.k == K


def test_training_is_deterministic(trained):
    p, (a, b), _, (ma, mb) = trained
    sid = p.sae_specs(role=ROLE, k=K)[0].sae_id
    wa = load_file(sae_dir(a, sid) / "sae_weights.safetensors")
    wb = load_file(sae_dir(b, sid) / "sae_weights.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs between two identical runs"
    la = json.loads((sae_dir(a, sid) / training.TRAIN_LOG).read_text())
    lb = json.loads((sae_dir(b, sid) / training.TRAIN_LOG).read_text())
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    assert len(ma) == len(mb) == 1
    for key in METRIC_KEYS + ("ce_rec",):
        assert ma[0][key] == mb[0][key], key


def test_sae_beats_ablation_baselines_and_l0_is_k(trained):
    _, _, _, (metrics, _) = trained
    m = metrics[0]
    msg = {k: m[k] for k in ("ce_clean", "ce_sae", "ce_mean_ablation", "ce_zero", "l0", "r2")}
    assert m["ce_clean"] < m["ce_sae"] < m["ce_mean_ablation"], msg
    assert m["ce_sae"] < m["ce_zero"], msg
    assert m["l0"] == pytest.approx(K, abs=1e-9), msg
    assert 0 < m["r2"] <= 1 and m["ce_rec"] == m["ce_rec_relative"], msg
    assert m["ce_rec_relative"] == pytest.approx(2 - m["ce_sae"] / m["ce_clean"])


def test_ladder_checkpoints_equal_shorter_ladders(tmp_path, smoke_out, smoke_params):
    both = _params(smoke_params, **{"sae.budget_mode": "ladder", "sae.tokens": [2048, 4096]})
    short = _params(smoke_params, **{"sae.budget_mode": "ladder", "sae.tokens": [2048]})
    runs = training.runs_for(both, both.sae_specs(role=ROLE, k=K))
    assert [[s.tokens for s in run] for run in runs] == [[2048, 4096]], "ladder: one run per (role, k, seed)"
    out_both = _out(tmp_path / "both", smoke_out)
    out_short = _out(tmp_path / "short", smoke_out)
    metas = _train(both, out_both, smoke_out)
    assert [m["tokens"] for m in metas] == [2048, 4096]
    assert [m["steps"] for m in metas] == [2048 // 256, 4096 // 256]
    specs = both.sae_specs(role=ROLE, k=K)
    for s in specs:
        assert is_trained(out_both, s.sae_id) and json.loads(
            (sae_dir(out_both, s.sae_id) / training.TRAIN_META).read_text())["budget_mode"] == "ladder"
    _train(short, out_short, smoke_out)
    (sid,) = [s.sae_id for s in short.sae_specs(role=ROLE, k=K)]
    assert sid == specs[0].sae_id, "a ladder checkpoint's id does not depend on the largest budget"
    w_ladder = load_file(sae_dir(out_both, sid) / "sae_weights.safetensors")
    w_short = load_file(sae_dir(out_short, sid) / "sae_weights.safetensors")
    for key in w_ladder:
        assert torch.equal(w_ladder[key], w_short[key]), key
    w_big = load_file(sae_dir(out_both, specs[1].sae_id) / "sae_weights.safetensors")
    assert any(not torch.equal(w_big[k], w_ladder[k]) for k in w_big), "the 4096 checkpoint trained further"


class _NaNSource:
    """A real store, with a NaN in the row that SAE seed 0 meets first in batch ``bad`` (norm-estimate
    batches count too), for both the per-SAE batches and the shared chunks."""

    def __init__(self, inner: StoreSource, bad: int, batch_size: int):
        self.inner, self.bad, self.epochs_used = inner, bad, 1
        self.row = int(np.random.default_rng([0, 0]).permutation(inner.n)[bad * batch_size])

    def batches(self, batch_size, total_tokens, seed):
        for i, b in enumerate(self.inner.batches(batch_size, total_tokens, seed)):
            if i >= self.bad:
                b = b.clone()
                b[0, 0] = float("nan")
            yield b

    def chunks(self, buffer_tokens, seed=0, device="cpu"):
        for c, chunk in self.inner.chunks(buffer_tokens, seed, device):
            chunk = chunk.clone()
            chunk[self.row, 0] = float("nan")
            yield c, chunk


@pytest.mark.parametrize("trainer", ["fast", "saelens"])
def test_nan_in_activations_stops_training(tmp_path, smoke_out, smoke_params, trainer):
    p = _params(smoke_params, **{"sae.trainer": trainer})
    out = _out(tmp_path / "nan", smoke_out)
    bad_step = 5
    src = _NaNSource(StoreSource(store_dir(smoke_out, ROLE)), p.sae.norm_estimate_batches + bad_step - 1,
                     p.sae.batch_size)
    with pytest.raises(TrainingError, match=rf"at step {bad_step}\b") as ei:
        train_unit(p, p.sae_specs(role=ROLE, k=K), src, out, "m", p.data.context_size, progress=False)
    sid = p.sae_specs(role=ROLE, k=K)[0].sae_id
    assert sid in str(ei.value)
    assert not is_trained(out, sid)
    assert not (out / "saes").exists() or not any((out / "saes").iterdir()), list((out / "saes").iterdir())


def test_half_written_sae_dir_is_not_trained(trained, tmp_path, smoke_out):
    p, (a, _), _, _ = trained
    sid = p.sae_specs(role=ROLE, k=K)[0].sae_id
    out = _out(tmp_path / "half", smoke_out)
    shutil.copytree(sae_dir(a, sid), sae_dir(out, sid))
    assert is_trained(out, sid)
    (sae_dir(out, sid) / "sae_weights.safetensors").unlink()
    assert not is_trained(out, sid)
    with pytest.raises(TrainingError, match="missing or incomplete"):
        load_sae(out, sid)
    # train_unit counts it as missing and trains it again (to the same weights)
    metas = _train(p, out, smoke_out)
    assert [m["sae_id"] for m in metas] == [sid]
    w = load_file(sae_dir(out, sid) / "sae_weights.safetensors")
    w0 = load_file(sae_dir(a, sid) / "sae_weights.safetensors")
    assert all(torch.equal(w[k], w0[k]) for k in w0)
    assert _train(p, out, smoke_out) == [], "a complete SAE is kept"


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickle_bearing_weights_are_refused(tmp_path):
    path = tmp_path / "sae_weights.pt"
    torch.save({"W_enc": torch.zeros(2, 2), "evil": _Evil()}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    # the SAE weights we write are safetensors, not pickles
    assert (PKG / "training.py").read_text().count("save_model") >= 1


def test_no_unpickling_in_the_package():
    offenders = []
    for f in sorted(PKG.rglob("*.py")):
        src = f.read_text()
        for m in re.finditer(r"torch\.load\(", src):
            call = src[m.start():src.find(")", m.start()) + 1]
            if "weights_only=True" not in call:
                offenders.append(f"{f.name}: {call}")
        for pat in (r"^\s*import pickle", r"^\s*from pickle", r"\bpickle\.loads?\(", r"allow_pickle\s*=\s*True",
                    r"\bdill\b", r"\bjoblib\.load", r"yaml\.unsafe_load", r"yaml\.full_load", r"FullLoader",
                    r"UnsafeLoader", r"weights_only\s*=\s*False"):
            for m in re.finditer(pat, src, flags=re.M):
                offenders.append(f"{f.name}: {m.group(0)!r}")
        for line in src.splitlines():
            if "yaml.load(" in line and "Loader=_SafeLoader" not in line:
                offenders.append(f"{f.name}: {line.strip()}")
    assert not offenders, offenders
    import yaml

    from proxygap_helpers.params import _SafeLoader

    assert issubclass(_SafeLoader, yaml.SafeLoader) and not issubclass(_SafeLoader, yaml.FullLoader)
