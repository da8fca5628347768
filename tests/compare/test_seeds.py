"""Seeds inside every interval of `rpsft compare`: with several seeds the crossed t interval (seed part with S − 1
degrees of freedom, shared item part, Banerjee's combination) covers at its nominal rate on simulated studies with
known variance components, down to two seeds, where the percentile two-stage bootstrap does not; it reduces to the
Student t interval over seeds with one item per seed and to the paired bootstrap over items with one seed; and the
frontier, curve gaps and pairs average a configuration over its seeds and pair seed s with seed s."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from rpsft.compare.stats import banerjee_interval, crossed_components, two_stage_bootstrap, two_stage_delta

STUDIES = 1000  # simulated studies per coverage check: the binomial s.d. of a 95 % rate is 0.7 points
RESAMPLES = 300


def coverage(simulate, truth: float, fit) -> float:
    """Share of STUDIES simulated studies whose 95 % interval (``fit(data, k)``) holds ``truth``; seeded."""
    rng = np.random.default_rng(2024)
    hit = 0
    for k in range(STUDIES):
        r = fit(simulate(rng), k)
        hit += r["lo"] <= truth <= r["hi"]
    return hit / STUDIES


def paired_study(S: int, n: int = 40):
    """Two configurations trained with the same S seeds and scored on the same n items. Both share a large seed
    effect (data order, init: sd 3) and item effect (difficulty: sd 3), which pairing must cancel; their difference
    has its own between-seed sd 1 (known), item sd 0.5 and cell noise sd 1. Truth: Δ = 0.25."""
    def simulate(rng):
        shared = 3 * rng.standard_normal((S, 1)) + 3 * rng.standard_normal((1, n))
        a = shared + 0.25 + rng.standard_normal((S, 1)) + 0.5 * rng.standard_normal((1, n)) \
            + rng.standard_normal((S, n)) / 2**0.5
        return a, shared + rng.standard_normal((S, n)) / 2**0.5
    return simulate


def _percentile(ab, k):
    boot = two_stage_bootstrap(*ab, seed=k, n_resamples=RESAMPLES)[1]
    return dict(zip(("lo", "hi"), np.quantile(boot, [0.025, 0.975])))


@pytest.mark.parametrize("S", [2, 3, 30])
def test_crossed_t_interval_covers_a_paired_difference_at_its_nominal_rate(S):
    simulate = paired_study(S)
    got = coverage(simulate, 0.25, lambda ab, k: two_stage_delta(*ab))
    assert abs(got - 0.95) <= 0.03, got  # measured: 95.4 % (2 seeds), 95.0 % (3), 94.7 % (30)
    if S == 3:  # the percentile two-stage bootstrap sees the seed variance through 3 values: far below nominal
        assert coverage(simulate, 0.25, _percentile) < 0.85  # measured 77 %
    if S == 30:  # resampling items only (each item's seed mean, as if one model) misses the seed noise
        items_only = coverage(simulate, 0.25, lambda ab, k: two_stage_delta(ab[0].mean(0), ab[1].mean(0), seed=k,
                                                                           n_resamples=RESAMPLES))
        assert items_only < 0.7, items_only


def test_two_seeds_give_one_degree_of_freedom_and_a_wide_interval():
    # the seed noise dominates: the interval is Student's t with 1 df over the two per-seed differences, about 4×
    # as wide (median) as the interval that knew the variance: what two seeds can say about the seed noise
    rng = np.random.default_rng(7)
    a, b = paired_study(2)(rng)
    r = two_stage_delta(a, b)
    assert r["df"] == pytest.approx(1.0, abs=0.05)
    sd = (1 / 2 + 0.25 / 40 + 1 / 80) ** 0.5  # the true s.d. of the estimate
    widths = [(lambda r: r["hi"] - r["lo"])(two_stage_delta(*paired_study(2)(rng))) for _ in range(400)]
    assert 3 < np.median(widths) / (2 * 1.96 * sd) < 6  # measured 4.4 (t₁ = 12.7 on a χ²₁ s.d.)


def test_crossed_t_interval_keeps_the_item_effect_all_seeds_share():
    # Seeds and items are crossed: every seed is scored on the same items, so an item's effect (sd 1) is common to
    # all 5 seeds and does not average out over them. Treating each seed's items as a draw of their own (the
    # nested scheme) would shrink its variance 5-fold (65 % coverage for the nested bootstrap, measured); the item
    # part of the crossed interval is the variance of the items' seed means, which keeps it.
    S, n = 5, 100

    def simulate(rng):
        return rng.standard_normal((1, n)) + 0.3 * rng.standard_normal((S, n))

    got = coverage(simulate, 0.0, lambda y, k: two_stage_delta(y))
    assert abs(got - 0.95) <= 0.03, got


def test_unpaired_weighted_sides_cover_and_their_variance_is_unbiased():
    # 3 seeds against 4 other seeds (unpaired), token-weighted items: Var θ̂ = σ²_αa/3 + σ²_αb/4 + q σ²_β
    # + q (σ²_εa/3 + σ²_εb/4) with q = Σ w̃², where β is the item effect of the difference
    n = 40
    w = 5.0 + np.arange(n) % 7
    q = float(np.sum((w / w.sum()) ** 2))
    truth = 0.25 / 3 + 0.64 / 4 + q * 0.5 + q * (1 / 3 + 0.25 / 4)

    def simulate(rng):
        item = rng.standard_normal((1, n))
        a = item + 0.5 * rng.standard_normal((3, 1)) + 0.5**0.5 * rng.standard_normal((1, n)) \
            + rng.standard_normal((3, n))
        return a, item + 0.8 * rng.standard_normal((4, 1)) + 0.5 * rng.standard_normal((4, n))

    rng = np.random.default_rng(11)
    draws = [simulate(rng) for _ in range(4000)]
    comps = [crossed_components([[a], [-b]], [w]) for a, b in draws]
    assert np.mean([c["var"] for c in comps]) == pytest.approx(truth, rel=0.05)
    assert np.var([c["estimate"] for c in comps]) == pytest.approx(truth, rel=0.05)  # the simulation itself
    # each side's seed variance with its S − 1 df, joined with Welch's df (between 2 and 2 + 3)
    assert all([nu for _, nu in c["seed_parts"]] == [2, 3] and 2 <= c["components"][0][1] <= 5 for c in comps)
    v = [v for v, _ in comps[0]["seed_parts"]]
    assert comps[0]["components"][0] == pytest.approx((sum(v), sum(v) ** 2 / (v[0] ** 2 / 2 + v[1] ** 2 / 3)))
    got = coverage(simulate, 0.0, lambda ab, k: two_stage_delta(*ab, weights=w, paired=False))
    assert abs(got - 0.95) <= 0.03, got


def test_crossed_variance_is_the_two_way_anova_estimate():
    # unweighted, one side: V = (MS_seed + MS_item − MS_res) / (S n), split into the seed part MS_seed / (S n)
    # (S − 1 df) and the item part (MS_item − MS_res) / (S n) (n − 1 df); by hand with loops
    rng = np.random.default_rng(3)
    S, n = 4, 25
    D = 0.8 * rng.standard_normal((S, 1)) + rng.standard_normal((1, n)) + 0.5 * rng.standard_normal((S, n))
    g = sum(D[s, i] for s in range(S) for i in range(n)) / (S * n)
    rows = [sum(D[s]) / n for s in range(S)]
    cols = [sum(D[:, i]) / S for i in range(n)]
    ms_seed = n * sum((r - g) ** 2 for r in rows) / (S - 1)
    ms_item = S * sum((c - g) ** 2 for c in cols) / (n - 1)
    ms_res = sum((D[s, i] - rows[s] - cols[i] + g) ** 2 for s in range(S) for i in range(n)) / ((S - 1) * (n - 1))
    c = crossed_components([[D]], [None])
    assert c["estimate"] == pytest.approx(g)
    assert np.array(c["components"]) == pytest.approx(np.array([[ms_seed / (S * n), S - 1],
                                                                [(ms_item - ms_res) / (S * n), n - 1]]))
    assert c["var"] == pytest.approx((ms_seed + ms_item - ms_res) / (S * n))
    r = two_stage_delta(D)
    h = (stats.t.ppf(0.975, S - 1) ** 2 * ms_seed / (S * n) + stats.t.ppf(0.975, n - 1) ** 2 * (ms_item - ms_res)
         / (S * n)) ** 0.5
    assert (r["lo"], r["hi"]) == pytest.approx((g - h, g + h))
    assert S - 1 < r["df"] < n - 1 and stats.t.ppf(0.975, r["df"]) * c["var"] ** 0.5 == pytest.approx(h)
    # the p-value inverts the same interval: at confidence 1 − p it just reaches 0
    edge = two_stage_delta(D, confidence=1 - r["p"])
    assert min(abs(edge["lo"]), abs(edge["hi"])) == pytest.approx(0, abs=1e-9)
    # seed×item noise and a seed effect, no item effect: the items' seed means are all 0.5, so V_item = 0 < V_res
    # and the item part is truncated away; the seed part is the per-seed means' (0.7, 0.3) alone, (0.2² · 2) / 2,
    # with 1 df
    checker = np.array([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]) + np.array([[0.2], [-0.2]])
    assert crossed_components([[checker]], [None])["components"] == [(pytest.approx(0.04), 1.0)]
    r = two_stage_delta(checker)
    h = stats.t.ppf(0.975, 1) * 0.2
    assert (r["lo"], r["hi"]) == pytest.approx((0.5 - h, 0.5 + h)) and r["df"] == 1.0


def test_banerjee_p_value_and_interval_agree_at_every_level():
    comps = [(0.3, 2.0), (0.02, 39.0)]
    for est in (0.5, 2.0, 5.0, 40.0):
        r = banerjee_interval(est, comps)
        assert (r["p"] <= 0.05) == (r["lo"] > 0)
        assert banerjee_interval(est, comps, confidence=1 - r["p"])["lo"] == pytest.approx(0, abs=1e-9)
    # one part: Student's t, its p the t-test's
    one = banerjee_interval(1.0, [(0.09, 4.0)])
    assert one["p"] == pytest.approx(2 * stats.t.sf(1 / 0.3, 4)) and one["df"] == 4.0
    assert one["hi"] - 1 == pytest.approx(stats.t.ppf(0.975, 4) * 0.3)
    assert banerjee_interval(0.0, []) == {"lo": 0.0, "hi": 0.0, "p": 1.0, "df": None}
    assert banerjee_interval(0.5, [])["p"] == 0.0


def _exact_seed_bootstrap(x: np.ndarray) -> np.ndarray:
    """Every ordered draw of len(x) seeds with replacement, equally likely: the exact bootstrap distribution of the
    mean."""
    return np.array([np.mean(x[list(d)]) for d in itertools.product(range(len(x)), repeat=len(x))])


def test_two_stage_bootstrap_with_one_item_per_seed_is_the_exact_bootstrap_over_seeds():
    x = np.array([-0.4, 0.1, 0.3, 1.2, 2.0])
    exact = np.sort(_exact_seed_bootstrap(x))  # 3125 draws
    est, boot, size = two_stage_bootstrap(x[:, None], seed=3, n_resamples=40000)
    assert est == pytest.approx(x.mean()) and size == {"n": 1, "seeds": 5, "seeds_b": None, "constant": False}
    # the whole distribution: the empirical CDF of the replicates against the exact one at every support point
    # (rounded: a mean summed in another order may differ in its last bit, and the CDF jumps at every atom)
    exact, rounded = np.round(exact, 9), np.round(boot, 9)
    cdf_boot = np.searchsorted(np.sort(rounded), exact, side="right") / boot.size
    cdf_exact = np.searchsorted(exact, exact, side="right") / exact.size
    assert np.max(np.abs(cdf_boot - cdf_exact)) < 0.01
    # paired by seed, one item each: the bootstrap over the per-seed differences
    b = np.array([0.1, 0.0, -0.2, 0.5, 0.4])
    paired = two_stage_bootstrap((x + b)[:, None], b[:, None], seed=3, n_resamples=40000)[1]
    assert np.allclose(paired, boot, rtol=0, atol=1e-12)  # the same seed draws, the same differences


def test_one_item_per_seed_is_the_student_t_interval_over_seeds():
    # no item part (one item: nothing to see of the items): the one-sample t interval over the seeds, its p the
    # t-test's
    x = np.array([-0.4, 0.1, 0.3, 1.2, 2.0])
    ref = stats.ttest_1samp(x, 0.0)
    r = two_stage_delta(x[:, None])
    assert (r["lo"], r["hi"]) == pytest.approx(tuple(ref.confidence_interval()), rel=1e-12)
    assert r["p"] == pytest.approx(ref.pvalue, rel=1e-9) and r["df"] == 4 and r["delta"] == pytest.approx(x.mean())
    # paired by seed, one item each: the paired t interval (scipy's ttest_rel)
    b = np.array([0.1, 0.0, -0.2, 0.5, 0.4])
    rel = stats.ttest_rel(x + b, b)
    pr = two_stage_delta((x + b)[:, None], b[:, None])
    assert (pr["lo"], pr["hi"]) == pytest.approx(tuple(rel.confidence_interval()), rel=1e-9)
    assert pr["p"] == pytest.approx(rel.pvalue, rel=1e-9)
    # every item of a seed equal to that seed's value: no item noise, no seed×item noise: the same interval
    flat = two_stage_delta(np.repeat(x[:, None], 7, axis=1))
    assert (flat["lo"], flat["hi"], flat["p"]) == pytest.approx((r["lo"], r["hi"], r["p"]), rel=1e-9)
    # two identical seeds: zero variance, the point interval
    assert two_stage_delta(np.ones((2, 3)))[("lo")] == 1.0 == two_stage_delta(np.ones((2, 3)))["hi"]


def test_one_seed_is_the_paired_bootstrap_over_items():
    from scipy.stats import bootstrap

    rng = np.random.default_rng(5)
    a, b = rng.normal(0.3, 1, 400), rng.normal(0.0, 1, 400)
    r = two_stage_delta(a, b, n_resamples=10000)
    ref = bootstrap((a, b), lambda x, y, axis=-1: (x - y).mean(axis=axis), paired=True, vectorized=True,
                    n_resamples=10000, method="percentile", rng=np.random.default_rng(0)).confidence_interval
    assert r["seeds"] == 1 and r["df"] is None and r["delta"] == pytest.approx(np.mean(a - b))
    assert r["lo"] == pytest.approx(ref.low, abs=0.01) and r["hi"] == pytest.approx(ref.high, abs=0.01)


def test_unpaired_seeds_and_bad_shapes():
    rng = np.random.default_rng(1)
    a, b = rng.normal(1.0, 0.2, (3, 50)), rng.normal(0.0, 0.2, (2, 50))
    r = two_stage_delta(a, b, paired=False)
    assert r["delta"] == pytest.approx(a.mean() - b.mean()) and (r["seeds"], r["seeds_b"]) == (3, 2)
    # a side with one seed adds no seed part (its seed noise is not seen): the other side's alone, 1 df
    one = crossed_components([[a[:1]], [-b]], [None])
    assert np.array(one["seed_parts"]) == pytest.approx(np.array([[b.mean(1).var(ddof=1) / 2, 1.0]]))
    assert one["components"][0] == pytest.approx((b.mean(1).var(ddof=1) / 2, 1.0))
    with pytest.raises(ValueError, match="paired seeds need as many rows on both sides, got 3 and 2; pass "
                                         "paired=False"):
        two_stage_delta(a, b)
    with pytest.raises(ValueError, match="same items"):
        two_stage_delta(a, b[:, :40], paired=False)


# ------------------------------------------------------------------------------------ the frontier with seeds
N_ID, N_PR = 120, 80


def _model(rng, p, kl, cfg, seed, step=16, final=True, family=None, run=None):
    """A compare result: teacher-forced ID items right with probability p, probe KL ≈ kl per prompt."""
    correct = (rng.random(N_ID) < p).astype(float)
    k = np.clip(kl + 0.004 * rng.standard_normal(N_PR), 0, None)
    return {"family": family or cfg.split("-")[0], "method": cfg.split("-")[0], "k": 0, "step": step, "seed": seed,
            "final": final, "run": run or cfg, "configuration": cfg,
            "id_tf": {"items": [{"id": str(i), "correct": c} for i, c in enumerate(correct)]},
            "probe": {"per_prompt": [{"id": f"p{j}", "kl": float(v), "nll_tuned": 1 + 3 * v, "nll_base": 1.0,
                                      "tokens": 5 + j % 7} for j, v in enumerate(k)]}}


def _study():
    """sft and rpsft with seeds 42 and 43 (seed 43 forgets 0.02 more in both: a shared seed effect), sft's
    checkpoint at step 8 with seed 42 only, rpsft-lam100 with seed 42 only."""
    rng = np.random.default_rng(0)
    res = {"sft@8": _model(rng, 0.15, 0.05, "sft", 42, step=8, final=False, run="sft"),
           "sft": _model(rng, 0.3, 0.10, "sft", 42), "sft-seed43": _model(rng, 0.3, 0.12, "sft", 43, run="sft-seed43"),
           "rpsft": _model(rng, 0.3, 0.08, "rpsft", 42),
           "rpsft-seed43": _model(rng, 0.3, 0.10, "rpsft", 43, run="rpsft-seed43"),
           "rpsft-lam100": _model(rng, 0.1, 0.03, "rpsft-lam100", 42, family="rpsft")}
    res["base"] = {"family": "base", "method": "base", "k": None, "step": 0, "final": True,
                   "id_tf": {"items": [{"id": str(i), "correct": 0.0} for i in range(N_ID)]}}
    return res


def _kl(res, name):
    from rpsft.compare.frontier import probe_items

    v = np.array([(x[0], x[2]) for x in probe_items(res[name]).values()])
    return float((v[:, 0] * v[:, 1]).sum() / v[:, 1].sum())


def _gain(res, name):
    from rpsft.compare.frontier import id_items

    return float(np.mean(list(id_items(res[name]).values())))


def test_frontier_points_are_seed_means_with_seed_noise_in_their_intervals():
    from rpsft.compare.frontier import frontier_points, render_frontier, seed_groups, seed_points

    res = _study()
    groups = seed_groups(res)
    assert list(groups) == ["sft@8", "sft", "rpsft", "rpsft-lam100", "base"]
    assert groups["sft"]["seeds"] == [42, 43] and groups["sft"]["members"] == ["sft", "sft-seed43"]
    rows = {r["point"]: r for r in frontier_points(res, "probe_kl", 1000)}
    sft = rows["sft"]
    assert sft["seeds"] == [42, 43] and sft["probe_kl"]["seeds"] == 2 and sft["id_gain"]["n"] == N_ID
    assert sft["probe_kl"]["delta"] == pytest.approx((_kl(res, "sft") + _kl(res, "sft-seed43")) / 2)
    assert sft["id_gain"]["delta"] == pytest.approx((_gain(res, "sft") + _gain(res, "sft-seed43")) / 2)
    singles = {r["point"]: r for r in seed_points(res, "probe_kl", 1000)}
    assert set(singles) == set(res) and singles["sft-seed43"]["seed"] == 43
    # each seed's own interval (items only) excludes the other seed's KL: "significantly" different seeds...
    s42, s43 = singles["sft"]["probe_kl"], singles["sft-seed43"]["probe_kl"]
    assert s42["hi"] < s43["lo"] and s42["seeds"] == 1
    # ...while the seed mean's interval holds both: the seed noise is inside it
    assert sft["probe_kl"]["lo"] < s42["delta"] and s43["delta"] < sft["probe_kl"]["hi"]
    # vs SFT at the same step pairs seed s with seed s: the shared seed-43 effect cancels
    vs = rows["rpsft"]["vs_sft"]
    per_seed = [_kl(res, "rpsft") - _kl(res, "sft"), _kl(res, "rpsft-seed43") - _kl(res, "sft-seed43")]
    assert vs["point"] == "sft" and vs["probe_kl"]["delta"] == pytest.approx(np.mean(per_seed))
    assert vs["probe_kl"]["hi"] < 0 and vs["probe_kl"]["seeds_b"] is None
    unpaired = rows["rpsft"]["probe_kl"]["hi"] - rows["rpsft"]["probe_kl"]["lo"]
    assert vs["probe_kl"]["hi"] - vs["probe_kl"]["lo"] < unpaired / 2
    # one seed against two: each side's seeds resampled on their own
    lam = rows["rpsft-lam100"]["vs_sft"]["probe_kl"]
    assert (lam["seeds"], lam["seeds_b"]) == (1, 2)
    assert lam["delta"] == pytest.approx(_kl(res, "rpsft-lam100") - (_kl(res, "sft") + _kl(res, "sft-seed43")) / 2)
    text = render_frontier(list(rows.values()), "probe_kl", 1000)
    assert "| sft | sft | 16 | 42, 43 |" in text and "| sft@8 | sft | 8 | 42 † |" in text
    assert "† one seed: its intervals are the paired bootstrap over items and exclude seed noise" in text
    assert "two seeds give about one and a wide interval" in text
    # two seeds whose KLs differ by 0.02: the seed part dominates and has one degree of freedom
    assert 1 <= sft["probe_kl"]["df"] < 1.1 and singles["sft"]["probe_kl"]["df"] is None


def test_curve_gaps_read_the_seed_mean_curve_and_count_their_comparisons():
    from rpsft.compare.frontier import add_curve_gaps, curve_gap, frontier_points, reference_curves

    res = _study()
    rows = frontier_points(res, "probe_kl", 300)
    curves = reference_curves(rows)
    assert curves["sft"] == ["base", "sft@8", "sft"] and curves["rpsft"] == ["base", "rpsft", "rpsft-lam100"]
    g = curve_gap(res, "rpsft-lam100", curves["sft"], n_resamples=500)
    # by hand on the seed means: sft@8 (one seed) and sft (mean of two) bracket rpsft-lam100's ID gain
    g8, g16 = _gain(res, "sft@8"), (_gain(res, "sft") + _gain(res, "sft-seed43")) / 2
    k8, k16 = _kl(res, "sft@8"), (_kl(res, "sft") + _kl(res, "sft-seed43")) / 2
    x = _gain(res, "rpsft-lam100")
    assert g["delta"] == pytest.approx(_kl(res, "rpsft-lam100") - np.interp(x, [0, g8, g16], [0, k8, k16]))
    assert g["seeds"] == 1 and 0 < g["p"] <= 1
    add_curve_gaps(rows, res, "probe_kl", 300)
    tested = [c for r in rows for c in (r.get("vs_curves") or {}).values() if c["verdict"] in
              ("outside", "inside", "unresolved")]
    assert tested and all(c["holm"] is not None for c in tested)
    p = sorted(c["p"] for c in tested)
    assert min(c["holm"]["p_holm"] for c in tested) == pytest.approx(min(1.0, len(tested) * p[0]))


def _seeded(cfg, family, seed, step, id_scores, kl, final=True):
    """A compare result of configuration ``cfg`` with the given per-item ID scores and per-prompt KLs."""
    run = cfg if seed == 42 else f"{cfg}-seed{seed}"
    return {"family": family, "method": family, "k": 0, "step": step, "seed": seed, "final": final,
            "run": run, "configuration": cfg,
            "id_tf": {"items": [{"id": str(i), "correct": float(c)} for i, c in enumerate(id_scores)]},
            "probe": {"per_prompt": [{"id": f"p{j}", "kl": float(v), "nll_tuned": 1 + v, "nll_base": 1.0,
                                      "tokens": 5 + j % 7} for j, v in enumerate(kl)]}}


def _gap_study(point_id, point_kl, curve_kl, seeds=(42, 43, 44)):
    """The base, SFT at steps 8 (every ID item 0.2) and 16 (0.6), and rpsft; per seed: the given ID scores and KLs
    (functions of the seed's index)."""
    res = {"base": {"family": "base", "method": "base", "k": None, "step": 0, "final": True,
                    "id_tf": {"items": [{"id": str(i), "correct": 0.0} for i in range(N_ID)]}}}
    for j, sd in enumerate(seeds):
        sfx = "" if sd == 42 else f"-seed{sd}"
        res[f"sft{sfx}@8"] = _seeded("sft", "sft", sd, 8, np.full(N_ID, 0.2), curve_kl(8, j), final=False)
        res[f"sft{sfx}"] = _seeded("sft", "sft", sd, 16, np.full(N_ID, 0.6), curve_kl(16, j))
        res[f"rpsft{sfx}"] = _seeded("rpsft", "rpsft", sd, 16, point_id(j), point_kl(j))
    return res


def test_curve_gap_with_seeds_is_the_crossed_t_interval_of_its_linearisation():
    from rpsft.compare.frontier import curve_gap

    rng = np.random.default_rng(4)
    kl = {(step, j): np.clip(0.05 * step / 8 + 0.01 * j + 0.004 * rng.standard_normal(N_PR), 0, None)
          for step in (8, 16) for j in range(3)}
    mine = [np.clip(0.06 + 0.012 * j + 0.004 * rng.standard_normal(N_PR), 0, None) for j in range(3)]
    # every ID item of rpsft at 0.4, halfway between SFT's 0.2 and 0.6 in every resample: the gap is linear,
    # KL_rpsft − (KL_sft@8 + KL_sft) / 2, a seed mean of token-weighted prompt means paired by seed
    res = _gap_study(lambda j: np.full(N_ID, 0.4), lambda j: mine[j], lambda step, j: kl[(step, j)])
    g = curve_gap(res, "rpsft", ["base", "sft@8", "sft"], n_resamples=200)
    Z = np.array([mine[j] - (kl[(8, j)] + kl[(16, j)]) / 2 for j in range(3)])
    ref = two_stage_delta(Z, weights=5 + np.arange(N_PR) % 7)
    assert g["delta"] == pytest.approx(ref["delta"]) and g["seeds"] == 3 and g["beyond"] == 0
    assert (g["lo"], g["hi"], g["p"], g["df"]) == pytest.approx((ref["lo"], ref["hi"], ref["p"], ref["df"]))
    # constant KLs, rpsft's ID varying by seed and item: gap = 0.02 − (0.1 / 0.6)·gain on the line from the base to
    # sft (sft@8 at KL 0.1 is off the front), so its interval is the gain's, scaled by the slope 1/6
    ids = [(rng.random(N_ID) < 0.3 + 0.03 * j).astype(float) for j in range(3)]
    res = _gap_study(lambda j: ids[j], lambda j: np.full(N_PR, 0.02), lambda step, j: np.full(N_PR, 0.1))
    g = curve_gap(res, "rpsft", ["base", "sft@8", "sft"], n_resamples=200)
    gain = two_stage_delta(np.array(ids))
    assert g["delta"] == pytest.approx(0.02 - gain["delta"] / 6)
    assert (g["hi"] - g["lo"]) == pytest.approx((gain["hi"] - gain["lo"]) / 6) and g["df"] == pytest.approx(gain["df"])


def test_pairs_pair_configurations_by_seed_and_set_apart_two_seeds_of_one():
    from rpsft.compare.frontier import MEASURES, pair_deltas, render_pairs

    res = _study()
    rows = pair_deltas(res, [["rpsft-seed43", "sft"], ["sft-seed43", "sft"], ["rpsft-lam100", "sft"],
                             ["sft", "base"]], 1000)
    conf, spread, lam, base = rows
    # a name stands for its configuration: rpsft (42, 43) − sft (42, 43), seed s with seed s
    assert (conf["a_point"], conf["b_point"], conf["kind"]) == ("rpsft", "sft", "configurations")
    assert conf["seeds_a"] == conf["seeds_b"] == [42, 43] and conf["probe_kl"]["seeds_b"] is None
    assert conf["probe_kl"]["delta"] == pytest.approx(
        (_kl(res, "rpsft") - _kl(res, "sft") + _kl(res, "rpsft-seed43") - _kl(res, "sft-seed43")) / 2)
    # two seeds of one configuration: their difference over the items alone, not a comparison
    assert spread["kind"] == "seeds" and spread["holm"] == {"id": None, "probe_kl": None, "probe_nll_delta": None}
    assert spread["probe_kl"]["delta"] == pytest.approx(_kl(res, "sft-seed43") - _kl(res, "sft"))
    assert spread["probe_kl"]["seeds"] == 1
    assert lam["seeds_a"] == [42] and lam["probe_kl"]["seeds_b"] == 2
    assert base["probe_kl"]["delta"] == pytest.approx((_kl(res, "sft") + _kl(res, "sft-seed43")) / 2)
    # Holm over the three configuration rows × three measures
    m = [h for r in rows for h in r["holm"].values() if h is not None]
    assert len(m) == 9
    text = render_pairs(rows, 1000)
    assert "| rpsft | sft | 42, 43 paired |" in text and "| sft-seed43 | sft | seed 43 − seed 42 |" in text
    assert "| rpsft-lam100 | sft | 42 vs 42, 43 |" in text and "| sft | base | 42, 43 |" in text
    assert "9 comparisons (pairs × measures)" in text and "none can survive" not in text
    # every p here is the crossed t interval's (two seeds on a side), and agrees with it at the 95 % level
    tested = [r[m] for r in rows for m in MEASURES if r["holm"][m] is not None]
    assert all(d["df"] is not None and (d["p"] <= 0.05) == (d["lo"] > 0 or d["hi"] < 0) for d in tested)
    assert "one-seed bootstrap" not in render_pairs(rows, 100)  # their p-values do not depend on B
    # one seed on both sides: a bootstrap p, whose smallest 2/101 cannot resolve α/m = 0.05/6 with 100 resamples
    mixed = pair_deltas(res, [["rpsft-lam100", "sft@8"], ["rpsft", "sft"]], 100)
    assert [mixed[0][m]["df"] for m in MEASURES] == [None] * 3 and mixed[1]["probe_kl"]["df"] is not None
    note = ("3 of the 6 p-values are one-seed bootstrap ones, at least 0.02 with 100 resamples, above α/m = 0.0083: "
            "they can survive only after others are rejected; use `bootstrap` ≥ 240")
    assert note in render_pairs(mixed, 100)
    only_boot = pair_deltas(res, [["rpsft-lam100", "sft@8"]], 100)
    assert "none can survive; use `bootstrap` ≥ 120" in render_pairs(only_boot, 100)


def test_plan_names_each_runs_configuration(monkeypatch):
    from rpsft.compare.config import load_compare_config
    from rpsft.compare.grid import plan_runs

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    runs = {r.name: r.configuration for r in plan_runs(load_compare_config(root / "configs" / "study.yaml"))}
    assert runs["sft-seed43"] == "sft" and runs["rpsft-lam10-k128-seed43"] == "rpsft-lam10-k128"
    assert {n: c for n, c in runs.items() if n != c} == {"sft-seed43": "sft",
                                                        "rpsft-lam10-k128-seed43": "rpsft-lam10-k128"}


def test_compare_averages_two_seeds_end_to_end(tmp_path, tiny_model_dir, synth_data):
    import json

    from rpsft.compare.config import load_compare_config
    from rpsft.compare.run import run_compare

    train_cfg = tmp_path / "train.yaml"
    train_cfg.write_text(
        f"model: {{name: {tiny_model_dir}}}\ndata: {{train: {synth_data['train']}, limit: 8, max_length: 96}}\n"
        "train: {max_steps: 2, batch_size: 4, grad_accum: 1, lr: 1.0e-3, save_steps: 2, warmup_ratio: 0}\n")
    cfg = load_compare_config(None, [
        f"output_dir={tmp_path / 'out'}", f"train_config={train_cfg}", "methods=[{name: sft}]",
        "sweep={method: sft, seed: [7]}", f"id={{teacher_forced: {synth_data['test']}, limit: 4}}",
        "ood={suites: []}", "probe_max_new_tokens=4", "rotation=false", "drift_limit=0", "blocks=false",
        "bootstrap=200", "pairs=[[sft-seed7, sft], [sft, base]]"])
    summary = run_compare(cfg, log=lambda m: None)
    out = json.loads((tmp_path / "out" / "frontier.json").read_text())
    points = {r["point"]: r for r in out["points"]}
    assert set(points) == {"base", "sft"} and points["sft"]["seeds"] == [7, 42]
    assert points["sft"]["members"] == ["sft-seed7", "sft"] and points["sft"]["probe_kl"]["seeds"] == 2
    singles = {r["point"]: r["probe_kl"]["delta"] for r in out["seed_points"]}
    assert set(singles) == {"base", "sft", "sft-seed7"}
    assert points["sft"]["probe_kl"]["delta"] == pytest.approx((singles["sft"] + singles["sft-seed7"]) / 2)
    spread, vs_base = summary["pairs"]
    assert spread["kind"] == "seeds" and vs_base["kind"] == "configurations" and vs_base["seeds_a"] == [7, 42]
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| sft | sft | 2 | 7, 42 |" in table and "| sft-seed7 | sft | seed 7 − seed 42 |" in table
    assert "3 comparisons (pairs × measures)" in table
