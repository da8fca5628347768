"""rpsft.plan: the memory plan's arithmetic against counted parameters, saved tensors and real anchors; sharding;
the refusal and its suggestion; the 16-bit rounding check; the launcher and shape sources; the paper recipes; `rpsft
plan` and `rpsft train`'s early refusal; and the plan against a measured peak on this CPU."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rpsft.config import load_config
from rpsft.plan import (GiB, HEADROOM, Launcher, activation_bytes, check_plan, launcher_from_env, launcher_from_file,
                        make_plan, model_shape, parse_bytes, plan_memory, refusal, rounding_fraction)

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted((ROOT / "configs" / "paper").glob("*.yaml"))
CPU = Launcher(cpu=True)


def cfg_for(model, *sets):
    return load_config(None, [f"model.name={model}", "train.batch_size=2", "train.grad_accum=1", "data.max_length=64",
                              *sets])


def real_params(model_dir) -> list[torch.nn.Parameter]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return list({id(p): p for p in model.parameters()}.values())  # a tied weight once


# ---------------------------------------------------------------------------------------------- the arithmetic


def test_weights_grads_and_adam_states_count_the_parameters(tiny_model_dir):
    n = sum(p.numel() for p in real_params(tiny_model_dir))
    plan = plan_memory(cfg_for(tiny_model_dir, "method=sft"), CPU)
    assert plan.bytes_of("weights") == 4 * n
    assert plan.bytes_of("gradients") == 4 * n
    assert plan.bytes_of("optimizer state") == 2 * 4 * n  # exp_avg and exp_avg_sq, like the weights: fp32
    # bf16 weights: gradients and torch's AdamW states take the weights' dtype (lr 1e-3: the rounding check passes)
    bf16 = plan_memory(cfg_for(tiny_model_dir, "method=sft", "model.dtype=bfloat16", "train.lr=1e-3"), CPU)
    assert (bf16.bytes_of("weights"), bf16.bytes_of("gradients"), bf16.bytes_of("optimizer state")) == \
        (2 * n, 2 * n, 4 * n)
    # the phases: one micro-batch per step drops the gradients before the next forward; accumulation keeps them
    assert plan.step_peak == sum(r.bytes for r in plan.rows if r.phase in ("always", "step"))
    assert plan.forward_peak == sum(r.bytes for r in plan.rows if r.phase in ("always", "fwd/bwd"))
    acc = plan_memory(cfg_for(tiny_model_dir, "method=sft", "train.grad_accum=4"), CPU)
    assert acc.forward_peak == plan.forward_peak + 4 * n
    assert plan.peak == max(plan.forward_peak, plan.step_peak)


@pytest.mark.parametrize("world", [2, 3, 8])
def test_fsdp2_divides_weights_grads_and_states_by_the_world(tiny_model_dir, world):
    params = real_params(tiny_model_dir)
    shard = sum(torch.chunk(p.detach(), world)[0].numel() for p in params)  # FSDP2's Shard(0): torch.chunk rows
    fsdp = Launcher(kind="fsdp2", world=world, mixed_precision="bf16", cpu=True)
    plan = plan_memory(cfg_for(tiny_model_dir, "method=sft", "model.dtype=bfloat16"), fsdp)
    # accelerate upcasts FSDP2's trainable shards to fp32 under mixed precision, whatever model.dtype says
    assert plan.bytes_of("weights") == plan.bytes_of("gradients") == 4 * shard
    assert plan.bytes_of("optimizer state") == 8 * shard
    assert plan.rounding is None  # fp32 shards: no 16-bit rounding to refuse
    single = plan_memory(cfg_for(tiny_model_dir, "method=sft"), CPU)
    assert plan.bytes_of("weights") < single.bytes_of("weights") / world * 1.5


def test_zero2_and_ddp_keep_what_they_keep(tiny_model_dir):
    n = sum(p.numel() for p in real_params(tiny_model_dir))
    cfg = cfg_for(tiny_model_dir, "method=sft")
    zero = plan_memory(cfg, Launcher(kind="zero2", world=4, mixed_precision="bf16", cpu=True))
    assert zero.bytes_of("weights") == 2 * n  # the module in bf16, whole on every rank
    assert zero.bytes_of("fp32 master weights") == 4 * n // 4
    assert zero.bytes_of("optimizer state") == 8 * n // 4
    assert zero.bytes_of("gradients") == 2 * n // 4
    ddp = plan_memory(cfg, Launcher(kind="ddp", world=2, cpu=True))
    assert ddp.bytes_of("DDP gradient buckets") == ddp.bytes_of("gradients") == 4 * n


@pytest.mark.parametrize("method,sets", [("rpsft", ["anchor.rank=8"]), ("rpsft", ["anchor.rank=8",
                                                                                  "anchor.frame_dtype=bf16"]),
                                         ("l2init", []), ("complement", ["anchor.rank=8"])])
def test_anchor_bytes_are_those_of_the_built_anchor(tiny_model_dir, method, sets):
    from transformers import AutoModelForCausalLM

    from rpsft.train import build_anchor

    cfg = cfg_for(tiny_model_dir, f"method={method}", *sets)
    built = build_anchor(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg,
                         full_rank=method == "l2init")
    assert plan_memory(cfg, CPU).bytes_of("anchor") == built.nbytes > 0


def _saved_bytes(dtype, batch, seq, layers, pad, autocast, checkpointing, hidden=64, inter=96):
    """Bytes autograd saves for the decoder (no LM head) of a random tiny Llama with GQA, parameters excluded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=inter,
                                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True)).to(dtype).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    ids = torch.randint(0, 128, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        mask[0, -pad:] = 0
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=ids, attention_mask=mask, use_cache=False)
    return sum(seen.values()), model


@pytest.mark.parametrize("dtype,autocast,pad,checkpointing", [
    (torch.float32, False, 0, False), (torch.float32, False, 3, False), (torch.bfloat16, False, 0, False),
    (torch.bfloat16, False, 3, False), (torch.float32, True, 0, False), (torch.float32, False, 3, True),
    (torch.bfloat16, False, 0, True)])
def test_activation_formula_is_what_autograd_saves_per_layer(dtype, autocast, pad, checkpointing):
    batch, seq = (2, 24) if pad else (1, 24)
    three, model = _saved_bytes(dtype, batch, seq, 3, pad, autocast, checkpointing)
    two, _ = _saved_bytes(dtype, batch, seq, 2, pad, autocast, checkpointing)
    per_layer = three - two
    if autocast:  # autocast's cached 16-bit copies of the layer's weights are saved too: a row of their own
        per_layer -= 2 * sum(p.numel() for n, p in model.named_parameters() if ".layers.0." in n and p.dim() == 2)
    shape = model_shape("tiny", config=model.config, source="given")
    c = 2 if (dtype == torch.bfloat16 or autocast) else 4
    r = 2 if dtype == torch.bfloat16 else 4
    est = activation_bytes(shape, batch, seq, c, r, autocast=autocast, padded=bool(pad))
    if checkpointing:  # only the layer's input stays; one layer's activations come back while it is recomputed
        assert per_layer == r * shape.hidden * batch * seq
    else:
        assert per_layer == est["layer"]


# ------------------------------------------------------------------------------------- refusal and suggestions


@pytest.fixture(scope="module")
def qwen7b():
    return model_shape("Qwen/Qwen2.5-7B-Instruct")  # offline in tests: the shipped shape


def test_qwen7b_fp32_on_one_80gb_gpu_refuses_and_names_fsdp2(qwen7b):
    cfg = load_config(ROOT / "configs/paper/qwen2.5-7b.yaml", [])
    one = Launcher(kind="single", mixed_precision="no")
    plan = plan_memory(cfg, one, 80 * GiB, "--gpu-memory 80GiB", qwen7b)
    # fp32 weights + gradients + two Adam states: 16 bytes per parameter, ≈ 122 GB before activations
    assert plan.bytes_of("weights") + plan.bytes_of("gradients") + plan.bytes_of("optimizer state") == \
        16 * qwen7b.n_params
    assert 121e9 < 16 * qwen7b.n_params < 123e9
    assert plan.fits is False
    msg = refusal(cfg, plan, 8, qwen7b)
    assert "\n" not in msg and "FSDP2 over 8 GPUs" in msg and msg.startswith("the memory plan needs")
    fsdp = plan_memory(cfg, replace(launcher_from_file("fsdp2"), world=8), 80 * GiB, "x", qwen7b)
    assert fsdp.fits and f"{fsdp.peak / GiB:.1f} GiB per rank" in msg
    with pytest.raises(ValueError, match="FSDP2 over 8 GPUs"):
        check_plan(cfg, plan, 8, qwen7b)


def test_the_suggestion_is_the_first_setting_that_fits(tiny_model_dir):
    shape = model_shape(str(tiny_model_dir))
    sets = ["method=sft", "train.batch_size=8", "data.max_length=256"]
    cfg = cfg_for(tiny_model_dir, *sets, "train.gradient_checkpointing=false")
    gpu = Launcher(kind="single")  # one GPU, nothing to shard over
    plain = plan_memory(cfg, gpu, None, "", shape)
    ckpt = plan_memory(cfg_for(tiny_model_dir, *sets, "train.gradient_checkpointing=true"), gpu, None, "", shape)
    assert ckpt.peak < plain.peak
    # a device between the two: gradient checkpointing is the fix, and the message says so
    memory = int((plain.peak + ckpt.peak) / 2 / HEADROOM)
    msg = refusal(cfg, plan_memory(cfg, gpu, memory, "test", shape), 1, shape)
    assert "train.gradient_checkpointing=true" in msg and "FSDP2" not in msg and "batch_size" not in msg
    # smaller still: a smaller per-device batch with more accumulation (the same global batch) after checkpointing
    memory = int(ckpt.peak * 0.8 / HEADROOM)
    msg = refusal(cfg, plan_memory(cfg, gpu, memory, "test", shape), 1, shape)
    m = re.search(r"train\.batch_size=(\d+) train\.grad_accum=(\d+)", msg)
    assert m and int(m.group(1)) * int(m.group(2)) == 8 * cfg.train.grad_accum
    # nothing fits: said, with the smallest plan found
    msg = refusal(cfg, plan_memory(cfg, gpu, 2**20, "test", shape), 1, shape)
    assert "nothing tried fits" in msg


# ------------------------------------------------------------------------------------------ 16-bit rounding


def test_rounding_fraction_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for dtype, lr, std in ((torch.bfloat16, 1e-6, 0.02), (torch.bfloat16, 1e-5, 0.02), (torch.float16, 1e-6, 0.02),
                           (torch.bfloat16, 1e-3, 0.02)):
        w = (torch.randn(200_000, generator=g) * std).to(dtype)
        stepped = (w.float() - lr * torch.sign(w.float())).to(dtype)  # one AdamW step at step 1: lr · sign(g)
        frozen = (stepped == w).float().mean().item()
        name = "bfloat16" if dtype == torch.bfloat16 else "float16"
        assert rounding_fraction(lr, std, name)[0] == pytest.approx(frozen, abs=0.01), (dtype, lr)


def test_bf16_weights_refuse_at_lr_1e6_and_pass_at_1e3(tiny_model_dir):
    shape = model_shape(str(tiny_model_dir))
    bad = cfg_for(tiny_model_dir, "method=sft", "model.dtype=bfloat16", "train.lr=1e-6")
    plan = plan_memory(bad, CPU, None, "", shape)
    assert plan.rounding["fraction"] > 0.97  # init std 0.02: every |w| ≥ 2^-11 is frozen at lr 1e-6
    with pytest.raises(ValueError, match=r"^model\.dtype=bfloat16 .* 98\.\d % .*set model\.dtype=float32"):
        check_plan(bad, plan, 1, shape)
    good = cfg_for(tiny_model_dir, "method=sft", "model.dtype=bfloat16", "train.lr=1e-3")
    assert check_plan(good, plan_memory(good, CPU, None, "", shape), 1, shape) == []
    # fp32 masters kept elsewhere: ZeRO's optimizer, FSDP2's upcast shards; fp32 adapters over a frozen base
    for launcher in (Launcher(kind="zero2", world=2, mixed_precision="bf16"),
                     Launcher(kind="fsdp2", world=2, mixed_precision="bf16")):
        assert plan_memory(bad, launcher, None, "", shape).rounding is None
    lora = cfg_for(tiny_model_dir, "method=lora", "model.dtype=bfloat16", "train.lr=1e-6", "lora.r=4")
    assert plan_memory(lora, CPU, None, "", shape).rounding is None


# ------------------------------------------------------------------------------------- launchers and shapes


def test_launchers_from_accelerate_config_files_and_from_accelerate_launch_env(tmp_path):
    f = launcher_from_file("fsdp2")  # the shipped file the paper recipes name
    assert (f.kind, f.world, f.mixed_precision, f.activation_checkpointing, f.cpu) == ("fsdp2", 8, "bf16", True,
                                                                                      False)
    (tmp_path / "z.yaml").write_text("distributed_type: DEEPSPEED\nmixed_precision: bf16\nnum_processes: 4\n"
                                     "deepspeed_config:\n  zero_stage: 2\n  offload_optimizer_device: cpu\n")
    z = launcher_from_file(tmp_path / "z.yaml")
    assert (z.kind, z.world, z.mixed_precision, z.offload_optimizer) == ("zero2", 4, "bf16", True)
    (tmp_path / "d.yaml").write_text("distributed_type: MULTI_CPU\nnum_processes: 2\nuse_cpu: true\n")
    d = launcher_from_file(tmp_path / "d.yaml")
    assert (d.kind, d.world, d.cpu, d.mixed_precision) == ("ddp", 2, True, "no")
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "4", "ACCELERATE_MIXED_PRECISION": "bf16",
           "FSDP_ACTIVATION_CHECKPOINTING": "true", "ACCELERATE_USE_CPU": "True"}
    e = launcher_from_env(env)
    assert (e.kind, e.world, e.mixed_precision, e.activation_checkpointing, e.cpu) == ("fsdp2", 4, "bf16", True, True)
    assert launcher_from_env({"WORLD_SIZE": "1"}).kind == "single"
    with pytest.raises(ValueError, match="zero2"):
        plan_memory(load_config(None, []), Launcher(kind="zero3", world=2))


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * 2**30 == parse_bytes("80G")
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("512 MiB") == 512 * 2**20
    with pytest.raises(ValueError, match=r"--gpu-memory '80 gigs': give a size such as 80GiB"):
        parse_bytes("80 gigs")


def test_hub_config_is_used_when_reachable_and_the_shipped_shape_when_not(monkeypatch):
    from transformers import AutoConfig, LlamaConfig

    import rpsft.plan as plan_mod

    hub = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    calls = []

    def from_pretrained(name, **kw):
        calls.append((name, kw.get("local_files_only")))
        if kw.get("local_files_only"):
            raise OSError("offline and not cached")
        return hub

    monkeypatch.setattr(AutoConfig, "from_pretrained", staticmethod(from_pretrained))
    monkeypatch.setattr(plan_mod, "hub_reachable", lambda timeout=3.0: True)
    shape = model_shape("Qwen/Qwen2.5-7B-Instruct")
    assert (shape.source, shape.hidden, shape.layers, shape.vocab) == ("hub", 64, 3, 1000)
    assert calls == [("Qwen/Qwen2.5-7B-Instruct", False)]
    monkeypatch.setattr(plan_mod, "hub_reachable", lambda timeout=3.0: False)
    shape = model_shape("Qwen/Qwen2.5-7B-Instruct")
    assert (shape.source, shape.hidden, shape.layers, shape.vocab) == ("shipped", 3584, 28, 152064)
    with pytest.raises(FileNotFoundError, match=r"cannot read the config of someone/unknown-model .*shipped "
                                                r"shapes: .*Qwen/Qwen2\.5-7B-Instruct"):
        model_shape("someone/unknown-model")


def test_shipped_shapes_have_the_published_parameter_counts():
    counts = {"Qwen/Qwen2.5-7B-Instruct": 7_615_616_512, "Qwen/Qwen2.5-3B-Instruct": 3_085_938_688,
              "meta-llama/Llama-3.1-8B-Instruct": 8_030_261_248, "smollm2-135m-instruct": 134_515_008}
    for name, n in counts.items():
        s = model_shape(name)
        assert s.n_params == n, name
        assert s.source in ("shipped", "local")


# ------------------------------------------------------------------------------------------------ the recipes


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_every_paper_recipe_fits_on_8x80gb_with_fsdp2(path):
    cfg = load_config(path, [])
    plan, shape, gpus = make_plan(cfg, "fsdp2", 8, "80GiB")
    assert plan.launcher.kind == "fsdp2" and plan.launcher.world == 8 and plan.source == "shipped"
    assert plan.bytes_of("weights") == pytest.approx(4 * shape.n_params / 8, rel=1e-3)  # fp32 shards
    assert plan.fits and plan.peak < 0.6 * plan.usable, (path.stem, plan.peak / GiB)
    assert plan.rounding is None
    check_plan(cfg, plan, gpus, shape)  # no refusal


def test_rpsft_plan_command(tmp_path):
    from typer.testing import CliRunner

    from rpsft.cli import app

    runner = CliRunner()
    paper = str(ROOT / "configs/paper/qwen2.5-7b.yaml")
    r = runner.invoke(app, ["plan", "-c", paper, "--launcher", "fsdp2", "--gpu-memory", "80GiB", "--out",
                            str(tmp_path / "plan.json")])
    assert r.exit_code == 0, r.output
    assert "fits in 72.00 GiB" in r.output and "FSDP2 × 8 GPUs" in r.output
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["fits"] is True and saved["launcher"]["kind"] == "fsdp2"
    r = runner.invoke(app, ["plan", "-c", paper, "--gpus", "8", "--gpu-memory", "80GiB"])
    assert r.exit_code == 2
    assert "error: the memory plan needs" in r.output and "FSDP2 over 8 GPUs" in r.output
    r = runner.invoke(app, ["plan", "-c", paper, "--gpu-memory", "lots"])
    assert r.exit_code == 2 and "--gpu-memory 'lots'" in r.output


# -------------------------------------------------------------------------------------------- rpsft train


def test_train_refuses_before_the_model_loads_and_records_the_plan(tiny_model_dir, synth_data, tmp_path,
                                                                   monkeypatch):
    import rpsft.plan as plan_mod
    import rpsft.train as train_mod

    base = [f"model.name={tiny_model_dir}", f"data.train={synth_data['train']}", "method=sft", "train.max_steps=1",
            "train.batch_size=2", "train.grad_accum=1", "data.max_length=256"]
    ok = train_mod.train(load_config(None, base + [f"output_dir={tmp_path / 'ok'}"]), progress=False)
    saved = json.loads((tmp_path / "ok" / "run.json").read_text())["memory_plan"]
    assert saved["fits"] is True and saved["peak"] == ok["memory_plan"]["peak"] > 0

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(train_mod, "load_model", no_load)
    with pytest.raises(ValueError, match=r"^model\.dtype=bfloat16 keeps the trained weights in bf16"):
        train_mod.train(load_config(None, base + [f"output_dir={tmp_path / 'bf16'}", "model.dtype=bfloat16"]),
                        progress=False)
    monkeypatch.setattr(plan_mod, "device_memory", lambda launcher, gpu_memory=None: (2**20, "a 1 MiB device"))
    with pytest.raises(ValueError, match=r"^the memory plan needs .* but a 1 MiB device leaves"):
        train_mod.train(load_config(None, base + [f"output_dir={tmp_path / 'small'}"]), progress=False)
    assert not (tmp_path / "small").exists()  # refused before the run directory was made


# ------------------------------------------------------------------------------------------ plan vs measured


def test_plan_is_within_15_percent_of_the_measured_peak(tiny_tokenizer, tmp_path):
    """benchmarks/memory.py --peak's measurement on a random model big enough that the process's own noise is small
    (the SmolLM2 numbers are in docs/memory.md)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = importlib.util.spec_from_file_location("memory_bench", ROOT / "benchmarks" / "memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                 eos_token_id=tiny_tokenizer.eos_token_id, bos_token_id=tiny_tokenizer.bos_token_id,
                                 pad_token_id=tiny_tokenizer.pad_token_id)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    plan = bench.plan_peak("sft", 1, 256, 2, model_dir)
    measured = bench.measure_peak("sft", 1, 256, 2, model_dir)["measured"]
    assert abs(plan.peak / measured - 1) <= 0.15, (plan.peak, measured)
    assert math.isfinite(measured) and measured > plan.bytes_of("weights") + plan.bytes_of("optimizer state")


def test_every_method_has_a_plan(tiny_model_dir):
    """A method the planner cannot plan would train without one (rpsft train only warns): every registered method
    plans here, adapters train far fewer weights than full fine-tuning, and IW holds its reference model."""
    from transformers import AutoModelForCausalLM

    from rpsft.methods import available

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    n = sum(p.numel() for p in real_params(tiny_model_dir))
    adapted = [p for name, p in model.named_parameters() if p.dim() == 2 and ".layers." in name]  # 7 per layer
    full = plan_memory(cfg_for(tiny_model_dir, "method=sft"), CPU)
    for method in available():
        plan = plan_memory(cfg_for(tiny_model_dir, f"method={method}", "lora.r=4", "anchor.rank=8"), CPU)
        assert plan.peak > plan.bytes_of("weights") >= 4 * n, method
        if method in ("lora", "rpsft_lora"):  # fp32 gradients of A (r × n) and B (m × r) only
            assert plan.bytes_of("gradients") == 4 * sum(4 * (p.shape[0] + p.shape[1]) for p in adapted)
        if method in ("lora", "rpsft_lora", "osf"):
            assert plan.bytes_of("optimizer state") < full.bytes_of("optimizer state"), method
        if method == "iw":
            assert plan.bytes_of("IW reference model") == 4 * n
