"""The anchored trainer: once-per-step anchor == the paper's objective, k=0 == SFT, resume == uninterrupted."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl import SFTTrainer

from rpsft_testing import StopAt

from rpsft.config import load_config
from rpsft.data.formats import load_records, to_dataset
from rpsft.models import load_model
from rpsft.train import AnchoredSFTTrainer, build_anchor, build_sft_config, train


def cfg_for(tiny_model_dir, synth_data, out, *extra):
    return load_config(None, [f"model.name={tiny_model_dir}", f"data.train={synth_data['train']}",
                              f"output_dir={out}", "data.limit=32", "data.max_length=128", "train.batch_size=2",
                              "train.grad_accum=4", "train.max_steps=3", "train.lr=1e-2", "train.warmup_ratio=0",
                              "train.lr_scheduler=constant", "train.save_steps=100", "anchor.rank=4",
                              "anchor.lam=10", *extra])


class PerMicroBatchPenalty(SFTTrainer):
    """The paper's objective written the authors' way: λ·R added to every micro-batch loss (autograd)."""

    def __init__(self, *a, anchor, lam, **k):
        super().__init__(*a, **k)
        self.anchor, self.lam = anchor, lam

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs=False, num_items_in_batch=num_items_in_batch)
        # With num_items_in_batch the task loss is already a share of the window's mean and Trainer will not divide
        # by grad_accum; λR must then be split over the micro-batches so that the window's total is L_task + λR.
        scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        r = self.anchor.penalty(self.accelerator.unwrap_model(model))
        return loss + self.lam * r / (self.current_gradient_accumulation_steps if scaled else 1)


def run_trainer(cls, cfg, **kw):
    torch.manual_seed(0)
    model, tok = load_model(cfg.model.name)
    anchor = build_anchor(model, cfg) if kw.pop("with_anchor", True) else None
    ds = to_dataset(load_records(cfg.data.train, limit=cfg.data.limit))
    args = build_sft_config(cfg, cfg.output_dir)
    if cls is AnchoredSFTTrainer:
        kw.update(anchor=anchor, anchor_weight=cfg.anchor.lam, anchor_period=cfg.anchor.period)
        kw.setdefault("anchor_mode", "auto")
    elif cls is PerMicroBatchPenalty:
        kw.update(anchor=anchor, lam=cfg.anchor.lam)
    trainer = cls(model=model, args=args, train_dataset=ds, processing_class=tok, **kw)
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, trainer


def max_rel_diff(a, b):
    return max(float((a[n] - b[n]).norm() / (b[n].norm() + 1e-12)) for n in a)


def test_once_per_step_equals_per_microbatch_objective(tiny_model_dir, synth_data, tmp_path):
    # SGD: the update is linear in the gradient, so the comparison sees the gradients themselves. (Adam's m/√v
    # turns fp32 round-off in near-zero gradient entries into lr-sized moves and would hide a real bug in noise.)
    sgd = ("train.optim=sgd", "train.lr=0.5")
    cfg = cfg_for(tiny_model_dir, synth_data, tmp_path / "a", *sgd)
    ours, trainer = run_trainer(AnchoredSFTTrainer, cfg)
    ref, _ = run_trainer(PerMicroBatchPenalty, cfg_for(tiny_model_dir, synth_data, tmp_path / "b", *sgd))
    plain, _ = run_trainer(AnchoredSFTTrainer, cfg_for(tiny_model_dir, synth_data, tmp_path / "c", *sgd),
                           with_anchor=False)
    assert max_rel_diff(ours, ref) < 1e-5
    # the anchor really changed the trajectory, so the equality above is not SFT == SFT
    assert max_rel_diff(ours, plain) > 1e3 * max(max_rel_diff(ours, ref), 1e-9)
    # the autograd form on the window's last micro-batch (our DeepSpeed path) is the same objective too
    auto, auto_trainer = run_trainer(AnchoredSFTTrainer, cfg_for(tiny_model_dir, synth_data, tmp_path / "d", *sgd),
                                     anchor_mode="autograd")
    assert max_rel_diff(auto, ref) < 1e-5
    # and it logs the task loss, as the closed form does (λR is differentiated with it, then taken out of the log)
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h]  # noqa: E731
    penalties = [h["rpsft/weighted_penalty"] for h in auto_trainer.state.log_history if "loss" in h]
    assert penalties[-1] > 1e-3  # large enough that logging L + λR instead of L would fail the next line
    assert losses(auto_trainer) == pytest.approx(losses(trainer), abs=2e-4)
    logged = [h for h in trainer.state.log_history if "rpsft/penalty" in h]
    assert len(logged) == 3 and logged[0]["rpsft/penalty"] < 1e-8 < logged[-1]["rpsft/penalty"]
    assert {f"rpsft/drift/{t}" for t in ("q_proj", "down_proj")} <= set(logged[-1])


def test_rank_zero_is_bit_identical_to_plain_sft(tiny_model_dir, synth_data, tmp_path):
    cfg = cfg_for(tiny_model_dir, synth_data, tmp_path / "k0", "anchor.rank=0")
    summary = train(cfg, progress=False)
    assert summary["anchor"] is None  # k = 0 anchors nothing
    ours = load_model(str(tmp_path / "k0"))[0].state_dict()
    ref, _ = run_trainer(SFTTrainer, cfg_for(tiny_model_dir, synth_data, tmp_path / "sft"), with_anchor=False)
    for n, p in ref.items():
        assert torch.equal(ours[n], p), n


def test_period_applies_every_s_steps(tiny_model_dir, synth_data, tmp_path):
    cfg = cfg_for(tiny_model_dir, synth_data, tmp_path / "p", "anchor.period=2", "train.max_steps=5")
    _, trainer = run_trainer(AnchoredSFTTrainer, cfg)
    steps = [h["step"] for h in trainer.state.log_history if "rpsft/penalty" in h]
    assert steps == [1, 3, 5]  # applied while computing steps 1, 3, 5 (global_step 0, 2, 4 before the update)


def test_resume_continues_the_same_run(tiny_model_dir, synth_data, tmp_path):
    extra = ("train.max_steps=6", "train.save_steps=3", "train.lr_scheduler=cosine", "train.warmup_ratio=0.2",
             "train.lr=5e-3")
    full = train(cfg_for(tiny_model_dir, synth_data, tmp_path / "full", *extra), progress=False)
    part_cfg = cfg_for(tiny_model_dir, synth_data, tmp_path / "part", *extra)
    train(part_cfg, progress=False, extra_callbacks=[StopAt(4)])  # "interrupted" after step 4, checkpoint at 3
    with pytest.raises(FileExistsError, match="--resume"):
        train(part_cfg, progress=False)
    changed = cfg_for(tiny_model_dir, synth_data, tmp_path / "part", *extra, "anchor.lam=3")
    with pytest.raises(ValueError, match=r"config differs.*lam: 3.0"):
        train(changed, resume="latest", progress=False)
    resumed = train(part_cfg, resume="latest", progress=False)
    assert resumed["resumed_from"].endswith("checkpoint-3") and resumed["global_step"] == 6

    def losses(d):
        return {r["step"]: r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                if "loss" in r}

    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert sorted(b) == [1, 2, 3, 4, 5, 6]  # step 4 of the interrupted attempt was dropped, not duplicated
    for s in range(1, 7):
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6), s
    wa = AutoModelForCausalLM.from_pretrained(tmp_path / "full").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(tmp_path / "part").state_dict()
    assert max(float((wa[n] - wb[n]).abs().max()) for n in wa) < 1e-5
    assert full["anchor"]["final_penalty"] == pytest.approx(resumed["anchor"]["final_penalty"], rel=1e-3)


def test_outputs_of_a_run(tiny_model_dir, synth_data, tmp_path):
    out = tmp_path / "run"
    summary = train(cfg_for(tiny_model_dir, synth_data, out, "train.max_steps=2", "train.save_steps=1"),
                    progress=False)
    assert (out / "config.yaml").is_file() and (out / "run.json").is_file()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all("rpsft/penalty" in r for r in rows if "loss" in r)
    assert load_config(out / "config.yaml").anchor.rank == 4  # resolved config reloads
    model = AutoModelForCausalLM.from_pretrained(out)
    assert summary["anchor"]["matrices"] == 14
    assert sum(p.numel() for p in model.parameters()) > 0


def test_method_and_anchor_combinations(tiny_model_dir, synth_data, tmp_path):
    with pytest.raises(ValueError, match="use method=sft"):
        train(cfg_for(tiny_model_dir, synth_data, tmp_path / "x", "anchor.enabled=false"), progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        train(cfg_for(tiny_model_dir, synth_data, tmp_path / "y", "method=magic"), progress=False)


def test_refusals_point_to_the_right_method():
    from rpsft.methods import get_method

    with pytest.raises(ValueError, match="use method=lora"):
        get_method("rpsft_lora").anchor_enabled(False)
    with pytest.raises(ValueError, match="method=rpsft_lora"):
        get_method("lora").anchor_enabled(True)
