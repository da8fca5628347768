"""``rpsft eval``: the typer command (registered by rpsft.cli as ``app.command("eval")(eval_command)``; also
runnable alone as ``python -m rpsft.eval.cli``). Imports stay cheap: torch loads inside the command."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..terminal import fmt, friendly_errors, progress_bar


def _fmt(v) -> str:
    return fmt(v, pct=True, missing="-")


def print_summary(summary: dict, console=None) -> None:
    """The rich table of a summary (percentages); also used by other commands that run evaluations."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    loglik = summary.get("mode") == "loglik"
    proto = f", {summary.get('mc_protocol', 'paper')} protocol" if loglik else ""
    table = Table(title=f"rpsft eval: {summary['model']} ({summary['mode']}{proto}, %)",
                  caption=None if loglik else "pass@k* = unbiased pass@k from n > k samples; ans = answer "
                  "extracted; flex = last-number grading (GSM8K); cut = hit max-new-tokens")
    table.add_column("benchmark", no_wrap=True)
    table.add_column("n", justify="right")
    cols = ("norm", "text", "letter", "chance") if loglik else \
        ("k", "avg@k", "±se", "pass@k", "pass@k*", "ans", "flex", "tok", "cut")
    for c in cols:
        table.add_column(c, justify="right", no_wrap=True)
    for name, s in summary["benchmarks"].items():
        if loglik:
            table.add_row(name, str(s["problems"]), _fmt(s["acc_norm"]), _fmt(s["acc_text"]),
                          _fmt(s["acc_letter"]), _fmt(s["chance"]))
        else:
            table.add_row(name, str(s["problems"]), str(s["k"]), _fmt(s["avg_at_k"]), _fmt(s["stderr"]),
                          _fmt(s["pass_at_k"]), _fmt(s.get("pass_at_k_unbiased")), _fmt(s.get("answered")),
                          _fmt(s.get("avg_at_k_flex")), f"{s['mean_tokens']:.0f}", _fmt(s["truncated"]))
    for g, v in summary.get("groups", {}).items():
        table.add_row(f"[bold]{g} mean[/bold]", "", *([_fmt(v["mean"])] if loglik else ["", _fmt(v["mean"])]))
    console.print(table)
    for name, why in summary.get("skipped", {}).items():
        console.print(f"[yellow]skipped {name}: {why}[/yellow]")
    if "probe" in summary:
        p = summary["probe"]
        console.print(f"forgetting probe vs {p['base']}: KL(base||tuned) {p['kl']:.4f} nats/token, NLL of base "
                      f"answers {p['nll_tuned']:.3f} (base {p['nll_base']:.3f}, delta {p['nll_delta']:+.3f}) "
                      f"over {p['tokens']} tokens")
    console.print(f"wall {summary['wall_s']:.1f}s; samples: {summary['samples']}")


@friendly_errors(also=(RuntimeError,))  # the run's own consistency checks (resume, empty answers) are user errors too
def eval_command(
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m",
                              help="embedded model name (smollm2-135m-instruct: de-quantised from a Q4_1 GGUF, not "
                                   "the original bf16 weights; docs/eval.md), checkpoint directory (rpsft train "
                                   "output) or hub id"),
    suite: str = typer.Option("id", "--suite", "-s",
                              help="id | ood | all | probe | benchmark names (comma-separated), NAME_test, a .jsonl "
                                   "path, hf:DATASET[:SPLIT]"),
    k: Optional[int] = typer.Option(None, "--k", help="samples per problem (default: each benchmark's paper k)"),
    n: Optional[int] = typer.Option(None, "--n", help="samples drawn per problem (> k: unbiased pass@k)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="first N problems of each benchmark"),
    backend: str = typer.Option("hf", "--backend", help="hf (transformers generate) or vllm (GPU)"),
    out: str = typer.Option("runs/eval", "--out", "-o", help="output directory (summary.json, samples.jsonl)"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens",
                                                 help="default 512 on CPU, 2048 on GPU"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="default 32 on CPU, 64 on GPU"),
    temperature: float = typer.Option(0.7, "--temperature"),
    top_p: float = typer.Option(0.95, "--top-p"),
    greedy: bool = typer.Option(False, "--greedy", help="greedy decoding (k becomes 1)"),
    loglik: bool = typer.Option(False, "--loglik", help="score multiple-choice options by log-likelihood"),
    mc_protocol: str = typer.Option("paper", "--mc-protocol",
                                    help="multiple-choice protocol: paper (the benchmark's chat prompt) or lm-eval "
                                         "(lm-evaluation-harness's zero-shot 'Question: ... Answer:' log-likelihood "
                                         "request; implies --loglik)"),
    eval_dir: Optional[str] = typer.Option(None, "--eval-dir",
                                           help="official files (id/, ood/); default $RPSFT_EVAL_DIR or "
                                                "~/.cache/rpsft/eval"),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt",
                                                help="boxed | file | none (default: boxed for official and "
                                                     "GSM8K rows, file otherwise)"),
    probe_base: Optional[str] = typer.Option(None, "--probe-base", help="base model for the 'probe' suite"),
    seed: int = typer.Option(0, "--seed"),
    tensor_parallel_size: Optional[int] = typer.Option(None, "--tensor-parallel-size",
                                                       help="vLLM: GPUs one model is split over (default 1)"),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len",
                                                help="vLLM: context to reserve KV cache for (default: the model's; "
                                                     "lower it when a long-context model does not fit)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="vLLM: weight dtype, e.g. bfloat16 (default auto)"),
    gpu_memory_utilization: Optional[float] = typer.Option(
        None, "--gpu-memory-utilization", help="vLLM: fraction of GPU memory to use (default 0.85)"),
) -> None:
    """Evaluate a model: Avg@k / Pass@k on math and OOD benchmarks, log-likelihood multiple choice, or the
    forgetting probe. Interrupted runs resume from OUT/samples.jsonl."""
    from rich.console import Console

    from rpsft.eval.runner import run_eval
    from rpsft.quiet import quiet_console

    console = Console()
    # library bars ("Loading weights", tokenizer maps) and warnings go to OUT/eval.log; ours is the one bar
    with quiet_console(Path(out) / "eval.log"), progress_bar(console=console) as bar:
        task = bar.add_task("loading", total=None)

        def progress(desc: str, done: int, total: int) -> None:
            bar.update(task, description=desc, completed=done, total=total)

        summary = run_eval(model, suite, k=k, limit=limit, backend=backend, out_dir=out,
                           max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, greedy=greedy,
                           batch_size=batch_size, seed=seed, eval_dir=eval_dir, n=n, loglik=loglik,
                           system_prompt=system_prompt, probe_base=probe_base, progress=progress,
                           vllm_options=dict(tensor_parallel_size=tensor_parallel_size,
                                             max_model_len=max_model_len, dtype=dtype,
                                             gpu_memory_utilization=gpu_memory_utilization),
                           mc_protocol=mc_protocol)
    print_summary(summary, console)


if __name__ == "__main__":
    typer.run(eval_command)
