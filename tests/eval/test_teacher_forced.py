"""Teacher-forced exact match equals real greedy generation, token for token, on a tiny model."""

from __future__ import annotations

import pytest

from rpsft_testing import make_tiny_llama
from rpsft.eval.generate import HFGenerator, render_prompts
from rpsft.eval.teacher_forced import references, score_ids, stop_ids, teacher_forced_eval

PROMPTS = ["Ava has 3 apples.", "How many marbles?", "Ben buys 12 more books. Then he gives away 4.",
           "Zoe has 7 coins.", "Count the shells.", "Omar shares them equally among 2 friends."]


@pytest.fixture(scope="module")
def model_tok(tiny_tokenizer):
    return make_tiny_llama(len(tiny_tokenizer), seed=3, tokenizer=tiny_tokenizer).eval(), tiny_tokenizer


def test_exact_match_iff_greedy_generation_reproduces_the_reference(model_tok):
    model, tok = model_tok
    texts = render_prompts(tok, [[{"role": "user", "content": p}] for p in PROMPTS])
    first = {i: r for b in HFGenerator(model, tok, 4).generate_iter(texts, 10, greedy=True) for i, r in b}
    # declare a token that greedy emits mid-answer a stop token too, so that some answers really stop early
    model.generation_config.eos_token_id = [tok.eos_token_id, first[0]["token_ids"][3]]
    gen = HFGenerator(model, tok, 4)
    out = {i: r for b in gen.generate_iter(texts, 10, greedy=True) for i, r in b}
    stop = stop_ids(model, tok)
    assert sorted(stop) == sorted(gen.eos_ids)
    assert any(r["finish"] == "stop" for r in out.values())
    prompt_ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    greedy = [out[i]["token_ids"] for i in range(len(texts))]
    # references = what greedy generated (exact), and the same with one token changed (not exact, first miss there)
    changed = []
    for i, g in enumerate(greedy):
        j = i % len(g)
        bad = next(t for t in range(len(tok)) if t != g[j] and t not in stop)
        changed.append(g[:j] + [bad] + g[j + 1:])
    pairs = [(p, g) for p, g in zip(prompt_ids, greedy)] + [(p, c) for p, c in zip(prompt_ids, changed)]
    scored = score_ids(model, pairs, stop, batch_size=5, pad_id=tok.pad_token_id)
    n = len(texts)
    assert [s["exact"] for s in scored] == [True] * n + [False] * n
    assert [s["first_miss"] for s in scored[n:]] == [i % len(g) for i, g in enumerate(greedy)]
    # a stopped answer whose stop token is the *other* stop id still matches: generation stops at any of them
    k = next(i for i in range(n) if out[i]["finish"] == "stop")
    other = [s for s in stop if s != greedy[k][-1]][0]
    assert score_ids(model, [(prompt_ids[k], greedy[k][:-1] + [other])], stop)[0]["exact"]
    # batching does not change a verdict
    assert [s["exact"] for s in score_ids(model, pairs, stop, batch_size=1)] == [s["exact"] for s in scored]


def test_references_are_completion_tokens_then_stop(tiny_tokenizer):
    recs = [{"prompt": [{"role": "user", "content": "Ava has 3 apples."}],
             "completion": [{"role": "assistant", "content": "The answer is 3."}]}]
    (p, a), = references(tiny_tokenizer, recs, [tiny_tokenizer.eos_token_id])
    assert a == tiny_tokenizer("The answer is 3.", add_special_tokens=False).input_ids + [tiny_tokenizer.eos_token_id]
    assert tiny_tokenizer.decode(p).endswith("assistant\n")


def test_teacher_forced_eval_on_a_data_file(tiny_model_dir, synth_data):
    res = teacher_forced_eval(str(tiny_model_dir), str(synth_data["test"]), limit=5, batch_size=2)
    assert res["items_n"] == 5 and len(res["items"]) == 5
    assert res["accuracy"] == 0.0  # a random model reproduces no worked solution
    assert all(0 <= x["token_acc"] < 1 and x["nll"] > 0 for x in res["items"])
