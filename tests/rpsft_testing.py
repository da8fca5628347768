"""Test helpers shared across test packages (a unique module name: several test folders have a conftest.py)."""

from __future__ import annotations

import torch

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_tokenizer(texts: list[str] | None = None, vocab_size: int = 400, unk_token: str | None = None):
    """A small byte-level BPE tokenizer with ChatML specials and chat template, trained on ``texts`` (default:
    200 synthetic math problems). ``unk_token`` is added as the first special token (id 0) when given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if texts is None:
        from rpsft.data.synthetic_math import generate

        texts = [r["prompt"][0]["content"] + " " + r["completion"][0]["content"] for r in generate(200, seed=123)]
        texts = texts + ["user assistant system"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ([unk_token] if unk_token else []) + ["<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", **({"unk_token": unk_token} if unk_token else {}))
    fast.chat_template = CHATML
    return fast


def make_tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 32, inter: int = 48,
                    tokenizer=None, tie: bool = True, max_positions: int = 512):
    """A random-init Llama; with ``tokenizer``, its special token ids (also in the generation config)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    ids = (dict(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                pad_token_id=tokenizer.pad_token_id) if tokenizer is not None
           else dict(eos_token_id=1, bos_token_id=0, pad_token_id=1))
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      tie_word_embeddings=tie, **ids)
    model = LlamaForCausalLM(cfg)
    if tokenizer is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def StopAt(step: int):
    """A callback that stops training after optimizer step ``step`` (an interruption, for resume tests)."""
    from transformers import TrainerCallback

    class _StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                control.should_training_stop = True

    return _StopAt()
