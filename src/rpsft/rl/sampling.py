"""DAPO dynamic sampling (DAPO paper Eq. 11, §3.2) as batch surgery on GRPOTrainer's scored batches.

GRPOTrainer turns one generation batch (prompts × G completions) into a dict of padded tensors —
``prompt_ids``/``prompt_mask`` left-padded, ``completion_ids``/``completion_mask`` (and per-token log-prob
tensors) right-padded, one ``advantages`` value per completion, and ``num_items_in_batch``, the token count that
``loss_type="dapo"`` divides by. Advantages are normalised within each group of G, so a whole group can move
between batches unchanged. This module cuts groups out of several scored batches and packs them into one batch of
the original size; ``rpsft.rl.trainer.DAPOTrainer`` decides which groups.

Filler groups (used only when ``max_gen_rounds`` rounds did not find enough informative groups) keep the batch
shape TRL expects but get ``completion_mask = 0`` and advantage 0: no gradient and no weight in the token-mean
normaliser — the same masking TRL itself applies to truncated completions.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

# 2-D keys and what pads them; prompt-side keys are left-padded (generation used left padding), the rest right.
PROMPT_KEYS = {"prompt_ids": "pad", "prompt_mask": 0}
COMPLETION_KEYS = {"completion_ids": "pad", "completion_mask": 0, "tool_mask": 1, "old_per_token_logps": 0.0,
                   "sampling_per_token_logps": 0.0, "ref_per_token_logps": 0.0, "importance_sampling_ratio": 0.0}
ROW_KEYS = ("advantages",)
RECOMPUTED = ("num_items_in_batch",)


def _pad_cat(tensors: list[torch.Tensor], value: float | int, left: bool) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    out = []
    for t in tensors:
        gap = width - t.shape[1]
        if gap:
            pad = torch.full((t.shape[0], gap), value, dtype=t.dtype, device=t.device)
            t = torch.cat([pad, t] if left else [t, pad], dim=1)
        out.append(t)
    return torch.cat(out, dim=0)


def pack_groups(parts: Sequence[tuple[dict, int]], group_size: int, pad_token_id: int,
                filler: Sequence[bool] | None = None) -> dict:
    """One batch from ``parts`` = [(scored_batch, group_index), ...], in that order.

    ``filler[i]`` True masks part i out of the loss (completion_mask 0, advantage 0). ``num_items_in_batch`` is
    recomputed from the final loss mask, as GRPOTrainer computes it (completion_mask × tool_mask)."""
    if not parts:
        raise ValueError("pack_groups needs at least one group")
    filler = list(filler) if filler is not None else [False] * len(parts)
    if len(filler) != len(parts):
        raise ValueError(f"{len(filler)} filler flags for {len(parts)} groups")
    keys = list(parts[0][0])
    known = set(PROMPT_KEYS) | set(COMPLETION_KEYS) | set(ROW_KEYS) | set(RECOMPUTED)
    unknown = [k for k in keys if k not in known and parts[0][0][k] is not None]
    if unknown:
        raise NotImplementedError(f"dynamic sampling packs text-only GRPO batches; this batch also has {unknown}. "
                                  "Set dapo.dynamic_sampling=false for multimodal or tool-calling runs")
    for b, _ in parts:
        if list(b) != keys:
            raise ValueError(f"scored batches disagree on their keys: {sorted(b)} vs {sorted(keys)}")

    def rows(b: dict, g: int, key: str) -> torch.Tensor:
        return b[key][g * group_size:(g + 1) * group_size]

    out: dict = {}
    for key in keys:
        if key in RECOMPUTED or parts[0][0][key] is None:
            continue
        pieces = [rows(b, g, key) for b, g in parts]
        if key in ROW_KEYS:
            pieces = [torch.zeros_like(p) if f else p for p, f in zip(pieces, filler)]
            out[key] = torch.cat(pieces, dim=0)
            continue
        spec = PROMPT_KEYS.get(key, COMPLETION_KEYS.get(key))
        value = pad_token_id if spec == "pad" else spec
        if key == "completion_mask":
            pieces = [torch.zeros_like(p) if f else p for p, f in zip(pieces, filler)]
        out[key] = _pad_cat(pieces, value, left=key in PROMPT_KEYS)
    loss_mask = out["completion_mask"] if "tool_mask" not in out else out["completion_mask"] * out["tool_mask"]
    out["num_items_in_batch"] = loss_mask.sum()
    return out


def refill_size(missing: int, kept: int, generated: int, max_groups: int, floor: float = 0.25) -> int:
    """How many prompts to generate for the next round: the missing groups divided by the keep rate seen so far
    (at least ``floor``, so a bad first round does not ask for 100× more), capped at one generation batch."""
    if missing <= 0:
        return 0
    rate = max(kept / generated if generated else 1.0, floor)
    return max(1, min(max_groups, math.ceil(missing / rate)))
