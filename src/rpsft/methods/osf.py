"""Orthogonal Subspace Fine-tuning (PEFT ``OSFConfig``, peft ≥ 0.18): the hard-projection relative of RPSFT.

Per adapted matrix OSF splits the pretrained SVD at ``effective_rank`` k: the top-k part U_h S_h V_hᵀ is frozen, the
rest U_l S_l V_lᵀ is trained with gradients projected orthogonal to U_h / V_h. Under SGD, U_l and V_l never enter the
frozen subspaces, so U_hᵀ W V_h = S_h holds exactly: RPSFT's penalty at the same k stays zero, and OSF additionally
freezes the off-diagonal blocks U_hᵀ W V_l = 0 that RPSFT leaves free — a hard constraint where RPSFT has a soft
one. (Adam divides the projected gradient element-wise by √v, which leaks slightly out of the complement; the k×k
block sees that leak only squared: 2e-6 of ‖ΔW‖² in tests/methods/test_osf.py.) That is why OSF refuses the rotation
anchor: at k ≤ effective_rank the anchor is (near) zero by construction, at larger k it would fight the frozen split.

Memory (peft 0.21.2, osf/layer.py): per adapted m×n matrix with d = min(m, n), it trains U_l, S_l, V_l
((m + n + 1)·(d − k) numbers, ≈ the matrix itself at PEFT's default k = d/2, plus their Adam states) and keeps a
frozen copy of them at init (for the merge delta) and U_h or V_h for non-square matrices — roughly 2–3× the adapted
weights on top of the base model, i.e. more than full fine-tuning's weights, not less.

``<output_dir>`` holds the adapter; ``<output_dir>/merged`` a plain checkpoint (``osf.merge=false`` skips it).
"""

from __future__ import annotations

from typing import Any

from . import Method, register
from ._peft import export_merged, wrap_peft


def osf_config(cfg: Any):
    from peft import OSFConfig

    from ..config import ConfigError

    k = cfg.osf.effective_rank
    if isinstance(k, str) and k.lower() in ("none", "null", ""):
        k = None
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, (int, float)) or k <= 0 or (isinstance(k, float) and k > 1
                                                                                 and not k.is_integer()):
            raise ConfigError(f"osf.effective_rank must be a positive int, a fraction in (0, 1] of min(m, n), or "
                              f"null (PEFT's default, half), got {cfg.osf.effective_rank!r}")
        k = int(k) if isinstance(k, float) and k > 1 else k
    if not cfg.osf.targets:
        raise ConfigError("osf.targets is empty; name the modules to adapt, e.g. q_proj,v_proj")
    return OSFConfig(effective_rank=k, target_modules=list(cfg.osf.targets), task_type="CAUSAL_LM")


def wrap_osf(model, cfg: Any):
    return wrap_peft(model, osf_config(cfg), "osf", "osf", cfg.osf.targets, cfg.model.name)


def finalize(trainer, cfg, out_dir) -> dict:
    return export_merged(trainer, cfg, out_dir, enabled=cfg.osf.merge)


def check(cfg: Any) -> None:
    """OSF cannot run under FSDP: PEFT projects the U_l, V_l gradients with tensor hooks registered on those
    parameters (osf/layer.py ``_attach_hooks``), and ``fully_shard`` replaces every parameter by a sharded one whose
    gradient FSDP writes itself, so the hooks never fire and U_l, V_l train unprojected (the gradient of U_l off by
    46 % on a tiny Llama, tests/launch). Refused at startup; DDP keeps the parameters and their hooks."""
    from ..launch import fsdp_launch

    if fsdp_launch() is not None:
        raise ValueError("method=osf under FSDP (the accelerate config's distributed_type): PEFT's OSF projects its "
                         "gradients with hooks on parameters that fully_shard replaces, so it would train without "
                         "its projection; launch osf with DDP (one whole model per process) or in one process")


register(Method(
    "osf", "PEFT OSF: top-k singular subspace frozen, the rest trained with projected gradients",
    anchor="off",  # OSF is a hard version of the anchor; see the module docstring
    prepare_model=wrap_osf, finalize=finalize, check=check,
    anchor_hint="OSF already freezes the top-k frame; for a soft anchor use method=rpsft",
    extra_memory="trainable low-rank SVD factors + a frozen copy of them + U_h or V_h (≈2–3× the adapted weights)",
))
