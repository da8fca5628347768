import threading

import pytest

from rpsft.eval.judges import extract_boxed, ifeval_loose, last_number, math_correct, math_equal, mcq_letter, \
    mcq_options, \
    parse_choices
from rpsft.eval.runner import judge_completion

from .eval_helpers import mcq_user


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{5}.", "5"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("first \\boxed{1} then \\boxed{\\sqrt{\\frac{a}{b}}}", "\\sqrt{\\frac{a}{b}}"),
    ("done \\boxed{7} and then \\boxed{unclosed", "7"),  # a box cut off by truncation is skipped
    ("\\boxed 5.", "5"),
    ("\\fbox{x+1}", "x+1"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("no box here, the answer is 5", None),
    ("", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("completion,gold", [
    ("so \\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{\\dfrac12}", "\\frac{1}{2}"),
    ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\boxed{27}", 27),  # AMC stores ints
    ("\\boxed{2}", ["2"]),  # OlympiadBench stores one-element lists
    ("\\boxed{1.6 \\text{ cm}}", "1.6"),
    ("\\boxed{x^2+2x+1}", "(x+1)^2"),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}"),
    ("\\boxed{$70$}", "70"),
    ("<think>maybe \\boxed{3}</think> so \\boxed{4}", "4"),
])
def test_math_correct_equivalences(completion, gold):
    assert math_correct(completion, gold)


@pytest.mark.parametrize("completion,gold", [
    ("\\boxed{5}", "6"),
    ("The answer is 5", "5"),  # no box: not graded from free text
    ("\\boxed{5} is wrong, correct is 6", "6"),
    ("\\boxed{\\frac{1}{3}}", "0.5"),
    ("\\boxed{}", "0"),
])
def test_math_correct_rejects(completion, gold):
    assert not math_correct(completion, gold)


def test_math_correct_pathological_answer_times_out_as_wrong():
    # sympy would try to evaluate a power tower forever; the timeout makes it a wrong answer instead
    assert math_correct("\\boxed{9^{9^{9^{9^{9}}}}}", "1", timeout_s=1) is False


def test_math_correct_off_main_thread_uses_killable_child():
    results = {}

    def work():
        results["right"] = math_correct("\\boxed{\\frac{2}{4}}", "0.5", timeout_s=2)
        results["wrong"] = math_correct("\\boxed{3}", "0.5", timeout_s=2)

    t = threading.Thread(target=work)
    t.start()
    t.join(120)
    assert results == {"right": True, "wrong": False}


def test_last_number_and_flex_equality():
    assert last_number("so 1,200 dollars, then 36.") == "36"
    assert last_number("total is 1,200") == "1200"
    assert last_number("no digits") is None
    assert math_equal("1200", last_number("total is 1,200"))


@pytest.mark.parametrize("completion,n,expected", [
    ("\\boxed{C}", 4, "C"),
    ("\\boxed{\\text{(B)}}", 4, "B"),
    ("\\boxed{C. Planetary days will become shorter}", 4, "C"),
    ("The answer is B.", 4, "B"),
    ("Answer: (D)", 4, "D"),
    ("**Answer:** **C**", 4, "C"),
    ("D", 4, "D"),
    ("(A)", 4, "A"),
    ("C. Planetary days will become shorter.", 4, "C"),
    ("Option B is correct because it is a fruit.", 4, "B"),
    ("The answer is A, no wait, the answer is C", 4, "C"),
    ("I'd say \\boxed{B} although the answer is D", 4, "B"),  # the box wins
    ("\\boxed{J}", 10, "J"),
])
def test_mcq_letter(completion, n, expected):
    assert mcq_letter(completion, n) == expected


@pytest.mark.parametrize("completion", [
    "Please answer with the single correct option letter (e.g., A).",  # the prompt's own example letter
    "A good question. I am not sure.",  # the article "A"
    "the answer is a tricky one",
    "\\boxed{E}",  # no option E among four
    "Answer: E",
    "A. car is not a fruit\nB. apple might be\nLet me think about it more.",  # walking through options
    "",
])
def test_mcq_letter_refuses_non_answers(completion):
    assert mcq_letter(completion, 4) is None


def test_mcq_judge_reads_completion_not_prompt():
    # The prompt contains the letter A twice ("A. car", "(e.g., A)"); only the completion may be graded.
    item = {"judge": "mcq", "gold": "A", "options": ["car", "apple", "rock", "chair"],
            "prompt": [{"role": "user", "content": mcq_user("Which is a vehicle?", ["car", "apple", "rock", "chair"])}]}
    assert judge_completion(item, "I cannot decide.") == {"extracted": None, "correct": False}
    assert judge_completion(item, "\\boxed{A}") == {"extracted": "A", "correct": True}
    assert judge_completion(item, "\\boxed{B}")["correct"] is False


def test_numeric_option_labels():
    # some ARC rows label options 1-4 (and the gold is a digit); only those labels count
    assert mcq_letter("\\boxed{2}", 4, labels="1234") == "2"
    assert mcq_letter("The answer is 3.", 4, labels="1234") == "3"
    assert mcq_letter("\\boxed{B}", 4, labels="1234") is None
    assert mcq_letter("\\boxed{7}", 4, labels="1234") is None
    user = "Fossils match.\n\nChoices:\n1. separated\n2. joined\n\nPlease answer with the single correct option letter (e.g., A)."
    assert parse_choices(user) == [("1", "separated"), ("2", "joined")]


def test_mcq_options_parsed_from_official_layout():
    user = mcq_user("Which?", ["one\nstill one", "two", "three"])
    assert mcq_options(user) == ["one\nstill one", "two", "three"]
    assert mcq_options("no options here") == []


def _kw(**kw):  # the official files carry every kwarg, mostly null, numbers as floats
    base = {"num_highlights": None, "num_sentences": None, "relation": None, "num_words": None}
    base.update(kw)
    return base


def test_ifeval_loose_pass_and_fail():
    inst = [{"instruction_id": "punctuation:no_comma", "kwargs": _kw()},
            {"instruction_id": "detectable_format:number_highlighted_sections", "kwargs": _kw(num_highlights=2.0)}]
    ok, details = ifeval_loose("Here is *one* and *two* without commas", inst)
    assert ok and [d["loose"] for d in details] == [True, True]
    ok, details = ifeval_loose("Here is *one*, and *two*", inst)
    assert not ok and details[0]["loose"] is False


def test_ifeval_loose_transformations_forgive_a_preamble():
    inst = [{"instruction_id": "change_case:english_lowercase", "kwargs": _kw()}]
    assert ifeval_loose("Sure! Here it is:\nall lower case text here", inst)[0]  # loose drops the first line
    assert not ifeval_loose("Sure! Here it is:\nAll Upper\nNot lower", inst)[0]


def test_ifeval_sentence_counting_works_offline():
    inst = [{"instruction_id": "length_constraints:number_sentences",
             "kwargs": _kw(num_sentences=3.0, relation="less than")}]
    assert ifeval_loose("One sentence. Two sentences.", inst)[0]
    assert not ifeval_loose("One. Two. Three. Four. Five.", inst)[0]


def test_ifeval_unknown_instruction_is_an_error():
    with pytest.raises(ValueError, match="unknown IFEval instruction"):
        ifeval_loose("text", [{"instruction_id": "made:up", "kwargs": {}}])


@pytest.mark.parametrize("pred,gold,expected", [
    ("5 dollars", "5", True),  # unit words after a number: the number is the answer
    ("5\\text{ dollars}", "5", True),
    ("18 \\text{ square units}", "18", True),
    ("5 pi", "5", False),  # a mathematical word is not a unit
    ("5 x", "5", False),  # nor is a single letter (a variable)
    ("1 2", "12", False),  # digits separated by a space are not one number (exact-match shortcut included)
    ("12 000", "12000", True),  # ... except three-digit thousands groups
    ("0.5000001", "0.5", False),  # relative tolerance 1e-9, not rounding to 6 decimals
    ("2.0000000000001", "2", True),  # floating-point noise is still equal
    ("0.0000001", "0.0000002", False),  # rounding to 6 decimals would make these equal
    ("(1.0000001, 2)", "(1, 2)", False),
    ("0.333333", "\\frac{1}{3}", False),  # a rounded decimal is a different value
    ("2 < x \\le 5", "(2, 5]", True),  # inequality <-> interval
    ("(2, \\infty)", "x > 2", True),
    ("2 < x \\le 5", "(2, 5)", False),
    ("\\textbf{(B)}\\ 12", "12", True),  # AMC choice with its value
    ("(B) 12", "12", True),
    ("\\textbf{(B)}\\ 13", "12", False),
    ("\\textbf{(B)}", "12", False),  # a letter alone is not a value
])
def test_math_equal_edge_cases(pred, gold, expected):
    assert math_equal(gold, pred) is expected


def test_last_box_rule_kept_with_normalisation():
    assert math_correct("\\boxed{12 dollars} no, \\boxed{\\textbf{(C)}\\ 13}", "13")
    assert not math_correct("\\boxed{13} no, \\boxed{12 dollars}", "13")
