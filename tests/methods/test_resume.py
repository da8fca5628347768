"""--resume continues an interrupted run of the methods with state of their own: PEFT adapters (+ the factored
anchor) and IW's reference, which must still be the *initial* model, not the checkpoint resumed from."""

from __future__ import annotations

import pytest
from rpsft_testing import StopAt

from rpsft.fileio import read_jsonl
from rpsft.train import train


@pytest.mark.parametrize("method", ["rpsft_lora", "iw"])
def test_resume_reproduces_the_uninterrupted_run(make_cfg, method):
    extra = ("train.max_steps=4", "train.save_steps=2")
    full = train(make_cfg(method, *extra, name="full"), progress=False)
    cfg = make_cfg(method, *extra, name="part")
    train(cfg, progress=False, extra_callbacks=[StopAt(3)])  # interrupted after step 3, checkpoint at 2
    resumed = train(cfg, resume="latest", progress=False)
    assert resumed["resumed_from"].endswith("checkpoint-2")

    def losses(summary):
        return [r["loss"] for r in read_jsonl(f"{summary['output_dir']}/metrics.jsonl") if "loss" in r]

    a, b = losses(full), losses(resumed)
    assert len(a) == len(b) == 4
    assert b == pytest.approx(a, rel=1e-4)
    assert len(set(a)) == 4  # the loss moves, so equal curves are not a constant compared with itself
