"""The runs of a comparison: one per method and per point of each sweep grid, runs with the same resolved
training config trained once."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import load_config, to_dict
from .config import SHORT, CompareConfig, as_list, step_list, sweep_axes, value_name


@dataclass
class Run:
    name: str
    overrides: list[str]
    k: Any = None
    aliases: list[str] = field(default_factory=list)  # other requested names with the same resolved config
    family: str | None = None  # the curve this run's points belong to in the frontier plot
    eval_steps: list[int] = field(default_factory=list)
    seed: int | None = None
    # the run's config minus its seed, named by its first run: the points of one configuration at one step are
    # averaged over seeds, and the seeds resampled, in the frontier (compare.frontier.seed_groups)
    configuration: str | None = None


def point_name(run: str, step: int) -> str:
    """The name of a run's checkpoint evaluated at ``step`` (``sft@8``)."""
    return f"{run}@{step}"


def plan_runs(cfg: CompareConfig) -> list[Run]:
    """One run per method, plus one per swept k; runs with identical resolved configs are trained once."""
    import itertools

    runs = [Run(m.get("label", m["name"]), [f"method={m['name']}", *as_list(m.get("set", []))],
                family=m.get("family", m.get("label")), eval_steps=step_list(m.get("eval_steps", cfg.eval_steps), "eval_steps"))
            for m in cfg.methods]
    for sw in cfg.sweep:
        axes = sweep_axes(sw)
        for combo in itertools.product(*[vals for _, vals in axes]):
            parts = "-".join(f"{SHORT.get(k, k.split('.')[-1])}{value_name(v)}" for (k, _), v in zip(axes, combo))
            runs.append(Run(f"{sw.get('label', sw['method'])}-{parts}",
                            [f"method={sw['method']}", *as_list(sw.get("set", [])),
                             *[f"{k}={v}" for (k, _), v in zip(axes, combo)]],
                            family=sw.get("label"), eval_steps=step_list(sw.get("eval_steps", cfg.eval_steps), "eval_steps")))
    seen: dict[str, Run] = {}
    configurations: dict[tuple, str] = {}
    out = []
    for r in runs:
        train_cfg = train_config_of(cfg, r, Path("/dev/null"))
        d = to_dict(train_cfg)
        d.pop("output_dir")
        key = json.dumps(d, sort_keys=True, default=str)
        r.k = anchored_rank(train_cfg)
        r.seed = train_cfg.train.seed
        if r.family is None:  # one curve per method and anchored rank: "sft", "l2init", "rpsft k=128", "rpsft k=ranks"
            r.family = train_cfg.method + ("" if r.k in (0, "full") else f" k={value_name(r.k)}")
        if key in seen:
            seen[key].aliases.append(r.name)
            seen[key].eval_steps = sorted(set(seen[key].eval_steps) | set(r.eval_steps))
            continue
        seen[key] = r
        out.append(r)
        seedless = json.dumps({**d, "train": {k: v for k, v in d["train"].items() if k != "seed"}}, sort_keys=True,
                              default=str)
        r.configuration = configurations.setdefault((r.family, seedless), r.name)
    return out


def anchored_rank(train_cfg) -> Any:
    """The k a run anchors: 0 without the anchor (sft, dft, iw, lora), "full" for L2-Init, else anchor.rank."""
    from ..methods import get_method

    method = get_method(train_cfg.method)
    if not method.anchor_enabled(train_cfg.anchor.enabled):
        return 0
    return "full" if method.anchor == "full" else train_cfg.anchor.rank


def train_config_of(cfg: CompareConfig, run: Run, root: Path):
    return load_config(cfg.train_config, [*cfg.train_set, *run.overrides, f"output_dir={root / 'runs' / run.name}"])
