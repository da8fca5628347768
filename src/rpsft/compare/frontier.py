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

import numpy as np

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


# ------------------------------------------------------------------------------- gap to a reference curve
EDGE_SHARE = 0.05  # more resamples than this beyond the curve's end: the gap gets no verdict


def reference_curves(rows: list[dict]) -> dict[str, list[str]]:
    """The curves a point is judged against: SFT's early-stopping curve (the base, then SFT's checkpoints in
    step order, first seed) and, for every other family, its first seed's final points (a λ or budget path),
    each starting at the base. Families with a single point are no curve."""
    seed0: dict[str, object] = {}
    for r in rows:
        seed0.setdefault(r["family"], r["seed"])
    curves: dict[str, list[str]] = {}
    for fam in seed0:
        if fam == "base":
            continue
        mine = [r for r in rows if r["family"] == fam and r["seed"] == seed0[fam]]
        if fam != "sft":
            mine = [r for r in mine if r["final"]]
        if len(mine) >= 2 or fam == "sft":
            curves[fam] = ["base", *[r["point"] for r in sorted(mine, key=lambda r: r["step"] or 0)]]
    return curves


def curve_gap(results: dict[str, dict], point: str, curve: list[str], which: int = 0, seed: int = 0,
              n_resamples: int = 2000, confidence: float = 0.95) -> dict | None:
    """Forgetting of ``point`` minus the forgetting of ``curve`` at the same ID gain, with a bootstrap interval.

    The curve is the piecewise-linear path through the Pareto-optimal ones of its points (ID gain, forgetting),
    sorted by ID gain (the base is its origin); read at the point's ID gain it is the least forgetting the
    reference family was seen to pay for that much learning.
    A negative gap whose interval excludes 0 is "less forgetting at equal ID gain": the point lies outside the
    curve. ID items and probe prompts are two item sets, resampled independently, each with the same indices for
    every model (paired), and the whole curve is recomputed in each resample, so the interval carries the
    curve's own uncertainty too. ``which``: 0 probe KL, 1 Δ NLL of the base's answers. Resamples in which the
    point learns more than every curve point cannot be read (no extrapolation); their share is ``beyond``, and
    the interval covers the others. ``verdict``: outside (interval below 0), inside (above 0), unresolved (holds
    0), beyond (the point estimate itself is past the curve's end) or edge (over 5 % of resamples are).
    Returns None without ID items or probe data.
    """
    names = [*curve, point]
    ids = [id_items(results[n]) for n in names]
    probes = [probe_items(results[n]) for n in names[1:]]  # the base's forgetting is 0 by definition
    id_keys = sorted(set.intersection(*[set(d) for d in ids]))
    pr_keys = sorted(set.intersection(*[set(d) for d in probes])) if probes else []
    if not id_keys or not pr_keys:
        return None
    ID = np.array([[d[k] for d in ids] for k in id_keys])  # items × models
    Y = np.array([[0.0] + [d[k][which] for d in probes] for k in pr_keys])
    W = np.array([probes[0][k][2] for k in pr_keys], dtype=np.float64)

    def gaps(id_idx: np.ndarray, pr_idx: np.ndarray) -> np.ndarray:
        """Per resample (rows of the index arrays): the gap, NaN where the point is beyond the curve."""
        gain = ID[id_idx].mean(axis=1)  # B × models
        gain = gain - gain[:, :1]
        w = W[pr_idx][..., None]
        y = (Y[pr_idx] * w).sum(axis=1) / w.sum(axis=1)
        out = np.full(len(gain), np.nan)
        for b in range(len(gain)):
            # the curve's own Pareto points: a dominated one (a λ too weak to learn more, a checkpoint that forgot
            # more and learned less) is not what the family can do at that ID gain
            front = pareto_front(list(zip(gain[b, :-1], y[b, :-1])))
            xs, ys = gain[b, front], y[b, front]
            if gain[b, -1] <= xs[-1]:
                out[b] = y[b, -1] - np.interp(gain[b, -1], xs, ys)
        return out

    est = gaps(np.arange(len(id_keys))[None], np.arange(len(pr_keys))[None])
    rng = np.random.default_rng(seed)
    boot = gaps(rng.integers(0, len(id_keys), (n_resamples, len(id_keys))),
                rng.integers(0, len(pr_keys), (n_resamples, len(pr_keys))))
    ok = boot[~np.isnan(boot)]
    alpha = (1 - confidence) / 2
    lo, hi = (float(np.quantile(ok, alpha)), float(np.quantile(ok, 1 - alpha))) if ok.size else (None, None)
    d = None if np.isnan(est[0]) else float(est[0])
    beyond = float(np.isnan(boot).mean())
    # A point near the curve's last point falls beyond it in many resamples; the interval over the others is then
    # conditional on the point learning less than the curve's end and says nothing reliable: no verdict ("edge").
    verdict = ("beyond" if d is None else "edge" if beyond > EDGE_SHARE else "outside" if hi < 0 else
               "inside" if lo > 0 else "unresolved")
    return {"delta": d, "lo": lo, "hi": hi, "beyond": beyond, "n_id": len(id_keys),
            "n_probe": len(pr_keys), "curve": curve, "verdict": verdict}


def add_curve_gaps(rows: list[dict], results: dict[str, dict], forgetting: str, n_resamples: int) -> None:
    """``row["vs_curves"][family]``: :func:`curve_gap` of every tuned point against every reference curve it is
    not part of (forgetting measured as the frontier's y; not defined for ``ood_drop``)."""
    if forgetting not in ("probe_kl", "probe_nll_delta"):
        return
    which = 0 if forgetting == "probe_kl" else 1
    curves = reference_curves(rows)
    for i, r in enumerate(rows):
        if r["point"] == "base":
            continue
        gaps = {fam: curve_gap(results, r["point"], pts, which, seed=i, n_resamples=n_resamples)
                for fam, pts in curves.items() if r["point"] not in pts}
        r["vs_curves"] = {fam: g for fam, g in gaps.items() if g is not None}


def pair_deltas(results: dict[str, dict], pairs: list, n_resamples: int = 2000) -> list[dict]:
    """``pairs: [[a, b], ...]`` of the compare config: a − b in ID score, probe KL and Δ NLL, each with its
    paired bootstrap interval over the items both were scored on (a direct head-to-head, e.g. the best point of
    one family against the best of another)."""
    out = []
    for i, (a, b) in enumerate(pairs):
        ra, rb = results.get(a), results.get(b)
        if ra is None or rb is None:
            continue
        pa, pb = probe_items(ra), probe_items(rb)
        if not pa and not pb:  # neither has a probe (the base has none: its forgetting is 0 by definition)
            kl = nll = None
        else:
            zero = {k: (0.0, 0.0, v[2]) for k, v in (pa or pb).items()}
            pa, pb = pa or zero, pb or zero
            kl, nll = _probe_delta(pa, pb, 0, i, n_resamples), _probe_delta(pa, pb, 1, i, n_resamples)
        out.append({"a": a, "b": b, "id": _delta(id_items(ra), id_items(rb), i, n_resamples), "probe_kl": kl,
                    "probe_nll_delta": nll})
    return out


def render_pairs(rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = ["", "## Paired differences", "", "| a | b | ID a − b (pts) | probe KL a − b | Δ NLL a − b |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['a']} | {r['b']} | {_ci(r['id'], True)} | {_ci(r['probe_kl'])} | "
                     f"{_ci(r['probe_nll_delta'])} |")
    lines += ["", "Each cell: a − b [paired bootstrap 95 % interval over the items both models were scored on]."]
    return "\n".join(lines) + "\n"


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
    return "\n".join(lines) + "\n" + render_curve_gaps(rows, forgetting)


def _gap_cell(g: dict | None) -> str:
    if g is None:
        return "–"
    if g["delta"] is None:
        return "beyond (learns more than every point)"
    beyond = f", {100 * g['beyond']:.0f} % beyond" if g["beyond"] >= 0.005 else ""
    return f"{g['delta']:+.3g} [{g['lo']:+.3g}, {g['hi']:+.3g}] {g['verdict']}{beyond}"


def render_curve_gaps(rows: list[dict], forgetting: str) -> str:
    """The table of :func:`curve_gap`: each point's forgetting minus each reference curve's at equal ID gain."""
    fams = list(dict.fromkeys(f for r in rows for f in (r.get("vs_curves") or {})))
    if not fams:
        return ""
    lines = ["", "## Against the reference curves", "",
             f"Gap = the point's {FORGETTING_LABEL[forgetting]} minus the curve's at the same ID gain "
             "(piecewise linear through the Pareto-optimal points of the family, from the base; SFT's are its "
             "checkpoints, the others their grid's final points, first seed; recomputed in every resample). "
             "outside: less forgetting at equal ID gain, 95 % interval below 0; inside: more, interval above 0; "
             "unresolved: the interval holds 0; beyond: the point learns more than every point of the curve, "
             "where it cannot be read; edge: it does so in over 5 % of the bootstrap resamples (share given), so "
             "the interval is not trusted and there is no verdict.", "",
             "| point | " + " | ".join(f"vs {f}" for f in fams) + " |", "|" + "---|" * (len(fams) + 1)]
    for r in sorted(rows, key=lambda r: (str(r["family"]), r["step"] or 0, r["seed"] or 0)):
        vs = r.get("vs_curves")
        if vs:
            lines.append(f"| {r['point']} | " + " | ".join(_gap_cell(vs.get(f)) for f in fams) + " |")
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
    fig, ax = plt.subplots(figsize=(9.5, 5.5))
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
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a point
    fig.tight_layout()
    save_png(fig, path)


def _short(name: str) -> str:
    return name if len(name) <= 18 else name[:17] + "…"


def write_frontier(root: Path, results: dict, forgetting: str, n_resamples: int) -> list[dict]:
    rows = frontier_points(results, forgetting, n_resamples)
    add_curve_gaps(rows, results, forgetting, n_resamples)
    fileio.write_json(root / "frontier.json", {"forgetting": forgetting, "points": rows})
    plot_frontier(rows, forgetting, root / "frontier.png")
    return rows