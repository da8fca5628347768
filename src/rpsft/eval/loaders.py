"""Rows of any supported evaluation format -> items: ``{"id", "prompt": [messages], "gold", "judge",
"options" (multiple choice), "instructions" (IFEval)}``.

Formats:
* official (paper release): ``prompt`` = [system, user], ``reward_model.ground_truth`` (str, int, or a
  one-element list), ``reward_model.instructions`` for IFEval rows;
* GSM8K: ``question`` + ``answer`` ending in ``#### N``;
* prompt/completion or messages rows (``rpsft data synth-math``): the gold is the last ``\\boxed{}`` of the
  reference completion;
* MATH-style ``problem`` + ``answer`` rows (HF datasets).

System prompt: the official evaluation script replaces every system message by a boxed few-shot instruction
(``BOXED_SYSTEM_PROMPT``) before generating; ``system_prompt="boxed"`` does the same, ``"file"`` keeps the rows
as they are, ``"none"`` drops system messages (the chat template then adds its own default, if any).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable

from rpsft.eval.judges import extract_boxed, parse_choices
from rpsft.eval.suites import Benchmark, source_path

# The official evaluation (jinhangzhan/RPSFT, evaluation/prompt_utils.py) enforces this system message on every
# benchmark; several official OOD files already carry it.
BOXED_SYSTEM_PROMPT = (
    "Please reason step by step, and put your final answer within \\boxed{}.\n\n"
    "Example:\n"
    "User: If 2 apples plus 3 apples equals how many apples?\n"
    "Assistant: We add 2 + 3 = 5, so the final answer is \\boxed{5}.\n\n"
    "Always finish your response by repeating only the final answer inside a single \\boxed{}."
)
SYSTEM_PROMPT_MODES = ("boxed", "file", "none")


class EvalDataError(ValueError):
    """A row that cannot become an evaluation item; names the file, the row and the missing field."""


def _rows(b: Benchmark, eval_dir: str | Path | None) -> list[tuple[Any, str]]:
    return rows_with_origin(b, eval_dir)[0]


def rows_with_origin(b: Benchmark, eval_dir: str | Path | None) -> tuple[list[tuple[Any, str]], dict]:
    """A benchmark's ``[(row, where)]`` and where they came from: ``{"source": file path or hf:..., "rows",
    "sha256"}`` (hash of the rows as canonical JSON, :func:`rows_digest`). A missing official or GSM8K file falls
    back to the benchmark's public hub dataset (:mod:`rpsft.eval.hub_fallbacks`)."""
    rows, origin = _read_rows(b, eval_dir)
    return rows, {**origin, "rows": len(rows), "sha256": rows_digest(r for r, _ in rows)}


def rows_digest(rows: Iterable[Any]) -> str:
    """sha256 over the rows as canonical JSON lines: the same rows give the same hash from a file or the hub."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def _read_rows(b: Benchmark, eval_dir: str | Path | None) -> tuple[list[tuple[Any, str]], dict]:
    from rpsft.data.sources import DataSourceError, HubSpec, load_hub, table_rows
    from rpsft.eval.hub_fallbacks import FALLBACKS, fallback_rows

    if b.source == "hf":
        spec = HubSpec(b.file, b.config, b.split)
        return [(row, f"{spec}[{i}]") for i, row in enumerate(load_hub(spec))], {"source": str(spec)}
    try:
        src = source_path(b, eval_dir)
    except FileNotFoundError as missing:
        if b.source not in ("official", "gsm8k") or b.name not in FALLBACKS:
            raise
        try:
            rows, spec = fallback_rows(b.name)
        except DataSourceError as e:
            raise FileNotFoundError(f"{missing}; its hub fallback failed too: {e}") from None
        return rows, {"source": spec, "fallback_for": b.file}
    table = table_rows(src, b.split) if Path(src).suffix in (".parquet", ".arrow", ".csv") else None
    if table is not None:
        return [(row, f"{src}[{i}]") for row, i in table], {"source": str(Path(src).resolve())}
    return _jsonl_rows(src), {"source": str(Path(src).resolve())}


def _jsonl_rows(src) -> list[tuple[Any, str]]:
    out = []
    with open(src) as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    out.append((json.loads(line), f"{src}:{n}"))
                except json.JSONDecodeError as e:
                    raise EvalDataError(f"{src}:{n}: invalid JSON ({e.msg})") from None
    return out


def _messages(value: Any, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        return [{"role": m.get("role", m.get("from", "user")), "content": m["content"]} for m in value]
    raise EvalDataError(f"{where}: 'prompt' must be a string or a list of {{role, content}} messages")


def _infer_judge(prompt: list[dict], gold: Any, instructions: Any) -> str:
    if instructions:
        return "ifeval"
    user = prompt[-1]["content"]
    if isinstance(gold, str) and re.fullmatch(r"[A-Z1-9]", gold.strip()) and "Choices:" in user:
        return "mcq"
    return "math"


def row_to_item(row: Any, where: str, judge: str = "auto", index: int = 0) -> dict:
    """One row of any supported shape -> an item (see module docstring)."""
    if not isinstance(row, dict):
        raise EvalDataError(f"{where}: a row must be a JSON object")
    instructions = None
    if "reward_model" in row and "prompt" in row:  # official
        rm = row["reward_model"] or {}
        if "ground_truth" not in rm:
            raise EvalDataError(f"{where}: official row without reward_model.ground_truth")
        prompt, gold, instructions = _messages(row["prompt"], where), rm["ground_truth"], rm.get("instructions")
    elif "question" in row and "answer" in row:  # GSM8K
        prompt = [{"role": "user", "content": str(row["question"])}]
        gold = str(row["answer"]).rpartition("####")[2].strip().replace(",", "")
        if "####" not in str(row["answer"]):
            raise EvalDataError(f"{where}: GSM8K answer has no '#### N' line")
    elif "problem" in row and ("answer" in row or "solution" in row):  # MATH-style
        prompt = [{"role": "user", "content": str(row["problem"])}]
        gold = row.get("answer") if row.get("answer") not in (None, "") else extract_boxed(str(row["solution"]))
    elif ("prompt" in row and "completion" in row) or "messages" in row:
        from rpsft.data.formats import normalize_row

        rec = normalize_row(row, where)
        prompt, gold = rec["prompt"], extract_boxed(rec["completion"][-1]["content"])
        if gold is None:
            raise EvalDataError(f"{where}: the reference completion has no \\boxed{{}} answer to grade against")
    else:
        raise EvalDataError(f"{where}: unknown evaluation row; expected official (prompt + reward_model), GSM8K "
                            f"(question + answer), MATH (problem + answer) or prompt/completion, found keys "
                            f"{sorted(row)[:8]}")
    if gold is None or (gold == "" and not instructions):
        raise EvalDataError(f"{where}: empty gold answer")
    if judge == "auto":
        judge = _infer_judge(prompt, gold, instructions)
    item = {"id": str(row.get("id", row.get("unique_id", index))), "prompt": prompt, "gold": gold, "judge": judge}
    if judge == "mcq":
        choices = parse_choices(prompt[-1]["content"])
        labels = [lab for lab, _ in choices]
        g = str(gold).strip()
        if not choices or g not in labels:
            raise EvalDataError(f"{where}: multiple-choice row whose options could not be read from the "
                                f"'Choices:' block (found labels {labels}) or whose gold {g!r} is not one of them")
        item["gold"], item["options"], item["labels"] = g, [t for _, t in choices], "".join(labels)
    if judge == "ifeval":
        if not instructions:
            raise EvalDataError(f"{where}: IFEval row without reward_model.instructions")
        item["instructions"] = instructions
    return item


def apply_system_prompt(prompt: list[dict], mode: str) -> list[dict]:
    if mode not in SYSTEM_PROMPT_MODES:
        raise ValueError(f"system_prompt must be one of {SYSTEM_PROMPT_MODES}, got {mode!r}")
    if mode == "file":
        return prompt
    rest = [m for m in prompt if m["role"] != "system"]
    return rest if mode == "none" else [{"role": "system", "content": BOXED_SYSTEM_PROMPT}] + rest


def default_system_prompt(b: Benchmark) -> str:
    """Official and GSM8K rows get the official boxed instruction; our own data (synthetic math, files) is
    evaluated as written, so a model is graded in the format it was trained on."""
    return "boxed" if b.source in ("official", "gsm8k") else "file"


def load_items(b: Benchmark, eval_dir: str | Path | None = None, limit: int | None = None,
               system_prompt: str | None = None, origin: dict | None = None) -> list[dict]:
    """The first ``limit`` items of a benchmark, with the system prompt policy applied; ``origin``, if given, is
    filled with where the rows came from (:func:`rows_with_origin`)."""
    mode = system_prompt or default_system_prompt(b)
    rows, where = rows_with_origin(b, eval_dir)
    if origin is not None:
        origin.update(where)
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise EvalDataError(f"benchmark {b.name!r}: no rows")
    items = []
    for i, (row, where) in enumerate(rows):
        item = row_to_item(row, where, b.judge, i)
        item["prompt"] = apply_system_prompt(item["prompt"], mode)
        items.append(item)
    return items
