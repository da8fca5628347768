"""DAPO dynamic sampling on two processes (gloo): the keep decision is taken on the verdicts of every rank, each rank
keeps its own slice of the packed batch, and the two slices together are the one-process batch of the same groups.
Generation is canned (tests/rl/test_rl_trainer.py's ``Canned``), split over ranks as GRPOTrainer splits it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .test_rl_trainer import Canned, make_trainer, rows

G = 4
EXTRA = {"dapo.num_generations": G, "dapo.prompts_per_step": 3, "dapo.micro_batch_size": 2, "dapo.max_gen_rounds": 3,
         "dapo.max_completion_length": 24, "dapo.overlong_buffer": 4}
T, F = True, False
# One spec per row of the whole round (True/False: right/wrong short answer; an int: a right answer of that many
# tokens). Three groups of 4 per batch; with 2 ranks rank 0 scores rows 0-5 and rank 1 rows 6-11 of a batch, so
# group 1 straddles the ranks (and rank 0 alone would see two right answers, an all-correct group).
PLAN = [
    # step 1, round 1: group 0 all right (dropped), groups 1 and 2 mixed; 2 of 3 kept -> refill 2 groups
    [T, T, T, T, T, 14, F, F, T, F, F, 20],
    # step 1, round 2: group A all wrong (dropped), group B mixed: 3 kept, done
    [F, F, F, F, F, 9, F, F],
    # step 2, round 1: only group 2 mixed -> refill (capped at 3 groups), two uninformative rounds, 2 masked groups
    [T, T, T, T, F, F, F, F, T, F, 11, T],
    [T] * 12,
    [F] * 12,
]


class RankCanned(Canned):
    """``Canned`` for rank ``rank`` of ``world``: each round's plan covers the whole round; this rank answers its
    consecutive slice of it (GRPOTrainer gives every rank an equal, consecutive part of the generation batch)."""

    def __init__(self, tok, plan, rank: int, world: int):
        super().__init__(tok, plan)
        self.rank, self.world = rank, world

    def __call__(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        specs, n = self.plan[self.calls], len(prompt_ids)
        assert len(specs) == n * self.world, (len(specs), n, self.world)
        self.calls += 1
        return [self.ids(s) for s in specs[self.rank * n:(self.rank + 1) * n]], None


def two_steps(trainer, tok, rank: int, world: int) -> list[dict]:
    """Two generation batches through DAPOTrainer's dynamic sampling; this rank's packed batches and metrics."""
    trainer._generate_single_turn = RankCanned(tok, PLAN, rank, world)
    trainer.model.train()
    every = rows(trainer, 3)  # the whole generation batch: 3 prompts × G
    n = len(every) // world
    out = []
    for _ in range(2):
        batch = trainer._generate_and_score_completions(every[rank * n:(rank + 1) * n])
        out.append({k: v.tolist() for k, v in batch.items()})
    m = trainer._metrics["train"]
    out.append({k: list(m[f"dynamic_sampling/{k}"]) for k in ("informative_frac", "gen_rounds", "masked_groups")})
    assert trainer._generate_single_turn.calls == len(PLAN)
    return out


def _rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                      HF_DATASETS_OFFLINE="1")
    import torch.distributed as dist

    torch.set_num_threads(1)
    paths = json.loads((Path(out_dir) / "paths.json").read_text())
    try:
        # builds the trainer with dynamic sampling on (the default) inside the 2-process group
        trainer, tok = make_trainer(paths["model"], Path(paths["data"]), Path(out_dir) / f"r{rank}", EXTRA)
        assert trainer.accelerator.num_processes == world and trainer.accelerator.process_index == rank
        out = two_steps(trainer, tok, rank, world)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def test_two_ranks_keep_the_same_groups_as_one_process(tiny_model_dir, synth_file, tmp_path):
    from rpsft_testing import run_ranks_on

    ranks = run_ranks_on(_rank_worker, tmp_path, world=2, model=tiny_model_dir, data=synth_file)

    trainer, tok = make_trainer(tiny_model_dir, synth_file, tmp_path / "one", EXTRA)
    one = two_steps(trainer, tok, 0, 1)

    # the same decision on both ranks, and the one process's
    assert ranks[0][-1] == ranks[1][-1] == one[-1] == {
        "informative_frac": [3 / 5, 1 / 9], "gen_rounds": [2, 3], "masked_groups": [0, 2]}
    for step in (0, 1):
        a, b, whole = ranks[0][step], ranks[1][step], one[step]
        assert set(a) == set(b) == set(whole)
        for key in whole:
            if key == "num_items_in_batch":  # the whole batch's token count on every rank (TRL's DAPO normaliser)
                assert a[key] == b[key] == whole[key]
            else:  # rank 0 holds rows 0-5 of the packed batch, rank 1 rows 6-11
                assert len(a[key]) == len(b[key]) == 6 and a[key] + b[key] == whole[key], (step, key)
    # step 1 packed groups 1, 2 (round 1) and B (round 2); step 2 its one informative group and 2 masked ones
    assert one[0]["num_items_in_batch"] == sum(map(sum, one[0]["completion_mask"]))
    assert all(x != 0 for x in one[0]["advantages"])
    assert sum(map(sum, one[1]["completion_mask"][G:])) == 0 and one[1]["advantages"][G:] == [0.0] * (2 * G)
