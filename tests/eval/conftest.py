"""Fixtures for the evaluation tests: a tiny random Llama with a real byte-level BPE tokenizer and a ChatML
template (built in memory: no hub, no download), saved as a checkpoint directory, and hand-written
official-format evaluation files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import rpsft_testing
from .eval_helpers import mcq_user, official_row

CORPUS = ["The answer is A. The answer is B. The answer is C. The answer is D.",
          "Please reason step by step, and put your final answer within \\boxed{}.",
          "What is 2 + 3? We add 2 + 3 = 5, so the final answer is \\boxed{5}.",
          "Choices: A. apple B. banana C. cherry D. date. Hello world, how are you today?"]


def make_tokenizer():
    return rpsft_testing.make_tokenizer(CORPUS * 5, vocab_size=400, unk_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A checkpoint directory (config.json, safetensors, tokenizer with chat template)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tokenizer()
    rpsft_testing.make_tiny_llama(len(tok), inter=64, tokenizer=tok, tie=False).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_perturbed_dir(tmp_path_factory, tiny_dir) -> Path:
    """The tiny model with every weight nudged: a "tuned" model whose distributions differ from the base."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-llama-tuned")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(path)
    return path


@pytest.fixture()
def eval_dir(tmp_path) -> Path:
    """Hand-written files in the official layout: id/aime-24.jsonl (3 math rows) and ood/gpqa_test.jsonl
    (3 multiple-choice rows)."""
    (tmp_path / "id").mkdir()
    (tmp_path / "ood").mkdir()
    math_rows = [official_row("What is 2 + 3?", "5"), official_row("What is half of 1?", "\\frac{1}{2}"),
                 official_row("What is 6 * 7?", 42)]
    mcq_rows = [official_row(mcq_user("Which is a fruit?", ["car", "apple", "rock", "chair"]), "B"),
                official_row(mcq_user("Which is a colour?", ["red", "dog", "table", "cup"]), "A"),
                official_row(mcq_user("Which can fly?", ["fish", "stone", "bird", "tree"]), "C")]
    for name, rows in (("id/aime-24.jsonl", math_rows), ("ood/gpqa_test.jsonl", mcq_rows)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path
