"""Precision strategies of the anchor residual (benchmarks/precision_strategies.py) on small matrices with a
realistic drift."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from rpsft.bases import compute_bases
from rpsft.precision import ieee_fp32

_spec = importlib.util.spec_from_file_location(
    "precision_strategies", Path(__file__).resolve().parents[2] / "benchmarks" / "precision_strategies.py")
_strategies = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_strategies)
STRATEGIES, gradient, matmul, relative_errors, residual, round_tf32 = (
    _strategies.STRATEGIES, _strategies.gradient, _strategies.matmul, _strategies.relative_errors,
    _strategies.residual, _strategies.round_tf32)


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


def test_fp64_is_the_reference_and_exact(setup):
    U, S, V, W = setup
    e = relative_errors(U, S, V, W, "fp64")
    assert e["R"] == 0.0 and e["grad"] == 0.0
    # and it agrees with the textbook formula computed independently in fp64
    A = U.double().T @ W.double() @ V.double() - torch.diag(S.double())
    assert torch.allclose(residual(U, S, V, W, "fp64"), A, rtol=0, atol=1e-14)
    assert torch.allclose(gradient(U, A, V, "fp64"), 2 * U.double() @ A @ V.double().T, rtol=0, atol=1e-14)


def test_error_ordering_matches_mantissa_bits(setup):
    U, S, V, W = setup
    err = {s: relative_errors(U, S, V, W, s) for s in STRATEGIES}
    # plain bf16 (8 bits) and tf32 (11 bits) lose A entirely: errors of order one or worse
    assert err["bf16"]["R"] > 1 and err["tf32"]["R"] > 0.1
    # the compensated bf16 split is far closer to fp64 than plain bf16, and fp32 closer still
    assert err["bf16x3"]["R"] < err["bf16"]["R"] / 100
    assert err["bf16x3"]["grad"] < err["bf16"]["grad"] / 10
    assert err["fp32"]["R"] < err["bf16x3"]["R"]
    # 3xTF32 carries ~22 mantissa bits: within a small factor of fp32, and orders better than plain tf32
    assert err["tf32x3"]["R"] < 10 * err["fp32"]["R"] + 1e-6
    assert err["tf32x3"]["R"] < err["tf32"]["R"] / 100
    assert err["fp32"]["R"] < 1e-2 and err["fp32"]["grad"] < 1e-1


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
    a, b = torch.randn(40, 50, generator=g), torch.randn(50, 30, generator=g)
    ref = a.double() @ b.double()

    def err(s):
        return float((matmul(a, b, s).double() - ref).norm() / ref.norm())

    assert err("bf16x3") < err("bf16") / 50
    assert err("tf32x3") < err("tf32") / 50
    assert err("fp64") < 1e-15


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
