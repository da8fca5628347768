"""Avg@k and Pass@k (paper, evaluation protocol).

``correct`` is always a list over problems of a list over that problem's samples (bools or 0/1 scores).

* Avg@k: mean over problems of the mean correctness of its k samples (the expected single-sample accuracy).
* Pass@k as the paper reports it: the fraction of problems with at least one correct sample among the first k.
* Unbiased Pass@k (Chen et al., 2021): with n >= k samples of which c are correct,
  1 - C(n-c, k) / C(n, k), the probability that a random k-subset holds a correct sample; lower variance than
  the "any of the first k" count when n > k samples were drawn.
"""

from __future__ import annotations

import math
from typing import Sequence

Correct = Sequence[Sequence[float | bool]]


def _check(correct: Correct) -> None:
    if not correct:
        raise ValueError("no problems to score")
    empty = [i for i, s in enumerate(correct) if len(s) == 0]
    if empty:
        raise ValueError(f"problems {empty[:5]} have no samples")


def avg_at_k(correct: Correct, k: int | None = None) -> float:
    """Mean over problems of the mean correctness of the first ``k`` samples (all samples if k is None)."""
    _check(correct)
    return sum(sum(map(float, s[:k])) / len(s[:k]) for s in correct) / len(correct)


def pass_at_k_any(correct: Correct, k: int | None = None) -> float:
    """Fraction of problems with any correct sample among the first ``k`` (all if None)."""
    _check(correct)
    if k is not None and any(len(s) < k for s in correct):
        raise ValueError(f"pass@{k} needs at least {k} samples per problem")
    return sum(1.0 for s in correct if any(float(x) > 0 for x in s[:k])) / len(correct)


def pass_at_k_unbiased(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k)/C(n, k) for one problem, computed as a product (no huge binomials, no overflow)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    # C(n-c,k)/C(n,k) = prod_{i=n-c+1}^{n} (1 - k/i)
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def pass_at_k_unbiased_mean(correct: Correct, k: int) -> float:
    """Mean over problems of :func:`pass_at_k_unbiased` with each problem's own n and c."""
    _check(correct)
    return sum(pass_at_k_unbiased(len(s), sum(1 for x in s if float(x) > 0), k) for s in correct) / len(correct)


def stderr(values: Sequence[float]) -> float:
    """Standard error of a mean (0 for fewer than two values); shown next to accuracies of small suites."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def summarize(correct: Correct, k: int) -> dict:
    """The numbers one benchmark reports (fixed keys, k stored beside them): ``avg_at_k``, ``pass_at_k`` (any
    of the first k) and, when more than k samples exist, ``avg_at_n`` and ``pass_at_k_unbiased`` over all n."""
    _check(correct)
    n = min(len(s) for s in correct)
    k = min(k, n)
    per_problem = [sum(map(float, s[:k])) / k for s in correct]
    out = {"problems": len(correct), "k": k, "n": n, "avg_at_k": avg_at_k(correct, k),
           "pass_at_k": pass_at_k_any(correct, k), "stderr": stderr(per_problem)}
    if n > k:
        out["avg_at_n"] = avg_at_k(correct)
        out["pass_at_k_unbiased"] = pass_at_k_unbiased_mean(correct, k)
    return out
