"""RL config (YAML + --set, unknown keys, validation) and prompt loading through the evaluation loader."""

from __future__ import annotations

from pathlib import Path

import pytest

from rpsft.config import ConfigError
from rpsft.rl import load_prompts, load_rl_config
from rpsft.rl.rewards import decode_gold

ROOT = Path(__file__).resolve().parents[2]


def test_demo_config_loads_with_paper_dapo_settings():
    cfg = load_rl_config(ROOT / "configs" / "rl-demo.yaml", init="some/ckpt")
    assert cfg.init == "some/ckpt"
    d = cfg.dapo
    assert (d.loss_type, d.epsilon_low, d.epsilon_high, d.beta, d.temperature) == ("dapo", 0.2, 0.28, 0.0, 1.0)
    assert d.mask_truncated_completions and d.dynamic_sampling
    assert cfg.anchor.enabled is False


def test_set_overrides_and_anchor_default_off(tmp_path):
    cfg = load_rl_config(None, ["dapo.num_generations=8", "train.lr=1e-6", "anchor.enabled=true",
                                "anchor.rank=64"], init="x")
    assert cfg.dapo.num_generations == 8 and cfg.train.lr == 1e-6
    assert cfg.anchor.enabled is True and cfg.anchor.rank == 64
    p = tmp_path / "c.yaml"
    p.write_text("anchor:\n  rank: 32\n")
    assert load_rl_config(p, init="x").anchor.enabled is False  # a partial anchor section keeps it off


def test_unknown_key_names_the_closest_one(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'dapo.num_generations'"):
        load_rl_config(None, ["dapo.num_generation=4"], init="x")
    p = tmp_path / "c.yaml"
    p.write_text("dapo:\n  epsilon: 0.2\n")
    with pytest.raises(ConfigError, match="unknown rl config key 'dapo.epsilon'"):
        load_rl_config(p, init="x")


@pytest.mark.parametrize("overrides, message", [
    ([], "pass --init"),
    (["init=x", "dapo.num_generations=1"], "num_generations"),
    (["init=x", "dapo.micro_batch_size=3"], "must divide prompts_per_step"),
    (["init=x", "dapo.overlong_buffer=2000"], "overlong_buffer"),
    (["init=x", "data.system_prompt=fancy"], "system_prompt"),
    (["init=x", "train.lr=abc"], "train.lr: expected a number"),
])
def test_validation_messages(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_rl_config(None, overrides)


def test_synth_prompts_are_the_eval_prompts(synth_file):
    from rpsft.eval.loaders import load_items
    from rpsft.eval.suites import Benchmark

    cfg = load_rl_config(None, [f"data.train={synth_file}", "data.limit=3"], init="x")
    rows = load_prompts(cfg)
    assert len(rows) == 3 and {decode_gold(r["gold"]) for r in rows} == {"7"}
    items = load_items(Benchmark("synth", "file", str(synth_file), "auto", 1, "extra"), limit=3)
    assert [r["prompt"] for r in rows] == [it["prompt"] for it in items]
    assert rows[0]["prompt"][0]["role"] == "user"  # our own data: no system prompt added


def test_gsm8k_prompts_get_the_boxed_system_prompt(gsm8k_file):
    from rpsft.eval.loaders import BOXED_SYSTEM_PROMPT

    rows = load_prompts(load_rl_config(None, [f"data.train={gsm8k_file}"], init="x"))
    assert [decode_gold(r["gold"]) for r in rows] == ["12", "1500"]
    assert rows[0]["prompt"][0] == {"role": "system", "content": BOXED_SYSTEM_PROMPT}
    rows = load_prompts(load_rl_config(None, [f"data.train={gsm8k_file}", "data.system_prompt=none"], init="x"))
    assert [m["role"] for m in rows[0]["prompt"]] == ["user"]


def test_missing_data_file_says_how_to_make_it(tmp_path):
    cfg = load_rl_config(None, [f"data.train={tmp_path / 'nope.jsonl'}"], init="x")
    with pytest.raises(FileNotFoundError, match="rpsft data synth-math"):
        load_prompts(cfg)


def test_vllm_requested_without_vllm_or_gpu_is_a_clear_error():
    import importlib.util

    import torch

    from rpsft.rl.trainer import use_vllm_default

    if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        pytest.skip("vLLM and a GPU are present")
    assert use_vllm_default(None) is False and use_vllm_default(False) is False
    with pytest.raises(ValueError, match="dapo.use_vllm=false"):
        use_vllm_default(True)
