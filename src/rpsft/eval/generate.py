"""Generation backends. Both take chat prompts already rendered to text (the model's chat template with
``add_generation_prompt``) and return, per prompt, ``{"text", "n_tokens", "finish": "stop"|"length"}``.

* ``HFGenerator``: ``model.generate`` in batches, left-padded (decoder-only models continue from the right
  end), KV cache on. Prompts are sorted by length so a batch holds similar lengths (less padding); results
  come back per batch so the caller can write them as they finish (resumable runs).
* ``VLLMGenerator``: vLLM on GPU when the package is installed; one seed per request so the k samples of a
  problem differ and a resumed run draws the same samples.
"""

from __future__ import annotations

from typing import Iterator


def load_for_eval(model: str, device: str | None = None, dtype="float32"):
    """``(model, tokenizer)`` from anything ``rpsft.models.load_model`` accepts, plus PEFT adapter directories
    (``adapter_config.json`` without ``config.json``: the adapter is loaded on its base and merged, so the
    evaluated weights are exactly base + adapter)."""
    import json
    from pathlib import Path

    from rpsft.models import load_model, load_tokenizer

    path = Path(str(model)).expanduser()
    if path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        from peft import PeftModel

        base_name = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base_name:
            raise ValueError(f"{path}/adapter_config.json names no base_model_name_or_path; cannot load the adapter")
        base, _ = load_model(base_name, dtype=dtype, device=device)
        merged = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
        tok_src = str(path) if (path / "tokenizer_config.json").is_file() else base_name
        return merged.eval(), load_tokenizer(tok_src)
    m, tok = load_model(str(model), dtype=dtype, device=device)
    return m.eval(), tok


def render_prompts(tokenizer, prompts: list[list[dict]]) -> list[str]:
    """Chat messages -> the text the model continues (chat template + generation prompt)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; evaluate "
                         f"an instruct/chat checkpoint or one saved by `rpsft train` (which keeps the template)")
    return [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]


class HFGenerator:
    def __init__(self, model, tokenizer, batch_size: int = 32):
        import torch

        self.model, self.tok, self.batch_size = model.eval(), tokenizer, max(1, int(batch_size))
        self.device = next(model.parameters()).device
        self.torch = torch
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.eos_ids = self._eos_ids()

    def _eos_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tok.eos_token_id is not None and self.tok.eos_token_id not in ids:
            ids.append(self.tok.eos_token_id)
        return ids

    def generate_iter(self, texts: list[str], max_new_tokens: int, temperature: float = 0.7, top_p: float = 0.95,
                      greedy: bool = False, seed: int = 0) -> Iterator[list[tuple[int, dict]]]:
        """Yield, batch by batch, ``[(index into texts, result), ...]``."""
        torch = self.torch
        enc = [self.tok(t, add_special_tokens=False).input_ids for t in texts]
        order = sorted(range(len(texts)), key=lambda i: -len(enc[i]))
        pad = self.tok.pad_token_id
        for b, start in enumerate(range(0, len(order), self.batch_size)):
            idx = order[start : start + self.batch_size]
            width = max(len(enc[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):  # left padding
                ids[r, width - len(enc[i]):] = torch.tensor(enc[i])
                mask[r, width - len(enc[i]):] = 1
            kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=self.eos_ids, use_cache=True)
            if greedy:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            else:
                # one seed per batch: the same run on the same machine draws the same samples
                torch.manual_seed(seed * 1_000_003 + b)
                kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=None)
            with torch.inference_mode():
                out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                          **kwargs)
            new = out[:, width:].tolist()
            results = []
            for r, i in enumerate(idx):
                toks = new[r]
                stop = next((j for j, t in enumerate(toks) if t in self.eos_ids), None)
                kept = toks[:stop] if stop is not None else toks
                results.append((i, {"text": self.tok.decode(kept, skip_special_tokens=True),
                                    "n_tokens": len(kept) + (stop is not None),
                                    "token_ids": toks[: stop + 1] if stop is not None else toks,
                                    "finish": "stop" if stop is not None else "length"}))
            yield results


def release_vllm_state() -> None:
    """Once the last reference to a vLLM engine is dropped: collect it, tear down vLLM's distributed state (its
    model-parallel groups, then its world, which also destroys torch's default process group: under TRL's
    ``external_launcher`` that is the training's own group, so call it after the last collective) and return the
    cached GPU memory. The next engine in this process then starts from a clean state with the memory free."""
    import gc

    gc.collect()
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    except Exception:  # older / newer vLLM without these, or nothing initialised: nothing more to release
        pass
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class VLLMGenerator:
    """vLLM backend (GPU). ``model_path`` must be a plain checkpoint directory or hub id."""

    def __init__(self, model_path: str, seed: int = 0, chunk: int = 1024, **llm_kwargs):
        try:
            import vllm
        except ImportError as e:
            raise RuntimeError(
                "--backend vllm needs the 'vllm' package (CUDA GPU): `pip install vllm`; on a CPU machine use "
                "--backend hf") from e
        import os

        llm_kwargs.setdefault("gpu_memory_utilization", float(os.environ.get("RPSFT_VLLM_GPU_MEM", "0.85")))
        self.vllm, self.chunk = vllm, max(1, int(chunk))
        self.llm = vllm.LLM(model=model_path, tokenizer=model_path, seed=seed, **llm_kwargs)
        self.tok = self.llm.get_tokenizer()

    def close(self) -> None:
        """Release the engine and its GPU memory now, not whenever the garbage collector gets to it: ``rpsft rl``
        evaluates before training, and TRL's co-located vLLM engine needs that memory (and a clean vLLM
        distributed state) when it starts."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        del llm
        release_vllm_state()

    def generate_iter(self, texts: list[str], max_new_tokens: int, temperature: float = 0.7, top_p: float = 0.95,
                      greedy: bool = False, seed: int = 0, request_seeds: list[int] | None = None
                      ) -> Iterator[list[tuple[int, dict]]]:
        from vllm.inputs import TokensPrompt

        seeds = request_seeds if request_seeds is not None else [seed * 1_000_003 + i for i in range(len(texts))]
        for start in range(0, len(texts), self.chunk):
            idx = list(range(start, min(start + self.chunk, len(texts))))
            params = [self.vllm.SamplingParams(
                n=1, max_tokens=max_new_tokens, temperature=0.0 if greedy else temperature,
                top_p=1.0 if greedy else top_p, seed=None if greedy else int(seeds[i])) for i in idx]
            # token ids, not text: the rendered chat template already holds its special tokens
            prompts = [TokensPrompt(prompt_token_ids=self.tok(texts[i], add_special_tokens=False).input_ids)
                       for i in idx]
            outs = self.llm.generate(prompts, params, use_tqdm=False)
            yield [(i, {"text": o.outputs[0].text, "n_tokens": len(o.outputs[0].token_ids),
                        "finish": "length" if o.outputs[0].finish_reason == "length" else "stop"})
                   for i, o in zip(idx, outs)]
