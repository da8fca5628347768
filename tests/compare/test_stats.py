"""One-seed intervals (the paired bootstrap over items), Holm's correction, Pareto-front extraction, the frontier
plot, curve gaps and paired differences against known answers."""

from __future__ import annotations

import numpy as np
import pytest

from rpsft.compare.stats import mean_interval, normal_interval, paired_delta, pareto_front


def test_identical_predictions_give_a_zero_width_interval():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 300).astype(float)
    r = paired_delta(a, a.copy())
    assert r == {"delta": 0.0, "lo": 0.0, "hi": 0.0, "p": 1.0, "df": None, "n": 300, "seeds": 1, "seeds_b": None}


def test_large_bernoulli_sample_matches_the_normal_interval():
    rng = np.random.default_rng(1)
    n = 4000
    a = (rng.random(n) < 0.3).astype(float)
    r = mean_interval(a, seed=3, n_resamples=4000)
    lo, hi = normal_interval(a.mean(), n)
    assert r["delta"] == pytest.approx(a.mean())
    assert r["lo"] == pytest.approx(lo, abs=0.003) and r["hi"] == pytest.approx(hi, abs=0.003)


def test_pairing_removes_the_shared_item_variance():
    # b = a except on 20 of 400 items: unpaired the difference of two ±2.4-point intervals would span ~±6 points;
    # paired it is the binomial interval of 20 flips alone
    rng = np.random.default_rng(2)
    a = (rng.random(400) < 0.5).astype(float)
    b = a.copy()
    flip = rng.choice(np.nonzero(a == 0)[0], 20, replace=False)
    b[flip] = 1.0
    r = paired_delta(b, a, seed=0)
    assert r["delta"] == pytest.approx(0.05)
    assert 0.02 < r["lo"] < 0.05 < r["hi"] < 0.08


def test_weighted_delta_is_the_per_token_mean():
    a, b, w = np.array([1.0, 3.0, 0.5]), np.array([0.0, 1.0, 0.5]), np.array([1.0, 3.0, 6.0])
    r = paired_delta(a, b, weights=w)
    assert r["delta"] == pytest.approx((1 * 1 + 2 * 3 + 0) / 10)
    assert r["lo"] <= r["delta"] <= r["hi"]


def test_paired_delta_refuses_unpaired_shapes():
    with pytest.raises(ValueError, match="same items"):
        paired_delta([1, 0, 1], [1, 0])


def test_bootstrap_p_counts_both_tails_with_the_plus_one_correction():
    from rpsft.compare.stats import bootstrap_p

    assert bootstrap_p(np.array([-1.0, 1.0, 2.0, 3.0])) == pytest.approx(2 * (1 + 1) / 5)  # P*(Δ* ≤ 0) side
    assert bootstrap_p(np.full(1999, 0.5)) == pytest.approx(2 / 2000)  # the smallest p with 1999 resamples
    assert bootstrap_p(np.zeros(100)) == 1.0 and bootstrap_p(np.array([0.0, 1.0])) == 1.0  # capped at 1


def test_holm_steps_down_and_stops_at_the_first_failure():
    from rpsft.compare.stats import holm

    got = holm([0.01, 0.04, None, 0.03, 0.005])
    # m = 4 (None is no comparison): 0.005 ≤ α/4, 0.01 ≤ α/3, 0.03 > α/2: stop; 0.04 ≤ α alone but is not reached
    assert [g and g["survives"] for g in got] == [True, False, None, False, True]
    assert [g and g["p_holm"] for g in got] == pytest.approx([0.03, 0.06, None, 0.06, 0.02])
    assert holm([]) == [] and holm([0.2, 0.9])[1] == {"p_holm": 0.9, "survives": False}


def test_pareto_front_on_hand_made_points():
    # (ID gain, forgetting): maximise x, minimise y
    pts = [(0.0, 0.0),   # base: optimal (nothing forgets less)
           (0.2, 0.1),   # optimal
           (0.2, 0.15),  # dominated by (0.2, 0.1)
           (0.1, 0.12),  # dominated by (0.2, 0.1)
           (0.3, 0.3),   # optimal (highest gain)
           (0.25, 0.1),  # optimal, and it dominates (0.2, 0.1)
           (0.3, 0.3)]   # a duplicate of an optimal point is optimal too
    assert pareto_front(pts) == [0, 5, 4, 6]
    assert pareto_front([(0.1, float("nan")), (0.0, 0.0)]) == [1]


def _row(point, family, run, step, gain, kl, final=True, seeds=(42,), method=None, members=None):
    ci = lambda v, h: {"delta": v, "lo": v - h, "hi": v + h, "n": 200}  # noqa: E731
    return {"point": point, "family": family, "run": run, "step": step, "seeds": list(seeds), "final": final,
            "members": members or [point], "method": method or family.split()[0], "id_gain": ci(gain, 0.03),
            "forgetting": ci(kl, 0.01), "pareto": False}


def test_frontier_plot_draws_one_curve_per_family_and_the_front(tmp_path, monkeypatch):
    import matplotlib.axes

    from rpsft.compare.frontier import plot_frontier

    rows = [_row("base", "base", "base", 0, 0.0, 0.0, seeds=()),
            *[_row(f"sft@{s}" if s < 16 else "sft", "sft", "sft", s, g, k, s == 16)
              for s, g, k in ((4, 0.05, 0.02), (8, 0.12, 0.05), (12, 0.2, 0.09))],
            _row("sft", "sft", "sft", 16, 0.25, 0.12, seeds=(42, 43), members=["sft", "sft-seed43"]),
            *[_row(f"l2init-lam{lam}", "l2init", f"l2init-lam{lam}", 16, g, k)
              for lam, g, k in ((1, 0.24, 0.1), (10, 0.15, 0.04), (100, 0.03, 0.01))],
            _row("l2init-lam10@8", "l2init", "l2init-lam10", 8, 0.08, 0.02, final=False)]
    for j in pareto_front([(r["id_gain"]["delta"], r["forgetting"]["delta"]) for r in rows]):
        rows[j]["pareto"] = True
    # the single seeds of the averaged point; l2init's own point is no average: not drawn twice
    seed_rows = [_row("sft", "sft", "sft", 16, 0.26, 0.125), _row("sft-seed43", "sft", "sft-seed43", 16, 0.24, 0.115,
                                                                   seeds=(43,)),
                 _row("l2init-lam1", "l2init", "l2init-lam1", 16, 0.24, 0.1)]
    labels, marks = [], []
    real, real_scatter = matplotlib.axes.Axes.errorbar, matplotlib.axes.Axes.scatter
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda self, x, y, **kw: labels.append((kw.get("label"), len(x))) or real(self, x, y, **kw))
    monkeypatch.setattr(matplotlib.axes.Axes, "scatter",
                        lambda self, x, y, **kw: marks.append((kw.get("label"), list(x)))
                        or real_scatter(self, x, y, **kw))
    plot_frontier(rows, "probe_kl", tmp_path / "f.png", seed_rows)
    assert (tmp_path / "f.png").stat().st_size > 1000
    # base; SFT's 4 points (3 checkpoints, the 2-seed mean) as one curve, the mean's two seeds as markers;
    # L2-Init's 3 finals as one curve, plus the checkpoint of its λ = 10 run
    assert ("sft", 4) in labels and ("l2init", 3) in labels
    assert (None, 1) in labels and ("base", 1) in labels
    assert ("sft (single seeds)", [26.0, 24.0]) in marks and not any(str(m[0]).startswith("l2init") for m in marks)
    # L2-Init at λ = 10 lies outside SFT's curve (more gain than sft@8 with less KL), and so does its step-8
    # checkpoint against sft@4: both SFT points are off the front
    assert [r["point"] for r in rows if r["pareto"]] == ["base", "sft@12", "sft", "l2init-lam1", "l2init-lam10",
                                                          "l2init-lam100", "l2init-lam10@8"]


def _result(family, step, correct, kl, seed=42, final=True, tokens=None):
    """A compare result with teacher-forced ID items and probe prompts (KL per prompt, NLL delta = 2·KL)."""
    tokens = tokens or [10] * len(kl)
    return {"family": family, "method": family.split()[0], "step": step, "seed": seed, "final": final,
            "run": family, "k": None,
            "id_tf": {"items": [{"id": str(i), "correct": float(c)} for i, c in enumerate(correct)]},
            "probe": {"per_prompt": [{"id": f"p{j}", "kl": v, "nll_tuned": 1 + 2 * v, "nll_base": 1.0, "tokens": t}
                                     for j, (v, t) in enumerate(zip(kl, tokens))]}}


def _curve_results(n=200, m=120):
    rng = np.random.default_rng(0)

    def correct(p):  # exactly round(p·n) items right, at random places
        c = np.zeros(n)
        c[rng.choice(n, int(round(p * n)), replace=False)] = 1
        return c

    def kl(mu):
        return list(np.clip(mu + 0.004 * rng.standard_normal(m), 0, None))

    res = {"base": {"family": "base", "step": 0, "seed": None, "final": True, "run": "base", "method": "base",
                    "id_tf": {"items": [{"id": str(i), "correct": 0.0} for i in range(n)]}}}
    for step, p, mu in [(4, 0.1, 0.02), (8, 0.2, 0.04), (12, 0.3, 0.06)]:
        res[f"sft@{step}"] = _result("sft", step, correct(p), kl(mu), final=False)
    res["sft"] = _result("sft", 16, correct(0.4), kl(0.08))
    res["good"] = _result("rpsft k=8", 16, correct(0.25), kl(0.02))
    res["on"] = _result("rpsft k=8", 16, correct(0.25), kl(0.05))
    res["bad"] = _result("l2init", 16, correct(0.25), kl(0.09))
    res["far"] = _result("l2init", 16, correct(0.9), kl(0.01))
    return res


def mean_kl_of(res, name):
    from rpsft.compare.frontier import probe_items

    return np.mean([v[0] for v in probe_items(res[name]).values()])


def gain_of(res, name):
    from rpsft.compare.frontier import id_items

    return np.mean(list(id_items(res[name]).values()))


def test_curve_gap_reads_the_reference_at_equal_id_gain():
    from rpsft.compare.frontier import curve_gap, id_items, probe_items

    res = _curve_results()
    sft = ["base", "sft@4", "sft@8", "sft@12", "sft"]
    g = curve_gap(res, "good", sft, n_resamples=1000)
    # by hand: ID gain 0.25 lies halfway between sft@8 (0.2) and sft@12 (0.3): the curve's KL is their mean
    mean_kl = {n: np.mean([v[0] for v in probe_items(res[n]).values()]) for n in sft[1:] + ["good"]}
    gain = {n: np.mean(list(id_items(res[n]).values())) for n in sft[1:] + ["good"]}
    t = (gain["good"] - gain["sft@8"]) / (gain["sft@12"] - gain["sft@8"])
    assert g["delta"] == pytest.approx(mean_kl["good"] - ((1 - t) * mean_kl["sft@8"] + t * mean_kl["sft@12"]))
    assert g["verdict"] == "outside" and g["hi"] < 0 and g["lo"] < g["delta"] < g["hi"]
    assert g["n_id"] == 200 and g["n_probe"] == 120 and g["beyond"] < 0.05
    on = curve_gap(res, "on", sft, n_resamples=1000)
    assert on["verdict"] == "unresolved" and on["lo"] < 0 < on["hi"]
    assert curve_gap(res, "bad", sft, n_resamples=1000)["verdict"] == "inside"
    # at the curve's last ID gain, about half the resamples fall beyond it: no verdict
    same_count = np.roll([x["correct"] for x in res["sft"]["id_tf"]["items"]], 7)  # SFT's gain, other items
    res["edge"] = _result("l2init", 16, same_count, [0.01] * 120)
    edge = curve_gap(res, "edge", sft, n_resamples=500)
    assert edge["verdict"] == "edge" and 0.05 < edge["beyond"] < 0.95 and edge["delta"] is not None
    far = curve_gap(res, "far", sft, n_resamples=500)
    assert far["verdict"] == "beyond" and far["delta"] is None and far["beyond"] == 1.0
    # a dominated curve point is passed over: l2init's "bad" (gain 0.25, KL 0.09) lies above the line from the
    # base to "far" (gain 0.9, KL 0.01), which is the family's front
    l2 = curve_gap(res, "good", ["base", "bad", "far"], n_resamples=200)
    assert l2["delta"] == pytest.approx(mean_kl["good"] - mean_kl_of(res, "far") * gain["good"] / gain_of(res, "far"))
    # the Δ NLL measure (2·KL here) gives twice the gap
    assert curve_gap(res, "good", sft, which=1, n_resamples=200)["delta"] == pytest.approx(2 * g["delta"])
    # a point identical to a curve point sits on the curve: zero gap
    res["twin"] = {**res["sft@8"], "family": "rpsft k=8"}
    assert curve_gap(res, "twin", sft, n_resamples=200)["delta"] == pytest.approx(0, abs=1e-12)


def test_curve_gaps_in_the_frontier_table():
    from rpsft.compare.frontier import add_curve_gaps, frontier_points, reference_curves, render_frontier

    res = _curve_results()
    rows = frontier_points(res, "probe_kl", 300)
    curves = reference_curves(rows)
    assert curves["sft"] == ["base", "sft@4", "sft@8", "sft@12", "sft"]
    assert curves["rpsft k=8"] == ["base", "good", "on"] and curves["l2init"] == ["base", "bad", "far"]
    add_curve_gaps(rows, res, "probe_kl", 300)
    by = {r["point"]: r for r in rows}
    assert set(by["good"]["vs_curves"]) == {"sft", "l2init"}  # never against its own curve
    assert by["good"]["vs_curves"]["sft"]["verdict"] == "outside"
    assert "sft@4" in by and set(by["sft@4"]["vs_curves"]) == {"rpsft k=8", "l2init"}
    text = render_frontier(rows, "probe_kl")
    assert "## Against the reference curves" in text and "| good |" in text and "outside" in text
    rows_ood = frontier_points(res, "ood_drop", 100)
    add_curve_gaps(rows_ood, res, "ood_drop", 100)
    assert all("vs_curves" not in r for r in rows_ood)


def test_pair_deltas_are_paired_differences_of_both_measures():
    from rpsft.compare.frontier import pair_deltas, render_pairs

    res = _curve_results()
    rows = pair_deltas(res, [["good", "sft@8"], ["sft", "base"], ["good", "good"]], 500)
    good_vs_8, sft_vs_base, same = rows
    assert good_vs_8["id"]["delta"] == pytest.approx(gain_of(res, "good") - gain_of(res, "sft@8"))
    assert good_vs_8["probe_kl"]["delta"] == pytest.approx(mean_kl_of(res, "good") - mean_kl_of(res, "sft@8"))
    assert good_vs_8["probe_kl"]["hi"] < 0 and good_vs_8["probe_nll_delta"]["delta"] == pytest.approx(
        2 * good_vs_8["probe_kl"]["delta"])
    assert sft_vs_base["probe_kl"]["delta"] == pytest.approx(mean_kl_of(res, "sft"))  # the base forgets nothing
    assert same["id"] == {"delta": 0.0, "lo": 0.0, "hi": 0.0, "p": 1.0, "df": None, "n": 200, "seeds": 1,
                          "seeds_b": None}
    # one seed each: item intervals; 3 pairs × 3 measures are the comparisons Holm corrects
    assert good_vs_8["kind"] == "configurations" and good_vs_8["seeds_a"] == [42] and sft_vs_base["seeds_b"] == []
    assert good_vs_8["holm"]["probe_kl"]["survives"] and not same["holm"]["id"]["survives"]
    text = render_pairs(rows, 500)
    assert "## Paired differences" in text and "| good | sft@8 | 42 † |" in text
    assert "9 comparisons (pairs × measures)" in text and " ✓ |" in text and " ✗ |" in text
    assert render_pairs([]) == ""
