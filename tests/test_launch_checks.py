"""Launch settings the anchor or the finite guard cannot work with are refused at startup, from the environment
``accelerate launch`` gives the processes, before the model loads or a basis is computed: DeepSpeed ZeRO-3, FSDP
v1, DeepSpeed in 16 bits, ``nan_policy=skip`` under DeepSpeed. And the finite guard under DeepSpeed, where the
optimizer step has already been taken when it looks."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from typer.testing import CliRunner

from rpsft.config import ConfigError, load_config
from rpsft.launch import check_launch, deepspeed_launch

from test_launch import launch_env

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "configs" / "accelerate"


def _variant(tmp_path: Path, name: str, **changes) -> Path:
    """A shipped accelerate config with some keys changed (``deepspeed_config`` / ``fsdp_config`` keys by
    ``section__key``)."""
    cfg = yaml.safe_load((SHIPPED / f"{name}.yaml").read_text())
    for key, value in changes.items():
        if "__" in key:
            section, sub = key.split("__")
            cfg[section][sub] = value
        else:
            cfg[key] = value
    path = tmp_path / f"{name}-variant.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launched(monkeypatch, config_file: Path) -> dict:
    env = launch_env(config_file)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def _cfg(tiny_model_dir, synth_data, tmp_path, *extra):
    return load_config(None, [f"model.name={tiny_model_dir}", f"data.train={synth_data['train']}",
                              f"output_dir={tmp_path / 'run'}", "data.limit=8", "train.max_steps=1",
                              "anchor.rank=4", *extra])


def _run_rl_to_the_launch_check(tmp_path, monkeypatch, **train):
    """``run_rl`` on a config whose init does not exist, with ``train.<key>=value`` set; reading its data fails the
    test, so only a refusal that comes before it (the launch check) can end the call."""
    from rpsft.rl import RLConfig
    from rpsft.rl import run as rl_run

    cfg = RLConfig(init=str(tmp_path / "missing-init"))
    cfg.output_dir = str(tmp_path / "rl")
    for key, value in train.items():
        setattr(cfg.train, key, value)
    monkeypatch.setattr(rl_run, "validate_rl", lambda cfg: None)  # the init path is not what is checked here
    monkeypatch.setattr(rl_run, "load_prompts", lambda cfg: pytest.fail("data read before the launch check"))
    rl_run.run_rl(cfg, progress=False)


def _no_loading(monkeypatch):
    """Fail the test if the model is loaded or a basis computed: every refusal must come before both."""
    import rpsft.anchor as anchor_mod
    import rpsft.train as train_mod

    monkeypatch.setattr(train_mod, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    monkeypatch.setattr(anchor_mod.RotationAnchor, "from_model",
                        classmethod(lambda *a, **k: pytest.fail("bases computed before the check")))


# ------------------------------------------------------------------------------------------- ZeRO-3, FSDP v1


def test_zero3_is_refused_before_the_model_loads(tiny_model_dir, synth_data, tmp_path, monkeypatch):
    import rpsft.train as train_mod

    env = _launched(monkeypatch, _variant(tmp_path, "zero2", deepspeed_config__zero_stage=3))
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    _no_loading(monkeypatch)
    with pytest.raises(ConfigError, match=r"^DeepSpeed ZeRO-3 in the accelerate config: .*use FSDP2 "
                                          r"\(configs/accelerate/fsdp2.yaml\) or ZeRO-2"):
        train_mod.train(_cfg(tiny_model_dir, synth_data, tmp_path), progress=False)
    assert not (tmp_path / "run").exists()  # nothing written either
    check_launch(anchor=False)  # plain SFT under ZeRO-3 has no anchor to break


def test_fsdp_v1_is_refused_fsdp2_passes(tiny_model_dir, synth_data, tmp_path, monkeypatch):
    import rpsft.train as train_mod

    env = _launched(monkeypatch, _variant(tmp_path, "fsdp2", fsdp_config__fsdp_version=1))
    assert env["FSDP_VERSION"] == "1"
    _no_loading(monkeypatch)
    with pytest.raises(ConfigError, match=r"^fsdp_version 1 in the accelerate config: .*set fsdp_version: 2"):
        train_mod.train(_cfg(tiny_model_dir, synth_data, tmp_path), progress=False)
    monkeypatch.delenv("FSDP_VERSION")  # accelerate's own default is v1
    with pytest.raises(ConfigError, match="fsdp_version 1"):
        check_launch(anchor=True)
    check_launch(anchor=False)
    _launched(monkeypatch, SHIPPED / "fsdp2.yaml")
    check_launch(anchor=True)  # the shipped FSDP2 config passes


def test_fsdp_on_cpu_processes_is_refused_before_the_model_loads(tiny_model_dir, synth_data, tmp_path,
                                                                 monkeypatch):
    """accelerate applies FSDP only to processes on an accelerator; on CPU ones it trains DDP without a word."""
    import rpsft.launch as launch_mod
    import rpsft.train as train_mod
    from rpsft.cli import app

    _launched(monkeypatch, SHIPPED / "fsdp2.yaml")
    monkeypatch.setattr(train_mod, "on_gpu", lambda: False)
    _no_loading(monkeypatch)
    with pytest.raises(ConfigError, match=r"^FSDP in the accelerate config, but these processes run on the CPU .*"
                                          r"use DDP on a CPU \(rpsft launch ddp-cpu2"):
        train_mod.train(_cfg(tiny_model_dir, synth_data, tmp_path), progress=False)
    assert not (tmp_path / "run").exists()
    res = CliRunner().invoke(app, ["train", "--set", f"model.name={tiny_model_dir}", "--set",
                                   f"data.train={synth_data['train']}", "--set", f"output_dir={tmp_path / 'c'}"])
    assert res.exit_code == 2 and "error: FSDP in the accelerate config, but these processes run on the CPU" in \
        res.output and not (tmp_path / "c").exists()
    check_launch(anchor=True, cpu=False)  # GPU processes: FSDP2 applies
    check_launch(anchor=False, cpu=False)
    with pytest.raises(ConfigError, match="FSDP in the accelerate config"):
        check_launch(anchor=False, cpu=True)  # with or without an anchor: the whole launch is not what was asked
    assert train_mod.processes_on_cpu() and not train_mod.processes_on_cpu({"use_cpu": False})
    monkeypatch.setattr(train_mod, "on_gpu", lambda: True)
    assert not train_mod.processes_on_cpu() and train_mod.processes_on_cpu({"use_cpu": True})
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # `use_cpu: true` in the accelerate config
    assert train_mod.processes_on_cpu()
    monkeypatch.setattr(launch_mod, "FSDP_ON_CPU", True)  # the launch matrix's stand-in: FSDP on CPU processes
    check_launch(anchor=True, cpu=True)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setattr(launch_mod, "FSDP_ON_CPU", False)
    check_launch(anchor=True, cpu=True)  # DDP on CPU processes: nothing to refuse


def test_rl_refuses_fsdp_on_cpu_processes_before_reading_data(tmp_path, monkeypatch):
    import rpsft.train as train_mod

    _launched(monkeypatch, SHIPPED / "fsdp2.yaml")
    monkeypatch.setattr(train_mod, "on_gpu", lambda: False)
    with pytest.raises(ConfigError, match="^FSDP in the accelerate config, but these processes run on the CPU"):
        _run_rl_to_the_launch_check(tmp_path, monkeypatch)


def test_zero3_and_bf16_from_a_deepspeed_config_file(tmp_path, monkeypatch):
    """A DeepSpeed JSON file has the last word on the values it sets, as in accelerate's DeepSpeed plugin."""
    ds = tmp_path / "ds.json"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    def settings(trainer_precision=None):
        got = deepspeed_launch(trainer_precision)
        return got["stage"], got["precision"]

    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_batch_size": "auto"}))
    assert settings() == (3, "no")
    with pytest.raises(ConfigError, match="ZeRO-3"):
        check_launch(anchor=True)
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    assert settings() == (2, "bf16")
    with pytest.raises(ConfigError, match=f"^DeepSpeed in bf16 \\(bf16.enabled in {ds}\\)"):
        check_launch(anchor=True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # "auto" in the file: the launcher's setting counts
    ds.write_text(json.dumps({"zero_optimization": {"stage": "auto"}, "bf16": {"enabled": "auto"}}))
    assert settings() == (2, "bf16")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert settings("bf16") == (2, "bf16")  # ... and the Trainer's bf16 over the launcher's
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": False}}))
    assert settings("bf16") == (2, "no")  # an explicit value in the file wins
    check_launch(anchor=True)
    ds.write_text("{not json")
    with pytest.raises(ConfigError, match=f"^deepspeed_config_file {ds} cannot be read"):
        check_launch(anchor=True)


# ------------------------------------------------------------------------------------------ DeepSpeed in 16 bits


def test_shipped_zero2_is_fp32_and_bf16_is_refused_with_the_anchor(tmp_path, monkeypatch):
    env = _launched(monkeypatch, SHIPPED / "zero2.yaml")
    assert env["ACCELERATE_MIXED_PRECISION"] == "no" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"
    check_launch(anchor=True)  # the shipped ZeRO-2 file passes
    for precision in ("bf16", "fp16"):
        _launched(monkeypatch, _variant(tmp_path, "zero2", mixed_precision=precision))
        with pytest.raises(ConfigError, match=rf"^DeepSpeed in {precision} \(mixed_precision {precision} in the "
                                              r"accelerate config\): .*run ZeRO-2 in fp32 \(train.bf16=false with "
                                              r"mixed_precision: 'no'.*or use FSDP2"):
            check_launch(anchor=True)
        check_launch(anchor=False)  # no anchor: bf16 DeepSpeed is fine


def test_the_trainers_bf16_under_the_fp32_zero2_config_is_refused(tiny_model_dir, synth_data, tmp_path,
                                                                   monkeypatch):
    """TrainingArguments hands DeepSpeed its own bf16 in place of the launcher's mixed_precision, and train.bf16 is on
    by default on a GPU (the paper recipes set it): the shipped fp32 file alone does not make the run fp32."""
    import rpsft.train as train_mod
    from rpsft.train import trainer_precision

    _launched(monkeypatch, SHIPPED / "zero2.yaml")
    _no_loading(monkeypatch)
    with pytest.raises(ConfigError, match=r"^DeepSpeed in bf16 \(the Trainer's bf16: train.bf16, on by default on a "
                                          r"GPU\)"):
        train_mod.train(_cfg(tiny_model_dir, synth_data, tmp_path, "train.bf16=true"), progress=False)
    cfg = _cfg(tiny_model_dir, synth_data, tmp_path, "train.bf16=false")
    assert trainer_precision(cfg.train, cfg.trainer) is None
    assert trainer_precision(cfg.train, {"fp16": True}) == "fp16"
    assert trainer_precision(cfg.train, {"bf16": True}) == "bf16"
    monkeypatch.setattr(train_mod, "on_gpu", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cfg.train.bf16 = None  # unset: on on a GPU that supports it
    assert trainer_precision(cfg.train, cfg.trainer) == "bf16"
    with pytest.raises(ConfigError, match="DeepSpeed in bf16"):
        check_launch(anchor=True, trainer_precision=trainer_precision(cfg.train, cfg.trainer))


def test_rounding_alone_is_the_drift_the_refusal_names():
    """The reason for the refusal, measured: bf16-rounded W against the frames of the same W in full precision reads
    a relative drift ‖U_kᵀ W_bf16 V_k − diag σ_k‖ / ‖σ_k‖ of 4.8e-4 with no training at all (random 512² matrix,
    k = 110; 4.7e-4 at 1792², k = 384, the same ratio k/n), above a budget of ε = 1e-4."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(512, 512, generator=g) / 512 ** 0.5
    U, S, Vh = torch.linalg.svd(W.double())
    U, S, V = U[:, :110], S[:110], Vh[:110].T
    A = U.T @ W.bfloat16().double() @ V - torch.diag(S)
    drift = float(A.norm() / S.norm())
    assert 2e-4 < drift < 1e-3, drift
    assert float((U.T @ W.double() @ V - torch.diag(S)).norm() / S.norm()) < 1e-12  # fp32 W: no drift


# ------------------------------------------------------------------------------- the finite guard under DeepSpeed


def test_nan_policy_skip_is_refused_under_deepspeed(tiny_model_dir, synth_data, tmp_path, monkeypatch):
    import rpsft.train as train_mod
    from rpsft.cli import app

    _launched(monkeypatch, SHIPPED / "zero2.yaml")
    _no_loading(monkeypatch)
    with pytest.raises(ConfigError, match=r"^train.nan_policy=skip under DeepSpeed: .*set train.nan_policy=stop"):
        train_mod.train(_cfg(tiny_model_dir, synth_data, tmp_path, "train.nan_policy=skip"), progress=False)
    with pytest.raises(ConfigError, match="nan_policy=skip"):  # with or without an anchor: the guard is the same
        check_launch(anchor=False, nan_policy="skip")
    check_launch(anchor=True, nan_policy="stop")
    res = CliRunner().invoke(app, ["train", "--set", f"model.name={tiny_model_dir}", "--set",
                                   f"data.train={synth_data['train']}", "--set", f"output_dir={tmp_path / 'c'}",
                                   "--set", "train.nan_policy=skip"])
    assert res.exit_code == 2 and "error: train.nan_policy=skip under DeepSpeed" in res.output
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    check_launch(anchor=True, nan_policy="skip")  # DDP / FSDP2: the guard drops gradients before the step


def test_rl_refuses_skip_under_deepspeed_before_loading(tmp_path, monkeypatch):
    _launched(monkeypatch, SHIPPED / "zero2.yaml")
    with pytest.raises(ConfigError, match="nan_policy=skip under DeepSpeed"):
        _run_rl_to_the_launch_check(tmp_path, monkeypatch, nan_policy="skip")


class _Engine:
    """DeepSpeed's engine as the guard sees it: the norm of the step it has already taken."""

    def __init__(self, norm):
        self.norm = norm

    def get_global_grad_norm(self):
        return self.norm


class _Trainer(SimpleNamespace):
    """A stand-in trainer (weak-referenceable, as the guard holds its trainer weakly)."""


def _guarded(tmp_path, engine):
    """A FiniteGuard on a stand-in trainer that trains under DeepSpeed (gradients in the engine's buffers: no
    ``.grad`` on the module)."""
    from rpsft.guards import FiniteGuard

    model = torch.nn.Linear(3, 2)
    trainer = _Trainer(training_step=lambda m, inputs, n=None: torch.tensor(1.25), log=lambda logs: None,
                              is_deepspeed_enabled=engine is not None, model_wrapped=engine, model=model,
                              args=SimpleNamespace(learning_rate=1e-5), method_config=None, anchor_weight=1.0)
    guard = FiniteGuard(trainer, "stop", run_dir=tmp_path)
    trainer.training_step(model, {})  # one micro-batch: the window loss is 1.25
    return guard, model, trainer


@pytest.mark.parametrize("norm", [float("inf"), -1.0, float("nan")])  # 0.19's overflow; older releases' sentinel
def test_guard_reads_the_gradient_norm_deepspeed_computed(tmp_path, norm):
    guard, model, _trainer = _guarded(tmp_path, _Engine(norm))
    state = SimpleNamespace(global_step=4)
    with pytest.raises(ValueError, match=r"^training stopped at step 5: gradient norm not finite .*DeepSpeed had "
                                         r"already run this step's optimizer update inside backward .*no checkpoint "
                                         r"holds this step; no checkpoint was written$"):
        guard.on_pre_optimizer_step(None, state, None, model=model)


def test_guard_under_deepspeed_passes_a_finite_step(tmp_path):
    guard, model, _trainer = _guarded(tmp_path, _Engine(0.75))
    guard.on_pre_optimizer_step(None, SimpleNamespace(global_step=0), None, model=model)
    assert guard.last_finite_loss == 1.25
    loss, penalty, gnorm = guard._checked(model, 0.5)  # the window was reset by the step: loss 0
    assert (loss, penalty) == (0.0, 0.5) and math.isclose(gnorm, 0.75)
    # no engine norm (DeepSpeed computes none): only the loss and R are checked, as before
    guard, model, _trainer = _guarded(tmp_path, _Engine(None))
    guard.on_pre_optimizer_step(None, SimpleNamespace(global_step=0), None, model=model)
