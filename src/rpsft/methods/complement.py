"""The complement anchor: SFT + λ·Σ(‖ΔW‖² − ‖U_kᵀ ΔW V_k‖²), ΔW = W − W0 — L2-Init on everything but RPSFT's block.

With P_U = U_kU_kᵀ, P_V = V_kV_kᵀ, ΔW splits Frobenius-orthogonally into the block P_U ΔW P_V and the rest, so

    ‖ΔW‖² = ‖U_kᵀ ΔW V_k‖² + R_c            L2-Init (App. C) = RPSFT (Eq. 3) + complement, at equal λ and k
    ∇R_c  = 2(ΔW − U_k A V_kᵀ),  A = U_kᵀ ΔW V_k

Together with SFT, RPSFT and L2-Init it completes a 2×2 design: {top-k block free / anchored} × {the rest free /
anchored}. It is ``RotationAnchor(form="complement")`` (W0 and fp32 U_k, V_k per matrix), applied by the same
AnchorMixin as RPSFT: once per optimizer step, with ``anchor.period``, the rotation budget, the autograd path
under DeepSpeed ZeRO-1/2, FSDP2 row shards and the same ``rpsft/*`` logs. A matrix whose k reaches min(m, n) has an
empty complement under ``anchor.full_rank=l2`` (the paper's rule, where RPSFT there is ‖ΔW‖²) and on a square matrix
under either rule, and is dropped; k = 0 gives ‖ΔW‖² (L2-Init on that matrix). docs/math.md §12.
"""

from . import Method, register


def check(cfg) -> None:
    if cfg.anchor.frame_dtype != "fp32":
        raise ValueError(f"method=complement needs fp32 frames, got anchor.frame_dtype={cfg.anchor.frame_dtype}: with "
                         "16-bit U_l, V_l (orthonormal only to ≈ 3e-3) ‖ΔW‖² − ‖U_lᵀΔWV_l‖² is indefinite and "
                         "training could drive it below zero — set anchor.frame_dtype=fp32")


register(Method("complement", "SFT + λ(‖ΔW‖² − ‖U_kᵀΔWV_k‖²): L2-Init on all but RPSFT's top-k block",
                anchor="on", anchor_form="complement", check=check,
                extra_memory="an fp32 W0 + (m+n)·k fp32 numbers (U_k, V_k) per anchored matrix; nothing where k "
                             "reaches min(m, n) (empty complement; with anchor.full_rank=eq3 a non-square one keeps "
                             "both)"))
