"""method=lora: the paper's LoRA setting, only adapters train, and the merged export equals the adapter model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rpsft.models import load_model
from rpsft.train import train


def test_lora_configuration_is_the_papers(make_cfg, helpers):
    trainer = helpers.build_trainer(make_cfg("lora"))
    pc = trainer.model.peft_config["default"]
    assert (pc.r, pc.lora_alpha, pc.lora_dropout) == (32, 64, 0.0)
    assert set(pc.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in trainer.model.named_parameters() if ".lora_A." in n}
    assert len(adapted) == 14  # 7 projections × 2 layers
    assert all(("lora_" in n) == p.requires_grad for n, p in trainer.model.named_parameters())


def test_lora_trains_adapters_and_exports_a_merged_checkpoint(make_cfg):
    from peft import PeftModel

    cfg = make_cfg("lora", "train.max_steps=3")
    summary = train(cfg, progress=False)
    out = Path(cfg.output_dir)
    assert summary["merged_model"] == str(out / "merged") and (out / "adapter_model.safetensors").is_file()
    assert 0 < summary["trainable_parameters"] < summary["total_parameters"]

    initial, tok = load_model(cfg.model.name)
    init_sd = {k: v.clone() for k, v in initial.state_dict().items()}
    adapter_model = PeftModel.from_pretrained(initial, out).eval()  # the adapter as saved by train()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert set(merged.state_dict()) == set(init_sd)  # a plain checkpoint: no lora_* / base_layer keys
    ids = tok("<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = adapter_model(ids).logits, merged(ids).logits
        c = AutoModelForCausalLM.from_pretrained(cfg.model.name)(ids).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert (b - c).abs().max() > 1e-3  # training changed the function, so the equality above is not trivial
    # only the adapted projections moved; embeddings and norms are the initial ones
    msd = merged.state_dict()
    moved = {k for k in init_sd if not torch.equal(msd[k], init_sd[k])}
    projections = {f"model.layers.{i}.{blk}.{p}.weight" for i in range(2)
                   for blk, ps in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                   ("mlp", ("gate_proj", "up_proj", "down_proj"))) for p in ps}
    assert moved == projections


def test_lora_refuses_the_dense_anchor(make_cfg):
    with pytest.raises(ValueError, match="cannot be combined with the rotation anchor"):
        train(make_cfg("lora", "anchor.enabled=true"), progress=False)
    with pytest.raises(ValueError, match="lora.r"):
        train(make_cfg("lora", "lora.r=0", name="r0"), progress=False)
