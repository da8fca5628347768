"""RotationAnchor: the RPSFT regulariser (paper Eq. 3-4, Algorithm 1), and its complement.

For each selected pretrained weight W0 (m×n) with top-k singular triplets (U_k, σ_k, V_k):

    R(W) = ‖U_kᵀ W V_k − diag(σ_k)‖²_F = ‖U_kᵀ (W − W0) V_k‖²_F            (Eq. 3)
    ∇_W R = 2 · U_k A V_kᵀ,   A = U_kᵀ W V_k − diag(σ_k)   (k×k)            (closed form)

k = 0 contributes nothing (plain SFT). A matrix whose k reaches min(m, n) gets the paper's full-rank term
R = ‖W − W0‖²_F (App. C.2, "Case k = min(m, n)", Eq. 11; ``full_rank_as="l2"``, the default): W0 is stored instead
of bases, square or not. ``full_rank_as="eq3"`` keeps Eq. 3 there instead: the same value on a square matrix
(U_k, V_k square orthogonal; W0 is still stored, it is cheaper), and ‖P_U ΔW P_V‖² on a non-square one, which leaves
the part of ΔW outside W0's column or row space free — the variant that is continuous in k. Otherwise only U_k, V_k
and the σ_k vector are stored — no k×k block and no copy of W0 — i.e. (m + n + 1)·k numbers per matrix.

``form="complement"`` is the rest of L2-Init: R_c(W) = ‖ΔW‖² − ‖U_kᵀ ΔW V_k‖², ∇R_c = 2(ΔW − U_k A V_kᵀ) with
A = U_kᵀ ΔW V_k, so that L2-Init = RPSFT + complement at equal λ and k (docs/math.md §12). It stores W0 and U_k, V_k
per matrix; a matrix whose k reaches min(m, n) has an empty complement under the paper's rule (and on a square
matrix under either rule) and is dropped, one at k = 0 is ‖ΔW‖² (W0 only).

Everything is computed in ``dtype`` (fp32 by default) whatever the weight dtype, with TF32 forced off (even when
the Trainer enables it for the model): A is a small difference of large numbers, TF32 turns it into rounding
noise, and the authors' fp16 bases leave R ≈ 1e-4 per matrix at initialisation (docs/math.md, precision table).

``frame_dtype="bf16"`` / ``"fp16"`` stores U_k, V_k rounded to that dtype plus the k×k block A_ref = U_lᵀ W0 V_l of
the rounded frames (its diagonal σ_k in fp32, its small off-diagonal in fp16), and subtracts A_ref instead of
diag σ_k (``rpsft.frames``): about half the memory, and still zero penalty at W0. Not with the complement: frames
orthonormal only to ≈ 3e-3 make ‖ΔW‖² − ‖U_lᵀ ΔW V_l‖² indefinite (unbounded below).
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
from .selection import candidate_matrices, matrix_type, resolve_ranks, select_matrices


@dataclass
class _Term:
    name: str
    shape: tuple[int, int]
    k: int
    U: torch.Tensor | None = None  # m×k
    S: torch.Tensor | None = None  # k
    V: torch.Tensor | None = None  # n×k
    W0: torch.Tensor | None = None  # at full rank (see _plan), and in every complement term
    ref_sq: float = 1.0  # ‖σ_k‖² or ‖W0‖²: the scale that relative drift is measured against
    row0: int | None = None  # set once U (and W0) have been cut to an FSDP2 row shard starting at this row
    Aref: torch.Tensor | None = None  # off-diagonal of U_lᵀ W0 V_l (fp16), only with bf16/fp16 frames (frames.py)

    @property
    def full(self) -> bool:
        """‖W − W0‖²: W0 and no bases (full rank, or a complement term at k = 0)."""
        return self.W0 is not None and self.U is None

    @property
    def complement(self) -> bool:
        """‖ΔW‖² − ‖U_kᵀ ΔW V_k‖²: W0 and bases."""
        return self.W0 is not None and self.U is not None

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


FULL_RANK_RULES = ("l2", "eq3")  # the term of a matrix whose k reaches min(m, n): ‖W − W0‖² (paper) | Eq. 3
FORMS = ("block", "complement")  # Eq. 3's top-k block (RPSFT) | ‖ΔW‖² − ‖U_kᵀ ΔW V_k‖² (the rest of L2-Init)


def block_is_whole(k: int, shape: tuple[int, int], full_rank_as: str) -> bool:
    """Whether the anchored block of a matrix at rank k is all of ΔW, i.e. its term is ‖W − W0‖²: at k = min(m, n)
    under the paper's rule (App. C.2, Eq. 11), or of a square matrix, where Eq. 3 is ‖W − W0‖² too."""
    return k >= min(shape) and (full_rank_as == "l2" or shape[0] == shape[1])


def _plan(k: int, shape: tuple[int, int], full_rank_as: str, form: str) -> tuple[bool, int] | None:
    """(keeps W0, k of the stored bases) of one matrix's term; None when the term is identically zero.

    block: k = 0 → nothing; the block is all of ΔW → W0 only; else bases.
    complement: the block is all of ΔW → nothing (empty complement); k = 0 → W0 only (‖ΔW‖²); else W0 + bases."""
    whole = block_is_whole(k, shape, full_rank_as)
    if form == "complement":
        return None if whole else (True, k)
    if k == 0:
        return None
    return (True, 0) if whole else (False, k)


def weight_of(weight: float | dict[str, float], name: str) -> float:
    """λ of one matrix: a scalar λ, or a per-matrix mapping (the rotation budget per matrix type, rpsft.budget)."""
    return weight[name] if isinstance(weight, dict) else weight


class AnchorTerms:
    """What every anchor form shares: its per-matrix terms (``name``, ``k``, ``full``, ``ref_sq``, ``tensors()``),
    their size, and the relative-drift summary. Subclasses: :class:`RotationAnchor` (dense W) and
    ``rpsft.methods.rpsft_lora.LoraRotationAnchor`` (W0 + s·BA, Eq. 5)."""

    def __init__(self, terms: Iterable, dtype: torch.dtype = torch.float32, form: str = "block",
                 full_rank_as: str = "l2"):
        self.terms: dict = {t.name: t for t in terms}
        self.dtype = dtype
        self.form = form  # "block" (Eq. 3) or "complement"
        self.full_rank_as = full_rank_as  # the rule it was built with for matrices whose k reaches min(m, n)
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
        full = sum(t.k >= min(t.shape) for t in self.terms.values())
        return (f"{type(self).__name__}({len(self)} matrices, {full} at full rank, "
                f"k={sorted(set(self.ranks.values()))}, {self._repr_extra()}{self.nbytes / 2**20:.1f} MiB, "
                f"{self.dtype})")

    def _repr_extra(self) -> str:
        return ""

    def summary(self) -> dict:
        """What a run records about the anchor's regulariser (run.json): its form, the full-rank rule, and how many
        matrices are at full rank (k = min(m, n))."""
        return {"form": self.form, "full_rank": self.full_rank_as,
                "full_rank_matrices": sum(t.k >= min(t.shape) for t in self.terms.values())}

    @staticmethod
    def _place(t, device: torch.device) -> None:
        """Move term ``t``'s tensors to ``device`` (its parameter's) on first use: the anchor is built while the
        model is on the CPU and the Trainer moves or shards the model afterwards."""
        for field in ("U", "S", "V", "W0", "Aref"):
            x = getattr(t, field, None)
            if x is not None and x.device != device:
                setattr(t, field, x.to(device))

    def _drift_row(self, name: str, sq: float) -> dict:
        """``drift()``'s entry for one matrix from its squared penalty term (‖A‖², or the complement's
        ‖ΔW‖² − ‖A‖², which round-off can leave a hair below 0): absolute, relative to ‖σ_k‖ (‖W0‖ where W0 is
        kept)."""
        t = self.terms[name]
        a = max(sq, 0.0) ** 0.5
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
                   frame_dtype: str | torch.dtype | None = None, full_rank_as: str = "l2",
                   form: str = "block") -> "RotationAnchor":
        """Anchor the matrices of ``model`` matched by ``targets`` (default: the seven projections) at rank ``rank``.

        ``rank``: int k (clipped to min(m, n)), fraction in (0, 1], mapping pattern -> k, or ``"@ranks.json"``.
        ``frame_dtype``: ``"fp32"`` (default; frames in ``dtype``) or ``"bf16"`` / ``"fp16"``: lean frames with the
        exact reference block A_ref = U_lᵀ W0 V_l (rpsft.frames; about half the memory, zero penalty at W0).
        Bases come from ``cache_dir`` when a matching entry exists, otherwise they are computed and stored there.
        ``full_rank_as``: the term of a matrix whose k reaches min(m, n) — ``"l2"`` (‖W − W0‖², square or not: the
        paper's App. C.2, Eq. 11; the default) or ``"eq3"`` (Eq. 3 on its full-rank bases: ‖P_U ΔW P_V‖² on a
        non-square matrix, continuous in k; W0 kept for square ones, where the value is the same).
        ``form``: ``"block"`` (Eq. 3, RPSFT) or ``"complement"`` (‖ΔW‖² − ‖U_kᵀ ΔW V_k‖²: W0 and fp32 frames kept).
        """
        if full_rank_as not in FULL_RANK_RULES:
            raise ValueError(f"full_rank_as must be 'l2' (‖W − W0‖², the paper's rule) or 'eq3' (Eq. 3 on the "
                             f"full-rank bases), got {full_rank_as!r}")
        if form not in FORMS:
            raise ValueError(f"form must be 'block' (Eq. 3) or 'complement', got {form!r}")
        frame = parse_frame_dtype(frame_dtype)
        if form == "complement" and frame is not None:
            raise ValueError(f"frame_dtype={frame_dtype!r}: the complement needs fp32 frames — with 16-bit U_l, V_l "
                             "(orthonormal only to ≈ 3e-3) ‖ΔW‖² − ‖U_lᵀΔWV_l‖² is indefinite, so training could "
                             "drive it below zero; use frame_dtype='fp32'")
        matrices = select_matrices(model, targets, layers)
        for name, p in matrices:
            _refuse_partitioned(name, p)
        ranks = resolve_ranks([(n, tuple(p.shape)) for n, p in matrices], rank,
                              known=[n for n, _ in candidate_matrices(model)])  # a map's keys: the whole model
        cache = BasesCache(cache_dir)
        me, world_size = world()
        shapes = [tuple(p.shape) for _, p in matrices]
        plans = [_plan(ranks[n], shape, full_rank_as, form) for (n, _), shape in zip(matrices, shapes)]
        ks = [0 if plan is None else plan[1] for plan in plans]  # the k of each term with bases
        owners = assign_owners(shapes, ks, world_size)  # each SVD on one rank only, then broadcast
        terms, computed, w0s = {}, {}, {}
        iterator = list(enumerate(matrices))
        if progress and me == 0:
            from rich.progress import track

            iterator = track(iterator, description="anchor bases", transient=True)
        for i, (name, p) in iterator:
            k, shape = ranks[name], shapes[i]
            if plans[i] is None:
                continue
            if plans[i][0]:
                # keep W0 itself (only this rank's rows when the weight is an FSDP2 shard)
                local = p.detach().to_local() if is_dtensor(p) else p.detach()
                W0 = local.to(dtype=dtype, copy=True)
                ref = float(p.detach().full_tensor().double().pow(2).sum()) if is_dtensor(p) \
                    else float(W0.double().pow(2).sum())
                row0 = row_shard(p)[1] if is_dtensor(p) else None
                if ks[i] == 0:  # ‖W − W0‖² term
                    terms[i] = _Term(name, shape, k, W0=W0, ref_sq=ref, row0=row0)
                    continue
                w0s[i] = (W0, ref, row0)  # a complement term: its bases follow
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
            if i in w0s:  # complement: W0 + U_k, V_k; A = U_kᵀ(W − W0)V_k needs no σ_k
                W0, ref, row0 = w0s.pop(i)
                if row0 is not None:  # W0 holds this rank's rows only: cut U_k to the same rows now
                    U = U[row0:row0 + W0.shape[0]].contiguous()
                terms[i] = _Term(name, (m, n), k, U=U, V=V, W0=W0, ref_sq=ref, row0=row0)
                continue
            terms[i] = _Term(name, (m, n), k, U=U, S=S, V=V, ref_sq=float(S.double().pow(2).sum()))
        terms = [terms[i] for i in sorted(terms)]
        return cls(terms, dtype=dtype, form=form, full_rank_as=full_rank_as)

    @property
    def frame_dtype(self) -> torch.dtype:
        """Storage dtype of the frames U, V (``dtype`` unless built with bf16/fp16 lean frames)."""
        lean = [t.U.dtype for t in self.terms.values() if t.Aref is not None]
        return lean[0] if lean else self.dtype

    def _repr_extra(self) -> str:
        return ((f"{self.form}, " if self.form != "block" else "")
                + (f"full_rank_as={self.full_rank_as!r}, " if self.full_rank_as != "l2" else "")
                + (f"frames {self.frame_dtype}, " if self.frame_dtype != self.dtype else ""))

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
    @staticmethod
    def _project(U: torch.Tensor, W: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """U_kᵀ W V_k, associated so the second product is over the smaller side: (UᵀW)V costs k²n, Uᵀ(WV) k²m."""
        return (U.T @ W) @ V if W.shape[1] <= W.shape[0] else U.T @ (W @ V)

    @staticmethod
    def _lift(U: torch.Tensor, A: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """U_k A V_kᵀ (m×n), the k×k factor meeting the smaller side first."""
        return (U @ A) @ V.T if U.shape[0] <= V.shape[0] else U @ (A @ V.T)

    def _residual(self, t: _Term, W: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """In self.dtype: A = U_kᵀ W V_k − diag σ_k (k×k; − A_ref with lean frames); W − W0 where only W0 is kept;
        for a complement term the pair (ΔW, A = U_kᵀ ΔW V_k) — from ΔW, so no σ_k and no cancellation of σ-sized
        entries."""
        self._place(t, W.device)
        W = W.to(self.dtype)
        if t.full:
            return W - t.W0
        U, V = t.frames(self.dtype)
        if t.complement:
            D = W - t.W0
            return D, self._project(U, D, V)
        return self._project(U, W, V) - t.reference()

    def _sq(self, t: _Term, W: torch.Tensor) -> torch.Tensor:
        """One matrix's term of R, differentiable in W: ‖A‖², ‖W − W0‖², or the complement's ‖ΔW‖² − ‖A‖²."""
        r = self._residual(t, W)
        if t.complement:
            D, A = r
            return D.pow(2).sum() - A.pow(2).sum()
        return r.pow(2).sum()

    @ieee_fp32()
    def penalty(self, model: torch.nn.Module, record: bool = False,
                weight: dict[str, float] | None = None) -> torch.Tensor:
        """R = Σ ‖A‖²_F (complement: Σ ‖ΔW‖² − ‖A‖²) as a differentiable scalar (autograd path; training uses
        accumulate_grad_).

        ``record=True`` also keeps each matrix's term in ``last_sq`` (for drift logging) at no extra cost.
        ``weight`` (matrix name -> λ) returns Σ λ_i R_i instead (a budget per matrix type)."""
        params = self._params(model)
        total = None
        sq = []
        for name, t in self.terms.items():
            if is_dtensor(params[name]):
                raise NotImplementedError("penalty() is the autograd path for unsharded weights; under FSDP2 use "
                                          "accumulate_grad_ (closed form, returns R) or drift()")
            r = self._sq(t, params[name])
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
        """This rank's rows of W (FSDP2 Shard(0)); cuts U_k and W0 to the same rows once, freeing the rest."""
        local, row0, group = row_shard(p)
        rows = local.shape[0]
        if t.row0 is None:
            if t.W0 is not None:
                t.W0 = t.W0[row0:row0 + rows].contiguous()
            if t.U is not None:
                t.U = t.U[row0:row0 + rows].contiguous()
            t.row0 = row0
        elif t.row0 != row0 or (t.U if t.U is not None else t.W0).shape[0] != rows:
            raise RuntimeError(f"{t.name}: the weight was re-sharded after the anchor was cut to its rows; build the "
                               "anchor again after changing the sharding")
        return local.detach(), group

    @torch.no_grad()
    def _residuals(self, model: torch.nn.Module) -> list[tuple[_Term, torch.Tensor, Any, torch.Tensor]]:
        """(term, parameter, residual, its term of R summed over ranks) for every term, with one all-reduce. The
        residual is A, the local W − W0, or a complement's (local ΔW, A)."""
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
                    continue
                U, V = t.frames(self.dtype)
                if t.complement:
                    D = W - t.W0
                    A, d = U.T @ (D @ V), D.pow(2).sum()  # this shard's shares of U_kᵀ ΔW V_k and ‖ΔW‖²
                    partial += [A, d]
                    out.append((t, p, (D, A, d), None))
                else:
                    A = U.T @ (W @ V)  # this shard's share of U_kᵀ W V_k
                    partial.append(A)
                    out.append((t, p, A, None))
            else:
                r = self._residual(t, p.detach())
                if t.complement:
                    out.append((t, p, r, r[0].pow(2).sum() - r[1].pow(2).sum()))
                else:
                    out.append((t, p, r, r.pow(2).sum()))
        if partial:
            all_reduce_sum_(partial, group)  # in place: the partial A's are now Σ_r U_rᵀ W_r V_k (or of ΔW_r)
            for i, (t, p, A, sq) in enumerate(out):
                if sq is None and t.complement:
                    D, A, d = A
                    out[i] = (t, p, (D, A), d - A.pow(2).sum())
                elif sq is None:
                    A = A - t.reference()
                    out[i] = (t, p, A, A.pow(2).sum())
        return out

    @torch.no_grad()
    @ieee_fp32()
    def accumulate_grad_(self, model: torch.nn.Module, weight: float | dict[str, float] = 1.0) -> float:
        """Add ``weight · ∇R`` to each anchored parameter's ``.grad`` in closed form; return R (unweighted).

        ∇R = 2·U_k A V_kᵀ (2·(W − W0) where only W0 is kept; 2·(ΔW − U_k A V_kᵀ) for the complement). One pass:
        ≈ 4·m·n·k FLOP per matrix, no autograd graph. Under FSDP2 each rank adds its rows, 2·U_r A V_kᵀ (or
        2·(ΔW_r − U_r A V_kᵀ)), to its own gradient shard (see distributed.py).
        """
        res = self._residuals(model)
        for t, p, A, _ in res:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grad = p.grad.to_local() if is_dtensor(p.grad) else p.grad
            if t.full:
                G = A
            else:
                U, V = t.frames(self.dtype)
                G = A[0] - self._lift(U, A[1], V) if t.complement else self._lift(U, A, V)
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
        """Per matrix: ``abs`` = ‖A‖_F (‖W − W0‖_F where only W0 is kept; the complement's
        (‖ΔW‖² − ‖A‖²)^½), ``rel`` = abs / ‖σ_k‖ (/ ‖W0‖ where W0 is kept), ``k``, ``type``."""
        res = self._residuals(model)
        values = host_values(torch.stack([sq for *_, sq in res])) if res else []  # one sync for all matrices
        return {t.name: self._drift_row(t.name, v) for (t, *_), v in zip(res, values)}

    @torch.no_grad()
    @ieee_fp32()
    def project_ball_(self, model: torch.nn.Module, eps: float, group=None) -> dict[str, tuple[float, float]]:
        """Project each anchored block back into the ball ‖A‖_F ≤ ε·‖σ_k‖ in place (the hard rotation budget,
        docs/math.md "The ball"); returns per matrix (‖A‖² before, the scale c applied).

            W ← W − U_k (c·A) V_kᵀ,   c = (1 − ε‖σ_k‖ / ‖A‖)₊   ⇒   U_kᵀ W V_k − diag σ_k = (1 − c)·A

        U_k, V_k orthonormal: only the top-k block moves, by the least change (Frobenius) that reaches the ball.
        A term that keeps W0 (full rank) is the ball ‖W − W0‖ ≤ ε‖W0‖: W ← W0 + (1 − c)(W − W0). ε = 0 is the
        paper's constrained problem (Eq. 10): the block is put back at W0's. ``group`` (matrix name -> key) gives
        the matrices of a key one c, from their Σ‖A‖² and Σ‖σ_k‖² (the budget's d of the group); None: one c per
        matrix. Lean frames are orthonormal only to their rounding (≈ 2e-3 for bf16), so there c·A becomes
        G_U⁻¹ (c·A) G_V⁻¹ (G = UᵀU, VᵀV: the least change with U_lᵀ ΔW V_l = c·A; the Gram inverses are computed on
        the first call and kept, 2k² numbers per matrix), and the new A is still (1 − c)·A. Under FSDP2 each rank
        updates its own rows after the residuals' one all-reduce (the lean Grams take one more, on the first call).
        Computed in ``self.dtype`` and written back in the weight's dtype: a bf16 weight holds A only to its own
        rounding. Cost: the closed form's, one k×k reduction and one rank-k update per matrix (none inside the ball).
        """
        import math

        if getattr(self, "form", "block") != "block":
            raise ValueError("the ball holds the anchored top-k block; this anchor is the complement form, whose "
                             "term is not a block of W (use the block form with anchor.budget_form=ball)")
        res = self._residuals(model)
        if not res:
            return {}
        sq = host_values(torch.stack([s for *_, s in res]))  # one device sync for every matrix
        keys = [t.name if group is None else group(t.name) for t, *_ in res]
        num: dict[str, float] = {}
        den: dict[str, float] = {}
        for (t, *_), key, v in zip(res, keys, sq):
            num[key] = num.get(key, 0.0) + max(v, 0.0)
            den[key] = den.get(key, 0.0) + t.ref_sq
        scale = {}
        for key, a2 in num.items():
            a, r = math.sqrt(a2), eps * math.sqrt(den[key])
            scale[key] = 1.0 - r / a if math.isfinite(a) and a > r else 0.0  # non-finite: the finite guard's case
        grams = self.__dict__.setdefault("_ball_grams", {})  # name -> (G_U⁻¹, G_V⁻¹) of lean frames
        todo = [(t, p) for t, p, *_ in res if t.Aref is not None and t.name not in grams]
        if todo:
            parts, sharded, pg = [], [], None
            for t, p in todo:
                U, V = t.frames(self.dtype)  # U: this rank's rows under FSDP2 (cut by _residuals)
                parts.append((U.T @ U, V.T @ V))
                if is_dtensor(p):
                    sharded.append(parts[-1][0])
                    pg = row_shard(p)[2]
            all_reduce_sum_(sharded, pg)  # G_U = Σ_r U_rᵀ U_r (no-op without shards)
            for (t, _), (gu, gv) in zip(todo, parts):
                grams[t.name] = (torch.linalg.inv(gu), torch.linalg.inv(gv))
        for (t, p, A, _), key in zip(res, keys):
            c = scale[key]
            if c == 0.0:
                continue
            W = p.detach().to_local() if is_dtensor(p) else p.detach()  # this rank's rows, in place
            if t.full:
                G = A * c  # (local rows of) W − W0
            else:
                X = A * c
                if t.Aref is not None:
                    gu, gv = grams[t.name]
                    X = gu.to(X.device) @ X @ gv.to(X.device)  # no-op unless the model moved since the first call
                U, V = t.frames(self.dtype)
                G = self._lift(U, X, V)
            if W.dtype == G.dtype:
                W.sub_(G)
            else:  # a bf16/fp16 (or fp32 under an fp64 anchor) weight: update in self.dtype, round once
                W.copy_(W.to(G.dtype).sub_(G))
        return {t.name: (v, scale[key]) for (t, *_), key, v in zip(res, keys, sq)}
