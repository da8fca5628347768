"""Peer parity: rpsft's log-likelihoods equal lm-evaluation-harness's on the project's own prompts, and the vLLM
backend's greedy text agrees with the HF backend's (GPU + vLLM only)."""

from __future__ import annotations

import json
from importlib.resources import files

import pytest

from rpsft.data.synthetic_math import generate
from rpsft.eval.loglik import continuation_logprobs


def _pairs(tok) -> list[tuple[str, str]]:
    """>= 50 (context, continuation) pairs from the probe prompts and synthetic math problems, rendered with the chat
    template. Contexts end in a non-space character: lm-eval moves a context's trailing whitespace into the
    continuation (and so scores it), rpsft conditions on it; with no trailing whitespace both score the same tokens."""
    probe = [json.loads(line)["prompt"] for line in
             (files("rpsft") / "resources" / "probe_prompts.jsonl").read_text().splitlines() if line.strip()]
    math = generate(12, seed=7)
    render = lambda text: tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,  # noqa: E731
                                                  add_generation_prompt=True)
    pairs = []
    for p in probe[:16]:
        ctx = render(p) + "The answer is"
        pairs += [(ctx, " A"), (ctx, " B, because it is the capital")]
    for r in math:
        ctx = render(r["prompt"][0]["content"]) + "Solution:"
        pairs += [(ctx, " " + r["completion"][0]["content"][:160]), (ctx, " 42")]
    assert len(pairs) >= 50
    return pairs


def test_continuation_logprobs_equal_lm_eval_harness(tiny_dir):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    pairs = _pairs(tok)
    ours = continuation_logprobs(model, tok, pairs, batch_size=7)

    lm = HFLM(pretrained=str(tiny_dir), device="cpu", batch_size=5, dtype="float32")
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    theirs = lm.loglikelihood(reqs, disable_tqdm=True)
    assert len(theirs) == len(pairs)
    diffs = [abs(a[0] - b[0]) for a, b in zip(ours, theirs)]
    print(f"lm-eval parity: {len(pairs)} pairs, max |Δ| = {max(diffs):.2e}")
    assert max(diffs) <= 1e-4, max(diffs)
    assert len({round(a[0], 3) for a in ours}) > len(pairs) // 2  # distinct scores: the comparison is not vacuous


@pytest.mark.gpu
def test_vllm_greedy_agrees_with_hf(tiny_dir):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rpsft.eval.generate import HFGenerator, VLLMGenerator, render_prompts

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    texts = render_prompts(tok, [r["prompt"] for r in generate(32, seed=11)])
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).cuda()
    hf = {i: r["text"] for batch in HFGenerator(model, tok, 8).generate_iter(texts, 32, greedy=True) for i, r in batch}
    del model
    gen = VLLMGenerator(str(tiny_dir), dtype="float32", enforce_eager=True, gpu_memory_utilization=0.3)
    vl = {i: r["text"] for batch in gen.generate_iter(texts, 32, greedy=True) for i, r in batch}
    first = lambda text: tok(text, add_special_tokens=False).input_ids[:32]  # noqa: E731
    same = sum(first(hf[i]) == first(vl[i]) for i in range(len(texts)))
    assert same >= 0.9 * len(texts), f"{same}/{len(texts)} prompts with identical first 32 tokens"
