"""Teacher-forced exact match: greedy exact match of fixed-format answers in one batched forward pass.

Greedy decoding emits, at every step, the argmax of the next-token distribution given everything before it. So
greedy generation reproduces a reference answer r_1..r_n followed by a stop token **if and only if** every
reference token is the argmax at its position when the reference itself is fed in (teacher forcing), and the
argmax after r_n is a stop token: before the first mismatch the two contexts are identical, and at the first
mismatch greedy emits something else. The equivalence is at the token level (the reference is tokenized the way
the model would emit it: the completion text's tokens and the stop token).

One forward pass over prompt + reference replaces up to ``max_new_tokens`` sequential decoding steps, which is
what makes scoring several hundred items per checkpoint affordable on a CPU. It scores *exact reproduction* of
the reference (for the built-in synthetic math: the whole worked solution, whose format is fixed), a stricter
criterion than a correct final answer; per item it also returns the share of reference tokens that are the
argmax and the reference's mean NLL.
"""

from __future__ import annotations

from typing import Iterable


def stop_ids(model, tokenizer) -> list[int]:
    """The tokens greedy generation stops at (the generation config's EOS ids, then the tokenizer's)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def references(tokenizer, records: Iterable[dict], stop: list[int]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference answer ids) per prompt/completion record: the chat-rendered prompt with its
    generation prompt, and the completion text's tokens followed by the first stop token."""
    from rpsft.eval.generate import render_prompts

    if not stop:
        raise ValueError("the model has no EOS token: greedy generation would never stop, so exact match is undefined")
    records = list(records)
    texts = render_prompts(tokenizer, [r["prompt"] for r in records])
    out = []
    for r, text in zip(records, texts):
        answer = "".join(m["content"] for m in r["completion"] if m.get("role", "assistant") == "assistant")
        out.append((tokenizer(text, add_special_tokens=False).input_ids,
                    tokenizer(answer, add_special_tokens=False).input_ids + [stop[0]]))
    return out


def score_ids(model, pairs: list[tuple[list[int], list[int]]], stop: list[int], batch_size: int = 16,
              pad_id: int = 0) -> list[dict]:
    """Per (prompt ids, answer ids): ``exact`` (every answer token is the argmax; a stop token in the answer
    matches any stop token, as generation stops at any), ``first_miss`` (position of the first mismatch or
    None), ``token_acc`` and ``nll`` (mean over answer tokens). Right-padded batches, longest first."""
    import torch

    from .forward import answer_logits

    stops = torch.tensor(sorted(set(stop)) or [-1], device=next(model.parameters()).device)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    results: dict[int, dict] = {}
    for i, lg in zip(order, answer_logits(model, [pairs[i] for i in order], batch_size, pad_id)):
        p, a = len(pairs[i][0]), len(pairs[i][1])
        if p == 0 or a == 0:
            raise ValueError(f"item {i}: empty prompt or reference")
        ref = torch.tensor(pairs[i][1], device=lg.device)
        pred = lg.argmax(-1)
        is_stop = torch.isin(ref, stops)
        hit = torch.where(is_stop, torch.isin(pred, stops), pred == ref)
        miss = torch.nonzero(~hit)
        nll = -torch.log_softmax(lg, -1).gather(-1, ref.unsqueeze(-1)).squeeze(-1)
        results[i] = {"exact": bool(hit.all()), "first_miss": int(miss[0]) if len(miss) else None,
                      "token_acc": float(hit.float().mean()), "nll": float(nll.mean()), "tokens": a}
    return [results[i] for i in range(len(pairs))]


def teacher_forced_eval(model_name: str, data: str, limit: int | None = None, batch_size: int = 16) -> dict:
    """Teacher-forced exact match of ``model_name`` on the prompt/completion records of ``data``:
    ``{"accuracy", "token_acc", "nll", "items": [{"id", "correct", "token_acc", "nll", "first_miss"}, ...]}``."""
    import time

    from rpsft.data.formats import load_records
    from rpsft.eval.generate import load_for_eval

    t0 = time.time()
    records = load_records(data, limit=limit)  # data first: a bad file fails before the model loads
    if any(not r.get("completion") for r in records):
        raise ValueError(f"{data}: teacher-forced scoring needs prompt/completion rows (a reference answer per item)")
    model, tok = load_for_eval(model_name)
    stop = stop_ids(model, tok)
    pairs = references(tok, records, stop)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
    scored = score_ids(model, pairs, stop, batch_size, pad)
    items = [{"id": r.get("id", str(i)), "correct": float(s["exact"]), "token_acc": s["token_acc"], "nll": s["nll"],
              "first_miss": s["first_miss"]} for i, (r, s) in enumerate(zip(records, scored))]
    n = len(items)
    return {"data": str(data), "items_n": n, "accuracy": sum(x["correct"] for x in items) / n,
            "token_acc": sum(x["token_acc"] for x in items) / n, "nll": sum(x["nll"] for x in items) / n,
            "wall_s": round(time.time() - t0, 2), "items": items}
