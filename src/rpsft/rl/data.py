"""RL prompts: ``[{"prompt": [messages], "gold": json}]`` through the evaluation harness's own loader
(``rpsft.eval.loaders.load_items``), so RL trains on exactly the prompts ``rpsft eval`` scores."""

from __future__ import annotations

import json
from pathlib import Path

from .config import RLConfig
from .rewards import encode_gold


def _auto_system_prompt(path: Path) -> str:
    """``rpsft eval``'s policy (eval.loaders.default_system_prompt): the official boxed instruction for GSM8K and
    official rows, the rows as written for our own prompt/completion data."""
    with path.open() as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                return "boxed" if isinstance(row, dict) and ("question" in row or "reward_model" in row) else "file"
    return "file"


def _table_prompts(cfg: RLConfig) -> list[dict]:
    """RL prompts from a hub dataset (``hf:DATASET[:CONFIG]:SPLIT``) or a parquet/arrow/CSV file, through the
    evaluation loader (GSM8K/MATH/official rows); the system prompt policy as for a file ("auto": boxed)."""
    from ..eval.loaders import load_items
    from ..eval.suites import Benchmark, resolve_benchmark

    src = str(cfg.data.train)
    b = resolve_benchmark(src) if src.startswith("hf:") else Benchmark(Path(src).stem, "file", src, "auto", 1,
                                                                          "extra")
    mode = "boxed" if cfg.data.system_prompt == "auto" else cfg.data.system_prompt
    return _math_prompts(load_items(b, None, cfg.data.limit, mode), src, "; the RL reward is math correctness")


def load_prompts(cfg: RLConfig) -> list[dict]:
    """``[{"prompt": [messages], "gold": json}]`` built by the evaluation harness's own loader
    (``rpsft.eval.loaders.load_items``), so RL prompts are exactly the prompts ``rpsft eval`` scores."""
    from ..eval.loaders import load_items
    from ..eval.suites import Benchmark

    if str(cfg.data.train).startswith("hf:") or Path(cfg.data.train).suffix in (".parquet", ".arrow", ".csv"):
        return _table_prompts(cfg)
    path = Path(cfg.data.train).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"RL prompt file {path} does not exist; write the built-in data with `rpsft data synth-math` or point "
            f"data.train at a GSM8K-style JSONL (question/answer with '#### N'), e.g. "
            f"--set data.train=hf:openai/gsm8k:main:train")
    mode = cfg.data.system_prompt
    if mode == "auto":
        mode = _auto_system_prompt(path)
    items = load_items(Benchmark(path.stem, "file", str(path), "auto", 1, "extra"), None, cfg.data.limit, mode)
    judge = f" (judge {items[0]['judge']!r})" if items else ""
    return _math_prompts(items, path, f"{judge}; the RL reward is math correctness, so data.train must hold math "
                                      "rows with a gold answer")


def _math_prompts(items: list[dict], src, why: str) -> list[dict]:
    """The RL rows of evaluation items, refusing any that is not a math problem (the reward is math correctness)."""
    bad = [it["id"] for it in items if it["judge"] != "math"]
    if bad:
        raise ValueError(f"{src}: rows {bad[:5]} are not math problems{why}")
    return [{"prompt": it["prompt"], "gold": encode_gold(it["gold"])} for it in items]
