"""Rotation budget (anchor.budget=ε): the controller holds the relative drift d of the anchored block at ε."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from rpsft_testing import StopAt

from rpsft.anchor import RotationAnchor
from rpsft.budget import BudgetController
from rpsft.config import ConfigError, load_config
from rpsft.models import load_model
from rpsft.train import train

EPS = 0.04


def cfg_for(tiny_model_dir, synth_data, out, *extra):
    # lr 2e-3 for 40 steps: plain SFT moves the rank-4 block by d ≈ 0.29 (> 5 × EPS)
    return load_config(None, [f"model.name={tiny_model_dir}", f"data.train={synth_data['train']}",
                              f"output_dir={out}", "data.limit=32", "data.max_length=96", "train.batch_size=2",
                              "train.grad_accum=1", "train.max_steps=40", "train.lr=2e-3", "train.warmup_ratio=0",
                              "train.lr_scheduler=constant", "train.save_steps=100", "anchor.rank=4", *extra])


def drift_of(run_dir, tiny_model_dir) -> float:
    """d = sqrt(Σ‖A‖² / Σ‖σ_k‖²) of saved weights, with a fresh rank-4 anchor built on the initial model."""
    init, _ = load_model(str(tiny_model_dir))
    anchor = RotationAnchor.from_model(init, rank=4)
    trained = AutoModelForCausalLM.from_pretrained(run_dir)
    rows = anchor.drift(trained)
    return math.sqrt(sum(r["abs"] ** 2 for r in rows.values()) / sum(t.ref_sq for t in anchor.terms.values()))


def log_rows(run_dir) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("budget") / "sft"
    train(cfg_for(tiny_model_dir, synth_data, out, "method=sft"), progress=False)
    return out


def test_budget_holds_the_drift_at_epsilon(tiny_model_dir, synth_data, sft_run, tmp_path):
    free = drift_of(sft_run, tiny_model_dir)
    assert free >= 5 * EPS, free  # unconstrained, the block moves far beyond the budget
    # λ starts 100x too weak and has to be found by the controller
    out = tmp_path / "budget"
    summary = train(cfg_for(tiny_model_dir, synth_data, out, f"anchor.budget={EPS}", "anchor.lam=0.01"),
                    progress=False)
    d = drift_of(out, tiny_model_dir)
    assert abs(d - EPS) <= 0.25 * EPS, d
    rows = log_rows(out)
    assert all("rpsft/lambda" in r and "rpsft/drift" in r for r in rows)
    lams = [r["rpsft/lambda"] for r in rows]
    assert max(lams) > 5 * 0.01  # it had to raise λ to hold the budget
    assert summary["anchor"]["budget"]["updates"] == 40  # one controller step per anchored step


def test_budget_above_the_free_drift_is_plain_sft(tiny_model_dir, synth_data, sft_run, tmp_path):
    out = tmp_path / "loose"
    train(cfg_for(tiny_model_dir, synth_data, out, "anchor.budget=10", "anchor.lam=0.01", "anchor.lam_min=1e-8"),
          progress=False)
    lams = [r["rpsft/lambda"] for r in log_rows(out)]
    assert all(b < a for a, b in zip(lams[1:], lams[2:]))  # falls every step once d is measured
    assert lams[-1] < 1e-3 * 0.01 and lams[-1] >= 1e-8
    init = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    sft = AutoModelForCausalLM.from_pretrained(sft_run).state_dict()
    got = AutoModelForCausalLM.from_pretrained(out).state_dict()
    moved = math.sqrt(sum(float((sft[n] - init[n]).pow(2).sum()) for n in sft))
    diff = math.sqrt(sum(float((got[n] - sft[n]).pow(2).sum()) for n in sft))
    assert diff < 0.02 * moved, (diff, moved)


def test_resume_reproduces_the_lambda_trajectory(tiny_model_dir, synth_data, tmp_path):
    extra = ("train.max_steps=8", "train.save_steps=4", f"anchor.budget={EPS}", "anchor.lam=0.01")
    train(cfg_for(tiny_model_dir, synth_data, tmp_path / "full", *extra), progress=False)
    part = cfg_for(tiny_model_dir, synth_data, tmp_path / "part", *extra)
    train(part, progress=False, extra_callbacks=[StopAt(6)])  # interrupted after step 6, checkpoint at 4
    state = json.loads((tmp_path / "part" / "checkpoint-4" / "rpsft_budget.json").read_text())
    assert state["updates"] == 4 and state["lam"]["all"] > 0
    train(part, resume="latest", progress=False)
    a = {r["step"]: (r["rpsft/lambda"], r["rpsft/drift"]) for r in log_rows(tmp_path / "full")}
    b = {r["step"]: (r["rpsft/lambda"], r["rpsft/drift"]) for r in log_rows(tmp_path / "part")}
    assert sorted(b) == list(range(1, 9))
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-6, abs=1e-12), s
    assert len({v[0] for v in a.values()}) == 8  # λ really moved: the check is not constant == constant


@pytest.mark.parametrize("extra", [("anchor.mode=autograd",), ("anchor.period=2",), ("anchor.budget_scope=type",)])
def test_budget_in_every_mode(tiny_model_dir, synth_data, tmp_path, extra):
    out = tmp_path / "m"
    train(cfg_for(tiny_model_dir, synth_data, out, "train.max_steps=6", f"anchor.budget={EPS}", "anchor.lam=0.01",
                  *extra), progress=False)
    rows = log_rows(out)
    assert len(rows) == 6 and all(r["rpsft/drift"] >= 0 for r in rows)
    if "anchor.budget_scope=type" in extra:
        keys = {k for k in rows[-1] if k.startswith("rpsft/lambda/")}
        assert keys == {f"rpsft/lambda/{t}" for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj")}
        assert len({rows[-1][k] for k in keys}) > 1  # each type has its own λ
        return
    lams = [r["rpsft/lambda"] for r in rows]
    if "anchor.period=2" in extra:  # anchored at steps 1, 3, 5: λ changes only after 3 and 5 (step 1 measures W0)
        assert lams[0] == lams[1] == 0.01 != lams[2] == lams[3] != lams[4] == lams[5]
    else:
        assert len(set(lams[1:])) == 5


def test_autograd_mode_follows_the_closed_form_trajectory(tiny_model_dir, synth_data, tmp_path):
    runs = {}
    for mode in ("closed_form", "autograd"):
        train(cfg_for(tiny_model_dir, synth_data, tmp_path / mode, "train.max_steps=5", f"anchor.budget={EPS}",
                      "anchor.lam=0.01", f"anchor.mode={mode}"), progress=False)
        runs[mode] = [r["rpsft/lambda"] for r in log_rows(tmp_path / mode)]
    assert runs["autograd"] == pytest.approx(runs["closed_form"], rel=1e-4)


def test_budget_on_rpsft_lora(tiny_model_dir, synth_data, tmp_path):
    out = tmp_path / "lora"
    train(cfg_for(tiny_model_dir, synth_data, out, "method=rpsft_lora", "train.max_steps=4", "lora.r=4",
                  "lora.merge=false", f"anchor.budget={EPS}", "anchor.lam=0.01"), progress=False)
    rows = log_rows(out)
    assert rows[-1]["rpsft/drift"] > 0 and rows[-1]["rpsft/lambda"] != rows[1]["rpsft/lambda"]


@pytest.mark.numerics
def test_per_type_weights_in_the_closed_form_gradient():
    from rpsft_testing import make_tiny_llama

    model = make_tiny_llama(64, inter=80)
    anchor = RotationAnchor.from_model(model, rank=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    w = {n: (3.0 if "k_proj" in n else 0.5) for n in anchor.terms}
    anchor.accumulate_grad_(model, w)
    got = {n: p.grad.clone() for n, p in model.named_parameters() if n in anchor.terms}
    model.zero_grad(set_to_none=True)
    anchor.penalty(model, weight=w).backward()
    for n, g in got.items():
        torch.testing.assert_close(g, dict(model.named_parameters())[n].grad, rtol=1e-5, atol=1e-7)


def test_controller_bounds_and_state_round_trip():
    class Fake:
        def __init__(self, sq):
            self.last_sq = sq
            self.terms = {n: type("T", (), {"ref_sq": 1.0})() for n in sq}

    c = BudgetController(0.1, lam=1.0, lam_min=0.5, lam_max=2.0, rate=0.2, kp=1.0)
    for i in range(20):
        c.update(Fake({"a.q_proj.weight": 1.0 + 1e-3 * i}))  # d ≈ 1 = 10 ε: λ rises to its ceiling and stays
    assert c.lam["all"] == 2.0 and c.drift["all"] == pytest.approx(math.sqrt(1 + 1e-3 * 19))  # the last d measured
    for i in range(40):
        c.update(Fake({"a.q_proj.weight": 1e-8 * (1 + 1e-3 * i)}))  # far below: down to the floor, no wind-up
    assert c.lam["all"] == 0.5
    c2 = BudgetController(0.1, lam=1.0, lam_min=0.5, lam_max=2.0)
    c2.load_state_dict(json.loads(json.dumps(c.state_dict())))
    assert c2.state_dict() == c.state_dict()


def test_controller_holds_lambda_while_the_weights_do_not_move():
    class Fake:
        def __init__(self, sq):
            self.last_sq = sq
            self.terms = {n: type("T", (), {"ref_sq": 1.0})() for n in sq}

    c = BudgetController(1e-3, lam=10.0, rate=0.2, kp=1.0)
    w0 = {"a.q_proj.weight": 1e-26, "a.k_proj.weight": 3e-27}  # round-off of W0
    for _ in range(3):  # W0 measured, then two warm-up steps at lr 0 (or skipped steps): the same ‖A‖² each time
        assert c.update(Fake(dict(w0))) == 10.0
    assert c.updates == 3 and c.drift["all"] == pytest.approx(math.sqrt(1.3e-26 / 2))
    # the first step that moved the weights: far below ε, λ loosens by e^-(rate + kp)
    assert c.update(Fake({"a.q_proj.weight": 1e-12, "a.k_proj.weight": 1e-12})) == pytest.approx(10 * math.exp(-1.2))
    # a pass that repeats it exactly (the optimizer skipped that step) leaves λ where it is
    lam = c.lam["all"]
    assert c.update(Fake({"a.q_proj.weight": 1e-12, "a.k_proj.weight": 1e-12})) == lam
    # per type: only the group whose d changed acts
    t = BudgetController(1e-3, lam=1.0, scope="type")
    t.update(Fake({"a.q_proj.weight": 1e-6, "a.k_proj.weight": 1e-6}))
    t.update(Fake({"a.q_proj.weight": 1e-6, "a.k_proj.weight": 4.0}))
    assert "q_proj" not in t.lam and t.lam["k_proj"] > 1.0


@pytest.mark.parametrize("sets, match", [
    (["anchor.budget=0"], "anchor.budget must be a relative drift"),
    (["anchor.budget=-0.1"], "anchor.budget must be a relative drift"),
    (["anchor.budget=nan"], "anchor.budget must be a relative drift"),
    (["anchor.budget=lots"], "anchor.budget: expected a number"),
    (["anchor.budget=0.1", "anchor.lam_min=1", "anchor.lam_max=0.1"], "admit no λ"),
    (["anchor.budget=0.1", "anchor.lam_min=0"], "admit no λ"),
    (["anchor.budget=0.1", "anchor.budget_scope=layer"], "budget_scope must be all or type"),
])
def test_bad_budget_config(sets, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, sets)


def test_budget_without_anchor_fails_before_the_model_loads(tmp_path):
    from typer.testing import CliRunner

    from rpsft.cli import app

    r = CliRunner().invoke(app, ["train", "--set", "method=sft", "--set", "anchor.budget=0.05", "--set",
                                 "model.name=/nonexistent/model", "--set", f"output_dir={tmp_path / 'x'}"])
    assert r.exit_code == 2 and "anchor.budget=0.05 needs the rotation anchor" in r.output
    assert "Loading" not in r.output and "does not exist" not in r.output  # refused before data or model
