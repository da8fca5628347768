"""The CLI surface: clear one-line errors with exit code 2, and the data command."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from rpsft.cli import app

runner = CliRunner()


def test_help_lists_commands():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("train", "data", "methods"):
        assert cmd in r.output


def test_synth_math_writes_splits(tmp_path):
    r = runner.invoke(app, ["data", "synth-math", "--out", str(tmp_path), "--train", "12", "--test", "3"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and "\\boxed{" in rows[0]["completion"][0]["content"]


def test_bad_config_key_is_one_clear_line(tmp_path):
    r = runner.invoke(app, ["train", "--set", "anchor.rnak=3"])
    assert r.exit_code == 2
    assert "did you mean 'anchor.rank'" in r.output and "Traceback" not in r.output


def test_missing_model_and_data_are_named(tmp_path, synth_data):
    r = runner.invoke(app, ["train", "--set", f"output_dir={tmp_path / 'o'}", "--set", "model.name=no-such-model",
                            "--set", f"data.train={synth_data['train']}"])
    assert r.exit_code == 2 and "no-such-model" in r.output and "embedded" in r.output
    r = runner.invoke(app, ["train", "--set", f"output_dir={tmp_path / 'p'}", "--set",
                            f"data.train={tmp_path / 'none.jsonl'}"])
    assert r.exit_code == 2 and "none.jsonl" in r.output


def test_methods_table():
    r = runner.invoke(app, ["methods"])
    assert r.exit_code == 0 and "rpsft" in r.output and "l2init" in r.output


def test_train_end_to_end_prints_steps_and_outputs(tmp_path, tiny_model_dir, synth_data):
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", "--set", f"model.name={tiny_model_dir}", "--set", f"data.train={synth_data['train']}",
                            "--set", f"output_dir={out}", "--set", "data.limit=8", "--set", "train.max_steps=2",
                            "--set", "train.batch_size=2", "--set", "train.grad_accum=1", "--set", "anchor.rank=4",
                            "--set", "data.max_length=96"])
    assert r.exit_code == 0, r.output
    # not a terminal: one line per logged step instead of a redrawn bar
    assert "train step 1/2" in r.output and "train step 2/2" in r.output and " R " in r.output
    assert f"checkpoint: {out}" in r.output and "metrics.jsonl" in r.output
    assert (out / "model.safetensors").is_file()
