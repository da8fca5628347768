"""Tiny, fully offline fixtures: a byte-level BPE tokenizer with a ChatML template and random-init Llama models
saved with save_pretrained (a base and a perturbed 'tuned' copy), plus a hand-written prompt/completion file."""

from __future__ import annotations

import json

import pytest
import torch

import rpsft_testing

CORPUS = [
    "What is two plus three? Two plus three is five.",
    "Tom has 4 apples and buys 3 more. He has 7 apples.",
    "The answer is 12 because 3 times 4 is 12.",
    "Write a short greeting. Hello there, have a nice day!",
]

RECORDS = [
    {"prompt": [{"role": "user", "content": "What is two plus three?"}],
     "completion": [{"role": "assistant", "content": "Two plus three is five. The answer is 5."}]},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tom has 4 apples and buys 3."}],
     "completion": [{"role": "assistant", "content": "He has 7 apples."}]},
    {"prompt": [{"role": "user", "content": "What is 3 times 4?"}],
     "completion": [{"role": "assistant", "content": "3 times 4 is 12."}]},
    {"prompt": [{"role": "user", "content": "Write a short greeting."}],
     "completion": [{"role": "assistant", "content": "Hello there, have a nice day!"}]},
    {"prompt": [{"role": "user", "content": "Tom has 2 apples."}],
     "completion": [{"role": "assistant", "content": "Then he has 2 apples."}]},
]


def make_tokenizer():
    return rpsft_testing.make_tokenizer(CORPUS, vocab_size=320, unk_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """{'base': dir, 'tuned': dir, 'tuned2': dir, 'data': jsonl, 'delta': {name: ΔW}} — tuned = base + ΔW."""
    root = tmp_path_factory.mktemp("tiny")
    tok = make_tokenizer()
    base = rpsft_testing.make_tiny_llama(len(tok), tokenizer=tok, tie=False, max_positions=256)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    deltas = {}
    for tag, scale in (("tuned", 0.02), ("tuned2", 0.05)):
        g = torch.Generator().manual_seed(1 if tag == "tuned" else 2)
        tuned = rpsft_testing.make_tiny_llama(len(tok), tokenizer=tok, tie=False, max_positions=256)
        tuned.load_state_dict(base.state_dict())
        d = {}
        with torch.no_grad():
            for n, p in tuned.named_parameters():
                if p.dim() == 2 and "layers" in n:
                    d[n] = scale * torch.randn(p.shape, generator=g)
                    p.add_(d[n])
        deltas[tag] = d
        tuned.save_pretrained(root / tag)
        tok.save_pretrained(root / tag)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return {"base": str(root / "base"), "tuned": str(root / "tuned"), "tuned2": str(root / "tuned2"),
            "data": str(data), "delta": deltas["tuned"], "root": root, "records": RECORDS}
