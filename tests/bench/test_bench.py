"""`rpsft bench`: the markdown/JSON writer, and a real two-method run on the tiny model (one subprocess each)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from rpsft.bench.report import markdown_table
from rpsft.bench.run import _aggregate
from rpsft.cli import app

runner = CliRunner()


def _ok(step, rss, anchor_bytes=0, share=0.0):
    return {"status": "ok", "step_seconds_median": step, "steps_per_s": 1 / step, "samples_per_s": 8 / step,
            "peak_rss_mib": rss, "anchor_bytes": anchor_bytes, "anchor_share_of_step": share, "bases_seconds": 0.5}


def test_markdown_table_rows_ratios_and_missing_methods():
    report = {"settings": {"model": "m", "steps": 4, "batch_size": 2, "grad_accum": 4, "max_length": 64,
                           "rank": 8, "repeats": 1},
              "methods": {"sft": _ok(2.0, 1000.0), "rpsft": _ok(2.2, 1100.0, 3 * 2**20, 0.05),
                          "dft": {"status": "not available", "error": "method 'dft' is not registered"},
                          "lora": {"status": "failed", "error": "Traceback\nRuntimeError: boom | bad"}}}
    md = markdown_table(report)
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.strip().strip("|").split("|")] for r in lines[1:]}
    assert list(rows) == ["sft", "rpsft", "dft", "lora"]
    rp = dict(zip(header, rows["rpsft"]))
    assert rp["step vs sft"] == "1.100" and rp["RSS vs sft"] == "1.100"
    assert rp["anchor MiB"] == "3.0" and rp["anchor % of step"] == "5.00" and rp["steps/s"] == "0.455"
    assert dict(zip(header, rows["sft"]))["step vs sft"] == "1.000"
    assert rows["dft"][1].startswith("not available") and "not registered" in rows["dft"][1]
    # a failure shows its last log line, with table-breaking pipes escaped
    assert rows["lora"][1] == "failed: RuntimeError: boom / bad"
    assert all(len(r) == len(header) for r in rows.values())
    assert "CUDA" not in lines[0]  # CPU runs have no GPU columns


def test_aggregate_takes_medians_and_propagates_failure():
    agg = _aggregate([_ok(1.0, 10.0), _ok(3.0, 30.0), _ok(2.0, 20.0)])
    assert agg["step_seconds_median"] == 2.0 and agg["peak_rss_mib"] == 20.0 and agg["repeats"] == 3
    assert agg["step_seconds_by_repeat"] == [1.0, 3.0, 2.0]
    bad = _aggregate([_ok(1.0, 10.0), {"status": "failed", "error": "x"}])
    assert bad["status"] == "failed"


def test_bench_cli_runs_each_method_in_its_own_process(tiny_model_dir, synth_data, tmp_path):
    out = tmp_path / "bench"
    r = runner.invoke(app, ["bench", "--methods", "sft,rpsft,no-such-method", "--model", str(tiny_model_dir),
                            "--data", str(synth_data["train"]), "--steps", "3", "--batch-size", "2",
                            "--grad-accum", "2", "--seq-len", "128", "--rank", "4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "bench.json").read_text())
    sft, rp, missing = (report["methods"][m] for m in ("sft", "rpsft", "no-such-method"))
    assert sft["status"] == rp["status"] == "ok", (sft, rp)
    assert missing["status"] == "not available" and "not registered" in missing["error"]
    for row in (sft, rp):
        assert row["steps"] == 3 and row["timed_steps"] == 2  # the first optimizer step is warm-up
        assert row["peak_rss_mib"] > 50 and row["samples_per_step"] == 4
        assert row["samples_per_s"] > 0 and row["step_seconds_median"] > 0
    # tiny Llama (hidden 32, MLP 48, 2 layers, 4 heads, 2 kv heads): per layer q,o 32×32; k,v 16×32; gate,up 48×32;
    # down 32×48 — all at k=4: 4 bytes × 4 × Σ(m + n + 1)
    per_layer = 2 * (32 + 32 + 1) + 2 * (16 + 32 + 1) + 3 * (48 + 32 + 1)
    assert rp["anchor_bytes"] == 2 * per_layer * 4 * 4 and rp["anchor_matrices"] == 14
    assert sft["anchor_bytes"] == 0 and sft["anchor_share_of_step"] == 0.0
    assert 0 < rp["anchor_share_of_step"] < 1 and rp["anchor_call_seconds_median"] > 0
    # each method really ran in a process of its own: separate logs, separate peak-RSS readings
    assert (out / "runs" / "sft.r0.log").is_file() and (out / "runs" / "rpsft.r0.log").is_file()
    # the runs' weights are deleted once timed (they are a few steps of noise), their logs and summaries kept
    assert (out / "runs" / "rpsft" / "run.json").is_file()
    assert not list((out / "runs").rglob("*.safetensors")) and not list((out / "runs").rglob("checkpoint-*"))
    md = (out / "bench.md").read_text()
    assert "| rpsft | ok |" in md and "| no-such-method | not available" in md
    assert "| sft | ok |" in r.output  # the table is printed too


def test_bench_cli_rejects_bad_options(tmp_path):
    r = runner.invoke(app, ["bench", "--steps", "1", "--data", str(tmp_path / "missing.jsonl"),
                            "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "--steps 1" in r.output and "missing.jsonl does not exist" in r.output
    assert not (tmp_path / "o").exists()
