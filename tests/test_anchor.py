"""RotationAnchor: the penalty of Eq. 3 and its closed-form gradient; the full-rank rule (App. C.2, Eq. 11)."""

from __future__ import annotations

import json

import pytest
import torch

from rpsft.anchor import RotationAnchor
from rpsft.selection import SelectionError

from rpsft_testing import autograd_vs_closed_form, make_tiny_llama


def perturb_(model, scale=1e-2, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def brute_force(W0: torch.Tensor, W: torch.Tensor, k: int) -> float:
    """‖U_kᵀ(W − W0)V_k‖² from an independent fp64 SVD of W0."""
    U, S, Vh = torch.linalg.svd(W0.double(), full_matrices=False)
    return float((U[:, :k].T @ (W.double() - W0.double()) @ Vh[:k].T).pow(2).sum())


@pytest.fixture
def model():
    return make_tiny_llama(64, inter=80)


@pytest.mark.numerics
def test_closed_form_gradient_matches_autograd(model):
    anchor = RotationAnchor.from_model(model, rank=8)
    perturb_(model)
    R, r, rel = autograd_vs_closed_form(anchor, model)
    assert r == pytest.approx(R, rel=1e-6)
    assert len(rel) == 14
    for name, e in rel.items():
        assert e < 1e-5, (name, e)


@pytest.mark.numerics
def test_accumulate_adds_weighted_gradient_to_existing_grad(model):
    anchor = RotationAnchor.from_model(model, rank=4, targets=["q_proj"])
    perturb_(model)
    name = next(iter(anchor.terms))
    p = dict(model.named_parameters())[name]
    base = torch.randn_like(p)
    p.grad = base.clone()
    anchor.accumulate_grad_(model, weight=0.5)
    once = p.grad - base
    p.grad = None
    anchor.accumulate_grad_(model, weight=1.0)
    # (base + g) - base carries fp32 round-off of |base| ~ 1, hence an absolute tolerance at that scale
    assert once.abs().max() > 1e-3
    torch.testing.assert_close(once, 0.5 * p.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.numerics
def test_penalty_at_init_is_fp32_roundoff(model):
    anchor = RotationAnchor.from_model(model, rank=8)
    sigma_sq = sum(float(t.S.double().pow(2).sum()) for t in anchor.terms.values())
    assert anchor.penalty(model).item() < 1e-6 * sigma_sq


@pytest.mark.numerics
def test_penalty_at_init_is_zero_for_bf16_weights():
    # The authors' fp16 bases leave ~1e-4 per matrix; bases of a bf16 model are taken of the exact bf16 values
    # and the penalty is computed in fp32, so it is round-off only.
    model = make_tiny_llama(64, inter=80).to(torch.bfloat16)
    anchor = RotationAnchor.from_model(model, rank=8)
    sigma_sq = sum(float(t.S.double().pow(2).sum()) for t in anchor.terms.values())
    assert anchor.penalty(model).item() < 1e-6 * sigma_sq
    assert all(t.U.dtype == torch.float32 for t in anchor.terms.values())


@pytest.mark.numerics
def test_penalty_equals_brute_force_after_perturbation(model):
    W0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    anchor = RotationAnchor.from_model(model, rank=6)
    perturb_(model)
    params = dict(model.named_parameters())
    expected = sum(brute_force(W0[n], params[n].detach(), 6) for n in anchor.terms)
    assert anchor.penalty(model).item() == pytest.approx(expected, rel=1e-4)
    assert expected > 1e-3  # the perturbation is visible: the check is not 0 == 0


@pytest.mark.parametrize("rule", [{}, {"full_rank_as": "l2"}], ids=["default", "l2"])
@pytest.mark.numerics
def test_full_rank_is_exactly_l2_to_init(model, rule):
    # the paper's rule (App. C.2, Eq. 11), the default, and method=l2init: ‖W − W0‖² on every matrix at
    # k = min(m, n), square or not (W0 stored, no bases): 10 of the 14 projections here are non-square
    W0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    for rank in (10_000, 1.0):  # int beyond min(m, n) is clipped; fraction 1.0 is min(m, n)
        anchor = RotationAnchor.from_model(model, rank=rank, **rule)
        assert all(t.full and t.U is None for t in anchor.terms.values())
        assert anchor.full_rank_as == "l2" and anchor.summary() == {"form": "block", "full_rank": "l2",
                                                                      "full_rank_matrices": 14}
    assert sum(t.shape[0] != t.shape[1] for t in anchor.terms.values()) == 10
    perturb_(model)
    params = dict(model.named_parameters())
    expected = sum(float((params[n].detach().double() - W0[n].double()).pow(2).sum()) for n in anchor.terms)
    assert anchor.penalty(model).item() == pytest.approx(expected, rel=1e-6)
    model.zero_grad(set_to_none=True)
    anchor.accumulate_grad_(model, weight=1.0)
    for n in anchor.terms:
        torch.testing.assert_close(params[n].grad, 2 * (params[n].detach() - W0[n]))
    with pytest.raises(ValueError, match="full_rank_as"):
        RotationAnchor.from_model(model, rank=4, full_rank_as="L2-Init")


def _brute_projected(W0: torch.Tensor, W: torch.Tensor) -> float:
    """‖P_U ΔW P_V‖² with P_U, P_V the orthogonal projectors onto W0's column and row spaces (fp64 pinv)."""
    W0 = W0.double()
    P_U = W0 @ torch.linalg.pinv(W0)  # m×m projector onto range(W0)
    P_V = torch.linalg.pinv(W0) @ W0  # n×n projector onto range(W0ᵀ)
    return float((P_U @ (W.double() - W0) @ P_V).pow(2).sum())


@pytest.mark.numerics
def test_both_full_rank_rules_against_brute_force_on_non_square_matrices(model):
    # eq3: R(k) = ‖U_kᵀ ΔW V_k‖² is a sum of |ΔW'_ij|² over a growing leading block, so non-decreasing in k; at
    # k = min(m, n) it is ‖P_U ΔW P_V‖², strictly less than ‖ΔW‖² on a non-square matrix (no jump to L2-Init).
    # The default (the paper's rule) is ‖ΔW‖² there, and the same as eq3 below full rank.
    W0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    kp = "model.layers.0.self_attn.k_proj.weight"  # 16 × 32: min(m, n) = 16
    gp = "model.layers.0.mlp.gate_proj.weight"  # 80 × 32: min(m, n) = 32
    anchors = {k: RotationAnchor.from_model(model, rank=k, targets=["k_proj", "gate_proj"], layers=[0],
                                            full_rank_as="eq3")
               for k in (4, 8, 12, 16, 24, 31, 32, 10_000)}
    paper = {k: RotationAnchor.from_model(model, rank=k, targets=["k_proj", "gate_proj"], layers=[0])
             for k in (12, 10_000)}
    perturb_(model)
    params = dict(model.named_parameters())
    for name, m_n in ((kp, 16), (gp, 32)):
        assert tuple(params[name].shape) != (m_n, m_n)  # non-square
        r = [anchors[k].drift(model)[name]["abs"] ** 2 for k in sorted(anchors)]
        assert all(b >= a * (1 - 1e-6) for a, b in zip(r, r[1:])), (name, r)
        full = anchors[10_000]
        t = full.terms[name]
        assert not t.full and t.k == m_n and t.U.shape == (params[name].shape[0], m_n)  # bases, not W0
        brute = _brute_projected(W0[name], params[name].detach())
        assert r[-1] == pytest.approx(brute, rel=1e-5)
        l2 = float((params[name].detach().double() - W0[name].double()).pow(2).sum())
        assert brute < 0.9 * l2  # the check separates Eq. 3 from ‖ΔW‖²
        t = paper[10_000].terms[name]
        assert t.full and t.k == m_n and t.U is None
        assert paper[10_000].drift(model)[name]["abs"] ** 2 == pytest.approx(l2, rel=1e-5)
        assert paper[12].drift(model)[name]["abs"] == pytest.approx(anchors[12].drift(model)[name]["abs"], rel=1e-6)
        model.zero_grad(set_to_none=True)
        paper[10_000].accumulate_grad_(model)
        torch.testing.assert_close(params[name].grad, 2 * (params[name].detach() - W0[name]))
    # a square matrix at full rank keeps the cheaper W0 form under eq3 too, with the same value as Eq. 3
    sq = RotationAnchor.from_model(model, rank=1.0, targets=["q_proj"], layers=[0], full_rank_as="eq3")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert sq.terms[q].full


def test_rank_zero_contributes_nothing(model):
    anchor = RotationAnchor.from_model(model, rank=0)
    assert len(anchor) == 0 and anchor.nbytes == 0
    perturb_(model)
    assert anchor.penalty(model).item() == 0.0
    assert anchor.accumulate_grad_(model) == 0.0
    assert all(p.grad is None for p in model.parameters())
    mixed = RotationAnchor.from_model(model, rank={"q_proj": 0, "*": 4})
    assert not any("q_proj" in n for n in mixed.terms) and len(mixed) == 12


def test_storage_is_bases_only(model):
    anchor = RotationAnchor.from_model(model, rank=5)
    expected = 0
    for n, p in model.named_parameters():
        if n in anchor.terms:
            m, k_n = p.shape
            expected += (m + k_n + 1) * 5 * 4
    assert anchor.nbytes == expected
    assert all(t.W0 is None for t in anchor.terms.values())


def test_rank_specs(model, tmp_path):
    a = RotationAnchor.from_model(model, rank=0.25)  # fraction of min(m, n): q 32x32 -> 8, k 16x32 -> 4
    r = a.ranks
    assert r["model.layers.0.self_attn.q_proj.weight"] == 8
    assert r["model.layers.0.self_attn.k_proj.weight"] == 4
    b = RotationAnchor.from_model(model, rank={"re:layers\\.0\\.": 3, "*": 2})
    assert b.ranks["model.layers.0.mlp.up_proj.weight"] == 3 and b.ranks["model.layers.1.mlp.up_proj.weight"] == 2
    names = [n for n, _ in model.named_parameters() if "proj" in n]
    f = tmp_path / "ranks.json"
    f.write_text(json.dumps({n: 2 + i % 3 for i, n in enumerate(names)}))
    c = RotationAnchor.from_model(model, rank=f"@{f}")
    assert c.ranks == {n: 2 + i % 3 for i, n in enumerate(names)}


@pytest.mark.parametrize("rank, message", [
    (-1, "negative"),
    (1.5, "fraction"),
    (0.0, "fraction"),
    (True, "not a number"),
    ("abc", "not a number"),
    ({"q_proj": 4}, "no entry for"),
    ("@/nonexistent/ranks.json", "does not exist"),
])
def test_bad_rank_errors(model, rank, message):
    with pytest.raises(SelectionError, match=message):
        RotationAnchor.from_model(model, rank=rank)


def test_targets_and_layers(model):
    a = RotationAnchor.from_model(model, rank=2, targets=["q_proj", "down_proj"], layers="1")
    assert sorted(a.terms) == ["model.layers.1.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    assert not any("embed" in n for n in RotationAnchor.from_model(model, rank=2).terms)
    e = RotationAnchor.from_model(model, rank=2, targets=["embed_tokens"])
    assert list(e.terms) == ["model.embed_tokens.weight"]
    g = RotationAnchor.from_model(model, rank=2, targets=["model.layers.0.mlp.*"])
    assert len(g) == 3


def test_no_match_lists_candidates(model):
    with pytest.raises(SelectionError, match=r"match no 2-D weight.*q_proj"):
        RotationAnchor.from_model(model, rank=2, targets=["qproj"])
    with pytest.raises(SelectionError, match="tied to the input embeddings"):
        RotationAnchor.from_model(model, rank=2, targets=["lm_head"])
    with pytest.raises(SelectionError, match="cannot parse"):
        RotationAnchor.from_model(model, rank=2, layers="a-b")


def test_refuses_partitioned_parameters(model):
    # DeepSpeed ZeRO-3 replaces parameters by empty placeholders tagged ds_id: never silently anchor nothing.
    p = model.model.layers[0].self_attn.q_proj.weight
    p.ds_id = 3
    with pytest.raises(RuntimeError, match="ZeRO-3"):
        RotationAnchor.from_model(model, rank=2)


@pytest.mark.numerics
def test_drift_reports_relative_norms(model):
    anchor = RotationAnchor.from_model(model, rank=4)
    d0 = anchor.drift(model)
    assert max(v["rel"] for v in d0.values()) < 1e-5
    perturb_(model)
    d = anchor.drift(model)
    name = "model.layers.0.self_attn.q_proj.weight"
    t = anchor.terms[name]
    assert d[name]["abs"] ** 2 == pytest.approx(float(anchor._residual(t, dict(model.named_parameters())[name])
                                                       .double().pow(2).sum()), rel=1e-5)
    assert d[name]["rel"] == pytest.approx(d[name]["abs"] / float(t.S.double().norm()), rel=1e-9)
    anchor.accumulate_grad_(model)
    by_type = anchor.relative_drift_by_type()
    assert set(by_type) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert by_type["q_proj"] == pytest.approx(sum(d[n]["rel"] for n in d if "q_proj" in n) / 2, rel=1e-5)


def test_wrong_model_is_a_clear_error(model):
    anchor = RotationAnchor.from_model(model, rank=2)
    other = make_tiny_llama(64, hidden=48, inter=80)
    with pytest.raises(ValueError, match="has shape"):
        anchor.penalty(other)


@pytest.mark.numerics
def test_full_rank_rule_from_the_config(model, tmp_path):
    # the training entry point: method=l2init and method=rpsft at a k beyond min(m, n) build ‖W − W0‖² on every
    # matrix (the paper's rule, anchor.full_rank=l2 by default); anchor.full_rank=eq3 builds Eq. 3 (bases on the
    # non-square k/v/MLP matrices, W0 only for the square q/o)
    from rpsft.config import load_config
    from rpsft.train import build_anchor

    W0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    cache = f"anchor.cache_dir={tmp_path}"
    l2 = build_anchor(model, load_config(None, ["method=l2init", cache]), full_rank=True)
    paper = build_anchor(model, load_config(None, ["method=rpsft", "anchor.rank=10000", cache]))
    eq3 = build_anchor(model, load_config(None, ["method=rpsft", "anchor.rank=10000", "anchor.full_rank=eq3", cache]))
    assert all(t.full for t in l2.terms.values()) and all(t.full for t in paper.terms.values())
    assert {n for n, t in eq3.terms.items() if t.full} == {n for n in eq3.terms if "q_proj" in n or "o_proj" in n}
    assert (paper.full_rank_as, eq3.full_rank_as) == ("l2", "eq3")
    perturb_(model)
    params = dict(model.named_parameters())
    dw = {n: float((params[n].detach().double() - W0[n].double()).pow(2).sum()) for n in l2.terms}
    assert l2.penalty(model).item() == pytest.approx(sum(dw.values()), rel=1e-6)
    assert paper.penalty(model).item() == pytest.approx(sum(dw.values()), rel=1e-6)
    assert eq3.penalty(model).item() < 0.9 * sum(dw.values())


def test_full_rank_rule_is_checked_before_anything_loads(tmp_path):
    from rpsft.config import ConfigError, load_config
    from rpsft.train import train

    with pytest.raises(ConfigError, match=r"^anchor.full_rank must be l2 .* or eq3 .*, got 'L2'; did you mean 'l2'\?$"):
        load_config(None, ["anchor.full_rank=L2"])
    with pytest.raises(ConfigError, match="got 'paper'$"):
        load_config(None, ["anchor.full_rank=paper"])
    # l2init is ‖W − W0‖² by definition: eq3 would silently make it something else. Refused before the data or
    # the model is read (neither exists here).
    cfg = load_config(None, ["method=l2init", "anchor.full_rank=eq3", "data.train=/nonexistent/train.jsonl",
                             "model.name=/nonexistent/model", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match=r"^method=l2init is ‖W − W0‖² on every matrix; anchor.full_rank=eq3 would "
                                         r"make it Eq. 3 at full rank — drop the override"):
        train(cfg, progress=False)
