"""DAPO's rewards for ``rpsft rl`` (DAPO paper, arXiv 2503.14476, Eq. 12-13), as TRL reward functions.

* rule reward (Eq. 12): +1 when the completion's last ``\\boxed{}`` equals the gold answer under the evaluation
  harness's judge (``rpsft.eval.judges.math_correct``, the same function that grades ``rpsft eval``), −1 otherwise;
* soft overlong punishment (Eq. 13): 0 up to L_max − L_cache tokens, then a linear ramp down to −1 at L_max.
  TRL ships it as ``trl.rewards.get_soft_overlong_punishment(max_completion_len, soft_punish_cache)``; we pass it
  to ``GRPOTrainer`` as a second reward function, and GRPOTrainer sums ``reward_weights · rewards`` before the group
  normalisation (``multi_objective_aggregation="sum_then_normalize"``), so the punishment reaches the advantage.
  tests/rl/test_rl_trainer.py checks exactly that on the trainer's own scoring path: of two equally correct
  completions the longer one gets the lower advantage.

Both are picklable callables (TRL's async rollout worker sends reward functions to a child process).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

CORRECT, WRONG = 1.0, -1.0


def completion_text(completion: Any) -> str:
    """TRL hands conversational completions as ``[{"role": "assistant", "content": ...}]``, plain ones as str."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(m.get("content", "") if isinstance(m, dict) else str(m) for m in completion)
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return str(completion)


def encode_gold(gold: Any) -> str:
    """Gold answers come as str, int or lists (official files); a JSON string keeps one dataset column type
    and gives the judge back exactly the value the evaluation would grade against."""
    return json.dumps(gold)


def decode_gold(gold: str) -> Any:
    return json.loads(gold)


class MathCorrectnessReward:
    """+1 / −1 from ``rpsft.eval.judges.math_correct`` (DAPO's rule reward, Eq. 12).

    ``last_correct`` keeps the verdicts of the latest call, in batch order: dynamic sampling filters groups on
    accuracy (DAPO Eq. 11: keep a group when 0 < #correct < G), not on the shaped total reward."""

    __name__ = "math_reward"  # TRL names the logged metric rewards/<__name__>/mean

    def __init__(self, timeout_s: float = 5.0):
        self.timeout_s = float(timeout_s)
        self.last_correct: list[bool] = []

    def __call__(self, completions: Sequence[Any], gold: Sequence[str], log_metric=None, **kwargs) -> list[float]:
        from rpsft.eval.judges import math_correct

        if len(completions) != len(gold):
            raise ValueError(f"math_reward: {len(completions)} completions but {len(gold)} gold answers")
        correct = [math_correct(completion_text(c), decode_gold(g), timeout_s=self.timeout_s)
                   for c, g in zip(completions, gold)]
        self.last_correct = correct
        if log_metric is not None and correct:
            log_metric("accuracy", sum(correct) / len(correct))
        return [CORRECT if ok else WRONG for ok in correct]


def soft_overlong_punishment(max_completion_length: int, overlong_buffer: int):
    """TRL's DAPO Eq. 13 reward function (L_max = ``max_completion_length``, L_cache = ``overlong_buffer``)."""
    from trl.rewards import get_soft_overlong_punishment

    if not 0 < overlong_buffer <= max_completion_length:
        raise ValueError(f"dapo.overlong_buffer must be in (0, dapo.max_completion_length={max_completion_length}], "
                         f"got {overlong_buffer}; set dapo.overlong_penalty=0 to switch the punishment off")
    return get_soft_overlong_punishment(max_completion_len=max_completion_length, soft_punish_cache=overlong_buffer)


def build_reward_funcs(max_completion_length: int, overlong_buffer: int, overlong_penalty: float,
                       judge_timeout_s: float = 5.0) -> tuple[list, list[float], MathCorrectnessReward]:
    """``(reward_funcs, reward_weights, correctness)`` for GRPOTrainer/GRPOConfig. The punishment is left out
    (not given weight 0) when ``overlong_penalty == 0``, so a disabled term costs nothing and logs nothing."""
    correctness = MathCorrectnessReward(judge_timeout_s)
    funcs: list = [correctness]
    weights = [1.0]
    if overlong_penalty:
        funcs.append(soft_overlong_punishment(max_completion_length, overlong_buffer))
        weights.append(float(overlong_penalty))
    return funcs, weights, correctness


def informative_groups(correct: Sequence[bool | float], group_size: int) -> list[bool]:
    """DAPO dynamic sampling (Eq. 11): per group of ``group_size`` consecutive samples, True when the group is
    neither all correct nor all wrong. Such groups are the only ones whose rule-reward advantage is non-zero."""
    if group_size < 1 or len(correct) % group_size:
        raise ValueError(f"{len(correct)} samples do not split into groups of {group_size}")
    out = []
    for g in range(0, len(correct), group_size):
        n = sum(bool(c) for c in correct[g:g + group_size])
        out.append(0 < n < group_size)
    return out
