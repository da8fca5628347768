"""Hub fallbacks: where a benchmark's official file is absent, the standard public dataset of the same benchmark,
mapped to the official row format (``prompt`` = [system, user], ``reward_model.ground_truth``; multiple choice as a
``Choices:`` block ending "Please answer with the single correct option letter (e.g., A)."; IFEval with
``reward_model.instructions``), so that ``rpsft eval`` prompts and grades it exactly as the official file.

They are the public releases, not the paper's files: MMLU-Pro's fallback is the whole test split (the official file
holds 70 questions), TruthfulQA's is MC1 of all 817 questions (official: 684), and GPQA, TruthfulQA and SuperGPQA
options are shuffled with a fixed per-question seed (the official files' order is not published).
``summary.json`` records which one a run used (``data.source``) with a hash of its rows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

from rpsft.data.sources import HubSpec

SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
MCQ_TAIL = "Please answer with the single correct option letter (e.g., A)."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _official(rid: Any, user: str, gold: Any, **reward) -> dict:
    return {"id": str(rid), "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
            "reward_model": {"ground_truth": gold, **reward}}


def mcq_row(rid: Any, question: str, options: list[str], answer_index: int) -> dict:
    """The official multiple-choice prompt: question, a lettered ``Choices:`` block, the answer-letter request."""
    choices = "\n".join(f"{LETTERS[i]}. {str(o).strip()}" for i, o in enumerate(options))
    return _official(rid, f"{str(question).strip()}\n\nChoices:\n{choices}\n\n{MCQ_TAIL}", LETTERS[answer_index])


def _shuffled(rid: Any, correct: str, wrong: list[str]) -> tuple[list[str], int]:
    opts = [correct, *wrong]
    order = list(range(len(opts)))
    random.Random(f"rpsft:{rid}").shuffle(order)  # string seed: the same order on every machine and run
    return [opts[i] for i in order], order.index(0)


def _math(q: str, a: str, rid: str = "id") -> Callable[[dict, int], dict]:
    def conv(row: dict, i: int) -> dict:
        gold = row[a]
        if isinstance(gold, list) and len(gold) == 1:
            gold = gold[0]
        return _official(row.get(rid, i), str(row[q]), str(gold).strip())

    return conv


def _labelled(row: dict, i: int) -> dict:  # ARC / CommonsenseQA: choices {label, text} + answerKey
    labels = list(row["choices"]["label"])
    return mcq_row(row.get("id", i), row["question"], list(row["choices"]["text"]), labels.index(row["answerKey"]))


def _mmlu_pro(row: dict, i: int) -> dict:
    return mcq_row(row.get("question_id", i), row["question"], list(row["options"]), LETTERS.index(row["answer"]))


def _gpqa(row: dict, i: int) -> dict:
    rid = row.get("Record ID", i)
    opts, k = _shuffled(rid, row["Correct Answer"], [row[f"Incorrect Answer {j}"] for j in (1, 2, 3)])
    return mcq_row(rid, row["Question"], opts, k)


def _truthfulqa(row: dict, i: int) -> dict:
    mc = row["mc1_targets"]
    correct = [c for c, lab in zip(mc["choices"], mc["labels"]) if lab == 1][0]
    opts, k = _shuffled(i, correct, [c for c, lab in zip(mc["choices"], mc["labels"]) if lab != 1])
    return mcq_row(i, row["question"], opts, k)


def _supergpqa(row: dict, i: int) -> dict:
    return mcq_row(row.get("uuid", i), row["question"], list(row["options"]), LETTERS.index(row["answer_letter"]))


def _ifeval(row: dict, i: int) -> dict:
    instructions = [{"instruction_id": iid, "kwargs": kw} for iid, kw in
                    zip(row["instruction_id_list"], row["kwargs"])]
    return _official(row.get("key", i), row["prompt"], "", instructions=instructions)


def _gsm8k(row: dict, i: int) -> dict:
    return {"question": row["question"], "answer": row["answer"]}  # GSM8K rows are read as they are


@dataclass(frozen=True)
class Fallback:
    spec: HubSpec
    convert: Callable[[dict, int], dict]
    note: str = ""


FALLBACKS: dict[str, Fallback] = {
    "math500": Fallback(HubSpec("HuggingFaceH4/MATH-500", None, "test"), _math("problem", "answer", "unique_id")),
    "aime24": Fallback(HubSpec("HuggingFaceH4/aime_2024", None, "train"), _math("problem", "answer")),
    "aime25": Fallback(HubSpec("math-ai/aime25", None, "test"), _math("problem", "answer")),
    "amc23": Fallback(HubSpec("math-ai/amc23", None, "test"), _math("question", "answer")),
    "minerva": Fallback(HubSpec("math-ai/minervamath", None, "test"), _math("question", "answer")),
    "olympiadbench": Fallback(HubSpec("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train"),
                              _math("question", "final_answer")),
    "gpqa": Fallback(HubSpec("Idavidrein/gpqa", "gpqa_main", "train"), _gpqa, "gated: accept its terms on the hub"),
    "mmlu_pro": Fallback(HubSpec("TIGER-Lab/MMLU-Pro", None, "test"), _mmlu_pro, "whole test split"),
    "supergpqa": Fallback(HubSpec("m-a-p/SuperGPQA", None, "train"), _supergpqa),
    "truthfulqa": Fallback(HubSpec("truthfulqa/truthful_qa", "multiple_choice", "validation"), _truthfulqa, "MC1"),
    "ifeval": Fallback(HubSpec("google/IFEval", None, "train"), _ifeval),
    "arc_c": Fallback(HubSpec("allenai/ai2_arc", "ARC-Challenge", "test"), _labelled),
    "commonsenseqa": Fallback(HubSpec("tau/commonsense_qa", None, "validation"), _labelled),
    "gsm8k": Fallback(HubSpec("openai/gsm8k", "main", "test"), _gsm8k),
}


def fallback_rows(name: str) -> tuple[list[tuple[dict, str]], str]:
    """``([(official-format row, where)], "hf:...")`` for a registry benchmark; DataSourceError if the hub fails."""
    from rpsft.data.sources import load_hub

    from rpsft.data.sources import DataSourceError

    fb = FALLBACKS[name]
    ds = load_hub(fb.spec)
    out = []
    for i, row in enumerate(ds):
        try:
            out.append((fb.convert(dict(row), i), f"{fb.spec}[{i}]"))
        except (KeyError, ValueError, IndexError) as e:  # the hub dataset's schema changed
            raise DataSourceError(f"{fb.spec}[{i}]: row does not have the expected fields for {name} "
                                  f"({type(e).__name__}: {e}; columns {sorted(row)[:8]}); install the official file "
                                  f"with `rpsft data eval-files --from DIR`") from None
    return out, str(fb.spec)
