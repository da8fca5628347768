"""Lean frames (bf16/fp16 U, V with the exact reference block A_ref = U_lᵀW0V_l, stored as σ_k in fp32 + its
off-diagonal in fp16): zero at init, closed form vs autograd, the memory formula, the fp32 fallback of the
off-diagonal, the cache round trip, the device it follows, training and the config key."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import rpsft.bases as bases
import rpsft.frames as frames
from rpsft.anchor import RotationAnchor
from rpsft.bases import BasesCache
from rpsft.config import ConfigError, load_config
from rpsft.frames import OFFDIAG_TOL, anchor_nbytes, get_lean_bases, parse_frame_dtype, store_offdiag
from rpsft.train import AnchoredSFTTrainer

from rpsft_testing import autograd_vs_closed_form, make_tiny_llama
from .test_train import PerMicroBatchPenalty, cfg_for, max_rel_diff, run_trainer

LOW = [torch.bfloat16, torch.float16]


def perturb_(model, scale=1e-2, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)


@pytest.fixture
def model():
    return make_tiny_llama(64, inter=80)


@pytest.mark.parametrize("frame", LOW)
@pytest.mark.numerics
def test_zero_at_init_with_bf16_weights(frame):
    model = make_tiny_llama(64, inter=80).to(torch.bfloat16)
    anchor = RotationAnchor.from_model(model, rank=8, frame_dtype=frame)
    assert anchor.frame_dtype == frame and anchor.dtype == torch.float32
    for t in anchor.terms.values():
        assert t.U.dtype == t.V.dtype == frame and t.Aref.shape == (8, 8) and t.Aref.dtype == torch.float16
        assert torch.diagonal(t.Aref).eq(0).all() and t.Aref.abs().max() > 0  # off-diagonal only, and not empty
        # σ_k: Rayleigh quotients of the rounded frames, kept in fp32 as A_ref's diagonal
        U, V, W0 = t.U.double(), t.V.double(), dict(model.named_parameters())[t.name].detach().double()
        torch.testing.assert_close(t.S.double(), torch.diagonal(U.T @ W0 @ V), rtol=1e-6, atol=0)
    sigma_sq = sum(t.ref_sq for t in anchor.terms.values())
    lean = anchor.penalty(model).item()
    assert lean < 1e-10 * sigma_sq
    # what is left: A_ref's storage (its off-diagonal rounded to fp16, 2^-11 of it, or 2^-25 per entry below fp16's
    # normal range; σ_k to fp32, 2^-24) and the fp32 products' round-off, ≤ √(m + n + 6)·2^-24·‖W0‖_F
    # (tests/bench/test_precision.py)
    params = dict(model.named_parameters())
    for n, d in anchor.drift(model).items():
        t, W0 = anchor.terms[n], params[n].detach().double()
        block = t.U.double().T @ W0 @ t.V.double()
        off = float((block - torch.diag(torch.diagonal(block))).norm())
        floor = 2.0 ** -11 * off + 2.0 ** -25 * t.k + 2.0 ** -24 * float(t.S.double().norm())
        assert d["abs"] <= floor + math.sqrt(sum(W0.shape) + 6) * 2.0 ** -24 * float(W0.norm()), n
    # The same rounded frames against diag σ_k (the plain low-precision anchor) are far from zero: A_ref is the fix.
    for t in anchor.terms.values():
        t.Aref = None
    assert anchor.penalty(model).item() > 1e4 * max(lean, 1e-30)


@pytest.mark.parametrize("frame", LOW)
@pytest.mark.parametrize("full_rank_as, n_full", [("eq3", 0), ("l2", 2)])
@pytest.mark.numerics
def test_closed_form_matches_autograd_and_brute_force(model, frame, full_rank_as, n_full):
    W0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    # full rank on the non-square k_proj: Eq. 3 on lean full-rank bases, or ‖W − W0‖² with "l2"
    anchor = RotationAnchor.from_model(model, rank={"k_proj": 1.0, "*": 6}, frame_dtype=frame,
                                       full_rank_as=full_rank_as)
    assert sum(t.full for t in anchor.terms.values()) == n_full
    perturb_(model)
    R, r, rel = autograd_vs_closed_form(anchor, model)
    params = dict(model.named_parameters())
    assert r == pytest.approx(R, rel=1e-6)
    for name, e in rel.items():
        assert e < 1e-5, name
    # R = ‖U_lᵀ(W − W0)V_l‖² on the stored frames, in fp64
    expected = 0.0
    for name, t in anchor.terms.items():
        D = params[name].detach().double() - W0[name].double()
        expected += float(D.pow(2).sum()) if t.full else float((t.U.double().T @ D @ t.V.double()).pow(2).sum())
    assert r == pytest.approx(expected, rel=1e-4) and expected > 1e-3


@pytest.mark.parametrize("frame, tol", [(torch.bfloat16, 1e-2), (torch.float16, 1.5e-3)])
@pytest.mark.numerics
def test_gradient_close_to_fp32_frames(model, frame, tol):
    ref = RotationAnchor.from_model(model, rank=8)
    lean = RotationAnchor.from_model(model, rank=8, frame_dtype=frame)
    perturb_(model, scale=1e-3)
    grads = []
    for a in (ref, lean):
        model.zero_grad(set_to_none=True)
        a.accumulate_grad_(model)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if n in a.terms})
    errs = [float((grads[1][n] - g).norm() / g.norm()) for n, g in grads[0].items()]
    assert max(errs) < tol
    assert min(errs) > 0  # the frames really differ


def test_nbytes_formula(model):
    rank = {"k_proj": 1.0, "v_proj": 0.5, "*": 5}
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    full = RotationAnchor.from_model(model, rank=rank)
    for frame in (None, *LOW):
        anchor = RotationAnchor.from_model(model, rank=rank, frame_dtype=frame)
        want = 0
        for name, t in anchor.terms.items():
            m, n = shapes[name]
            if t.full:
                want += m * n * 4
            else:
                want += (m + n + 1) * t.k * 4 if frame is None else (m + n) * t.k * 2 + t.k * 4 + t.k ** 2 * 2
        assert anchor.nbytes == want, frame
        # and the by-shape formula used for the 7B/8B projections in docs/math.md
        by_k = {}
        for name, t in anchor.terms.items():
            by_k.setdefault(t.k if not t.full else 10 ** 6, []).append(shapes[name])
        assert sum(anchor_nbytes(s, k, frame) for k, s in by_k.items()) == want
    assert RotationAnchor.from_model(model, rank=rank, frame_dtype="bf16").nbytes < full.nbytes


def test_frame_dtype_spellings():
    assert parse_frame_dtype(None) is None and parse_frame_dtype("fp32") is None
    assert parse_frame_dtype(torch.float32) is None
    assert parse_frame_dtype("bf16") is parse_frame_dtype("bfloat16") is torch.bfloat16
    assert parse_frame_dtype("fp16") is parse_frame_dtype(torch.float16) is torch.float16
    for bad in ("int8", torch.float64, "fp8"):
        with pytest.raises(ValueError, match="frame_dtype .* use fp32 \\(default\\), bf16 or fp16"):
            parse_frame_dtype(bad)
    with pytest.raises(ConfigError, match="anchor.frame_dtype must be fp32, bf16 or fp16, got 'fp8'"):
        load_config(None, ["anchor.frame_dtype=fp8"])
    assert load_config(None, []).anchor.frame_dtype == "fp32"  # the default stays full precision


def gapped(seed=0, m=96, n=64):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    S = torch.linspace(5, 0.1, n, dtype=torch.float64)
    return ((U * S) @ V.T).float()


def test_cache_round_trip_nested_k_and_probe(tmp_path, monkeypatch, caplog):
    W = gapped()
    cache = BasesCache(tmp_path)
    b16 = get_lean_bases(W, 16, torch.bfloat16, cache=cache)
    lean_files = list(tmp_path.glob("*-exact-bf16.safetensors"))
    assert len(lean_files) == 1 and len(list(tmp_path.glob("*.safetensors"))) == 2  # + the fp32 bases
    with safe_open(str(lean_files[0]), "pt") as f:
        assert f.get_tensor("U").dtype == torch.bfloat16 and f.get_tensor("A").shape == (16, 16)
        assert f.get_tensor("A").dtype == torch.float16 and f.get_tensor("S").dtype == torch.float32
        assert f.metadata()["frame"] == "bf16"

    def boom(*a, **k):
        raise AssertionError("recomputed although the lean cache entry covers k")

    monkeypatch.setattr(bases, "compute_bases", boom)
    monkeypatch.setattr(frames, "lean_bases", boom)
    again = get_lean_bases(W, 16, torch.bfloat16, cache=cache)
    assert torch.equal(again.U, b16.U) and torch.equal(again.V, b16.V) and torch.equal(again.A, b16.A)
    b8 = get_lean_bases(W, 8, torch.bfloat16, cache=cache)  # nested k: leading columns and leading block
    assert torch.equal(b8.U, b16.U[:, :8]) and torch.equal(b8.A, b16.A[:8, :8]) and torch.equal(b8.S, b16.S[:8])
    monkeypatch.undo()

    # A damaged A_ref passes every metadata check; the probe against U_lᵀ W0 V_l catches it.
    with safe_open(str(lean_files[0]), "pt") as f:
        meta, t = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    t["A"] = t["A"].clone()
    t["A"][3, 5] += 1e-2
    save_file(t, str(lean_files[0]), metadata=meta)
    caplog.set_level("WARNING")
    fixed = get_lean_bases(W, 16, torch.bfloat16, cache=cache)
    assert any("A_ref does not match" in r.message for r in caplog.records)
    assert torch.equal(fixed.A, b16.A)
    # a different frame dtype is a different entry, never the bf16 one
    f16 = get_lean_bases(W, 16, torch.float16, cache=cache)
    assert f16.U.dtype == torch.float16 and len(list(tmp_path.glob("*.safetensors"))) == 3


def test_offdiag_falls_back_to_fp32_on_overflow_or_rounding_error(model, monkeypatch):
    S = torch.tensor([3.0, 2.0, 1.0])
    off = torch.tensor([[0.0, 1e-3, -2e-4], [5e-4, 0.0, 1e-5], [-1e-3, 3e-4, 0.0]])
    kept = store_offdiag(off, S)
    assert kept.dtype == torch.float16  # small entries: fp16, with an error far below OFFDIAG_TOL·‖σ‖²
    assert float((kept.double() - off.double()).pow(2).sum()) <= OFFDIAG_TOL * 14.0
    big = off.clone()
    big[0, 2] = 1e5  # beyond fp16's 65504
    assert store_offdiag(big, S).dtype == torch.float32 and torch.equal(store_offdiag(big, S), big)
    assert store_offdiag(off, S * 1e-5).dtype == torch.float32  # rounding error too large against a tiny ‖σ‖²
    assert store_offdiag(kept.float(), S).dtype == torch.float16  # received fp16 values: the same decision again

    lean = RotationAnchor.from_model(model, rank=6, frame_dtype="bf16")
    monkeypatch.setattr(frames, "OFFDIAG_TOL", 0.0)  # every matrix falls back
    fallback = RotationAnchor.from_model(model, rank=6, frame_dtype="bf16")
    assert {t.Aref.dtype for t in fallback.terms.values()} == {torch.float32}
    assert fallback.nbytes == lean.nbytes + sum(t.k ** 2 * 2 for t in lean.terms.values())
    for x, y in zip(lean.terms.values(), fallback.terms.values()):
        assert torch.equal(x.Aref.float(), y.Aref.half().float()) and torch.equal(x.S, y.S)
    sigma_sq = sum(t.ref_sq for t in lean.terms.values())
    assert fallback.penalty(model).item() < 1e-10 * sigma_sq and lean.penalty(model).item() < 1e-10 * sigma_sq


def test_lean_anchor_follows_the_model_to_another_device(model):
    from .test_placement import DeviceLog

    anchor = RotationAnchor.from_model(model, rank={"down_proj": 1.0, "*": 4}, frame_dtype="bf16")
    dtypes = {n: [x.dtype for x in t.tensors()] for n, t in anchor.terms.items()}
    model.to("meta")
    assert anchor.penalty(model, record=True).device.type == "meta"
    with DeviceLog() as log:
        r = anchor.accumulate_grad_(model, weight=0.5)
    assert [(op, d) for op, d in log.devices if d - {"meta"}] == []  # upcasts and A_ref made on the device too
    assert r != r  # meta holds no values
    assert {x.device.type for t in anchor.terms.values() for x in t.tensors()} == {"meta"}
    assert {n: [x.dtype for x in t.tensors()] for n, t in anchor.terms.items()} == dtypes  # storage dtypes kept
    assert any(t.Aref is not None and t.Aref.dtype == torch.float16 for t in anchor.terms.values())
    for name, p in model.named_parameters():
        if name in anchor.terms:
            assert p.grad is not None and p.grad.device.type == "meta", name


def test_from_model_through_the_cache_is_identical(model, tmp_path):
    a = RotationAnchor.from_model(model, rank=6, frame_dtype="fp16", cache_dir=tmp_path)
    b = RotationAnchor.from_model(model, rank=6, frame_dtype="fp16", cache_dir=tmp_path)
    for x, y in zip(a.terms.values(), b.terms.values()):
        assert torch.equal(x.U, y.U) and torch.equal(x.V, y.V) and torch.equal(x.Aref, y.Aref)
    assert a.penalty(model).item() < 1e-10 * sum(t.ref_sq for t in a.terms.values())


def test_lean_frames_train_closed_form_equals_per_microbatch_autograd(tiny_model_dir, synth_data, tmp_path):
    sgd = ("train.optim=sgd", "train.lr=0.5", "anchor.frame_dtype=bf16")
    ours, trainer = run_trainer(AnchoredSFTTrainer, cfg_for(tiny_model_dir, synth_data, tmp_path / "a", *sgd))
    assert trainer.anchor.frame_dtype == torch.bfloat16
    ref, _ = run_trainer(PerMicroBatchPenalty, cfg_for(tiny_model_dir, synth_data, tmp_path / "b", *sgd))
    assert max_rel_diff(ours, ref) < 1e-5
    logged = [h["rpsft/penalty"] for h in trainer.state.log_history if "rpsft/penalty" in h]
    assert len(logged) == 3 and logged[0] < 1e-8 < logged[-1]  # zero at W0, then the drift is penalised


def test_lean_frames_with_period(tiny_model_dir, synth_data, tmp_path):
    cfg = cfg_for(tiny_model_dir, synth_data, tmp_path / "p", "anchor.period=2", "train.max_steps=3",
                  "anchor.frame_dtype=fp16")
    _, trainer = run_trainer(AnchoredSFTTrainer, cfg)
    assert [h["step"] for h in trainer.state.log_history if "rpsft/penalty" in h] == [1, 3]


def test_flops_memory_model_uses_the_same_formula():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "flops.py"
    spec = importlib.util.spec_from_file_location("bench_flops_frames", path)
    flops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flops)
    hidden, inter, layers, heads, kv, hd, *_ = flops.SHAPES["qwen2.5-7b"]
    shapes = list(flops.projections(hidden, inter, heads, kv, hd).values()) * layers
    r = flops.model_numbers("qwen2.5-7b", 768, tokens=16 * 4096, seq=4096, period=1, mfu=0.4)
    assert r["anchor_bytes"] == anchor_nbytes(shapes, 768)
    assert r["anchor_bytes_lean_frames"] == anchor_nbytes(shapes, 768, torch.bfloat16)
    r = flops.model_numbers("qwen2.5-7b", 768, tokens=16 * 4096, seq=4096, period=1, mfu=0.4, full_rank="eq3")
    assert r["anchor_bytes"] == anchor_nbytes(shapes, 768, full_rank_as="eq3")
    assert r["anchor_bytes_lean_frames"] == anchor_nbytes(shapes, 768, torch.bfloat16, full_rank_as="eq3")
    # k/v (512×3584) are clipped to k = 512: the paper's rule (default) keeps W0, lean frames or not; eq3 keeps their
    # full-rank bases
    assert anchor_nbytes([(512, 3584)], 768, torch.bfloat16) == 512 * 3584 * 4
    assert anchor_nbytes([(512, 3584)], 768, torch.bfloat16, full_rank_as="eq3") == \
        (512 + 3584) * 512 * 2 + 512 * 4 + 512 ** 2 * 2
