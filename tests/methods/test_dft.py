"""method=dft: TRL's loss_type="dft" drives the run, and its loss/gradient is the DFT formula on a toy batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rpsft.train import train


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.numerics
def test_dft_loss_and_gradient_match_the_formula(make_cfg, helpers):
    trainer = helpers.build_trainer(make_cfg("dft"))
    assert trainer.args.loss_type == "dft"
    model = trainer.model
    batch = helpers.toy_batch(trainer)

    model.zero_grad()
    ours = trainer.compute_loss(model, dict(batch))
    ours.backward()
    g_ours = grads(model)

    # DFT (arXiv:2508.05629): L = −(1/N) Σ_t sg(p_t)·log p_t, from the plain logits
    model.zero_grad()
    lp, mask = helpers.token_log_probs(model, batch)
    ref = -(lp.exp().detach() * lp).sum() / mask.sum()
    ref.backward()
    g_ref = grads(model)

    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert set(g_ours) == set(g_ref)
    for n in g_ref:
        torch.testing.assert_close(g_ours[n], g_ref[n], rtol=1e-4, atol=1e-7, msg=n)
    # and it is not the NLL (which is what a silently ignored loss_type would give)
    nll = -(lp.sum() / mask.sum()).item()
    assert abs(nll - ours.item()) > 0.5 * ours.item()


def test_dft_trains_and_composes_with_the_anchor(make_cfg):
    cfg = make_cfg("dft", "anchor.enabled=true")
    summary = train(cfg, progress=False)
    assert summary["global_step"] == 2 and summary["anchor"]["matrices"] == 14
    assert summary["config"]["method"] == "dft"
    rows = [json.loads(x) for x in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2 and all("rpsft/penalty" in r for r in steps)
