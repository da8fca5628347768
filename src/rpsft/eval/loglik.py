"""Log-likelihood multiple choice: instead of sampling an answer and parsing a letter, score every option
under the model and pick the most likely one. Deterministic and far less noisy than sampling for small models
on CPU (a 135M model rarely follows "answer with a letter", but its likelihoods still rank options).

Two protocols (``MC_PROTOCOLS``):

* ``paper``: the benchmark's own chat prompt (which lists the options, after the paper's boxed system
  prompt), scored two ways:
  - letter: log p("The answer is X" | prompt) for each option letter X; the shared prefix cancels in the
    argmax, so this ranks the letters by the model's next-token preference after the prefix;
  - text: log p(option text | prompt); ``acc_text`` ranks by the sum, ``acc_norm`` by the sum per character.
  These numbers have no published counterpart: no public leaderboard scores options after this prompt.
* ``lm-eval``: lm-evaluation-harness's zero-shot multiple-choice request, as its ``arc_challenge`` task builds
  it: context ``"Question: {question}\nAnswer:"`` (no chat template, options not listed), each option's text
  as the continuation after a space; ``acc`` ranks by the summed log-likelihood, ``acc_norm`` by the sum
  divided by the option's length in characters (lm-eval's ``acc_norm``; its ``acc_bytes`` uses UTF-8 bytes).
  Tokenization follows lm-eval's ``HFLM`` too: the context's trailing whitespace moves into the continuation,
  the concatenation is encoded as one string and split at the context's token count.

An empty context is conditioned on the tokenizer's BOS token (EOS where there is none), as lm-eval does, in
every scoring path: a first continuation token predicted from nothing (or from left padding) is meaningless.
"""

from __future__ import annotations

from typing import Callable, Iterator

LETTER_TEMPLATE = "The answer is {letter}"
MC_PROTOCOLS = ("paper", "lm-eval")
LM_EVAL_TEMPLATE = "Question: {question}\nAnswer:"  # lm-eval's arc_challenge doc_to_text
LM_EVAL_DELIMITER = " "  # lm-eval's default target_delimiter, put before every option text


def prefix_token_id(tokenizer) -> int:
    """The token an empty context is replaced by: BOS, else EOS (lm-eval's ``prefix_token_id``)."""
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise ValueError("empty context: the tokenizer has neither a BOS nor an EOS token to condition on; "
                         "pass a non-empty context")
    return tid


def _condition_empty(tokenizer, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
    """lm-eval's rule for an empty context: condition on BOS/EOS; if the continuation itself starts with that
    token, its first token becomes the context instead (nothing would predict it)."""
    if ctx:
        return ctx, cont
    pre = prefix_token_id(tokenizer)
    return (cont[:1], cont[1:]) if cont and cont[0] == pre else ([pre], cont)


def lm_eval_encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a (context, continuation) pair exactly as lm-eval's ``HFLM`` makes them: trailing
    whitespace of the context moves to the front of the continuation, ``context + continuation`` is encoded
    once (the tokenizer's default special tokens) and split at the length of the encoded context. An empty
    context is BOS (see :func:`_condition_empty`)."""
    if not context:
        return _condition_empty(tokenizer, [], tokenizer(continuation, add_special_tokens=False).input_ids)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation).input_ids
    ctx = tokenizer(context).input_ids
    return whole[: len(ctx)], whole[len(ctx):]


def lm_eval_question(item: dict) -> str:
    """The question of a multiple-choice item without its listed options: the last user message up to its
    ``Choices:`` block (every official multiple-choice file has one)."""
    user = next((m["content"] for m in reversed(item["prompt"]) if m["role"] == "user"), "")
    if "Choices:" not in user:
        raise ValueError(f"item {item.get('id')!r}: the lm-eval protocol needs the question without its options, "
                         f"but the user message has no 'Choices:' block to cut at; use --mc-protocol paper")
    return user.rsplit("Choices:", 1)[0].strip()


def continuation_logprobs(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 16,
                          max_length: int | None = None) -> list[tuple[float, int]]:
    """``[(context, continuation)]`` -> ``[(sum log p(continuation tokens | context), n continuation tokens)]``.

    Context and continuation are tokenized separately (the boundary is where the continuation starts) and
    concatenated; an empty context is the BOS token (lm-eval's convention), so a result does not depend on
    which other pairs share its batch. Sequences are left-padded so every continuation ends at the last
    position and only the last ``max continuation length`` positions go through the LM head (the vocabulary
    projection of every position would dominate memory). Position ids are set from the mask so padding does not
    shift them."""
    out: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
    for idx, res in _iter_scores(model, tokenizer, pairs, batch_size, max_length):
        for i, r in zip(idx, res):
            out[i] = r
    return out


def _iter_scores(model, tokenizer, pairs, batch_size, max_length) -> Iterator[tuple[list[int], list]]:
    import torch

    device = next(model.parameters()).device
    limit = max_length or getattr(model.config, "max_position_embeddings", None) or 4096
    ctx_cache: dict[str, list[int]] = {}
    seqs = []
    for ctx, cont in pairs:
        if ctx not in ctx_cache:
            ctx_cache[ctx] = tokenizer(ctx, add_special_tokens=False).input_ids
        c_ids = tokenizer(cont, add_special_tokens=False).input_ids
        if not c_ids:
            raise ValueError(f"empty continuation {cont!r}: nothing to score")
        ctx_ids, c_ids = _condition_empty(tokenizer, ctx_cache[ctx], c_ids)
        if not c_ids:
            raise ValueError(f"continuation {cont!r} is only the BOS token: nothing to score")
        full = (ctx_ids + c_ids)[-limit:]  # keep the continuation; drop the oldest context if too long
        seqs.append((full, min(len(c_ids), len(full) - 1)))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(seqs[i][0]) for i in idx)
        keep = max(seqs[i][1] for i in idx) + 1
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            s = seqs[i][0]
            ids[r, width - len(s):] = torch.tensor(s)
            mask[r, width - len(s):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                           logits_to_keep=keep, use_cache=False).logits.float()
        # logits[:, j] predicts token at position width-keep+j+1
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = ids[:, width - keep + 1:].to(device)
        tok_lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, keep-1)
        res = []
        for r, i in enumerate(idx):
            n = seqs[i][1]
            res.append((float(tok_lp[r, -n:].sum()), n))
        yield idx, res


def score_options(model, tokenizer, context: str, continuations: list[str]) -> list[tuple[float, int]]:
    """``[(sum log p(continuation | context), n tokens)]`` for several continuations of one context.

    The context goes through the model once; its KV cache is repeated for the continuations, which are
    scored together in one batch (right-padded; padding comes after every scored token so it never affects
    them). For a 4-option question this costs one context pass instead of eight. Same tokenization as
    :func:`continuation_logprobs` (context and continuation tokenized separately; an empty context is BOS)."""
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    conts = [tokenizer(c, add_special_tokens=False).input_ids for c in continuations]
    if any(not c for c in conts):
        raise ValueError(f"empty continuation among {continuations!r}: nothing to score")
    if not ctx:  # BOS, unless a continuation starts with it: then score each pair on its own
        pairs = [_condition_empty(tokenizer, [], c) for c in conts]
        if any(p[0] != pairs[0][0] or not p[1] for p in pairs):
            return continuation_logprobs(model, tokenizer, [("", c) for c in continuations])
        ctx, conts = pairs[0][0], [p[1] for p in pairs]
    return score_option_ids(model, ctx, conts)


def score_option_ids(model, ctx: list[int], conts: list[list[int]]) -> list[tuple[float, int]]:
    """:func:`score_options` on token ids: one non-empty context, non-empty continuations."""
    import torch

    if not ctx or any(not c for c in conts):
        raise ValueError("score_option_ids needs a non-empty context and non-empty continuations")
    device = next(model.parameters()).device
    with torch.inference_mode():
        first = model(input_ids=torch.tensor([ctx], device=device), use_cache=True, logits_to_keep=1)
        first_lp = torch.log_softmax(first.logits[0, -1].float(), dim=-1)
        width = max(map(len, conts))
        out = [(float(first_lp[c[0]]), 1) for c in conts]
        if width == 1:
            return out
        cache = first.past_key_values
        cache.batch_repeat_interleave(len(conts))
        ids = torch.zeros((len(conts), width), dtype=torch.long)
        mask = torch.zeros((len(conts), len(ctx) + width), dtype=torch.long)
        mask[:, : len(ctx)] = 1
        for r, c in enumerate(conts):
            ids[r, : len(c)] = torch.tensor(c)
            mask[r, len(ctx) : len(ctx) + len(c)] = 1
        pos = torch.arange(len(ctx), len(ctx) + width).unsqueeze(0).expand(len(conts), -1)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                       past_key_values=cache, use_cache=True).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)  # position j predicts continuation token j+1
        res = []
        for r, c in enumerate(conts):
            rest = logp[r, : len(c) - 1].gather(-1, torch.tensor(c[1:], device=device).unsqueeze(-1)).sum()
            res.append((out[r][0] + float(rest), len(c)))
        return res


def score_mcq(model, tokenizer, items: list[dict], contexts: list[str], batch_size: int = 16,
              on_item: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Score each multiple-choice item (``options``, ``gold``) both ways; returns per item
    ``{"letter_scores", "text_scores", "text_tokens", "pred_letter", "pred_text", "pred_norm",
    "correct_letter", "correct_text", "correct_norm"}``. ``on_item(i, result)`` is called as items finish.
    ``batch_size`` is unused (kept for a uniform signature): one item's continuations form one batch."""
    from rpsft.eval.judges import LETTERS

    results = []
    for i, (item, ctx) in enumerate(zip(items, contexts)):
        opts = item["options"]
        letters = item.get("labels") or LETTERS[: len(opts)]
        scores = score_options(model, tokenizer, ctx, [LETTER_TEMPLATE.format(letter=L) for L in letters] + opts)
        ls = [s for s, _ in scores[: len(opts)]]
        ts = [s for s, _ in scores[len(opts):]]
        tn = [n for _, n in scores[len(opts):]]
        norm = [s / max(1, len(o)) for s, o in zip(ts, opts)]
        pick = lambda v: letters[max(range(len(v)), key=v.__getitem__)]  # noqa: E731
        r = {"letter_scores": ls, "text_scores": ts, "text_tokens": tn, "pred_letter": pick(ls),
             "pred_text": pick(ts), "pred_norm": pick(norm)}
        for key in ("letter", "text", "norm"):
            r[f"correct_{key}"] = r[f"pred_{key}"] == item["gold"]
        results.append(r)
        if on_item is not None:
            on_item(i, r)
    return results


def score_mcq_lm_eval(model, tokenizer, items: list[dict],
                      on_item: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Score each multiple-choice item (``options``, ``gold``) under the ``lm-eval`` protocol (module
    docstring); returns per item ``{"context", "text_scores", "text_tokens", "pred_text", "pred_norm",
    "correct_text", "correct_norm"}`` (``text`` = lm-eval's acc, ``norm`` = its acc_norm: the summed
    log-likelihood divided by the option's length in characters, without the delimiter)."""
    from rpsft.eval.judges import LETTERS

    results = []
    for i, item in enumerate(items):
        opts = item["options"]
        letters = item.get("labels") or LETTERS[: len(opts)]
        ctx_text = LM_EVAL_TEMPLATE.format(question=lm_eval_question(item))
        enc = [lm_eval_encode_pair(tokenizer, ctx_text, LM_EVAL_DELIMITER + o) for o in opts]
        if any(e[0] != enc[0][0] for e in enc):  # a tokenizer that merges across the boundary: score one by one
            scores = [score_option_ids(model, c, [t])[0] for c, t in enc]
        else:
            scores = score_option_ids(model, enc[0][0], [t for _, t in enc])
        ts = [s for s, _ in scores]
        norm = [s / max(1, len(o)) for s, o in zip(ts, opts)]
        pick = lambda v: letters[max(range(len(v)), key=v.__getitem__)]  # noqa: E731
        r = {"context": ctx_text, "text_scores": ts, "text_tokens": [n for _, n in scores],
             "pred_text": pick(ts), "pred_norm": pick(norm)}
        for key in ("text", "norm"):
            r[f"correct_{key}"] = r[f"pred_{key}"] == item["gold"]
        results.append(r)
        if on_item is not None:
            on_item(i, r)
    return results
