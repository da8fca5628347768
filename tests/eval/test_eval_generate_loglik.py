import pytest

from rpsft.eval.generate import HFGenerator, load_for_eval, render_prompts
from rpsft.eval.loglik import continuation_logprobs, score_options


@pytest.fixture(scope="module")
def lm(tiny_dir):
    return load_for_eval(str(tiny_dir))


def test_left_padded_batch_matches_single_greedy(lm):
    model, tok = lm
    texts = render_prompts(tok, [[{"role": "user", "content": "Hi"}],
                                 [{"role": "user", "content": "What is 2 + 3? Please reason step by step."}]])
    gen = HFGenerator(model, tok, batch_size=2)
    batched = dict(next(gen.generate_iter(texts, max_new_tokens=8, greedy=True)))
    alone = dict(next(HFGenerator(model, tok, batch_size=1).generate_iter(texts[:1], max_new_tokens=8, greedy=True)))
    assert batched[0]["text"] == alone[0]["text"]
    assert batched[0]["token_ids"] == alone[0]["token_ids"]


def test_sampling_is_seeded(lm):
    model, tok = lm
    texts = render_prompts(tok, [[{"role": "user", "content": "Hello"}]] * 3)
    a = [r["text"] for b in HFGenerator(model, tok, 4).generate_iter(texts, max_new_tokens=6, seed=3) for _, r in b]
    b = [r["text"] for b in HFGenerator(model, tok, 4).generate_iter(texts, max_new_tokens=6, seed=3) for _, r in b]
    assert a == b


def test_cached_context_scoring_equals_full_forward(lm):
    model, tok = lm
    ctx = render_prompts(tok, [[{"role": "user", "content": "Which is a fruit? A. apple B. car"}]])[0]
    conts = ["The answer is A", "The answer is B", "apple and more words here", "car"]
    full = continuation_logprobs(model, tok, [(ctx, c) for c in conts], batch_size=3)
    cached = score_options(model, tok, ctx, conts)
    for (a, na), (b, nb) in zip(full, cached):
        assert na == nb and a == pytest.approx(b, abs=1e-4)


def test_render_prompts_needs_chat_template(lm):
    _, tok = lm
    import copy

    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        render_prompts(bare, [[{"role": "user", "content": "x"}]])
