"""Test helpers shared across test packages: the tokenizer and tiny-model factories, a stop-at-step callback, and
the two-process (gloo) helpers of the sharded-anchor tests. Imported as ``rpsft_testing`` (tests/ is on pytest's
pythonpath)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

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


# ------------------------------------------------------------------ two CPU processes (gloo): FSDP2-sharded anchors


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, out_dir, world: int = 2) -> None:
    """Run ``worker(rank, world, port, out_dir)`` on ``world`` spawned processes and wait for all of them."""
    import torch.multiprocessing as mp

    mp.start_processes(worker, args=(world, free_port(), str(out_dir)), nprocs=world, join=True,
                       start_method="spawn")


def run_ranks_on(worker, out_dir, world: int = 2, **paths) -> list[dict]:
    """``run_ranks`` for workers that read their inputs from ``out_dir/paths.json`` (``paths``, as strings) and write
    ``out_dir/rank{r}.json``; returns those per-rank records in rank order."""
    out_dir = Path(out_dir)
    (out_dir / "paths.json").write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    run_ranks(worker, out_dir, world=world)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


@contextlib.contextmanager
def gloo_rank(rank: int, world: int, port: int):
    """This process as rank ``rank`` of a gloo group (one torch thread, as under ``accelerate launch``)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
        # Both ranks reach here before either tears gloo down: a rank that destroys its group while
        # its peer is still mid-collective or mid-teardown aborts the peer ("terminate called without
        # an active exception", SIGABRT; seen about 1 run in 8 on 2 busy cores).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def perturb_and_shard(model, ref_model, world: int, seed: int = 5, scale: float = 1e-2) -> None:
    """Add the same random ΔW to both models, then FSDP2-shard ``model`` by decoder layer (``ref_model`` stays
    whole, the unsharded reference)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for (_, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
            d = torch.randn(p.shape, generator=g) * scale
            p.add_(d)
            q.add_(d)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def autograd_vs_closed_form(anchor, model) -> tuple[float, float, dict[str, float]]:
    """R from ``anchor.penalty`` (autograd), R from ``accumulate_grad_`` (closed form), and per anchored matrix the
    relative difference of the two gradients. Leaves the closed-form gradient in ``.grad``."""
    R = anchor.penalty(model)
    R.backward()
    auto = {n: p.grad.clone() for n, p in model.named_parameters() if n in anchor.terms}
    model.zero_grad(set_to_none=True)
    r = anchor.accumulate_grad_(model, weight=1.0)
    params = dict(model.named_parameters())
    rel = {n: float((params[n].grad - g).norm() / g.norm()) for n, g in auto.items()}
    return float(R.item()), r, rel


def sharded_terms_match(anchor, ref, model, ref_model, rel_r: float, weight: float = 0.5):
    """Apply ``anchor`` to the FSDP2-sharded ``model`` and ``ref`` to the whole ``ref_model`` (same ΔW), check R and
    every gradient row shard against the unsharded ones, and give ``(name, local rows, term)`` for the caller's own
    checks of what each rank keeps. ``rel_r``: R's allowed relative difference (fp32 round-off of a different
    summation order; gradients: 1e-5). Returns ``(R sharded, R unsharded, [(name, local rows, term), ...])``."""
    from rpsft.distributed import row_shard

    r_sharded = anchor.accumulate_grad_(model, weight=weight)
    r_ref = ref.accumulate_grad_(ref_model, weight=weight)
    assert abs(r_sharded - r_ref) <= rel_r * r_ref, (r_sharded, r_ref)
    refp = dict(ref_model.named_parameters())
    shards = []
    for name, p in model.named_parameters():
        if name not in anchor.terms:
            continue
        local, row0, _ = row_shard(p)
        want = refp[name].grad[row0:row0 + local.shape[0]]
        rel = float((p.grad.to_local() - want).norm() / want.norm())
        assert rel < 1e-5, (name, rel)  # fp32 round-off of a different summation order
        shards.append((name, local, anchor.terms[name]))
    return r_sharded, r_ref, shards
