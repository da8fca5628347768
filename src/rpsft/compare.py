"""``rpsft compare``: train several methods (and a k sweep), evaluate ID and OOD, analyse, tabulate, plot.

The shape of the paper's study (Table 2, Fig. 3-4, Fig. 6-8) on the user's model and data. Each stage of each run
writes its result atomically under ``output_dir``; a re-run skips every finished stage and resumes an interrupted
training from its last checkpoint, so a run stopped at hour 3 resumes at hour 3.

Stages per run: train -> eval-id -> eval-ood (log-likelihood multiple choice) -> probe (KL / NLL vs base);
then, over all runs: rotation (principal angles vs base), drift (hidden-state centroids), and the summary
(summary.json, table.md, tradeoff.png, rank_sweep.png, cost table).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from . import io
from .config import ConfigError, _parse_scalar, load_config, to_dict


@dataclass
class EvalSpec:
    suites: list[str] = field(default_factory=list)
    optional: list[str] = field(default_factory=list)  # run only when their data files are present
    limit: int | None = None
    greedy: bool = True
    k: int | None = None
    max_new_tokens: int | None = None
    batch_size: int | None = None
    loglik: bool = False
    mc_protocol: str = "paper"  # multiple-choice protocol: paper | lm-eval (rpsft.eval.loglik)
    # prompt/completion JSONL (or a suite name whose file holds completions, e.g. synth-math) scored by
    # teacher-forced exact match: one forward pass per batch instead of max_new_tokens decoding steps
    teacher_forced: str | None = None


@dataclass
class CompareConfig:
    output_dir: str = "results/compare"
    train_config: str = "configs/demo.yaml"
    train_set: list[str] = field(default_factory=list)  # overrides for every run
    methods: list[dict] = field(default_factory=lambda: [{"name": "sft"}, {"name": "rpsft"}])
    # one grid per entry: {"method": "rpsft", "lam": [1, 10], "rank": [128, "@ranks.json"], "set": [...]}; any
    # config key (aliases rank/lam/period/seed, or a bare anchor./train. field name) may be swept
    sweep: Any = None
    eval_steps: list[int] = field(default_factory=list)  # also evaluate each run at these optimizer steps
    forgetting: str = "probe_kl"  # the frontier's y axis: probe_kl | probe_nll_delta | ood_drop
    bootstrap: int = 2000  # resamples per paired bootstrap interval
    probe_prompts: str | None = None  # a JSONL of {"prompt"} rows instead of the shipped probe set
    probe_max_new_tokens: int = 64  # length of the base's answers the probe scores (its cost is linear in it)
    keep_checkpoints: bool = True  # False: delete a finished run's checkpoint-N dirs (≈ 3× the weights each)
    probe_cache: bool = True  # keep the base's probe log-probs on disk (float16) instead of recomputing per point
    id: EvalSpec = field(default_factory=lambda: EvalSpec(suites=["synth-math"], limit=50, max_new_tokens=160))
    ood: EvalSpec = field(default_factory=lambda: EvalSpec(loglik=True))
    probe: bool = True
    rotation: bool = True
    drift_data: str | None = None  # default: the ID training data
    drift_limit: int = 32
    eval_dir: str | None = None  # official evaluation files (else RPSFT_EVAL_DIR / ../shared/data/rpsft-eval)


SECTIONS = {"id": EvalSpec, "ood": EvalSpec}


def load_compare_config(path: str | Path | None, overrides: list[str] | None = None) -> CompareConfig:
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"compare config {p} does not exist (see configs/compare-demo.yaml)")
        data = yaml.safe_load(p.read_text()) or {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set id.limit=20")
        key, text = item.split("=", 1)
        node = data
        *parents, leaf = key.strip().split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = _parse_scalar(text)
    valid = CompareConfig.__dataclass_fields__
    kwargs = {}
    for k, v in data.items():
        if k not in valid:
            raise ConfigError(f"unknown compare key {k!r}; valid: {', '.join(valid)}")
        if k in SECTIONS:
            if not isinstance(v, dict):
                raise ConfigError(f"{k}: expected a mapping")
            bad = set(v) - set(EvalSpec.__dataclass_fields__)
            if bad:
                raise ConfigError(f"{k}: unknown keys {sorted(bad)}; valid: {', '.join(EvalSpec.__dataclass_fields__)}")
            v = EvalSpec(**{**v, "suites": _as_list(v.get("suites", [])), "optional": _as_list(v.get("optional", []))})
        kwargs[k] = v
    cfg = CompareConfig(**kwargs)
    cfg.methods = [m if isinstance(m, dict) else {"name": str(m)} for m in cfg.methods]
    for m in cfg.methods:
        if "name" not in m:
            raise ConfigError(f"methods: every entry needs a name, got {m}")
    cfg.sweep = [] if cfg.sweep is None else cfg.sweep if isinstance(cfg.sweep, list) else [cfg.sweep]
    for sw in cfg.sweep:
        if not isinstance(sw, dict) or "method" not in sw:
            raise ConfigError(f"sweep: every grid is a mapping with a 'method', e.g. {{method: rpsft, lam: [1, 10]}};"
                              f" got {sw!r}")
        sweep_axes(sw)  # unknown keys fail here, before anything runs
    cfg.eval_steps = _steps(cfg.eval_steps, "eval_steps")
    for m in [*cfg.methods, *cfg.sweep]:
        if "eval_steps" in m:
            _steps(m["eval_steps"], f"eval_steps of {m.get('name', m.get('method'))}")
    if cfg.forgetting not in FORGETTING:
        raise ConfigError(f"forgetting: {cfg.forgetting!r} is not a measure; use one of {', '.join(FORGETTING)}")
    if cfg.bootstrap < 100:
        raise ConfigError(f"bootstrap: {cfg.bootstrap} resamples is too few for a 95 % interval; use >= 1000")
    return cfg


FORGETTING = ("probe_kl", "probe_nll_delta", "ood_drop")
SWEEP_META = ("method", "set", "label", "eval_steps")
SHORT = {"anchor.rank": "k", "anchor.lam": "lam", "anchor.period": "s", "train.seed": "seed", "train.lr": "lr",
         "train.max_steps": "steps"}


def _steps(v: Any, where: str) -> list[int]:
    v = [v] if isinstance(v, int) else list(v or [])
    if any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v):
        raise ConfigError(f"{where}: expected optimizer steps >= 1, e.g. [10, 20, 40]; got {v}")
    return sorted(set(v))


def sweep_key(key: str) -> str:
    """The config key a sweep axis names: an alias (rank, lam, period, seed, ...), a full dotted key, or a bare
    field of the anchor or train section (``budget`` -> ``anchor.budget``); unknown ones fail with the closest."""
    from .config import ALIASES, _unknown, all_keys

    keys = all_keys()
    real = {"ranks": "anchor.rank"}.get(key) or ALIASES.get(key, key)
    for cand in (real, f"anchor.{key}", f"train.{key}"):
        if cand in keys:
            return cand
    raise ConfigError(f"sweep: {_unknown(key)}")


def sweep_axes(sw: dict) -> list[tuple[str, list]]:
    """[(config key, values), ...] of one sweep entry, in the order written."""
    axes = []
    for key, vals in sw.items():
        if key in SWEEP_META:
            continue
        vals = vals if isinstance(vals, list) else [vals]
        if not vals:
            raise ConfigError(f"sweep {key}: the list of values is empty")
        axes.append((sweep_key(str(key)), vals))
    if not axes:
        raise ConfigError(f"sweep over {sw.get('method')!r} names nothing to sweep; e.g. lam: [1, 10, 100]")
    return axes


def _value_name(v: Any) -> str:
    if isinstance(v, str) and v.startswith("@"):
        return Path(v[1:]).stem  # "@results/energy/ranks.json" -> "ranks"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _as_list(v: Any) -> list[str]:
    return [s.strip() for s in v.split(",")] if isinstance(v, str) else list(v or [])


@dataclass
class Run:
    name: str
    overrides: list[str]
    k: Any = None
    aliases: list[str] = field(default_factory=list)  # other requested names with the same resolved config
    family: str | None = None  # the curve this run's points belong to in the frontier plot
    eval_steps: list[int] = field(default_factory=list)
    seed: int | None = None


def plan_runs(cfg: CompareConfig) -> list[Run]:
    """One run per method, plus one per swept k; runs with identical resolved configs are trained once."""
    import itertools

    runs = [Run(m.get("label", m["name"]), [f"method={m['name']}", *_as_list(m.get("set", []))],
                family=m.get("family", m.get("label")), eval_steps=_steps(m.get("eval_steps", cfg.eval_steps), "eval_steps"))
            for m in cfg.methods]
    for sw in cfg.sweep:
        axes = sweep_axes(sw)
        for combo in itertools.product(*[vals for _, vals in axes]):
            parts = "-".join(f"{SHORT.get(k, k.split('.')[-1])}{_value_name(v)}" for (k, _), v in zip(axes, combo))
            runs.append(Run(f"{sw.get('label', sw['method'])}-{parts}",
                            [f"method={sw['method']}", *_as_list(sw.get("set", [])),
                             *[f"{k}={v}" for (k, _), v in zip(axes, combo)]],
                            family=sw.get("label"), eval_steps=_steps(sw.get("eval_steps", cfg.eval_steps), "eval_steps")))
    seen: dict[str, Run] = {}
    out = []
    for r in runs:
        train_cfg = _train_config(cfg, r, Path("/dev/null"))
        d = to_dict(train_cfg)
        d.pop("output_dir")
        key = json.dumps(d, sort_keys=True, default=str)
        r.k = anchored_rank(train_cfg)
        r.seed = train_cfg.train.seed
        if r.family is None:  # one curve per method and anchored rank: "sft", "l2init", "rpsft k=128", "rpsft k=ranks"
            r.family = train_cfg.method + ("" if r.k in (0, "full") else f" k={_value_name(r.k)}")
        if key in seen:
            seen[key].aliases.append(r.name)
            seen[key].eval_steps = sorted(set(seen[key].eval_steps) | set(r.eval_steps))
            continue
        seen[key] = r
        out.append(r)
    return out


def anchored_rank(train_cfg) -> Any:
    """The k a run anchors: 0 without the anchor (sft, dft, iw, lora), "full" for L2-Init, else anchor.rank."""
    from .methods import get_method

    method = get_method(train_cfg.method)
    if not method.anchor_enabled(train_cfg.anchor.enabled):
        return 0
    return "full" if method.anchor == "full" else train_cfg.anchor.rank


def _train_config(cfg: CompareConfig, run: Run, root: Path):
    return load_config(cfg.train_config, [*cfg.train_set, *run.overrides, f"output_dir={root / 'runs' / run.name}"])


def _stored(path: Path, key: Any) -> tuple[dict | None, bool]:
    """(the result stored at ``path`` if it was made from these inputs, whether one from other inputs is there).
    Keys compare as they read back from JSON (tuples become lists, paths strings)."""
    if not path.is_file():
        return None, False
    old = json.loads(path.read_text())
    if old.get("stage_key") == json.loads(json.dumps(key, default=str)):
        return old, False
    return None, True


def _stage(path: Path, fn: Callable[[], dict], log: Callable[[str], None], what: str, key: Any = None) -> dict:
    """Run ``fn`` unless ``path`` already holds its result for the same inputs (``key``); write it atomically."""
    key = json.loads(json.dumps(key, default=str))
    old, stale = _stored(path, key)
    if old is not None:
        log(f"[dim]skip {what}: {path} is up to date[/dim]")
        return old
    if stale:
        log(f"[yellow]{what}: inputs changed since {path} was written; redoing it[/yellow]")
    t = time.perf_counter()
    log(f"[bold]{what}[/bold] ...")
    result = fn()
    result = {**result, "stage_seconds": round(time.perf_counter() - t, 1), "stage_key": key}
    io.write_json(path, result)
    log(f"  {what} done in {result['stage_seconds']:.0f}s")
    return result


def eval_model_path(run_dir: Path) -> str:
    """What to evaluate for a run: a merged full checkpoint when the method wrote one (LoRA), else the run dir."""
    merged = run_dir / "merged"
    return str(merged if (merged / "config.json").is_file() else run_dir)


def run_compare(cfg: CompareConfig, log: Callable[[str], None] = print) -> dict:
    from .train import latest_checkpoint, train

    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    io.write_text(root / "compare.yaml", yaml.safe_dump(_cfg_dict(cfg), sort_keys=False))
    runs = plan_runs(cfg)
    base_cfg = load_config(cfg.train_config, cfg.train_set)
    base_model = base_cfg.model.name
    for r in runs:  # a rank map that is not there fails now, not after the runs before it have trained
        rank = _train_config(cfg, r, root).anchor.rank
        if isinstance(rank, str) and rank.startswith("@") and not Path(rank[1:]).expanduser().is_file():
            raise ConfigError(f"run {r.name}: rank map {rank[1:]} does not exist; write it first with "
                              f"`rpsft analyze energy ... --out {Path(rank[1:]).parent}`")
    if cfg.id.teacher_forced:  # its data file too: a missing one fails now, not after hours of training
        from .frontier import teacher_forced_data

        try:
            teacher_forced_data(cfg.id.teacher_forced, cfg.eval_dir)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"id.teacher_forced: {e}") from None
    log(f"compare: {len(runs)} training runs ({', '.join(r.name for r in runs)}) on {base_model}")

    results: dict[str, dict] = {}
    models = {"base": base_model}  # final weights of every run (rotation and drift are measured on these)
    points = {"base": base_model}  # everything evaluated: the runs' intermediate checkpoints too
    run_keys = {"base": None}
    for r in runs:
        tcfg = _train_config(cfg, r, root)
        run_dir = Path(tcfg.output_dir)

        key = {k: v for k, v in to_dict(tcfg).items() if k != "output_dir"}
        stage_file = root / "stages" / r.name / "train.json"
        # A finished run whose config has changed since is stale: start it over. An unfinished one resumes from
        # its last checkpoint (train's resume guard refuses, with the diff, if its config was changed meanwhile).
        steps = [s for s in r.eval_steps if tcfg.train.max_steps <= 0 or s < tcfg.train.max_steps]
        key = {**key, "eval_steps": steps}
        stale = _stored(stage_file, key)[1]

        def do_train(tcfg=tcfg, run_dir=run_dir, stale=stale, steps=steps):
            from .frontier import SavePoints

            resume = "latest" if not stale and latest_checkpoint(run_dir) is not None else None
            out = train(tcfg, resume=resume, overwrite=resume is None, progress=True,
                        extra_callbacks=[SavePoints(steps, run_dir / "points")] if steps else None)
            if not cfg.keep_checkpoints:  # finished: the final weights are in run_dir; optimizer states only fill the disk
                import shutil

                for ck in run_dir.glob("checkpoint-*"):
                    shutil.rmtree(ck)
            return out

        tr = _stage(stage_file, do_train, log, f"train {r.name}", key=key)
        common = {"k": r.k, "method": tcfg.method, "family": r.family, "seed": r.seed, "run": r.name,
                  "aliases": r.aliases}
        for s in steps:
            point = run_dir / "points" / f"step-{s}"
            if s < tr["global_step"] and point.is_dir():
                name = f"{r.name}@{s}"
                results[name] = {**common, "step": s, "final": False}
                points[name] = str(point)
                run_keys[name] = key
        results[r.name] = {"train": tr, **common, "step": tr["global_step"], "final": True}
        models[r.name] = points[r.name] = eval_model_path(run_dir)
        run_keys[r.name] = key

    from .frontier import probe_stage, teacher_forced_stage

    for name, model in points.items():
        res = results.setdefault(name, {"k": None, "method": "base", "family": "base", "step": 0, "final": True})
        stage_dir = root / "stages" / name
        # the run's training config is part of every evaluation's key: a retrained run (same path) is re-evaluated
        tkey = run_keys.get(name)
        if cfg.id.suites or cfg.id.optional:
            res["id"] = _stage(stage_dir / "eval-id.json", lambda m=model, n=name: _eval(cfg, cfg.id, m, root, n, "id"),
                               log, f"eval-id {name}", key=[model, cfg.id, tkey])
        if cfg.id.teacher_forced:
            res["id_tf"] = _stage(stage_dir / "eval-id-tf.json",
                                  lambda m=model: teacher_forced_stage(cfg, m), log, f"eval-id-tf {name}",
                                  key=[model, cfg.id.teacher_forced, cfg.id.limit, tkey])
        # log-likelihood multiple choice on final points only: it moves little between checkpoints and costs most
        if (cfg.ood.suites or cfg.ood.optional) and res.get("final"):
            res["ood"] = _stage(stage_dir / "eval-ood.json",
                                lambda m=model, n=name: _eval(cfg, cfg.ood, m, root, n, "ood"), log, f"eval-ood {name}",
                                key=[model, cfg.ood, tkey])
        if cfg.probe and name != "base":
            res["probe"] = _stage(stage_dir / "probe.json", lambda m=model: probe_stage(
                cfg, base_model, m, root / "stages" / "base" if cfg.probe_cache else None),
                                  log, f"probe {name}", key=[base_model, model, cfg.probe_prompts, cfg.probe_max_new_tokens, cfg.probe_cache, tkey])
    tuned = [n for n in models if n != "base"]
    analysis = {}
    if cfg.rotation and tuned:
        from .analysis.plots import plot_rotation
        from .analysis.rotation import run_rotation

        def do_rotation():
            rep = run_rotation(base_model, [models[n] for n in tuned], labels=tuned)
            plot_rotation(rep, root / "rotation.png")
            return rep

        analysis["rotation"] = _stage(root / "stages" / "rotation.json", do_rotation, log, "rotation analysis",
                                      key=[base_model, [models[n] for n in tuned]])
    if cfg.drift_limit > 0 and tuned:
        from .analysis.drift import run_drift
        from .analysis.plots import plot_drift

        def do_drift():
            rep = run_drift(base_model, [models[n] for n in tuned], cfg.drift_data or base_cfg.data.train,
                            limit=cfg.drift_limit, labels=tuned)
            plot_drift(rep, root / "drift.png")
            return rep

        analysis["drift"] = _stage(root / "stages" / "drift.json", do_drift, log, "drift analysis",
                                   key=[base_model, [models[n] for n in tuned], cfg.drift_data, cfg.drift_limit])

    summary = build_summary(cfg, results, analysis, points)
    from .frontier import render_frontier, write_frontier

    summary["frontier"] = write_frontier(root, results, cfg.forgetting, cfg.bootstrap)
    io.write_json(root / "summary.json", summary)
    io.write_text(root / "table.md", render_table(summary) + "\n" + render_frontier(summary["frontier"], cfg.forgetting))
    finals = {**summary, "rows": [r for r in summary["rows"] if r.get("final", True)]}
    plot_tradeoff(finals, root / "tradeoff.png")
    for sw in cfg.sweep:
        if [k for k, _ in sweep_axes(sw)] == ["anchor.rank"]:
            plot_rank_sweep(finals, sw["method"], root / "rank_sweep.png")
    log(f"wrote {root / 'summary.json'}, {root / 'table.md'}, {root / 'frontier.json'}, {root / 'frontier.png'}, "
        f"{root / 'tradeoff.png'}")
    return summary


def _strip(probe: dict) -> dict:
    return {k: v for k, v in probe.items() if k != "per_prompt"}


def present_suites(optional: list[str], eval_dir: str | None) -> tuple[list[str], list[str]]:
    """(optional suites whose data files exist, those skipped because a file is absent)."""
    from .eval.suites import expand_suites, source_path

    run, skipped = [], []
    for name in optional:
        try:
            for b in expand_suites(name)[0]:
                source_path(b, eval_dir)
        except (FileNotFoundError, ValueError):
            skipped.append(name)
            continue
        run.append(name)
    return run, skipped


def _eval(cfg: CompareConfig, spec: EvalSpec, model: str, root: Path, name: str, part: str) -> dict:
    from .eval import run_eval

    present, absent = present_suites(spec.optional, cfg.eval_dir)
    suites = [*spec.suites, *present]
    if not suites:
        return {"benchmarks": {}, "groups": {}, "skipped": absent}
    out = root / "eval" / name / part
    if _stored(root / "stages" / name / f"eval-{part}.json", None)[1] and out.is_dir():
        import shutil

        shutil.rmtree(out)  # samples of the model this point held before it was retrained: stale, not resumable
    s = run_eval(model, suites, k=spec.k, limit=spec.limit, greedy=spec.greedy, loglik=spec.loglik,
                 max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size, eval_dir=cfg.eval_dir,
                 out_dir=out, mc_protocol=spec.mc_protocol)
    return {"benchmarks": s["benchmarks"], "groups": s.get("groups", {}), "wall_s": s.get("wall_s"),
            "samples": s.get("samples"), "skipped": [*absent, *(s.get("skipped") or [])]}


def _cfg_dict(cfg: CompareConfig) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)


def _score(bench: dict) -> float | None:
    for key in ("avg_at_k", "accuracy"):
        if key in bench:
            return float(bench[key])
    return None


def build_summary(cfg: CompareConfig, results: dict, analysis: dict, models: dict) -> dict:
    """Per run: ID / OOD scores (+ Δ vs base), probe, rotation and drift figures, and cost."""
    rot = {c["label"]: c["layer_mean"]["u_mean_deg"] for c in (analysis.get("rotation") or {}).get("checkpoints", [])}
    drift = {m["label"]: m["centroid_distance"] for m in (analysis.get("drift") or {}).get("models", [])}
    rows = []
    for name, res in results.items():
        row = {"run": name, "method": res.get("method"), "k": res.get("k"), "model": models.get(name),
               "family": res.get("family"), "step": res.get("step"), "seed": res.get("seed"),
               "final": res.get("final", True)}
        for part in ("id", "ood"):
            benches = (res.get(part) or {}).get("benchmarks", {})
            for b, v in benches.items():
                row[f"{part}:{b}"] = _score(v)
                if "pass_at_k" in v:
                    row[f"{part}:{b}:pass@k"] = float(v["pass_at_k"])
            vals = [_score(v) for v in benches.values() if _score(v) is not None]
            if part == "id" and res.get("id_tf"):  # teacher-forced exact match is one more ID score
                row["id:tf-exact"] = res["id_tf"]["accuracy"]
                vals.append(res["id_tf"]["accuracy"])
            row[f"{part}_avg"] = sum(vals) / len(vals) if vals else None
        if "probe" in res:
            row["probe_kl"] = res["probe"]["kl"]
            row["probe_nll_delta"] = res["probe"]["nll_delta"]
        elif name == "base":
            row["probe_kl"], row["probe_nll_delta"] = 0.0, 0.0
        row["rotation_deg"] = rot.get(name, 0.0 if name == "base" else None)
        row["drift"] = drift.get(name, 0.0 if name == "base" else None)
        tr = res.get("train")
        if tr:
            tc = tr.get("config", {}).get("train", {})
            samples = tr["global_step"] * tc.get("batch_size", 1) * tc.get("grad_accum", 1)
            row["cost"] = {"train_seconds": tr["train_seconds"], "steps": tr["global_step"],
                           "steps_per_s": tr["global_step"] / max(tr["train_seconds"], 1e-9),
                           "samples_per_s": samples / max(tr["train_seconds"], 1e-9),
                           "anchor_mib": (tr.get("anchor") or {}).get("nbytes", 0) / 2**20,
                           "mean_train_loss": tr.get("train_loss")}
        rows.append(row)
    rows.sort(key=lambda r: r["run"] != "base")  # the paper's layout: the base row first, then the runs in order
    base = next((r for r in rows if r["run"] == "base"), None)
    if base:
        for r in rows:
            r["delta"] = {k: (r[k] - base[k]) for k, v in r.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("k", "step", "seed")
                          and isinstance(base.get(k), (int, float)) and r is not base}
    return {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "config": _cfg_dict(cfg), "rows": rows}


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{100 * v:.1f}" if pct else f"{v:.4g}"
    return str(v)


def render_table(summary: dict) -> str:
    """The paper's layout: base row, then each run with Δ vs base; ID and OOD columns with their averages."""
    rows = summary["rows"]
    score_cols = sorted({k for r in rows for k in r if (k.startswith("id:") or k.startswith("ood:"))},
                        key=lambda c: (not c.startswith("id:"), c))
    # Pass@k is a column of its own only where it says something Avg@k does not (k > 1 somewhere)
    score_cols = [c for c in score_cols if not c.endswith(":pass@k")
                  or any(r.get(c) != r.get(c.removesuffix(":pass@k")) for r in rows)]
    cols = ([c for c in score_cols if c.startswith("id:")] + ["id_avg"]
            + [c for c in score_cols if c.startswith("ood:")] + ["ood_avg", "probe_kl", "probe_nll_delta",
                                                                   "rotation_deg", "drift"])
    pct = {c for c in cols if c.startswith(("id", "ood"))}
    head = ["run", "k", *cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], _fmt(r.get("k"))]
        for c in cols:
            cell = _fmt(r.get(c), c in pct)
            d = (r.get("delta") or {}).get(c)
            if d is not None and r["run"] != "base":
                cell += f" ({'+' if d >= 0 else ''}{_fmt(d, c in pct)})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    proto = ((summary.get("config") or {}).get("ood") or {}).get("mc_protocol", "paper")
    lines += ["", "Scores in % (ID: Avg@k; Pass@k has its own column where it differs, i.e. k > 1; OOD: "
              f"log-likelihood MC accuracy, acc_norm, {proto} protocol); (Δ vs base). "
              "probe_kl: mean per-token KL(base‖tuned) on the shipped general prompts (lower = less forgetting); "
              "rotation_deg: mean principal angle of the top-K left singular subspaces vs base; drift: centroid "
              "distance of pooled hidden states.", "", "| run | train s | steps/s | samples/s | anchor MiB | "
              "mean train loss |", "|---|---|---|---|---|---|"]
    for r in rows:
        c = r.get("cost")
        if c:
            lines.append(f"| {r['run']} | {c['train_seconds']:.0f} | {c['steps_per_s']:.3f} | "
                         f"{c['samples_per_s']:.2f} | {c['anchor_mib']:.1f} | {_fmt(c['mean_train_loss'])} |")
    lines += ["", "mean train loss: the trainer's loss averaged over all steps (the task loss; DFT's is its "
              "probability-weighted loss, not comparable with the others)."]
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tradeoff(summary: dict, path: str | Path) -> None:
    """Fig. 4's shape: ID score against OOD score, one point per run; beside it ID against the forgetting probe
    (−KL, right = less forgetting) when the probe ran — on a small model the probe resolves what a few dozen
    multiple-choice questions cannot. Runs that land on the same point share one label."""
    plt = _plt()
    rows = summary["rows"]
    panels = []
    if any(r.get("ood_avg") is not None for r in rows):
        panels.append(("OOD average (%)", lambda r: None if r.get("ood_avg") is None else 100 * r["ood_avg"]))
    if any(r.get("probe_kl") is not None for r in rows):
        panels.append(("− probe KL(base‖tuned)  (right = less forgetting)",
                       lambda r: None if r.get("probe_kl") is None else -r["probe_kl"]))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (xlabel, xof) in zip(axes[0], panels):
        points: dict[tuple[float, float], list[str]] = {}
        for r in rows:
            x, y = xof(r), r.get("id_avg")
            if x is None or y is None:
                continue
            points.setdefault((round(x, 9), round(100 * y, 9)), []).append(r["run"])
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        span = (max(xs) - min(xs) or 1.0, max(ys) - min(ys) or 1.0)
        placed: list[tuple[float, float]] = []
        for (x, y), names in points.items():
            base = "base" in names
            ax.scatter([x], [y], s=90 if base else 50, marker="*" if base else "o")
            # points closer than 3 % of the spread would print their labels over each other: stack them
            near = sum(abs(x - px) < 0.03 * span[0] and abs(y - py) < 0.03 * span[1] for px, py in placed)
            placed.append((x, y))
            ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(5, 4 + 11 * near), fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ID average (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("ID / OOD trade-off")
    fig.tight_layout()
    with io.atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def plot_rank_sweep(summary: dict, method: str, path: str | Path) -> None:
    """Fig. 3's shape: ID score, OOD score and probe KL against k for the swept method, with its two ends when
    they ran: k = 0 (plain SFT) and k = min(m, n) (L2-Init). The k axis is ordinal (each run one tick): "full" is
    a different k per matrix shape, so it has no single position on a numeric axis."""
    plt = _plt()
    swept = sorted([r for r in summary["rows"] if r.get("method") == method and isinstance(r.get("k"), int)],
                   key=lambda r: r["k"])
    if not swept:
        return
    sft = [r for r in summary["rows"] if r.get("method") == "sft" and r.get("k") == 0][:1]
    full = [r for r in summary["rows"] if r.get("k") == "full"][:1]
    rows = (sft if swept[0]["k"] > 0 else []) + swept + full
    labels = [("0 (SFT)" if r.get("method") == "sft" else "full (L2-Init)" if r.get("k") == "full" else str(r["k"]))
              for r in rows]
    xs = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for key, label in (("id_avg", "ID avg (%)"), ("ood_avg", "OOD avg (%)")):
        ys = [100 * r[key] if r.get(key) is not None else None for r in rows]
        if any(y is not None for y in ys):
            ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label=label)
    ax.set_xticks(xs, labels)
    ax.set_xlabel("k (anchored rank)")
    ax.set_ylabel("score (%)")
    ax2 = ax.twinx()
    kl = [r.get("probe_kl") for r in rows]
    if any(v is not None for v in kl):
        ax2.plot(xs, [float("nan") if v is None else v for v in kl], color="gray", linestyle="--", marker="s",
                 label="probe KL")
        ax2.set_ylabel("probe KL (lower = less forgetting)")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="best")
    ax.set_title(f"rank sweep: {method}")
    fig.tight_layout()
    with io.atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
