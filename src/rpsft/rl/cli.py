"""``rpsft rl``: DAPO from an SFT checkpoint (registered by rpsft.cli as the ``rl`` sub-app: ``app`` below).

Imports stay cheap: torch, TRL and the trainer load inside the command."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(help="DAPO reinforcement learning from an SFT checkpoint (TRL GRPOTrainer, loss_type=dapo).",
                  add_completion=False, pretty_exceptions_enable=False)



@app.callback(invoke_without_command=True)
def rl(
    init: Optional[str] = typer.Option(None, "--init", "-i",
                                       help="SFT checkpoint to start from (rpsft train output dir, embedded name "
                                            "or hub id); overrides init: in the config."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (see configs/rl-demo.yaml)."),
    set_: List[str] = typer.Option([], "--set", "-s", help="Override a key: --set dapo.num_generations=8"),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue a run: 'latest' or a checkpoint dir."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete an earlier run in output_dir first: only "
                                   "what a run writes (a directory with other files is refused)."),
    overwrite_all: bool = typer.Option(False, "--overwrite-all",
                                       help="Delete the whole output_dir first, whatever it holds."),
) -> None:
    """Run DAPO (clip-higher, token-level loss, overlong shaping, dynamic sampling) from --init; writes the RL
    checkpoint, metrics.jsonl, config.yaml and run.json to output_dir."""
    from rich.console import Console

    from ..terminal import friendly_errors

    console = Console(stderr=True)

    @friendly_errors  # one red line and exit 2 for user errors, like every other command
    def go():
        from .config import load_rl_config
        from .run import run_rl

        cfg = load_rl_config(config, set_, init=init)
        d = cfg.dapo
        console.print(f"[bold]rpsft rl[/bold] init={cfg.init} data={cfg.data.train} G={d.num_generations} "
                      f"prompts/step={d.prompts_per_step} L_max={d.max_completion_length} lr={cfg.train.lr} "
                      f"steps={cfg.train.max_steps} anchor={'on' if cfg.anchor.enabled else 'off'} -> "
                      f"{cfg.output_dir}", highlight=False)
        from ..quiet import quiet_console

        with quiet_console(Path(cfg.output_dir) / "rl.log"):  # library logs and warnings -> the run's log file
            return run_rl(cfg, resume=resume, overwrite="all" if overwrite_all else overwrite, console=console)

    summary = go()
    t = summary["train"]
    line = f"[green]done[/green] {summary['global_step']} steps, {summary['seconds_per_step']:.1f} s/step"
    if "reward_first" in t:
        line += f"; train reward {t['reward_first']:+.3f} (first step) -> {t['reward_last']:+.3f} (last)"
    console.print(line, highlight=False)
    for when in ("eval_before", "eval_after"):
        for name, b in summary.get(when, {}).items():
            if isinstance(b, dict) and "avg_at_k" in b:
                console.print(f"{when}: {name} avg@{b['k']} {100 * b['avg_at_k']:.1f}% over {b['problems']} problems",
                              highlight=False)
    out = Path(summary["output_dir"])
    console.print(f"checkpoint: {out}/  (AutoModelForCausalLM.from_pretrained loads it)\n"
                  f"metrics:    {out / 'metrics.jsonl'}\nsummary:    {out / 'run.json'}", highlight=False)
    if summary.get("disk"):  # rank 0's summary (the one that writes run.json)
        from ..guards import disk_line

        console.print(disk_line(summary["disk"], out), highlight=False, soft_wrap=True)
