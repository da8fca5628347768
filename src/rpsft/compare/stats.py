"""Intervals, p-values and frontiers for comparisons: seed-aware intervals (a Student-t interval over seeds and
items, a paired bootstrap over items for one seed), Holm's correction, and Pareto extraction.

Every model in a comparison is scored on the same items (the same ID problems, the same probe prompts), and a
configuration may be trained with several seeds. A difference between configurations therefore varies with the
items drawn *and* with the seeds trained; an interval over items only reports two seeds of one configuration as
"significantly" different. Seeds and items are *crossed*: every seed is scored on every item, so an item's effect
is shared by all seeds and does not average out over them.

**Several seeds: the crossed variance-component t interval** (:func:`crossed_t`). A difference is a seed mean of
weighted item means, θ̂ = (1/S) Σ_s m_s with m_s = Σ_i w̃_i D_si (w̃ = w / Σw, uniform without weights; D the
per-seed differences, seeds × items). Under the crossed random-effects model D_si = θ + α_s + β_i + ε_si (seed,
item and seed×item effects, variances σ_α², σ_β², σ_ε²), with q = Σ w̃_i²,

    Var θ̂ = σ_α² / S + q σ_β² + q σ_ε² / S.

Three mean squares estimate it without bias. With a_s = m_s − θ̂, d_i = (1/S) Σ_s D_si (the item's seed mean),
b_i = d_i − Σ_j w̃_j d_j, e_si = D_si − m_s − d_i + θ̂ and c = q − 2 Σ w̃_i³ + q² (= (n − 1)/n² unweighted; it
makes each estimate unbiased, as E b_i² = τ² (1 − 2 w̃_i + q) for a centred sum of independent terms):

* seed:  V_seed = Σ_s a_s² / (S (S − 1)),                  E = σ_α² / S + q σ_ε² / S,  S − 1 df;
* item:  V_item = q Σ_i w̃_i² b_i² / c,                     E = q σ_β² + q σ_ε² / S,    n_eff − 1 df;
* seed×item: V_res = q Σ_si w̃_i² e_si² / (S (S − 1) c),    E = q σ_ε² / S,             (S − 1)(n_eff − 1) df,

with n_eff = 1/q (n unweighted). V_seed is the sample variance of the per-seed means over S (the "seed
component"), V_item the item variance of the seed-mean difference with the seeds fixed (the "item component":
what a bootstrap over items of the seed mean estimates); both hold the seed×item noise q σ_ε² / S, which V_res
measures on its own, so

    V = V_seed + V_item − V_res

is unbiased for Var θ̂ (unweighted it is (MS_seed + MS_item − MS_res) / (S n), the variance of the grand mean in
the two-way crossed random ANOVA). It splits into two independent parts: the seed part V_seed, the sample variance
over S of the S independent per-seed means m_s (the item effect Σ_i w̃_i β_i is the same in every m_s and drops
out of their spread), a scaled χ² with S − 1 df under normality; and the item part
V_I = (V_item − V_res)₊ (the shared item effect q σ_β²), with n_eff − 1 df, the df of V_item, whose error
dominates it. The item part is truncated at zero as an ANOVA variance component is; the seed part is not, even
below V_res: the t quantile's calibration counts on the χ² draws that come out small (per-seed means that agree
exactly give a zero seed part, as Student's t over the seeds would; raising V_seed to V_res covers 99 % at 2 seeds,
giving it V_res's df instead 91 %, measured). The interval adds the two parts as Banerjee adds
independent means with unequal variances (Banerjee, Sankhyā 22, 1960),

    θ̂ ± √( t²_{S−1, 1−α/2} V_seed + t²_{n_eff−1, 1−α/2} V_I ),

which covers at least 1 − α whatever the ratio of the true variances (for independent χ² variance estimates),
and is the Student t interval when one part is zero. Its p-value inverts the same interval: the α at which the
1 − α interval just reaches 0, so p ≤ α exactly when that interval excludes 0 (one part: the t-test's p). Its
``df`` is the ν with t_ν √V = the half-width. The seed part's S − 1 df are what few seeds can say about the seed
noise: two seeds give one degree of freedom and t = 12.7, a wide interval, and honestly so. Welch–Satterthwaite's
single df for V instead (ν = V² / Σ_k V_k² / ν_k) covers 88.7 % at 2 seeds and 93.6 % at 3 on
tests/compare/test_seeds.py's paired study, where the seed noise dominates: when the χ²₁ seed estimate comes out
small, ν grows and the t quantile shrinks with it.

Configurations run with different seeds are independent *sides* x, each with its own S_x: θ̂ = Σ_x ±θ̂_x. Every
side with two or more seeds adds its V_seed to the seed part, whose df are Welch's, (Σ_x V_x)² / Σ_x V_x² /
(S_x − 1), as in the two-sample Welch t: between the smallest S_x − 1 and their sum, never the item part's large
df (tests/compare/test_seeds.py's unpaired study, 3 against 4 seeds: 96.5 %, where a Banerjee term per side gives
98.5 %). The item part is that of the difference of the item means, which all sides share (paired items), less
every such side's seed×item term. A side with one seed has no seed part: its seed noise is not seen and stays out
of V. Several item sets (ID items and probe prompts, drawn independently) add their item and seed×item terms, the
item part's df Welch–Satterthwaite's over the sets; a seed's m_s is then its total over the item sets.
Reductions: with one item per seed, or every item of a seed equal to that seed's value, V_item = V_res = 0 and the
interval is the one-sample (paired by seed: the paired) Student t interval over the seeds, its p the t-test's.

**One seed: the paired bootstrap over items** (:func:`two_stage_bootstrap`, percentile interval,
:func:`bootstrap_p`): it excludes seed noise, and the tables say so. The same machinery draws the seeds first
(the two-stage bootstrap: seeds, then one draw of items shared by every seed and both sides); a percentile
interval from it sees the seed variance through S values only and covers 66 % (2 seeds), 77 % (3) and 86 % (5)
for a nominal 95 % on tests/compare/test_seeds.py's simulation, so it serves one seed only (where its seed stage
does nothing) and the share of resamples in which a point falls beyond a curve's end
(:func:`rpsft.compare.frontier.curve_gap`). Each resample is a pair of count vectors (how often each seed and each
item was drawn), so a resampled (weighted) mean is one matrix product: Σ_s Σ_i G_s C_i w_i Y_si / (Σ_s G_s ·
Σ_i C_i w_i). Percentile intervals are defined for degenerate data too (two identical models give [0, 0]).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

N_RESAMPLES = 2000
CONFIDENCE = 0.95
ALPHA = 0.05  # family-wise error rate of Holm's correction
P_FLOOR = 1e-40  # smaller inverted p-values are reported as this: scipy's t quantiles lose accuracy beyond it


def resample_counts(rng: np.random.Generator, k: int, n_resamples: int) -> np.ndarray:
    """``n_resamples × k``: how often each of k units is picked when k are drawn with replacement (one row per
    resample; the multinomial(k, 1/k) counts, the same distribution as counting k uniform indices)."""
    return rng.multinomial(k, np.full(k, 1.0 / k), size=n_resamples)


def seed_item_means(Y: np.ndarray, seed_counts: np.ndarray, item_counts: np.ndarray,
                    weights: np.ndarray | None = None) -> np.ndarray:
    """Per resample b: the mean over the drawn seeds of the (weighted) mean over the drawn items,
    Σ_s Σ_i G_bs C_bi w_i Y_si / (Σ_s G_bs · Σ_i C_bi w_i), for Y (seeds × items), G = ``seed_counts``
    (B × seeds) and C = ``item_counts`` (B × items)."""
    cw = item_counts if weights is None else item_counts * weights
    return ((seed_counts @ Y) * cw).sum(axis=1) / (seed_counts.sum(axis=1) * cw.sum(axis=1))


def bootstrap_p(boot: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "the quantity is 0": p = 2·min(P*(Δ* ≤ 0), P*(Δ* ≥ 0)) over the B
    resamples, each share counted as (1 + count) / (B + 1) (the +1 keeps p > 0 with finitely many resamples: the
    smallest attainable p is 2 / (B + 1)), capped at 1."""
    b = np.asarray(boot, dtype=np.float64)
    le, ge = (1 + np.count_nonzero(b <= 0)) / (b.size + 1), (1 + np.count_nonzero(b >= 0)) / (b.size + 1)
    return float(min(1.0, 2 * min(le, ge)))


def _rows(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"two_stage_delta: {name} must be seeds × items (or one seed's items), got shape {x.shape}")
    return x


def _inputs(a, b, weights, paired: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The checked arguments of :func:`two_stage_delta` as (A, B, w): A seeds × items; B None when the difference
    is one matrix (paired seeds, or a seedless 1-D ``b``, subtracted from every row), else the other side's own
    seeds × items."""
    A = _rows(a, "a")
    S, n = A.shape
    if n == 0:
        raise ValueError("two_stage_delta: no items")
    Bm = None if b is None else np.asarray(b, dtype=np.float64)
    if Bm is not None and Bm.shape[-1] != n:
        raise ValueError(f"two_stage_delta needs both sides over the same items, got shapes {A.shape}, {Bm.shape}")
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    if w is not None and w.shape != (n,):
        raise ValueError(f"weights shape {w.shape} != items ({n},)")
    if Bm is not None and (Bm.ndim == 1 or paired):  # one matrix of per-seed differences
        if Bm.ndim == 2 and Bm.shape[0] != S:
            raise ValueError(f"two_stage_delta: paired seeds need as many rows on both sides, got {S} and "
                             f"{Bm.shape[0]}; pass paired=False to resample each side's seeds on its own")
        A, Bm = A - Bm, None  # a seedless b (1-D) is the same for every seed
    return A, None if Bm is None else _rows(Bm, "b"), w


def two_stage_bootstrap(a, b=None, weights: Sequence[float] | None = None, paired: bool = True, seed: int = 0,
                        n_resamples: int = N_RESAMPLES) -> tuple[float, np.ndarray, dict]:
    """The estimate, the ``n_resamples`` two-stage bootstrap replicates (seeds, then one draw of items for every
    seed and both sides) and the sizes of :func:`two_stage_delta`'s arguments (described there): ``(delta,
    replicates, {"n", "seeds", "seeds_b", "constant"})``; ``constant``: the data are constant, so every replicate
    is the estimate."""
    A, Bm, w = _inputs(a, b, weights, paired)
    S, n = A.shape

    def stat(ga, c, gb=None):
        out = seed_item_means(A, ga, c, w)
        return out if Bm is None else out - seed_item_means(Bm, gb, c, w)

    sb = None if Bm is None else Bm.shape[0]
    est = float(stat(np.ones((1, S)), np.ones((1, n)), None if Bm is None else np.ones((1, sb)))[0])
    rng = np.random.default_rng(seed)
    ga = resample_counts(rng, S, n_resamples)  # stage 1: the seeds (each side's own when they are not paired)
    gb = None if Bm is None else resample_counts(rng, sb, n_resamples)
    boot = stat(ga, resample_counts(rng, n, n_resamples), gb)  # stage 2: one draw of items for every seed
    constant = bool(np.all(A == A.flat[0]) and (Bm is None or np.all(Bm == Bm.flat[0])))
    return est, boot, {"n": n, "seeds": S, "seeds_b": sb, "constant": constant}


def crossed_components(sides: Sequence[Sequence[np.ndarray]], weights: Sequence[np.ndarray | None]) -> dict:
    """The estimate and the independent variance components of a sum of seed means of weighted item means (the
    module docstring derives them).

    ``sides[x][j]``: side x's S_x × n_j matrix on item set j, the statistic's coefficients (signs included)
    applied, so that the statistic is Σ_x (1/S_x) Σ_s Σ_j Σ_i w̃_ji Z_xj,si with w̃_j = ``weights[j]`` / its sum
    (uniform for None). Sides are independent seed sets (a side's rows are its seeds, paired across its item
    sets); item sets are independent of each other and shared by every side. Returns ``{"estimate", "var",
    "components", "seed_parts"}``: ``seed_parts`` one ``(V_seed, S_x − 1)`` per side with two or more seeds;
    ``components`` the independent parts :func:`banerjee_interval` combines, each ``(variance, df)`` and absent
    when zero: the seed part (the sum of ``seed_parts`` with Welch's df) and the item part ((V_item − V_res)₊ with
    n_eff − 1 df, Welch–Satterthwaite's over several item sets); ``var`` their sum."""
    wts = []
    for j, Z in enumerate(sides[0]):
        w = np.ones(Z.shape[1]) if weights[j] is None else np.asarray(weights[j], dtype=np.float64)
        wt = w / w.sum()
        q = float(wt @ wt)
        # c = Σ w̃_i² (1 − 2 w̃_i + q): E Σ w̃_i² b_i² = c τ² for b = x − (w̃·x) 1, x_i independent of variance τ²
        wts.append((wt, q, q - 2 * float(np.sum(wt ** 3)) + q * q, 1 / q - 1))
    estimate, seed_parts, item_terms = 0.0, [], []  # item_terms: (coefficient, value, df) of V_item − V_res
    for Zs in sides:
        S = Zs[0].shape[0]
        m = sum(Z @ wt for Z, (wt, _, _, _) in zip(Zs, wts))  # per-seed totals m_s
        estimate += float(m.mean())
        if S < 2:
            continue
        res = []
        for Z, (wt, q, c, nu) in zip(Zs, wts):
            if c > 0:  # the seed×item term; none with one item
                row, col = Z @ wt, Z.mean(axis=0)
                e = Z - row[:, None] - col[None, :] + row.mean()
                res.append((q * float(((e * e) @ (wt * wt)).sum()) / (S * (S - 1) * c), (S - 1.0) * nu))
        item_terms += [(-1.0, v, nu) for v, nu in res]
        # untruncated, with its S − 1 df even when below V_res: the t quantile's calibration counts on the χ² draws
        # that come out small (raising them to V_res covers 99 % at 2 seeds; giving them V_res's df, 91 %)
        seed_parts.append((float(m.var(ddof=1)) / S, S - 1.0))
    for j, (wt, q, c, nu) in enumerate(wts):
        if c > 0:
            d = sum(Zs[j].mean(axis=0) for Zs in sides)  # each item's difference of seed means
            b = d - d @ wt
            item_terms.append((1.0, q * float((b * b) @ (wt * wt)) / c, nu))
    components = []
    seed = sum(v for v, _ in seed_parts)
    if seed > 0:
        # several sides: one seed part with Welch's df (between the smallest S_x − 1 and their sum), as Welch's
        # two-sample t combines two sample variances
        components.append((seed, seed * seed / sum(v * v / nu for v, nu in seed_parts if v > 0)))
    item = sum(k * v for k, v, _ in item_terms)
    if item > 0:
        # df: Welch–Satterthwaite over the item sets' V_item alone. V_res is far more precise ((S − 1)(n − 1) df),
        # and counting it in the df of the difference would send the df to 0 as the item variance does, inflating
        # the t quantile of a vanishing component
        vi = [(v, nu) for k, v, nu in item_terms if k > 0 and v > 0]
        components.append((item, sum(v for v, _ in vi) ** 2 / sum(v * v / nu for v, nu in vi)))
    return {"estimate": estimate, "var": sum(v for v, _ in components), "components": components,
            "seed_parts": seed_parts}


def _half_width(components: Sequence[tuple[float, float]], alpha) -> float:
    """Banerjee's half-width √(Σ_k t²_{ν_k, 1−α/2} V_k) (scaled by its largest term: no overflow for tiny α)."""
    from scipy.special import stdtrit  # the t quantile (scipy.stats.t's, without its per-call overhead)

    h = np.array([-stdtrit(nu, alpha / 2) * v ** 0.5 for v, nu in components])
    top = float(h.max())
    return top * float(np.sqrt(np.sum((h / top) ** 2))) if top > 0 and np.isfinite(top) else top


def banerjee_interval(estimate: float, components: Sequence[tuple[float, float]],
                      confidence: float = CONFIDENCE) -> dict:
    """estimate ± √(Σ_k t²_{ν_k, (1+confidence)/2} V_k) for independent variance estimates V_k with ν_k df
    (Banerjee 1960; coverage ≥ nominal for every ratio of the true variances, exact with one component), its
    p-value of 0 by inversion (the largest 1 − confidence whose interval holds 0, so p ≤ α exactly when the
    1 − α interval excludes 0; one component: the two-sided t p-value) and the effective df (the ν with
    t_ν √ΣV_k = the half-width). No components (zero variance): the point interval, p 1 (estimate 0) or 0."""
    from scipy.optimize import brentq
    from scipy.special import stdtr, stdtrit

    comps = [(float(v), float(nu)) for v, nu in components if v > 0]
    if not comps:
        return {"lo": estimate, "hi": estimate, "p": 1.0 if estimate == 0 else 0.0, "df": None}
    h = _half_width(comps, 1 - confidence)
    se = sum(v for v, _ in comps) ** 0.5
    dfs = [nu for _, nu in comps]
    if len(comps) == 1:
        p = float(2 * stdtr(dfs[0], -abs(estimate) / se))
        df = dfs[0]
    else:
        def excess(log_alpha):  # > 0 while the (1 − α) interval still holds 0
            return _half_width(comps, float(np.exp(log_alpha))) - abs(estimate)

        lo_log = np.log(P_FLOOR)
        p = 1.0 if estimate == 0 else P_FLOOR if excess(lo_log) <= 0 else float(np.exp(brentq(excess, lo_log, 0.0)))
        ratio = h / se  # t_ν(1 − α/2) = ratio for some ν between the components' smallest and largest df
        q = 0.5 + confidence / 2
        df = min(dfs) if ratio >= stdtrit(min(dfs), q) else max(dfs) if ratio <= stdtrit(max(dfs), q) else float(
            np.exp(brentq(lambda lnu: stdtrit(np.exp(lnu), q) - ratio, np.log(min(dfs)), np.log(max(dfs)))))
    return {"lo": estimate - h, "hi": estimate + h, "p": min(1.0, p), "df": df}


def crossed_t(sides: Sequence[Sequence[np.ndarray]], weights: Sequence[np.ndarray | None],
              estimate: float | None = None, confidence: float = CONFIDENCE) -> dict:
    """:func:`crossed_components` with :func:`banerjee_interval`: ``{"delta", "lo", "hi", "p", "df", "se"}``,
    centred on ``estimate`` (default: the linear statistic itself; a non-linear statistic passes its own value and
    its linearisation as ``sides``)."""
    comp = crossed_components(sides, weights)
    est = comp["estimate"] if estimate is None else float(estimate)
    return {"delta": est, **banerjee_interval(est, comp["components"], confidence), "se": comp["var"] ** 0.5}


def two_stage_delta(a, b=None, weights: Sequence[float] | None = None, paired: bool = True, seed: int = 0,
                    n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE) -> dict:
    """Seed-mean (weighted) item mean of ``a`` minus that of ``b``, with its interval and two-sided p-value of Δ = 0.

    ``a`` is seeds × items (a 1-D array: one seed); ``b`` the same items for the other side: None (a quantity that
    is already a difference, e.g. KL vs the base), a 1-D array of a seedless reference (the base, the same for every
    seed), or seeds × items. ``paired``: row s of ``a`` and row s of ``b`` are the same seed (needs as many rows);
    otherwise each side's seeds are independent. Items are always paired: both sides and every seed were scored on
    them. ``weights`` (e.g. answer tokens per probe prompt) weight the item means.

    With two or more seeds on a side: the crossed variance-component Student-t interval (:func:`crossed_t`, the
    module docstring derives it; ``df`` its Welch–Satterthwaite degrees of freedom), p from the same t. With one
    seed per side: the percentile paired bootstrap over items (``n_resamples`` resamples, ``seed``; ``df`` None)
    and :func:`bootstrap_p`; this interval excludes seed noise. Returns ``{"delta", "lo", "hi", "p", "df", "n",
    "seeds", "seeds_b"}``: n items, ``seeds`` the rows of ``a``, ``seeds_b`` the rows of ``b`` when they are a side
    of their own (unpaired; else None)."""
    A, Bm, w = _inputs(a, b, weights, paired)
    size = {"n": A.shape[1], "seeds": A.shape[0], "seeds_b": None if Bm is None else Bm.shape[0]}
    if max(A.shape[0], size["seeds_b"] or 1) > 1:
        r = crossed_t([[A]] if Bm is None else [[A], [-Bm]], [w], confidence=confidence)
        return {**{k: r[k] for k in ("delta", "lo", "hi", "p", "df")}, **size}
    est, boot, info = two_stage_bootstrap(A, Bm, w, Bm is None, seed, n_resamples)
    if info["constant"]:
        lo = hi = est  # every resample is the estimate (without the rounding of the weighted sums)
    else:
        alpha = (1 - confidence) / 2
        lo, hi = (float(v) for v in np.quantile(boot, [alpha, 1 - alpha]))
    return {"delta": est, "lo": lo, "hi": hi, "p": bootstrap_p(boot), "df": None, **size}


def paired_delta(a: Sequence[float], b: Sequence[float], weights: Sequence[float] | None = None, seed: int = 0,
                 n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE) -> dict:
    """Mean(a) − mean(b) over the same items of one seed each, with its paired bootstrap interval over items
    (:func:`two_stage_delta` with one seed per side; its interval excludes seed noise).

    ``weights`` (e.g. answer tokens per probe prompt) make both means weighted: Σ w·a / Σ w − Σ w·b / Σ w, the
    per-token average the probe reports; items are still what is resampled."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_delta needs two 1-D arrays over the same items, got shapes {a.shape}, {b.shape}")
    if a.size == 0:
        raise ValueError("paired_delta: no items")
    if weights is not None and np.shape(weights) != a.shape:
        raise ValueError(f"weights shape {np.shape(weights)} != items {a.shape}")
    return two_stage_delta(a, b, weights, True, seed, n_resamples, confidence)


def mean_interval(a: Sequence[float], weights: Sequence[float] | None = None, seed: int = 0,
                  n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE) -> dict:
    """(Weighted) mean of one per-item quantity with its bootstrap interval, named like :func:`paired_delta`: a
    quantity that is already a difference against the base, e.g. KL."""
    a = np.asarray(a, dtype=np.float64)
    return paired_delta(a, np.zeros_like(a), weights, seed, n_resamples, confidence)


def holm(pvalues: Sequence[float | None], alpha: float = ALPHA) -> list[dict | None]:
    """Holm's step-down correction of m p-values (None: not a comparison, left out of m): sorted ascending, the
    j-th smallest (j = 1..m) is rejected while p_(j) ≤ α / (m − j + 1); the family-wise error rate is ≤ α for
    any dependence between the tests. Returns per input ``{"p_holm", "survives"}`` (the adjusted p-value
    max_{i≤j} min(1, (m − i + 1)·p_(i)), and whether it is ≤ α) or None."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    m = len(idx)
    out: list[dict | None] = [None] * len(pvalues)
    running = 0.0
    for j, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - j) * float(pvalues[i])))
        out[i] = {"p_holm": running, "survives": running <= alpha}
    return out


def normal_interval(p: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wald interval p ± z·√(p(1−p)/n) of a Bernoulli mean (the large-sample reference)."""
    from scipy.stats import norm

    z = norm.ppf(0.5 + confidence / 2)
    h = z * (p * (1 - p) / n) ** 0.5
    return p - h, p + h


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the Pareto-optimal points when x is to be maximised (ID gain) and y minimised (forgetting).

    A point is dominated when another has x' ≥ x and y' ≤ y with at least one strict; duplicates of an optimal
    point are all optimal. Returned in order of increasing x."""
    pts = [(float(x), float(y)) for x, y in points]
    keep = []
    for i, (x, y) in enumerate(pts):
        if any(np.isnan(v) for v in (x, y)):
            continue
        dominated = any((x2 >= x and y2 <= y) and (x2 > x or y2 < y)
                        for j, (x2, y2) in enumerate(pts) if j != i and not np.isnan(x2) and not np.isnan(y2))
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: (pts[i][0], pts[i][1]))
