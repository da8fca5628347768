"""RotationAnchor: the RPSFT regulariser (paper Eq. 3-4, Algorithm 1).

For each selected pretrained weight W0 (m×n) with top-k singular triplets (U_k, σ_k, V_k):

    R(W) = ‖U_kᵀ W V_k − diag(σ_k)‖²_F = ‖U_kᵀ (W − W0) V_k‖²_F            (Eq. 3)
    ∇_W R = 2 · U_k A V_kᵀ,   A = U_kᵀ W V_k − diag(σ_k)   (k×k)            (closed form)

k = 0 contributes nothing (plain SFT). Eq. 3 holds at every k up to min(m, n), so R grows continuously with k.
At k = min(m, n) a *square* W has square orthogonal U_k, V_k and R = ‖W − W0‖²_F: there we skip the SVD and keep
W0 itself (same value, cheaper than two n×n rotations). A non-square W at k = min(m, n) keeps its bases: only one
of U_k, V_k is square, and Eq. 3 is ‖P_U ΔW P_V‖², which leaves the part of ΔW outside W0's row or column space
free — as the paper's own code does for 512×3584 k/v projections at k = 768. ``full_rank_as="l2"`` (method=l2init,
App. C's L2-Init) keeps W0 and uses ‖W − W0‖² at full rank for every matrix instead. Only U_k, V_k and the σ_k
vector are stored otherwise — no k×k block and no copy of W0 — i.e. (m + n + 1)·k numbers per matrix.

Everything is computed in ``dtype`` (fp32 by default) whatever the weight dtype, with TF32 forced off (even when
the Trainer enables it for the model): A is a small difference of large numbers, TF32 turns it into rounding
noise, and the authors' fp16 bases leave R ≈ 1e-4 per matrix at initialisation (docs/math.md, precision table).

``frame_dtype="bf16"`` / ``"fp16"`` stores U_k, V_k rounded to that dtype plus the k×k block A_ref = U_lᵀ W0 V_l of
the rounded frames (its diagonal σ_k in fp32, its small off-diagonal in fp16), and subtracts A_ref instead of
diag σ_k (``rpsft.frames``): about half the memory, and still zero penalty at W0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from .bases import Bases, BasesCache, get_bases
from .frames import LeanBases, get_lean_bases, parse_frame_dtype, reference, store_offdiag
from .precision import ieee_fp32
from .distributed import all_reduce_sum_, assign_owners, broadcast_, collective_device, is_dtensor, row_shard, world
from .placement import bases_device, canonical_parameters, host_values, svd_threads
from .selection import matrix_type, resolve_ranks, select_matrices


@dataclass
class _Term:
    name: str
    shape: tuple[int, int]
    k: int
    U: torch.Tensor | None = None  # m×k
    S: torch.Tensor | None = None  # k
    V: torch.Tensor | None = None  # n×k
    W0: torch.Tensor | None = None  # only at k == min(m, n) of a square W, or with full_rank_as="l2"
    ref_sq: float = 1.0  # ‖σ_k‖² or ‖W0‖²: the scale that relative drift is measured against
    row0: int | None = None  # set once U (or W0) has been cut to an FSDP2 row shard starting at this row
    Aref: torch.Tensor | None = None  # off-diagonal of U_lᵀ W0 V_l (fp16), only with bf16/fp16 frames (frames.py)

    @property
    def full(self) -> bool:
        return self.W0 is not None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.U, self.S, self.V, self.W0, self.Aref) if t is not None]

    def frames(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """U, V in the compute dtype: a no-op for full-precision frames, a transient upcast of this matrix's
        bf16/fp16 frames otherwise (one matrix at a time, so the peak extra memory is one matrix's frames)."""
        return self.U.to(dtype), self.V.to(dtype)

    def reference(self) -> torch.Tensor:
        """What A subtracts: A_ref = U_lᵀ W0 V_l with lean frames (diag σ_k + the off-diagonal upcast, transient),
        diag σ_k with full-precision ones (Eq. 3)."""
        return reference(self.S, self.Aref, self.S.dtype) if self.Aref is not None else torch.diag_embed(self.S)


def _refuse_partitioned(name: str, p: torch.Tensor) -> None:
    # DeepSpeed ZeRO-3 swaps every parameter for an empty placeholder; an anchor built on it would be a silent no-op.
    if hasattr(p, "ds_id") or hasattr(p, "ds_numel") or p.numel() == 0:
        raise RuntimeError(
            f"parameter {name} is partitioned (DeepSpeed ZeRO-3 or an empty placeholder): the rotation anchor needs "
            "full weight matrices. Use ZeRO-2 or FSDP2 (see docs/math.md), or build the anchor before sharding."
        )


def _keeps_w0(k: int, shape: tuple[int, int], full_rank_as: str) -> bool:
    """Whether a matrix's term is ‖W − W0‖² (W0 stored) rather than Eq. 3 on stored bases: at full rank, for a
    square matrix (the two agree there) or when L2-Init is asked for (``full_rank_as="l2"``)."""
    return k >= min(shape) and (full_rank_as == "l2" or shape[0] == shape[1])


def weight_of(weight: float | dict[str, float], name: str) -> float:
    """λ of one matrix: a scalar λ, or a per-matrix mapping (the rotation budget per matrix type, rpsft.budget)."""
    return weight[name] if isinstance(weight, dict) else weight


class AnchorTerms:
    """What every anchor form shares: its per-matrix terms (``name``, ``k``, ``full``, ``ref_sq``, ``tensors()``),
    their size, and the relative-drift summary. Subclasses: :class:`RotationAnchor` (dense W) and
    ``rpsft.methods.rpsft_lora.LoraRotationAnchor`` (W0 + s·BA, Eq. 5)."""

    def __init__(self, terms: Iterable, dtype: torch.dtype = torch.float32):
        self.terms: dict = {t.name: t for t in terms}
        self.dtype = dtype
        self.last_sq: dict[str, float] = {}  # per-matrix ‖A‖² from the latest accumulate_grad_

    @property
    def ranks(self) -> dict[str, int]:
        return {n: t.k for n, t in self.terms.items()}

    @property
    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for t in self.terms.values() for x in t.tensors())

    def __len__(self) -> int:
        return len(self.terms)

    def __repr__(self) -> str:
        full = sum(t.full for t in self.terms.values())
        return (f"{type(self).__name__}({len(self)} matrices, {full} at full rank, "
                f"k={sorted(set(self.ranks.values()))}, {self._repr_extra()}{self.nbytes / 2**20:.1f} MiB, "
                f"{self.dtype})")

    def _repr_extra(self) -> str:
        return ""

    @staticmethod
    def _place(t, device: torch.device) -> None:
        """Move term ``t``'s tensors to ``device`` (its parameter's) on first use: the anchor is built while the
        model is on the CPU and the Trainer moves or shards the model afterwards."""
        for field in ("U", "S", "V", "W0", "Aref"):
            x = getattr(t, field, None)
            if x is not None and x.device != device:
                setattr(t, field, x.to(device))

    def _drift_row(self, name: str, a: float) -> dict:
        """``drift()``'s entry for one matrix from its ‖A‖_F: absolute, relative to ‖σ_k‖ (‖W0‖ at full rank)."""
        t = self.terms[name]
        return {"abs": a, "rel": a / max(t.ref_sq, 1e-30) ** 0.5, "k": t.k, "type": matrix_type(name)}

    def relative_drift_by_type(self, sq: dict[str, float] | None = None) -> dict[str, float]:
        """Mean relative drift ‖A‖/‖σ_k‖ per matrix type, from ``sq`` (default: the last accumulate_grad_)."""
        sq = self.last_sq if sq is None else sq
        sums: dict[str, list[float]] = {}
        for name, v in sq.items():
            rel = (max(v, 0.0) / max(self.terms[name].ref_sq, 1e-30)) ** 0.5
            sums.setdefault(matrix_type(name), []).append(rel)
        return {k: sum(v) / len(v) for k, v in sorted(sums.items())}


class RotationAnchor(AnchorTerms):
    """Pretrained top-k spectral frames of selected matrices, with the penalty and its closed-form gradient."""

    terms: dict[str, _Term]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: torch.nn.Module, rank: Any = 768, targets: Iterable[str] | str | None = None,
                   svd: str = "exact", dtype: torch.dtype = torch.float32, cache_dir: str | Path | None = None,
                   layers: Any = None, niter: int = 8, progress: bool = False,
                   frame_dtype: str | torch.dtype | None = None, full_rank_as: str = "eq3") -> "RotationAnchor":
        """Anchor the matrices of ``model`` matched by ``targets`` (default: the seven projections) at rank ``rank``.

        ``rank``: int k (clipped to min(m, n)), fraction in (0, 1], mapping pattern -> k, or ``"@ranks.json"``.
        ``frame_dtype``: ``"fp32"`` (default; frames in ``dtype``) or ``"bf16"`` / ``"fp16"``: lean frames with the
        exact reference block A_ref = U_lᵀ W0 V_l (rpsft.frames; about half the memory, zero penalty at W0).
        Bases come from ``cache_dir`` when a matching entry exists, otherwise they are computed and stored there.
        ``full_rank_as``: the term of a matrix whose k reaches min(m, n) — ``"eq3"`` (Eq. 3 itself; W0 kept only for
        square matrices, where the value is identical) or ``"l2"`` (‖W − W0‖² for every matrix: L2-Init).
        """
        if full_rank_as not in ("eq3", "l2"):
            raise ValueError(f"full_rank_as must be 'eq3' or 'l2', got {full_rank_as!r}")
        matrices = select_matrices(model, targets, layers)
        for name, p in matrices:
            _refuse_partitioned(name, p)
        ranks = resolve_ranks([(n, tuple(p.shape)) for n, p in matrices], rank)
        cache = BasesCache(cache_dir)
        me, world_size = world()
        shapes = [tuple(p.shape) for _, p in matrices]
        keeps_w0 = [_keeps_w0(ranks[n], shape, full_rank_as) for (n, _), shape in zip(matrices, shapes)]
        ks = [0 if w0 else ranks[n] for (n, _), w0 in zip(matrices, keeps_w0)]  # the k of each term with bases
        frame = parse_frame_dtype(frame_dtype)
        owners = assign_owners(shapes, ks, world_size)  # each SVD on one rank only, then broadcast
        terms, computed = {}, {}
        iterator = list(enumerate(matrices))
        if progress and me == 0:
            from rich.progress import track

            iterator = track(iterator, description="anchor bases", transient=True)
        for i, (name, p) in iterator:
            k, shape = ranks[name], shapes[i]
            if k == 0:
                continue
            if keeps_w0[i]:
                # ‖W − W0‖² term: keep W0 itself (only this rank's rows when the weight is an FSDP2 shard)
                local = p.detach().to_local() if is_dtensor(p) else p.detach()
                W0 = local.to(dtype=dtype, copy=True)
                ref = float(p.detach().full_tensor().double().pow(2).sum()) if is_dtensor(p) \
                    else float(W0.double().pow(2).sum())
                terms[i] = _Term(name, shape, k, W0=W0, ref_sq=ref,
                                 row0=row_shard(p)[1] if is_dtensor(p) else None)
                continue
            W = p.detach().full_tensor() if is_dtensor(p) else p.detach()  # a collective: same order everywhere
            if owners[i] == me:  # on the accelerator when there is one, else on all of this process's CPU cores
                with svd_threads():
                    Wb = W.to(bases_device(p))
                    computed[i] = get_bases(Wb, k, solver=svd, cache=cache, niter=niter) if frame is None else \
                        get_lean_bases(Wb, k, frame, solver=svd, cache=cache, niter=niter)
        for i, (name, p) in enumerate(matrices):
            if ks[i] == 0:
                continue
            k, (m, n) = ks[i], shapes[i]
            device = p.device
            if world_size > 1:  # one flat broadcast per matrix from its owner
                extra = k * k if frame is not None else 0  # + A_ref's off-diagonal; lean values travel upcast (exactly)
                flat = torch.empty((m + n + 1) * k + extra, dtype=torch.float32, device=collective_device(device))
                if owners[i] == me:
                    b = computed[i]
                    flat.copy_(torch.cat([b.U.float().reshape(-1), b.S.to(b.U.device), b.V.float().reshape(-1)]
                                         + ([b.A.float().reshape(-1).to(b.U.device)] if extra else [])).to(flat.device))
                broadcast_(flat, owners[i])
                end = (m + n + 1) * k
                parts = (flat[:m * k].view(m, k), flat[m * k:m * k + k], flat[m * k + k:end].view(n, k))
                # store_offdiag on the received values reaches the owner's fp16/fp32 decision (deterministic)
                computed[i] = LeanBases(*parts, A=store_offdiag(flat[end:].view(k, k), parts[1])) if extra \
                    else Bases(*parts)
            b = computed.pop(i)
            if frame is not None:  # lean frames and A_ref's off-diagonal keep their storage dtype; σ_k the compute one
                U, V = (t.to(device=device, dtype=frame) for t in (b.U, b.V))
                S, Aref = b.S.to(device=device, dtype=dtype), b.A.to(device=device)
                terms[i] = _Term(name, (m, n), k, U=U, S=S, V=V, ref_sq=float(S.double().pow(2).sum()), Aref=Aref)
                continue
            U, S, V = (t.to(device=device, dtype=dtype) for t in (b.U, b.S, b.V))
            terms[i] = _Term(name, (m, n), k, U=U, S=S, V=V, ref_sq=float(S.double().pow(2).sum()))
        terms = [terms[i] for i in sorted(terms)]
        return cls(terms, dtype=dtype)

    @property
    def frame_dtype(self) -> torch.dtype:
        """Storage dtype of the frames U, V (``dtype`` unless built with bf16/fp16 lean frames)."""
        lean = [t.U.dtype for t in self.terms.values() if t.Aref is not None]
        return lean[0] if lean else self.dtype

    def _repr_extra(self) -> str:
        return f"frames {self.frame_dtype}, " if self.frame_dtype != self.dtype else ""

    def _params(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        params = canonical_parameters(model)  # names without checkpoint / compile wrapper components
        out = {}
        for name, t in self.terms.items():
            p = params.get(name)
            if p is None:
                raise KeyError(f"anchor matrix {name} is not a parameter of this model; build the anchor from the "
                               "same model architecture (PEFT-wrapped models use RotationAnchor on the effective "
                               "weight, see methods/rpsft_lora.py)")
            if tuple(p.shape) != t.shape:
                raise ValueError(f"anchor matrix {name} has shape {t.shape} but the model's is {tuple(p.shape)}")
            out[name] = p
        return out

    # ------------------------------------------------------------------ the math
    def _residual(self, t: _Term, W: torch.Tensor) -> torch.Tensor:
        """A = U_kᵀ W V_k − diag σ_k (k×k; − A_ref with lean frames), or W − W0 at full rank; in self.dtype."""
        self._place(t, W.device)
        W = W.to(self.dtype)
        if t.full:
            return W - t.W0
        m, n = t.shape
        U, V = t.frames(self.dtype)
        # associate so the second product is over the smaller side: (UᵀW)V costs k²n, Uᵀ(WV) costs k²m
        A = (U.T @ W) @ V if n <= m else U.T @ (W @ V)
        return A - t.reference()

    @ieee_fp32()
    def penalty(self, model: torch.nn.Module, record: bool = False,
                weight: dict[str, float] | None = None) -> torch.Tensor:
        """R = Σ ‖A‖²_F as a differentiable scalar (autograd path; training uses accumulate_grad_).

        ``record=True`` also keeps each matrix's ‖A‖² in ``last_sq`` (for drift logging) at no extra cost.
        ``weight`` (matrix name -> λ) returns Σ λ_i‖A_i‖² instead (a budget per matrix type)."""
        params = self._params(model)
        total = None
        sq = []
        for name, t in self.terms.items():
            if is_dtensor(params[name]):
                raise NotImplementedError("penalty() is the autograd path for unsharded weights; under FSDP2 use "
                                          "accumulate_grad_ (closed form, returns R) or drift()")
            r = self._residual(t, params[name]).pow(2).sum()
            sq.append(r.detach())
            if weight is not None:
                r = r * weight[name]
            total = r if total is None else total + r
        if record:  # one stacked device-to-host transfer, not one sync per matrix
            self.last_sq = dict(zip(self.terms, host_values(torch.stack(sq)))) if sq else {}
        if total is None:
            return torch.zeros((), dtype=self.dtype)
        return total

    def _localize(self, t: _Term, p: torch.Tensor) -> tuple[torch.Tensor, object]:
        """This rank's rows of W (FSDP2 Shard(0)); cuts U_k / W0 to the same rows once, freeing the rest."""
        local, row0, group = row_shard(p)
        rows = local.shape[0]
        if t.row0 is None:
            if t.full:
                t.W0 = t.W0[row0:row0 + rows].contiguous()
            else:
                t.U = t.U[row0:row0 + rows].contiguous()
            t.row0 = row0
        elif t.row0 != row0 or (t.U if not t.full else t.W0).shape[0] != rows:
            raise RuntimeError(f"{t.name}: the weight was re-sharded after the anchor was cut to its rows; build the "
                               "anchor again after changing the sharding")
        return local.detach(), group

    @torch.no_grad()
    def _residuals(self, model: torch.nn.Module) -> list[tuple[_Term, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(term, parameter, A or local W − W0, ‖·‖² summed over ranks) for every term, with one all-reduce."""
        params = self._params(model)
        out, partial, group = [], [], None
        for name, t in self.terms.items():
            p = params[name]
            if is_dtensor(p):
                W, group = self._localize(t, p)
                self._place(t, W.device)  # after the row cut: only this rank's rows of U_k / W0 move
                W = W.to(self.dtype)
                if t.full:
                    D = W - t.W0
                    sq = D.pow(2).sum()
                    partial.append(sq)  # ‖W − W0‖² = Σ over row shards
                    out.append((t, p, D, sq))
                else:
                    U, V = t.frames(self.dtype)
                    A = U.T @ (W @ V)  # this shard's share of U_kᵀ W V_k
                    partial.append(A)
                    out.append((t, p, A, None))
            else:
                A = self._residual(t, p.detach())
                out.append((t, p, A, A.pow(2).sum()))
        if partial:
            all_reduce_sum_(partial, group)  # in place: the partial A's are now Σ_r U_rᵀ W_r V_k
            for i, (t, p, A, sq) in enumerate(out):
                if sq is None:
                    A = A - t.reference()
                    out[i] = (t, p, A, A.pow(2).sum())
        return out

    @torch.no_grad()
    @ieee_fp32()
    def accumulate_grad_(self, model: torch.nn.Module, weight: float | dict[str, float] = 1.0) -> float:
        """Add ``weight · ∇R`` to each anchored parameter's ``.grad`` in closed form; return R (unweighted).

        ∇R = 2·U_k A V_kᵀ (2·(W − W0) at full rank). One pass: ≈ 4·m·n·k FLOP per matrix, no autograd graph.
        Under FSDP2 each rank adds 2·U_r A V_kᵀ to its own gradient shard (see distributed.py).
        """
        res = self._residuals(model)
        for t, p, A, _ in res:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grad = p.grad.to_local() if is_dtensor(p.grad) else p.grad
            if t.full:
                G = A
            else:
                m, n = t.U.shape[0], t.shape[1]
                U, V = t.frames(self.dtype)
                G = (U @ A) @ V.T if m <= n else U @ (A @ V.T)
            grad.add_(G.to(grad.dtype), alpha=2.0 * weight_of(weight, t.name))
        if not res:
            self.last_sq = {}
            return 0.0
        values = host_values(torch.stack([sq for *_, sq in res]))  # one device sync per step
        self.last_sq = dict(zip(self.terms, values))
        return float(sum(values))

    @torch.no_grad()
    @ieee_fp32()
    def drift(self, model: torch.nn.Module) -> dict[str, dict[str, float]]:
        """Per matrix: ``abs`` = ‖A‖_F, ``rel`` = ‖A‖_F / ‖σ_k‖ (‖W−W0‖/‖W0‖ at full rank), ``k``, ``type``."""
        res = self._residuals(model)
        values = host_values(torch.stack([sq for *_, sq in res])) if res else []  # one sync for all matrices
        return {t.name: self._drift_row(t.name, v ** 0.5)
                for (t, *_), v in zip(res, values)}
