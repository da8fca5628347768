"""Evaluation data on a fresh machine: the cache default (never the current directory), `rpsft data eval-files`,
hub fallbacks mapped to the official prompt format (hub loader mocked), and provenance in summary.json."""

from __future__ import annotations

import json

import datasets
import pytest
from typer.testing import CliRunner

from .eval_helpers import mcq_user, official_row
from rpsft.cli import app
from rpsft.eval.data_files import install_eval_files, rows_digest
from rpsft.eval.hub_fallbacks import FALLBACKS
from rpsft.eval.loaders import load_items, row_to_item
from rpsft.eval.suites import BENCHMARKS, source_path


@pytest.fixture
def fresh_machine(tmp_path, monkeypatch):
    """No RPSFT_EVAL_DIR/RPSFT_GSM8K_DIR, an empty cache, and the current directory somewhere unrelated."""
    for var in ("RPSFT_EVAL_DIR", "RPSFT_GSM8K_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RPSFT_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work / "sub")
    return tmp_path


def _official_copy(root):
    (root / "id").mkdir(parents=True)
    (root / "ood").mkdir()
    (root / "id" / "aime-24.jsonl").write_text(json.dumps(official_row("What is 2 + 3?", "5")) + "\n")
    (root / "ood" / "gpqa.jsonl").write_text(json.dumps(official_row(mcq_user("Fruit?", ["car", "apple"]), "B"))
                                             + "\n")
    return root


def test_default_location_is_the_cache_not_the_cwd(fresh_machine):
    with pytest.raises(FileNotFoundError) as e:
        source_path(BENCHMARKS["aime24"])
    assert str(fresh_machine / "cache" / "eval" / "id" / "aime-24.jsonl") in str(e.value)
    assert "rpsft data eval-files" in str(e.value)
    with pytest.raises(FileNotFoundError, match=str(fresh_machine / "cache" / "eval" / "gsm8k")):
        source_path(BENCHMARKS["gsm8k"])


def test_eval_files_checks_and_installs(fresh_machine):
    repo = fresh_machine / "RPSFT"
    root = _official_copy(repo / "evaluation" / "data")  # a clone of the authors' repository
    (root / "ood" / "mmlu_pro.jsonl").write_text(json.dumps({"prompt": "no gold"}) + "\n")
    rep = install_eval_files(repo)
    assert set(rep["installed"]) == {"id/aime-24.jsonl", "ood/gpqa.jsonl"}
    assert "mmlu_pro.jsonl" in rep["invalid"]["ood/mmlu_pro.jsonl"] and "mmlu_pro" in rep["missing"]
    dest = fresh_machine / "cache" / "eval"
    assert rep["dest"] == str(dest) and (dest / "id" / "aime-24.jsonl").is_file()
    items = load_items(BENCHMARKS["aime24"])  # found with no setting at all
    assert items[0]["gold"] == "5"
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["id/aime-24.jsonl"]["sha256"] == rows_digest([official_row("What is 2 + 3?", "5")])


def test_eval_files_cli(fresh_machine):
    _official_copy(fresh_machine / "copy")
    gsm = fresh_machine / "gsm"
    gsm.mkdir()
    (gsm / "test.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "two\n#### 2"}) + "\n")
    r = CliRunner().invoke(app, ["data", "eval-files", "--from", str(fresh_machine / "copy"), "--gsm8k", str(gsm)])
    assert r.exit_code == 0, r.output
    assert "ok       id/aime-24.jsonl" in r.output and "installed 3 files" in r.output
    assert load_items(BENCHMARKS["gsm8k"])[0]["gold"] == "2"
    bad = CliRunner().invoke(app, ["data", "eval-files", "--from", str(fresh_machine / "work")])
    assert bad.exit_code == 2 and "no id/ or ood/ folder" in bad.output


# one row in each hub dataset's own schema, and what the official-format item must be
HUB_ROWS = {
    "math500": ({"problem": "1+1?", "answer": "2", "unique_id": "test/x.json"}, "math", "2"),
    "aime24": ({"id": 60, "problem": "P", "answer": "204"}, "math", "204"),
    "aime25": ({"id": "0", "problem": "P", "answer": "70"}, "math", "70"),
    "amc23": ({"id": 0, "question": "Q", "answer": 27.0}, "math", "27.0"),
    "minerva": ({"question": "Q", "answer": "1.3"}, "math", "1.3"),
    "olympiadbench": ({"id": 1, "question": "Q", "final_answer": ["$3$"]}, "math", "$3$"),
    "gpqa": ({"Record ID": "r1", "Question": "Q", "Correct Answer": "right", "Incorrect Answer 1": "w1",
              "Incorrect Answer 2": "w2", "Incorrect Answer 3": "w3"}, "mcq", None),
    "mmlu_pro": ({"question_id": 7, "question": "Q", "options": ["a", "b", "c"], "answer": "C"}, "mcq", "C"),
    "supergpqa": ({"uuid": "u", "question": "Q", "options": ["a", "b"], "answer_letter": "A"}, "mcq", "A"),
    "truthfulqa": ({"question": "Q", "mc1_targets": {"choices": ["right", "w1", "w2"], "labels": [1, 0, 0]}},
                   "mcq", None),
    "ifeval": ({"key": 1000, "prompt": "Write without commas.", "instruction_id_list": ["punctuation:no_comma"],
                "kwargs": [{}]}, "ifeval", ""),
    "arc_c": ({"id": "M1", "question": "Q", "choices": {"text": ["a", "b", "c", "d"], "label": ["A", "B", "C", "D"]},
               "answerKey": "D"}, "mcq", "D"),
    "commonsenseqa": ({"id": "c", "question": "Q", "choices": {"label": list("ABCDE"), "text": list("abcde")},
                       "answerKey": "B"}, "mcq", "B"),
    "gsm8k": ({"question": "Q", "answer": "w\n#### 1,000"}, "math", "1000"),
}


def test_every_fallback_maps_to_the_official_format(monkeypatch):
    assert set(HUB_ROWS) == set(FALLBACKS)
    for name, (row, judge, gold) in HUB_ROWS.items():
        fb = FALLBACKS[name]
        item = row_to_item(fb.convert(dict(row), 0), name, BENCHMARKS[name].judge)
        assert item["judge"] == judge, name
        if judge == "mcq":
            user = item["prompt"][-1]["content"]
            assert "\n\nChoices:\nA. " in user and user.endswith("(e.g., A).")
            opts = dict(zip(item["labels"], item["options"]))
            assert opts[item["gold"]] in ("right", *"abcde"), name  # the gold letter points at the right option
        if gold is not None:
            assert str(item["gold"]) == gold, name
    # the shuffle is fixed per question: same order every time, and the correct option is not always first
    g = [FALLBACKS["gpqa"].convert({**HUB_ROWS["gpqa"][0], "Record ID": f"r{i}"}, i)["reward_model"]["ground_truth"]
         for i in range(12)]
    assert len(set(g)) > 1 and g == [FALLBACKS["gpqa"].convert({**HUB_ROWS["gpqa"][0], "Record ID": f"r{i}"}, i)[
        "reward_model"]["ground_truth"] for i in range(12)]


def _mock_hub(monkeypatch, seen):
    rows = [{"problem": "What is 1 + 1?", "answer": "2", "unique_id": "a"},
            {"problem": "What is 2 + 2?", "answer": "4", "unique_id": "b"},
            {"problem": "What is 3 + 3?", "answer": "6", "unique_id": "c"}]

    def fake(name, config=None, split=None, **kw):
        seen.append((name, config, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake)


def test_eval_from_an_empty_directory_uses_the_hub_fallback(fresh_machine, tiny_dir, monkeypatch):
    seen = []
    _mock_hub(monkeypatch, seen)
    out = fresh_machine / "work" / "sub" / "o"
    r = CliRunner().invoke(app, ["eval", "--model", str(tiny_dir), "--suite", "math500", "--limit", "2",
                                 "--greedy", "--max-new-tokens", "4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert seen == [("HuggingFaceH4/MATH-500", None, "test")]
    data = json.loads((out / "summary.json").read_text())["benchmarks"]["math500"]["data"]
    assert data["source"] == "hf:HuggingFaceH4/MATH-500:test" and data["fallback_for"] == "id/math500.jsonl"
    assert data["rows"] == 3 and len(data["sha256"]) == 64


def test_provenance_of_a_file(eval_dir, tmp_path):
    origin = {}
    load_items(BENCHMARKS["aime24"], eval_dir, limit=1, origin=origin)
    rows = [json.loads(line) for line in (eval_dir / "id" / "aime-24.jsonl").read_text().splitlines()]
    assert origin == {"source": str((eval_dir / "id" / "aime-24.jsonl").resolve()), "rows": 3,
                      "sha256": rows_digest(rows)}


def test_offline_fallback_is_one_line(fresh_machine, tiny_dir, monkeypatch):
    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'HuggingFaceH4/MATH-500' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    r = CliRunner().invoke(app, ["eval", "--model", str(tiny_dir), "--suite", "math500", "--limit", "2",
                                 "--out", str(fresh_machine / "o")])
    assert r.exit_code == 2
    err = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "math500.jsonl" in err[0] and "hub fallback failed" in err[0] and "eval-files" in err[0]
    assert "Traceback" not in r.output


def test_fallback_schema_change_is_one_line(fresh_machine, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list([{"question": "q"}]))
    with pytest.raises(FileNotFoundError, match=r"HuggingFaceH4/MATH-500:test\[0\]: row does not have the expected "
                                                r"fields for math500 \(KeyError.*columns \['question'\]"):
        load_items(BENCHMARKS["math500"])
