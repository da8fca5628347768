import itertools
import math

import pytest

from rpsft.eval.metrics import avg_at_k, pass_at_k_any, pass_at_k_unbiased, pass_at_k_unbiased_mean, summarize


def test_avg_and_pass_any():
    correct = [[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]
    assert avg_at_k(correct) == pytest.approx((0.25 + 0 + 1) / 3)
    assert pass_at_k_any(correct) == pytest.approx(2 / 3)
    assert pass_at_k_any([[0, 1], [0, 0]], k=1) == 0.0  # only the first k count
    assert avg_at_k([[0, 1], [1, 1]], k=1) == 0.5


@pytest.mark.parametrize("n,c,k", [t for t in itertools.product(range(1, 13), range(0, 13), range(1, 13))
                                   if t[1] <= t[0] and t[2] <= t[0]])
def test_unbiased_pass_at_k_matches_closed_form(n, c, k):
    closed = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k_unbiased(n, c, k) == pytest.approx(closed, abs=1e-12)


def test_unbiased_pass_at_k_large_n_no_overflow():
    got = pass_at_k_unbiased(2000, 3, 100)
    assert got == pytest.approx(1 - math.comb(1997, 100) / math.comb(2000, 100), rel=1e-9)


def test_unbiased_equals_any_when_n_equals_k():
    correct = [[0, 1, 0], [0, 0, 0], [1, 1, 0]]
    assert pass_at_k_unbiased_mean(correct, 3) == pass_at_k_any(correct, 3)


@pytest.mark.parametrize("n,c,k", [(3, 4, 1), (3, 1, 4), (3, 1, 0), (3, -1, 1)])
def test_unbiased_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k_unbiased(n, c, k)


def test_summarize_reports_unbiased_only_when_n_exceeds_k():
    s = summarize([[1, 0, 0, 0], [0, 0, 0, 1]], k=2)
    assert s["k"] == 2 and s["n"] == 4
    assert s["avg_at_k"] == 0.25 and s["pass_at_k"] == 0.5 and s["avg_at_n"] == 0.25
    assert s["pass_at_k_unbiased"] == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))
    assert "pass_at_k_unbiased" not in summarize([[1, 0]], k=2)


def test_empty_inputs_rejected():
    with pytest.raises(ValueError):
        avg_at_k([])
    with pytest.raises(ValueError):
        avg_at_k([[]])
