"""``--overwrite`` and ``--resume`` under several real processes (gloo), launched as ``accelerate launch`` launches
them: RANK/WORLD_SIZE in the environment and no process group yet. Rank 0 alone reads and clears the run
directory; the others wait for its outcome and take it, value or error."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from rpsft_testing import free_port

TRIALS = 3


def write_old_run(out: Path, files_per_checkpoint: int = 40) -> None:
    """A finished run as `rpsft train` leaves it: sealed checkpoints with many files, weights, logs, config."""
    out.mkdir(parents=True, exist_ok=True)
    for step in (1, 2, 3):
        ckpt = out / f"checkpoint-{step}"
        ckpt.mkdir()
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 3}))
        (ckpt / ".rpsft-complete").write_text(json.dumps({"global_step": step}) + "\n")
        for i in range(files_per_checkpoint):
            (ckpt / f"model-{i:05d}.safetensors").write_bytes(b"x" * 64)
    for name in ("config.yaml", "run.json", "metrics.jsonl", "model.safetensors", "train.log", "tokenizer.json"):
        (out / name).write_text("{}\n")


def _start_together(sync: Path, rank: int, world: int, tag: str) -> None:
    """A barrier without a process group (none exists before prepare_run_dir starts one): every rank enters
    prepare_run_dir within a few milliseconds of the others, the moment the old code's ranks raced."""
    (sync / f"{tag}-{rank}").touch()
    deadline = time.monotonic() + 60
    while sum((sync / f"{tag}-{r}").exists() for r in range(world)) < world:
        assert time.monotonic() < deadline, "ranks did not start"
        time.sleep(0.001)


def _worker(rank: int, world: int, port: int, root: str) -> None:
    # what `accelerate launch` gives each process: the rendezvous in the environment, no process group yet
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    import rpsft.guards as guards
    from rpsft import runlock
    from rpsft.train import prepare_run_dir

    root = Path(root)
    out, sync = root / "run", root / "sync"
    looked = []  # calls on this rank of what reads or deletes the run directory
    for fn in ("clear_run_dir", "latest_complete", "checkpoint_state"):
        real = getattr(guards, fn)
        setattr(guards, fn, lambda *a, _real=real, _fn=fn, **k: looked.append(_fn) or _real(*a, **k))
    try:
        for trial in range(TRIALS):
            if trial:  # the process group exists now: rank 0 lays down a fresh old run, then all start together
                dist.barrier()
                if rank == 0:
                    write_old_run(out)
                dist.barrier()
            _start_together(sync, rank, world, f"overwrite{trial}")
            with runlock.hold(out, "rpsft train"):  # as train() does: rank 0 alone takes the lock
                ckpt = prepare_run_dir(out, None, True, lambda saved: [])
                assert ckpt is None
                out.mkdir(parents=True, exist_ok=True)
                assert not (out / "checkpoint-3").exists() and not (out / "metrics.jsonl").exists()
            (root / f"ok-{trial}-{rank}").touch()
        # --resume latest: rank 0 picks the checkpoint and trims the log; every rank gets its path
        dist.barrier()
        if rank == 0:
            write_old_run(out)
            (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)))
        dist.barrier()
        with runlock.hold(out, "rpsft train"):
            ckpt = prepare_run_dir(out, "latest", False, lambda saved: [])
        assert ckpt == out / "checkpoint-3"
        # a refusal reaches every rank as the same error: here no --overwrite over the old run
        dist.barrier()
        with pytest.raises(FileExistsError, match="already holds a run; pass --resume latest"):
            prepare_run_dir(out, None, False, lambda saved: [])
        (root / f"resumed-{rank}").touch()
        if rank != 0:
            assert looked == [], looked  # only rank 0 inspects and deletes
        else:
            assert "clear_run_dir" in looked and "latest_complete" in looked
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_overwrite_under_several_processes_deletes_once(tmp_path, world):
    import multiprocessing

    import torch.multiprocessing as mp

    write_old_run(tmp_path / "run")
    (tmp_path / "sync").mkdir()
    # fresh processes forked from one server that imported rpsft.train once (4 spawned imports of transformers and
    # TRL take most of a minute on 2 busy cores); no process group exists in the server, as in a fresh launch
    multiprocessing.get_context("forkserver").set_forkserver_preload(["rpsft.train", "rpsft.runlock"])
    mp.start_processes(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True,
                       start_method="forkserver")
    for trial in range(TRIALS):
        assert all((tmp_path / f"ok-{trial}-{r}").exists() for r in range(world)), trial  # every rank proceeded
    assert all((tmp_path / f"resumed-{r}").exists() for r in range(world))
    # the resume kept the checkpoints and cut the log back to the checkpoint's step; the lock went with the lock
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert not (run / ".rpsft.lock").exists()
