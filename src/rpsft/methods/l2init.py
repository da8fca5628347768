"""L2-Init (App. C): λ‖W − W0‖²_F on the selected matrices, square or not.

Not the same as ``method=rpsft`` at k = min(m, n): on a non-square matrix Eq. 3 at full rank is ‖P_U ΔW P_V‖², which
leaves the part of ΔW outside W0's column/row space free. train.build_anchor(full_rank=True) asks the anchor for
``full_rank_as="l2"``, which keeps W0 for every matrix."""

from . import Method, register

register(Method("l2init", "SFT + λ‖W−W0‖² on the selected matrices, square or not (L2-Init)", anchor="full",
                extra_memory="an fp32 copy of every anchored W0"))
