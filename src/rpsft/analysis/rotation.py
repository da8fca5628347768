"""How far fine-tuning rotated the pretrained singular frame (paper App. F.3 / Figs 6-7).

For each matrix, the top-K left singular subspace of the base weight (U_base, m×K) is compared with that of the
tuned weight (U_tuned) through principal angles: cos θ_i are the singular values of U_baseᵀ U_tuned. The
paper's statistic is the mean angle in degrees with K = min(512, m, n); we report it for U (output space) and V
(input space), layerwise (mean over the seven projection types of a block) and rankwise (the prefix r ≤ K of
one matrix: how the rotation grows from the dominant directions down the spectrum).

Small angles are computed from sines, as scipy.linalg.subspace_angles does: arccos is ill-conditioned near
cos θ = 1 (θ ≈ 1e-4 rad would come out as 0 in fp32 and noisy in fp64), arcsin is not.

A useful fact for reading the numbers: two K-dimensional subspaces of R^m share at least 2K − m dimensions, so
at most m − K of the K angles are non-zero (for a 576×576 q_proj with K = 512: at most 64 of 512).

Caveat worth knowing when reading the numbers: when K = m (e.g. a 192×576 k_proj has K = 192 = m), U_K spans
the whole output space and its angle is 0 by construction; such a matrix only rotates in V-space.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ._common import WeightReader, check_comparable, checkpoint_label, layer_index, matrix_type

DEFAULT_K = 512


def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spaces of A and B (orthonormal columns, same
    number of rows), in fp64.

    cos²θ are the eigenvalues of MᵀM with M = AᵀB; sin²θ those of CᵀC with C = B − A M (the part of B outside
    span A). Each angle is taken from whichever is well conditioned — sin for θ < 45°, cos above — the split
    scipy.linalg.subspace_angles uses. Symmetric eigenvalue problems of K×K Gram matrices instead of SVDs keep
    a 512-dimensional comparison at a few matmuls plus two eigvalsh calls (sines stay accurate relative to the
    largest angle, which is what a mean angle needs)."""
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[0]:
        raise ValueError(f"principal_angles needs two m×k matrices with the same m, got {tuple(A.shape)} and "
                         f"{tuple(B.shape)}")
    A, B = A.double(), B.double()
    if A.shape[1] < B.shape[1]:
        A, B = B, A
    M = A.T @ B
    cos2 = torch.linalg.eigvalsh(M.T @ M).flip(0).clamp(0.0, 1.0)  # descending cos -> ascending angles
    theta = torch.arccos(cos2.sqrt())
    small = cos2 >= 0.5
    if bool(small.any()):
        C = B - A @ M
        sin2 = torch.linalg.eigvalsh(C.T @ C).clamp(0.0, 1.0)  # ascending sin -> ascending angles
        theta = torch.where(small, torch.arcsin(sin2.sqrt()), theta)
    return theta


def mean_angle_deg(A: torch.Tensor, B: torch.Tensor) -> float:
    return float(torch.rad2deg(principal_angles(A, B)).mean())


def top_subspaces(weight: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_K, V_K), top-K singular vectors in fp64, from eigh of the smaller Gram matrix (2-3x faster than a full
    SVD here; in fp64 the squared condition number costs nothing at the precision of the angles we report)."""
    W = weight.detach().double()
    m, n = W.shape
    if not 1 <= K <= min(m, n):
        raise ValueError(f"K={K} must lie in 1..min(m, n)={min(m, n)} for a {m}×{n} matrix")
    tiny = torch.finfo(torch.float64).tiny
    if m >= n:
        evals, evecs = torch.linalg.eigh(W.T @ W)
        V = evecs[:, -K:].flip(1)
        U = (W @ V) / evals[-K:].flip(0).clamp_min(tiny).sqrt()
    else:
        evals, evecs = torch.linalg.eigh(W @ W.T)
        U = evecs[:, -K:].flip(1)
        V = (W.T @ U) / evals[-K:].flip(0).clamp_min(tiny).sqrt()
    return U, V


def rank_grid(K: int, points: int = 64) -> list[int]:
    """Prefix ranks for the rankwise curve: dense at the top of the spectrum (geometric) and even (linear)."""
    if points >= K:
        return list(range(1, K + 1))
    grid = np.concatenate([np.linspace(1, K, points), np.geomspace(1, K, max(points // 2, 2))])
    return sorted({int(round(v)) for v in grid} | {K})


def rankwise(Ub: torch.Tensor, Ut: torch.Tensor, ranks: list[int]) -> list[float]:
    """Mean principal angle (degrees) between the top-r prefixes, for each r in ranks."""
    return [mean_angle_deg(Ub[:, :r], Ut[:, :r]) for r in ranks]


def matrix_rotation(W_base: torch.Tensor, W_tuned: torch.Tensor, K: int = DEFAULT_K,
                    base_bases: tuple[torch.Tensor, torch.Tensor] | None = None,
                    tuned_bases: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Mean/max angle in U and V space between base and tuned top-K subspaces of one matrix (precomputed
    (U_K, V_K) may be passed for either side)."""
    if W_base.shape != W_tuned.shape:
        raise ValueError(f"base {tuple(W_base.shape)} and tuned {tuple(W_tuned.shape)} shapes differ")
    k = min(K, *W_base.shape)
    Ub, Vb = base_bases if base_bases is not None else top_subspaces(W_base, k)
    Ut, Vt = tuned_bases if tuned_bases is not None else top_subspaces(W_tuned, k)
    tu, tv = torch.rad2deg(principal_angles(Ub, Ut)), torch.rad2deg(principal_angles(Vb, Vt))
    return {"K": k, "u_mean_deg": float(tu.mean()), "v_mean_deg": float(tv.mean()),
            "u_max_deg": float(tu.max()), "v_max_deg": float(tv.max())}


def _layer_table(rows: list[dict]) -> list[dict]:
    layers: dict[int, list[dict]] = {}
    for r in rows:
        if r["layer"] is not None:
            layers.setdefault(r["layer"], []).append(r)
    return [{"layer": li, "types": len(rs),
             "u_mean_deg": float(np.mean([r["u_mean_deg"] for r in rs])),
             "v_mean_deg": float(np.mean([r["v_mean_deg"] for r in rs]))}
            for li, rs in sorted(layers.items())]


def run_rotation(base: str, tuned: list[str], targets=None, layers=None, K: int = DEFAULT_K,
                 matrix: str | None = None, rank_points: int = 64, labels: list[str] | None = None,
                 progress=None) -> dict:
    """Angles for every selected matrix of every checkpoint; one base SVD per matrix, tensors read one by one."""
    if K < 1:
        raise ValueError(f"--k {K}: the subspace dimension must be >= 1 (paper: 512)")
    if labels is not None and len(labels) != len(tuned):
        raise ValueError(f"--labels has {len(labels)} entries for {len(tuned)} checkpoints; give one per --tuned")
    labels = labels or [checkpoint_label(t) for t in tuned]
    t0 = time.time()
    names = check_comparable(base, tuned, targets, layers)  # every checkpoint: same layers, names and shapes
    if matrix is None:  # rankwise default: the first selected q_proj (else the first matrix)
        matrix = next((n for n, _ in names if matrix_type(n) == "q_proj"), names[0][0])
    elif matrix not in {n for n, _ in names}:
        raise ValueError(f"--matrix {matrix!r} is not among the selected matrices; e.g. {names[0][0]}")
    base_r = WeightReader(base)
    readers = [WeightReader(t) for t in tuned]
    per_ckpt = [[] for _ in tuned]
    rankwise_out = [None] * len(tuned)
    for i, (name, shape) in enumerate(names):
        Wb = base_r.get(name)
        k = min(K, *shape)
        Ub, Vb = top_subspaces(Wb, k)
        for c, rd in enumerate(readers):
            Wt = rd.get(name)
            Ut, Vt = top_subspaces(Wt, k)
            row = {"name": name, "type": matrix_type(name), "layer": layer_index(name), "shape": list(shape),
                   **matrix_rotation(Wb, Wt, K, base_bases=(Ub, Vb), tuned_bases=(Ut, Vt))}
            per_ckpt[c].append(row)
            if name == matrix:
                grid = rank_grid(k, rank_points)
                rankwise_out[c] = {"matrix": name, "r": grid, "u_deg": rankwise(Ub, Ut, grid),
                                   "v_deg": rankwise(Vb, Vt, grid)}
        if progress:
            progress(i + 1, len(names))
    checkpoints = []
    for c, t in enumerate(tuned):
        lt = _layer_table(per_ckpt[c])
        checkpoints.append({
            "label": labels[c], "path": t, "matrices": per_ckpt[c], "layers": lt,
            "layer_mean": {"u_mean_deg": float(np.mean([r["u_mean_deg"] for r in lt])) if lt else None,
                           "v_mean_deg": float(np.mean([r["v_mean_deg"] for r in lt])) if lt else None},
            "rankwise": rankwise_out[c],
        })
    return {"base": base, "K": K, "checkpoints": checkpoints, "seconds": round(time.time() - t0, 2)}
