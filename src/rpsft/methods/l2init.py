"""L2-Init (App. C): λ‖W − W0‖²_F on the selected matrices — the anchor at full rank k = min(m, n)."""

from . import Method, register

register(Method("l2init", "SFT + λ‖W−W0‖² on the selected matrices (anchor at k = min(m, n))", anchor="full",
                extra_memory="an fp32 copy of every anchored W0"))
