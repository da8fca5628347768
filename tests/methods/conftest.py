"""Fixtures for the method tests: a config factory on the tiny model, a trainer built exactly as train() builds it,
a TRL-collated toy batch, and the hand-computed per-token log-probs every loss reference starts from."""

from __future__ import annotations

import pytest
import torch

from rpsft.config import load_config


@pytest.fixture
def make_cfg(tiny_model_dir, synth_data, tmp_path):
    def make(method: str, *extra: str, name: str | None = None):
        return load_config(None, [f"method={method}", f"model.name={tiny_model_dir}",
                                  f"data.train={synth_data['train']}", f"output_dir={tmp_path / (name or method)}",
                                  "data.limit=16", "data.max_length=96", "train.batch_size=2", "train.grad_accum=2",
                                  "train.max_steps=2", "train.lr=1e-2", "train.warmup_ratio=0",
                                  "train.lr_scheduler=constant", "train.save_steps=100", "anchor.rank=4", *extra])
    return make


def build_trainer(cfg):
    """The trainer train() would run for ``cfg`` (same method hooks, same SFTConfig), without training it."""
    from rpsft.data.formats import load_records, to_dataset
    from rpsft.methods import get_method
    from rpsft.models import load_model
    from rpsft.train import AnchoredSFTTrainer, build_anchor, build_sft_config

    method = get_method(cfg.method)
    torch.manual_seed(cfg.train.seed)
    model, tok = load_model(cfg.model.name)
    anchor = build_anchor(model, cfg, full_rank=method.anchor == "full") \
        if method.anchor_enabled(cfg.anchor.enabled) else None
    if method.prepare_model is not None:
        model = method.prepare_model(model, cfg)
    if anchor is not None and method.wrap_anchor is not None:
        anchor = method.wrap_anchor(anchor, model, cfg)
    cls = method.trainer_class() if method.trainer_class is not None else AnchoredSFTTrainer
    ds = to_dataset(load_records(cfg.data.train, limit=cfg.data.limit))
    return cls(model=model, args=build_sft_config(cfg, cfg.output_dir, **method.sft_overrides), train_dataset=ds,
               processing_class=tok, anchor=anchor, anchor_weight=cfg.anchor.lam, anchor_period=cfg.anchor.period,
               method_config=cfg)


def toy_batch(trainer, n: int = 3) -> dict:
    """n training rows collated by TRL itself: prompt and padding positions carry label -100."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()
    return batch


def token_log_probs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(y_t) per next-token label, mask) from the model's ordinary logits — independent of TRL's fused head."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp * mask, mask


@pytest.fixture
def helpers():
    from types import SimpleNamespace

    return SimpleNamespace(build_trainer=build_trainer, toy_batch=toy_batch, token_log_probs=token_log_probs)
