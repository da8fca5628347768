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

Several processes. GRPOTrainer splits a generation batch over ranks in consecutive slices of equal size (rank r
scores rows r·L … (r+1)·L − 1 of it), so a group of G can straddle two ranks; it gathers the rewards over ranks
before normalising each group and keeps each rank's slice of the advantages. Dynamic sampling does the same at
the group level: :func:`gather_batch` assembles the whole scored batch on every rank (rows in rank order, the
order of TRL's gathered rewards), every rank then takes the same keep decision on the gathered verdicts and packs
the same batch, and :func:`local_slice` keeps the rank's own rows of it. ``num_items_in_batch`` is the whole
packed batch's token count on every rank, as TRL's own gathered count is.
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
    return torch.cat([_pad_to(t, width, value, left) for t in tensors], dim=0)


def _check_keys(batch: dict) -> list[str]:
    """The keys of a scored batch, refusing those the packing does not know (images, tool fields)."""
    keys = list(batch)
    known = set(PROMPT_KEYS) | set(COMPLETION_KEYS) | set(ROW_KEYS) | set(RECOMPUTED)
    unknown = [k for k in keys if k not in known and batch[k] is not None]
    if unknown:
        raise NotImplementedError(f"dynamic sampling packs text-only GRPO batches; this batch also has {unknown}. "
                                  "Set dapo.dynamic_sampling=false for multimodal or tool-calling runs")
    return keys


def _pad_to(t: torch.Tensor, width: int, value: float | int, left: bool) -> torch.Tensor:
    gap = width - t.shape[1]
    if gap <= 0:
        return t
    pad = torch.full((t.shape[0], gap), value, dtype=t.dtype, device=t.device)
    return torch.cat([pad, t] if left else [t, pad], dim=1)


def _pad_value(key: str, pad_token_id: int) -> float | int:
    spec = PROMPT_KEYS.get(key, COMPLETION_KEYS.get(key))
    return pad_token_id if spec == "pad" else spec


def gather_batch(batch: dict, gather, pad_token_id: int) -> dict:
    """The whole scored generation batch from each rank's part of it, rows in rank order; ``gather`` is
    ``accelerator.gather`` (concatenates equal-shaped tensors from every rank along dim 0, in rank order).

    2-D tensors are first padded to the widest rank's width (prompt keys on the left, the rest on the right, with
    the values :func:`pack_groups` pads with), so the result is the batch one process would have scored. Every rank
    must call this with the same keys (one config); ``num_items_in_batch`` is left out (:func:`pack_groups`
    recounts it)."""
    keys = [k for k in _check_keys(batch) if k not in RECOMPUTED and batch[k] is not None]
    local = [batch[k].shape[1] if batch[k].ndim == 2 else 0 for k in keys]
    device = batch[keys[0]].device
    # one collective for every key's width: (world, keys) -> the widest per key
    widest = gather(torch.tensor([local], dtype=torch.long, device=device)).amax(dim=0).tolist()
    out = {}
    for key, width in zip(keys, widest):
        t = batch[key]
        if t.ndim == 2:
            t = _pad_to(t, width, _pad_value(key, pad_token_id), left=key in PROMPT_KEYS)
        out[key] = gather(t.contiguous())
    return out


def local_slice(batch: dict, rank: int, world: int) -> dict:
    """Rank ``rank``'s rows of a batch that spans every rank (consecutive equal slices, GRPOTrainer's split);
    ``num_items_in_batch`` stays the whole batch's count, which TRL's DAPO loss expects."""
    n = next(v.shape[0] for k, v in batch.items() if k not in RECOMPUTED and v is not None)
    if n % world:
        raise ValueError(f"a batch of {n} rows does not split over {world} processes")
    rows = slice(rank * n // world, (rank + 1) * n // world)
    return {k: v if k in RECOMPUTED or v is None else v[rows] for k, v in batch.items()}


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
    keys = _check_keys(parts[0][0])
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
        if key == "completion_mask":
            pieces = [torch.zeros_like(p) if f else p for p, f in zip(pieces, filler)]
        out[key] = _pad_cat(pieces, _pad_value(key, pad_token_id), left=key in PROMPT_KEYS)
    loss_mask = out["completion_mask"] if "tool_mask" not in out else out["completion_mask"] * out["tool_mask"]
    out["num_items_in_batch"] = loss_mask.sum()
    return out


def refill_size(missing: int, kept: int, generated: int, max_groups: int, floor: float = 0.25,
                multiple: int = 1) -> int:
    """How many prompts to generate for the next round: the missing groups divided by the keep rate seen so far
    (at least ``floor``, so a bad first round does not ask for 100× more), capped at one generation batch, and
    rounded up to a ``multiple`` of groups (with several processes: so that every rank generates as many rows;
    one generation batch is always such a multiple)."""
    if max_groups % multiple:
        raise ValueError(f"one generation batch ({max_groups} groups) is not a multiple of {multiple} groups")
    if missing <= 0:
        return 0
    rate = max(kept / generated if generated else 1.0, floor)
    n = max(1, min(max_groups, math.ceil(missing / rate)))
    return -(-n // multiple) * multiple
