"""``rpsft bench --methods sft,rpsft,...``: the cost table (samples/s, steps/s, peak memory, anchor cost) per method.

Imports only typer/rich at module level; torch and the trainer load inside the per-method subprocesses that
:mod:`rpsft.bench.run` starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..terminal import console, friendly_errors


@friendly_errors
def bench_command(
    methods: str = typer.Option("sft,rpsft,l2init,dft,iw,lora", "--methods", "-m",
                                help="Comma-separated methods; each trains in its own process."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", help="Embedded name or checkpoint directory."),
    data: Optional[Path] = typer.Option(None, "--data", help="Training JSONL (default: a small synthetic-math file "
                                                              "written under --out)."),
    steps: int = typer.Option(6, "--steps", help="Optimizer steps per method; the first is warm-up, not timed."),
    batch_size: int = typer.Option(4, "--batch-size", help="Per-device micro-batch size."),
    grad_accum: int = typer.Option(4, "--grad-accum", help="Gradient accumulation steps."),
    max_length: int = typer.Option(256, "--seq-len", "--max-length", help="Max tokens per sample."),
    rank: str = typer.Option("128", "--rank", "-k", help="Anchor rank k (int, fraction, or @ranks.json)."),
    repeats: int = typer.Option(1, "--repeats", help="Run the method list this many times, interleaved; the table "
                                                     "reports medians (use >1 on a busy machine)."),
    set_: List[str] = typer.Option([], "--set", "-s", help="Extra config override for every method."),
    timeout: float = typer.Option(3600, "--timeout", help="Seconds per method run before it is reported failed."),
    out: Path = typer.Option(Path("runs/bench"), "--out", "-o", help="Directory for bench.json, bench.md, logs."),
):
    """Train each method for a few steps in its own process; write bench.json + bench.md and print the table."""
    from .report import markdown_table
    from .run import BenchSettings, run_bench

    names = [m.strip() for m in methods.split(",") if m.strip()]
    problems = []
    if not names:
        problems.append("--methods is empty; e.g. --methods sft,rpsft")
    if steps < 2:
        problems.append(f"--steps {steps}: need at least 2 (the first optimizer step is warm-up and not timed)")
    for flag, v in (("--batch-size", batch_size), ("--grad-accum", grad_accum), ("--repeats", repeats)):
        if v < 1:
            problems.append(f"{flag} must be >= 1, got {v}")
    if data is not None and not data.is_file():
        problems.append(f"--data {data} does not exist (omit it to use the built-in synthetic-math data)")
    if problems:  # every bad option at once, before anything trains
        raise ValueError("; ".join(problems))

    rank_value: object = rank
    try:
        rank_value = int(rank)
    except ValueError:
        try:
            rank_value = float(rank)
        except ValueError:
            pass
    s = BenchSettings(methods=names, model=model, data=str(data) if data else None, steps=steps,
                      batch_size=batch_size, grad_accum=grad_accum, max_length=max_length, rank=rank_value,
                      repeats=repeats, overrides=list(set_), timeout_s=timeout)

    def progress(m, rep, res):
        msg = res.get("status")
        if msg == "ok":
            msg = f"{res['step_seconds_median']:.3f} s/step, peak RSS {res['peak_rss_mib']:.0f} MiB"
        console.print(f"  {m} (repeat {rep + 1}/{repeats}): {msg}", highlight=False)

    console.print(f"[bold]rpsft bench[/bold] {', '.join(names)} on {model}: {steps} steps × {batch_size}×"
                  f"{grad_accum}, max length {max_length}, k={rank} -> {out}", highlight=False)
    report = run_bench(s, out, on_result=progress)
    print(markdown_table(report))
    console.print(f"wrote {out / 'bench.json'} and {out / 'bench.md'} (per-method logs in {out / 'runs'})",
                  highlight=False)
    if any(r.get("status") == "failed" for r in report["methods"].values()):
        raise typer.Exit(1)
