"""Evaluation harness: benchmark registry, judges, Avg@k / Pass@k, HF and vLLM generation, log-likelihood
multiple choice and the forgetting probe. Importing this package is cheap (torch loads on first use)."""

from rpsft.eval.judges import extract_boxed, ifeval_loose, math_correct, mcq_letter
from rpsft.eval.metrics import avg_at_k, pass_at_k_any, pass_at_k_unbiased
from rpsft.eval.runner import judge_completion, run_eval
from rpsft.eval.suites import BENCHMARKS, GROUPS, expand_suites

__all__ = ["run_eval", "judge_completion", "extract_boxed", "math_correct", "mcq_letter", "ifeval_loose",
           "avg_at_k", "pass_at_k_any", "pass_at_k_unbiased", "BENCHMARKS", "GROUPS", "expand_suites",
           "forgetting_probe"]


def forgetting_probe(base: str, tuned: str, **kwargs) -> dict:
    """See :func:`rpsft.eval.probe.forgetting_probe`."""
    from rpsft.eval.probe import forgetting_probe as _probe

    return _probe(base, tuned, **kwargs)
