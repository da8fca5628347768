"""Hand-written RL test data and helpers, shared by the RL tests and their conftest."""

from __future__ import annotations

import json
from pathlib import Path

SYNTH_ROWS = [
    {"prompt": [{"role": "user", "content": f"Ava has {a} apples. Then Ava buys {b} more apples. How many apples "
                                            "does Ava have now?\nSolve step by step and put the final answer in "
                                            "\\boxed{}."}],
     "completion": [{"role": "assistant", "content": f"Ava has {a} + {b} = {a + b} apples.\n"
                                                     f"The answer is $\\boxed{{{a + b}}}$."}],
     "answer": str(a + b)}
    for a, b in [(3, 4), (5, 2), (1, 6), (2, 5), (4, 3), (6, 1), (0, 7), (7, 0)]
]  # every answer is 7: canned "\boxed{7}" completions are right for any prompt

GSM8K_ROWS = [
    {"question": "Tom has 3 boxes of 4 pens. How many pens does he have?",
     "answer": "He has 3 * 4 = <<3*4=12>>12 pens.\n#### 12"},
    {"question": "A shop sold 1,200 cups on Monday and 300 on Tuesday. How many cups in total?",
     "answer": "1,200 + 300 = <<1200+300=1500>>1,500 cups.\n#### 1,500"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_overrides(data: Path, out: Path, **extra) -> list[str]:
    """--set overrides for a run on the tiny model: G=2, 2 prompts per step, 2 completions per micro-batch."""
    base = {"data.train": str(data), "output_dir": str(out), "dapo.num_generations": 2, "dapo.prompts_per_step": 2,
            "dapo.micro_batch_size": 2, "dapo.max_completion_length": 12, "dapo.overlong_buffer": 4,
            "train.max_steps": 2, "train.lr": 1e-3, "train.save_steps": 1, "train.seed": 0}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
