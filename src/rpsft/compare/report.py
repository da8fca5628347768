"""The summary of ``rpsft compare``: per-run rows (scores, Δ vs base, probe, rotation, drift, cost), the markdown
table in the paper's layout, and the trade-off and rank-sweep plots."""

from __future__ import annotations

import time
from pathlib import Path

from .. import fileio
from ..analysis.plots import pyplot
from ..terminal import fmt
from .config import CompareConfig


def config_dict(cfg: CompareConfig) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)


def _score(bench: dict) -> float | None:
    for key in ("avg_at_k", "accuracy"):
        if key in bench:
            return float(bench[key])
    return None


def build_summary(cfg: CompareConfig, results: dict, analysis: dict, models: dict) -> dict:
    """Per run: ID / OOD scores (+ Δ vs base), probe, rotation and drift figures, block energies, and cost."""
    from .frontier import point_blocks  # frontier imports this module: imported here, not at the top

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
        row["blocks"] = point_blocks(res)  # energies of ΔW in the base's top-k frame (App. C.3), None if not run
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
    return {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "config": config_dict(cfg), "rows": rows}

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
        cells = [r["run"], fmt(r.get("k"))]
        for c in cols:
            cell = fmt(r.get(c), pct=c in pct)
            d = (r.get("delta") or {}).get(c)
            if d is not None and r["run"] != "base":
                cell += f" ({'+' if d >= 0 else ''}{fmt(d, pct=c in pct)})"
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
                         f"{c['samples_per_s']:.2f} | {c['anchor_mib']:.1f} | {fmt(c['mean_train_loss'])} |")
    lines += ["", "mean train loss: the trainer's loss averaged over all steps (the task loss; DFT's is its "
              "probability-weighted loss, not comparable with the others)."]
    return "\n".join(lines) + "\n" + render_blocks(summary)


def render_blocks(summary: dict) -> str:
    """Per point: ‖ΔW‖² and its split into A, B + C and D of the base's top-k frame (energy, % of ‖ΔW‖²), then the
    association of each forgetting measure with each block over the points (``summary["block_association"]``)."""
    from .frontier import render_block_association

    rows = [r for r in summary["rows"] if r.get("blocks")]
    if not rows:
        return ""
    ranks = list(dict.fromkeys(str(r["blocks"]["rank"]) for r in rows))
    lines = ["", f"## Where the drift went (blocks of ΔW in the base's top-k frame, k: {', '.join(ranks)})", "",
             "| point | ‖ΔW‖² | ‖A‖² | ‖B‖²+‖C‖² | ‖D‖² |", "|---|---|---|---|---|"]
    for r in rows:
        b = r["blocks"]
        lines.append(f"| {r['run']} | {fmt(b['total'])} | "
                     + " | ".join(f"{fmt(b[k])} ({fmt(b['share'][k], pct=True)} %)" if b["share"][k] is not None
                                  else fmt(b[k]) for k in ("A", "BC", "D")) + " |")
    lines += ["", "A = U_kᵀΔW V_k is the block the rotation anchor penalises, B + C the top-k directions on one side "
              "only, D the rest (App. C.3); (% of ‖ΔW‖²), summed over the analysed matrices."]
    return "\n".join(lines) + "\n" + render_block_association(summary.get("block_association") or [])


def save_png(fig, path: str | Path) -> None:
    """Write ``fig`` atomically as a PNG (120 dpi) and release it."""
    with fileio.atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    pyplot().close(fig)


def plot_tradeoff(summary: dict, path: str | Path) -> None:
    """Fig. 4's shape: ID score against OOD score, one point per run; beside it ID against the forgetting probe
    (−KL, right = less forgetting) when the probe ran — on a small model the probe resolves what a few dozen
    multiple-choice questions cannot. Runs that land on the same point share one label."""
    plt = pyplot()
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
    save_png(fig, path)


def plot_rank_sweep(summary: dict, method: str, path: str | Path) -> None:
    """Fig. 3's shape: ID score, OOD score and probe KL against k for the swept method, with its two ends when
    they ran: k = 0 (plain SFT) and k = min(m, n) (L2-Init). The k axis is ordinal (each run one tick): "full" is
    a different k per matrix shape, so it has no single position on a numeric axis."""
    plt = pyplot()
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
    save_png(fig, path)
