import json

import typer
from typer.testing import CliRunner

from rpsft.eval.cli import eval_command

app = typer.Typer()
app.command("eval")(eval_command)
app.command("noop")(lambda: None)  # two commands, so "eval" is addressed by name as under `rpsft`


def test_cli_runs_and_prints_table(tiny_dir, eval_dir, tmp_path):
    out = tmp_path / "o"
    res = CliRunner().invoke(app, ["eval", "--model", str(tiny_dir), "--suite", "aime24,gpqa_test", "--k", "1",
                                   "--max-new-tokens", "4", "--eval-dir", str(eval_dir), "--out", str(out),
                                   "--greedy"])
    assert res.exit_code == 0, res.output
    assert "aime24" in res.output and "gpqa_test" in res.output and "avg@k" in res.output and "pass@k" in res.output
    assert json.loads((out / "summary.json").read_text())["greedy"] is True
    assert "Loading weights" not in res.output and "it/s]" not in res.output  # library bars: off (quiet console)


def test_cli_loglik(tiny_dir, eval_dir, tmp_path):
    res = CliRunner().invoke(app, ["eval", "--model", str(tiny_dir), "--suite", "gpqa_test", "--loglik",
                                   "--eval-dir", str(eval_dir), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "norm" in res.output and "chance" in res.output and "letter" in res.output


def test_cli_lm_eval_protocol(tiny_dir, eval_dir, tmp_path):
    res = CliRunner().invoke(app, ["eval", "--model", str(tiny_dir), "--suite", "gpqa_test", "--mc-protocol",
                                   "lm-eval", "--eval-dir", str(eval_dir), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "lm-eval protocol" in res.output
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["mc_protocol"] == "lm-eval"
    bad = CliRunner().invoke(app, ["eval", "--model", str(tiny_dir), "--suite", "gpqa_test", "--mc-protocol",
                                   "harness", "--eval-dir", str(eval_dir), "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "mc_protocol must be one of" in bad.output


def test_cli_missing_data_is_a_clear_error(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RPSFT_EVAL_DIR", str(tmp_path / "nowhere"))
    res = CliRunner().invoke(app, ["eval", "--model", str(tiny_dir), "--suite", "gpqa", "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert "gpqa.jsonl" in res.output and "RPSFT_EVAL_DIR" in res.output


def test_cli_unknown_suite(tiny_dir, tmp_path):
    res = CliRunner().invoke(app, ["eval", "--model", str(tiny_dir), "--suite", "nope", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown suite" in res.output
