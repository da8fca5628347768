"""The DAPO trainer: TRL's ``GRPOTrainer`` + DAPO dynamic sampling + the optional rotation anchor
(:class:`rpsft.trainer.AnchorMixin`), and the ``GRPOConfig`` built from an :class:`RLConfig`."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

import torch
from trl import GRPOConfig, GRPOTrainer

from ..budget import BudgetController
from ..config import ConfigError
from ..train import RichProgressCallback, common_trainer_kwargs
from ..trainer import AnchorMixin
from ..trainer_args import check_trainer_section
from .config import RLConfig
from .rewards import build_reward_funcs, informative_groups
from .sampling import gather_batch, local_slice, pack_groups, refill_size


class DAPOTrainer(AnchorMixin, GRPOTrainer):
    """GRPOTrainer + DAPO dynamic sampling + the optional rotation anchor.

    Dynamic sampling (DAPO Eq. 11). ``_generate_and_score_completions`` is the one place where a whole
    generation batch (prompts × G) exists scored and before it is split into micro-batches, so the filter
    lives there: score the batch, keep the groups with 0 < #correct < G, generate more groups from a refill
    stream of training prompts until the batch is full again (at most ``max_gen_rounds`` rounds), pack the
    kept groups into one batch of the original size. Missing groups after the last round are filled with
    masked groups (no gradient, no tokens in the normaliser), so a step never silently trains on groups
    whose advantages are all zero yet count in the DAPO token mean.

    With several processes each rank generates and scores its slice of every round, as in GRPOTrainer; the
    verdicts and the scored rounds are gathered (``rpsft.rl.sampling.gather_batch``), so every rank takes the
    same keep decision, packs the same batch and keeps its own slice of it: the step equals the one-process
    step on the same groups. Refill rounds are a whole number of rows per rank.

    Anchor: :class:`AnchorMixin` (keywords ``anchor``, ``anchor_weight``, ``anchor_period``, ``anchor_mode``,
    ``anchor_budget``), exactly as in SFT: the closed-form gradient of λ·R once per optimizer step, or λ·R in the
    DAPO loss of the window's last micro-batch under DeepSpeed ZeRO-1/2 (GRPOTrainer's loss is already scaled for
    accumulation, ``loss_is_scaled_for_ga``, so it enters once per window unscaled).
    """

    def __init__(self, *args, correctness=None, dynamic_sampling: bool = True, max_gen_rounds: int = 3, **kwargs):
        super().__init__(*args, **kwargs)
        self.correctness = correctness
        self.dynamic_sampling = bool(dynamic_sampling)
        self.max_gen_rounds = int(max_gen_rounds)
        self._refill_order: list[int] = []
        self._refill_gen = torch.Generator().manual_seed(int(self.args.seed) + 1)
        if self.dynamic_sampling and correctness is None:
            raise ValueError("dynamic sampling filters on correctness: pass correctness=MathCorrectnessReward")

    def _refill_rows(self, n_groups: int) -> list[dict]:
        """n prompts from a seeded shuffled stream over the training set, each repeated G times (the layout
        GRPOTrainer's RepeatSampler produces)."""
        rows = []
        for _ in range(n_groups):
            if not self._refill_order:
                self._refill_order = torch.randperm(len(self.train_dataset), generator=self._refill_gen).tolist()
            rows += [self.train_dataset[self._refill_order.pop()]] * self.num_generations
        return rows

    def _generate_and_score_completions(self, inputs):
        if not (self.dynamic_sampling and self.model.training):
            return super()._generate_and_score_completions(inputs)
        G = self.num_generations
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        pad = self._tokenizer.pad_token_id
        need = len(inputs) * world // G  # groups in the whole generation batch (GRPOConfig: a multiple of G)
        kept: list[tuple[dict, int]] = []
        spare: list[tuple[dict, int]] = []
        rows, rounds, generated = inputs, 0, 0
        while True:
            scored = super()._generate_and_score_completions(rows)
            correct = self.correctness.last_correct  # this rank's verdicts, in its rows' order
            if world > 1:  # the whole round on every rank, rows in rank order (TRL's order for the rewards)
                device = scored["completion_ids"].device
                correct = self.accelerator.gather(torch.tensor(correct, dtype=torch.long, device=device)).tolist()
                scored = gather_batch(scored, self.accelerator.gather, pad)
            flags = informative_groups(correct, G)
            rounds += 1
            generated += len(flags)
            for g, ok in enumerate(flags):
                (kept if ok else spare).append((scored, g))
            if len(kept) >= need or rounds >= self.max_gen_rounds:
                break
            # a whole number of rows per rank: GRPOTrainer slices every rank's part of a round by equal sizes
            n = refill_size(need - len(kept), len(kept), generated, need, multiple=world // math.gcd(G, world))
            rows = self._refill_rows(n)
            per_rank = len(rows) // world
            rows = rows[rank * per_rank:(rank + 1) * per_rank]
        n_fill = max(0, need - len(kept))
        parts = kept[:need] + spare[:n_fill]
        batch = pack_groups(parts, G, pad, filler=[False] * (len(parts) - n_fill) + [True] * n_fill)
        if world > 1:
            batch = local_slice(batch, rank, world)
        m = self._metrics["train"]
        m["dynamic_sampling/informative_frac"].append(len(kept) / generated)
        m["dynamic_sampling/gen_rounds"].append(rounds)
        m["dynamic_sampling/masked_groups"].append(n_fill)
        return batch


def detach_vllm_engine(trainer) -> bool:
    """Drop the trainer's reference to TRL's co-located vLLM engine (``trainer.vllm_generation.llm``; server mode
    has none in this process). True when there was one: the caller then releases vLLM's state once the trainer is
    gone as well (``rpsft.rl.run``)."""
    generation = getattr(trainer, "vllm_generation", None)
    if getattr(generation, "llm", None) is None:
        return False
    generation.llm = None
    return True


def use_vllm_default(requested: bool | None) -> bool:
    available = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    if requested and not available:
        raise ValueError("dapo.use_vllm=true needs the `vllm` package and a CUDA GPU; set dapo.use_vllm=false "
                         "(transformers generation) or install vllm on a GPU machine")
    return available if requested is None else bool(requested)


def build_grpo_config(cfg: RLConfig, output_dir: str | Path, reward_weights: list[float], use_vllm: bool,
                      **overrides: Any):
    """TRL ``GRPOConfig`` for DAPO from our config; CPU: fp32, no gradient checkpointing, ``use_cpu``."""
    d, t = cfg.dapo, cfg.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = d.prompts_per_step * d.num_generations
    if per_step % (d.micro_batch_size * world):
        raise ConfigError(f"prompts_per_step × num_generations ({per_step}) must be divisible by micro_batch_size × "
                          f"processes ({d.micro_batch_size} × {world})")
    kwargs = common_trainer_kwargs(t, output_dir)
    kwargs.update(
        per_device_train_batch_size=d.micro_batch_size,
        gradient_accumulation_steps=per_step // (d.micro_batch_size * world),
        num_generations=d.num_generations,
        max_completion_length=d.max_completion_length,
        temperature=d.temperature,
        top_p=d.top_p,
        top_k=0,
        epsilon=d.epsilon_low,
        epsilon_high=d.epsilon_high,
        beta=d.beta,
        loss_type=d.loss_type,
        mask_truncated_completions=d.mask_truncated_completions,
        scale_rewards=d.scale_rewards,
        num_iterations=d.num_iterations,
        reward_weights=reward_weights,
        multi_objective_aggregation="sum_then_normalize",  # total reward = Σ w·r, then group-normalised
        disable_dropout=True,
        log_completions=t.log_completions,
        use_vllm=use_vllm,
    )
    if use_vllm:
        kwargs.update(vllm_mode=d.vllm_mode, vllm_gpu_memory_utilization=d.vllm_gpu_memory_utilization,
                      vllm_max_model_length=d.vllm_max_model_length)
    kwargs.update(check_trainer_section(cfg.trainer, GRPOConfig))  # the trainer: section has the last word
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


def dapo_args(cfg: RLConfig, tokenizer, dataset, output_dir: str | Path, **grpo_overrides: Any):
    """The ``GRPOConfig`` of a DAPO run (reward weights, vLLM context length and all)."""
    d = cfg.dapo
    weights = build_reward_funcs(d.max_completion_length, d.overlong_buffer, d.overlong_penalty,
                                 d.judge_timeout_s)[1]
    use_vllm = use_vllm_default(d.use_vllm)
    if use_vllm and d.vllm_max_model_length is None:
        grpo_overrides.setdefault("vllm_max_model_length", vllm_max_model_length(cfg, tokenizer, dataset))
    return build_grpo_config(cfg, output_dir, weights, use_vllm, **grpo_overrides)


def build_trainer(cfg: RLConfig, model, tokenizer, dataset, output_dir: str | Path, anchor=None, args=None,
                  **grpo_overrides: Any):
    """The DAPO trainer for ``model`` on ``dataset`` (rows ``{"prompt", "gold"}``); ``args`` from
    :func:`dapo_args` when the caller needed them first (``rpsft rl`` starts the process group with them)."""
    d = cfg.dapo
    funcs, _, correctness = build_reward_funcs(d.max_completion_length, d.overlong_buffer, d.overlong_penalty,
                                               d.judge_timeout_s)
    if args is None:
        args = dapo_args(cfg, tokenizer, dataset, output_dir, **grpo_overrides)
    return DAPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=dataset, processing_class=tokenizer,
                       correctness=correctness, dynamic_sampling=d.dynamic_sampling, max_gen_rounds=d.max_gen_rounds,
                       anchor=anchor, anchor_weight=cfg.anchor.lam, anchor_period=cfg.anchor.period,
                       anchor_mode=cfg.anchor.mode,
                       anchor_budget=BudgetController.from_config(cfg.anchor) if anchor is not None else None)


def vllm_max_model_length(cfg: RLConfig, tokenizer, dataset) -> int:
    """The context vLLM must hold: the longest chat-rendered prompt plus ``max_completion_length``, rounded up to
    a multiple of 256. Without it vLLM sizes its KV cache for the model's own maximum (131k tokens for
    Llama-3.1), which does not fit in the co-located engine's share of GPU memory."""
    texts = (tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True) for row in dataset)
    longest = max((len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts), default=0)
    need = longest + cfg.dapo.max_completion_length
    return -(-need // 256) * 256


class RLProgress(RichProgressCallback):
    """The training progress bar, described by the latest reward, accuracy and completion length."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is not None and logs and "reward" in logs:
            desc = f"reward {logs['reward']:+.3f}"
            if logs.get("accuracy") is not None:
                desc += f"  acc {logs['accuracy']:.2f}"
            if logs.get("completions/mean_length") is not None:
                desc += f"  len {logs['completions/mean_length']:.0f}"
            self.progress.update(self.task, description=desc)
