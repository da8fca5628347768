"""The child side of ``rpsft bench``: train one method for a few steps and measure it (``python -m rpsft.bench SPEC``).

Runs in a process of its own (see :mod:`rpsft.bench`), so peak memory is this method's alone.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from .. import fileio
from ..anchor import RotationAnchor
from ..config import load_config
from ..train import train


class TimingCallback(TrainerCallback):
    """Wall time of every optimizer step (step end to step end: data, forward/backward, anchor, clip, optimizer)."""

    def __init__(self):
        self.step_ends: list[float] = []
        self.t_begin: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.t_begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_ends.append(time.perf_counter())

    def step_times(self) -> list[float]:
        marks = ([self.t_begin] if self.t_begin is not None else []) + self.step_ends
        return [b - a for a, b in zip(marks, marks[1:])]


def peak_memory() -> dict[str, float]:
    """Peak memory of this process: RSS on CPU (getrusage; psutil too when installed), CUDA peaks on GPU, in MiB."""
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    try:
        import psutil

        out["rss_now_mib"] = psutil.Process().memory_info().rss / 2**20
    except ImportError:
        pass
    if torch.cuda.is_available():
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_max_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    return out


def run_one(spec: dict) -> dict:
    """Train one method as described by ``spec`` and return its measurements (runs inside the child process)."""
    anchor_calls: list[float] = []
    original = RotationAnchor.accumulate_grad_

    def timed(self, *a, **k):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        r = original(self, *a, **k)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        anchor_calls.append(time.perf_counter() - t)
        return r

    RotationAnchor.accumulate_grad_ = timed  # this process is ours and trains one method, then exits
    cfg = load_config(None, spec["overrides"])
    cb = TimingCallback()
    t0 = time.perf_counter()
    summary = train(cfg, overwrite=True, progress=False, extra_callbacks=[cb])
    wall = time.perf_counter() - t0
    steps = cb.step_times()
    timed_steps = steps[1:] if len(steps) > 1 else steps  # step 1 is warm-up
    # anchor calls: one per optimizer step (period 1); drop the warm-up step's call like its step time
    anchor_timed = anchor_calls[1:] if len(anchor_calls) > 1 else anchor_calls
    step_med = statistics.median(timed_steps) if timed_steps else float("nan")
    anchor_med = statistics.median(anchor_timed) if anchor_timed else 0.0
    samples_per_step = cfg.train.batch_size * cfg.train.grad_accum
    a = summary.get("anchor") or {}
    return {
        "status": "ok",
        "steps": len(steps),
        "timed_steps": len(timed_steps),
        "step_seconds_median": step_med,
        "step_seconds_all": steps,
        "steps_per_s": 1.0 / step_med if step_med > 0 else float("nan"),
        "samples_per_s": samples_per_step / step_med if step_med > 0 else float("nan"),
        "samples_per_step": samples_per_step,
        "anchor_call_seconds_median": anchor_med,
        "anchor_share_of_step": anchor_med / step_med if step_med > 0 and anchor_calls else 0.0,
        "anchor_bytes": int(a.get("nbytes", 0)),
        "anchor_matrices": int(a.get("matrices", 0)),
        "anchor_ranks": a.get("ranks", []),
        "anchor_form": a.get("form"), "anchor_full_rank": a.get("full_rank"),  # which regulariser, full-rank rule
        "bases_seconds": summary.get("anchor_seconds", 0.0),
        "train_seconds": summary.get("train_seconds"),
        "wall_seconds": wall,
        "train_loss": summary.get("train_loss"),
        "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        **peak_memory(),
    }


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = run_one(spec)
    fileio.write_json(spec["result_path"], result)
