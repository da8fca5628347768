"""One end-to-end run on the real embedded SmolLM2-135M-Instruct (GGUF -> cached fp32 checkpoint -> RPSFT)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch


@pytest.mark.slow
def test_smollm2_rpsft_few_steps(tmp_path, synth_data, monkeypatch):
    import os as _os

    torch.set_num_threads(max(1, len(_os.sched_getaffinity(0))))  # a real model: use every core (restored after)
    monkeypatch.delenv("RPSFT_CACHE", raising=False)  # use (and fill) the user's cache: the conversion is once
    if os.environ.get("RPSFT_TEST_CACHE"):
        monkeypatch.setenv("RPSFT_CACHE", os.environ["RPSFT_TEST_CACHE"])
    from rpsft.anchor import RotationAnchor
    from rpsft.config import load_config
    from rpsft.models import load_model
    from rpsft.train import train

    model, tok = load_model("smollm2-135m-instruct")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    q = model.model.layers[0].self_attn.q_proj.weight
    anchor = RotationAnchor.from_model(model, rank=64, targets=["q_proj"], layers="0-1")
    sigma_sq = sum(float(t.S.double().pow(2).sum()) for t in anchor.terms.values())
    assert anchor.penalty(model).item() < 1e-6 * sigma_sq
    assert anchor.nbytes == 2 * (576 + 576 + 1) * 64 * 4 and q.dtype == torch.float32
    del model

    cfg = load_config(None, [f"data.train={synth_data['train']}", f"output_dir={tmp_path / 'run'}",
                             "data.limit=8", "data.max_length=160", "train.batch_size=2", "train.grad_accum=2",
                             "train.max_steps=2", "train.lr=1e-5", "anchor.rank=32", "anchor.layers=0-3"])
    try:
        summary = train(cfg, progress=False)
        rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in rows if "loss" in r]
        assert len(losses) == 2 and all(0 < x < 5 for x in losses)  # an instruct model on easy math: low NLL
        assert summary["anchor"]["matrices"] == 28 and summary["anchor"]["final_penalty"] > 0
        tuned, _ = load_model(str(tmp_path / "run"))
        assert not torch.equal(tuned.model.layers[0].self_attn.q_proj.weight, q)
    finally:
        # a full SmolLM2 run: ≈ 0.5 GB of weights plus a checkpoint with its Adam states (≈ 2 GB in all); pytest
        # keeps the last three temp dirs, so the weights go as soon as the assertions have read them
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
