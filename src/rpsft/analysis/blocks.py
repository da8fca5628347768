"""Where the drift goes: the update ΔW = W − W0 split into the four blocks of W0's singular frame (paper App. C.3).

With W0 = [U_k U_⊥] diag(σ) [V_k V_⊥]ᵀ and k the anchored rank, the update decomposes as

    [U_k U_⊥]ᵀ ΔW [V_k V_⊥] = [[A, B], [C, D]],   A = U_kᵀΔW V_k,  B = U_kᵀΔW V_⊥,  C = U_⊥ᵀΔW V_k,  D = U_⊥ᵀΔW V_⊥,

and since the frame is orthogonal, ‖ΔW‖²_F = ‖A‖² + ‖B‖² + ‖C‖² + ‖D‖². RPSFT's penalty (Eq. 3) is ‖A‖² (at W0,
U_kᵀW0V_k = diag σ_k), so it holds the top-k × top-k block and leaves B (top output directions fed by the input
tail), C (its transpose) and D (the tail of both) free. This module measures how much of a tuned checkpoint's
update lands in each block.

U_⊥ and V_⊥ (m × (m−k), n × (n−k)) are never formed: with X = U_kᵀΔW and Y = ΔW V_k,

    ‖A‖² = ‖X V_k‖²,  ‖B‖² = ‖X‖² − ‖A‖²,  ‖C‖² = ‖Y‖² − ‖A‖²,  ‖D‖² = ‖ΔW‖² − ‖X‖² − ‖Y‖² + ‖A‖²,

two m·n·k products per matrix. B, C and D are differences of large numbers when they are small (an update that
lives almost entirely in A has D ≈ 0 as a difference of terms ≈ ‖ΔW‖²), so everything is done in float64 on a
basis re-orthonormalised in float64 (the cached fp32 U_k, V_k are orthonormal only to ~1e-7, which would leave
an error of that relative size in B, C, D; the QR factor Q spans the same subspace). What remains is float64
round-off, bounded to first order (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1 inner products,
§19.3 Householder QR) by

    |error of ‖B‖², ‖C‖², ‖D‖²| ≤ u·‖ΔW‖²·((m+k)(n+k) + 2k(m+n) + 4√k(m+n)),   u = 2⁻⁵³,

(:func:`roundoff_bound`; 5.6e-10·‖ΔW‖² for a 576 × 1536 matrix at k = 576, worst case; the measured residuals
are near 1e-16·‖ΔW‖²). Negative values within that bound are round-off and clamped to 0; one beyond it means
the basis is not orthonormal and is an error. When k = m, U_⊥ is empty and C = D = 0 exactly (likewise B = D = 0
when k = n); those blocks are set to 0 rather than computed.

The reference is an isotropic update (i.i.d. entries): it puts a block's area share of its energy in each block,
k²/(mn) in A, k(n−k)/(mn) in B, (m−k)k/(mn) in C and (m−k)(n−k)/(mn) in D (``isotropic`` in the report). A share
of A above its isotropic value means the update concentrates in the anchored frame.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from ._common import WeightReader, check_comparable, checkpoint_label, layer_index, matrix_type

BLOCKS = ("A", "B", "C", "D")
UNIT_ROUNDOFF = 2.0 ** -53  # float64


def roundoff_bound(m: int, n: int, k: int, total: float) -> float:
    """First-order worst-case float64 error of the derived blocks ‖B‖², ‖C‖², ‖D‖² of an m × n update with
    ‖ΔW‖²_F = ``total`` (see the module docstring): the errors of the four computed squared norms (dot products
    of length m, n and sums of kn, mk, k², mn terms) and of the float64 QR's orthogonality, added."""
    return UNIT_ROUNDOFF * total * ((m + k) * (n + k) + 2 * k * (m + n) + 4 * math.sqrt(k) * (m + n))


def isotropic_shares(m: int, n: int, k: int) -> dict[str, float]:
    """The share of each block for an update with i.i.d. entries: the block's area over the matrix's."""
    mn = float(m * n)
    return {"A": k * k / mn, "B": k * (n - k) / mn, "C": (m - k) * k / mn, "D": (m - k) * (n - k) / mn}


def frame(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 bases of the spans of U's and V's columns, orthonormal to float64 round-off (Householder QR)."""
    return torch.linalg.qr(U.double())[0], torch.linalg.qr(V.double())[0]


def block_split(delta: torch.Tensor, U: torch.Tensor, V: torch.Tensor, name: str = "ΔW",
                orthonormal: bool = False) -> dict:
    """Energies ‖A‖², ‖B‖², ‖C‖², ‖D‖² and ‖ΔW‖² of ``delta`` (m × n) in the frame whose top-k parts are the
    columns of ``U`` (m × k) and ``V`` (n × k), in float64; their sum is ‖ΔW‖² (D is taken as the remainder).

    Returns ``{"energy": {"A", "B", "C", "D", "total"}, "roundoff_bound": float}``. Only the spans of U and V
    matter (signs, order and any rotation inside them change nothing). ``orthonormal=True``: U and V are
    already float64-orthonormal (:func:`frame`), so the QR is skipped."""
    if delta.dim() != 2:
        raise ValueError(f"{name}: block_split needs a matrix, got shape {tuple(delta.shape)}")
    m, n = delta.shape
    k = U.shape[1] if U.dim() == 2 else -1
    if U.shape != (m, k) or V.shape != (n, k):
        raise ValueError(f"{name}: U {tuple(U.shape)} and V {tuple(V.shape)} must be {m}×k and {n}×k for a {m}×{n} "
                         f"matrix")
    if k > min(m, n):
        raise ValueError(f"{name}: k={k} exceeds min(m, n)={min(m, n)}")
    D64 = delta.detach().double()
    total = float(D64.pow(2).sum())
    bound = roundoff_bound(m, n, k, total)
    if k == 0:
        return {"energy": {"A": 0.0, "B": 0.0, "C": 0.0, "D": total, "total": total}, "roundoff_bound": bound}
    Q, P = (U, V) if orthonormal else frame(U, V)
    Q, P = Q.to(D64.device, torch.float64), P.to(D64.device, torch.float64)
    X = Q.T @ D64  # k × n: the rows U_kᵀΔW, energy A + B
    A = float((X @ P).pow(2).sum())
    if k == m and k == n:  # the frame spans everything: the update is all A
        e = {"A": total, "B": 0.0, "C": 0.0, "D": 0.0}
    elif k == m:  # U_⊥ is empty: no C, no D
        e = {"A": A, "B": total - A, "C": 0.0, "D": 0.0}
    elif k == n:  # V_⊥ is empty: no B, no D
        e = {"A": A, "B": 0.0, "C": total - A, "D": 0.0}
    else:
        x2 = float(X.pow(2).sum())
        y2 = float((D64 @ P).pow(2).sum())  # ‖ΔW V_k‖² = A + C
        e = {"A": A, "B": x2 - A, "C": y2 - A, "D": total - x2 - y2 + A}
    for b in ("B", "C", "D"):
        if e[b] < 0:
            if e[b] < -bound:
                raise ArithmeticError(
                    f"{name}: block {b} has energy {e[b]:.3e} < −{bound:.1e} (the float64 round-off bound); the "
                    f"basis is not orthonormal (delete the bases cache, default ~/.cache/rpsft/bases, and rerun)")
            e[b] = 0.0  # round-off of a block that is (numerically) empty
    e["total"] = total
    return {"energy": e, "roundoff_bound": bound}


def _shares(energy: dict) -> dict[str, float | None]:
    t = energy["total"]
    return {b: (energy[b] / t if t > 0 else None) for b in BLOCKS}


def matrix_blocks(W0: torch.Tensor, W: torch.Tensor, k: int, bases=None, name: str = "W",
                  orthonormal: bool = False) -> dict:
    """The report row of one matrix: energies, shares, isotropic shares and the relative size ‖ΔW‖/‖W0‖, in
    the top-``k`` frame of ``W0``. ``bases``: its precomputed top-k (or wider) bases, a
    :class:`rpsft.bases.Bases` or a (U, V) pair (``orthonormal=True`` for the output of :func:`frame`)."""
    from ..bases import compute_bases

    if W0.shape != W.shape:
        raise ValueError(f"{name}: base {tuple(W0.shape)} and tuned {tuple(W.shape)} shapes differ")
    m, n = W0.shape
    if not 0 <= k <= min(m, n):
        raise ValueError(f"{name}: k={k} must lie in 0..min(m, n)={min(m, n)}")
    if k == 0:
        U, V = W0.new_zeros(m, 0), W0.new_zeros(n, 0)
    else:
        b = bases if bases is not None else compute_bases(W0, k)
        U, V = b if isinstance(b, tuple) else (b.U, b.V)
        U, V = U[:, :k], V[:, :k]
    split = block_split(W.double() - W0.double(), U, V, name, orthonormal=orthonormal and k > 0)
    e = split["energy"]
    base_sq = float(W0.double().pow(2).sum())
    return {"name": name, "type": matrix_type(name), "layer": layer_index(name), "shape": [m, n], "k": k,
            "energy": e, "share": _shares(e), "isotropic": isotropic_shares(m, n, k),
            "relative": math.sqrt(e["total"] / base_sq) if base_sq > 0 else None, "base_energy": base_sq,
            "roundoff_bound": split["roundoff_bound"]}


def _group(rows: list[dict], key: str) -> list[dict]:
    """Energies summed over the matrices of each type (or layer); shares of the sum; the isotropic shares of
    the pooled area (what an update with equal i.i.d. entries in every matrix would give)."""
    groups: dict[Any, list[dict]] = {}
    for r in rows:
        if r[key] is not None:
            groups.setdefault(r[key], []).append(r)
    order = sorted(groups)
    if key == "type":
        from .plots import TYPE_ORDER

        order = [t for t in TYPE_ORDER if t in groups] + sorted(t for t in groups if t not in TYPE_ORDER)
    return [{key: g, **_pool(groups[g])} for g in order]


def _pool(rows: list[dict]) -> dict:
    e = {b: sum(r["energy"][b] for r in rows) for b in (*BLOCKS, "total")}
    area = sum(r["shape"][0] * r["shape"][1] for r in rows)
    iso = {b: sum(r["isotropic"][b] * r["shape"][0] * r["shape"][1] for r in rows) / area for b in BLOCKS}
    base_sq = sum(r["base_energy"] for r in rows)
    return {"matrices": len(rows), "energy": e, "share": _shares(e), "isotropic": iso,
            "relative": math.sqrt(e["total"] / base_sq) if base_sq > 0 else None}


def _rank_json(rank: Any) -> Any:
    return rank if isinstance(rank, (int, float, str, dict)) else str(rank)


def run_blocks(base: str, tuned: list[str], rank: Any = 128, targets=None, layers=None, svd: str = "exact",
               cache_dir: str | None = None, labels: list[str] | None = None, progress=None) -> dict:
    """The four-block split of every selected matrix of every checkpoint against ``base``, at the anchor's rank
    spec ``rank`` (int k, fraction of min(m, n), mapping pattern -> k, or ``"@ranks.json"``; resolved by
    :func:`rpsft.selection.resolve_ranks` exactly as training does). Bases come from :mod:`rpsft.bases` and its
    disk cache (``cache_dir``, default ``<cache root>/bases``, the one training fills), one per base matrix for
    all checkpoints; tensors are read one at a time. Returns the JSON-ready report."""
    from ..bases import SOLVERS, BasesCache, get_bases
    from ..selection import candidate_matrices, resolve_ranks
    from ._common import _checkpoint_tree

    if svd not in SOLVERS or svd == "randomized":
        raise ValueError(f"--svd {svd!r}: use exact or gram (a randomized basis is not the base's top-k frame on "
                         f"flat spectra)")
    if not tuned:
        raise ValueError("--tuned: give at least one tuned checkpoint")
    if labels is not None and len(labels) != len(tuned):
        raise ValueError(f"--labels has {len(labels)} entries for {len(tuned)} checkpoints; give one per --tuned")
    labels = labels or [checkpoint_label(t) for t in tuned]
    t0 = time.time()
    names = check_comparable(base, tuned, targets, layers)  # every checkpoint: same layers, names and shapes
    # every bad rank spec fails here, before a tensor is read; a map's keys may name any matrix of the model
    ks = resolve_ranks(names, rank, known=[n for n, _ in candidate_matrices(_checkpoint_tree(base))])
    base_r = WeightReader(base)
    readers = [WeightReader(t) for t in tuned]
    if cache_dir is None:
        from ..models import cache_root

        cache_dir = str(cache_root() / "bases")
    cache = BasesCache(cache_dir)
    per_ckpt: list[list[dict]] = [[] for _ in tuned]
    t_bases = 0.0
    for i, (name, shape) in enumerate(names):
        W0, k = base_r.get(name), ks[name]
        tb = time.time()
        b = get_bases(W0, k, solver=svd, cache=cache) if k > 0 else None
        fr = frame(b.U, b.V) if b is not None else None  # once per base matrix, for every checkpoint
        t_bases += time.time() - tb
        for c, rd in enumerate(readers):
            W = rd.get(name)
            if tuple(W.shape) != tuple(shape):
                raise ValueError(f"{tuned[c]}: {name} has shape {tuple(W.shape)}, the base has {tuple(shape)}; "
                                 f"compare checkpoints of the same architecture")
            per_ckpt[c].append(matrix_blocks(W0, W, k, bases=fr, name=name, orthonormal=True))
        if progress:
            progress(i + 1, len(names))
    checkpoints = [{"label": labels[c], "path": t, "matrices": rows, "types": _group(rows, "type"),
                    "layers": _group(rows, "layer"), "all": _pool(rows)}
                   for c, (t, rows) in enumerate(zip(tuned, per_ckpt))]
    seconds = time.time() - t0
    return {"base": base, "rank": _rank_json(rank), "svd": svd, "targets": targets, "layers": layers,
            "checkpoints": checkpoints,
            "seconds": {"total": round(seconds, 2), "bases": round(t_bases, 2)}}
