"""The trade-off frontier of ``rpsft compare``: checkpoints as points, paired intervals, Pareto front and plot.

Every evaluated model (the base, each run's final weights, and its weights at ``eval_steps``) is a point
(ID gain, forgetting). SFT evaluated at several steps is SFT's own early-stopping curve: fewer steps learn less
and forget less, so a method only helps if its point lies *outside* that curve, not merely above SFT's last
checkpoint. Every Δ carries a paired bootstrap 95 % interval over the items all models share (ID problems, probe
prompts, OOD questions; :mod:`rpsft.compare.stats`); runs that differ only in seed are drawn as separate points of
the same family (spread, not averaged away).
"""

from __future__ import annotations

from pathlib import Path

from .. import fileio
from .report import pyplot, save_png
from .stats import mean_interval, paired_delta, pareto_front


def id_items(res: dict) -> dict[str, float]:
    """Per ID item (keyed across all ID sources): its score in [0, 1] (mean over samples when k > 1)."""
    out: dict[str, float] = {}
    for key, (b, i), v in _sample_scores(res.get("id")):
        out[f"gen:{b}:{i}"] = v
    for j, it in enumerate((res.get("id_tf") or {}).get("items", [])):
        out[f"tf:{j}:{it['id']}"] = float(it["correct"])
    return out


def ood_items(res: dict) -> dict[str, float]:
    return {f"{b}:{i}": v for _, (b, i), v in _sample_scores(res.get("ood"))}


def _sample_scores(stage: dict | None):
    if not stage or not stage.get("samples") or not Path(stage["samples"]).is_file():
        return
    acc: dict[tuple, list[float]] = {}
    for row in fileio.read_jsonl(stage["samples"]):
        if row["benchmark"] in stage.get("benchmarks", {}):
            acc.setdefault((row["benchmark"], row["index"]), []).append(float(bool(row["correct"])))
    for k, v in acc.items():
        yield k, k, sum(v) / len(v)


def probe_items(res: dict) -> dict[str, tuple[float, float, float]]:
    """Per probe prompt: (KL, NLL delta, answer tokens)."""
    return {p["id"]: (p["kl"], p["nll_tuned"] - p["nll_base"], p["tokens"])
            for p in (res.get("probe") or {}).get("per_prompt", [])}


def _delta(a: dict[str, float], b: dict[str, float], seed: int, n: int) -> dict | None:
    keys = sorted(set(a) & set(b))
    if not keys:
        return None
    return paired_delta([a[k] for k in keys], [b[k] for k in keys], seed=seed, n_resamples=n)


def _probe_delta(a: dict, b: dict | None, which: int, seed: int, n: int) -> dict | None:
    """Token-weighted probe quantity (``which``: 0 KL, 1 NLL delta) of ``a``, or its difference from ``b``."""
    keys = sorted(set(a) & set(b)) if b is not None else sorted(a)
    if not keys:
        return None
    w = [a[k][2] for k in keys]
    if b is None:
        return mean_interval([a[k][which] for k in keys], weights=w, seed=seed, n_resamples=n)
    return paired_delta([a[k][which] for k in keys], [b[k][which] for k in keys], weights=w, seed=seed, n_resamples=n)


def frontier_points(results: dict[str, dict], forgetting: str = "probe_kl", n_resamples: int = 2000) -> list[dict]:
    """One row per evaluated point: ID gain and forgetting with their intervals vs base, the same against SFT at
    the same step, and whether the point is on the Pareto front (higher ID gain, lower forgetting)."""
    base = results.get("base", {})
    b_id, b_ood = id_items(base), ood_items(base)
    sft = {r.get("step"): name for name, r in results.items()
           if r.get("family") == "sft" and r.get("seed") == _first_seed(results, "sft")}
    rows = []
    for i, (name, r) in enumerate(results.items()):
        row = {"point": name, "run": r.get("run", name), "family": r.get("family"), "method": r.get("method"),
               "k": r.get("k"), "step": r.get("step"), "seed": r.get("seed"), "final": r.get("final", True)}
        mine, probe = id_items(r), probe_items(r)
        row["id_gain"] = _delta(mine, b_id, i, n_resamples)
        row["ood_delta"] = _delta(ood_items(r), b_ood, i, n_resamples) if name != "base" else None
        if name == "base":
            zero = {"delta": 0.0, "lo": 0.0, "hi": 0.0, "n": len(b_id)}
            row["id_gain"] = zero if b_id else None
            row["probe_kl"] = row["probe_nll_delta"] = {**zero, "n": 0}
        else:
            row["probe_kl"] = _probe_delta(probe, None, 0, i, n_resamples) if probe else None
            row["probe_nll_delta"] = _probe_delta(probe, None, 1, i, n_resamples) if probe else None
        ref = sft.get(r.get("step"))
        if ref is not None and ref != name and name != "base":
            other = results[ref]
            row["vs_sft"] = {"point": ref,
                             "id": _delta(mine, id_items(other), i, n_resamples),
                             "probe_kl": _probe_delta(probe, probe_items(other), 0, i, n_resamples) if probe else None,
                             "probe_nll_delta": _probe_delta(probe, probe_items(other), 1, i, n_resamples)
                             if probe else None}
        row["forgetting"] = _forgetting(row, forgetting)
        rows.append(row)
    usable = [j for j, r in enumerate(rows) if r["id_gain"] is not None and r["forgetting"] is not None]
    front = pareto_front([(rows[j]["id_gain"]["delta"], rows[j]["forgetting"]["delta"]) for j in usable])
    on = {usable[j] for j in front}
    for j, r in enumerate(rows):
        r["pareto"] = j in on
    return rows


def _first_seed(results: dict, family: str):
    seeds = [r.get("seed") for r in results.values() if r.get("family") == family]
    return seeds[0] if seeds else None


def _forgetting(row: dict, measure: str) -> dict | None:
    """The frontier's y: larger = more forgetting. OOD accuracy drop is the negated Δ."""
    if measure == "ood_drop":
        d = row.get("ood_delta")
        return None if d is None else {"delta": -d["delta"], "lo": -d["hi"], "hi": -d["lo"], "n": d["n"]}
    return row.get(measure)


# ----------------------------------------------------------------------------------------------- output


def _ci(d: dict | None, pct: bool = False) -> str:
    if d is None:
        return "–"
    f = (lambda v: f"{100 * v:+.1f}") if pct else (lambda v: f"{v:+.3g}")
    return f"{f(d['delta'])} [{f(d['lo'])}, {f(d['hi'])}]"


FORGETTING_LABEL = {"probe_kl": "probe KL(base‖tuned)", "probe_nll_delta": "Δ NLL of the base's answers",
                    "ood_drop": "OOD accuracy drop (points)"}


def render_frontier(rows: list[dict], forgetting: str) -> str:
    lines = ["## Trade-off frontier", "",
             f"| point | family | step | seed | ID gain (pts) | {FORGETTING_LABEL[forgetting]} | Δ NLL | ΔOOD (pts) "
             "| ΔID vs SFT@step | ΔKL vs SFT@step | Pareto |", "|" + "---|" * 11]
    pct_y = forgetting == "ood_drop"
    for r in sorted(rows, key=lambda r: (r["family"] != "base", str(r["family"]), r["step"] or 0, r["seed"] or 0)):
        vs = r.get("vs_sft") or {}
        lines.append(f"| {r['point']} | {r['family']} | {r['step']} | {r['seed'] if r['seed'] is not None else '–'} "
                     f"| {_ci(r['id_gain'], True)} | {_ci(r['forgetting'], pct_y)} | "
                     f"{_ci(r['probe_nll_delta']) if forgetting != 'probe_nll_delta' else '(y)'} | "
                     f"{_ci(r.get('ood_delta'), True)} | {_ci(vs.get('id'), True)} | {_ci(vs.get('probe_kl'))} | "
                     f"{'✓' if r['pareto'] else ''} |")
    lines += ["", "Each cell: estimate [paired bootstrap 95 % interval over the items all models share]. ID gain: "
              "score − base score on the ID items; KL and Δ NLL: token-weighted means over the probe prompts "
              "(resampled by prompt); ΔOOD: log-likelihood MC accuracy − base (final points only). "
              "vs SFT@step: the difference from SFT's point at the same optimizer step, paired the same way. "
              "Pareto: no other point has at least as much ID gain and at most as much forgetting (one strictly)."]
    return "\n".join(lines) + "\n"


def plot_frontier(rows: list[dict], forgetting: str, path: str | Path) -> None:
    """ID gain (x) against forgetting (y), 95 % interval bars on both axes; one curve per method family
    through its first seed's points in step order (checkpoints) or gain order (a λ grid); other seeds as open
    markers of the same colour; the Pareto front as a dashed black staircase."""
    plt = pyplot()
    pts = [r for r in rows if r["id_gain"] is not None and r["forgetting"] is not None]
    if not pts:
        return
    scale = 100.0 if forgetting == "ood_drop" else 1.0
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    cmap = plt.get_cmap("tab10")
    families = list(dict.fromkeys(r["family"] for r in pts))
    X = lambda r: 100 * r["id_gain"]["delta"]  # noqa: E731
    Y = lambda r: scale * r["forgetting"]["delta"]  # noqa: E731

    def bars(group, color, fmt, filled, label, ms):
        ax.errorbar([X(r) for r in group], [Y(r) for r in group],
                    xerr=[[100 * (r["id_gain"]["delta"] - r["id_gain"]["lo"]) for r in group],
                          [100 * (r["id_gain"]["hi"] - r["id_gain"]["delta"]) for r in group]],
                    yerr=[[scale * (r["forgetting"]["delta"] - r["forgetting"]["lo"]) for r in group],
                          [scale * (r["forgetting"]["hi"] - r["forgetting"]["delta"]) for r in group]],
                    fmt=fmt, color=color, mfc=color if filled else "white", ms=ms, capsize=2, lw=1.2,
                    elinewidth=0.7, alpha=0.9, label=label)

    for c, fam in enumerate(families):
        color = "black" if fam == "base" else cmap(c % 10)
        mine = [r for r in pts if r["family"] == fam]
        seed0 = mine[0]["seed"]
        main = [r for r in mine if r["seed"] == seed0]
        runs = list(dict.fromkeys(r["run"] for r in main))
        if len(runs) == 1:  # one run's checkpoints: its curve in step order, labelled by step
            curve = sorted(main, key=lambda r: r["step"] or 0)
            label_of = (lambda r: "") if fam == "base" else (lambda r: str(r["step"]))
        else:  # a grid of runs (λ, k): the curve through their final points in order of ID gain
            curve = sorted([r for r in main if r["final"]], key=lambda r: r["id_gain"]["delta"])
            label_of = lambda r: _short(r["point"].removeprefix(r["method"] + "-"))  # noqa: E731
            for run in runs:  # each run's own checkpoints: small markers on a dotted path to its final point
                trail = sorted([r for r in main if r["run"] == run], key=lambda r: r["step"] or 0)
                if len(trail) > 1:
                    ax.plot([X(r) for r in trail], [Y(r) for r in trail], ":", color=color, lw=0.8)
                    bars([r for r in trail if not r["final"]], color, "o", False, None, 4)
        bars(curve, color, "-o" if len(curve) > 1 else "o", True, fam, 10 if fam == "base" else 6)
        others = [r for r in mine if r["seed"] != seed0]
        if others:
            bars(others, color, "s", False, f"{fam} (other seeds)", 6)
        for r in curve + others:
            if label_of(r):
                ax.annotate(label_of(r), (X(r), Y(r)), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=color)
    front = sorted([r for r in pts if r["pareto"]], key=lambda r: r["id_gain"]["delta"])
    if len(front) > 1:
        ax.step([100 * r["id_gain"]["delta"] for r in front], [scale * r["forgetting"]["delta"] for r in front],
                where="post", color="black", ls="--", lw=1, label="Pareto front")
    ax.scatter([100 * r["id_gain"]["delta"] for r in front], [scale * r["forgetting"]["delta"] for r in front],
               s=140, facecolors="none", edgecolors="black", lw=1)
    ax.set_xlabel("ID gain over base (points)  →  learns more")
    ax.set_ylabel(f"{FORGETTING_LABEL[forgetting]}  ↑  forgets more")
    ax.set_title("Trade-off frontier (95 % paired bootstrap intervals; circled: Pareto-optimal)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    save_png(fig, path)


def _short(name: str) -> str:
    return name if len(name) <= 18 else name[:17] + "…"


def write_frontier(root: Path, results: dict, forgetting: str, n_resamples: int) -> list[dict]:
    rows = frontier_points(results, forgetting, n_resamples)
    fileio.write_json(root / "frontier.json", {"forgetting": forgetting, "points": rows})
    plot_frontier(rows, forgetting, root / "frontier.png")
    return rows