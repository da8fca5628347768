"""The batched prompt + answer forward that both teacher-forced scorers use (teacher-forced exact match and the
forgetting probe): one right-padded forward per batch, and per item the logits that predict its answer tokens."""

from __future__ import annotations

from typing import Iterator


def answer_logits(model, pairs: list[tuple[list[int], list[int]]], batch_size: int,
                  pad_id: int = 0) -> Iterator:
    """Per (prompt ids, answer ids) pair, in the order given: the fp32 logits at the positions that predict the
    answer tokens, shape (len(answer), V). Pairs are batched in that order (callers choose it, e.g. longest
    first), right-padded with ``pad_id`` under an attention mask, so padding never reaches a scored position."""
    import torch

    device = next(model.parameters()).device
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        seqs = [p + a for p, a in chunk]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = torch.tensor(s)
            mask[j, : len(s)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for j, (p, a) in enumerate(chunk):
            # logits at position t predict token t + 1: answer tokens are predicted from positions p-1 .. p+a-2
            yield logits[j, len(p) - 1 : len(p) + len(a) - 1].float()
