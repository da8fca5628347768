"""Launch settings are settled at startup, before the model is loaded and the bases are computed; the shipped
accelerate configs resolve a wrap policy for Llama and Qwen2 through accelerate's own code."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from rpsft import launch
from rpsft.cli import app
from rpsft.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


def _cfg(tiny_model_dir, synth_data, tmp_path, *extra):
    return load_config(None, [f"model.name={tiny_model_dir}", f"data.train={synth_data['train']}",
                              f"output_dir={tmp_path / 'run'}", "data.limit=8", "train.max_steps=1",
                              "anchor.rank=4", *extra])


def launch_env(config_file: Path) -> dict[str, str]:
    """The environment ``accelerate launch --config_file FILE`` gives each process (accelerate's own code)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "-m", "rpsft.cli"])
    args, _, _ = _validate_launch_command(args)
    if args.use_deepspeed:  # launch_command fills this in before it prepares the DeepSpeed environment
        args.deepspeed_fields_from_accelerate_config = getattr(args, "deepspeed_fields_from_accelerate_config", [])
    env = prepare_deepspeed_cmd_env(args)[1] if args.use_deepspeed else prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_")) and v is not None}


# ---------------------------------------------------------------------------------- gradient checkpointing


def test_fsdp_activation_checkpointing_turns_the_training_argument_off(tiny_model_dir, synth_data, tmp_path,
                                                                       monkeypatch, caplog):
    from accelerate.utils import FullyShardedDataParallelPlugin

    from rpsft.train import build_sft_config

    cfg = _cfg(tiny_model_dir, synth_data, tmp_path, "train.gradient_checkpointing=true")
    assert build_sft_config(cfg, tmp_path / "a").activation_checkpointing  # plain launch: kept
    # unset on a CPU: off (TRL's own default of True must not leak through)
    assert not build_sft_config(_cfg(tiny_model_dir, synth_data, tmp_path), tmp_path / "d").activation_checkpointing
    for k, v in launch_env(ROOT / "configs" / "accelerate" / "fsdp2.yaml").items():
        monkeypatch.setenv(k, v)
    with caplog.at_level(logging.WARNING, logger="rpsft"):
        args = build_sft_config(cfg, tmp_path / "b")
    assert not args.activation_checkpointing and not args.gradient_checkpointing
    assert "fsdp_activation_checkpointing" in caplog.text
    # transformers refuses `plugin.activation_checkpointing and args.activation_checkpointing` in Trainer.__init__
    assert FullyShardedDataParallelPlugin().activation_checkpointing


def test_rl_config_resolves_the_conflict_too(monkeypatch, tmp_path):
    from rpsft.rl import RLConfig
    from rpsft.rl.trainer import build_grpo_config

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    cfg = RLConfig(init="x")
    cfg.train.gradient_checkpointing = True
    cfg.dapo.prompts_per_step, cfg.dapo.num_generations, cfg.dapo.micro_batch_size = 2, 2, 2
    args = build_grpo_config(cfg, tmp_path, [1.0], use_vllm=False)
    assert not args.activation_checkpointing


def test_cpu_ram_efficient_loading_is_refused_before_loading(tiny_model_dir, synth_data, tmp_path, monkeypatch):
    import rpsft.train as train_mod

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    monkeypatch.setattr(train_mod, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    with pytest.raises(ConfigError, match="fsdp_cpu_ram_efficient_loading: false"):
        train_mod.train(_cfg(tiny_model_dir, synth_data, tmp_path), progress=False)

    from rpsft.cli import app

    res = CliRunner().invoke(app, ["train", "--set", f"model.name={tiny_model_dir}", "--set",
                                   f"data.train={synth_data['train']}", "--set", f"output_dir={tmp_path / 'c'}"])
    assert res.exit_code == 2 and "fsdp_cpu_ram_efficient_loading" in res.output


def test_shipped_fsdp2_config_keeps_fp32_loading_on_every_rank():
    env = launch_env(ROOT / "configs" / "accelerate" / "fsdp2.yaml")
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"


# ------------------------------------------------------------------------------------------------ wrap policy


def _tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _tiny_llama():
    from rpsft_testing import make_tiny_llama

    return make_tiny_llama(64)


@pytest.mark.parametrize("config_file", ACCELERATE_CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("make_model", [_tiny_llama, _tiny_qwen2], ids=["llama", "qwen2"])
def test_shipped_accelerate_configs_resolve_a_wrap_policy(config_file, make_model, monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    env = launch_env(config_file)
    if env.get("ACCELERATE_USE_FSDP") != "true":
        pytest.skip(f"{config_file.name} does not use FSDP")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    model = make_model()
    plugin = FullyShardedDataParallelPlugin()
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)  # what accelerate's prepare runs (no GPU needed)
    assert policy is not None
    wrapped = [type(m).__name__ for m in model.modules() if policy(m)]
    assert wrapped == [type(model.model.layers[0]).__name__] * 2  # one FSDP unit per decoder layer


def test_shipped_configs_are_the_repository_ones():
    found = launch.accelerate_configs()
    assert {"fsdp2", "zero2", "ddp-cpu2"} <= set(found)
    cfg = yaml.safe_load(found["fsdp2"].read_text())
    assert cfg["distributed_type"] == "FSDP"
    assert launch.accelerate_config("zero2.yaml") == found["zero2"].resolve()


def test_unknown_name_and_own_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="did you mean 'fsdp2'"):
        launch.accelerate_config("fsdp")
    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: NO\n")
    assert launch.accelerate_config(str(own)) == own.resolve()


def test_cli_prints_path_and_launch_argv(monkeypatch):
    r = CliRunner().invoke(app, ["accelerate-config", "fsdp2"])
    assert r.exit_code == 0 and r.output.strip().endswith("fsdp2.yaml")
    seen = {}
    monkeypatch.setattr(launch.os, "execv", lambda path, argv: seen.update(path=path, argv=argv))
    r = CliRunner().invoke(app, ["launch", "ddp-cpu2", "train", "--config", "c.yaml", "--set", "lr=1e-5"])
    assert r.exit_code == 0, r.output
    assert seen["argv"][:4] == [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    assert seen["argv"][4].endswith("ddp-cpu2.yaml")
    assert seen["argv"][5:] == ["-m", "rpsft.cli", "train", "--config", "c.yaml", "--set", "lr=1e-5"]
    bad = CliRunner().invoke(app, ["launch", "nope", "train"])
    assert bad.exit_code == 2 and "shipped configs are" in bad.output
