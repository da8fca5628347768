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


@pytest.mark.numerics
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


def _manual_logprob(model, ctx_ids, cont_ids):
    import torch

    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ctx_ids + cont_ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return float(sum(lp[len(ctx_ids) - 1 + j, t] for j, t in enumerate(cont_ids)))


@pytest.mark.numerics
def test_empty_context_conditions_on_bos_alone_and_batched(lm):
    model, tok = lm
    cont = "apple and more words"
    ids = tok(cont, add_special_tokens=False).input_ids
    expect = _manual_logprob(model, [tok.bos_token_id], ids)
    alone = continuation_logprobs(model, tok, [("", cont)])
    # batched with longer pairs: the empty-context row is left-padded; its first token must still see BOS
    batched = continuation_logprobs(model, tok, [("Which is a fruit? A. apple B. car", "The answer is A"),
                                                 ("", cont), ("Hello world, how are you today?", "car")],
                                    batch_size=3)
    cached = score_options(model, tok, "", [cont, "car"])
    assert alone[0][1] == batched[1][1] == cached[0][1] == len(ids)
    assert alone[0][0] == pytest.approx(expect, abs=1e-4)
    assert batched[1][0] == pytest.approx(expect, abs=1e-4)
    assert cached[0][0] == pytest.approx(expect, abs=1e-4)


def test_empty_context_continuation_starting_with_bos_is_its_own_context(lm):
    model, tok = lm
    cont = tok.bos_token + "apple"
    ids = tok(cont, add_special_tokens=False).input_ids
    assert ids[0] == tok.bos_token_id
    (lp, n), = continuation_logprobs(model, tok, [("", cont)])
    assert n == len(ids) - 1 and lp == pytest.approx(_manual_logprob(model, ids[:1], ids[1:]), abs=1e-4)
    with pytest.raises(ValueError, match="only the BOS"):
        continuation_logprobs(model, tok, [("", tok.bos_token)])


def test_lm_eval_pair_encoding_moves_trailing_whitespace(lm):
    _, tok = lm
    from rpsft.eval.loglik import lm_eval_encode_pair

    a = lm_eval_encode_pair(tok, "Question: 2 + 3?\nAnswer: ", "5")
    b = lm_eval_encode_pair(tok, "Question: 2 + 3?\nAnswer:", " 5")
    assert a == b
    ctx, cont = b
    assert tok.decode(ctx) == "Question: 2 + 3?\nAnswer:" and tok.decode(cont) == " 5"
    assert lm_eval_encode_pair(tok, "", "apple") == ([tok.bos_token_id], tok("apple").input_ids)


def test_lm_eval_protocol_scores_question_answer_request(lm):
    model, tok = lm
    from rpsft.eval.loglik import lm_eval_question, score_mcq_lm_eval

    item = {"id": "q", "gold": "B", "options": ["apple", "a cherry"], "labels": "AB", "prompt": [
        {"role": "system", "content": "Please reason step by step."},
        {"role": "user", "content": "Which is a fruit?\n\nChoices:\nA. apple\nB. a cherry\n\nPlease answer with "
                                    "the single correct option letter (e.g., A)."}]}
    assert lm_eval_question(item) == "Which is a fruit?"
    (r,) = score_mcq_lm_eval(model, tok, [item])
    assert r["context"] == "Question: Which is a fruit?\nAnswer:"
    ctx = tok(r["context"]).input_ids
    for opt, score, n in zip(item["options"], r["text_scores"], r["text_tokens"]):
        cont = tok(" " + opt).input_ids
        assert n == len(cont) and score == pytest.approx(_manual_logprob(model, ctx, cont), abs=1e-4)
    ts = r["text_scores"]
    assert r["pred_text"] == "AB"[int(ts[1] > ts[0])]
    assert r["pred_norm"] == "AB"[int(ts[1] / 8 > ts[0] / 5)]  # per character, without the delimiter
    assert r["correct_norm"] == (r["pred_norm"] == "B")
    with pytest.raises(ValueError, match="Choices:"):
        lm_eval_question({"id": "x", "prompt": [{"role": "user", "content": "no options here"}]})
