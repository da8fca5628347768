import math

import numpy as np
import pytest
import scipy.linalg
import torch

from rpsft.analysis.rotation import matrix_rotation, mean_angle_deg, principal_angles, rank_grid, rankwise, top_subspaces

pytestmark = pytest.mark.numerics  # floating-point thresholds: `make test` repeats these under other kernels


def _orth(m, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]


@pytest.mark.parametrize("m,ka,kb", [(20, 5, 5), (30, 8, 3), (30, 3, 8), (12, 12, 12), (50, 10, 10)])
def test_principal_angles_match_scipy_random(m, ka, kb):
    A, B = _orth(m, ka, 1), _orth(m, kb, 2)
    ours = principal_angles(A, B).numpy()
    ref = np.sort(scipy.linalg.subspace_angles(A.numpy(), B.numpy()))
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-10)


@pytest.mark.parametrize("eps", [1e-3, 1e-6, 1e-9])
def test_principal_angles_match_scipy_small_angles(eps):
    # nearby subspaces: the regime of fine-tuning, where arccos alone would lose the angles
    A = _orth(40, 6, 3)
    B = torch.linalg.qr(A + eps * torch.randn(40, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64))[0]
    ours = principal_angles(A, B).numpy()
    ref = np.sort(scipy.linalg.subspace_angles(A.numpy(), B.numpy()))
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-14)
    assert ours.max() > 0  # not flushed to zero


def test_known_angle_and_invariance():
    th = 0.3
    A = torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64)
    B = torch.tensor([[math.cos(th)], [math.sin(th)], [0.0]], dtype=torch.float64)
    assert principal_angles(A, B).item() == pytest.approx(th, abs=1e-12)
    # a rotation inside the subspace (different basis, same span) gives zero angles
    Q = _orth(25, 7, 5)
    R = _orth(7, 7, 6)
    assert mean_angle_deg(Q, Q @ R) == pytest.approx(0.0, abs=1e-6)


def test_principal_angles_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="same m"):
        principal_angles(torch.zeros(4, 2), torch.zeros(5, 2))


def test_matrix_rotation_detects_rotated_frame():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 16, generator=g, dtype=torch.float64)
    assert matrix_rotation(W, W.clone(), K=8)["u_mean_deg"] == pytest.approx(0.0, abs=1e-6)
    # W' = Q W with Q a rotation of the output space: U turns by Q, V stays
    Q = _orth(24, 24, 7)
    rot = matrix_rotation(W, Q @ W, K=8)
    Ub, _ = top_subspaces(W, 8)
    expected = mean_angle_deg(Ub, Q @ Ub)
    assert rot["u_mean_deg"] == pytest.approx(expected, rel=1e-6)
    assert rot["u_mean_deg"] > 5
    assert rot["v_mean_deg"] == pytest.approx(0.0, abs=1e-5)
    assert rot["K"] == 8
    # K is capped at min(m, n); U of a wide matrix spans the whole output space, so its angle is 0
    wide = torch.randn(6, 20, generator=g, dtype=torch.float64)
    r2 = matrix_rotation(wide, wide + 0.1 * torch.randn(6, 20, generator=g, dtype=torch.float64), K=512)
    assert r2["K"] == 6 and r2["u_mean_deg"] == pytest.approx(0.0, abs=1e-6) and r2["v_mean_deg"] > 0


def test_rankwise_prefix_and_grid():
    Ub = _orth(30, 10, 8)
    Ut = _orth(30, 10, 9)
    grid = rank_grid(10, points=64)
    assert grid == list(range(1, 11))
    curve = rankwise(Ub, Ut, [1, 5, 10])
    assert curve[2] == pytest.approx(mean_angle_deg(Ub, Ut))
    assert curve[0] == pytest.approx(mean_angle_deg(Ub[:, :1], Ut[:, :1]))
    big = rank_grid(512, points=32)
    assert big[0] == 1 and big[-1] == 512 and len(big) < 100 and big == sorted(set(big))
