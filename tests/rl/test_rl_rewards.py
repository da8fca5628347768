"""DAPO rewards: the +1/-1 rule reward through the evaluation judge, TRL's soft overlong punishment, and the
dynamic-sampling group filter."""

from __future__ import annotations

import pytest

from rpsft.rl.rewards import (MathCorrectnessReward, build_reward_funcs, completion_text, decode_gold, encode_gold,
                              informative_groups, soft_overlong_punishment)


def conv(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


@pytest.mark.parametrize("completion, gold, expected", [
    ("3 + 4 = 7, so the answer is $\\boxed{7}$.", "7", 1.0),
    ("The answer is \\boxed{8}.", "7", -1.0),
    ("The answer is 7.", "7", -1.0),  # no box: wrong, as in rpsft eval
    ("\\boxed{3} ... no wait, \\boxed{1500}", "1500", 1.0),  # the last box counts
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),  # math-verify equivalence
    ("\\boxed{12", "12", -1.0),  # a box cut off by truncation is no answer
])
def test_math_reward_cases(completion, gold, expected):
    r = MathCorrectnessReward()
    assert r([conv(completion)], gold=[encode_gold(gold)]) == [expected]
    assert r.last_correct == [expected > 0]


def test_math_reward_plain_strings_non_string_gold_and_accuracy_metric():
    logged = {}
    r = MathCorrectnessReward()
    out = r(["\\boxed{5}", "\\boxed{6}", "\\boxed{5}", "nothing"], gold=[encode_gold(5)] * 3 + [encode_gold([5])],
            log_metric=lambda name, v: logged.__setitem__(name, v))
    assert out == [1.0, -1.0, 1.0, -1.0]
    assert logged == {"accuracy": 0.5}
    assert decode_gold(encode_gold(["1", 2])) == ["1", 2]


def test_math_reward_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 completions but 1 gold"):
        MathCorrectnessReward()(["a", "b"], gold=[encode_gold("1")])


def test_completion_text_shapes():
    assert completion_text("x") == "x"
    assert completion_text(conv("y")) == "y"
    assert completion_text({"content": "z"}) == "z"


@pytest.mark.parametrize("length, expected", [(10, 0.0), (80, 0.0), (81, -0.05), (90, -0.5), (100, -1.0),
                                              (101, -1.0)])
def test_soft_overlong_punishment_values(length, expected):
    # DAPO Eq. 13 with L_max = 100, L_cache = 20: free up to 80 tokens, then linear down to -1 at 100
    f = soft_overlong_punishment(100, 20)
    assert f(completion_ids=[[1] * length]) == [pytest.approx(expected)]


def test_soft_overlong_bad_buffer():
    with pytest.raises(ValueError, match="overlong_buffer"):
        soft_overlong_punishment(100, 0)
    with pytest.raises(ValueError, match="overlong_buffer"):
        soft_overlong_punishment(100, 101)


def test_build_reward_funcs_weights_and_switch_off():
    funcs, weights, correctness = build_reward_funcs(128, 32, 0.5)
    assert funcs[0] is correctness and weights == [1.0, 0.5]
    assert funcs[1].__name__ == "soft_overlong_punishment_reward"
    assert funcs[1](completion_ids=[[0] * 112]) == [pytest.approx(-0.5)]
    funcs, weights, _ = build_reward_funcs(128, 32, 0.0)
    assert len(funcs) == 1 and weights == [1.0]


def test_informative_groups():
    # groups of 3: mixed, all right, all wrong, mixed
    correct = [True, False, False, True, True, True, False, False, False, False, False, True]
    assert informative_groups(correct, 3) == [True, False, False, True]
    assert informative_groups([1.0, 0.0], 2) == [True]
    with pytest.raises(ValueError, match="groups of 4"):
        informative_groups([True] * 6, 4)
