"""Fixtures for the evaluation tests: a tiny random Llama with a real byte-level BPE tokenizer and a ChatML
template (built in memory: no hub, no download), saved as a checkpoint directory, and hand-written
official-format evaluation files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval_helpers import mcq_user, official_row

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CORPUS = ["The answer is A. The answer is B. The answer is C. The answer is D.",
          "Please reason step by step, and put your final answer within \\boxed{}.",
          "What is 2 + 3? We add 2 + 3 = 5, so the final answer is \\boxed{5}.",
          "Choices: A. apple B. banana C. cherry D. date. Hello world, how are you today?"]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def make_model(tok, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A checkpoint directory (config.json, safetensors, tokenizer with chat template)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tokenizer()
    make_model(tok).save_pretrained(path)
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
