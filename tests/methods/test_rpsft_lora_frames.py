"""RPSFT-on-LoRA with lean (bf16) frames: U_lᵀ(W0 + s·BA)V_l − A_ref = s·(U_lᵀB)(AV_l) exactly, so the factored
anchor needs only the rounded frames; it equals the dense lean anchor on the merged weight, value and gradient."""

from __future__ import annotations

import pytest
import torch

from rpsft.anchor import RotationAnchor
from rpsft.methods.lora import wrap_lora
from rpsft.methods.rpsft_lora import LoraRotationAnchor

from .test_rpsft_lora import RANKS, close, effective


@pytest.mark.numerics
def test_factored_lean_equals_dense_lean(make_cfg, tiny_model_dir):
    from rpsft.models import load_model

    cfg = make_cfg("rpsft_lora", "lora.r=8", "lora.alpha=24", "anchor.frame_dtype=bf16")
    model, _ = load_model(str(tiny_model_dir))
    dense = RotationAnchor.from_model(model, rank=RANKS, frame_dtype=cfg.anchor.frame_dtype)
    peft = wrap_lora(model, cfg)
    fact = LoraRotationAnchor.from_dense(dense, peft)  # its build check measures U_lᵀW0V_l − A_ref
    assert fact.penalty(peft).item() == 0.0  # B = 0: the factored form is exactly zero at W0
    torch.manual_seed(1)
    lora = {n: p for n, p in peft.named_parameters() if "lora_" in n}
    for p in lora.values():
        p.data.normal_(0, 0.3)
    low = [t for t in fact.terms.values() if not t.full]
    assert low and all(t.U.dtype == torch.bfloat16 for t in low)
    # memory: the rounded frames and σ only — no A_ref, no W0
    assert fact.nbytes == sum(t.U.numel() * 2 + t.V.numel() * 2 + t.S.numel() * 4 for t in low)

    W = effective(peft)
    ref = sum(dense._residual(t, W[n]).pow(2).sum() for n, t in dense.terms.items())
    ref.backward()
    g_dense = {n: p.grad.clone() for n, p in lora.items()}
    for p in lora.values():
        p.grad = None
    r = fact.accumulate_grad_(peft, weight=1.0)
    assert r == pytest.approx(ref.item(), rel=1e-5) and r > 1e-2
    for n, p in lora.items():
        assert close(p.grad, g_dense[n]), n
