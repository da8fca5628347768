"""method=complement: λ(‖ΔW‖² − ‖U_kᵀΔWV_k‖²), the rest of L2-Init. The identity L2-Init = RPSFT + complement
(value and gradient), the complement against an explicit orthogonal complement U_⊥, V_⊥, its boundaries (k = 0,
k = min(m, n) under both full-rank rules), its memory, FSDP2 row shards, and a run through train()."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import TrainerCallback

from rpsft.anchor import RotationAnchor
from rpsft.frames import anchor_nbytes
from rpsft.train import train

from rpsft_testing import (autograd_vs_closed_form, gloo_rank, make_tiny_llama, perturb_and_shard, run_ranks,
                            sharded_terms_match)

# low rank, k = 0 (‖ΔW‖²), full rank of a square matrix (q, o: 32×32) and of non-square ones (k: 16×32, down: 32×80)
SPEC = {"q_proj": 1.0, "o_proj": 32, "k_proj": 1.0, "down_proj": 1.0, "v_proj": 0, "*": 5}


def perturb_(model, scale=1e-2, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def brute_complement(W0: torch.Tensor, W: torch.Tensor, k: int) -> tuple[float, torch.Tensor]:
    """(R_c, ∇R_c) from an independent fp64 full SVD of W0 and its explicit orthogonal complements U_⊥, V_⊥:
    ΔW minus its top-k block is U_⊥U_⊥ᵀΔW + U_kU_kᵀΔW V_⊥V_⊥ᵀ, two Frobenius-orthogonal parts."""
    U, _, Vh = torch.linalg.svd(W0.double(), full_matrices=True)
    V = Vh.T
    Uk, Uo, Vo = U[:, :k], U[:, k:], V[:, k:]
    D = W.double() - W0.double()
    rest = Uo @ Uo.T @ D + Uk @ Uk.T @ D @ Vo @ Vo.T
    value = float((Uo.T @ D).pow(2).sum() + (Uk.T @ D @ Vo).pow(2).sum())
    return value, 2 * rest


@pytest.fixture
def model():
    return make_tiny_llama(64, inter=80)


@pytest.mark.parametrize("rule", ["l2", "eq3"])
@pytest.mark.parametrize("rank", [5, SPEC], ids=["k5", "mixed"])
@pytest.mark.numerics
def test_l2init_equals_rpsft_plus_complement(model, rule, rank):
    # at equal λ and k and under the same full-rank rule, term by term, value and closed-form gradient
    kw = dict(rank=rank, full_rank_as=rule, dtype=torch.float64)
    rpsft = RotationAnchor.from_model(model, **kw)
    comp = RotationAnchor.from_model(model, form="complement", **kw)
    l2 = RotationAnchor.from_model(model, rank=1.0, full_rank_as="l2", dtype=torch.float64)
    assert len(l2) == 14 and comp.form == "complement"
    W0 = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    perturb_(model)
    params = dict(model.named_parameters())
    grads = {}
    for name, a in (("rpsft", rpsft), ("comp", comp), ("l2", l2)):
        model.zero_grad(set_to_none=True)
        a.accumulate_grad_(model, weight=0.7)
        grads[name] = {n: params[n].grad.clone() for n in a.terms}
    # exact up to the block form's storage floor: it subtracts diag σ_k, and the fp32 SVD's U_k, V_k leave
    # E = U_kᵀW0V_k − diag σ_k ≠ 0 (docs/math.md §6), while the complement works from ΔW itself. So, in fp64,
    # R_block + R_c − ‖ΔW‖² = 2⟨U_kᵀΔWV_k, E⟩ + ‖E‖² and the gradients differ by 2λ·U_k E V_kᵀ, whatever the SVD's
    # kernel made of E; each gradient is then rounded to the fp32 .grad (u = 2^-24 of each entry).
    u = 2.0 ** -24
    for n in l2.terms:  # a term a form leaves out is identically zero there
        t = rpsft.terms.get(n)
        E = t.U.T @ W0[n] @ t.V - torch.diag(t.S) if t is not None and t.U is not None else None
        floor = 0.0 if E is None else 2 * float((t.U.T @ (params[n].detach().double() - W0[n]) @ t.V).norm()) * \
            float(E.norm()) + float(E.norm()) ** 2
        both = rpsft.last_sq.get(n, 0.0) + comp.last_sq.get(n, 0.0)
        assert abs(both - l2.last_sq[n]) <= floor + 1e-12 * l2.last_sq[n], n  # + fp64 sums' round-off
        zero = torch.zeros_like(params[n])
        parts = [grads["rpsft"].get(n, zero), grads["comp"].get(n, zero), grads["l2"][n]]
        G = parts[0] + parts[1]
        bound = (0.0 if E is None else 2 * 0.7 * float((t.U @ E @ t.V.T).norm())) + \
            u * (sum(float(g.double().norm()) for g in parts) + float(G.double().norm()))
        assert float((G.double() - parts[2].double()).norm()) <= bound + 1e-12 * float(parts[2].double().norm()), n
    assert sum(rpsft.last_sq.values()) > 1e-3 and sum(comp.last_sq.values()) > 1e-3  # both parts are there


@pytest.mark.parametrize("rule", ["l2", "eq3"])
@pytest.mark.numerics
def test_complement_against_autograd_and_explicit_orthogonal_complement(model, rule):
    W0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    comp = RotationAnchor.from_model(model, rank=SPEC, full_rank_as=rule, form="complement")
    perturb_(model)
    R, r, rel = autograd_vs_closed_form(comp, model)  # leaves the closed-form gradient in .grad
    assert r == pytest.approx(R, rel=1e-5) and max(rel.values()) < 1e-5
    params = dict(model.named_parameters())
    for n, t in comp.terms.items():
        value, grad = brute_complement(W0[n], params[n].detach(), t.k)
        assert comp.last_sq[n] == pytest.approx(value, rel=1e-4), n
        assert comp.drift(model)[n]["abs"] ** 2 == pytest.approx(value, rel=1e-4), n
        # ∇ = 2(ΔW − P_U ΔW P_V) on the anchor's fp32 frames against fp64 projectors P from an independent SVD: the
        # frames' own error ε = ‖P̂ − P‖₂ (what the fp32 SVD's kernel made of them, measured here) moves it by at most
        # 2((1 + ε_U)(1 + ε_V) − 1)‖ΔW‖; the fp32 products (inner dimensions m, n, k, k) add ≈ √K·u·|U||U|ᵀ|ΔW||V||V|ᵀ
        # (Higham & Mary's probabilistic bound, any summation order) and the result's rounding u‖∇‖.
        D = params[n].detach().double() - W0[n].double()
        bound = (2.0 ** -24 + 1e-12) * float(grad.norm())
        if t.U is not None:
            U, _, Vh = torch.linalg.svd(W0[n].double(), full_matrices=True)
            Uh, Vv = t.U.double(), t.V.double()
            eps_u = float(torch.linalg.matrix_norm(Uh @ Uh.T - U[:, :t.k] @ U[:, :t.k].T, ord=2))
            eps_v = float(torch.linalg.matrix_norm(Vv @ Vv.T - Vh[:t.k].T @ Vh[:t.k], ord=2))
            K = sum(D.shape) + 2 * t.k
            bound += 2 * ((1 + eps_u) * (1 + eps_v) - 1) * float(D.norm()) + 2 * K ** 0.5 * 2.0 ** -24 * float(
                (Uh.abs() @ Uh.abs().T @ D.abs() @ Vv.abs() @ Vv.abs().T).norm())
        assert float((params[n].grad.double() - grad).norm()) <= bound, n
        assert comp.drift(model)[n]["rel"] == pytest.approx(value ** 0.5 / float(W0[n].double().norm()), rel=1e-4)
    assert min(comp.last_sq.values()) > 1e-4  # every kept term sees the perturbation: no 0 == 0 check


@pytest.mark.numerics
def test_complement_boundaries(model):
    # k = 0: the block is empty, the complement is ‖ΔW‖² (W0 only). k = min(m, n): the block is all of ΔW on a
    # square matrix (either rule) and on a non-square one under the paper's rule — an empty complement, dropped;
    # under eq3 a non-square matrix keeps ‖ΔW‖² − ‖P_U ΔW P_V‖² > 0 (W0 and full-rank bases).
    paper = RotationAnchor.from_model(model, rank=SPEC, form="complement")
    eq3 = RotationAnchor.from_model(model, rank=SPEC, form="complement", full_rank_as="eq3")
    kinds = {}
    for a in (paper, eq3):
        for n, t in a.terms.items():
            kinds.setdefault(n.split(".")[-2], set()).add((a.full_rank_as, t.k, t.full, t.complement))
    assert kinds["v_proj"] == {("l2", 0, True, False), ("eq3", 0, True, False)}  # ‖ΔW‖², W0 only
    assert kinds["k_proj"] == {("eq3", 16, False, True)} and kinds["down_proj"] == {("eq3", 32, False, True)}
    assert "q_proj" not in kinds and "o_proj" not in kinds  # square at full rank: zero under both rules
    assert {k: v for k, v in kinds.items() if k in ("gate_proj", "up_proj")} == {
        "gate_proj": {("l2", 5, False, True), ("eq3", 5, False, True)},
        "up_proj": {("l2", 5, False, True), ("eq3", 5, False, True)}}
    assert not RotationAnchor.from_model(model, rank=1.0, form="complement").terms  # all at full rank: nothing
    W0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    perturb_(model)
    d = eq3.drift(model)
    for n in d:
        D = dict(model.named_parameters())[n].detach().double() - W0[n].double()
        if "v_proj" in n:
            assert d[n]["abs"] ** 2 == pytest.approx(float(D.pow(2).sum()), rel=1e-5)
        if "k_proj" in n:  # ‖ΔW (I − P_V)‖², P_V the projector onto W0's row space (16×32: P_U = I)
            P = torch.linalg.pinv(W0[n].double()) @ W0[n].double()
            out = float((D @ (torch.eye(32, dtype=torch.float64) - P)).pow(2).sum())
            assert d[n]["abs"] ** 2 == pytest.approx(out, rel=1e-4) and out > 0


def test_complement_memory_formula(model):
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for rule in ("l2", "eq3"):
        for k in (0, 3, 16, 32, 10_000):
            a = RotationAnchor.from_model(model, rank=k, form="complement", full_rank_as=rule)
            want = 0
            for n in a.terms:
                m, nn = shapes[n]
                want += m * nn * 4 + (m + nn) * a.terms[n].k * 4  # W0 + U_k, V_k in fp32, no σ_k
            assert a.nbytes == want == anchor_nbytes([shapes[n] for n in a.terms], k, full_rank_as=rule,
                                                      form="complement"), (rule, k)
            assert anchor_nbytes(list(shapes[n] for n in shapes if "proj" in n), k, full_rank_as=rule,
                                 form="complement") == want  # the dropped matrices count 0
    assert anchor_nbytes([(32, 32)], 10_000, form="complement") == 0
    assert anchor_nbytes([(16, 32)], 16, form="complement") == 0
    assert anchor_nbytes([(16, 32)], 16, full_rank_as="eq3", form="complement") == (16 * 32 + 48 * 16) * 4
    assert anchor_nbytes([(16, 32)], 0, form="complement") == 16 * 32 * 4


def test_complement_refuses_lean_frames_and_bad_forms(model, make_cfg):
    with pytest.raises(ValueError, match="frame_dtype='bf16': the complement needs fp32 frames"):
        RotationAnchor.from_model(model, rank=4, form="complement", frame_dtype="bf16")
    with pytest.raises(ValueError, match="form must be 'block' .* or 'complement', got 'rest'"):
        RotationAnchor.from_model(model, rank=4, form="rest")
    cfg = make_cfg("complement", "anchor.frame_dtype=fp16", "model.name=/nonexistent/model",
                   "data.train=/nonexistent/train.jsonl")
    with pytest.raises(ValueError, match=r"^method=complement needs fp32 frames, got anchor.frame_dtype=fp16: .*"
                                         r"set anchor.frame_dtype=fp32$"):
        train(cfg, progress=False)  # before the data or the model is read (neither exists)
    with pytest.raises(ValueError, match="method 'complement' is defined by its anchor; .* use method=sft"):
        train(make_cfg("complement", "anchor.enabled=false", name="off"), progress=False)


class Snapshots(TrainerCallback):
    """The anchored weights after every optimizer step."""

    def __init__(self):
        self.steps = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters() if "proj" in n}


def test_complement_trains_once_per_step_through_the_anchor_hook(make_cfg):
    # SGD without clipping: step 1 is the same as SFT's (∇R_c = 0 at W0), and step 2 differs from SFT's by
    # exactly −lr·λ·∇R_c(W1) = −lr·λ·2(ΔW1 − U_k A V_kᵀ), with U_k, V_k from an independent SVD of W0
    extra = ("train.optim=sgd", "train.lr=0.5", "train.max_grad_norm=0", "anchor.lam=3", "anchor.rank=5")
    runs = {}
    for method in ("sft", "complement"):
        snaps = Snapshots()
        runs[method] = (train(make_cfg(method, *extra), progress=False, extra_callbacks=[snaps]), snaps.steps)
    summary, comp = runs["complement"]
    _, sft = runs["sft"]
    from rpsft.models import load_model

    W0 = {n: p.detach() for n, p in load_model(make_cfg("sft").model.name)[0].named_parameters()}
    a = summary["anchor"]
    assert (a["form"], a["full_rank"], a["matrices"], a["ranks"]) == ("complement", "l2", 14, [5])
    moved, want_total = 0.0, 0.0
    for n, w1 in sft[1].items():
        assert torch.equal(comp[1][n], w1), n
        _, grad = brute_complement(W0[n], w1, 5)
        want = -0.5 * 3 * grad
        torch.testing.assert_close((comp[2][n] - sft[2][n]).double(), want, rtol=0, atol=2e-3 * float(want.abs().max()))
        moved += float((comp[2][n].double() - W0[n].double()).pow(2).sum())
        want_total += brute_complement(W0[n], comp[2][n], 5)[0]
    assert moved > 1e-4
    assert a["final_penalty"] == pytest.approx(want_total, rel=1e-4)  # R_c of the final weights, via drift()
    logged = [r for r in summary_metrics(summary) if "rpsft/penalty" in r]
    assert [r["step"] for r in logged] == [1, 2] and logged[0]["rpsft/penalty"] == 0.0 < logged[1]["rpsft/penalty"]
    assert {"rpsft/drift/q_proj", "rpsft/drift/down_proj", "rpsft/lambda"} <= set(logged[1])


def summary_metrics(summary):
    from rpsft.fileio import read_jsonl

    return read_jsonl(summary["metrics"])


def test_complement_with_period(make_cfg):
    summary = train(make_cfg("complement", "anchor.period=2", "train.max_steps=3"), progress=False)
    assert [r["step"] for r in summary_metrics(summary) if "rpsft/penalty" in r] == [1, 3]


def _sharded_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    with gloo_rank(rank, world, port):

        model = make_tiny_llama(64, inter=80, hidden=48)  # 48 rows of q/o; 24 of k/v: uneven over 2 ranks too
        ref_model = make_tiny_llama(64, inter=80, hidden=48)
        # low rank; k = 0 (W0 only); down_proj 48×80 at full rank under eq3 (W0 + bases); o_proj square: dropped
        spec = {"q_proj": 0, "down_proj": 1.0, "o_proj": 1.0, "*": 5}
        kw = dict(rank=spec, form="complement", full_rank_as="eq3")
        anchor = RotationAnchor.from_model(model, **kw)  # each SVD on one rank, broadcast
        ref = RotationAnchor.from_model(ref_model, **kw)
        assert len(anchor) == 12
        perturb_and_shard(model, ref_model, world)
        r_sharded, r_ref, shards = sharded_terms_match(anchor, ref, model, ref_model, rel_r=1e-5)
        for name, local, t in shards:
            assert t.W0.shape[0] == local.shape[0] and (t.U is None or t.U.shape[0] == local.shape[0])  # own rows
        drift, ref_drift = anchor.drift(model), ref.drift(ref_model)
        for n in drift:
            assert abs(drift[n]["abs"] - ref_drift[n]["abs"]) <= 1e-5 * ref_drift[n]["abs"], n
        with open(os.path.join(out_dir, f"ok{rank}"), "w") as f:
            f.write(f"{r_sharded} {r_ref}")


def test_sharded_complement_matches_unsharded(tmp_path):
    run_ranks(_sharded_worker, tmp_path, world=2)
    assert (tmp_path / "ok0").is_file() and (tmp_path / "ok1").is_file()
