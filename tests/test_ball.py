"""The hard rotation budget (anchor.budget_form=ball): after every optimizer step the anchored blocks are projected
back into d ≤ ε, so the drift recomputed from any saved checkpoint stays within ε, and ε = 0 keeps the block at W0."""

from __future__ import annotations

import json
import math
import os
import re
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from rpsft_testing import StopAt, gloo_rank, make_tiny_llama, perturb_and_shard, run_ranks

from rpsft.anchor import RotationAnchor
from rpsft.budget import BallBudget, BudgetController
from rpsft.config import ConfigError, load_config
from rpsft.models import load_model
from rpsft.train import train
from rpsft.trainer import AnchorMixin

EPS = 0.04
STEPS = 12


def cfg_for(tiny_model_dir, synth_data, out, *extra):
    # lr 2e-3 constant, rank 4: plain SFT moves the block to d ≈ 3 ε within the 12 steps (checked below)
    return load_config(None, [f"model.name={tiny_model_dir}", f"data.train={synth_data['train']}",
                              f"output_dir={out}", "data.limit=32", "data.max_length=96", "train.batch_size=2",
                              "train.grad_accum=1", f"train.max_steps={STEPS}", "train.lr=2e-3",
                              "train.warmup_ratio=0", "train.lr_scheduler=constant", "train.save_steps=3",
                              "train.save_total_limit=null", "anchor.rank=4", *extra])


def checkpoints(run_dir) -> list:
    return sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


@pytest.fixture(scope="module")
def fresh_anchor(tiny_model_dir):
    """A rank-4 anchor built afresh on the initial weights (not the run's own), to recompute drift from disk."""
    init, _ = load_model(str(tiny_model_dir))
    return RotationAnchor.from_model(init, rank=4)


def block_drift(anchor, path) -> tuple[float, dict]:
    """(d of the whole block, per-matrix drift rows) of the weights saved at ``path``."""
    rows = anchor.drift(AutoModelForCausalLM.from_pretrained(path))
    d = math.sqrt(sum(r["abs"] ** 2 for r in rows.values()) / sum(t.ref_sq for t in anchor.terms.values()))
    return d, rows


def log_rows(run_dir) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def sft_drift(tiny_model_dir, synth_data, tmp_path_factory, fresh_anchor):
    out = tmp_path_factory.mktemp("ball") / "sft"
    train(cfg_for(tiny_model_dir, synth_data, out, "method=sft", f"train.save_steps={STEPS}"), progress=False)
    return block_drift(fresh_anchor, out)


@pytest.mark.parametrize("scope", ["all", "matrix"])
def test_the_ball_holds_at_every_saved_step_and_reaches_epsilon(tiny_model_dir, synth_data, tmp_path, scope,
                                                                 fresh_anchor, sft_drift):
    free, free_rows = sft_drift
    assert free >= 2.5 * EPS, free  # unconstrained, the block moves well beyond the budget
    out = tmp_path / scope
    summary = train(cfg_for(tiny_model_dir, synth_data, out, f"anchor.budget={EPS}", "anchor.budget_form=ball",
                            f"anchor.budget_scope={scope}"), progress=False)
    saved = checkpoints(out)
    assert [p.name for p in saved] == [f"checkpoint-{s}" for s in range(3, STEPS + 1, 3)]
    for path in [*saved, out]:
        d, rows = block_drift(fresh_anchor, path)
        assert d <= EPS * (1 + 1e-3), (path.name, d)
        if scope == "matrix":  # each matrix on its own ball
            assert all(r["rel"] <= EPS * (1 + 1e-3) for r in rows.values()), path.name
    d, rows = block_drift(fresh_anchor, out)
    assert d >= 0.9 * EPS, d  # the budget set is the drift obtained, not a fraction of it
    rel = sorted(r["rel"] for r in rows.values())
    free_rel = sorted(r["rel"] for r in free_rows.values())
    assert free_rel[0] > EPS  # SFT moves every matrix past ε (measured: the least by 1.35 ε)
    if scope == "all":  # one scale for the whole block: matrices keep their spread (measured 0.39 ε to 1.55 ε)
        assert rel[-1] > 1.25 * EPS and rel[0] < 0.5 * EPS, (rel[0], rel[-1])
    else:  # one scale per matrix: the matrices end on their own spheres (measured 13 of 14)
        assert sum(abs(r - EPS) <= 1e-3 * EPS for r in rel) >= len(rel) - 2, rel
    rows_logged = log_rows(out)
    assert len(rows_logged) == STEPS
    assert all(r["rpsft/drift"] <= EPS * (1 + 1e-6) and "rpsft/penalty" not in r for r in rows_logged)
    assert rows_logged[-1]["rpsft/drift_before_ball"] > EPS and rows_logged[-1]["rpsft/ball_scale"] > 0
    assert rows_logged[-1]["rpsft/drift"] == pytest.approx(d, rel=1e-4)  # logged d = d recomputed from disk
    state = summary["anchor"]["budget"]
    assert state["form"] == "ball" and state["updates"] == STEPS and state["projected_steps"] >= 1
    assert 0.9 <= state["drift_over_budget"] <= 1 + 1e-6


def test_epsilon_zero_keeps_the_block_at_w0(tiny_model_dir, synth_data, tmp_path, fresh_anchor):
    out = tmp_path / "zero"
    train(cfg_for(tiny_model_dir, synth_data, out, "anchor.budget=0", "anchor.budget_form=ball"), progress=False)
    init = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    A0 = {t.name: fresh_anchor._residual(t, w) for t, w in
          ((t, dict(init.named_parameters())[t.name].detach()) for t in fresh_anchor.terms.values())}
    for path in [*checkpoints(out), out]:
        model = AutoModelForCausalLM.from_pretrained(path)
        params = dict(model.named_parameters())
        for t in fresh_anchor.terms.values():
            A = fresh_anchor._residual(t, params[t.name].detach())
            # A at W0 is itself fp32 round-off (~1e-7 of ‖σ_k‖); the block stays there to the same order
            assert float((A - A0[t.name]).norm()) <= 2e-6 * t.ref_sq ** 0.5, (path.name, t.name)
    # not a frozen model: the same matrices moved outside their top-4 block
    init_p, final_p = init.state_dict(), AutoModelForCausalLM.from_pretrained(out).state_dict()
    moved = [float((final_p[n] - init_p[n]).norm() / init_p[n].norm()) for n in fresh_anchor.terms]
    assert min(moved) > 1e-3, min(moved)


def test_resume_under_the_ball_continues_the_same_run(tiny_model_dir, synth_data, tmp_path, fresh_anchor):
    """Interrupted after step 7 (checkpoint at 6) and resumed, the ball run logs the same drift before and after
    every projection as the uninterrupted run, keeps its counters, and ends on the same weights."""
    extra = (f"anchor.budget={EPS}", "anchor.budget_form=ball")
    train(cfg_for(tiny_model_dir, synth_data, tmp_path / "full", *extra), progress=False)
    part = cfg_for(tiny_model_dir, synth_data, tmp_path / "part", *extra)
    train(part, progress=False, extra_callbacks=[StopAt(7)])
    state = json.loads((tmp_path / "part" / "checkpoint-6" / "rpsft_budget.json").read_text())
    assert state["form"] == "ball" and state["updates"] == 6 and state["projected_steps"] >= 1
    summary = train(part, resume="latest", progress=False)
    assert summary["resumed_from"].endswith("checkpoint-6")
    keys = ("rpsft/drift", "rpsft/drift_before_ball", "rpsft/ball_scale")
    a = {r["step"]: tuple(r[k] for k in keys) for r in log_rows(tmp_path / "full")}
    b = {r["step"]: tuple(r[k] for k in keys) for r in log_rows(tmp_path / "part")}
    assert sorted(b) == list(range(1, STEPS + 1))  # steps 7.. logged once, by the resumed run
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-12), step
    assert max(v[1] for v in a.values()) > EPS  # the ball really projected: not a run that never left it
    full = json.loads((tmp_path / "full" / "run.json").read_text())["anchor"]["budget"]
    assert summary["anchor"]["budget"]["updates"] == full["updates"] == STEPS
    assert summary["anchor"]["budget"]["projected_steps"] == full["projected_steps"]
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "part").state_dict()
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "full").state_dict()
    init = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    moved = max(float((want[n] - init[n]).abs().max()) for n in want)
    apart = max(float((got[n] - want[n]).abs().max()) for n in want)
    assert apart <= 1e-6 * moved, (apart, moved)  # measured 0 (bit for bit) on one machine
    assert block_drift(fresh_anchor, tmp_path / "part")[0] <= EPS * (1 + 1e-3)


# ------------------------------------------------------------------ project_ball_ itself, against brute force


def _perturbed(rank, frame_dtype="fp32", full_rank="l2", dtype=torch.float32):
    model = make_tiny_llama(64, inter=80)
    anchor = RotationAnchor.from_model(model, rank=rank, frame_dtype=frame_dtype, full_rank_as=full_rank)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(torch.randn(p.shape, generator=g) * 2e-3 * (1 + i % 5))  # uneven drift across matrices
    return model.to(dtype), anchor


def _expected(anchor, model, eps, group):
    """W after the projection, from the formula in fp64 (brute force on each matrix, no shared code path)."""
    params = dict(model.named_parameters())
    blocks = {}
    for t in anchor.terms.values():
        W = params[t.name].detach().double()
        if t.full:
            blocks[t.name] = (W - t.W0.double(), None)
        else:
            U, V = t.U.double(), t.V.double()
            ref = torch.diag(t.S.double()) if t.Aref is None else t.reference().double()
            blocks[t.name] = (U.T @ W @ V - ref, (U, V))
    keys = {n: n if group is None else group(n) for n in blocks}
    num, den = {}, {}
    for n, (A, _) in blocks.items():
        num[keys[n]] = num.get(keys[n], 0.0) + float(A.pow(2).sum())
        den[keys[n]] = den.get(keys[n], 0.0) + anchor.terms[n].ref_sq
    c = {k: max(0.0, 1 - eps * math.sqrt(den[k] / num[k])) for k in num}
    out = {}
    for n, (A, uv) in blocks.items():
        W = params[n].detach().double()
        if uv is None:
            out[n] = W - c[keys[n]] * A
        else:
            U, V = uv
            X = torch.linalg.solve(U.T @ U, c[keys[n]] * A) @ torch.linalg.inv(V.T @ V)  # least change, any frame
            out[n] = W - U @ X @ V.T
    return out, c


@pytest.mark.parametrize("scope", ["all", "type", "matrix"])
@pytest.mark.parametrize("frame_dtype", ["fp32", "bf16"])
def test_projection_matches_the_formula(scope, frame_dtype):
    # low rank, a non-square matrix at full rank (W0 kept, the paper's rule) and a square one
    model, anchor = _perturbed({"down_proj": 1.0, "o_proj": 1.0, "*": 4}, frame_dtype)
    budget = BallBudget(0.05, scope)
    group = None if scope == "matrix" else budget.group
    want, c = _expected(anchor, model, 0.05, group)
    assert max(c.values()) > 0 and (scope == "all" or min(c.values()) == 0.0)  # some groups inside, untouched
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    budget.project(anchor, model)
    for n, p in model.named_parameters():
        if n in want:
            err = float((p.detach().double() - want[n]).norm() / want[n].norm())
            assert err < 1e-6, (n, err)
        else:
            assert torch.equal(p, before[n]), n  # nothing outside the anchored matrices moves
    after = {n: r["rel"] for n, r in anchor.drift(model).items()}
    inside = [n for n in want if c[n if group is None else group(n)] == 0.0]
    assert all(torch.equal(dict(model.named_parameters())[n], before[n]) for n in inside)
    if scope == "all":
        assert budget.total_drift == pytest.approx(0.05, rel=1e-9) and budget.total_before > 0.05
    for g, d in budget.drift.items():
        assert d <= 0.05 * (1 + 1e-9) and (d == pytest.approx(0.05, rel=1e-9) or budget.scale[g] == 0.0)
    measured = math.sqrt(sum(r["abs"] ** 2 for r in anchor.drift(model).values()) /
                         sum(t.ref_sq for t in anchor.terms.values()))
    assert measured == pytest.approx(budget.total_drift, rel=1e-5)  # the recorded d is the weights' d
    if scope == "matrix":
        assert all(v <= 0.05 * (1 + 1e-5) for v in after.values())


def test_projection_at_zero_and_with_bf16_weights():
    # ε = 0 with lean (bf16) frames: only the Gram-corrected step brings A to round-off; the plain one
    # W − U_l A V_lᵀ would leave ≈ 2e-3 of A, the frames' orthonormality error
    model, anchor = _perturbed(4, "bf16")
    anchor.project_ball_(model, 0.0)
    assert max(r["rel"] for r in anchor.drift(model).values()) < 1e-6
    # bf16 weights: the update is made in fp32 and rounded once on write-back
    model, anchor = _perturbed(4, "fp32", dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    want = {}
    for t in anchor.terms.values():
        W = params[t.name].detach().float()
        A = t.U.T @ W @ t.V - torch.diag(t.S)
        c = max(0.0, 1 - 0.05 * t.ref_sq ** 0.5 / float(A.norm()))
        want[t.name] = (W - t.U @ (c * A) @ t.V.T).to(torch.bfloat16)
    anchor.project_ball_(model, 0.05)
    for n, w in want.items():
        assert params[n].dtype == torch.bfloat16
        assert float((params[n].detach().float() - w.float()).abs().max()) <= 2 ** -8 * float(w.float().abs().max())
    # a bf16 weight cannot hold d below its rounding: ε = 0 leaves d at the bf16 floor, not at 0
    anchor.project_ball_(model, 0.0)
    d = max(r["rel"] for r in anchor.drift(model).values())
    assert 1e-5 < d < 2 ** -7, d


def test_complement_anchor_is_refused():
    model = make_tiny_llama(64, inter=80)
    anchor = RotationAnchor.from_model(model, rank=4)
    anchor.form = "complement"
    with pytest.raises(ValueError, match="this anchor is the complement form"):
        anchor.project_ball_(model, 0.1)


# ------------------------------------------------------------------ FSDP2 row shards (two gloo processes)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    with gloo_rank(rank, world, port):
        spec = {"q_proj": 7, "down_proj": 1.0, "o_proj": 1.0, "*": 5}  # uneven rows; full rank (W0) non-square too
        for frame_dtype, scope in (("fp32", "all"), ("bf16", "matrix")):  # lean frames: G_U all-reduced too
            model = make_tiny_llama(64, inter=80, hidden=48)
            ref_model = make_tiny_llama(64, inter=80, hidden=48)
            anchor = RotationAnchor.from_model(model, rank=spec, frame_dtype=frame_dtype)
            ref = RotationAnchor.from_model(ref_model, rank=spec, frame_dtype=frame_dtype)
            perturb_and_shard(model, ref_model, world, scale=3e-2)
            b_sharded, b_ref = BallBudget(0.05, scope), BallBudget(0.05, scope)
            rows = b_sharded.project(anchor, model)
            rows_ref = b_ref.project(ref, ref_model)
            assert max(c for _, c in rows.values()) > 0
            for n in rows:
                assert rows[n][1] == pytest.approx(rows_ref[n][1], rel=1e-5, abs=1e-7), n
            assert b_sharded.total_drift == pytest.approx(b_ref.total_drift, rel=1e-6)
            from rpsft.distributed import row_shard

            refp = dict(ref_model.named_parameters())
            for name, p in model.named_parameters():
                if name in anchor.terms:
                    local, row0, _ = row_shard(p)
                    want = refp[name].detach()[row0:row0 + local.shape[0]]
                    assert float((local - want).norm() / want.norm()) < 1e-6, (frame_dtype, scope, name)
            drift, ref_drift = anchor.drift(model), ref.drift(ref_model)  # on the updated shards
            for n in drift:
                assert abs(drift[n]["abs"] - ref_drift[n]["abs"]) <= 1e-4 * ref_drift[n]["abs"] + 1e-7, n
                if scope == "matrix":
                    assert drift[n]["rel"] <= 0.05 * (1 + 1e-4), n
        with open(os.path.join(out_dir, f"ok{rank}"), "w") as f:
            f.write("ok")


def test_sharded_projection_matches_unsharded(tmp_path):
    run_ranks(_worker, tmp_path, world=2)
    assert (tmp_path / "ok0").is_file() and (tmp_path / "ok1").is_file()


# ------------------------------------------------------------------ configuration and refusals


@pytest.mark.parametrize("sets, match", [
    (["anchor.budget_form=bal", "anchor.budget=0.1"], "budget_form must be penalty .* did you mean 'ball'"),
    (["anchor.budget_form=ball"], "anchor.budget_form=ball needs anchor.budget=ε"),
    (["anchor.budget=0"], r"ε > 0 .*0 only with anchor.budget_form=ball\), got 0.0"),
    (["anchor.budget=-0.1", "anchor.budget_form=ball"], "anchor.budget must be a relative drift"),
    (["anchor.budget=0.1", "anchor.budget_scope=matrix"], r"all or type \(matrix only with anchor.budget_form=ball"),
    (["anchor.budget=0.1", "anchor.budget_form=ball", "anchor.budget_scope=matrx"], "did you mean 'matrix'"),
])
def test_bad_ball_config(sets, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, sets)


@pytest.mark.parametrize("method, match", [("rpsft_lora", "method=rpsft_lora anchors W0 \\+ s·BA"),
                                           ("complement", "method=complement anchors its complement")])
def test_ball_is_refused_for_a_method_it_cannot_project_before_the_model_loads(tmp_path, method, match):
    # the config loads (its keys are valid); what the method allows is checked where train() resolves the method
    from typer.testing import CliRunner

    from rpsft.cli import app

    sets = ["anchor.budget=0.1", "anchor.budget_form=ball", f"method={method}", "model.name=/nonexistent/model",
            f"output_dir={tmp_path / 'x'}"]
    assert load_config(None, sets).method == method
    r = CliRunner().invoke(app, ["train", *[a for s in sets for a in ("--set", s)]])
    assert r.exit_code == 2 and r.output.count("error:") == 1, r.output
    assert re.search(match, r.output.replace("\n", " ")), r.output
    assert "does not exist" not in r.output  # refused before the model path was even looked at


def test_config_builds_the_right_controller(caplog):
    assert type(BudgetController.from_config(load_config(None, ["anchor.budget=0.1"]).anchor)) is BudgetController
    ball = BudgetController.from_config(load_config(None, ["anchor.budget=0", "anchor.budget_form=ball",
                                                           "anchor.budget_scope=type", "anchor.lam=10"]).anchor)
    assert isinstance(ball, BallBudget) and ball.budget == 0.0 and ball.scope == "type" and ball.weight([]) == 0.0
    assert "anchor.lam: no effect with anchor.budget_form=ball" in caplog.text
    ball.updates, ball.drift, ball.scale = 7, {"q_proj": 0.01}, {"q_proj": 0.5}
    again = BallBudget(0.0, "type")
    again.load_state_dict(json.loads(json.dumps(ball.state_dict())))
    assert again.state_dict() == ball.state_dict() and again.state_dict()["drift_over_budget"] is None
    with pytest.raises(ValueError, match="budget form is 'ball', this run's 'penalty'"):
        BudgetController(0.1).load_state_dict(ball.state_dict())


def test_deepspeed_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from rpsft.cli import app

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets for a DeepSpeed config
    r = CliRunner().invoke(app, ["train", "--set", "anchor.budget=0.01", "--set", "anchor.budget_form=ball",
                                 "--set", "model.name=/nonexistent/model", "--set", f"output_dir={tmp_path / 'x'}"])
    assert r.exit_code == 2 and "DeepSpeed keeps the weights its optimizer updates" in r.output, r.output
    assert "does not exist" not in r.output  # refused before the model path was even looked at


def test_trainer_refuses_the_ball_under_deepspeed_and_on_adapters():
    ds = SimpleNamespace(anchor=RotationAnchor([]), accelerator=SimpleNamespace(
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=2))))
    with pytest.raises(ValueError, match="DeepSpeed keeps the weights its optimizer updates"):
        AnchorMixin._check_ball(ds)
    lora = SimpleNamespace(anchor=object(), accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None)))
    with pytest.raises(ValueError, match="use anchor.budget_form=penalty"):
        AnchorMixin._check_ball(lora)
    AnchorMixin._check_ball(SimpleNamespace(anchor=RotationAnchor([]), accelerator=lora.accelerator))  # accepted
