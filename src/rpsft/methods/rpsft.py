"""RPSFT: SFT + λ·Σ‖U_kᵀWV_k − diag σ_k‖² on the selected matrices (Eq. 4), paper defaults k=768, λ=1."""

from . import Method, register

register(Method("rpsft", "SFT + rotation anchor (k, λ, period from anchor.*)", anchor="on",
                extra_memory="(m+n+1)·k fp32 numbers per anchored matrix; W0 only for a square one at k = min(m, n)"))
