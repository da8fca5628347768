"""``rpsft compare``: train several methods (and a k sweep), evaluate ID and OOD, analyse, tabulate, plot.

The shape of the paper's study (Table 2, Fig. 3-4, Fig. 6-8) on the user's model and data. Each stage of each run
writes its result atomically under ``output_dir``; a re-run skips every finished stage and resumes an interrupted
training from its last complete checkpoint, so a run stopped at hour 3 resumes at hour 3. A run that cannot resume
(its training config changed, or it was killed before its first checkpoint was sealed) trains again from scratch,
after everything derived from the earlier attempt is deleted (:func:`rpsft.compare.stages.forget_run`).

Stages per run: train -> eval-id -> eval-ood (log-likelihood multiple choice) -> probe (KL / NLL vs base);
then, over all runs: rotation (principal angles vs base), drift (hidden-state centroids), and the summary
(summary.json, table.md, tradeoff.png, rank_sweep.png, cost table).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import yaml

from .. import fileio, runlock
from ..config import ConfigError, load_config, to_dict
from .config import CompareConfig, sweep_axes
from .frontier import pair_deltas, render_frontier, render_pairs, write_frontier
from .grid import plan_runs, point_name, train_config_of
from .report import build_summary, config_dict, plot_rank_sweep, plot_tradeoff, render_table
from .stages import (POINTS, SavePoints, config_changes, discard_points_after, eval_model_path, eval_stage,
                     forget_run, foreign_files, probe_stage, run_stage, stored, teacher_forced_data,
                     teacher_forced_stage, training_start)


# one process per comparison directory (runlock.py); the runs, evaluations and analyses it drives lock their own
# directories under it, and a nested lock on a directory this process holds is shared, not refused
@runlock.locked("rpsft compare", lambda a: a["cfg"].output_dir)
def run_compare(cfg: CompareConfig, log: Callable[[str], None] = print) -> dict:
    from ..budget import check_budget_method
    from ..methods import get_method
    from ..train import train

    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    fileio.write_text(root / "compare.yaml", yaml.safe_dump(config_dict(cfg), sort_keys=False))
    runs = plan_runs(cfg)
    base_cfg = load_config(cfg.train_config, cfg.train_set)
    base_model = base_cfg.model.name
    for r in runs:  # a rank map that is not there fails now, not after the runs before it have trained
        run_cfg = train_config_of(cfg, r, root)
        method = get_method(run_cfg.method)  # and a budget the run's method cannot use (train() checks it too)
        check_budget_method(run_cfg.anchor, f"run {r.name} (method={run_cfg.method})",
                            method.anchor_enabled(run_cfg.anchor.enabled), method=method)
        rank = run_cfg.anchor.rank
        if isinstance(rank, str) and rank.startswith("@") and not Path(rank[1:]).expanduser().is_file():
            raise ConfigError(f"run {r.name}: rank map {rank[1:]} does not exist; write it first with "
                              f"`rpsft analyze energy ... --out {Path(rank[1:]).parent}`")
    if cfg.id.teacher_forced:  # its data file too: a missing one fails now, not after hours of training
        try:
            teacher_forced_data(cfg.id.teacher_forced, cfg.eval_dir)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"id.teacher_forced: {e}") from None
    planned = {"base", *[n for r in runs for n in (r.name, *r.aliases, *[point_name(r.name, s) for s in r.eval_steps])]}
    for a, b in cfg.pairs:  # a typo in a point name fails now, not after hours of training
        for name in (a, b):
            if name not in planned:
                raise ConfigError(f"pairs: {name!r} is not a point of this comparison; the points are "
                                  f"{', '.join(sorted(planned))}")
    # Compare owns runs/NAME (its training and points/) and every result derived from it. A run whose stage record
    # matches its config and directory is done; any other resumes if its directory holds its training up to a
    # complete checkpoint with every point it passed, else trains again from scratch after everything derived from
    # the earlier attempt is deleted. Decided for every run before any trains, so that a directory holding files
    # compare would have to delete fails now, not after hours of training.
    plan = []
    for r in runs:
        tcfg = train_config_of(cfg, r, root)
        run_dir = Path(tcfg.output_dir)
        steps = [s for s in r.eval_steps if tcfg.train.max_steps <= 0 or s < tcfg.train.max_steps]
        key = {**{k: v for k, v in to_dict(tcfg).items() if k != "output_dir"}, "eval_steps": steps}
        stage_file = root / "stages" / r.name / "train.json"
        done = stored(stage_file, key)[0] is not None and config_changes(run_dir, tcfg) == []
        start = None if done else training_start(run_dir, tcfg, steps)
        foreign = foreign_files(run_dir) if start is not None and start.step is None else []
        if foreign:
            more = f" and {len(foreign) - 8} more" if len(foreign) > 8 else ""
            raise FileExistsError(f"{run_dir} holds files that neither rpsft train nor rpsft compare writes "
                                  f"({', '.join(foreign[:8])}{more}); compare must train {r.name} there from scratch "
                                  "and would delete them: move them out of that directory and run compare again")
        plan.append((r, tcfg, run_dir, steps, key, stage_file, start))
    log(f"compare: {len(runs)} training runs ({', '.join(r.name for r in runs)}) on {base_model}")

    results: dict[str, dict] = {}
    models = {"base": base_model}  # final weights of every run (rotation and drift are measured on these)
    points = {"base": base_model}  # everything evaluated: the runs' intermediate checkpoints too
    run_keys = {"base": None}
    for r, tcfg, run_dir, steps, key, stage_file, start in plan:
        if start is not None and start.why:
            from rich.markup import escape

            log(f"[yellow]train {r.name}: {escape(start.why)}[/yellow]")  # a config diff holds [lists]
        if start is not None and start.step is None:
            forget_run(root, r.name, run_dir)
        elif start is not None:
            for s in discard_points_after(root, r.name, run_dir, start.step):
                log(f"[yellow]train {r.name}: discarding {POINTS}/step-{s} (saved after the last complete "
                    "checkpoint)[/yellow]")

        def do_train(tcfg=tcfg, run_dir=run_dir, steps=steps, start=start):
            resume = "latest" if start is not None and start.step is not None else None
            out = train(tcfg, resume=resume, overwrite=resume is None, progress=True,
                        extra_callbacks=[SavePoints(steps, run_dir / POINTS)] if steps else None)
            if not cfg.keep_checkpoints:  # finished: the final weights are in run_dir; optimizer states only fill the disk
                import shutil

                for ck in run_dir.glob("checkpoint-*"):
                    shutil.rmtree(ck)
            return out

        tr = run_stage(stage_file, do_train, log, f"train {r.name}", key=key)
        common = {"k": r.k, "method": tcfg.method, "family": r.family, "seed": r.seed, "run": r.name,
                  "aliases": r.aliases, "configuration": r.configuration}
        for s in steps:
            point = run_dir / POINTS / f"step-{s}"
            if s < tr["global_step"] and point.is_dir():
                name = point_name(r.name, s)
                results[name] = {**common, "step": s, "final": False}
                points[name] = str(point)
                run_keys[name] = key
        results[r.name] = {"train": tr, **common, "step": tr["global_step"], "final": True}
        models[r.name] = points[r.name] = eval_model_path(run_dir)
        run_keys[r.name] = key

    for name, model in points.items():
        res = results.setdefault(name, {"k": None, "method": "base", "family": "base", "step": 0, "final": True})
        stage_dir = root / "stages" / name
        # the run's training config is part of every evaluation's key: a retrained run (same path) is re-evaluated
        tkey = run_keys.get(name)
        if cfg.id.suites or cfg.id.optional:
            res["id"] = run_stage(stage_dir / "eval-id.json",
                                  lambda m=model, n=name: eval_stage(cfg, cfg.id, m, root, n, "id"), log,
                                  f"eval-id {name}", key=[model, cfg.id, tkey])
        if cfg.id.teacher_forced:
            res["id_tf"] = run_stage(stage_dir / "eval-id-tf.json",
                                     lambda m=model: teacher_forced_stage(cfg, m), log, f"eval-id-tf {name}",
                                     key=[model, cfg.id.teacher_forced, cfg.id.limit, tkey])
        # log-likelihood multiple choice on final points only: it moves little between checkpoints and costs most
        if (cfg.ood.suites or cfg.ood.optional) and res.get("final"):
            res["ood"] = run_stage(stage_dir / "eval-ood.json",
                                   lambda m=model, n=name: eval_stage(cfg, cfg.ood, m, root, n, "ood"), log,
                                   f"eval-ood {name}", key=[model, cfg.ood, tkey])
        if cfg.probe and name != "base":
            res["probe"] = run_stage(stage_dir / "probe.json", lambda m=model: probe_stage(
                cfg, base_model, m, root / "stages" / "base" if cfg.probe_cache else None),
                                     log, f"probe {name}", key=[base_model, model, cfg.probe_prompts,
                                                                 cfg.probe_max_new_tokens, cfg.probe_cache, tkey])
        if cfg.blocks and name != "base":  # every point: how forgetting tracks each block is measured over points
            from .stages import blocks_stage

            a = base_cfg.anchor
            spec = [cfg.blocks_rank if cfg.blocks_rank is not None else a.rank, a.targets, a.layers,
                    a.svd if a.svd in ("exact", "gram") else "exact"]
            res["blocks"] = run_stage(stage_dir / "blocks.json", lambda m=model, sp=spec: blocks_stage(
                base_model, m, *sp), log, f"blocks {name}", key=[base_model, model, spec, tkey])
    tuned = [n for n in models if n != "base"]
    analysis = {}
    if cfg.rotation and tuned:
        from ..analysis.plots import plot_rotation
        from ..analysis.rotation import run_rotation

        def do_rotation():
            rep = run_rotation(base_model, [models[n] for n in tuned], labels=tuned)
            plot_rotation(rep, root / "rotation.png")
            return rep

        analysis["rotation"] = run_stage(root / "stages" / "rotation.json", do_rotation, log, "rotation analysis",
                                         key=[base_model, [models[n] for n in tuned]])
    if cfg.drift_limit > 0 and tuned:
        from ..analysis.drift import run_drift
        from ..analysis.plots import plot_drift

        def do_drift():
            rep = run_drift(base_model, [models[n] for n in tuned], cfg.drift_data or base_cfg.data.train,
                            limit=cfg.drift_limit, labels=tuned)
            plot_drift(rep, root / "drift.png")
            return rep

        analysis["drift"] = run_stage(root / "stages" / "drift.json", do_drift, log, "drift analysis",
                                      key=[base_model, [models[n] for n in tuned], cfg.drift_data, cfg.drift_limit])

    summary = build_summary(cfg, results, analysis, points)
    summary["frontier"] = write_frontier(root, results, cfg.forgetting, cfg.bootstrap)
    from .frontier import block_association

    summary["block_association"] = block_association(summary["frontier"], cfg.bootstrap)  # as in frontier.json
    summary["pairs"] = pair_deltas(results, cfg.pairs, cfg.bootstrap)
    fileio.write_json(root / "summary.json", summary)
    fileio.write_text(root / "table.md", render_table(summary) + "\n"
                      + render_frontier(summary["frontier"], cfg.forgetting, cfg.bootstrap)
                      + render_pairs(summary["pairs"], cfg.bootstrap))
    finals = {**summary, "rows": [r for r in summary["rows"] if r.get("final", True)]}
    plot_tradeoff(finals, root / "tradeoff.png")
    for sw in cfg.sweep:
        if [k for k, _ in sweep_axes(sw)] == ["anchor.rank"]:
            plot_rank_sweep(finals, sw["method"], root / "rank_sweep.png")
    log(f"wrote {root / 'summary.json'}, {root / 'table.md'}, {root / 'frontier.json'}, {root / 'frontier.png'}, "
        f"{root / 'tradeoff.png'}")
    return summary

