"""A stand-in for the ``vllm`` package (no GPU needed): records the ``vllm.LLM`` keyword arguments, whether each
engine is still referenced, and the distributed-state teardown calls; answers every prompt with a fixed text."""

from __future__ import annotations

import types
import weakref


class FakeVLLM:
    """Just enough of vllm's API for rpsft.eval.generate.VLLMGenerator, recording what it is given."""

    def __init__(self):
        self.llm_kwargs: list[dict] = []
        self.engines: list[weakref.ref] = []
        self.destroyed: list[str] = []
        fake = self

        class LLM:
            def __init__(self, model, tokenizer, seed, **kwargs):
                from transformers import AutoTokenizer

                fake.llm_kwargs.append(kwargs)
                fake.engines.append(weakref.ref(self))
                self.tok = AutoTokenizer.from_pretrained(tokenizer)

            def get_tokenizer(self):
                return self.tok

            def generate(self, prompts, params, use_tqdm=False):
                out = types.SimpleNamespace(text="The answer is \\boxed{5}.", token_ids=[1, 2, 3],
                                            finish_reason="stop")
                return [types.SimpleNamespace(outputs=[out]) for _ in prompts]

        self.vllm = types.ModuleType("vllm")
        self.vllm.LLM = LLM
        self.vllm.SamplingParams = lambda **kw: kw
        inputs = types.ModuleType("vllm.inputs")
        inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
        ps = types.ModuleType("vllm.distributed.parallel_state")
        ps.destroy_model_parallel = lambda: self.destroyed.append("model_parallel")
        ps.destroy_distributed_environment = lambda: self.destroyed.append("distributed")
        self.modules = {"vllm": self.vllm, "vllm.inputs": inputs,
                        "vllm.distributed": types.ModuleType("vllm.distributed"), "vllm.distributed.parallel_state": ps}
