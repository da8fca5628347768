import json

import pytest

from .eval_helpers import mcq_user, official_row
from rpsft.eval.loaders import BOXED_SYSTEM_PROMPT, EvalDataError, load_items, row_to_item
from rpsft.eval.suites import BENCHMARKS, GROUPS, SuiteError, expand_suites, resolve_benchmark, source_path


def test_groups_and_paper_k():
    benches, probe = expand_suites("id")
    assert [b.name for b in benches] == GROUPS["id"] and not probe
    assert {b.name: b.k for b in benches} == {"aime24": 16, "aime25": 16, "amc23": 16, "math500": 4,
                                              "olympiadbench": 4, "minerva": 8}
    ood, _ = expand_suites(["ood"])
    assert {b.k for b in ood} == {4} and len(ood) == 6
    both, _ = expand_suites("all,aime24,probe")  # duplicates dropped, probe flagged
    assert len(both) == 12 and expand_suites("all,probe")[1]


def test_aliases_and_test_variants():
    assert resolve_benchmark("truthful_qa_mc").name == "truthfulqa"
    assert resolve_benchmark("olympiadBench").name == "olympiadbench"
    t = resolve_benchmark("arc_c_test")
    assert t.file == "ood/arc_c_test.jsonl" and t.judge == "mcq"
    assert resolve_benchmark("safety_benchmark_test").file == "ood/safety_benchmark_test.jsonl"
    assert resolve_benchmark("hf:openai/gsm8k:test").source == "hf"
    assert resolve_benchmark("some/file.jsonl").source == "file"


def test_unknown_suite_lists_choices():
    with pytest.raises(SuiteError, match="aime24.*arc_c_test"):
        expand_suites("aime2024")
    with pytest.raises(SuiteError):
        resolve_benchmark("aime24_test")  # no *_test file exists for in-domain sets
    with pytest.raises(SuiteError, match="no suite"):
        expand_suites(" , ")


def test_missing_official_file_names_path_and_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("RPSFT_EVAL_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="RPSFT_EVAL_DIR") as e:
        source_path(BENCHMARKS["gpqa"])
    assert str(tmp_path / "ood" / "gpqa.jsonl") in str(e.value)
    with pytest.raises(FileNotFoundError, match="--eval-dir"):
        source_path(BENCHMARKS["gpqa"], eval_dir=tmp_path / "elsewhere")
    monkeypatch.setenv("RPSFT_GSM8K_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="RPSFT_GSM8K_DIR"):
        source_path(BENCHMARKS["gsm8k"])


def test_eval_dir_argument_beats_env(eval_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RPSFT_EVAL_DIR", str(tmp_path / "nothing-here"))
    assert source_path(BENCHMARKS["aime24"], eval_dir) == eval_dir / "id" / "aime-24.jsonl"


def test_official_rows_and_system_prompt_policy(eval_dir):
    items = load_items(BENCHMARKS["aime24"], eval_dir)
    assert [it["gold"] for it in items] == ["5", "\\frac{1}{2}", 42] and items[0]["judge"] == "math"
    assert items[0]["prompt"][0] == {"role": "system", "content": BOXED_SYSTEM_PROMPT}  # official policy
    kept = load_items(BENCHMARKS["aime24"], eval_dir, limit=2, system_prompt="file")
    assert len(kept) == 2 and kept[0]["prompt"][0]["content"].startswith("Please reason")
    assert "Example" not in kept[0]["prompt"][0]["content"]
    bare = load_items(BENCHMARKS["aime24"], eval_dir, system_prompt="none")
    assert [m["role"] for m in bare[0]["prompt"]] == ["user"]
    mcq = load_items(resolve_benchmark("gpqa_test"), eval_dir)
    assert mcq[0]["options"] == ["car", "apple", "rock", "chair"] and mcq[0]["gold"] == "B"


def test_row_shapes():
    g = row_to_item({"question": "2+2?", "answer": "two and two\n#### 1,004"}, "x:1")
    assert g["gold"] == "1004" and g["judge"] == "math" and g["prompt"][-1]["content"] == "2+2?"
    pc = row_to_item({"prompt": [{"role": "user", "content": "3+4?"}],
                      "completion": [{"role": "assistant", "content": "3+4=7, so \\boxed{7}"}]}, "x:2")
    assert pc["gold"] == "7"
    ol = row_to_item(official_row("q", ["2"]), "x:3")
    assert ol["gold"] == ["2"]
    auto = row_to_item(official_row(mcq_user("q", ["a", "b"]), "B"), "x:4")
    assert auto["judge"] == "mcq" and auto["options"] == ["a", "b"]
    arc = row_to_item(official_row("q\n\nChoices:\n1. x\n2. y\n\nPlease answer", "2"), "x:6")
    assert arc["judge"] == "mcq" and arc["labels"] == "12" and arc["options"] == ["x", "y"]
    ife = row_to_item(official_row("write", "", instructions=[{"instruction_id": "punctuation:no_comma",
                                                                "kwargs": {}}]), "x:5")
    assert ife["judge"] == "ifeval" and ife["instructions"]


@pytest.mark.parametrize("row,msg", [
    ({"foo": 1}, "unknown evaluation row"),
    ({"question": "q", "answer": "no marker"}, "####"),
    ({"prompt": "q", "completion": "no box"}, "boxed"),
    (official_row(mcq_user("q", ["a", "b"]), "C"), "not one of them"),
])
def test_bad_rows_name_the_problem(row, msg):
    with pytest.raises(EvalDataError, match=msg):
        row_to_item(row, "f.jsonl:7", judge="mcq" if "Choices" in json.dumps(row) else "auto")
