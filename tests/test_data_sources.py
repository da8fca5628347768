"""Data sources: parquet, arrow, save_to_disk, hf:DATASET[:CONFIG]:SPLIT (hub loader mocked), column mapping,
every assistant turn of a multi-turn row, and the one-line offline error."""

from __future__ import annotations

import json

import datasets
import pytest
from typer.testing import CliRunner

from rpsft.cli import app
from rpsft.data.formats import load_records
from rpsft.data.sources import DataSourceError, HubSpec, parse_hf_spec

ROWS = [{"question": f"What is {i} + 1?", "answer": f"{i} plus one.\n#### {i + 1}"} for i in range(6)]


def test_parse_hf_spec():
    assert parse_hf_spec("hf:openai/gsm8k:main:train") == HubSpec("openai/gsm8k", "main", "train")
    assert parse_hf_spec("hf:HuggingFaceH4/MATH-500:test") == HubSpec("HuggingFaceH4/MATH-500", None, "test")
    assert parse_hf_spec("hf:org/ds", "validation") == HubSpec("org/ds", None, "validation")
    assert str(parse_hf_spec("hf:openai/gsm8k:main:train")) == "hf:openai/gsm8k:main:train"
    for bad in ("hf:", "hf:a:b:c:d", "hf:a::train"):
        with pytest.raises(DataSourceError, match="hf:DATASET"):
            parse_hf_spec(bad)


@pytest.mark.parametrize("kind", ["parquet", "arrow", "save_to_disk", "save_to_disk_dict", "csv"])
def test_local_tables_read_like_jsonl(tmp_path, kind):
    ds = datasets.Dataset.from_list(ROWS)
    if kind == "parquet":
        src = tmp_path / "d.parquet"
        ds.to_parquet(str(src))
    elif kind == "csv":
        src = tmp_path / "d.csv"
        ds.to_csv(str(src), index=False)
    elif kind == "arrow":
        ds.save_to_disk(str(tmp_path / "disk"))
        src = next((tmp_path / "disk").glob("*.arrow"))
    elif kind == "save_to_disk":
        src = tmp_path / "disk"
        ds.save_to_disk(str(src))
    else:
        src = tmp_path / "dd"
        datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(src))
        assert len(load_records(src, split="test")) == 2
        with pytest.raises(DataSourceError, match=r"splits \['test', 'train'\], not 'dev'"):
            load_records(src, split="dev")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert load_records(src) == load_records(jsonl)
    assert load_records(src, limit=2) == load_records(jsonl)[:2]


def test_plain_directory_is_explained(tmp_path):
    with pytest.raises(DataSourceError, match="neither a save_to_disk dataset"):
        load_records(tmp_path)


def test_hub_spec_reaches_the_loader_with_its_config(monkeypatch):
    seen = []

    def fake(name, config=None, split=None, **kw):
        seen.append((name, config, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    recs = load_records("hf:openai/gsm8k:main:train", limit=3)
    assert seen == [("openai/gsm8k", "main", "train")] and len(recs) == 3
    assert recs[0]["completion"][0]["content"].endswith("$\\boxed{1}$.")
    import rpsft.data.formats as formats

    monkeypatch.setattr(formats, "hub_reachable", lambda *a, **k: True)  # this machine has no hub to answer
    load_records("org/name", split="test")  # a bare name is still a hub dataset where the hub answers
    assert seen[-1] == ("org/name", None, "test")


def test_column_mapping(tmp_path):
    p = tmp_path / "alpaca.jsonl"
    p.write_text(json.dumps({"instruction": "Say hi", "output": "hi", "id": 3}) + "\n")
    recs = load_records(p, columns={"instruction": "prompt", "output": "completion"})
    assert recs == [{"prompt": [{"role": "user", "content": "Say hi"}],
                     "completion": [{"role": "assistant", "content": "hi"}]}]


def test_every_assistant_turn_is_a_completion(tmp_path):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "a2"}]
    p = tmp_path / "mt.jsonl"
    p.write_text(json.dumps({"messages": msgs}) + "\n")
    last = load_records(p, turns="last")
    every = load_records(p, turns="all")
    assert [r["completion"][0]["content"] for r in last] == ["a2"]
    assert [r["completion"][0]["content"] for r in every] == ["a1", "a2"]
    assert every[0]["prompt"] == msgs[:2] and every[1]["prompt"] == msgs[:4]
    assert load_records(p, turns="all", limit=1) == every[:1]


def _offline(*a, **k):
    raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")


def test_offline_hub_is_one_line_exit_2(monkeypatch, tmp_path, tiny_model_dir):
    monkeypatch.setattr(datasets, "load_dataset", _offline)
    with pytest.raises(DataSourceError, match=r"cannot load hub dataset hf:openai/gsm8k:main:train \(ConnectionError"):
        load_records("hf:openai/gsm8k:main:train")
    r = CliRunner().invoke(app, ["train", "--set", "data.train=hf:openai/gsm8k:main:train", "--set",
                                 f"output_dir={tmp_path / 'o'}", "--set", f"model.name={tiny_model_dir}",
                                 "--set", "anchor.rank=4"])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "hf:openai/gsm8k:main:train" in lines[0] and "Traceback" not in r.output
