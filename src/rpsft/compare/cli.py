"""``rpsft compare --config configs/compare-demo.yaml [--set key=value ...]``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..terminal import console, friendly_errors


@friendly_errors
def compare_command(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Compare config (configs/compare-demo.yaml)."),
    set_: List[str] = typer.Option([], "--set", "-s", help="Override a key: --set id.limit=20"),
    plan: bool = typer.Option(False, "--plan", help="Print the runs that would be trained and exit."),
):
    """Train methods, evaluate ID/OOD, analyse, and tabulate (the paper's study). Re-running skips every finished
    stage and resumes interrupted training."""
    from .config import load_compare_config
    from .grid import plan_runs

    cfg = load_compare_config(config, set_)
    if plan:
        runs = plan_runs(cfg)
        for r in runs:
            console.print(f"{r.name}: {' '.join(r.overrides)}  [family {r.family}, seed {r.seed}"
                          + (f", also evaluated at steps {r.eval_steps}" if r.eval_steps else "") + "]"
                          + (f"  (also: {', '.join(r.aliases)})" if r.aliases else ""), highlight=False)
        console.print(f"{len(runs)} training runs, {len(runs) + sum(len(r.eval_steps) for r in runs) + 1} "
                      "evaluated points (with the base)", highlight=False)
        return
    from ..quiet import quiet_console
    from .run import run_compare

    # every run's library output (weights loading, dataset maps, warnings) goes to OUTPUT_DIR/compare.log; the
    # console keeps the stage lines and each run's own training progress
    with quiet_console(Path(cfg.output_dir) / "compare.log"):
        run_compare(cfg, log=lambda m: console.print(m, highlight=False))
    console.print((Path(cfg.output_dir) / "table.md").read_text(), highlight=False)
