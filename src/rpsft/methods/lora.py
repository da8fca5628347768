"""LoRA baseline (paper §5, App. D): PEFT LoRA r=32, α=64, dropout 0 on the seven projections.

The run directory holds the adapter (``trainer.save_model``); ``finalize`` also writes ``<output_dir>/merged``, a
plain checkpoint W0 + (α/r)·BA that every evaluation path loads like any other model (``lora.merge=false`` skips it).
"""

from __future__ import annotations

from typing import Any

from . import Method, register
from ._peft import export_merged, wrap_peft


def lora_config(cfg: Any):
    """PEFT ``LoraConfig`` from the ``lora:`` section, with the values checked first."""
    from peft import LoraConfig

    from ..config import ConfigError

    lo = cfg.lora
    if lo.r < 1:
        raise ConfigError(f"lora.r must be >= 1, got {lo.r}")
    if lo.alpha <= 0:
        raise ConfigError(f"lora.alpha must be > 0, got {lo.alpha}")
    if not 0.0 <= lo.dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {lo.dropout}")
    if not lo.targets:
        raise ConfigError("lora.targets is empty; name the modules to adapt, e.g. q_proj,v_proj")
    return LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=list(lo.targets),
                      bias="none", task_type="CAUSAL_LM")


def wrap_lora(model, cfg: Any, method: str = "lora"):
    return wrap_peft(model, lora_config(cfg), method, "lora", cfg.lora.targets, cfg.model.name)


def finalize(trainer, cfg, out_dir) -> dict:
    return export_merged(trainer, cfg, out_dir, enabled=cfg.lora.merge)


register(Method(
    "lora", "PEFT LoRA (r=32, α=64, dropout 0, seven projections); exports a merged checkpoint",
    anchor="off",  # the anchored variant is method=rpsft_lora (Eq. 5)
    prepare_model=wrap_lora, finalize=finalize, anchor_hint="the anchored LoRA is method=rpsft_lora",
    extra_memory="adapters r·(m+n) per adapted matrix (+ their Adam states); the full model gets no optimizer state",
))
