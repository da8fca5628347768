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


@dataclass
class CompareConfig:
    output_dir: str = "results/compare"
    train_config: str = "configs/demo.yaml"
    train_set: list[str] = field(default_factory=list)  # overrides for every run
    methods: list[dict] = field(default_factory=lambda: [{"name": "sft"}, {"name": "rpsft"}])
    sweep: dict | None = None  # {"method": "rpsft", "ranks": [16, 64, 128], "set": [...]}
    id: EvalSpec = field(default_factory=lambda: EvalSpec(suites=["synth-math"], limit=50, max_new_tokens=160))
    ood: EvalSpec = field(default_factory=lambda: EvalSpec(loglik=True))
    probe: bool = True
    rotation: bool = True
    drift_data: str | None = None  # default: the ID training data
    drift_limit: int = 32
    eval_dir: str | None = None  # official evaluation files (else RPSFT_EVAL_DIR / ~/.cache/rpsft/eval)


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
    if cfg.sweep is not None and ("method" not in cfg.sweep or not cfg.sweep.get("ranks")):
        raise ConfigError("sweep needs 'method' and a non-empty 'ranks' list")
    return cfg


def _as_list(v: Any) -> list[str]:
    return [s.strip() for s in v.split(",")] if isinstance(v, str) else list(v or [])


@dataclass
class Run:
    name: str
    overrides: list[str]
    k: Any = None
    aliases: list[str] = field(default_factory=list)  # other requested names with the same resolved config


def plan_runs(cfg: CompareConfig) -> list[Run]:
    """One run per method, plus one per swept k; runs with identical resolved configs are trained once."""
    runs = [Run(m.get("label", m["name"]), [f"method={m['name']}", *_as_list(m.get("set", []))])
            for m in cfg.methods]
    if cfg.sweep:
        for k in cfg.sweep["ranks"]:
            runs.append(Run(f"{cfg.sweep['method']}-k{k}", [f"method={cfg.sweep['method']}", f"anchor.rank={k}",
                                                             *_as_list(cfg.sweep.get("set", []))], k=k))
    seen: dict[str, Run] = {}
    out = []
    for r in runs:
        train_cfg = _train_config(cfg, r, Path("/dev/null"))
        d = to_dict(train_cfg)
        d.pop("output_dir")
        key = json.dumps(d, sort_keys=True, default=str)
        r.k = r.k if r.k is not None else anchored_rank(train_cfg)
        if key in seen:
            seen[key].aliases.append(r.name)
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
    log(f"compare: {len(runs)} training runs ({', '.join(r.name for r in runs)}) on {base_model}")

    results: dict[str, dict] = {}
    models = {"base": base_model}
    for r in runs:
        tcfg = _train_config(cfg, r, root)
        run_dir = Path(tcfg.output_dir)

        key = {k: v for k, v in to_dict(tcfg).items() if k != "output_dir"}
        stage_file = root / "stages" / r.name / "train.json"
        # A finished run whose config has changed since is stale: start it over. An unfinished one resumes from
        # its last checkpoint (train's resume guard refuses, with the diff, if its config was changed meanwhile).
        stale = _stored(stage_file, key)[1]

        def do_train(tcfg=tcfg, run_dir=run_dir, stale=stale):
            resume = "latest" if not stale and latest_checkpoint(run_dir) is not None else None
            return train(tcfg, resume=resume, overwrite=resume is None, progress=True)

        results[r.name] = {"train": _stage(stage_file, do_train, log,
                                           f"train {r.name}", key=key), "k": r.k, "method": tcfg.method}
        models[r.name] = eval_model_path(run_dir)

    for name, model in models.items():
        res = results.setdefault(name, {"k": None, "method": "base"})
        stage_dir = root / "stages" / name
        if cfg.id.suites or cfg.id.optional:
            res["id"] = _stage(stage_dir / "eval-id.json", lambda m=model, n=name: _eval(cfg, cfg.id, m, root, n, "id"),
                               log, f"eval-id {name}", key=[model, cfg.id])
        if cfg.ood.suites or cfg.ood.optional:
            res["ood"] = _stage(stage_dir / "eval-ood.json",
                                lambda m=model, n=name: _eval(cfg, cfg.ood, m, root, n, "ood"), log, f"eval-ood {name}",
                                key=[model, cfg.ood])
        if cfg.probe and name != "base":
            from .eval.probe import forgetting_probe

            res["probe"] = _stage(stage_dir / "probe.json", lambda m=model: _strip(forgetting_probe(base_model, m)),
                                  log, f"probe {name}", key=[base_model, model])
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

    summary = build_summary(cfg, results, analysis, models)
    io.write_json(root / "summary.json", summary)
    io.write_text(root / "table.md", render_table(summary))
    plot_tradeoff(summary, root / "tradeoff.png")
    if cfg.sweep:
        plot_rank_sweep(summary, cfg.sweep["method"], root / "rank_sweep.png")
    log(f"wrote {root / 'summary.json'}, {root / 'table.md'}, {root / 'tradeoff.png'}")
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
    s = run_eval(model, suites, k=spec.k, limit=spec.limit, greedy=spec.greedy, loglik=spec.loglik,
                 max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size, eval_dir=cfg.eval_dir,
                 out_dir=root / "eval" / name / part)
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
        row = {"run": name, "method": res.get("method"), "k": res.get("k"), "model": models.get(name)}
        for part in ("id", "ood"):
            benches = (res.get(part) or {}).get("benchmarks", {})
            for b, v in benches.items():
                row[f"{part}:{b}"] = _score(v)
                if "pass_at_k" in v:
                    row[f"{part}:{b}:pass@k"] = float(v["pass_at_k"])
            vals = [_score(v) for v in benches.values() if _score(v) is not None]
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
                          if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("k",)
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
    lines += ["", "Scores in % (ID: Avg@k; Pass@k has its own column where it differs, i.e. k > 1; OOD: "
              "log-likelihood MC accuracy); (Δ vs base). "
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
