"""RPSFT: SFT + λ·Σ‖U_kᵀWV_k − diag σ_k‖² on the selected matrices (Eq. 4), paper defaults k=768, λ=1.

A matrix whose k reaches min(m, n) gets ‖W − W0‖² (App. C.2, Eq. 11; ``anchor.full_rank=l2``, the default) or Eq. 3
on its full-rank bases (``anchor.full_rank=eq3``); docs/math.md §5."""

from . import Method, register

register(Method("rpsft", "SFT + rotation anchor (k, λ, period from anchor.*)", anchor="on",
                extra_memory="(m+n+1)·k fp32 numbers per anchored matrix; an fp32 W0 instead where k reaches "
                             "min(m, n) (anchor.full_rank=l2; with eq3 only for a square one)"))
