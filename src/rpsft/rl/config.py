"""``rpsft rl``'s configuration: :class:`RLConfig` (YAML + ``--set key=value`` + ``--init``), loaded by the
project's one config loader (:func:`rpsft.config.load_section`) and written resolved to ``output_dir/config.yaml``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..config import (AnchorConfig, BaseTrainConfig, anchor_checks, apply_overrides, checkpoint_checks, load_section,
                      nan_policy_checks, raise_first_failed, read_config_file)


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
class RLTrainConfig(BaseTrainConfig):
    max_steps: int = 100
    warmup_ratio: float = 0.0
    lr_scheduler: str = "constant"
    weight_decay: float = 0.1  # DAPO's AdamW setting
    log_completions: bool = False  # TRL's completions tables (parquet under output_dir/completions)


@dataclass
class RLAnchorConfig(AnchorConfig):
    enabled: bool | None = False  # off during RL unless asked for, as in the paper's RL runs


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
    anchor: RLAnchorConfig = field(default_factory=RLAnchorConfig)
    eval: RLEvalConfig = field(default_factory=RLEvalConfig)
    trainer: dict = field(default_factory=dict)  # any other GRPOConfig field, passed through (rpsft.trainer_args)


def load_rl_config(path: str | Path | None = None, overrides: list[str] | None = None,
                   init: str | None = None) -> RLConfig:
    """YAML file (optional) + ``--set`` overrides + ``--init`` -> a validated :class:`RLConfig`."""
    data = read_config_file(path, "configs/rl-demo.yaml")
    apply_overrides(data, overrides, RLConfig, label="rl config", free=("trainer.",),
                    example="dapo.num_generations=4")
    if init is not None:
        data["init"] = str(init)
    cfg = load_section(RLConfig, data, label="rl config")
    validate_rl(cfg)
    return cfg


def validate_rl(cfg: RLConfig) -> None:
    from ..budget import check_budget_config, check_budget_method

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
        *nan_policy_checks(t),
        *checkpoint_checks(t),
        (cfg.data.system_prompt in ("auto", "boxed", "file", "none"),
         f"data.system_prompt must be auto, boxed, file or none, got {cfg.data.system_prompt!r}"),
        *anchor_checks(cfg.anchor),
        (d.vllm_max_model_length is None or d.vllm_max_model_length > d.max_completion_length,
         f"dapo.vllm_max_model_length ({d.vllm_max_model_length}) must exceed dapo.max_completion_length "
         f"({d.max_completion_length}) to leave room for the prompt"),
    ]
    raise_first_failed(checks)


def rl_to_dict(cfg: RLConfig) -> dict:
    return dataclasses.asdict(cfg)


