"""Arithmetic strategies for the anchor residual A = U_kᵀ W V_k − diag σ_k and its gradient 2·U_k A V_kᵀ.

Why this needs care: the entries of U_kᵀ W V_k are of the size of σ (≈ 1–30 on the embedded SmolLM2,
de-quantised from Q4_1: docs/eval.md), while after a few steps at lr 1e-6 the true A is of the size of the drift
(≈ 1e-6–1e-4). A is a difference of large, nearly equal numbers, so every bit the matmul drops from U_kᵀ W V_k
lands in A. This module implements the strategies compared in ``benchmarks/precision.py`` (table in docs/math.md):

``fp64``    operands cast to float64 (the reference; exact up to 1e-16 relative)
``fp32``    IEEE fp32 matmuls with TF32 forced off (:func:`rpsft.precision.ieee_fp32`)
``tf32``    TF32 tensor-core matmul: operands rounded to a 10-bit mantissa, fp32 accumulation. Emulated on CPU
            (bit-exact rounding of the inputs, fp32 accumulation), so its accuracy is measurable here, its speed not.
``tf32x3``  compensated TF32 (hi/lo split, hi·hi + hi·lo + lo·hi), emulated likewise
``bf16``    plain bf16 matmul (bf16 operands and bf16 result, as under autocast)
``bf16x3``  compensated bf16: x = hi + lo with hi = bf16(x), lo = bf16(x − hi); hi·hi + hi·lo + lo·hi with fp32
            accumulation and an fp32 result (``torch.mm(..., out_dtype=float32)`` on CUDA; on CPU the bf16 operands
            are multiplied in fp32, which is exact for the 8-bit × 8-bit products and accumulates in fp32 — the same
            arithmetic as a bf16 tensor core with fp32 accumulation)

All functions take the bases as stored by :class:`rpsft.anchor.RotationAnchor` (fp32 U, σ, V) and a weight W of
any dtype, and associate the chain so that the second product runs over the smaller side, as the anchor does.
"""

from __future__ import annotations

from typing import Callable

import torch

from rpsft.precision import ieee_fp32

STRATEGIES = ("fp64", "fp32", "tf32", "tf32x3", "bf16", "bf16x3")
EMULATED_ON_CPU = ("tf32", "tf32x3")  # accuracy is emulated bit-exactly on CPU; speed needs a CUDA tensor core


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values to TF32 (1 sign, 8 exponent, 10 mantissa bits), round-to-nearest-even, kept as fp32."""
    i = x.float().contiguous().view(torch.int32)
    lsb = (i >> 13) & 1
    r = (i + 0x0FFF + lsb) & ~0x1FFF
    out = r.view(torch.float32)
    return torch.where(torch.isfinite(x.float()), out, x.float())


def _split(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x ≈ hi + lo, each representable in ``fmt`` ("bf16" or "tf32"); hi + lo carries ~2× the mantissa bits."""
    x = x.float()
    if fmt == "bf16":
        hi = x.to(torch.bfloat16)
        lo = (x - hi.float()).to(torch.bfloat16)
    else:
        hi = round_tf32(x)
        lo = round_tf32(x - hi)
    return hi, lo


def _mm_lowp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Product of two low-precision operands with fp32 accumulation and an fp32 result."""
    if a.dtype == torch.bfloat16 and a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    with ieee_fp32():  # bf16/tf32 values are exact in fp32; products of two of them are exact in fp32 too
        return a.float() @ b.float()


def _mm_compensated(a: torch.Tensor, b: torch.Tensor, fmt: str) -> torch.Tensor:
    ah, al = _split(a, fmt)
    bh, bl = _split(b, fmt)
    # smallest terms first: lo·hi and hi·lo are ~2^-8 (bf16) / 2^-11 (tf32) of hi·hi
    return _mm_lowp(al, bh) + _mm_lowp(ah, bl) + _mm_lowp(ah, bh)


def matmul(a: torch.Tensor, b: torch.Tensor, strategy: str) -> torch.Tensor:
    """a @ b under ``strategy``; the result is fp64 for ``fp64`` and fp32 otherwise (bf16 is upcast after)."""
    if strategy == "fp64":
        return a.double() @ b.double()
    if strategy == "fp32":
        with ieee_fp32():
            return a.float() @ b.float()
    if strategy == "tf32":
        return _mm_lowp(round_tf32(a), round_tf32(b))
    if strategy == "bf16":
        return (a.to(torch.bfloat16) @ b.to(torch.bfloat16)).float()
    if strategy == "bf16x3":
        return _mm_compensated(a, b, "bf16")
    if strategy == "tf32x3":
        return _mm_compensated(a, b, "tf32")
    raise ValueError(f"unknown precision strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def residual(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, W: torch.Tensor, strategy: str = "fp32"
             ) -> torch.Tensor:
    """A = U_kᵀ W V_k − diag σ_k (k×k) under ``strategy``; the subtraction of σ is done in the result's dtype."""
    m, n = W.shape
    if n <= m:
        T = matmul(matmul(U.T, W, strategy), V, strategy)
    else:
        T = matmul(U.T, matmul(W, V, strategy), strategy)
    return T - torch.diag_embed(S.to(T.dtype))


def gradient(U: torch.Tensor, A: torch.Tensor, V: torch.Tensor, strategy: str = "fp32") -> torch.Tensor:
    """∇_W ‖A‖² = 2·U_k A V_kᵀ (m×n) under ``strategy``."""
    m, n = U.shape[0], V.shape[0]
    if m <= n:
        G = matmul(matmul(U, A, strategy), V.T, strategy)
    else:
        G = matmul(U, matmul(A, V.T, strategy), strategy)
    return 2.0 * G


def penalty_and_grad(U, S, V, W, strategy: str = "fp32") -> tuple[float, torch.Tensor]:
    """(R = ‖A‖²_F accumulated in fp64, ∇R) for one matrix under ``strategy``."""
    A = residual(U, S, V, W, strategy)
    return float(A.double().pow(2).sum()), gradient(U, A, V, strategy)


def relative_errors(U, S, V, W, strategy: str, ref: tuple[float, torch.Tensor] | None = None) -> dict[str, float]:
    """Relative error of R and of ∇R (Frobenius) under ``strategy`` against the fp64 computation."""
    r_ref, g_ref = ref if ref is not None else penalty_and_grad(U, S, V, W, "fp64")
    r, g = penalty_and_grad(U, S, V, W, strategy)
    g_norm = float(g_ref.norm())
    return {"R": abs(r - r_ref) / max(r_ref, 1e-300),
            "grad": float((g.double() - g_ref).norm()) / max(g_norm, 1e-300)}


def strategy_fn(strategy: str) -> Callable[..., tuple[float, torch.Tensor]]:
    """A callable (U, S, V, W) -> (R, ∇R) for timing loops."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown precision strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    return lambda U, S, V, W: penalty_and_grad(U, S, V, W, strategy)
