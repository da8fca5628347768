"""Data normalisation and the built-in synthetic math generator."""

from __future__ import annotations

import json
import re

import pytest

from rpsft.data.formats import DataFormatError, gsm8k_solution, load_records, normalize_row
from rpsft.data.synthetic_math import generate, write_splits

PROMPT = [{"role": "user", "content": "2+2?"}]
ANSWER = [{"role": "assistant", "content": "4"}]


def test_shapes_normalise_to_prompt_completion():
    expected = {"prompt": PROMPT, "completion": ANSWER}
    assert normalize_row({"messages": PROMPT + ANSWER}) == expected
    assert normalize_row({"prompt": "2+2?", "completion": "4"}) == expected
    assert normalize_row({"prompt": PROMPT, "completion": ANSWER, "extra": 1}) == expected
    assert normalize_row({"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}) \
        == expected


def test_multi_turn_keeps_earlier_turns_in_prompt():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    row = normalize_row({"messages": msgs})
    assert row["prompt"] == msgs[:4] and row["completion"] == msgs[4:]


def test_gsm8k_answer_becomes_boxed():
    text, final = gsm8k_solution("She has 3 + 4 = <<3+4=7>>7 apples.\n#### 1,234")
    assert final == "1234" and text.endswith("$\\boxed{1234}$.") and "<<" not in text
    row = normalize_row({"question": "q?", "answer": "x\n#### 5"})
    assert row["completion"][0]["content"].endswith("\\boxed{5}$.")


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"messages": [{"role": "user"}]}', "has no 'content'"),
    ('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}', "unknown role"),
    ('{"prompt": "x"}', "none of the accepted shapes"),
    ('{"prompt": "x", "completion": [{"role": "user", "content": "y"}]}', "assistant messages only"),
    ('{"prompt": "", "completion": 3}', "non-empty string"),
    ('[1, 2]', "must be a JSON object"),
    ('{"messages": [{"role": "user", "content": "x"}, ', "invalid JSON"),
])
def test_malformed_row_names_file_line_and_problem(tmp_path, line, message):
    f = tmp_path / "d.jsonl"
    good = json.dumps({"prompt": "a", "completion": "b"})
    f.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(DataFormatError, match=message) as e:
        load_records(f)
    assert f"{f}:3" in str(e.value)


def test_json_list_and_limit(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"prompt": str(i), "completion": "x"} for i in range(5)]))
    assert len(load_records(f, limit=2)) == 2
    with pytest.raises(FileNotFoundError, match="synth-math"):
        load_records(tmp_path / "missing.jsonl")


def test_synthetic_math_is_deterministic_and_correct(tmp_path):
    a, b = generate(50, seed=7), generate(50, seed=7)
    assert a == b and generate(50, seed=8) != a
    for row in a:
        sol = row["completion"][0]["content"]
        boxed = re.search(r"\\boxed\{(-?\d+)\}", sol).group(1)
        assert boxed == row["answer"]
        for x, op, y, z in re.findall(r"(\d+) ([+\-×÷]) (\d+) = (\d+)", sol):  # every worked step is right
            x, y, z = int(x), int(y), int(z)
            assert {"+": x + y, "-": x - y, "×": x * y, "÷": x // y}[op] == z
            if op == "÷":
                assert x % y == 0
        assert int(row["answer"]) >= 0
    paths = write_splits(tmp_path, n_train=40, n_test=10, seed=3)
    train = load_records(paths["train"])
    test = load_records(paths["test"])
    assert len(train) == 40 and len(test) == 10
    assert not {r["prompt"][0]["content"] for r in train} & {r["prompt"][0]["content"] for r in test}


@pytest.mark.parametrize("spec, expected", [("1-2", (1, 2)), ("3", (3, 3)), (" 2 - 4 ", (2, 4)), ((1, 8), (1, 8))])
def test_ops_range_parses(spec, expected):
    from rpsft.data.synthetic_math import parse_ops

    assert parse_ops(spec) == expected


@pytest.mark.parametrize("spec", ["0-2", "3-2", "1-9", "two", "1-2-3", ""])
def test_ops_range_refuses_what_it_cannot_generate(spec):
    from rpsft.data.synthetic_math import parse_ops

    with pytest.raises(ValueError, match=r"--ops .*1 <= LO <= HI <= 8"):
        parse_ops(spec)


def test_ops_sets_the_number_of_worked_steps():
    def changes(row):  # the worked lines between "starts with" and "The answer is"
        return len(row["completion"][0]["content"].splitlines()) - 2

    assert {changes(r) for r in generate(200, seed=1, ops="1-2")} == {1, 2}
    assert {changes(r) for r in generate(50, seed=1, ops="3")} == {3}
    assert {changes(r) for r in generate(300, seed=1)} == {2, 3, 4}
    assert generate(30, seed=5) == generate(30, seed=5, ops=(2, 4))  # the default files are unchanged


def test_synth_math_cli_ops(tmp_path):
    from typer.testing import CliRunner

    from rpsft.cli import app

    res = CliRunner().invoke(app, ["data", "synth-math", "--out", str(tmp_path / "s"), "--train", "20", "--test", "5",
                                   "--ops", "1"])
    assert res.exit_code == 0, res.output
    rows = load_records(tmp_path / "s" / "train.jsonl")
    assert len(rows) == 20 and all(len(r["completion"][0]["content"].splitlines()) == 3 for r in rows)
    res = CliRunner().invoke(app, ["data", "synth-math", "--out", str(tmp_path / "t"), "--ops", "0-2"])
    assert res.exit_code == 2 and "--ops 0-2" in res.output and not (tmp_path / "t").exists()
