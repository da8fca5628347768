"""Shared PEFT glue for the adapter methods (lora, rpsft_lora, osf): wrap, count, export a merged checkpoint."""

from __future__ import annotations

import contextlib
import itertools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..distributed import is_dtensor
from ..placement import canonical_name


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


def merged_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None
                      ) -> dict[str, torch.Tensor]:
    """The base model's state dict with every active adapter folded in (W0 + ΔW), adapter tensors dropped.

    ``state``: the base model's state dict to merge (default: its live one, left as it is) — under FSDP2 the full
    tensors every rank gathered (``full_state_dict``), a copy, which is merged in place (no second copy of the
    adapted weights); each adapter's ΔW is then computed by PEFT's own ``get_delta_weight`` on those full tensors,
    put in place of the layer's shards for the call, so no collective runs here.

    Unlike ``merge_and_unload`` this leaves the PEFT model untouched (OSF cannot unmerge, and train() still reads
    the adapters after finalize for the run summary). Costs one extra copy of each adapted weight, one at a time.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # names without activation-checkpoint / compile wrapper components (FSDP2's activation checkpointing inserts
    # them): the merged checkpoint gets the plain names from_pretrained expects
    tuners = {canonical_name(name): mod for name, mod in base.named_modules() if isinstance(mod, BaseTunerLayer)}
    live = state is None
    state = {canonical_name(k): v for k, v in (base.state_dict() if live else state).items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
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
            w = value.detach().clone() if live else value
            if not layer.merged:
                with _layer_tensors(layer, owner, state, w.device):  # every ΔW from the unmerged W0, then added
                    deltas = [layer.get_delta_weight(a).detach() for a in layer.active_adapters]
                for d in deltas:
                    w += d.to(w.dtype)
            value = w
        out[new_key] = value
    return out


@contextlib.contextmanager
def _layer_tensors(layer: torch.nn.Module, prefix: str, state: dict[str, torch.Tensor], device: torch.device):
    """Within the block, every parameter and buffer of ``layer`` is the tensor ``state`` holds for it (a buffer
    the state dict leaves out, e.g. OSF's non-persistent initial factors, is copied to ``device``); restored after.
    Nothing runs FSDP's hooks in between, so swapping the sharded parameters out for a moment is safe."""
    saved = []
    try:
        for name, mod in layer.named_modules():
            for store in (mod._parameters, mod._buffers):
                for attr, value in list(store.items()):
                    if value is None:
                        continue
                    key = canonical_name(".".join(x for x in (prefix, name, attr) if x))
                    new = state.get(key)
                    if new is None:
                        if is_dtensor(value):  # gathering it here would be a collective on one rank only
                            raise RuntimeError(f"{key}: a sharded tensor missing from the gathered state dict")
                        new = value.detach().to(device)
                    saved.append((store, attr, value))
                    store[attr] = new
        yield
    finally:
        for store, attr, value in reversed(saved):
            store[attr] = value


def _prefixes(module: str):
    """``a.b.c`` -> ``a.b.c``, ``a.b``, ``a`` (the tuner layer may sit above the key's own module)."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        yield ".".join(parts[:i])


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict with FSDP2 shards gathered into full CPU tensors on rank 0 (``{}`` on the others).

    A collective: every rank must call it, in the same order (torch's ``get_model_state_dict``, the path
    transformers' own FSDP save takes; each tensor is gathered, moved to the CPU and dropped on the other ranks
    before the next, so the accelerator holds one full matrix at a time)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # a tied weight (embedding = LM head) arrives as two separate copies; make them one tensor again, as in a live
    # state dict, so that save_pretrained recognises the alias and writes the weight once
    first: dict[int, str] = {}
    for name, t in itertools.chain(module.named_parameters(remove_duplicate=False),
                                   module.named_buffers(remove_duplicate=False)):
        name = canonical_name(name)
        if id(t) in first and name in state and first[id(t)] in state:
            state[name] = state[first[id(t)]]
        first.setdefault(id(t), name)
    return state


def export_merged(trainer: Any, cfg: Any, out_dir: str | Path, enabled: bool = True) -> dict:
    """Write ``<out_dir>/merged``: a plain checkpoint (W0 + ΔW) that ``AutoModelForCausalLM.from_pretrained`` loads.

    Called on every rank. Under FSDP2 each rank holds only rows of every weight, so all ranks gather the full state
    dict together and rank 0 merges and writes it; otherwise (one process, DDP: full weights everywhere) rank 0
    alone does the work."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    train, total = trainable_parameters(model)
    info: dict[str, Any] = {"adapter_dir": str(out_dir), "trainable_parameters": train, "total_parameters": total}
    if not enabled:
        return info
    base = model.get_base_model()
    main = trainer.is_world_process_zero()
    state = full_state_dict(base) if any(is_dtensor(p) for p in base.parameters()) else None
    if not main:
        return info
    target = Path(out_dir) / "merged"
    # written to a temp folder and renamed into place: an interrupted export never looks like a finished one
    tmp = Path(tempfile.mkdtemp(prefix=".merged.", dir=out_dir))
    try:
        base.save_pretrained(tmp, state_dict=merged_state_dict(model, state))
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info["merged_model"] = str(target)
    return info
