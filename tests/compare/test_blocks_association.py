"""How forgetting tracks each block of ΔW across a study's points: Spearman's ρ with a bootstrap over points,
checked against scipy and a brute-force loop; the frontier rows and the markdown it renders."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from rpsft.compare.frontier import (block_association, point_blocks, rank_association, render_block_association,
                                    spearman_rows)
from rpsft.compare.report import render_blocks


def test_rowwise_spearman_is_scipys_with_ties_and_constant_rows():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, (50, 9)).astype(float)  # many ties
    y = x + rng.integers(0, 3, (50, 9))
    got = spearman_rows(x, y)
    for i in range(50):
        if np.all(x[i] == x[i, 0]) or np.all(y[i] == y[i, 0]):
            assert np.isnan(got[i])
        else:
            assert got[i] == pytest.approx(spearmanr(x[i], y[i]).statistic, abs=1e-12)
    assert np.isnan(spearman_rows(np.ones((1, 5)), np.arange(5.0)[None]))[0]


def test_rank_association_against_a_brute_force_bootstrap():
    rng = np.random.default_rng(1)
    x = rng.normal(size=12)
    y = x + rng.normal(scale=0.8, size=12)
    got = rank_association(x, y, n_resamples=300, seed=7)
    assert got["rho"] == pytest.approx(spearmanr(x, y).statistic, abs=1e-12) and got["n"] == 12
    idx = np.random.default_rng(7).integers(0, 12, (300, 12))  # the same draws, one scipy call each
    boot = np.array([spearmanr(x[i], y[i]).statistic for i in idx])
    boot = boot[~np.isnan(boot)]
    assert got["resamples"] == boot.size
    assert got["lo"] == pytest.approx(np.quantile(boot, 0.025), abs=1e-12)
    assert got["hi"] == pytest.approx(np.quantile(boot, 0.975), abs=1e-12)
    assert got == rank_association(x, y, n_resamples=300, seed=7)  # fixed seed: reproducible


def test_rank_association_edge_cases():
    mono = rank_association([1, 2, 3, 4, 5], [0.1, 0.5, 0.6, 2.0, 9.0], n_resamples=200)
    assert mono["rho"] == pytest.approx(1.0) and mono["lo"] == pytest.approx(1.0) and mono["hi"] == pytest.approx(1.0)
    anti = rank_association([1, 2, 3, 4], [4, 3, 2, 1], n_resamples=200)
    assert anti["rho"] == pytest.approx(-1.0) and anti["hi"] == pytest.approx(-1.0)
    assert rank_association([1, 2], [1, 2])["rho"] is None  # fewer than 3 points
    assert rank_association([1, 1, 1, 1], [1, 2, 3, 4])["rho"] is None  # a constant side
    indep = rank_association(np.arange(40.0), np.random.default_rng(3).permutation(40), n_resamples=500)
    assert indep["lo"] < 0 < indep["hi"]


def _stage(A, B, C, D):
    e = {"A": A, "B": B, "C": C, "D": D, "total": A + B + C + D}
    return {"rank": 128, "all": {"energy": e}}


def test_frontier_rows_and_the_association_over_points():
    results = {"base": {}, "p1": {"blocks": _stage(1.0, 2.0, 3.0, 10.0)}, "p2": {"blocks": _stage(2.0, 1.0, 1.0, 30.0)},
               "p3": {"blocks": _stage(3.0, 0.5, 0.5, 20.0)}, "p4": {}}
    assert point_blocks(results["base"]) is None
    b = point_blocks(results["p1"])
    assert (b["A"], b["BC"], b["D"], b["total"], b["rank"]) == (1.0, 5.0, 10.0, 16.0, 128)
    assert b["share"] == {"A": 1 / 16, "BC": 5 / 16, "D": 10 / 16}
    assert point_blocks({"blocks": _stage(0.0, 0.0, 0.0, 0.0)})["share"] == {"A": None, "BC": None, "D": None}
    kl = {"p1": 0.1, "p2": 0.3, "p3": 0.2, "p4": 0.5}
    rows = [{"point": "base", "probe_kl": {"delta": 0.0}, "ood_delta": None, "blocks": None}]
    rows += [{"point": p, "probe_kl": {"delta": kl[p]}, "ood_delta": {"delta": -kl[p] / 10, "lo": 0, "hi": 0, "n": 3},
              "blocks": point_blocks(results[p])} for p in ("p1", "p2", "p3", "p4")]
    assoc = block_association(rows, n_resamples=200)
    cell = {(a["measure"], a["block"]): a for a in assoc}
    assert {m for m, _ in cell} == {"probe_kl", "ood_drop"}  # no point has probe_nll_delta: no row for it
    # KL orders p1 < p3 < p2 like D (10 < 20 < 30) and like the total; A (1, 2, 3) puts p3 last
    assert cell[("probe_kl", "D")]["rho"] == pytest.approx(1.0)
    assert cell[("probe_kl", "total")]["rho"] == pytest.approx(1.0)
    assert cell[("probe_kl", "A")]["rho"] == pytest.approx(spearmanr([1, 2, 3], [0.1, 0.3, 0.2]).statistic)
    assert cell[("probe_kl", "BC")]["n"] == 3  # the base and the point without blocks are left out
    assert cell[("ood_drop", "D")]["rho"] == pytest.approx(1.0)  # the OOD drop is −Δ, here = KL/10
    text = render_block_association(assoc)
    assert "## Forgetting against where the drift went" in text
    assert "| probe KL(base‖tuned) | +0.50" in text and "+1.00 [+1.00, +1.00] | 3 |" in text
    assert render_block_association([]) == ""
    summary = {"rows": [{"run": "base", "blocks": None}, {"run": "p1", "blocks": b}], "block_association": assoc}
    table = render_blocks(summary)
    assert "| p1 | 16 | 1 (6.2 %) | 5 (31.2 %) | 10 (62.5 %) |" in table and "k: 128" in table
    assert render_blocks({"rows": [{"run": "base"}]}) == ""


def test_block_energy_figure_draws_each_points_blocks_and_titles_each_panel_with_its_rho(monkeypatch, tmp_path):
    import rpsft.compare.frontier as frontier

    results = {"p1": {"blocks": _stage(1.0, 2.0, 3.0, 10.0)}, "p2": {"blocks": _stage(2.0, 1.0, 1.0, 30.0)},
               "p3": {"blocks": _stage(3.0, 0.5, 0.5, 20.0)}}
    kl = {"p1": 0.1, "p2": 0.3, "p3": 0.2}
    rows = [{"point": "base", "probe_kl": {"delta": 0.0}, "blocks": None}]
    rows += [{"point": p, "probe_kl": {"delta": kl[p]}, "blocks": point_blocks(results[p]), "seeds": [42],
              "members": [p]} for p in results]
    assoc = block_association(rows, n_resamples=200)
    figs = []
    monkeypatch.setattr(frontier, "save_png", lambda fig, path: figs.append(fig))
    frontier.plot_block_energies(rows, assoc, "probe_kl", tmp_path / "blocks.png")
    bars, *scatters = figs[0].axes
    assert [t.get_text() for t in bars.get_yticklabels()] == ["p1 (1)", "p3 (1)", "p2 (1)"]  # by ‖ΔW‖²: 16, 22, 32
    widths = [round(p.get_width(), 6) for p in bars.patches]  # A for each point, then B + C, then D
    assert widths == [1.0, 3.0, 2.0, 5.0, 1.0, 2.0, 10.0, 20.0, 30.0]
    assert [ax.get_title() for ax in scatters][2].startswith("‖D‖²: ρ +1.00 [")
    assert scatters[0].get_title().startswith("‖A‖²: ρ +0.50 [")
    ys = sorted(y for _, y in scatters[2].collections[1].get_offsets())
    assert ys == pytest.approx([0.1, 0.2, 0.3])
    figs.clear()
    frontier.plot_block_energies(rows[:1], assoc, "probe_kl", tmp_path / "none.png")  # only the base: no figure
    assert figs == []
