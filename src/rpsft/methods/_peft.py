"""Shared PEFT glue for the adapter methods (lora, rpsft_lora, osf): wrap, count, export a merged checkpoint."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch


def refuse_peft(model: torch.nn.Module, method: str) -> None:
    if hasattr(model, "peft_config"):
        raise ValueError(f"method {method!r}: model.name already carries a PEFT adapter; merge it into a plain "
                         "checkpoint first (the merged/ folder of a lora/osf run) and train from that")


def wrap_peft(model: torch.nn.Module, peft_config: Any, method: str, section: str, targets: list[str],
              model_name: str) -> torch.nn.Module:
    """``get_peft_model`` with our errors: a model that already has an adapter, and targets that match nothing
    (named as the config key ``{section}.targets`` the user has to change)."""
    from peft import get_peft_model

    refuse_peft(model, method)
    try:
        return get_peft_model(model, peft_config)
    except ValueError as e:
        if "not found in the base model" in str(e):
            raise ValueError(f"{section}.targets={list(targets)} matches no module of {model_name}: {e}") from None
        raise


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return train, sum(p.numel() for p in model.parameters())


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with every active adapter folded in (W0 + ΔW), adapter tensors dropped.

    Unlike ``merge_and_unload`` this leaves the PEFT model untouched (OSF cannot unmerge, and train() still reads
    the adapters after finalize for the run summary). Costs one extra copy of each adapted weight, one at a time.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    tuners = {name: mod for name, mod in base.named_modules() if isinstance(mod, BaseTunerLayer)}
    out: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict().items():
        mod = key.rsplit(".", 1)[0]
        owner = next((m for m in _prefixes(mod) if m in tuners), None)
        if owner is None:
            out[key] = value
            continue
        rest = key[len(owner) + 1:]
        if not rest.startswith("base_layer."):
            continue  # adapter parameter or buffer (lora_A, osf_svd_params, _osf_* ...)
        new_key = f"{owner}.{rest[len('base_layer.'):]}"
        if rest == "base_layer.weight":
            layer = tuners[owner]
            w = value.detach().clone()
            if not layer.merged:
                for adapter in layer.active_adapters:
                    w += layer.get_delta_weight(adapter).detach().to(w.dtype)
            value = w
        out[new_key] = value
    return out


def _prefixes(module: str):
    """``a.b.c`` -> ``a.b.c``, ``a.b``, ``a`` (the tuner layer may sit above the key's own module)."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        yield ".".join(parts[:i])


def export_merged(trainer: Any, cfg: Any, out_dir: str | Path, enabled: bool = True) -> dict:
    """Write ``<out_dir>/merged``: a plain checkpoint (W0 + ΔW) that ``AutoModelForCausalLM.from_pretrained`` loads."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    train, total = trainable_parameters(model)
    info: dict[str, Any] = {"adapter_dir": str(out_dir), "trainable_parameters": train, "total_parameters": total}
    if not enabled or not trainer.is_world_process_zero():
        return info
    target = Path(out_dir) / "merged"
    base = model.get_base_model()
    # written to a temp folder and renamed into place: an interrupted export never looks like a finished one
    tmp = Path(tempfile.mkdtemp(prefix=".merged.", dir=out_dir))
    try:
        base.save_pretrained(tmp, state_dict=merged_state_dict(model))
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info["merged_model"] = str(target)
    return info
