"""L2-Init (App. C): λ‖W − W0‖²_F on the selected matrices, square or not.

The same anchor as ``method=rpsft`` at ``anchor.rank=1.0`` under the paper's full-rank rule (App. C.2, Eq. 11;
``anchor.full_rank=l2``, the default): train.build_anchor(full_rank=True) asks for k = min(m, n) and
``full_rank_as="l2"``, which keeps W0 for every matrix whatever ``anchor.rank`` says. ``anchor.full_rank=eq3`` would
make it Eq. 3 at full rank, which is not L2-Init on a non-square matrix, so it is refused."""

from . import Method, register


def check(cfg) -> None:
    if cfg.anchor.full_rank != "l2":
        raise ValueError(f"method=l2init is ‖W − W0‖² on every matrix; anchor.full_rank={cfg.anchor.full_rank} would "
                         "make it Eq. 3 at full rank — drop the override, or use method=rpsft with anchor.rank=1.0 "
                         "and anchor.full_rank=eq3")


register(Method("l2init", "SFT + λ‖W−W0‖² on the selected matrices, square or not (L2-Init)", anchor="full",
                extra_memory="an fp32 copy of every anchored W0", check=check))
