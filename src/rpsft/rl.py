"""``rpsft rl``: DAPO (arXiv 2503.14476) from an SFT checkpoint, on TRL's ``GRPOTrainer`` (paper §5.2, Tables 3-4).

The objective is DAPO's Eq. 1: token-level clipped surrogate with clip-higher (ε_low = 0.2, ε_high = 0.28), no KL
term (β = 0, so no reference model is loaded), token-mean over the whole accumulated batch (TRL
``loss_type="dapo"``), truncated completions masked out of the loss (``mask_truncated_completions``), G samples per
prompt at T = 1. What TRL does not provide is added here, each piece small and tested:

* rewards (``rl_rewards``): +1/−1 from the evaluation harness's math judge + TRL's soft overlong punishment;
* dynamic sampling (``rl_sampling`` + :class:`DAPOTrainer`): groups whose G answers are all right or all wrong are
  dropped and the batch is refilled with freshly generated groups (DAPO Eq. 11);
* optionally the RPSFT rotation anchor (``--set anchor.enabled=true``), applied in closed form once per optimizer
  step exactly as in ``rpsft.train.AnchoredSFTTrainer``; off by default, as in the paper's RL runs.

Config: :class:`RLConfig` (YAML + ``--set key=value``), written resolved to ``output_dir/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import json
import os
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import fileio
from .config import AnchorConfig, ConfigError, _coerce, raise_first_failed, read_config_file, set_dotted

# ----------------------------------------------------------------------------------------------------- config


@dataclass
class RLModelConfig:
    dtype: str = "float32"  # fp32 master weights: Adam steps at lr 1e-6 vanish in bf16 weights
    trust_remote_code: bool = False


@dataclass
class RLDataConfig:
    train: str = "data/synth-math/train.jsonl"  # synthetic math (prompt/completion) or GSM8K (question/answer) JSONL
    limit: int | None = None  # first N prompts
    system_prompt: str = "auto"  # auto (= rpsft eval's policy: boxed for GSM8K/official rows, file otherwise) |
    #                              boxed | file | none


@dataclass
class DAPOSection:
    num_generations: int = 8  # G, samples per prompt (paper: 8)
    prompts_per_step: int = 16  # prompts per optimizer step (a step trains on prompts_per_step × G completions)
    micro_batch_size: int = 8  # completions per forward/backward; grad accumulation makes up the step
    max_completion_length: int = 1024  # L_max
    overlong_buffer: int = 256  # L_cache of the soft overlong punishment (DAPO Eq. 13)
    overlong_penalty: float = 1.0  # weight of that punishment in the total reward (0 = off)
    epsilon_low: float = 0.2  # clip-higher (DAPO §3.1)
    epsilon_high: float = 0.28
    beta: float = 0.0  # KL weight; 0 = no reference model (DAPO)
    temperature: float = 1.0
    top_p: float = 1.0
    loss_type: str = "dapo"  # token-level mean over the accumulated batch (DAPO §3.3)
    mask_truncated_completions: bool = True  # overlong filtering (DAPO §3.4)
    scale_rewards: str = "group"  # advantage = (r − mean_group) / std_group
    num_iterations: int = 1  # μ, policy updates per generation batch
    dynamic_sampling: bool = True  # drop all-correct / all-wrong groups and refill (DAPO Eq. 11)
    max_gen_rounds: int = 3  # generation rounds per step (first + refills) before filling with masked groups
    judge_timeout_s: float = 5.0
    use_vllm: bool | None = None  # None: vLLM when it is installed and a GPU is present
    vllm_mode: str = "colocate"
    vllm_gpu_memory_utilization: float = 0.3
    vllm_max_model_length: int | None = None  # None: longest prompt (tokens) + max_completion_length; a model's
    #                                           own default (131k for Llama-3.1) leaves no room for the KV cache


@dataclass
class RLTrainConfig:
    lr: float = 1e-6
    max_steps: int = 100
    warmup_ratio: float = 0.0
    lr_scheduler: str = "constant"
    weight_decay: float = 0.1  # DAPO's AdamW setting
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    logging_steps: int = 1
    save_steps: int = 50
    save_total_limit: int | None = 2
    seed: int = 42
    bf16: bool | None = None  # None: bf16 on a GPU that supports it, fp32 on CPU
    gradient_checkpointing: bool | None = None  # None: on for GPUs, off on CPU
    log_completions: bool = False  # TRL's completions tables (parquet under output_dir/completions)
    report_to: list[str] = field(default_factory=list)  # trackers: tensorboard, wandb, trackio, ... ([] = none)


@dataclass
class RLEvalConfig:
    enabled: bool = False  # evaluate the RL checkpoint at the end (rpsft.eval.run_eval)
    before: bool = True  # ... and the init checkpoint first, with the same settings (before/after)
    suite: str = "synth-math"
    limit: int | None = 100
    k: int | None = None
    greedy: bool = True
    max_new_tokens: int | None = None  # default: dapo.max_completion_length
    temperature: float = 0.7
    top_p: float = 0.95
    batch_size: int | None = None
    system_prompt: str | None = None


@dataclass
class RLConfig:
    init: str | None = None  # the SFT checkpoint to start from (--init)
    output_dir: str = "runs/rl"
    model: RLModelConfig = field(default_factory=RLModelConfig)
    data: RLDataConfig = field(default_factory=RLDataConfig)
    dapo: DAPOSection = field(default_factory=DAPOSection)
    train: RLTrainConfig = field(default_factory=RLTrainConfig)
    anchor: AnchorConfig = field(default_factory=lambda: AnchorConfig(enabled=False))
    eval: RLEvalConfig = field(default_factory=RLEvalConfig)
    trainer: dict = field(default_factory=dict)  # any other GRPOConfig field, passed through (rpsft.trainer_args)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def rl_keys(cls=RLConfig, prefix: str = "") -> list[str]:
    out = []
    for name, tp in _hints(cls).items():
        out += rl_keys(tp, f"{prefix}{name}.") if _is_section(tp) else [prefix + name]
    return out


def _unknown(key: str) -> ConfigError:
    keys = rl_keys()
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown rl config key {key!r}{hint} Valid keys: {', '.join(keys)}")


def _build(cls, data: Any, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    kwargs = {}
    for k, v in data.items():
        key = prefix + str(k)
        if k not in hints:
            raise _unknown(key)
        tp = hints[k]
        kwargs[k] = _build(tp, v or {}, key + ".") if _is_section(tp) else _coerce(v, tp, key)
    if cls is RLConfig and "anchor" not in kwargs:
        kwargs["anchor"] = AnchorConfig(enabled=False)
    elif cls is AnchorConfig and "enabled" not in kwargs:
        kwargs["enabled"] = False  # off during RL unless asked for, as in the paper
    return cls(**kwargs)


def apply_rl_overrides(data: dict, overrides: list[str] | None) -> dict:
    keys = set(rl_keys())
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set dapo.num_generations=4")
        key, text = (s.strip() for s in item.split("=", 1))
        if key.startswith("trainer."):  # free-form pass-through, checked against GRPOConfig when the run starts
            set_dotted(data, key, text, item)
            continue
        if key not in keys:
            raise _unknown(key)
        set_dotted(data, key, text, item)
    return data


def load_rl_config(path: str | Path | None = None, overrides: list[str] | None = None,
                   init: str | None = None) -> RLConfig:
    """YAML file (optional) + ``--set`` overrides + ``--init`` -> a validated :class:`RLConfig`."""
    data = read_config_file(path, "configs/rl-demo.yaml")
    apply_rl_overrides(data, overrides)
    if init is not None:
        data["init"] = str(init)
    cfg = _build(RLConfig, data)
    validate_rl(cfg)
    return cfg


def validate_rl(cfg: RLConfig) -> None:
    from .budget import check_budget_config, check_budget_method

    check_budget_config(cfg.anchor)
    check_budget_method(cfg.anchor, "rpsft rl with anchor.enabled=false", bool(cfg.anchor.enabled),
                        fix="set anchor.enabled=true, or drop anchor.budget")
    d, t = cfg.dapo, cfg.train
    per_step = d.prompts_per_step * d.num_generations
    checks = [
        (cfg.init is not None, "no initial checkpoint: pass --init CHECKPOINT (an `rpsft train` output directory, "
                               "an embedded model name or a hub id), or set init: in the config"),
        (d.num_generations >= 2, f"dapo.num_generations (G) must be >= 2 to form group advantages, got "
                                 f"{d.num_generations}"),
        (d.prompts_per_step >= 1, f"dapo.prompts_per_step must be >= 1, got {d.prompts_per_step}"),
        (d.micro_batch_size >= 1 and per_step % d.micro_batch_size == 0,
         f"dapo.micro_batch_size ({d.micro_batch_size}) must divide prompts_per_step × num_generations "
         f"({d.prompts_per_step} × {d.num_generations} = {per_step})"),
        (d.max_completion_length >= 1, f"dapo.max_completion_length must be >= 1, got {d.max_completion_length}"),
        (d.overlong_penalty == 0 or 0 < d.overlong_buffer <= d.max_completion_length,
         f"dapo.overlong_buffer must be in (0, max_completion_length={d.max_completion_length}], got "
         f"{d.overlong_buffer} (or set dapo.overlong_penalty=0)"),
        (d.overlong_penalty >= 0, f"dapo.overlong_penalty must be >= 0, got {d.overlong_penalty}"),
        (0 <= d.epsilon_low < 1 and d.epsilon_high >= 0, f"need 0 <= dapo.epsilon_low < 1 and epsilon_high >= 0, "
                                                         f"got {d.epsilon_low}, {d.epsilon_high}"),
        (d.beta >= 0, f"dapo.beta must be >= 0, got {d.beta}"),
        (d.temperature > 0, f"dapo.temperature must be > 0, got {d.temperature}"),
        (d.max_gen_rounds >= 1, f"dapo.max_gen_rounds must be >= 1, got {d.max_gen_rounds}"),
        (d.scale_rewards in ("group", "batch", "none"), f"dapo.scale_rewards must be group, batch or none, got "
                                                        f"{d.scale_rewards!r}"),
        (d.num_iterations >= 1, f"dapo.num_iterations must be >= 1, got {d.num_iterations}"),
        (t.lr > 0, f"train.lr must be > 0, got {t.lr}"),
        (t.max_steps >= 1, f"train.max_steps must be >= 1, got {t.max_steps}"),
        (cfg.data.system_prompt in ("auto", "boxed", "file", "none"),
         f"data.system_prompt must be auto, boxed, file or none, got {cfg.data.system_prompt!r}"),
        (cfg.anchor.lam >= 0 and cfg.anchor.period >= 1, "anchor.lam must be >= 0 and anchor.period >= 1"),
        (d.vllm_max_model_length is None or d.vllm_max_model_length > d.max_completion_length,
         f"dapo.vllm_max_model_length ({d.vllm_max_model_length}) must exceed dapo.max_completion_length "
         f"({d.max_completion_length}) to leave room for the prompt"),
    ]
    raise_first_failed(checks)


def rl_to_dict(cfg: RLConfig) -> dict:
    return dataclasses.asdict(cfg)


# ------------------------------------------------------------------------------------------------------- data


def _auto_system_prompt(path: Path) -> str:
    """``rpsft eval``'s policy (eval.loaders.default_system_prompt): the official boxed instruction for GSM8K and
    official rows, the rows as written for our own prompt/completion data."""
    with path.open() as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                return "boxed" if isinstance(row, dict) and ("question" in row or "reward_model" in row) else "file"
    return "file"


def _table_prompts(cfg: RLConfig) -> list[dict]:
    """RL prompts from a hub dataset (``hf:DATASET[:CONFIG]:SPLIT``) or a parquet/arrow/CSV file, through the
    evaluation loader (GSM8K/MATH/official rows); the system prompt policy as for a file ("auto": boxed)."""
    from .eval.loaders import load_items
    from .eval.suites import Benchmark, resolve_benchmark
    from .rl_rewards import encode_gold

    src = str(cfg.data.train)
    b = resolve_benchmark(src) if src.startswith("hf:") else Benchmark(Path(src).stem, "file", src, "auto", 1,
                                                                          "extra")
    mode = "boxed" if cfg.data.system_prompt == "auto" else cfg.data.system_prompt
    items = load_items(b, None, cfg.data.limit, mode)
    bad = [it["id"] for it in items if it["judge"] != "math"]
    if bad:
        raise ValueError(f"{src}: rows {bad[:5]} are not math problems; the RL reward is math correctness")
    return [{"prompt": it["prompt"], "gold": encode_gold(it["gold"])} for it in items]


def load_prompts(cfg: RLConfig) -> list[dict]:
    """``[{"prompt": [messages], "gold": json}]`` built by the evaluation harness's own loader
    (``rpsft.eval.loaders.load_items``), so RL prompts are exactly the prompts ``rpsft eval`` scores."""
    from .eval.loaders import load_items
    from .eval.suites import Benchmark

    if str(cfg.data.train).startswith("hf:") or Path(cfg.data.train).suffix in (".parquet", ".arrow", ".csv"):
        return _table_prompts(cfg)
    path = Path(cfg.data.train).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"RL prompt file {path} does not exist; write the built-in data with `rpsft data synth-math` or point "
            f"data.train at a GSM8K-style JSONL (question/answer with '#### N'), e.g. "
            f"--set data.train=hf:openai/gsm8k:main:train")
    mode = cfg.data.system_prompt
    if mode == "auto":
        mode = _auto_system_prompt(path)
    items = load_items(Benchmark(path.stem, "file", str(path), "auto", 1, "extra"), None, cfg.data.limit, mode)
    bad = [it["id"] for it in items if it["judge"] != "math"]
    if bad:
        raise ValueError(f"{path}: rows {bad[:5]} are not math problems (judge {items[0]['judge']!r}); the RL reward "
                         "is math correctness, so data.train must hold math rows with a gold answer")
    from .rl_rewards import encode_gold

    return [{"prompt": it["prompt"], "gold": encode_gold(it["gold"])} for it in items]


# ---------------------------------------------------------------------------------------------------- trainer


@functools.lru_cache(maxsize=None)
def _trainer_class():
    """Built lazily so that importing rpsft.rl (the CLI, the config) does not import torch or TRL."""
    import torch
    from trl import GRPOTrainer

    from .rl_rewards import informative_groups
    from .rl_sampling import pack_groups, refill_size

    class DAPOTrainer(GRPOTrainer):
        """GRPOTrainer + DAPO dynamic sampling + the optional rotation anchor.

        Dynamic sampling (DAPO Eq. 11). ``_generate_and_score_completions`` is the one place where a whole
        generation batch (prompts × G) exists scored and before it is split into micro-batches, so the filter
        lives there: score the batch, keep the groups with 0 < #correct < G, generate more groups from a refill
        stream of training prompts until the batch is full again (at most ``max_gen_rounds`` rounds), pack the
        kept groups into one batch of the original size. Missing groups after the last round are filled with
        masked groups (no gradient, no tokens in the normaliser), so a step never silently trains on groups
        whose advantages are all zero yet count in the DAPO token mean.

        Anchor: the closed-form gradient of λ·R added once per optimizer step, on the last micro-batch (see
        rpsft.train for why a training_step override and not a callback).
        """

        def __init__(self, *args, correctness=None, dynamic_sampling: bool = True, max_gen_rounds: int = 3,
                     anchor=None, anchor_weight: float = 1.0, anchor_period: int = 1, anchor_budget=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.correctness = correctness
            self.dynamic_sampling = bool(dynamic_sampling)
            self.max_gen_rounds = int(max_gen_rounds)
            self.anchor = anchor if anchor is not None and len(anchor) else None
            self.anchor_weight = float(anchor_weight)
            self.anchor_period = int(anchor_period)
            self.anchor_budget = anchor_budget if self.anchor is not None else None  # rpsft.budget: adaptive λ
            if self.anchor_budget is not None:
                from .budget import budget_callback

                self.anchor_weight = self.anchor_budget.weight(self.anchor.terms)
                self.add_callback(budget_callback(self.anchor_budget))
            self._refill_order: list[int] = []
            self._refill_gen = torch.Generator().manual_seed(int(self.args.seed) + 1)
            if self.dynamic_sampling:
                if correctness is None:
                    raise ValueError("dynamic sampling filters on correctness: pass correctness=MathCorrectnessReward")
                if self.accelerator.num_processes > 1:
                    raise NotImplementedError(
                        "dynamic sampling packs whole groups, but with several processes a group's G completions are "
                        "spread over ranks; set dapo.dynamic_sampling=false for multi-GPU runs")
            if self.anchor is not None and self.accelerator.distributed_type.name == "DEEPSPEED":
                raise NotImplementedError("the rotation anchor adds to .grad, which DeepSpeed does not read; use "
                                          "DDP or FSDP2")

        # -------------------------------------------------------------- anchor
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            if (self.anchor is not None and self.anchor_weight != 0.0 and self.accelerator.sync_gradients
                    and self.state.global_step % self.anchor_period == 0):
                r = self.anchor.accumulate_grad_(self.accelerator.unwrap_model(self.model), self.anchor_weight)
                self._metrics["train"]["rpsft/penalty"].append(r)
                if self.anchor_budget is None:  # with a budget, log_values() below gives λ
                    self._metrics["train"]["rpsft/lambda"].append(self.anchor_weight)
                for t, v in self.anchor.relative_drift_by_type().items():
                    self._metrics["train"][f"rpsft/drift/{t}"].append(v)
                if self.anchor_budget is not None:
                    self.anchor_weight = self.anchor_budget.update(self.anchor)
                    for key, v in self.anchor_budget.log_values().items():
                        self._metrics["train"][key].append(v)
            return loss

        # ---------------------------------------------------- dynamic sampling
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
            need = len(inputs) // G
            kept: list[tuple[dict, int]] = []
            spare: list[tuple[dict, int]] = []
            rows, rounds, generated = inputs, 0, 0
            while True:
                scored = super()._generate_and_score_completions(rows)
                flags = informative_groups(self.correctness.last_correct, G)
                rounds += 1
                generated += len(flags)
                for g, ok in enumerate(flags):
                    (kept if ok else spare).append((scored, g))
                if len(kept) >= need or rounds >= self.max_gen_rounds:
                    break
                rows = self._refill_rows(refill_size(need - len(kept), len(kept), generated, need))
            n_fill = max(0, need - len(kept))
            parts = kept[:need] + spare[:n_fill]
            batch = pack_groups(parts, G, self._tokenizer.pad_token_id,
                                filler=[False] * (len(parts) - n_fill) + [True] * n_fill)
            m = self._metrics["train"]
            m["dynamic_sampling/informative_frac"].append(len(kept) / generated)
            m["dynamic_sampling/gen_rounds"].append(rounds)
            m["dynamic_sampling/masked_groups"].append(n_fill)
            return batch

    return DAPOTrainer


def __getattr__(name: str):
    if name == "DAPOTrainer":  # rpsft.rl.DAPOTrainer, built on first access
        return _trainer_class()
    raise AttributeError(name)


def use_vllm_default(requested: bool | None) -> bool:
    import torch

    available = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    if requested and not available:
        raise ValueError("dapo.use_vllm=true needs the `vllm` package and a CUDA GPU; set dapo.use_vllm=false "
                         "(transformers generation) or install vllm on a GPU machine")
    return available if requested is None else bool(requested)


def build_grpo_config(cfg: RLConfig, output_dir: str | Path, reward_weights: list[float], use_vllm: bool,
                      **overrides: Any):
    """TRL ``GRPOConfig`` for DAPO from our config; CPU: fp32, no gradient checkpointing, ``use_cpu``."""
    from trl import GRPOConfig

    from .train import common_trainer_kwargs

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
    from .trainer_args import check_trainer_section

    kwargs.update(check_trainer_section(cfg.trainer, GRPOConfig))  # the trainer: section has the last word
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


def build_trainer(cfg: RLConfig, model, tokenizer, dataset, output_dir: str | Path, anchor=None,
                  **grpo_overrides: Any):
    """The DAPO trainer for ``model`` on ``dataset`` (rows ``{"prompt", "gold"}``)."""
    from .rl_rewards import build_reward_funcs

    from .budget import BudgetController

    d = cfg.dapo
    funcs, weights, correctness = build_reward_funcs(d.max_completion_length, d.overlong_buffer,
                                                     d.overlong_penalty, d.judge_timeout_s)
    use_vllm = use_vllm_default(d.use_vllm)
    if use_vllm and d.vllm_max_model_length is None:
        grpo_overrides.setdefault("vllm_max_model_length", vllm_max_model_length(cfg, tokenizer, dataset))
    args = build_grpo_config(cfg, output_dir, weights, use_vllm, **grpo_overrides)
    return _trainer_class()(model=model, reward_funcs=funcs, args=args, train_dataset=dataset,
                            processing_class=tokenizer, correctness=correctness,
                            dynamic_sampling=d.dynamic_sampling, max_gen_rounds=d.max_gen_rounds,
                            anchor=anchor, anchor_weight=cfg.anchor.lam, anchor_period=cfg.anchor.period,
                            anchor_budget=BudgetController.from_config(cfg.anchor) if anchor is not None else None)


def vllm_max_model_length(cfg: RLConfig, tokenizer, dataset) -> int:
    """The context vLLM must hold: the longest chat-rendered prompt plus ``max_completion_length``, rounded up to
    a multiple of 256. Without it vLLM sizes its KV cache for the model's own maximum (131k tokens for
    Llama-3.1), which does not fit in the co-located engine's share of GPU memory."""
    texts = (tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True) for row in dataset)
    longest = max((len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts), default=0)
    need = longest + cfg.dapo.max_completion_length
    return -(-need // 256) * 256


def _is_main() -> bool:
    """Rank 0 of an ``accelerate launch`` / torchrun job (or the only process): the one that evaluates and
    writes run.json. Read from the environment, so it is known before the Trainer exists."""
    return int(os.environ.get("RANK", "0") or 0) == 0


# -------------------------------------------------------------------------------------------------------- run


def _progress_callback(console):
    from .train import RichProgressCallback

    class RLProgress(RichProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.progress is not None and logs and "reward" in logs:
                desc = f"reward {logs['reward']:+.3f}"
                if logs.get("accuracy") is not None:
                    desc += f"  acc {logs['accuracy']:.2f}"
                if logs.get("completions/mean_length") is not None:
                    desc += f"  len {logs['completions/mean_length']:.0f}"
                self.progress.update(self.task, description=desc)

    return RLProgress(console)


def _evaluate(cfg: RLConfig, model: str, out: Path, use_vllm: bool) -> dict:
    from .eval import run_eval

    e = cfg.eval
    s = run_eval(model, e.suite, k=e.k, limit=e.limit, backend="vllm" if use_vllm else "hf", out_dir=out,
                 max_new_tokens=e.max_new_tokens or cfg.dapo.max_completion_length, temperature=e.temperature,
                 top_p=e.top_p, greedy=e.greedy, batch_size=e.batch_size, seed=cfg.train.seed,
                 system_prompt=e.system_prompt, judge_timeout_s=cfg.dapo.judge_timeout_s)
    return {name: {key: b.get(key) for key in ("avg_at_k", "accuracy", "pass_at_k", "problems", "k", "mean_tokens",
                                                "truncated", "answered") if key in b}
            for name, b in s["benchmarks"].items()} | {"wall_s": s["wall_s"], "dir": str(out)}


def _train_stats(rows: list[dict]) -> dict:
    """First / last logged training reward and accuracy, and seconds per optimizer step, from metrics.jsonl."""
    logged = [r for r in rows if "reward" in r]
    out: dict[str, Any] = {}
    if logged:
        for key in ("reward", "accuracy", "completions/mean_length"):
            vals = [r[key] for r in logged if r.get(key) is not None]
            if vals:
                out[f"{key}_first"] = vals[0]
                out[f"{key}_last"] = vals[-1]
        times = [r["step_time"] for r in logged if r.get("step_time") is not None]
        if times:
            out["step_time_mean_s"] = sum(times) / len(times)
    return out


# keys that may change when a run is resumed: they do not alter the steps already taken
RESUMABLE_CHANGES = ("train.max_steps", "train.save_steps", "train.logging_steps", "eval.")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def _prepare_output(out: Path, cfg: RLConfig, resume: bool | str | None, overwrite: bool) -> Path | None:
    """train.prepare_run_dir with the RL rule: a run may be resumed with another length or evaluation only."""
    from .train import prepare_run_dir

    def diff(saved: str) -> list[str]:
        old, new = _flat(yaml.safe_load(saved) or {}), _flat(rl_to_dict(cfg))
        return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_CHANGES)]

    return prepare_run_dir(out, resume, overwrite, diff, may_change=", ".join(RESUMABLE_CHANGES))


def _check_trainer_args(cfg: RLConfig) -> None:
    """trainer: keys and trackers checked before the policy is loaded."""
    from trl import GRPOConfig

    from .trainer_args import check_report_to, check_trainer_section

    check_trainer_section(cfg.trainer, GRPOConfig)
    check_report_to(cfg.train.report_to)


def run_rl(cfg: RLConfig, resume: bool | str | None = None, overwrite: bool = False, console=None,
           progress: bool = True, extra_callbacks: list | None = None) -> dict:
    """DAPO from ``cfg.init``; returns the run summary (also ``output_dir/run.json``)."""
    import torch

    from .models import load_model
    from .train import build_anchor, install_callbacks

    from .launch import check_launch

    validate_rl(cfg)
    check_launch(bool(cfg.anchor.enabled))
    _check_trainer_args(cfg)
    out = Path(cfg.output_dir)
    # data first: a bad file fails in a second, not after loading weights
    prompts = load_prompts(cfg)
    if len(prompts) < cfg.dapo.prompts_per_step:
        raise ValueError(f"{cfg.data.train}: {len(prompts)} prompts, fewer than dapo.prompts_per_step="
                         f"{cfg.dapo.prompts_per_step}; lower prompts_per_step or raise data.limit")
    ckpt = _prepare_output(out, cfg, resume, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    fileio.write_text(out / "config.yaml", yaml.safe_dump(rl_to_dict(cfg), sort_keys=False))
    use_vllm = use_vllm_default(cfg.dapo.use_vllm)

    summary: dict[str, Any] = {"init": cfg.init, "output_dir": str(out)}
    # evaluations and run.json on rank 0 only: each rank would start its own vLLM engine and append to one file
    main = _is_main()
    if cfg.eval.enabled and cfg.eval.before and main:
        summary["eval_before"] = _evaluate(cfg, cfg.init, out / "eval-init", use_vllm)

    import datasets

    torch.manual_seed(cfg.train.seed)
    model, tokenizer = load_model(cfg.init, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
    anchor = None
    if cfg.anchor.enabled:
        anchor = build_anchor(model, cfg, progress=progress)  # frames of the init (SFT) weights; cached bases
        anchor = anchor if len(anchor) else None
    trainer = build_trainer(cfg, model, tokenizer, datasets.Dataset.from_list(prompts), out, anchor=anchor)
    if ckpt is not None and trainer.anchor_budget is not None and trainer.anchor_budget.load(ckpt):
        trainer.anchor_weight = trainer.anchor_budget.weight(trainer.anchor.terms)
    install_callbacks(trainer, out, _progress_callback(console) if progress else None, extra_callbacks)

    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    train_s = time.perf_counter() - t0
    trainer.save_model(str(out))
    steps = trainer.state.global_step
    # from drift(): works on FSDP2 shards too (every rank takes part in its all-reduce); penalty() does not
    final_penalty = None if anchor is None else \
        sum(v["abs"] ** 2 for v in anchor.drift(trainer.accelerator.unwrap_model(trainer.model)).values())
    start = json.loads((ckpt / "trainer_state.json").read_text())["global_step"] if ckpt else 0
    summary.update({
        "global_step": steps,
        "train_seconds": round(train_s, 2),
        "seconds_per_step": round(train_s / max(steps - start, 1), 2),  # wall clock, generation included
        "prompts": len(prompts),
        "generation": "vllm" if use_vllm else "transformers",
        "anchor": None if anchor is None else {"matrices": len(anchor), "ranks": sorted(set(anchor.ranks.values())),
                                               "lam": cfg.anchor.lam,
                                               "final_penalty": final_penalty},
        "train": _train_stats(fileio.read_jsonl(out / "metrics.jsonl")),
        "resumed_from": str(ckpt) if ckpt else None,
        "metrics": str(out / "metrics.jsonl"),
        "config": rl_to_dict(cfg),
    })
    del trainer, model
    if not main:
        return summary
    if cfg.eval.enabled:
        summary["eval_after"] = _evaluate(cfg, str(out), out / "eval", use_vllm)
    fileio.write_json(out / "run.json", summary)
    return summary
