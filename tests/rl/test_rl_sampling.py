"""Packing scored GRPO batches for dynamic sampling: padding sides, masked filler groups, the DAPO normaliser."""

from __future__ import annotations

import pytest
import torch

from rpsft.rl.sampling import pack_groups, refill_size

PAD = 9


def scored(prompt_len: int, comp_lens: list[int], adv: list[float], base: int) -> dict:
    """A GRPOTrainer-shaped scored batch: prompts left-padded, completions right-padded."""
    n = len(comp_lens)
    width = max(comp_lens)
    prompt_ids = torch.full((n, prompt_len), base)
    comp = torch.full((n, width), PAD)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, c in enumerate(comp_lens):
        comp[i, :c] = base + 1
        mask[i, :c] = 1
    return {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": comp,
            "completion_mask": mask, "advantages": torch.tensor(adv), "num_items_in_batch": mask.sum(),
            "old_per_token_logps": None}


def test_pack_groups_pads_and_recounts():
    a = scored(2, [3, 1, 2, 2], [1.0, -1.0, 0.0, 0.0], base=10)  # groups of 2: [0, 1] and [2, 3]
    b = scored(4, [5, 1], [0.5, -0.5], base=20)
    out = pack_groups([(a, 0), (b, 0)], group_size=2, pad_token_id=PAD)
    assert out["prompt_ids"].shape == (4, 4) and out["completion_ids"].shape == (4, 5)
    # prompts from batch a are left-padded to b's prompt length, completions right-padded
    assert out["prompt_ids"][0].tolist() == [PAD, PAD, 10, 10]
    assert out["prompt_mask"][0].tolist() == [0, 0, 1, 1]
    assert out["completion_ids"][0].tolist() == [11, 11, 11, PAD, PAD]
    assert out["completion_mask"].sum(1).tolist() == [3, 1, 5, 1]
    assert out["advantages"].tolist() == [1.0, -1.0, 0.5, -0.5]
    assert int(out["num_items_in_batch"]) == 10
    assert "old_per_token_logps" not in out


def test_filler_groups_carry_no_loss_and_no_tokens():
    a = scored(2, [3, 1, 2, 2], [1.0, -1.0, 0.3, -0.3], base=10)
    out = pack_groups([(a, 0), (a, 1)], group_size=2, pad_token_id=PAD, filler=[False, True])
    assert out["completion_mask"][2:].sum() == 0
    assert out["advantages"].tolist() == [1.0, -1.0, 0.0, 0.0]
    assert int(out["num_items_in_batch"]) == 4


def test_logprob_tensors_are_packed_too():
    a = scored(2, [2, 1], [1.0, -1.0], base=10)
    a["old_per_token_logps"] = torch.tensor([[-1.0, -2.0], [-3.0, 0.0]])
    b = scored(2, [3, 3], [1.0, -1.0], base=20)
    b["old_per_token_logps"] = torch.full((2, 3), -0.5)
    out = pack_groups([(a, 0), (b, 0)], 2, PAD)
    assert out["old_per_token_logps"].tolist()[0] == [-1.0, -2.0, 0.0]


def test_unknown_keys_refused():
    a = scored(2, [2, 1], [1.0, -1.0], base=10)
    a["pixel_values"] = torch.zeros(2, 3)
    with pytest.raises(NotImplementedError, match="dynamic_sampling=false"):
        pack_groups([(a, 0)], 2, PAD)


def test_refill_size():
    assert refill_size(0, 4, 4, 8) == 0
    assert refill_size(2, 6, 8, 8) == 3  # keep rate 0.75 -> ceil(2 / 0.75)
    assert refill_size(4, 0, 4, 8) == 8  # nothing kept: rate floored at 1/4, capped at one batch
    assert refill_size(1, 0, 0, 8) == 1


def test_refill_size_gives_every_rank_whole_rows():
    # G = 2 on 4 ranks: a round must be a multiple of 2 groups (4 rows) for every rank to get as many rows
    assert refill_size(1, 0, 0, 8, multiple=2) == 2
    assert refill_size(2, 6, 8, 8, multiple=2) == 4  # 3 rounded up
    assert refill_size(4, 0, 4, 8, multiple=2) == 8  # still capped at one generation batch
    assert refill_size(0, 8, 8, 8, multiple=2) == 0
    with pytest.raises(ValueError, match="not a multiple of 4 groups"):
        refill_size(1, 0, 0, 6, multiple=4)


def test_gather_batch_pads_every_rank_to_the_widest():
    import threading

    from rpsft.rl.sampling import gather_batch

    # two "ranks" as threads around a real all-gather rendezvous: each deposits its tensor, then reads them all
    slots, barrier = [None, None], threading.Barrier(2)

    def gather_for(rank):
        def gather(t):
            slots[rank] = t
            barrier.wait()
            out = torch.cat([slots[0], slots[1]], dim=0)
            barrier.wait()  # both have read before the next deposit
            return out
        return gather

    a = scored(2, [3, 1], [1.0, -1.0], base=10)
    a["old_per_token_logps"] = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0]])
    b = scored(4, [5, 2], [0.5, -0.5], base=20)
    b["old_per_token_logps"] = torch.full((2, 5), -0.5)
    got = [None, None]
    threads = [threading.Thread(target=lambda r, x: got.__setitem__(r, gather_batch(x, gather_for(r), PAD)),
                                args=(r, x)) for r, x in ((0, a), (1, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for out in got:
        assert "num_items_in_batch" not in out and "old_per_token_logps" in out
        assert out["prompt_ids"].tolist() == [[PAD, PAD, 10, 10]] * 2 + [[20] * 4] * 2  # left-padded
        assert out["prompt_mask"].tolist() == [[0, 0, 1, 1]] * 2 + [[1] * 4] * 2
        assert out["completion_ids"].tolist() == [[11, 11, 11, PAD, PAD], [11, PAD, PAD, PAD, PAD],
                                                  [21] * 5, [21, 21, PAD, PAD, PAD]]  # right-padded
        assert out["completion_mask"].sum(1).tolist() == [3, 1, 5, 2]
        assert out["old_per_token_logps"][0].tolist() == [-1.0, -2.0, -3.0, 0.0, 0.0]
        assert out["advantages"].tolist() == [1.0, -1.0, 0.5, -0.5]


def test_local_slice_keeps_the_whole_batch_token_count():
    from rpsft.rl.sampling import local_slice

    a = scored(2, [3, 1, 2, 2], [1.0, -1.0, 0.5, -0.5], base=10)
    part = local_slice(a, 1, 2)
    assert part["completion_mask"].sum(1).tolist() == [2, 2] and part["advantages"].tolist() == [0.5, -0.5]
    assert int(part["num_items_in_batch"]) == 8 and part["old_per_token_logps"] is None
    with pytest.raises(ValueError, match="4 rows does not split over 3 processes"):
        local_slice(a, 0, 3)
