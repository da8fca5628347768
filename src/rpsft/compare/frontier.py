"""The trade-off frontier of ``rpsft compare``: checkpoints as points, seed means, intervals, Pareto front and plot.

Every evaluated model (the base, each run's final weights, and its weights at ``eval_steps``) is scored on the
same items. Runs that differ only in seed are one *configuration*; its models at one step are averaged into one
seed-mean point (ID gain, forgetting), and every Δ carries a 95 % interval over the seeds and the items all models
share (:mod:`rpsft.compare.stats`'s crossed t interval), so it holds seed noise as well as item noise. A
configuration with one seed gets the paired bootstrap over items, which excludes seed noise; the table says so.
SFT evaluated at several steps is SFT's own early-stopping curve: fewer steps learn less and forget less, so a
method only helps if its point lies *outside* that curve, not merely above SFT's last checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import fileio
from .grid import point_name
from .report import pyplot, save_png
from .stats import (ALPHA, bootstrap_p, crossed_t, holm, pareto_front, resample_counts, seed_item_means,
                    two_stage_delta)


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


# ------------------------------------------------------------------------------- configurations and seeds
def configuration_of(name: str, res: dict) -> str:
    """The configuration a result belongs to: its run's config minus the seed, named by the configuration's first
    run (``res["configuration"]``, from the plan); without one, the point's own run (no averaging over seeds)."""
    if res.get("configuration"):
        return res["configuration"]
    run, at, step = name.rpartition("@")
    return run if at and step.isdigit() else name


def _seed_order(seed) -> tuple:
    return (seed is None, seed if isinstance(seed, (int, float)) else str(seed))


def seed_groups(results: dict[str, dict]) -> dict[str, dict]:
    """The seed-mean points: the evaluated models of one configuration at one step (its final weights, or its
    checkpoint at step N), one per seed. Named by the configuration (final weights) or ``CONFIG@N``; each is
    ``{"point", "configuration", "family", "method", "k", "step", "final", "seeds", "members"}``, members being
    the results' names in seed order, so that two groups with the same seeds are paired row by row."""
    groups: dict[str, dict] = {}
    for name, r in results.items():
        cfg = configuration_of(name, r)
        final = r.get("final", True)
        # a configuration's final weights are named by it, its checkpoints CONFIG@N; a result without a
        # configuration (an older compare's, or a hand-made one) is its own point
        gname = name if not r.get("configuration") else cfg if final else point_name(cfg, r.get("step"))
        g = groups.setdefault(gname, {"point": gname, "configuration": cfg, "family": r.get("family"),
                                      "method": r.get("method"), "k": r.get("k"), "step": r.get("step"),
                                      "final": final, "seeds": [], "members": []})
        g["seeds"].append(r.get("seed"))
        g["members"].append(name)
    for g in groups.values():
        order = sorted(range(len(g["seeds"])), key=lambda j: _seed_order(g["seeds"][j]))
        g["seeds"], g["members"] = [g["seeds"][j] for j in order], [g["members"][j] for j in order]
    return groups


def single_groups(results: dict[str, dict]) -> dict[str, dict]:
    """Every evaluated model as a group of its own (the per-seed points)."""
    return {name: {"point": name, "configuration": configuration_of(name, r), "family": r.get("family"),
                   "method": r.get("method"), "k": r.get("k"), "step": r.get("step"), "final": r.get("final", True),
                   "seeds": [r.get("seed")], "members": [name]} for name, r in results.items()}


def _seedless(g: dict) -> bool:
    return g["seeds"] == [None]  # the base: one model whatever the seed


def _side(results: dict, g: dict, kind: str) -> list[dict]:
    f = {"id": id_items, "ood": ood_items, "probe": probe_items}[kind]
    return [f(results[m]) for m in g["members"]]


def group_delta(results: dict, ga: dict, gb: dict | None, kind: str, seed: int, n_resamples: int,
                which: int = 0) -> dict | None:
    """Seed mean of ``ga`` minus that of ``gb`` (None: ``ga``'s quantity itself) on the items every model of both
    shares (``kind``: "id" or "ood" scores, or "probe": the token-weighted KL (``which`` 0) or Δ NLL (1)), with
    :func:`rpsft.compare.stats.two_stage_delta`'s interval: seeds paired when both groups have the same seeds
    (seed s with seed s), each group's own seeds resampled otherwise; a seedless group (the base) is the same for
    every seed. A group without probe data (the base: its forgetting is 0 by definition) counts as 0. None when
    there is nothing to compare."""
    da = _side(results, ga, kind)
    db = None if gb is None else _side(results, gb, kind)
    if kind == "probe":
        if not all(da):
            if not _seedless(ga):
                return None  # a tuned point without a probe: nothing to compare
            da = None
        if db is not None and not all(db):
            if not _seedless(gb):
                return None
            db = None
        if da is None and db is None:
            return None
    have = (da or []) + (db or [])
    keys = sorted(set.intersection(*[set(d) for d in have])) if have else []
    if not keys:
        return None
    val = (lambda d, k: d[k][which]) if kind == "probe" else (lambda d, k: d[k])  # noqa: E731
    w = np.array([have[0][k][2] for k in keys], dtype=np.float64) if kind == "probe" else None

    def matrix(ds):
        return np.array([[val(d, k) for k in keys] for d in ds])

    # a seedless side (the base) is one row, the same for every seed: 1-D; the base's forgetting is 0
    A = np.zeros(len(keys)) if da is None else matrix(da)[0] if _seedless(ga) else matrix(da)
    B = None if db is None else matrix(db)[0] if _seedless(gb) else matrix(db)
    paired = B is None or B.ndim == 1 or (A.ndim == 2 and ga["seeds"] == gb["seeds"])
    return two_stage_delta(A, B, w, paired, seed, n_resamples)


def frontier_points(results: dict[str, dict], forgetting: str = "probe_kl", n_resamples: int = 2000,
                    groups: dict[str, dict] | None = None) -> list[dict]:
    """One row per seed-mean point (:func:`seed_groups`; ``groups`` instead, e.g. :func:`single_groups` for the
    per-seed points): ID gain and forgetting with their intervals vs base, the same against SFT at the same step
    (seed-mean points only), and whether the point is on the Pareto front (higher ID gain, lower forgetting)."""
    per_seed = groups is not None
    groups = groups if per_seed else seed_groups(results)
    base = groups.get("base")
    b_id = id_items(results["base"]) if "base" in results else {}
    sft: dict = {}
    for g in groups.values():  # SFT's point at each step: its first configuration that has one
        if g["family"] == "sft":
            sft.setdefault(g["step"], g["point"])
    rows = []
    for i, (name, g) in enumerate(groups.items()):
        row = {"point": name, "run": results[name].get("run", name) if per_seed else g["configuration"],
               "configuration": g["configuration"], "family": g["family"], "method": g["method"], "k": g["k"],
               "step": g["step"], "final": g["final"], "seeds": [] if _seedless(g) else g["seeds"],
               "members": g["members"]}
        if per_seed:
            row["seed"] = g["seeds"][0]
        if name == "base":
            zero = {"delta": 0.0, "lo": 0.0, "hi": 0.0, "p": None, "n": len(b_id), "seeds": 0, "seeds_b": None}
            row["id_gain"] = zero if b_id else None
            row["ood_delta"] = None
            row["probe_kl"] = row["probe_nll_delta"] = {**zero, "n": 0}
        else:
            row["id_gain"] = group_delta(results, g, base, "id", i, n_resamples) if base else None
            row["ood_delta"] = group_delta(results, g, base, "ood", i, n_resamples) if base else None
            row["probe_kl"] = group_delta(results, g, None, "probe", i, n_resamples, 0)
            row["probe_nll_delta"] = group_delta(results, g, None, "probe", i, n_resamples, 1)
        ref = None if per_seed else sft.get(g["step"])
        if ref is not None and ref != name and name != "base":
            other = groups[ref]
            row["vs_sft"] = {"point": ref, "id": group_delta(results, g, other, "id", i, n_resamples),
                             "probe_kl": group_delta(results, g, other, "probe", i, n_resamples, 0),
                             "probe_nll_delta": group_delta(results, g, other, "probe", i, n_resamples, 1)}
        row["forgetting"] = _forgetting(row, forgetting)
        row["blocks"] = mean_blocks([point_blocks(results[m]) for m in g["members"]])
        rows.append(row)
    usable = [j for j, r in enumerate(rows) if r["id_gain"] is not None and r["forgetting"] is not None]
    front = pareto_front([(rows[j]["id_gain"]["delta"], rows[j]["forgetting"]["delta"]) for j in usable])
    on = {usable[j] for j in front}
    for j, r in enumerate(rows):
        r["pareto"] = j in on
    return rows


def seed_points(results: dict[str, dict], forgetting: str = "probe_kl", n_resamples: int = 2000) -> list[dict]:
    """:func:`frontier_points` of every evaluated model on its own (one seed each: item intervals only), kept beside
    the seed means in frontier.json and drawn as single-seed markers in the plot."""
    return frontier_points(results, forgetting, n_resamples, single_groups(results))


def mean_blocks(blocks: list[dict | None]) -> dict | None:
    """The seed mean of :func:`point_blocks` (energies averaged, shares of the averaged total); None unless every
    seed has them."""
    if not blocks or any(b is None for b in blocks):
        return None
    if len(blocks) == 1:
        return blocks[0]
    out = {"rank": blocks[0]["rank"], **{k: float(np.mean([b[k] for b in blocks])) for k in BLOCK_KEYS}}
    out["share"] = {b: (out[b] / out["total"] if out["total"] > 0 else None) for b in ("A", "BC", "D")}
    return out


# ------------------------------------------------------------------------------- gap to a reference curve
EDGE_SHARE = 0.05  # more resamples than this beyond the curve's end: the gap gets no verdict
TESTED = ("outside", "inside", "unresolved")  # curve-gap verdicts that are a comparison (Holm's m counts them)


def reference_curves(rows: list[dict]) -> dict[str, list[str]]:
    """The curves a point is judged against, through seed-mean points: SFT's early-stopping curve (the base, then
    SFT's checkpoints in step order) and, for every other family, its final points (a λ or budget path), each
    starting at the base. Families with a single point are no curve."""
    curves: dict[str, list[str]] = {}
    for fam in dict.fromkeys(r["family"] for r in rows):
        if fam == "base":
            continue
        mine = [r for r in rows if r["family"] == fam]
        if fam != "sft":
            mine = [r for r in mine if r["final"]]
        if len(mine) >= 2 or fam == "sft":
            curves[fam] = ["base", *[r["point"] for r in sorted(mine, key=lambda r: r["step"] or 0)]]
    return curves


def curve_gap(results: dict[str, dict], point: str, curve: list[str], which: int = 0, seed: int = 0,
              n_resamples: int = 2000, confidence: float = 0.95, groups: dict[str, dict] | None = None) -> dict | None:
    """Forgetting of ``point`` minus the forgetting of ``curve`` at the same ID gain, with its interval.

    ``point`` and ``curve`` name seed-mean points (:func:`seed_groups`, or ``groups``). The curve is the
    piecewise-linear path through the Pareto-optimal ones of its points (ID gain, forgetting), sorted by ID gain
    (the base is its origin); read at the point's ID gain it is the least forgetting the reference family was seen
    to pay for that much learning.
    A negative gap whose interval excludes 0 is "less forgetting at equal ID gain": the point lies outside the
    curve. A bootstrap draws every point's seeds (points with the same seeds share the draw: paired by seed),
    then the ID items and the probe prompts (two item sets, drawn independently, each with the same indices for
    every seed of every model), and recomputes the whole curve. With one seed everywhere its percentile interval
    and two-sided p-value (:func:`rpsft.compare.stats.bootstrap_p`) are the gap's, over the items alone. With
    several seeds on any point the interval and p-value are :func:`rpsft.compare.stats.crossed_t`'s for the gap's
    linearisation at the estimate (:func:`_gap_gradient`, the delta method: a sum of seed means of item means,
    one side per seed set, the ID items and the probe prompts its two item sets), so they carry the curve's own
    uncertainty and the seed noise at their nominal rate. ``which``: 0 probe KL, 1 Δ NLL of the base's answers.
    Resamples in which the point learns more than every curve point cannot be read (no extrapolation); their
    share is ``beyond``, and the percentile interval covers the others.
    ``verdict``: outside (interval below 0), inside (above 0), unresolved (holds 0), beyond (the point estimate
    itself is past the curve's end) or edge (over 5 % of resamples are). Returns None without ID items or probe
    data.
    """
    groups = groups or seed_groups(results)
    gs = [groups[n] for n in [*curve, point]]
    ids = [_side(results, g, "id") for g in gs]
    probes = [_side(results, g, "probe") for g in gs[1:]]  # the base's forgetting is 0 by definition
    id_keys = sorted(set.intersection(*[set(d) for side in ids for d in side]))
    pr_keys = sorted(set.intersection(*[set(d) for side in probes for d in side])) if probes else []
    if not id_keys or not pr_keys:
        return None
    ID = [np.array([[d[k] for k in id_keys] for d in side]) for side in ids]  # per model: seeds × items
    Y = [np.zeros((1, len(pr_keys)))] + [np.array([[d[k][which] for k in pr_keys] for d in side]) for side in probes]
    W = np.array([probes[0][0][k][2] for k in pr_keys], dtype=np.float64)
    seedsets = [tuple(g["seeds"]) for g in gs]

    def gaps(G: dict[tuple, np.ndarray], cid: np.ndarray, cpr: np.ndarray) -> np.ndarray:
        """Per resample (rows of the count arrays): the gap, NaN where the point is beyond the curve."""
        gain = np.stack([seed_item_means(X, G[s], cid) for X, s in zip(ID, seedsets)], axis=1)  # B × models
        gain = gain - gain[:, :1]
        y = np.stack([seed_item_means(X, G[s], cpr, W) for X, s in zip(Y, seedsets)], axis=1)
        out = np.full(len(gain), np.nan)
        for b in range(len(gain)):
            # the curve's own Pareto points: a dominated one (a λ too weak to learn more, a checkpoint that forgot
            # more and learned less) is not what the family can do at that ID gain
            front = pareto_front(list(zip(gain[b, :-1], y[b, :-1])))
            xs, ys = gain[b, front], y[b, front]
            if gain[b, -1] <= xs[-1]:
                out[b] = y[b, -1] - np.interp(gain[b, -1], xs, ys)
        return out

    sets = list(dict.fromkeys(seedsets))
    est = gaps({s: np.ones((1, len(s))) for s in sets}, np.ones((1, len(id_keys))), np.ones((1, len(pr_keys))))
    rng = np.random.default_rng(seed)
    draws = {s: resample_counts(rng, len(s), n_resamples) for s in sets}
    boot = gaps(draws, resample_counts(rng, len(id_keys), n_resamples), resample_counts(rng, len(pr_keys), n_resamples))
    ok = boot[~np.isnan(boot)]
    alpha = (1 - confidence) / 2
    lo, hi = (float(np.quantile(ok, alpha)), float(np.quantile(ok, 1 - alpha))) if ok.size else (None, None)
    d = None if np.isnan(est[0]) else float(est[0])
    p, df = bootstrap_p(ok) if ok.size and d is not None else None, None
    if d is not None and max(map(len, sets)) > 1:
        # several seeds: the percentile interval would see the seed noise through S values only; the crossed t
        # interval of the gap's linearisation at the estimate (the delta method) instead
        ones = [np.ones((1, len(s))) for s in seedsets]
        gain = np.array([seed_item_means(X, g, np.ones((1, len(id_keys))))[0] for X, g in zip(ID, ones)])
        y = np.array([seed_item_means(X, g, np.ones((1, len(pr_keys))), W)[0] for X, g in zip(Y, ones)])
        cs, cy = _gap_gradient(gain - gain[0], y)
        sides = [[sum(cs[k] * ID[k] for k in ks), sum(cy[k] * Y[k] for k in ks)]
                 for s in sets for ks in [[k for k, t in enumerate(seedsets) if t == s]]]
        r = crossed_t(sides, [None, W], estimate=d, confidence=confidence)
        lo, hi, p, df = r["lo"], r["hi"], r["p"], r["df"]
    beyond = float(np.isnan(boot).mean())
    # A point near the curve's last point falls beyond it in many resamples; the interval over the others is then
    # conditional on the point learning less than the curve's end and says nothing reliable: no verdict ("edge").
    verdict = ("beyond" if d is None else "edge" if beyond > EDGE_SHARE else "outside" if hi < 0 else
               "inside" if lo > 0 else "unresolved")
    return {"delta": d, "lo": lo, "hi": hi, "p": p, "df": df, "beyond": beyond, "n_id": len(id_keys),
            "n_probe": len(pr_keys), "seeds": len(gs[-1]["seeds"]), "curve": curve, "verdict": verdict}


def _gap_gradient(gain: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The gap y_p − interp(g_p; the curve's Pareto front) differentiated at the estimate, per model (the base
    first, the point last): by its mean ID score (gains are score − the base's score, so the base's gets minus the
    others' sum) and by its mean forgetting. Between front points L and R, with t = (g_p − g_L) / (g_R − g_L) and
    the segment's slope m, the gap is y_p − (1 − t) y_L − t y_R: ∂/∂g_p = −m, ∂/∂g_L = m (1 − t), ∂/∂g_R = m t;
    left of the front's first point the curve is flat (np.interp holds its first value)."""
    K = len(gain) - 1
    cs, cy = np.zeros(K + 1), np.zeros(K + 1)
    front = pareto_front(list(zip(gain[:-1], y[:-1])))
    xs = gain[front]
    cy[K] = 1.0
    if gain[K] <= xs[0]:
        cy[front[0]] -= 1.0
        return cs, cy
    j = int(np.searchsorted(xs, gain[K], side="left")) - 1  # xs[j] < g_p ≤ xs[j + 1]
    L, R = front[j], front[j + 1]
    t = (gain[K] - gain[L]) / (gain[R] - gain[L])
    m = (y[R] - y[L]) / (gain[R] - gain[L])
    cy[L] -= 1 - t
    cy[R] -= t
    for k, dg in ((K, -m), (L, m * (1 - t)), (R, m * t)):
        if k != 0:  # the base's gain is 0 by definition
            cs[k] += dg
            cs[0] -= dg
    return cs, cy


def add_curve_gaps(rows: list[dict], results: dict[str, dict], forgetting: str, n_resamples: int) -> None:
    """``row["vs_curves"][family]``: :func:`curve_gap` of every tuned seed-mean point against every reference curve
    it is not part of (forgetting measured as the frontier's y; not defined for ``ood_drop``), each with ``holm``:
    Holm's correction over all gaps with a verdict (outside, inside, unresolved), one family of comparisons."""
    if forgetting not in ("probe_kl", "probe_nll_delta"):
        return
    which = 0 if forgetting == "probe_kl" else 1
    curves = reference_curves(rows)
    groups = seed_groups(results)
    for i, r in enumerate(rows):
        if r["point"] == "base":
            continue
        gaps = {fam: curve_gap(results, r["point"], pts, which, seed=i, n_resamples=n_resamples, groups=groups)
                for fam, pts in curves.items() if r["point"] not in pts}
        r["vs_curves"] = {fam: g for fam, g in gaps.items() if g is not None}
    tested = [g for r in rows for g in (r.get("vs_curves") or {}).values()]
    for g, h in zip(tested, holm([g["p"] if g["verdict"] in TESTED else None for g in tested])):
        g["holm"] = h


# ---------------------------------------------------------------------------------------- head to head
MEASURES = ("id", "probe_kl", "probe_nll_delta")


def _resolve(results: dict, name: str) -> str | None:
    """A point name of the plan as the result it names (a run's alias names the run)."""
    if name in results:
        return name
    return next((n for n, r in results.items() if name in (r.get("aliases") or ())), None)


def pair_deltas(results: dict[str, dict], pairs: list, n_resamples: int = 2000) -> list[dict]:
    """``pairs: [[a, b], ...]`` of the compare config: a − b in ID score, probe KL and Δ NLL with their intervals.

    A name stands for its configuration at that step, all its seeds (its seed-mean point, ``a_point``): seed s of
    a is paired with seed s of b when both were run with the same seeds, each side's seeds are resampled on their
    own otherwise, and the items are always paired (:func:`group_delta`). Two names of one configuration (two
    seeds of it) are no comparison of configurations: that row (``kind: "seeds"``) is the difference between those
    two seeds over the items alone, the size of the seed noise the other rows' intervals include, and is left out
    of Holm's correction. ``holm`` per measure: Holm's correction over every (pair, measure) of the other rows at
    α = 0.05 (None: not a comparison)."""
    groups = seed_groups(results)
    singles = single_groups(results)
    group_of = {m: g for g in groups.values() for m in g["members"]}
    out = []
    for i, (a, b) in enumerate(pairs):
        na, nb = _resolve(results, a), _resolve(results, b)
        if na is None or nb is None:
            continue
        ga, gb = group_of[na], group_of[nb]
        kind = "seeds" if ga is gb and na != nb else "configurations"
        if kind == "seeds":
            ga, gb = singles[na], singles[nb]
        row = {"a": a, "b": b, "a_point": ga["point"], "b_point": gb["point"], "kind": kind,
               "seeds_a": [] if _seedless(ga) else ga["seeds"], "seeds_b": [] if _seedless(gb) else gb["seeds"],
               "id": group_delta(results, ga, gb, "id", i, n_resamples),
               "probe_kl": group_delta(results, ga, gb, "probe", i, n_resamples, 0),
               "probe_nll_delta": group_delta(results, ga, gb, "probe", i, n_resamples, 1)}
        out.append(row)
    tests = [(r, m) for r in out for m in MEASURES if r["kind"] == "configurations" and r[m] is not None]
    verdicts = holm([r[m]["p"] for r, m in tests])
    for r in out:
        r["holm"] = {m: None for m in MEASURES}
    for (r, m), h in zip(tests, verdicts):
        r["holm"][m] = h
    return out


def _seeds_text(sa: list, sb: list, kind: str) -> str:
    """The seeds column of the pairs table (``sa``/``sb``: [] for the base, which has none)."""
    if kind == "seeds":
        return f"seed {sa[0]} − seed {sb[0]}"
    fmt = lambda s: ", ".join(map(str, s))  # noqa: E731
    if not sa or not sb or sa == sb:
        s = sa or sb
        if not s:
            return "–"
        text = fmt(s) + (" paired" if sa and sb and len(s) > 1 else "")
    else:
        text = f"{fmt(sa)} vs {fmt(sb)}"
    return text + (" †" if max(len(sa), len(sb)) == 1 else "")


def _holm_cell(d: dict | None, h: dict | None, pct: bool = False) -> str:
    if d is None:
        return "–"
    if h is None:
        return _ci(d, pct)
    return f"{_ci(d, pct)} p {d['p']:.2g} {'✓' if h['survives'] else '✗'}"


def holm_note(verdicts: list[dict], n_resamples: int | None, what: str, n_bootstrap: int | None = None) -> str:
    """The sentences under a table of m comparisons (their :func:`rpsft.compare.stats.holm` verdicts): how many,
    how many survive Holm's correction at α, and whether the bootstrap can resolve α/m for the ``n_bootstrap`` of
    them (default: all) whose p-values are one-seed bootstrap ones (the others come from the crossed t interval)."""
    m = len(verdicts)
    if m == 0:
        return f"No {what}: nothing to correct."
    boot = m if n_bootstrap is None else n_bootstrap
    note = (f"{m} {what}, corrected together by Holm's method at α = {ALPHA:g} (family-wise error rate): "
            f"{sum(v['survives'] for v in verdicts)} of {m} survive (✓), the others do not (✗). p: two-sided "
            "p-value of Δ = 0 from the interval's own construction: several seeds, the crossed t interval "
            "inverted (p ≤ α exactly when its 1 − α interval excludes 0); one seed, the bootstrap's "
            "2·min(P*(Δ* ≤ 0), P*(Δ* ≥ 0)), each share (1 + count) / (B + 1).")
    if n_resamples and boot and 2 / (n_resamples + 1) > ALPHA / m:
        need = int(np.ceil(2 * m / ALPHA))
        if boot == m:
            note += (f" With {n_resamples} resamples the smallest p is {2 / (n_resamples + 1):.2g}, above α/m = "
                     f"{ALPHA / m:.2g}: none can survive; use `bootstrap` ≥ {need}.")
        else:
            note += (f" {boot} of the {m} p-values are one-seed bootstrap ones, at least {2 / (n_resamples + 1):.2g} "
                     f"with {n_resamples} resamples, above α/m = {ALPHA / m:.2g}: they can survive only after "
                     f"others are rejected; use `bootstrap` ≥ {need} to resolve them.")
    return note


def render_pairs(rows: list[dict], n_resamples: int | None = None) -> str:
    if not rows:
        return ""
    lines = ["", "## Paired differences", "",
             "| a | b | seeds | ID a − b (pts) | probe KL a − b | Δ NLL a − b |", "|---|---|---|---|---|---|"]
    for r in rows:
        h = r.get("holm") or {}
        lines.append(f"| {r['a_point']} | {r['b_point']} | {_seeds_text(r['seeds_a'], r['seeds_b'], r['kind'])} | "
                     f"{_holm_cell(r['id'], h.get('id'), True)} | {_holm_cell(r['probe_kl'], h.get('probe_kl'))} | "
                     f"{_holm_cell(r['probe_nll_delta'], h.get('probe_nll_delta'))} |")
    verdicts = [v for r in rows for v in (r.get("holm") or {}).values() if v is not None]
    n_boot = sum(r[m].get("df") is None for r in rows for m in MEASURES if (r.get("holm") or {}).get(m) is not None)
    lines += ["", "Each cell: a − b of the seed means [95 % interval over the seeds and the items both were scored "
              "on: the crossed t interval of docs/compare.md, whose seed term has S − 1 degrees of freedom, so two "
              "seeds give about one and a wide interval]. seeds: paired (seed s of a with seed s of b) when both ran "
              "the same seeds, a vs b when not (each side's seeds on their own); † one seed: the interval is the "
              "paired bootstrap over items and excludes seed noise. A name stands for its configuration at that "
              "step, all its seeds. seed s − seed t: two seeds of one configuration, over the items alone: the seed "
              "noise itself, not a comparison.", "",
              holm_note(verdicts, n_resamples, "comparisons (pairs × measures)", n_boot)]
    return "\n".join(lines) + "\n"


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


def _seeds_cell(r: dict) -> str:
    s = r.get("seeds") or []
    return "–" if not s else f"{s[0]} †" if len(s) == 1 else ", ".join(map(str, s))


def render_frontier(rows: list[dict], forgetting: str, n_resamples: int | None = None) -> str:
    lines = ["## Trade-off frontier", "",
             f"| point | family | step | seeds | ID gain (pts) | {FORGETTING_LABEL[forgetting]} | Δ NLL | ΔOOD (pts) "
             "| ΔID vs SFT@step | ΔKL vs SFT@step | Pareto |", "|" + "---|" * 11]
    pct_y = forgetting == "ood_drop"
    for r in sorted(rows, key=lambda r: (r["family"] != "base", str(r["family"]), r["step"] or 0, r["point"])):
        vs = r.get("vs_sft") or {}
        lines.append(f"| {r['point']} | {r['family']} | {r['step']} | {_seeds_cell(r)} "
                     f"| {_ci(r['id_gain'], True)} | {_ci(r['forgetting'], pct_y)} | "
                     f"{_ci(r['probe_nll_delta']) if forgetting != 'probe_nll_delta' else '(y)'} | "
                     f"{_ci(r.get('ood_delta'), True)} | {_ci(vs.get('id'), True)} | {_ci(vs.get('probe_kl'))} | "
                     f"{'✓' if r['pareto'] else ''} |")
    lines += ["", "Each point is a configuration at one step, averaged over its seeds (seeds: those averaged). Each "
              "cell: seed mean [95 % interval over the seeds and the items all models share: the crossed t interval "
              "of docs/compare.md, whose seed term has S − 1 degrees of freedom, so two seeds give about one and a "
              "wide interval]; † one seed: its intervals are the paired bootstrap over items and exclude seed noise. "
              "ID gain: score − base score "
              "on the ID items; KL and Δ NLL: token-weighted means over the probe prompts (resampled by prompt); "
              "ΔOOD: log-likelihood MC accuracy − base (final points only). vs SFT@step: the difference from SFT's "
              "point at the same optimizer step (seed s with seed s when both ran the same seeds). Pareto: no other "
              "point has at least as much ID gain and at most as much forgetting (one strictly). frontier.json "
              "keeps every seed's own point (`seed_points`)."]
    return "\n".join(lines) + "\n" + render_curve_gaps(rows, forgetting, n_resamples)


def _gap_cell(g: dict | None) -> str:
    if g is None:
        return "–"
    if g["delta"] is None:
        return "beyond (learns more than every point)"
    beyond = f", {100 * g['beyond']:.0f} % beyond" if g["beyond"] >= 0.005 else ""
    h = g.get("holm")
    holm_mark = "" if h is None else f" p {g['p']:.2g} {'✓' if h['survives'] else '✗'}"
    return f"{g['delta']:+.3g} [{g['lo']:+.3g}, {g['hi']:+.3g}] {g['verdict']}{beyond}{holm_mark}"


def render_curve_gaps(rows: list[dict], forgetting: str, n_resamples: int | None = None) -> str:
    """The table of :func:`curve_gap`: each point's forgetting minus each reference curve's at equal ID gain."""
    fams = list(dict.fromkeys(f for r in rows for f in (r.get("vs_curves") or {})))
    if not fams:
        return ""
    verdicts = [g["holm"] for r in rows for g in (r.get("vs_curves") or {}).values() if g.get("holm")]
    n_boot = sum(g.get("df") is None for r in rows for g in (r.get("vs_curves") or {}).values() if g.get("holm"))
    lines = ["", "## Against the reference curves", "",
             f"Gap = the point's {FORGETTING_LABEL[forgetting]} minus the curve's at the same ID gain "
             "(piecewise linear through the Pareto-optimal seed-mean points of the family, from the base; SFT's "
             "are its checkpoints, the others their grid's final points). 95 % interval: with several seeds on "
             "any point, the crossed t interval of the gap's linearisation (seeds and items); with one seed, the "
             "bootstrap over items, recomputing the curve in every resample. outside: less forgetting at equal ID "
             "gain, interval below 0; inside: more, "
             "interval above 0; unresolved: the interval holds 0; beyond: the point learns more than every point of "
             "the curve, where it cannot be read; edge: it does so in over 5 % of the bootstrap resamples (share "
             "given), so the interval is not trusted and there is no verdict. "
             + holm_note(verdicts, n_resamples, "comparisons (the gaps with a verdict: outside, inside or unresolved)",
                         n_boot),
             "",
             "| point | " + " | ".join(f"vs {f}" for f in fams) + " |", "|" + "---|" * (len(fams) + 1)]
    for r in sorted(rows, key=lambda r: (str(r["family"]), r["step"] or 0, r["point"])):
        vs = r.get("vs_curves")
        if vs:
            lines.append(f"| {r['point']} | " + " | ".join(_gap_cell(vs.get(f)) for f in fams) + " |")
    return "\n".join(lines) + "\n"


def plot_frontier(rows: list[dict], forgetting: str, path: str | Path, seed_rows: list[dict] | None = None) -> None:
    """ID gain (x) against forgetting (y) of the seed-mean points, 95 % interval bars on both axes; one curve per
    method family through its points in step order (one configuration's checkpoints) or gain order (a λ grid);
    the single seeds of a point averaged over several (``seed_rows``) as small open squares of the same colour;
    the Pareto front as a dashed black staircase."""
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
    averaged = {m for r in pts if len(r.get("seeds") or []) > 1 for m in r["members"]}
    singles = [r for r in seed_rows or [] if r["point"] in averaged and r["id_gain"] is not None
               and r["forgetting"] is not None]

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
        runs = list(dict.fromkeys(r["run"] for r in mine))
        if len(runs) == 1:  # one configuration's checkpoints: its curve in step order, labelled by step
            curve = sorted(mine, key=lambda r: r["step"] or 0)
            label_of = (lambda r: "") if fam == "base" else (lambda r: str(r["step"]))
        else:  # a grid of configurations (λ, k): the curve through their final points in order of ID gain
            curve = sorted([r for r in mine if r["final"]], key=lambda r: r["id_gain"]["delta"])
            label_of = lambda r: _short(r["point"].removeprefix(r["method"] + "-"))  # noqa: E731
            for run in runs:  # each configuration's own checkpoints: small markers on a dotted path to its end
                trail = sorted([r for r in mine if r["run"] == run], key=lambda r: r["step"] or 0)
                if len(trail) > 1:
                    ax.plot([X(r) for r in trail], [Y(r) for r in trail], ":", color=color, lw=0.8)
                    bars([r for r in trail if not r["final"]], color, "o", False, None, 4)
        bars(curve, color, "-o" if len(curve) > 1 else "o", True, fam, 10 if fam == "base" else 6)
        mine_single = [r for r in singles if r["family"] == fam]
        if mine_single:
            ax.scatter([X(r) for r in mine_single], [Y(r) for r in mine_single], marker="s", s=18,
                       facecolors="white", edgecolors=color, lw=0.8, label=f"{fam} (single seeds)")
        for r in curve:
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
    ax.set_title("Trade-off frontier (seed means, 95 % intervals over seeds and items; circled: Pareto-optimal)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a point
    fig.tight_layout()
    save_png(fig, path)


def _short(name: str) -> str:
    return name if len(name) <= 18 else name[:17] + "…"


def write_frontier(root: Path, results: dict, forgetting: str, n_resamples: int) -> list[dict]:
    """frontier.json (the seed-mean points with their curve gaps, every seed's own point, the block association)
    and frontier.png; returns the seed-mean points."""
    rows = frontier_points(results, forgetting, n_resamples)
    add_curve_gaps(rows, results, forgetting, n_resamples)
    singles = seed_points(results, forgetting, n_resamples)
    association = block_association(rows, n_resamples)
    fileio.write_json(root / "frontier.json", {"forgetting": forgetting, "points": rows, "seed_points": singles,
                                               "block_association": association})
    plot_frontier(rows, forgetting, root / "frontier.png", singles)
    plot_block_energies(rows, association, forgetting, root / "blocks.png", singles)
    return rows


# ------------------------------------------------------------------ where the drift goes (App. C.3 blocks)
BLOCK_KEYS = ("A", "BC", "D", "total")
BLOCK_LABEL = {"A": "‖A‖²", "BC": "‖B‖²+‖C‖²", "D": "‖D‖²", "total": "‖ΔW‖²"}


def point_blocks(res: dict) -> dict | None:
    """A point's block energies summed over the analysed matrices (``res["blocks"]``, the blocks stage):
    ``{"rank", "A", "BC", "D", "total", "share": {...}}``; the base moved nothing (all 0, no shares)."""
    st = res.get("blocks")
    if not st:
        return None
    e = st["all"]["energy"]
    out = {"rank": st.get("rank"), "A": e["A"], "BC": e["B"] + e["C"], "D": e["D"], "total": e["total"]}
    out["share"] = {b: (out[b] / e["total"] if e["total"] > 0 else None) for b in ("A", "BC", "D")}
    return out


def _forgetting_value(row: dict, measure: str) -> float | None:
    d = _forgetting(row, measure)
    return None if d is None else d["delta"]


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's ρ of each row pair of x and y (B × n): Pearson's r of the average ranks (ties averaged, as
    scipy.stats.spearmanr ranks them); NaN for a row where either side is constant."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x, axis=1), rankdata(y, axis=1)
    rx, ry = rx - rx.mean(axis=1, keepdims=True), ry - ry.mean(axis=1, keepdims=True)
    den = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(axis=1) / np.where(den > 0, den, 1.0), np.nan)


def rank_association(x, y, n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Spearman's ρ between x and y over points (scipy.stats.spearmanr) with a percentile bootstrap interval
    over points: ``n_resamples`` draws of n points with replacement (seeded), ρ recomputed on each; draws in which
    either side is constant (ρ undefined) are left out and counted. ``{"rho", "lo", "hi", "n", "resamples"}``;
    ρ is None with fewer than 3 points or a constant side."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(x)
    out = {"rho": None, "lo": None, "hi": None, "n": n, "resamples": 0}
    if n < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return out
    out["rho"] = float(spearmanr(x, y).statistic)
    idx = np.random.default_rng(seed).integers(0, n, (n_resamples, n))
    boot = spearman_rows(x[idx], y[idx])
    ok = boot[~np.isnan(boot)]
    alpha = (1 - confidence) / 2
    if ok.size:
        out["lo"], out["hi"] = float(np.quantile(ok, alpha)), float(np.quantile(ok, 1 - alpha))
    out["resamples"] = int(ok.size)
    return out


def block_association(rows: list[dict], n_resamples: int = 2000, seed: int = 0) -> list[dict]:
    """For each forgetting measure with data and each block energy (A, B + C, D, total): Spearman's ρ over the
    study's tuned points (every point with both values; the base is left out: it sits at zero on both axes by
    definition) with its bootstrap interval over points (:func:`rank_association`; the same seed for every cell,
    so equal point sets are resampled alike)."""
    out = []
    pts = [r for r in rows if r.get("point") != "base" and r.get("blocks")]
    for measure in FORGETTING_LABEL:
        have = [(r, _forgetting_value(r, measure)) for r in pts]
        have = [(r, v) for r, v in have if v is not None]
        if not have:
            continue
        y = [v for _, v in have]
        for b in BLOCK_KEYS:
            out.append({"measure": measure, "block": b,
                        **rank_association([r["blocks"][b] for r, _ in have], y, n_resamples, seed)})
    return out


def plot_block_energies(rows: list[dict], association: list[dict], forgetting: str, path: str | Path,
                        seed_rows: list[dict] | None = None) -> None:
    """Where each point's update went, and whether forgetting follows it. Left: the seed-mean energy of ΔW in the
    blocks of the base's top-k frame (‖A‖², ‖B‖²+‖C‖², ‖D‖², stacked, summed over the analysed matrices), one bar
    per point in order of ‖ΔW‖². Right: forgetting against each block's energy, one marker per point (open squares:
    the single seeds of a seed mean), titled with Spearman's ρ [95 % interval] of :func:`block_association`.
    Nothing is written without a point that has blocks and a forgetting value."""
    pts = sorted((r for r in rows if r.get("point") != "base" and r.get("blocks")
                  and _forgetting(r, forgetting) is not None), key=lambda r: r["blocks"]["total"])
    if not pts:
        return
    plt = pyplot()
    scale = 100.0 if forgetting == "ood_drop" else 1.0
    fig, axes = plt.subplots(1, 4, figsize=(17, max(4.2, 0.32 * len(pts) + 1.6)),
                             gridspec_kw={"width_ratios": [1.5, 1, 1, 1]})
    colors = {"A": "#1f77b4", "BC": "#ff7f0e", "D": "#d62728"}
    left = [0.0] * len(pts)
    for b in ("A", "BC", "D"):
        w = [r["blocks"][b] for r in pts]
        axes[0].barh(range(len(pts)), w, left=left, color=colors[b], label=BLOCK_LABEL[b])
        left = [u + v for u, v in zip(left, w)]
    axes[0].set_yticks(range(len(pts)), [f"{r['point']} ({len(r.get('seeds') or [])})" for r in pts], fontsize=8)
    axes[0].set(xlabel="energy of ΔW (sum over matrices)",
                title=f"Blocks of ΔW in the base's top-{pts[0]['blocks']['rank']} frame (seeds)")
    axes[0].legend(fontsize=8, loc="lower right")
    axes[0].grid(alpha=0.3, axis="x")
    averaged = {m for r in pts if len(r.get("seeds") or []) > 1 for m in r["members"]}
    singles = [r for r in seed_rows or [] if r["point"] in averaged and r.get("blocks")
               and _forgetting(r, forgetting) is not None]
    rho = {a["block"]: a for a in association if a["measure"] == forgetting}
    for ax, b in zip(axes[1:], ("A", "BC", "D")):
        ax.scatter([r["blocks"][b] for r in singles], [scale * _forgetting(r, forgetting)["delta"] for r in singles],
                   marker="s", facecolors="white", edgecolors=colors[b], s=18, lw=0.8)
        ax.scatter([r["blocks"][b] for r in pts], [scale * _forgetting(r, forgetting)["delta"] for r in pts],
                   color=colors[b], s=28, zorder=3)
        a = rho.get(b)
        title = BLOCK_LABEL[b]
        if a and a["rho"] is not None:
            title += f": ρ {a['rho']:+.2f}" + (f" [{a['lo']:+.2f}, {a['hi']:+.2f}]" if a["lo"] is not None else "")
        ax.set(xlabel=f"{BLOCK_LABEL[b]} (sum over matrices)", title=title)
        ax.grid(alpha=0.3)
    axes[1].set_ylabel(FORGETTING_LABEL[forgetting])
    fig.tight_layout()
    save_png(fig, path)


def render_block_association(assoc: list[dict]) -> str:
    if not assoc:
        return ""
    measures = list(dict.fromkeys(a["measure"] for a in assoc))
    cell = {(a["measure"], a["block"]): a for a in assoc}

    def fmt_cell(a: dict | None) -> str:
        if a is None or a["rho"] is None:
            return f"– (n = {a['n']})" if a else "–"
        ci = f" [{a['lo']:+.2f}, {a['hi']:+.2f}]" if a["lo"] is not None else ""
        return f"{a['rho']:+.2f}{ci}"

    n = max(a["n"] for a in assoc)
    lines = ["", "## Forgetting against where the drift went", "",
             "| forgetting measure | " + " | ".join(BLOCK_LABEL[b] for b in BLOCK_KEYS) + " | points |",
             "|" + "---|" * (len(BLOCK_KEYS) + 2)]
    for m in measures:
        lines.append(f"| {FORGETTING_LABEL[m]} | " + " | ".join(fmt_cell(cell.get((m, b))) for b in BLOCK_KEYS)
                     + f" | {cell[(m, 'total')]['n']} |")
    lines += ["", f"Spearman's ρ between each forgetting measure and each block's energy over the tuned points "
              f"(up to {n}; the base is left out) [percentile bootstrap 95 % interval over points]; "
              "energies in the base's top-k frame, summed over the analysed matrices."]
    return "\n".join(lines) + "\n"
