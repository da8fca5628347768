"""Forgetting probe for small models: how far has the tuned model's next-token distribution moved away from the
base model's on general (non-math) prompts?

The base model answers the shipped prompts (``resources/probe_prompts.jsonl``: 243 varied general-knowledge,
writing, advice, reasoning, coding, language, safety and instruction-following requests written for this project;
the measurements in docs/ quoted with 52 prompts used its first 52) greedily once; those answers are cached per base model. Then, teacher-forcing the base answers through both
models, we report per answer token

* ``kl``: mean KL(p_base || p_tuned) of the next-token distributions (0 for an unchanged model);
* ``nll_tuned`` / ``nll_base``: mean negative log-likelihood of the base's own greedy answer under each model
  (``nll_delta`` = tuned - base: how much less the tuned model would say what the base said).

These are cheap, deterministic proxies for the OOD drop the paper measures with benchmarks (Tables 1-2), and
they work on a CPU in seconds for a 135M model.
"""

from __future__ import annotations

import hashlib
import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

from rpsft.fileio import read_jsonl, write_jsonl


def probe_prompts(path: str | Path | None = None) -> list[dict]:
    """The shipped probe prompts (``{"id", "category", "prompt"}``), or those of a JSONL file."""
    if path is None:
        text = resources.files("rpsft").joinpath("resources", "probe_prompts.jsonl").read_text()
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = read_jsonl(path)
    if not rows or any("prompt" not in r for r in rows):
        raise ValueError(f"probe prompts {path or 'resources/probe_prompts.jsonl'}: need rows with a 'prompt'")
    return rows


def _model_fingerprint(name: str) -> str:
    """What identifies a base model's weights: its resolved path plus config and weight-file sizes/mtimes."""
    from rpsft.models import resolve

    path = Path(resolve(name))
    parts = [str(path.resolve()) if path.exists() else str(name)]
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.suffix in (".json", ".safetensors", ".bin", ".jinja"):
                st = f.stat()
                parts.append(f"{f.name}:{st.st_size}:{int(st.st_mtime)}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def base_answers(base: str, model=None, tokenizer=None, prompts: list[dict] | None = None,
                 max_new_tokens: int = 64, batch_size: int = 16, cache_dir: str | Path | None = None) -> list[dict]:
    """The base model's greedy answers (token ids + text) to the probe prompts, cached per (base weights,
    prompts, max_new_tokens) under ``<cache_root>/probe/``; ``model``/``tokenizer`` avoid a reload."""
    from rpsft.eval.generate import HFGenerator, load_for_eval, render_prompts
    from rpsft.models import cache_root

    prompts = prompts if prompts is not None else probe_prompts()
    key = hashlib.sha256(json.dumps([_model_fingerprint(base), [p["prompt"] for p in prompts], max_new_tokens])
                         .encode()).hexdigest()[:20]
    cache = Path(cache_dir) if cache_dir is not None else cache_root() / "probe"
    path = cache / f"{key}.jsonl"
    rows = read_jsonl(path)
    if len(rows) == len(prompts):
        return rows
    if model is None:
        model, tokenizer = load_for_eval(base)
    texts = render_prompts(tokenizer, [[{"role": "user", "content": p["prompt"]}] for p in prompts])
    gen = HFGenerator(model, tokenizer, batch_size)
    outs: dict[int, dict] = {}
    for batch in gen.generate_iter(texts, max_new_tokens=max_new_tokens, greedy=True):
        outs.update(batch)
    rows = []
    for i, (p, text) in enumerate(zip(prompts, texts)):
        # the generated ids themselves (re-tokenizing the text can split differently), ending in EOS if the
        # base chose to stop: stopping is part of its behaviour too
        ans_ids = outs[i]["token_ids"]
        rows.append({"id": p.get("id", str(i)), "prompt_text": text, "answer": outs[i]["text"],
                     "prompt_ids": tokenizer(text, add_special_tokens=False).input_ids, "answer_ids": ans_ids})
    write_jsonl(path, rows)
    return rows


def _answer_logprobs(model, rows: list[dict], batch_size: int):
    """Per row: log-softmax over the vocabulary at each answer position, shape (n_answer, V) (right-padded)."""
    import torch

    from .forward import answer_logits

    pairs = [(r["prompt_ids"], r["answer_ids"]) for r in rows]
    for lg in answer_logits(model, pairs, batch_size):
        yield torch.log_softmax(lg, dim=-1)


def _check_same_vocab(base_tok, tuned_tok, base: str, tuned: str) -> None:
    probe = "The quick brown fox, 12345 + ü <|im_end|>"
    if len(base_tok) != len(tuned_tok) or base_tok(probe).input_ids != tuned_tok(probe).input_ids:
        raise ValueError(f"the forgetting probe compares next-token distributions, so {tuned!r} must use the same "
                         f"tokenizer as its base {base!r}")


def forgetting_probe(base: str, tuned: str, max_new_tokens: int = 64, batch_size: int = 8,
                     prompts_path: str | Path | None = None, cache_dir: str | Path | None = None,
                     base_model: Any = None, base_tokenizer: Any = None, tuned_model: Any = None) -> dict:
    """Mean per-token KL(base || tuned) and NLL of the base's greedy answers to the shipped general prompts.

    ``base`` and ``tuned`` are anything ``rpsft.models.load_model`` accepts (an embedded name or a checkpoint
    directory; PEFT adapter directories too). Already-loaded models can be passed to skip loading; the base's
    greedy answers are decoded once per base model and cached (see :func:`base_answers`)."""
    import torch

    from rpsft.eval.generate import load_for_eval

    t0 = time.time()
    prompts = probe_prompts(prompts_path)
    rows = None
    if base_model is None:
        # the cached answers may make loading the base for generation unnecessary, but the KL needs it anyway
        base_model, base_tokenizer = load_for_eval(base)
    rows = base_answers(base, base_model, base_tokenizer, prompts, max_new_tokens, cache_dir=cache_dir)
    t_gen = time.time() - t0
    if tuned_model is None:
        tuned_model, tuned_tok = load_for_eval(tuned)
        _check_same_vocab(base_tokenizer, tuned_tok, base, tuned)
    rows = [r for r in rows if r["answer_ids"]]
    if not rows:
        raise RuntimeError(f"base model {base!r} produced only empty answers; the probe has nothing to compare")
    kl_sum = nll_t = nll_b = 0.0
    n_tok = 0
    per_prompt = []
    for r, lb, lt in zip(rows, _answer_logprobs(base_model, rows, batch_size),
                         _answer_logprobs(tuned_model, rows, batch_size)):
        tgt = torch.tensor(r["answer_ids"], device=lb.device).unsqueeze(-1)
        kl = (lb.exp() * (lb - lt)).sum(-1).clamp(min=0)  # per position; clamp float round-off below 0
        nt = -lt.gather(-1, tgt).squeeze(-1)
        nb = -lb.gather(-1, tgt).squeeze(-1)
        kl_sum, nll_t, nll_b, n_tok = kl_sum + float(kl.sum()), nll_t + float(nt.sum()), nll_b + float(nb.sum()), \
            n_tok + len(r["answer_ids"])
        per_prompt.append({"id": r["id"], "tokens": len(r["answer_ids"]), "kl": float(kl.mean()),
                           "nll_tuned": float(nt.mean()), "nll_base": float(nb.mean())})
    return {"base": str(base), "tuned": str(tuned), "prompts": len(rows), "tokens": n_tok,
            "kl": kl_sum / n_tok, "nll_tuned": nll_t / n_tok, "nll_base": nll_b / n_tok,
            "nll_delta": (nll_t - nll_b) / n_tok, "max_new_tokens": max_new_tokens,
            "base_decode_s": round(t_gen, 2), "wall_s": round(time.time() - t0, 2), "per_prompt": per_prompt}


def forgetting_probes(base: str, tuned: list[str], **kwargs) -> list[dict]:
    """The probe for several tuned models against one base, loading and decoding the base once."""
    from rpsft.eval.generate import load_for_eval

    bm, bt = load_for_eval(base)
    return [forgetting_probe(base, t, base_model=bm, base_tokenizer=bt, **kwargs) for t in tuned]
