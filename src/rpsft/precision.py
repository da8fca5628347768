"""IEEE fp32 matmuls for the anchor: the residual A = U_kᵀ W V_k − diag σ_k is a difference of large, nearly equal
numbers, so every mantissa bit a matmul drops lands in A (the strategies compared, and their table, are in
``benchmarks/precision.py`` and docs/math.md)."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def ieee_fp32():
    """Force IEEE fp32 matmuls inside the block (TF32 off), restoring the caller's setting afterwards.

    ``TrainingArguments(tf32=True)`` or ``torch.set_float32_matmul_precision("high")`` switch every CUDA fp32
    matmul to TF32 (10-bit mantissa) — including the anchor's, where it would silently turn A into rounding noise
    (see the tf32 row of the precision table). The anchor must run its products inside this context.
    """
    # torch >= 2.9: per-backend ``fp32_precision`` ("ieee" | "tf32" | "bf16" on oneDNN). Only the new API is used
    # when it exists: reading the legacy ``allow_tf32`` after the new one was set raises in torch 2.9+.
    backends = [b for b in (torch.backends.cuda.matmul, getattr(getattr(torch.backends, "mkldnn", None), "matmul",
                                                                  None)) if hasattr(b, "fp32_precision")]
    if backends:
        saved = [b.fp32_precision for b in backends]
        try:
            for b in backends:
                b.fp32_precision = "ieee"
            yield
        finally:
            for b, v in zip(backends, saved):
                b.fp32_precision = v
        return
    prev = torch.backends.cuda.matmul.allow_tf32  # torch < 2.9
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
