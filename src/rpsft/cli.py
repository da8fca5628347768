"""``rpsft`` command line: train | plan | data | methods | eval | analyze | rl | bench | compare.

Heavy imports (torch, transformers) happen inside the commands so that ``rpsft --help`` is instant. Expected
failures (bad config, bad data, missing files) print one clear message and exit with status 2; set
``RPSFT_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from .analysis.cli import app as analyze_app
from .bench.cli import bench_command
from .compare.cli import compare_command
from .eval.cli import eval_command
from .rl.cli import app as rl_app
from .terminal import console, friendly_errors

app = typer.Typer(help="Rotation-Preserving Supervised Fine-Tuning (RPSFT) on the Hugging Face stack.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Built-in data.", no_args_is_help=True)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"rpsft {__version__}")
        raise typer.Exit()


@friendly_errors
def _root(ctx: typer.Context, version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                                           help="Print the version and exit.")):
    """Rotation-Preserving Supervised Fine-Tuning (RPSFT) on the Hugging Face stack."""
    from .launch import check_one_process

    check_one_process(ctx.invoked_subcommand)  # under a multi-process launch only train and rl may run


@friendly_errors
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (see configs/demo.yaml)."),
    set_: List[str] = typer.Option([], "--set", "-s", help="Override a config key: --set anchor.rank=128"),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue a run: 'latest' or a checkpoint dir."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete an earlier run in output_dir first: only "
                                   "what a run writes (a directory with other files is refused)."),
    overwrite_all: bool = typer.Option(False, "--overwrite-all",
                                       help="Delete the whole output_dir first, whatever it holds."),
):
    """Fine-tune a model (method=sft|rpsft|l2init|complement|dft|iw|lora|rpsft_lora|osf)."""
    from .config import load_config
    from .train import train as run_train

    cfg = load_config(config, set_)
    console.print(f"[bold]rpsft train[/bold] method={cfg.method} model={cfg.model.name} data={cfg.data.train} "
                  f"-> {cfg.output_dir}", highlight=False)
    from .quiet import quiet_console

    with quiet_console(Path(cfg.output_dir) / "train.log"):  # library logs and warnings -> the run's log file
        summary = run_train(cfg, resume=resume, overwrite="all" if overwrite_all else overwrite, console=console)
    a = summary["anchor"]
    console.print(f"[green]done[/green] {summary['global_step']} steps in {summary['train_seconds']:.0f}s, "
                  f"mean train loss {summary['train_loss']:.4f}", highlight=False)
    if a:
        console.print(f"anchor: {a['matrices']} matrices, k={a['ranks']}, {a['nbytes'] / 2**20:.1f} MiB, "
                      f"final R={a['final_penalty']:.3e}", highlight=False)
    out = Path(summary["output_dir"])
    if summary.get("merged_model"):  # adapter methods: the run dir holds the adapter, merged/ the full model
        console.print(f"adapter:    {out}/\nmerged:     {summary['merged_model']}  (from_pretrained loads it)",
                      highlight=False)
    console.print(f"checkpoint: {out}/  (AutoModelForCausalLM.from_pretrained loads it)\n"
                  f"metrics:    {out / 'metrics.jsonl'}\nconfig:     {out / 'config.yaml'}\n"
                  f"summary:    {out / 'run.json'}", highlight=False)
    if summary.get("disk"):  # (a run.json from before disk use was recorded has none)
        from .guards import disk_line

        console.print(disk_line(summary["disk"], out), highlight=False, soft_wrap=True)
    if (out / "train.log").is_file():
        console.print(f"log:        {out / 'train.log'}  (library messages and warnings)", highlight=False)


@friendly_errors
def synth_math(
    out: Path = typer.Option(Path("data/synth-math"), "--out", help="Directory for train.jsonl and test.jsonl."),
    n_train: int = typer.Option(2000, "--train", help="Training problems."),
    n_test: int = typer.Option(200, "--test", help="Held-out problems (disjoint questions)."),
    seed: int = typer.Option(0, "--seed", help="Generation seed (same seed, same files)."),
    ops: str = typer.Option("2-4", "--ops", help="Quantity changes per problem, N or LO-HI within 1-8 (1-2: short "
                                                 "solutions a small model learns to reproduce in a few steps)."),
):
    """Write the built-in multi-step arithmetic word problems (solutions end in \\boxed{N})."""
    from .data.synthetic_math import write_splits

    paths = write_splits(out, n_train=n_train, n_test=n_test, seed=seed, ops=ops)
    print(f"wrote {n_train} train -> {paths['train']}\nwrote {n_test} test  -> {paths['test']}")


@friendly_errors
def eval_files(
    src: Path = typer.Option(..., "--from", help="A copy of the official evaluation data: a folder with id/ and "
                                                 "ood/, or a clone of the authors' repository."),
    dest: Optional[Path] = typer.Option(None, "--to", help="Install here instead of where `rpsft eval` looks "
                                                          "($RPSFT_EVAL_DIR, else ~/.cache/rpsft/eval)."),
    gsm8k: Optional[Path] = typer.Option(None, "--gsm8k", help="Also install GSM8K's test.jsonl (file or folder)."),
):
    """Check the official evaluation files (every row must become an item) and install them for `rpsft eval`."""
    from .eval.data_files import install_eval_files

    rep = install_eval_files(src, dest, gsm8k)
    for rel, info in rep["installed"].items():
        print(f"ok       {rel:38s} {info['rows']:6d} rows  sha256 {info['sha256'][:12]}")
    for rel, err in rep["invalid"].items():
        print(f"INVALID  {rel:38s} {err}")
    print(f"installed {len(rep['installed'])} files from {rep['root']} -> {rep['dest']}")
    if rep["missing"]:
        print(f"not in {rep['root']} (rpsft eval falls back to the hub for these): {', '.join(rep['missing'])}")
    if rep["invalid"]:
        raise ValueError(f"{len(rep['invalid'])} file(s) failed the check and were not installed: "
                         f"{', '.join(rep['invalid'])}")


@friendly_errors
def accelerate_config_cmd(name: Optional[str] = typer.Argument(None, help="fsdp2, zero2, ddp-cpu2 (none: list)")):
    """Print the path of a shipped accelerate config, for `accelerate launch --config_file`."""
    from .launch import accelerate_config, accelerate_configs

    if name is None:
        for n, p in accelerate_configs().items():
            print(f"{n:10s} {p}")
        return
    print(accelerate_config(name))


@friendly_errors
def launch(ctx: typer.Context, name: str = typer.Argument(..., help="accelerate config: fsdp2, zero2, ddp-cpu2 "
                                                                     "or a YAML path")):
    """Run an rpsft command under `accelerate launch` with a shipped config: rpsft launch fsdp2 train -c my.yaml"""
    from .launch import exec_launch

    exec_launch(name, list(ctx.args))


@friendly_errors
def methods():
    """List the training methods."""
    from rich.table import Table

    from .methods import REGISTRY, available

    table = Table("method", "anchor", "what it is", "extra memory")
    for name in available():
        m = REGISTRY[name]
        table.add_row(name, m.anchor, m.summary, m.extra_memory)
    Console().print(table)


@friendly_errors
def plan(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (see configs/paper/)."),
    set_: List[str] = typer.Option([], "--set", "-s", help="Override a config key: --set train.batch_size=1"),
    launcher: Optional[str] = typer.Option(None, "--launcher", "-l", help="accelerate config: fsdp2, zero2, "
                                           "ddp-cpu2 or a YAML path (default: $ACCELERATE_CONFIG_FILE, else one "
                                           "process)."),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="GPUs: the processes of a multi-process launcher "
                                       "(default: its num_processes), and what a suggestion may shard over."),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="Memory of one GPU, e.g. 80GiB (default: "
                                             "the visible GPU's; on CPU the machine's RAM)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the plan as JSON here."),
):
    """Per-rank memory of a training run (weights, gradients, optimizer, anchor, activations), from the model's
    config alone: no weights are loaded. Exits 2 with a setting that fits when the run cannot."""
    from .config import load_config
    from .plan import check_plan, make_plan, print_plan

    cfg = load_config(config, set_)
    mem_plan, shape, n_gpus = make_plan(cfg, launcher, gpus, gpu_memory)
    print_plan(mem_plan, Console())
    if out is not None:
        from .fileio import write_json

        write_json(out, mem_plan.to_dict())
    check_plan(cfg, mem_plan, n_gpus, shape)


# ------------------------------------------------------------------------------------ every command, in one place
# Commands are plain functions (each wrapped in ``friendly_errors`` where it is defined); groups are typer apps.
app.callback()(_root)
app.command("train")(train)
app.add_typer(data_app, name="data")
data_app.command("synth-math")(synth_math)
data_app.command("eval-files")(eval_files)
app.command("methods")(methods)
app.command("plan")(plan)
app.command("eval")(eval_command)
app.add_typer(analyze_app, name="analyze")
app.add_typer(rl_app, name="rl")
app.command("bench")(bench_command)
app.command("compare")(compare_command)
app.command("accelerate-config")(accelerate_config_cmd)
app.command("launch", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(launch)


def main() -> None:
    # `--overwrite=all` is how users write it, but a click flag takes no value: it is the --overwrite-all flag
    sys.argv[1:] = ["--overwrite-all" if a == "--overwrite=all" else a for a in sys.argv[1:]]
    app()


if __name__ == "__main__":
    sys.exit(main())
