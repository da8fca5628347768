"""Top-k spectral bases of a pretrained weight: U_k (m×k), σ_k (k), V_k (n×k).

Three solvers:

* ``exact`` (default) — ``torch.linalg.svd``; the only one that is right on flat spectra.
* ``gram`` — eigh of the smaller Gram matrix (WᵀW or WWᵀ); about as accurate for the top of the spectrum
  (the squared condition number only hurts the small singular values we do not keep) and often faster.
* ``randomized`` — ``torch.svd_lowrank`` with ``niter`` power iterations. On SmolLM2 (the embedded checkpoint,
  de-quantised from Q4_1: docs/eval.md) the spectrum is flat (σ_k/σ_{k+1} ≈ 1.003), so the top-k subspace from
  a few iterations is badly wrong (niter < 4 is refused, any niter warns); check :func:`subspace_overlap`
  against exact (benchmarks/precompute.py) before using it.

Whatever the solver, σ is then refined as the Rayleigh quotient diag(U_kᵀ W0 V_k), accumulated in fp64: for the
fp32-rounded U_k, V_k actually stored this is the value that makes A = U_kᵀ W0 V_k − diag σ_k vanish on its
diagonal, so the penalty at initialisation is fp32 round-off of the off-diagonal only.

Bases are cached on disk (safetensors), keyed by a SHA-256 fingerprint of the weight bytes. A cache entry stores
the largest k computed so far; a smaller k is a prefix of it (nested-k reuse: top-256 ⊂ top-768). An entry whose
recorded fingerprint, shape or solver does not match is recomputed, never used. Every entry also records a
SHA-256 checksum of its tensors, and a loaded entry is checked against the weight it is used for (:func:`verify`:
UᵀU ≈ I, VᵀV ≈ I and R(W0) = ‖U_kᵀ W0 V_k − diag σ_k‖² at its round-off floor, Eq. 3); a file that fails either
check (bit rot, an edited file, a foreign writer) is recomputed and rewritten with a warning. A cache directory
that cannot be written (read-only, full) gives one warning and the run continues without caching.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOLVERS = ("exact", "gram", "randomized")
FORMAT_VERSION = "2"  # 2: + checksum of the tensors; format-1 entries are verified numerically
VERIFY_TOL = 1e-4  # relative; fp32 SmolLM2 bases measure below 3e-6 (exact and gram), a corrupted entry near O(1)


@dataclass
class Bases:
    U: torch.Tensor  # m×k, fp32, orthonormal columns
    S: torch.Tensor  # k, fp32 (Rayleigh-refined singular values)
    V: torch.Tensor  # n×k, fp32

    @property
    def k(self) -> int:
        return self.S.numel()

    def prefix(self, k: int) -> "Bases":
        return Bases(self.U[:, :k].contiguous(), self.S[:k].contiguous(), self.V[:, :k].contiguous())


def fingerprint(weight: torch.Tensor) -> str:
    """SHA-256 of the weight's dtype, shape and bytes: any change to W0 gives a new cache key."""
    w = weight.detach().contiguous().cpu()
    h = hashlib.sha256(f"{w.dtype}|{tuple(w.shape)}|".encode())
    # view as bytes (works for bf16 too, which numpy cannot represent)
    h.update(w.view(torch.uint8).numpy().tobytes() if w.numel() else b"")
    return h.hexdigest()


def _refine_sigma(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """σ_i = u_iᵀ W v_i in fp64 with the fp32-rounded vectors that will be stored (see module docstring)."""
    U64, V64 = U.float().double(), V.float().double()
    return ((U64.T @ W.double()) * V64.T).sum(dim=1).float()


def compute_bases(weight: torch.Tensor, k: int, solver: str = "exact", niter: int = 8,
                  oversample: int = 16, seed: int = 0) -> Bases:
    """Top-``k`` singular triplets of ``weight`` (computed in fp32 or better, on the weight's device)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown SVD solver {solver!r}; choose one of {SOLVERS}")
    m, n = weight.shape
    if not 0 < k <= min(m, n):
        raise ValueError(f"k={k} must be in 1..min(m, n)={min(m, n)} for a {m}×{n} matrix")
    if solver == "randomized":
        _check_randomized(niter)
    return solve_bases(weight, k, solver, niter, oversample, seed)


def solve_bases(weight: torch.Tensor, k: int, solver: str = "exact", niter: int = 8,
                oversample: int = 16, seed: int = 0) -> Bases:
    """:func:`compute_bases` without its argument checks and the randomized-niter guard: the solver itself.
    For measurement (``benchmarks/precompute.py`` times niter=2 to show why it is refused); use compute_bases."""
    m, n = weight.shape
    W = weight.detach().float()
    if solver == "exact":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, V = U[:, :k], Vh[:k].T
    elif solver == "gram":
        # eigh of the smaller Gram matrix in fp64: squaring the condition number costs only the tail we discard.
        W64 = W.double()
        if m >= n:
            evals, evecs = torch.linalg.eigh(W64.T @ W64)
            V = evecs[:, -k:].flip(1)
            S = evals[-k:].flip(0).clamp_min(0).sqrt()
            U = (W64 @ V) / S.clamp_min(torch.finfo(torch.float64).tiny)
        else:
            evals, evecs = torch.linalg.eigh(W64 @ W64.T)
            U = evecs[:, -k:].flip(1)
            S = evals[-k:].flip(0).clamp_min(0).sqrt()
            V = (W64.T @ U) / S.clamp_min(torch.finfo(torch.float64).tiny)
        U, V = U.float(), V.float()
    else:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)  # reproducible sketches without disturbing the caller's RNG stream
        try:
            U, S, V = torch.svd_lowrank(W, q=min(k + oversample, min(m, n)), niter=niter)
        finally:
            torch.random.set_rng_state(gen_state)
        U, V = U[:, :k], V[:, :k]
    U, V = U.contiguous().float(), V.contiguous().float()
    return Bases(U, _refine_sigma(W, U, V), V)


RANDOMIZED_MIN_NITER = 4


def _check_randomized(niter: int) -> None:
    """Randomized bases on flat spectra are wrong at low niter (measured on SmolLM2, docs/math.md §8)."""
    if niter < RANDOMIZED_MIN_NITER:
        raise ValueError(
            f"svd=randomized with niter={niter} finds the wrong top-k subspace on flat spectra (all 210 SmolLM2 "
            "projections, k=128: min overlap with the exact basis 0.76, median 0.91 at niter=2). Use niter >= "
            f"{RANDOMIZED_MIN_NITER}, or better svd=gram or svd=exact (exact bases; 8.6 s and 10.9 s for all 210 "
            "matrices on 2 CPU cores)")
    import warnings

    warnings.warn(
        f"svd=randomized (niter={niter}) gives approximate top-k bases: on SmolLM2's flat spectra (σ_k/σ_k+1 median "
        "1.003) the top-128 subspace overlap with the exact basis is below 0.99 for 161 of 210 matrices at niter=4 "
        "and still 39 at niter=16, which is slower than exact SVD on CPU. The anchor would hold a frame the "
        "pretrained model does not have; prefer svd=gram or exact, and check your model with "
        "benchmarks/precompute.py", stacklevel=3)


def subspace_overlap(A: torch.Tensor, B: torch.Tensor) -> float:
    """‖AᵀB‖²_F / k for orthonormal m×k A, B: 1 for the same subspace, k/m for random ones."""
    return float((A.double().T @ B.double()).pow(2).sum() / A.shape[1])


class BasesCache:
    """On-disk cache of bases, one safetensors file per weight fingerprint."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root).expanduser() if root is not None else None

    def _path(self, fp: str, solver: str) -> Path:
        return self.root / f"{fp[:40]}-{solver}.safetensors"

    def load(self, fp: str, shape: tuple[int, int], k: int, solver: str) -> Bases | None:
        if self.root is None:
            return None
        path = self._path(fp, solver)
        if not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                stored_k = int(meta.get("k", -1))
                ok = (meta.get("fingerprint") == fp and meta.get("shape") == f"{shape[0]}x{shape[1]}"
                      and meta.get("solver") == solver and meta.get("format") in ("1", FORMAT_VERSION))
                if not ok:
                    log.warning("bases cache %s does not match this weight (fingerprint/shape/solver); recomputing",
                                path)
                    return None
                if stored_k < k:
                    return None
                b = Bases(f.get_tensor("U"), f.get_tensor("S"), f.get_tensor("V"))
        except Exception as e:  # a torn or foreign file is a cache miss, never a crash or a silent use
            log.warning("unreadable bases cache %s (%s); recomputing", path, e)
            return None
        if b.U.shape != (shape[0], stored_k) or b.V.shape != (shape[1], stored_k) or b.S.shape != (stored_k,):
            log.warning("bases cache %s has wrong tensor shapes; recomputing", path)
            return None
        if "checksum" in meta and meta["checksum"] != checksum(b):
            log.warning("bases cache %s fails its checksum (the file changed after it was written); recomputing "
                        "and rewriting it", path)
            return None
        return b.prefix(k)

    def save(self, fp: str, shape: tuple[int, int], solver: str, b: Bases) -> None:
        if self.root is None:
            return
        from safetensors.torch import save_file

        from .fileio import atomic_path

        meta = {"fingerprint": fp, "shape": f"{shape[0]}x{shape[1]}", "k": str(b.k), "solver": solver,
                "format": FORMAT_VERSION, "checksum": checksum(b)}
        try:
            with atomic_path(self._path(fp, solver)) as tmp:
                save_file({"U": b.U.cpu().contiguous(), "S": b.S.cpu().contiguous(), "V": b.V.cpu().contiguous()},
                          str(tmp), metadata=meta)
        except OSError as e:  # read-only or full: the bases are right, only the cache is lost
            log.warning("cannot write the bases cache in %s (%s); running without caching bases (set "
                        "anchor.cache_dir or RPSFT_CACHE to a writable directory)", self.root, e.strerror or e)
            self.root = None


def checksum(b: Bases) -> str:
    """SHA-256 of the stored tensors' bytes (U, S, V in that order)."""
    h = hashlib.sha256()
    for t in (b.U, b.S, b.V):
        h.update(t.detach().float().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def verify(b: Bases, weight: torch.Tensor, tol: float = VERIFY_TOL, probes: int = 8, floor: bool = True) -> str | None:
    """Why ``b`` is not the top-k basis of ``weight`` (None if it is, to tolerance).

    Checks ‖(UᵀU − I)x‖, ‖(VᵀV − I)x‖ and ‖(UᵀW0V − diag σ)x‖ (the matrix A of Eq. 3, whose ‖·‖²_F is R(W0)) for
    ``probes`` fixed Gaussian vectors x: E‖Mx‖² = ‖M‖²_F, so this measures the Frobenius norms at O((m+n)k + mn)
    per probe instead of the O(mnk) of forming UᵀW0V (as costly as the SVD it would check). ``floor=False`` skips
    the R(W0) check, for randomized bases, whose approximate subspace leaves A off-diagonal by design."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    W = weight.detach().float()
    U, S, V = (t.to(W.device, torch.float32) for t in (b.U, b.S, b.V))
    if not (torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(V).all()):
        return "non-finite entries"
    x = torch.randn(b.k, probes, generator=gen).to(W.device)
    xn = float(x.norm())
    for name, Q in (("U", U), ("V", V)):
        err = float((Q.T @ (Q @ x) - x).norm()) / xn
        if not err <= tol:
            return f"{name} is not orthonormal (‖({name}ᵀ{name} − I)x‖/‖x‖ = {err:.2e} > {tol:g})"
    if not floor:
        return None
    scale = float(S.abs().max()) if S.numel() else 0.0
    rel = float((U.T @ (W @ (V @ x)) - S[:, None] * x).norm()) / (xn * max(scale, 1e-30))
    if not rel <= tol:
        return f"R(W0) is not at its round-off floor (‖(UᵀW0V − diag σ)x‖/(σ₁‖x‖) = {rel:.2e} > {tol:g})"
    return None


def get_bases(weight: torch.Tensor, k: int, solver: str = "exact", cache: BasesCache | None = None,
              niter: int = 8, fp: str | None = None) -> Bases:
    """Cached top-k bases of ``weight``. ``fp`` may be passed when the fingerprint is already known."""
    cache = cache or BasesCache(None)
    shape = tuple(weight.shape)
    tag = solver if solver != "randomized" else f"randomized{niter}"  # a different niter is a different basis
    if cache.root is not None:
        fp = fp or fingerprint(weight)
        hit = cache.load(fp, shape, k, tag)
        if hit is not None:
            why = verify(hit, weight, floor=solver != "randomized")
            if why is None:
                return hit
            log.warning("bases cache %s does not hold this weight's top-%d basis (%s); recomputing and rewriting it",
                        cache._path(fp, tag), k, why)
    b = compute_bases(weight, k, solver=solver, niter=niter)
    if cache.root is not None:
        cache.save(fp, shape, tag, b)
    return b
