"""AnchorMixin on other Trainers: a plain transformers.Trainer gives AnchoredSFTTrainer's parameters, and the
DPOTrainer example of docs/trainers.md runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import Trainer

from rpsft.models import load_model
from rpsft.train import AnchoredSFTTrainer, build_anchor, build_sft_config
from rpsft.trainer import AnchorMixin
from .test_train import cfg_for, max_rel_diff, run_trainer

DOCS = Path(__file__).resolve().parents[1] / "docs" / "trainers.md"


class MixedTrainer(AnchorMixin, Trainer):
    """The anchor on transformers' own Trainer: no TRL in the class."""


@pytest.mark.numerics
def test_plain_trainer_with_the_mixin_equals_anchored_sft_trainer(tiny_model_dir, synth_data, tmp_path):
    sgd = ("train.optim=sgd", "train.lr=0.5", "train.max_steps=2")  # SGD: the update is the gradient itself
    cfg = cfg_for(tiny_model_dir, synth_data, tmp_path / "sft", *sgd)
    ours, sft = run_trainer(AnchoredSFTTrainer, cfg)
    # the same initial weights, tokenized rows, collator and TrainingArguments, through transformers.Trainer
    torch.manual_seed(0)
    model, tok = load_model(cfg.model.name)
    mixed = MixedTrainer(model=model, args=build_sft_config(cfg, tmp_path / "plain"), train_dataset=sft.train_dataset,
                         data_collator=sft.data_collator, processing_class=tok, anchor=build_anchor(model, cfg),
                         anchor_weight=cfg.anchor.lam, anchor_period=cfg.anchor.period)
    mixed.train()
    theirs = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert mixed.anchor_mode == "closed_form" and mixed.state.global_step == 2
    # equal up to fp32 round-off: each SGD update W − lr·g rounds every entry (u = 2^-24 of |W|, two steps, two runs),
    # and the two trainers' gradients (transformers' loss, TRL's) differ by their sums' round-off, an entry gathering at
    # most K ≈ 10^3 terms: γ_K ≈ K·u of the gradient, which moved the weights by ‖W − W0‖
    init, _ = load_model(cfg.model.name)
    u = 2.0 ** -24
    for n, p in init.named_parameters():
        bound = 4 * u * float(ours[n].norm()) + 1000 * u * float((ours[n] - p.detach()).norm())
        assert float((theirs[n] - ours[n]).norm()) <= bound, n
    # the anchor changed the trajectory (λ = 10), so the equality above is not SFT == SFT
    plain, _ = run_trainer(AnchoredSFTTrainer, cfg_for(tiny_model_dir, synth_data, tmp_path / "none", *sgd),
                           with_anchor=False)
    assert max_rel_diff(ours, plain) > 1e-4
    logged = [h for h in mixed.state.log_history if "rpsft/penalty" in h]
    assert len(logged) == 2 and logged[0]["rpsft/penalty"] < 1e-8 < logged[1]["rpsft/penalty"]
    assert logged[1]["rpsft/lambda"] == cfg.anchor.lam and "rpsft/drift/q_proj" in logged[1]
    assert mixed.anchor_final_penalty() > logged[1]["rpsft/penalty"]  # one more update since the last pass


def test_dpo_example_from_the_docs_runs_one_step(tiny_model_dir, tmp_path, capsys):
    block = re.search(r"```python\n(.*?)```", DOCS.read_text(), re.S).group(1)
    first, rest = block.split("\n", 1)
    assert first.startswith("MODEL, OUT, STEPS = ")
    scope: dict = {}
    exec(f"MODEL, OUT, STEPS = {str(tiny_model_dir)!r}, {str(tmp_path / 'dpo')!r}, 1\n" + rest, scope)
    trainer = scope["trainer"]
    assert type(trainer).__mro__[1:3] == (AnchorMixin, __import__("trl").DPOTrainer)
    assert trainer.state.global_step == 1 and trainer.anchor is not None
    logged = [h for h in trainer.state.log_history if "rpsft/penalty" in h]
    assert len(logged) == 1 and logged[0]["rpsft/penalty"] < 1e-8  # R at W0, measured before the first update
    assert "rpsft/drift/q_proj" in logged[0] and "rewards/chosen" in logged[0]  # DPO's own metrics still logged
    assert trainer.anchor_final_penalty() > 0  # the DPO step moved the weights inside the anchored frames
    assert "[" in capsys.readouterr().out


def _stub(stage):
    from types import SimpleNamespace

    plugin = None if stage is None else SimpleNamespace(zero_stage=stage)
    return SimpleNamespace(anchor=object(), accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)))


def test_mode_follows_the_launcher():
    import pytest

    assert AnchorMixin._resolve_mode(_stub(None), "auto") == "closed_form"
    assert AnchorMixin._resolve_mode(_stub(None), "autograd") == "autograd"
    for stage in (1, 2):  # DeepSpeed owns the gradient buffers: λR goes into the loss
        assert AnchorMixin._resolve_mode(_stub(stage), "auto") == "autograd"
        with pytest.raises(NotImplementedError, match="anchor.mode=auto"):
            AnchorMixin._resolve_mode(_stub(stage), "closed_form")
    with pytest.raises(NotImplementedError, match="ZeRO-3"):
        AnchorMixin._resolve_mode(_stub(3), "auto")


def test_dapo_trainer_has_no_anchor_code_of_its_own():
    from trl import GRPOTrainer

    from rpsft.rl.trainer import DAPOTrainer

    assert DAPOTrainer.__mro__[1:3] == (AnchorMixin, GRPOTrainer) and AnchoredSFTTrainer.__mro__[1] is AnchorMixin
    anchor_hooks = {"training_step", "compute_loss", "log", "_resolve_mode", "_anchor_due", "_after_anchor"}
    assert not anchor_hooks & set(vars(DAPOTrainer)) and not anchor_hooks & set(vars(AnchoredSFTTrainer))


def test_a_gathered_state_dict_is_saved_without_its_tied_copy(tiny_model_dir, synth_data, tmp_path):
    """FSDP's FULL_STATE_DICT gathers lm_head.weight and the embedding it is tied to as two tensors; the export keeps
    one name, as for a model whose tied weights share storage, and reloads to the same model."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from rpsft.trainer import drop_tied_copies

    cfg = cfg_for(tiny_model_dir, synth_data, tmp_path / "sft")
    model, tok = load_model(cfg.model.name)
    assert model.config.tie_word_embeddings and model.all_tied_weights_keys == {
        "lm_head.weight": "model.embed_tokens.weight"}
    gathered = {k: v.detach().clone() for k, v in model.state_dict().items()}  # no storage shared, as FSDP gathers
    assert "lm_head.weight" in gathered
    trainer = MixedTrainer(model=model, args=build_sft_config(cfg, tmp_path / "out"), processing_class=tok)
    trainer._save(str(tmp_path / "export"), state_dict=gathered)
    with safe_open(str(tmp_path / "export" / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert saved == set(gathered) - {"lm_head.weight"}
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert torch.equal(back.lm_head.weight, gathered["model.embed_tokens.weight"])
    # a copy that differs from its source is what was trained: kept; an untied model keeps both names
    changed = dict(gathered, **{"lm_head.weight": gathered["lm_head.weight"] + 1})
    assert "lm_head.weight" in drop_tied_copies(model, changed)
    model.config.tie_word_embeddings = False
    model.all_tied_weights_keys = model.get_expanded_tied_weights_keys()
    assert drop_tied_copies(model, gathered) is gathered
