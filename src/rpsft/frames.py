"""Lean frames: U_k, V_k stored in bf16/fp16 with an exact k×k reference block (half the anchor's memory).

Rounding the frames to 8 (bf16) or 11 (fp16) mantissa bits breaks the identity U_kᵀ W0 V_k = diag σ_k that the
fp32 anchor subtracts (Eq. 3): the rounded U_l, V_l no longer diagonalise W0, and ‖U_lᵀ W0 V_l − diag σ_k‖² is of the
order of the rounding times Σσ², not zero (the authors' fp16 bases leave R ≈ 1e-4 per matrix at initialisation).
The fix is to subtract the reference that belongs to the stored frames:

    A_ref = U_lᵀ W0 V_l   (k×k, accumulated once in fp64 from the rounded frames)
    R(W)  = ‖U_lᵀ W V_l − A_ref‖²_F = ‖U_lᵀ (W − W0) V_l‖²_F                          (Eq. 3 on the frame U_l, V_l)

which is zero at W0 up to fp32 round-off of the product, whatever the frame's precision. The frame itself is the
exact one turned by a small angle (measured in docs/math.md §7: 2.2e-3 rad for bf16, 2.8e-4 for fp16), and its
columns are orthonormal to the same order; the penalty is still the squared projection of the drift W − W0 onto a
k-dimensional pair of subspaces. Frames are upcast to the compute dtype one matrix at a time inside the penalty and
its gradient, so the transient memory is one matrix's fp32 frames.

A_ref is stored split: its diagonal σ_k = diag A_ref in fp32 (the Rayleigh quotients of the rounded frames, also the
drift scale), its off-diagonal in fp16 with a zero diagonal. The off-diagonal entries are of the order of the frame
rounding times σ (the rounded frames almost diagonalise W0), so fp16's 11 mantissa bits leave an error of the order
of the fp32 round-off of the product: measured on SmolLM2 with bf16 frames, R(W0) = 9.6e-14·Σσ² against 3.7e-14 with
the whole block in fp32 (docs/math.md §7). fp16 rather than bf16 because the entries are small, so fp16's range is
ample and its 3 extra mantissa bits count (the off-diagonal in bf16 measured larger, §7). The
rounding error is computed per matrix when the reference is stored; where it exceeds ``OFFDIAG_TOL``·‖σ_k‖² or an
entry overflows fp16, that matrix keeps its off-diagonal in fp32 (``store_offdiag``). The compute upcasts
A_ref = diag σ_k + off-diagonal per matrix (one transient k×k block).

Storage per low-rank matrix: (m + n)·k·2 + k·4 + k²·2 bytes (frames, σ_k, fp16 off-diagonal; + k²·2 more for a
matrix whose off-diagonal fell back to fp32) against (m + n + 1)·k·4 for fp32 frames. fp32 frames keep the
σ-diagonal form, so the default path's memory and cost are unchanged: an A_ref for them would remove the small
off-diagonal that fp32 rounding of U, V leaves at W0 (measured in docs/math.md §7: R(W0) 8.6e-13 → 4.0e-14 of Σσ²
on SmolLM2), but costs k²·2 more bytes per matrix (+2.2 % at k = 768 on Qwen2.5-7B, +5.6 % for SmolLM2's 576×576 at
k = 128); ``lean_bases(W0, b, torch.float32)`` computes it for experiments.

Cache: the rounded frames and A_ref are stored next to the fp32 bases (``…-<solver>-<frame>.safetensors``), keyed by
the same weight fingerprint, nested in k like them (the top-left k×k block of A_ref belongs to the first k columns),
in the stored format (σ_k fp32, off-diagonal fp16 or its fp32 fallback). On load A_ref is checked against the frames
and the weight with one random probe, A_ref·x = U_lᵀ(W0(V_l·x)) in fp64 (O(m·n) work), so a foreign or damaged
entry is recomputed, never used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .bases import Bases, BasesCache, fingerprint, get_bases

log = logging.getLogger(__name__)

FRAME_DTYPES = {"fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                "fp16": torch.float16, "float16": torch.float16}
FRAME_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
FORMAT_VERSION = "2"  # 2: A_ref stored as σ_k (fp32) + off-diagonal (fp16, or fp32 fallback)
PROBE_TOL = 1e-4  # relative; A_ref is fp32/fp16-rounded fp64, the probe is fp64: a genuine entry agrees to ~1e-7
OFFDIAG_DTYPE = torch.float16
# Largest rounding error ‖off − fp16(off)‖²_F allowed per matrix, relative to ‖σ_k‖²; measured 9.6e-14 (worst 2e-13)
# on SmolLM2 with bf16 frames. It is 1000× below the precision goal R(W0) ≤ 1e-6·Σσ², so a matrix that would
# exceed it is an outlier (huge off-diagonal: not the frames of this weight, or a degenerate spectrum) and keeps fp32.
OFFDIAG_TOL = 1e-9


def parse_frame_dtype(frame_dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``None`` for full-precision frames (fp32, the default), else torch.bfloat16 / torch.float16."""
    if frame_dtype is None or frame_dtype == torch.float32:
        return None
    if isinstance(frame_dtype, torch.dtype):
        if frame_dtype in FRAME_NAMES:
            return frame_dtype
    elif str(frame_dtype).lower() in FRAME_DTYPES:
        return FRAME_DTYPES[str(frame_dtype).lower()]
    raise ValueError(f"anchor frame_dtype {frame_dtype!r} is not supported; use fp32 (default), bf16 or fp16")


@dataclass
class LeanBases(Bases):
    """Rounded frames U (m×k), V (n×k) in bf16/fp16, σ = diag A_ref (k, fp32) and A = the off-diagonal of
    A_ref = UᵀW0V (k×k, zero diagonal, fp16; fp32 where ``store_offdiag`` fell back)."""

    A: torch.Tensor | None = None

    def prefix(self, k: int) -> "LeanBases":
        b = super().prefix(k)
        return LeanBases(b.U, b.S, b.V, self.A[:k, :k].contiguous())

    def reference(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """A_ref = diag σ + off-diagonal in ``dtype``."""
        return reference(self.S, self.A, dtype)


def reference(S: torch.Tensor, off: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A_ref = diag σ_k + off-diagonal, upcast to the compute ``dtype`` (a transient k×k block). The stored
    off-diagonal has an exactly zero diagonal, so the diagonal is σ_k to the last bit."""
    return off.to(dtype) + torch.diag_embed(S.to(dtype))


def store_offdiag(off: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """Storage of A_ref's off-diagonal ``off`` (zero diagonal): fp16 when every entry is finite in fp16 and the
    rounding error ‖off − fp16(off)‖²_F ≤ OFFDIAG_TOL·‖σ_k‖², else fp32 — the error adds to R(W0) one-for-one, so
    fp16 is kept only where it is far below the penalty's own round-off. Deterministic in ``off``: FSDP2 ranks that
    receive ``off`` (fp16 values travel exactly in fp32) reach the owner's decision."""
    off = off.float()
    half = off.to(OFFDIAG_DTYPE)
    if bool(torch.isfinite(half).all()):
        err = float((off.double() - half.double()).pow(2).sum())
        if err <= OFFDIAG_TOL * float(S.double().pow(2).sum()):
            return half
    return off.contiguous()


def split_reference(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ_k = diag A in fp32, stored off-diagonal) of a k×k reference block ``A``."""
    A = A.float()
    S = torch.diagonal(A).contiguous()
    return S, store_offdiag(A - torch.diag_embed(S), S)


def reference_block(W0: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """A_ref = Uᵀ W0 V accumulated in fp64 with the stored (rounded) frames, returned in fp32."""
    m, n = W0.shape
    W64 = W0.detach().double()
    U64, V64 = U.to(W64.device).double(), V.to(W64.device).double()
    A = (U64.T @ W64) @ V64 if n <= m else U64.T @ (W64 @ V64)
    return A.float()


def lean_bases(W0: torch.Tensor, b: Bases, frame_dtype: torch.dtype) -> LeanBases:
    """Round fp32 bases ``b`` of ``W0`` to ``frame_dtype`` and compute the reference block of the rounded frames."""
    U, V = b.U.to(frame_dtype), b.V.to(frame_dtype)
    S, off = split_reference(reference_block(W0, U, V))
    return LeanBases(U, S, V, off)


def _path(cache: BasesCache, fp: str, tag: str, frame: str):
    return cache.root / f"{fp[:40]}-{tag}-{frame}.safetensors"


def _probe_ok(W0: torch.Tensor, b: LeanBases) -> bool:
    """One random probe of A_ref = U_lᵀ W0 V_l in fp64 (deterministic: its own generator)."""
    x = torch.randn(b.k, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(W0.device)
    dev = W0.device
    want = b.U.to(dev).double().T @ (W0.double() @ (b.V.to(dev).double() @ x))
    got = b.reference().to(dev) @ x
    return float((got - want).norm()) <= PROBE_TOL * max(float(want.norm()), 1e-30)


def _load(cache: BasesCache, fp: str, W0: torch.Tensor, k: int, tag: str, frame_dtype: torch.dtype
          ) -> LeanBases | None:
    frame = FRAME_NAMES[frame_dtype]
    path = _path(cache, fp, tag, frame)
    if not path.is_file():
        return None
    from safetensors import safe_open

    m, n = W0.shape
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            stored_k = int(meta.get("k", -1))
            if not (meta.get("fingerprint") == fp and meta.get("shape") == f"{m}x{n}" and meta.get("solver") == tag
                    and meta.get("frame") == frame and meta.get("format") == FORMAT_VERSION):
                log.warning("lean bases cache %s does not match this weight or format (fingerprint/shape/solver/"
                            "frame/format); recomputing", path)
                return None
            if stored_k < k:
                return None
            U, V, S, A = f.get_tensor("U"), f.get_tensor("V"), f.get_tensor("S"), f.get_tensor("A")
    except Exception as e:  # a torn or foreign file is a cache miss, never a crash or a silent use
        log.warning("unreadable lean bases cache %s (%s); recomputing", path, e)
        return None
    if (U.shape != (m, stored_k) or V.shape != (n, stored_k) or A.shape != (stored_k, stored_k)
            or S.shape != (stored_k,) or U.dtype != frame_dtype or V.dtype != frame_dtype
            or S.dtype != torch.float32 or A.dtype not in (OFFDIAG_DTYPE, torch.float32)
            or bool(torch.diagonal(A).ne(0).any())):
        log.warning("lean bases cache %s has wrong tensor shapes or dtypes; recomputing", path)
        return None
    b = LeanBases(U, S, V, A).prefix(k)
    if not _probe_ok(W0, b):
        log.warning("lean bases cache %s: A_ref does not match U_lᵀ W0 V_l; recomputing", path)
        return None
    return b


def _save(cache: BasesCache, fp: str, shape: tuple[int, int], tag: str, frame_dtype: torch.dtype,
          b: LeanBases) -> None:
    from safetensors.torch import save_file

    from .fileio import atomic_path

    frame = FRAME_NAMES[frame_dtype]
    meta = {"fingerprint": fp, "shape": f"{shape[0]}x{shape[1]}", "k": str(b.k), "solver": tag, "frame": frame,
            "format": FORMAT_VERSION}
    with atomic_path(_path(cache, fp, tag, frame)) as tmp:
        save_file({"U": b.U.cpu().contiguous(), "V": b.V.cpu().contiguous(), "S": b.S.cpu().contiguous(),
                   "A": b.A.cpu().contiguous()},
                  str(tmp), metadata=meta)


def get_lean_bases(weight: torch.Tensor, k: int, frame_dtype: torch.dtype, solver: str = "exact",
                   cache: BasesCache | None = None, niter: int = 8) -> LeanBases:
    """Cached lean frames of ``weight`` at rank ``k``: from the lean cache entry when it covers k and passes the
    probe, else from the fp32 bases (themselves cached) rounded to ``frame_dtype``, with A_ref recomputed."""
    cache = cache or BasesCache(None)
    tag = solver if solver != "randomized" else f"randomized{niter}"
    fp = fingerprint(weight) if cache.root is not None else None
    if fp is not None:
        hit = _load(cache, fp, weight, k, tag, frame_dtype)
        if hit is not None:
            return hit
    b = lean_bases(weight, get_bases(weight, k, solver=solver, cache=cache, niter=niter, fp=fp), frame_dtype)
    if fp is not None and cache.root is not None:  # None: the bases cache could not be written (already warned)
        try:
            _save(cache, fp, tuple(weight.shape), tag, frame_dtype, b)
        except OSError as e:  # read-only or full: the frames are right, only the cache is lost
            log.warning("cannot write the lean bases cache in %s (%s); running without caching bases",
                        cache.root, e.strerror or e)
            cache.root = None
    return b


def anchor_nbytes(shapes: list[tuple[int, int]], k: int, frame_dtype: torch.dtype | None = None,
                  full_rank_as: str = "l2", form: str = "block") -> int:
    """Bytes of a RotationAnchor over ``shapes`` at rank ``k`` (k clipped to min(m, n)).

    block (Eq. 3): a matrix whose term is ‖W − W0‖² keeps fp32 W0, m·n·4 bytes — every matrix at k = min(m, n)
    under the paper's rule (``full_rank_as="l2"``, the default), only a square one with ``"eq3"``; the others keep
    (m + n + 1)·k·4 with fp32 frames, (m + n)·k·2 + k·4 + k²·2 with bf16/fp16 frames (frames, σ_k, fp16
    off-diagonal of A_ref; a matrix whose off-diagonal falls back to fp32 adds k²·2).
    complement (fp32 frames only): m·n·4 + (m + n)·k·4 (W0, U_k, V_k; no σ_k), nothing where the block is all of
    ΔW (the same full-rank rule), m·n·4 at k = 0."""
    total = 0
    for m, n in shapes:
        kk = min(k, m, n)
        whole = kk >= min(m, n) and (full_rank_as == "l2" or m == n)  # the block is all of ΔW
        if form == "complement":
            total += 0 if whole else m * n * 4 + (m + n) * kk * 4
        elif whole:
            total += m * n * 4
        elif frame_dtype is None:
            total += (m + n + 1) * kk * 4
        elif kk:
            total += (m + n) * kk * torch.finfo(frame_dtype).bits // 8 + kk * 4 + kk * kk * 2
    return total
