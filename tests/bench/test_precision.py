"""Precision strategies of the anchor residual (benchmarks/precision_strategies.py) on small matrices with a
realistic drift.

Every threshold here follows from the formats, not from one machine's BLAS: a kernel (AVX2, AVX-512, AMX, a thread
count) changes the order of each sum, never a format's unit roundoff u = 2^-p. The error model is the probabilistic
one of Higham & Mary (SIAM J. Sci. Comput. 2019): roundings are independent, each a relative error of at most u, so
K of them along an inner product grow like √K·u (any summation order), not K·u. Round-to-nearest of an arbitrary
value has a relative error of rms ≥ u/√12 (uniform over half an ulp, the ulp being ≥ u·|x|).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from rpsft.bases import compute_bases
from rpsft.precision import ieee_fp32

pytestmark = pytest.mark.numerics

_spec = importlib.util.spec_from_file_location(
    "precision_strategies", Path(__file__).resolve().parents[2] / "benchmarks" / "precision_strategies.py")
_strategies = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_strategies)
STRATEGIES, gradient, matmul, relative_errors, residual, round_tf32 = (
    _strategies.STRATEGIES, _strategies.gradient, _strategies.matmul, _strategies.relative_errors,
    _strategies.residual, _strategies.round_tf32)

# Significand bits p (u = 2^-p) of each strategy's arithmetic: fp32 24, tf32 11, bf16 8 (the implicit bit included).
# A compensated split x = hi + lo in a p-bit format leaves |x − hi − lo| ≤ u·|x − hi| ≤ u²·|x|: 2p bits.
BITS = {"fp32": 24, "tf32x3": 22, "bf16x3": 16, "tf32": 11, "bf16": 8}
PLAIN, COMPENSATED = ("tf32", "bf16"), ("tf32x3", "bf16x3")


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(0)
    m, n, k = 96, 64, 16
    # a spread spectrum like a trained projection: σ from ~8 down to ~0.1
    Q1, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.logspace(0.9, -1, n, dtype=torch.float64)
    W0 = ((Q1 * s) @ Q2.T).float()
    b = compute_bases(W0, k)
    # ten AdamW-like steps at lr 1e-6: |ΔW| ≈ 1e-5, the regime where A is a tiny difference of large numbers
    W = (W0.double() + 1e-5 * torch.randn(m, n, generator=g, dtype=torch.float64)).float()
    return b.U, b.S, b.V, W


def _gamma64(K: int) -> float:
    """γ_K = K·u/(1 − K·u) for fp64: |fl(XY) − XY| ≤ γ_K·|X||Y| entry-wise for an inner dimension K, in any summation
    order (Higham, Accuracy and Stability of Numerical Algorithms, 2002, Eq. 3.13)."""
    u = 2.0 ** -53
    return K * u / (1 - K * u)


def test_fp64_is_the_reference_and_exact(setup):
    U, S, V, W = setup
    (m, n), k = W.shape, S.numel()
    Ud, Wd, Vd = U.double(), W.double(), V.double()
    A = Ud.T @ Wd @ Vd - torch.diag(S.double())  # the textbook formula, computed independently in fp64
    # two fp64 evaluations of U_kᵀWV_k (inner dimensions m, then n) each lie within γ_{m+n}·|U_k|ᵀ|W||V_k| of the exact
    # product; subtracting σ_k ≈ the diagonal is exact (Sterbenz)
    bound_A = 2 * _gamma64(m + n) * (Ud.abs().T @ Wd.abs() @ Vd.abs())
    assert ((residual(U, S, V, W, "fp64") - A).abs() <= bound_A).all()
    bound_G = 2 * _gamma64(2 * k) * 2 * (Ud.abs() @ A.abs() @ Vd.abs().T)  # 2·U_k A V_kᵀ: inner dimensions k, k
    assert ((gradient(U, A, V, "fp64") - 2 * Ud @ A @ Vd.T).abs() <= bound_G).all()
    # as the reference of relative_errors it is exact to that bound: δ = ‖ΔA‖/‖A‖ ≤ ‖bound_A‖/‖A‖ ≈ 4e-8 here, and
    # R's relative error is at most 2δ + δ² (see test_error_ordering_matches_mantissa_bits)
    e = relative_errors(U, S, V, W, "fp64")
    d = float(bound_A.norm() / A.norm())
    assert d < 1e-6 and e["R"] <= 2 * d + d * d and e["grad"] <= d + float(bound_G.norm() / (2 * A.norm()))


def test_error_ordering_matches_mantissa_bits(setup):
    """Each strategy's error of A lies between bounds set by its format's bits p, the shapes m, n, k and the drift's
    size alone; the ordering of the precision table follows where one format's upper bound is below another's lower
    bound."""
    U, S, V, W = setup
    (m, n), k = W.shape, S.numel()
    A = residual(U, S, V, W, "fp64")
    norm_A = float(A.norm())  # the drift: ~1e-4 against entries of size σ ≤ 8
    norm_T = float((A + torch.diag(S.double())).norm())  # U_kᵀWV_k, the block every strategy rounds
    norm_W = float(W.double().norm())
    err = {s: relative_errors(U, S, V, W, s) for s in BITS}
    delta = {s: float((residual(U, S, V, W, s).double() - A).norm()) / norm_A for s in BITS}  # ‖Â − A‖ / ‖A‖

    # Upper: each entry of A goes through at most m + n + 6 roundings of at most u (one per partial sum of the m-term
    # sums of U_kᵀW and the n-term sums against V_k, the two products' terms, the operands U_k, W, U_kᵀW, V_k, the
    # result), and each stage rounds a matrix of Frobenius norm ≤ ‖W‖_F (a partial sum of U_kᵀW or (U_kᵀW)V_k takes
    # rows of orthonormal U_k, V_k): rms ‖Â − A‖ ≤ √(m + n + 6)·u·‖W‖_F. A compensated strategy's fp32 sums count
    # (2^-24/u)² of a stage each, fewer in all than m + n.
    hi = {s: math.sqrt(m + n + 6) * 2.0 ** -p * norm_W / norm_A for s, p in BITS.items()}
    # Lower, where the operands' rounding dominates and no kernel can change it: a p-bit rounding of U_k, of U_kᵀW and
    # of V_k moves A by rms ρ·‖T‖·√(k/m), √(k/n), √(k/n) (a row of U_k carries k/m of its squared norm on average,
    # one of V_k k/n), with ρ ≥ u/√12 for a plain format; a split's remainder is the rounding error of lo applied to
    # x − hi, itself a rounding error: ρ ≥ (u/√12)² = 2^-2p/12, the 2p of BITS.
    spread = math.sqrt(k / m + 2 * k / n)
    lo = {**{s: 2.0 ** -BITS[s] / math.sqrt(12) * spread * norm_T / norm_A for s in PLAIN},
          **{s: 2.0 ** -BITS[s] / 12 * spread * norm_T / norm_A for s in COMPENSATED}}
    for s in BITS:
        assert delta[s] <= hi[s], (s, delta[s], hi[s])
    for s in lo:
        assert delta[s] >= lo[s], (s, delta[s], lo[s])

    # fp32 (24 bits) beats the compensated bf16 split (16), which beats plain bf16 (8); 3xTF32 (22) beats plain tf32
    # (11): 8 and 11 bits apart, more than the bounds' width
    assert delta["fp32"] <= hi["fp32"] < lo["bf16x3"] <= delta["bf16x3"] <= hi["bf16x3"] < lo["bf16"] <= delta["bf16"]
    assert delta["tf32x3"] <= hi["tf32x3"] < lo["tf32"] <= delta["tf32"]
    # 3xTF32 is within 2^(24-22) = 4 of fp32's bound; plain bf16 and tf32 lose A entirely (an error over twice A)
    assert hi["tf32x3"] == pytest.approx(4 * hi["fp32"]) and lo["tf32"] > 2 and lo["bf16"] > 2

    for s, d in delta.items():
        # R̂ − R = 2⟨A, Â − A⟩ + ‖Â − A‖²: R's relative error lies in [δ² − 2δ, δ² + 2δ] (Cauchy–Schwarz); the
        # sign of ⟨A, Â − A⟩ is luck, so R's error alone fits no bound tighter than this
        assert d * d - 2 * d - 1e-9 <= err[s]["R"] <= d * d + 2 * d + 1e-9, (s, d, err[s]["R"])
        # ∇R = 2·U_k Â V_kᵀ: Â's error passes through orthonormal U_k, V_k unchanged in norm; the product adds its
        # own roundings, at most the upper bound's unit times ‖Â‖ ≤ (1 + δ)‖A‖
        assert abs(err[s]["grad"] - d) <= math.sqrt(m + n + 6) * 2.0 ** -BITS[s] * (1 + d), (s, d, err[s]["grad"])


def test_round_tf32_keeps_ten_mantissa_bits():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(1))
    r = round_tf32(x)
    assert (r.view(torch.int32) & 0x1FFF).eq(0).all()  # the 13 low mantissa bits are cleared
    rel = ((r - x).abs() / x.abs()).max().item()
    assert 2**-13 < rel <= 2**-11  # round-to-nearest at 10 explicit bits, and it really rounds
    assert torch.equal(round_tf32(r), r)  # idempotent
    assert torch.isinf(round_tf32(torch.tensor([float("inf")]))).all()


def test_compensated_matmul_beats_plain_lowp():
    g = torch.Generator().manual_seed(2)
    K = 50
    a, b = torch.randn(40, K, generator=g), torch.randn(K, 30, generator=g)
    ref = a.double() @ b.double()

    def err(s):
        return float((matmul(a, b, s).double() - ref).norm() / ref.norm())

    # Gaussian operands: relative perturbations of rms ρ of one operand's entries move ab by ≈ ρ‖ab‖. Plain: both
    # operands are rounded, ρ ≥ u/√12 each. Compensated: the two splits (≤ 2^-2p each) and the K-term fp32 sums,
    # K + 2 stages of at most 2^-2p (module docstring).
    for plain, comp in (("bf16", "bf16x3"), ("tf32", "tf32x3")):
        lo = math.sqrt(2 / 12) * 2.0 ** -BITS[plain]
        hi = math.sqrt(K + 2) * 2.0 ** -BITS[comp]
        assert err(comp) <= hi < lo <= err(plain), (comp, err(comp), hi, plain, err(plain), lo)
    # fp64 against the same product in fp64: within γ_K·|a||b| of the exact one each (see _gamma64)
    assert err("fp64") <= 2 * _gamma64(K) * float((a.double().abs() @ b.double().abs()).norm() / ref.norm())


def test_ieee_context_restores_setting_and_unknown_strategy_is_named():
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        with ieee_fp32():
            assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
    with pytest.raises(ValueError, match="fp16x9.*fp64"):
        matmul(torch.ones(2, 2), torch.ones(2, 2), "fp16x9")
