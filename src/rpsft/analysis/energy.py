"""Fisher-projected gradient energy and rank selection (paper App. F.1 / Fig. 2; target share App. C.5).

For a weight W0 = U Σ Vᵀ (exact SVD of the *base* weight, R = min(m, n)) and per-sample gradients G_t,

    y(r) = Σ_t ‖U_rᵀ G_t V_r‖²_F / Σ_t ‖G_t‖²_F,        x(r) = r² / R²,

is the share of the (empirical-Fisher) gradient energy that lands in the top-r × top-r block of the pretrained
singular frame. The reference is an isotropic random gradient (i.i.d. entries): any orthonormal U_r, V_r keep
E‖U_rᵀ G V_r‖² = r²·σ² of E‖G‖² = m·n·σ², so

    y_uniform(r) = r² / (m·n) = x(r) · R / max(m, n),

the line y = x for a square matrix and y = (min/max)·x otherwise (ending at 0.5 on 128×64, at 576/1536 = 0.375
on SmolLM2's MLP matrices). Above it the task gradient concentrates in the dominant frame, below it avoids it,
i.e. it measures how much of the gradient an anchor of rank r would fight.
Every r comes from one rotation B_t = Uᵀ G_t V: ‖U_rᵀ G_t V_r‖² is the sum of
B_t² over the top-left r×r block, so the 2-D prefix sum (cumsum over rows, then columns) of Σ_t B_t² read on
its diagonal gives the whole curve — one matrix product per sample instead of one per r.

Note y(R) = 1 exactly only for square W; for m ≠ n the thin U (or V) does not span the longer side, and
y(R) < 1 is the gradient energy outside W0's column (row) space.

The smallest r with y(r) ≥ target is the per-matrix rank the paper's "adaptive rank" future work asks for;
:func:`rank_map` writes it in the form ``rpsft train --set anchor.rank=@ranks.json`` reads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ._common import Encoded, completion_nll, encode_records, layer_index, matrix_type


@dataclass
class EnergyCurve:
    name: str
    shape: tuple[int, int]
    y: np.ndarray  # y(r) for r = 1..R
    total: float  # Σ_t ‖G_t‖²
    samples: int

    @property
    def R(self) -> int:
        return min(self.shape)

    @property
    def x(self) -> np.ndarray:
        r = np.arange(1, self.R + 1, dtype=np.float64)
        return r * r / float(self.R * self.R)

    @property
    def uniform(self) -> np.ndarray:
        """y(r) of an isotropic random gradient: r² / (m·n) (= x for square W, x·min/max otherwise)."""
        r = np.arange(1, self.R + 1, dtype=np.float64)
        return r * r / float(self.shape[0] * self.shape[1])

    def share(self, r: int) -> float:
        if not 1 <= r:
            raise ValueError(f"rank r={r} must be >= 1")
        return float(self.y[min(r, self.R) - 1])

    def rank_for(self, target: float) -> int | None:
        """Smallest r with y(r) >= target, or None if even r = R does not reach it (possible for m != n)."""
        hit = np.nonzero(self.y >= target)[0]
        return int(hit[0]) + 1 if hit.size else None

    def to_json(self, target: float, ranks: list[int] | None = None) -> dict:
        k = self.rank_for(target)
        return {
            "name": self.name, "type": matrix_type(self.name), "layer": layer_index(self.name),
            "shape": list(self.shape), "R": self.R, "samples": self.samples, "total_energy": self.total,
            "target": target, "rank_for_target": k, "x_at_rank": (k * k / self.R ** 2) if k else None,
            "y_at": {str(r): self.share(r) for r in (ranks or []) if r <= self.R},
            "y_at_R": float(self.y[-1]),  # < 1 for m != n: energy outside W0's column/row space
            "uniform_at_R": self.R / max(self.shape),  # an isotropic gradient's y(R): the reference line's end
            "y": [float(v) for v in self.y],
        }


class EnergyAccumulator:
    """Running Σ_t B_t² (fp64) and Σ_t ‖G_t‖² for one matrix, with B_t = Uᵀ G_t V in the base frame."""

    def __init__(self, name: str, weight: torch.Tensor):
        self.name = name
        self.shape = tuple(weight.shape)
        U, _, Vh = torch.linalg.svd(weight.detach().double().cpu(), full_matrices=False)
        dev = weight.device
        self.U, self.V = U.float().to(dev), Vh.T.float().contiguous().to(dev)
        R = min(self.shape)
        self.P = torch.zeros(R, R, dtype=torch.float64, device=dev)
        self.total = 0.0
        self.samples = 0

    @torch.no_grad()
    def add(self, grad: torch.Tensor) -> None:
        g = grad.detach().float()
        B = self.U.T @ g @ self.V
        self.P += B.double().pow(2)
        self.total += float(g.double().pow(2).sum())
        self.samples += 1

    def curve(self) -> EnergyCurve:
        return EnergyCurve(self.name, self.shape, prefix_share(self.P, self.total), self.total, self.samples)


def prefix_share(P: torch.Tensor, total: float) -> np.ndarray:
    """y(r) = (sum of P over the top-left r×r block) / total, for every r, via one 2-D prefix sum."""
    if total <= 0:
        raise ValueError("the gradients are all zero (no completion tokens? a frozen model?); no energy to share")
    S = P.double().cumsum(0).cumsum(1)
    return (torch.diagonal(S) / total).cpu().numpy()


def energy_curve(weight: torch.Tensor, grads: list[torch.Tensor], name: str = "W") -> EnergyCurve:
    """The curve for one matrix from explicit gradients (the library form of what the CLI does per sample)."""
    acc = EnergyAccumulator(name, weight)
    for g in grads:
        if tuple(g.shape) != acc.shape:
            raise ValueError(f"gradient shape {tuple(g.shape)} != weight shape {acc.shape}")
        acc.add(g)
    return acc.curve()


def gradient_energy(model, tokenizer, encoded: list[Encoded], params: list[tuple[str, torch.nn.Parameter]],
                    progress: Callable[[int, int], None] | None = None) -> list[EnergyCurve]:
    """Per-sample gradients of each sample's own completion NLL (one backward per sample: memory stays one
    gradient per chosen matrix), rotated into the base frame and accumulated. The model is left unchanged."""
    chosen = {id(p) for _, p in params}
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():  # weight grads only where needed: cheaper backward, no 135M-float .grad buffers
        p.requires_grad_(id(p) in chosen)
    accs = [EnergyAccumulator(n, p) for n, p in params]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()  # no dropout: the gradient of the model as it is
    try:
        for i, enc in enumerate(encoded):
            for _, p in params:
                p.grad = None
            completion_nll(model, [enc], pad)[0].backward()
            for acc, (_, p) in zip(accs, params):
                acc.add(p.grad)
            if progress:
                progress(i + 1, len(encoded))
    finally:
        for n, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(saved[n])
        model.train(was_training)
    return [a.curve() for a in accs]


def rank_map(curves: list[EnergyCurve], target: float) -> dict[str, int]:
    """``{parameter name: k}``; a matrix whose curve never reaches ``target`` gets its full R (anchor all)."""
    return {c.name: (c.rank_for(target) or c.R) for c in curves}


def anchor_elements(curves: list[EnergyCurve], ranks: dict[str, int]) -> int:
    """Stored numbers of a rank map's anchor: (m + n + 1)·k per matrix (U_k, V_k, σ_k), the uniform-k formula."""
    return sum((c.shape[0] + c.shape[1] + 1) * min(ranks[c.name], c.R) for c in curves)


def check_match_rank(rank: int) -> None:
    if rank < 1:
        raise ValueError(f"--match-rank {rank}: give the uniform k whose anchor memory the map should match (>= 1)")


def target_matching_rank(curves: list[EnergyCurve], rank: int, iters: int = 60) -> float:
    """The largest energy-share target whose rank map stores no more than a uniform ``rank`` anchor does.

    Comparing a rank map with uniform k at *equal anchor memory* needs one common target t*: the map's size
    Σ (m+n+1)·k_i(t) is non-decreasing in t (each k_i(t) = smallest r with y_i(r) >= t), so bisection finds t*.
    """
    check_match_rank(rank)
    budget = anchor_elements(curves, {c.name: rank for c in curves})
    lo, hi = 0.0, 1.0
    if anchor_elements(curves, rank_map(curves, hi)) <= budget:
        return hi
    for _ in range(iters):  # invariant: cost(lo) <= budget < cost(hi); cost(0) = Σ(m+n+1) <= budget
        mid = (lo + hi) / 2
        if anchor_elements(curves, rank_map(curves, mid)) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def run_energy(model_name: str, data: str, targets=None, layers=None, limit: int = 16, max_length: int = 1024,
               target: float = 0.20, ranks: list[int] | None = None, progress=None,
               match_rank: int | None = None) -> dict:
    """Load, select, compute; returns the JSON-able report (curves + rank map + timing). With ``match_rank``
    the target is not ``target`` but the one whose map has the anchor memory of uniform k = ``match_rank``."""
    from ..data.formats import load_records
    from ..models import load_model
    from ..selection import select_matrices

    if not 0.0 < target <= 1.0:
        raise ValueError(f"--target {target}: the energy share target must lie in (0, 1] (paper: 0.20)")
    if match_rank is not None:
        check_match_rank(match_rank)  # before the model loads
    t0 = time.time()
    model, tok = load_model(model_name)
    params = select_matrices(model, targets, layers)
    records = load_records(data, limit=limit)
    encoded = encode_records(tok, records, max_length=max_length, with_completion=True)
    t1 = time.time()
    curves = gradient_energy(model, tok, encoded, params, progress=progress)
    if match_rank is not None:
        target = target_matching_rank(curves, match_rank)
    ranks_map = rank_map(curves, target)
    return {
        "model": model_name, "data": str(data), "samples": len(encoded),
        "tokens": sum(len(e.input_ids) for e in encoded), "target": target, "match_rank": match_rank,
        "anchor_mib": {"map": anchor_elements(curves, ranks_map) * 4 / 2**20,
                       **({f"uniform_k{match_rank}": anchor_elements(curves, {c.name: match_rank for c in curves})
                           * 4 / 2**20} if match_rank else {})},
        "ranks": ranks_map,
        "matrices": [c.to_json(target, ranks) for c in curves],
        "seconds": {"load": round(t1 - t0, 2), "gradients": round(time.time() - t1, 2)},
    }
