"""The anchor in DAPO through AnchorMixin: λR in GRPOTrainer's DAPO loss on the window's last micro-batch (the
DeepSpeed ZeRO-1/2 path) gives the closed form's parameters."""

from __future__ import annotations

import torch

from .test_rl_trainer import Canned, make_trainer


def _run(tiny_model_dir, synth_file, tmp_path, **extra):
    common = {"anchor.rank": 4, "anchor.lam": 100, "train.optim": "sgd", "train.lr": 0.5, "train.save_steps": 100,
              "dapo.max_completion_length": 24}  # G = 2, 2 prompts per step, micro-batches of 2: 2 per window
    anchored = extra.pop("anchor", True)
    trainer, tok = make_trainer(tiny_model_dir, synth_file, tmp_path,
                                {**common, "anchor.enabled": str(anchored).lower(), **extra}, anchor=anchored)
    trainer._generate_single_turn = Canned(tok, [[True, False, False, True]])
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, trainer


def _rel(a, b):
    return max(float((a[n] - b[n]).norm() / (b[n].norm() + 1e-12)) for n in a)


def test_autograd_mode_equals_closed_form_in_dapo(tiny_model_dir, synth_file, tmp_path):
    closed, t1 = _run(tiny_model_dir, synth_file, tmp_path / "closed")
    auto, t2 = _run(tiny_model_dir, synth_file, tmp_path / "auto", **{"anchor.mode": "autograd"})
    plain, _ = _run(tiny_model_dir, synth_file, tmp_path / "plain", anchor=False)
    assert (t1.anchor_mode, t2.anchor_mode) == ("closed_form", "autograd") and t2.state.global_step == 2
    assert _rel(auto, closed) < 1e-5
    assert _rel(closed, plain) > 1e3 * max(_rel(auto, closed), 1e-9)  # the anchor really moved the trajectory
    pens = [[h["rpsft/penalty"] for h in t.state.log_history if "rpsft/penalty" in h] for t in (t1, t2)]
    assert len(pens[0]) == 2 and pens[0][0] < 1e-8 < pens[0][1]
    assert torch.allclose(torch.tensor(pens[1]), torch.tensor(pens[0]), rtol=1e-4, atol=1e-10)
