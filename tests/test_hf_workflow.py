"""Hugging Face workflow: trackers, the trainer: pass-through, data.eval -> eval_loss, the model card."""

from __future__ import annotations

import json

import pytest
from trl import GRPOConfig, SFTConfig

from rpsft.config import ConfigError, load_config
from rpsft.trainer_args import check_report_to, check_trainer_section
from rpsft.train import build_sft_config, train

from .test_train import cfg_for


def test_trainer_section_reaches_sft_config_and_wins(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}", "trainer.hub_model_id=me/model", "trainer.eval_steps=7",
                             "trainer.learning_rate=0.5"])
    args = build_sft_config(cfg, tmp_path)
    assert args.hub_model_id == "me/model" and args.eval_steps == 7
    assert args.learning_rate == 0.5  # the pass-through overrides what train.lr derived


def test_trainer_section_from_yaml_and_unknown_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("trainer:\n  push_to_hub: false\n  hub_private_repo: true\n")
    assert load_config(p).trainer == {"push_to_hub": False, "hub_private_repo": True}
    with pytest.raises(ConfigError, match=r"unknown trainer key 'trainer.eval_stratgy'.*'trainer.eval_strategy'"):
        check_trainer_section({"eval_stratgy": "steps"}, SFTConfig)
    with pytest.raises(ConfigError, match="GRPOConfig.*'trainer.num_generations'"):
        check_trainer_section({"num_generation": 4}, GRPOConfig)
    assert check_trainer_section({"num_generations": 4}, GRPOConfig) == {"num_generations": 4}
    with pytest.raises(ConfigError, match="top-level output_dir"):
        check_trainer_section({"output_dir": "x"}, SFTConfig)


def test_report_to_is_checked():
    assert check_report_to([]) == [] and check_report_to(["none"]) == []
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'; did you mean 'tensorboard'"):
        check_report_to(["tensorbord"])


def test_bad_trainer_key_fails_before_loading(tmp_path, synth_data):
    cfg = load_config(None, ["model.name=/nonexistent/model", f"data.train={synth_data['train']}",
                             f"output_dir={tmp_path / 'r'}", "trainer.max_stepz=3"])
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        train(cfg, progress=False)
    assert not (tmp_path / "r").exists()


def test_tensorboard_event_file_holds_loss_and_penalty(tiny_model_dir, synth_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    train(cfg_for(tiny_model_dir, synth_data, out, "train.report_to=tensorboard", "train.max_steps=2",
                  f"data.eval={synth_data['test']}", "trainer.per_device_eval_batch_size=4"), progress=False)
    events = list((out / "runs").rglob("events.out.tfevents.*"))
    assert events, f"no event file under {out / 'runs'}"
    tags = set()
    values = {}
    for ev in events:
        acc = EventAccumulator(str(ev.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            tags.add(tag)
            values[tag] = [s.value for s in acc.Scalars(tag)]
    assert {"train/loss", "train/rpsft/penalty", "train/rpsft/lambda", "eval/loss"} <= tags, tags
    assert any(t.startswith("train/rpsft/drift/") for t in tags)
    assert len(values["train/loss"]) == 2 and values["train/rpsft/lambda"] == [10.0, 10.0]
    assert len(values["eval/loss"]) == 1  # evaluated once at the end, not again by train()
    assert all(v > 0 for v in values["train/rpsft/penalty"])  # lr 1e-2 moves the weights: R > 0 after step 1
    # the run's own metrics agree with the tracker
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    pen = [r["rpsft/penalty"] for r in rows if "rpsft/penalty" in r]
    assert values["train/rpsft/penalty"] == pytest.approx(pen, rel=1e-6)


def test_eval_loss_and_model_card(tiny_model_dir, synth_data, tmp_path):
    out = tmp_path / "ev"
    summary = train(cfg_for(tiny_model_dir, synth_data, out, "train.max_steps=2", f"data.eval={synth_data['test']}"),
                    progress=False)
    assert summary["eval_loss"] is not None and summary["eval_loss"] > 0
    card = (out / "README.md").read_text()
    head = card.split("---")[1]
    assert "- rpsft" in head and "- rpsft-rpsft" in head and "- sft" in head  # tags in the card's metadata
    assert "method: `rpsft`" in card and "λ = 10.0" in card and "k = [4]" in card
    assert f"base model: `{tiny_model_dir}`" in card and "q_proj" in card


def test_rl_takes_trackers_trainer_keys_and_hub_prompts(monkeypatch):
    import datasets

    from rpsft.rl import load_prompts, load_rl_config
    from rpsft.rl.trainer import build_grpo_config

    cfg = load_rl_config(None, ["train.report_to=tensorboard", "trainer.hub_model_id=me/rl", "trainer.top_k=5",
                                "data.train=hf:openai/gsm8k:main:train", "data.limit=2"], init="x")
    pytest.importorskip("tensorboard")
    args = build_grpo_config(cfg, "/tmp/unused", [1.0], use_vllm=False)
    assert args.report_to == ["tensorboard"] and args.hub_model_id == "me/rl" and args.top_k == 5
    bad = load_rl_config(None, ["trainer.num_generatoins=2"], init="x")
    with pytest.raises(ConfigError, match="GRPOConfig; did you mean 'trainer.num_generations'"):
        build_grpo_config(bad, "/tmp/unused", [1.0], use_vllm=False)

    seen = []
    rows = [{"question": "What is 1 + 1?", "answer": "one and one\n#### 2"}] * 3

    def fake(name, config=None, split=None, **kw):
        seen.append((name, config, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    prompts = load_prompts(cfg)
    assert seen == [("openai/gsm8k", "main", "train")] and len(prompts) == 2
    assert prompts[0]["prompt"][-1] == {"role": "user", "content": "What is 1 + 1?"}
    assert prompts[0]["prompt"][0]["role"] == "system"  # GSM8K rows get the official boxed instruction
