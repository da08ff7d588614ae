"""The Triton kernels of the step (``sae.kernel: triton``), on the CPU under Triton's interpreter.

Each kernel against the torch path (``sparse_step``) and the float64 dense formula, at small shapes that are not
multiples of the kernels' blocks, in fp32 (the interpreter has no bf16); ties, a full and an empty dead set, AuxK
taking every dead latent; and SAEs trained through the Triton path against the torch path's metrics. The GPU's
parity and speed are measured by ``benchmarks/gpu_bench.py``, never here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton_step's kernels are defined (Triton reads it at @jit)

import pytest  # noqa: E402
import torch  # noqa: E402

from proxygap_helpers import triton_step  # noqa: E402
from proxygap_helpers.sparse_step import SparseTopK, sparse_forward  # noqa: E402
from test_engine import _dense_reference, _params, _out, _train, _weights  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _case(B=37, d_in=24, d_sae=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, W_enc = torch.randn(B, d_in, generator=g), torch.randn(d_sae, d_in, generator=g)
    b_enc, W_dec = torch.randn(d_sae, generator=g), torch.randn(d_sae, d_in, generator=g)
    return c, W_enc, b_enc, W_dec, W_dec.norm(dim=-1)


def test_the_interpreter_runs_these_kernels():
    assert triton_step.INTERPRET, "TRITON_INTERPRET=1 was set before triton_step was imported"


@pytest.mark.parametrize("B,d_in,d_sae", [(37, 24, 200), (16, 16, 64), (5, 7, 33)])
def test_encode_and_its_group_maxima_equal_the_float64_formula(B, d_in, d_sae):
    c, W_enc, b_enc, _, nrm = _case(B, d_in, d_sae)
    hidden, gmax = triton_step.encode(c, W_enc, b_enc, nrm)
    ref = ((c.double() @ W_enc.double().T + b_enc.double()) * nrm.double())
    G = -(-d_sae // triton_step.GROUP)
    assert hidden.shape == (B, G * triton_step.GROUP) and gmax.shape == (B, G)
    assert torch.allclose(hidden[:, :d_sae].double(), ref, rtol=1e-5, atol=1e-4)
    assert torch.isneginf(hidden[:, d_sae:]).all(), "padding columns never win a top-k"
    padded = torch.nn.functional.pad(ref, (0, G * triton_step.GROUP - d_sae), value=-torch.inf)
    assert torch.allclose(gmax.double(), padded.view(B, G, -1).amax(-1), rtol=1e-5, atol=1e-4)
    assert torch.equal(gmax, hidden.view(B, G, -1).amax(-1)), "the maxima are those of the stored values"


@pytest.mark.parametrize("k", [1, 5, 12, 13, 40])
def test_topk_from_groups_is_an_exact_topk_with_ties(k):
    """Integer values in a narrow range: many ties, so the chosen indices may differ from torch.topk's; the
    values must be the same multiset, the indices distinct, and each index must hold its value. k = 13 is the
    largest that uses the groups (G = 26 for 400 columns, padding included); 40 takes the fallback."""
    g = torch.Generator().manual_seed(k)
    x = torch.randint(-6, 7, (19, 400), generator=g).float()
    G = -(-400 // triton_step.GROUP)
    hidden = torch.nn.functional.pad(x, (0, G * triton_step.GROUP - 400), value=-torch.inf)
    gmax = hidden.view(19, G, -1).amax(-1)
    values, idx = triton_step.topk_from_groups(hidden, gmax, k)
    assert torch.equal(values.sort(1).values, x.topk(k, dim=1).values.sort(1).values)
    assert torch.equal(x.gather(1, idx), values)
    assert (idx.sort(1).values.diff(dim=1) > 0).all() and (idx < 400).all()


def test_sparse_products_equal_their_dense_formulas():
    g = torch.Generator().manual_seed(3)
    W, X = torch.randn(50, 19, generator=g), torch.randn(23, 19, generator=g)
    idx = torch.stack([torch.randperm(50, generator=g)[:6] for _ in range(23)])
    w = torch.randn(23, 6, generator=g)
    dense = torch.zeros(23, 50).scatter_(1, idx, w)
    assert torch.allclose(triton_step.gather_rows(idx, w, W), dense @ W, atol=1e-5)
    assert torch.allclose(triton_step.rowdot(idx, W, X), (X @ W.T).gather(1, idx), atol=1e-5)
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    starts = torch.zeros(51, dtype=torch.long)
    starts[1:] = torch.bincount(flat, minlength=50).cumsum(0)
    rows = torch.arange(23)[:, None].expand_as(idx).reshape(-1)[order]
    out, sums = triton_step.segment_sum(rows, w.reshape(-1)[order], X, starts)
    assert torch.allclose(out, dense.T @ X, atol=1e-5) and torch.allclose(sums, dense.sum(0), atol=1e-5)
    assert (out[torch.bincount(flat, minlength=50) == 0] == 0).all(), "a latent without pairs gets zeros"
    assert triton_step.gather_rows(idx[:, :0], w[:, :0], W).abs().sum() == 0


@pytest.mark.parametrize("dead_ids,k,aux_relu", [
    ([], 4, False), ([3], 4, False), ([1, 5, 9, 10, 33, 40, 47], 4, False), (list(range(48)), 4, False),
    (list(range(0, 48, 2)), 24, False), ([1, 5, 9, 10, 33, 40, 47], 4, True)],
    ids=["no-dead", "one-dead", "some-dead", "all-dead", "k-equals-live-latents", "some-dead-rectified-auxk"])
def test_triton_step_equals_the_dense_formula(dead_ids, k, aux_relu):
    """The step's loss and gradients (float64 weights cast to fp32 for the kernels) against autograd of the dense
    formula in float64: the tolerance is fp32's. With 24 of 48 latents dead, k = 24 selects every live one."""
    (W_enc, b_enc, W_dec, b_dec), x = _weights()
    coef = 0.5
    dead = torch.zeros(48, dtype=torch.bool)
    dead[dead_ids] = True
    params32 = [t.detach().float().requires_grad_() for t in (W_enc, b_enc, W_dec, b_dec)]
    out = sparse_forward(x.float(), *params32, k, torch.tensor(dead_ids, dtype=torch.long), coef, kernel="triton",
                         aux_rectified=aux_relu)
    ref, ref_mse, ref_aux = _dense_reference(x, W_enc, b_enc, W_dec, b_dec, k, dead, coef, aux_relu)
    assert out.mse_loss.item() == pytest.approx(ref_mse.item(), rel=1e-5)
    assert out.aux_loss.item() == pytest.approx(ref_aux.item(), rel=1e-5, abs=1e-6)
    assert (out.aux_loss.item() > 0) == bool(dead_ids)
    ours = torch.autograd.grad(out.loss, params32)
    theirs = torch.autograd.grad(ref, [W_enc, b_enc, W_dec, b_dec])
    for name, a, b in zip(("W_enc", "b_enc", "W_dec", "b_dec"), ours, theirs):
        assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-4 * b.abs().max().item()), \
            (name, (a.double() - b).abs().max().item())
        assert b.abs().max() > 0, name


def test_triton_function_equals_the_torch_function():
    """Outputs and all four gradients of ``TritonTopK`` against ``SparseTopK`` (both AuxK paths), fp32, at shapes
    that are no multiple of any block."""
    c, W_enc, b_enc, W_dec, nrm = _case()
    dead = torch.arange(0, 200, 3)
    g = torch.Generator().manual_seed(9)
    g_rec, g_aux = torch.randn(37, 24, generator=g), torch.randn(37, 24, generator=g)
    for dense_aux in (False, True):
        a = [t.clone().requires_grad_() for t in (c, W_enc, b_enc, W_dec)]
        b = [t.clone().requires_grad_() for t in (c, W_enc, b_enc, W_dec)]
        ours = triton_step.TritonTopK.apply(*a, nrm, 5, dead, 12, "fp32")
        theirs = SparseTopK.apply(*b, nrm, 5, dead, 12, dense_aux)
        assert torch.equal(ours[3].sort(1).values, theirs[3].sort(1).values), "the same latents are selected"
        for o, t in zip(ours[:3], theirs[:3]):
            assert torch.allclose(o.sort(1).values if o.shape[1] == 5 else o,
                                  t.sort(1).values if t.shape[1] == 5 else t, atol=1e-4)
        (ours[0] * g_rec + ours[1] * g_aux).sum().backward()
        (theirs[0] * g_rec + theirs[1] * g_aux).sum().backward()
        for name, x, y in zip(("c", "W_enc", "b_enc", "W_dec"), a, b):
            assert torch.allclose(x.grad, y.grad, atol=1e-4), (name, (x.grad - y.grad).abs().max().item())


# --------------------------------------------------------------------------- SAEs trained through the kernels
# Measured (2026-12-07, one thread): the SAEs below agree with the torch path's to 1e-8 (relative) in every metric;
# fp32 sums in another order are the only difference. The bound asserted leaves room for a TopK tie. The shapes are
# small because the interpreter runs each kernel program in Python (a 32 -> 1024 SAE costs ~20 s a step here).
TRAINED_TOLERANCE = 1e-4
TINY = {"sae.expansion": 4, "sae.batch_size": 64, "sae.tokens": [1024], "sae.dead_tokens_window": 256,
        "sae.norm_estimate_batches": 2}


def test_saes_trained_through_the_kernels_give_the_torch_paths_metrics(tmp_path, smoke_out, smoke_params):
    """The smoke pair's small model, a 32 -> 128 SAE, 16 steps with latents dead after 256 tokens (AuxK runs)."""
    from proxygap_helpers import training
    from proxygap_helpers.evaluate import evaluate_unit

    metrics = {}
    for kernel in ("torch", "triton"):
        p = _params(smoke_params, **{**TINY, "sae.kernel": kernel})
        out = _out(tmp_path / kernel, smoke_out)
        (meta,) = _train(p, out, smoke_out)
        assert meta["kernel"] == kernel
        (m,) = evaluate_unit(p, "small", out, progress=False)
        log = training.load_sae(out, m["sae_id"])[1]
        metrics[kernel] = {key: m[key] for key in ("mse", "r2", "cosine", "ce_rec", "l0", "dead_frac")}
        metrics[kernel]["steps"] = log["steps"]
        metrics[kernel]["aux_loss"] = json.loads((training.sae_dir(out, m["sae_id"]) / training.TRAIN_LOG).read_text()
                                                 )[-1]["auxiliary_reconstruction_loss"]
    assert metrics["triton"]["steps"] == metrics["torch"]["steps"] == 1024 // 64
    assert metrics["torch"]["aux_loss"] > 0, "AuxK ran"
    for key, ref in metrics["torch"].items():
        assert metrics["triton"][key] == pytest.approx(ref, rel=TRAINED_TOLERANCE, abs=TRAINED_TOLERANCE), key
    assert _params(smoke_params, **{"sae.kernel": "triton"}).sae_specs()[0].sae_id != \
        _params(smoke_params).sae_specs()[0].sae_id, "the kernel keys the SAE id (other sums, other last bits)"


def test_the_gpu_benchmark_script_runs_end_to_end_on_the_cpu(tmp_path, monkeypatch):
    """``benchmarks/gpu_bench.py --cpu-smoke`` at the smallest shapes: every installed trainer is timed, the
    figures and both reports are written, the kernels agree with the torch path. It measures nothing (the CPU,
    the interpreter); the GPU run is what fills ``reports/gpu_bench.*``."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_bench

    monkeypatch.setattr(gpu_bench, "SMOKE", {"shapes": {"d512": 8, "d1024": 16}, "expansion": 2, "batch": 16,
                                             "ks": (4,), "steps": 1, "repeats": 1, "warmup": 1, "buffers": 1})
    monkeypatch.setattr(gpu_bench, "lm_forward_rate", lambda role, device, smoke: {"hook": "blocks.0.hook_resid_post",
                                                                                  "tokens_per_s": 1.0})
    assert gpu_bench.main(["--cpu-smoke", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gpu_bench.json").read_text())
    timed = {r["trainer"] for r in res["rows"] if r.get("tokens_per_s", 0) > 0}
    assert {"ours_torch_fp32", "ours_triton_fp32", "ours_torch_bf16", "ours_triton_bf16", "saelens_fp32",
            "saelens_bf16"} <= timed
    assert all("tokens_per_s" in r or r["note"] == "not installed" for r in res["rows"])
    assert len(res["rows"]) == 2 * 2 * 8, "2 shapes x 2 dead fractions x 8 trainers"
    assert res["figures"]["step_vs_saelens_d1024"] > 0 and res["figures"]["step_bound_fraction_d1024"] > 0
    assert max(res["kernel_parity"].values()) < 1e-4
    md = (tmp_path / "gpu_bench.md").read_text()
    assert all(f"`{key}`" in md for key in gpu_bench.TARGETS)
