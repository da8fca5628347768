"""``rpsft rl`` frees the policy, its optimizer state and TRL's co-located vLLM engine before the after-training
evaluation starts its own engine, and still writes run.json."""

from __future__ import annotations

import json
import sys
import types
import weakref

import pytest

from fake_vllm import FakeVLLM

from .rl_helpers import tiny_overrides

import rpsft.rl.run as rl
import rpsft.rl.trainer as rl_trainer
from rpsft.rl import load_rl_config, run_rl


@pytest.mark.parametrize("engine", [True, False], ids=["colocated-vllm", "transformers"])
def test_training_is_freed_before_the_after_evaluation(tiny_model_dir, synth_file, tmp_path, monkeypatch, engine):
    import gc

    fake = FakeVLLM()
    made = {}
    build = rl_trainer.build_trainer

    def recording_build(cfg, model, tok, *args, **kwargs):
        trainer = build(cfg, model, tok, *args, **kwargs)
        made.update(trainer=weakref.ref(trainer), model=weakref.ref(trainer.model))
        if engine:  # where TRL 1.16 keeps its colocate-mode engine (GRPOTrainer.vllm_generation.llm)
            for name, mod in fake.modules.items():  # only now: use_vllm_default has looked for vllm already
                monkeypatch.setitem(sys.modules, name, mod)
            llm = fake.vllm.LLM(model=str(tiny_model_dir), tokenizer=str(tiny_model_dir), seed=0)
            trainer.vllm_generation = types.SimpleNamespace(mode="colocate", llm=llm)
            del llm
        return trainer

    seen = {}

    def evaluate(cfg, model, out, use_vllm):
        if model == str(tmp_path / "rl"):  # the after-training evaluation
            # run_rl collected already: alive here means alive while the evaluation's engine starts
            seen["before_collect"] = [made["trainer"]() is not None, made["model"]() is not None,
                                      bool(fake.engines) and fake.engines[0]() is not None]
            gc.collect()
            seen["after_collect"] = [made["trainer"]() is not None, made["model"]() is not None,
                                     bool(fake.engines) and fake.engines[0]() is not None]
            seen["vllm_teardown"] = list(fake.destroyed)
        return {"wall_s": 0}

    monkeypatch.setattr(rl_trainer, "build_trainer", recording_build)
    monkeypatch.setattr(rl, "_evaluate", evaluate)
    cfg = load_rl_config(None, tiny_overrides(synth_file, tmp_path / "rl", **{
        "train.max_steps": 1, "eval.enabled": "true", "eval.before": "false", "anchor.enabled": "true",
        "anchor.rank": 4}), init=str(tiny_model_dir))
    summary = run_rl(cfg, progress=False)
    assert seen["before_collect"] == [False, False, False]  # trainer, policy, TRL's engine
    assert seen["after_collect"] == [False, False, False]
    # vLLM's distributed state is torn down only when TRL's engine existed (it destroys the process group)
    assert seen["vllm_teardown"] == (["model_parallel", "distributed"] if engine else [])
    run = json.loads((tmp_path / "rl" / "run.json").read_text())
    assert run["global_step"] == summary["global_step"] == 1 and run["eval_after"] == {"wall_s": 0}
