"""The adapter methods and IW-SFT under FSDP2, on two CPU processes (gloo) with ``fully_shard`` on a tiny Llama the
way accelerate shards it (one unit per decoder layer, then the root): the merged export completes on every rank
and equals a one-process merge (lora, osf), rpsft_lora's factored anchor on DTensor LoRA factors gives the
one-process value and gradient, and IW-SFT's reference model, built by the real trainer with accelerate's FSDP2
plugin (bf16 mixed precision), is sharded and runs in the compute dtype."""

from __future__ import annotations

import os
import time

import pytest
import torch

from rpsft_testing import free_port, gloo_rank, make_tiny_llama

# A hung collective is the failure these tests exist for: a worker still running after this long is reported as
# hung (and killed) instead of blocking the suite. A passing run takes a fraction of it.
HANG_S = 120.0


def run_ranks_or_fail(worker, out_dir, world: int = 2, timeout: float = HANG_S) -> None:
    """``worker(rank, world, port, out_dir)`` on ``world`` spawned processes; fails the test if they have not all
    finished within ``timeout`` seconds (a rank waiting in a collective its peers never join)."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=(world, free_port(), str(out_dir)), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() >= deadline:
                alive = [i for i, p in enumerate(ctx.processes) if p.is_alive()]
                pytest.fail(f"ranks {alive} still running after {timeout:.0f} s: a collective the other ranks "
                            "never joined")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()


def shard_like_accelerate(model, world: int) -> None:
    """FSDP2 as accelerate's TRANSFORMER_BASED_WRAP applies it: each decoder layer its own unit, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


# ------------------------------------------------------------------ merged export (lora, osf)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapted(kind: str):
    """A tiny Llama wrapped by PEFT ``kind`` with trained-looking adapter values; the same values on every call."""
    from peft import LoraConfig, OSFConfig, get_peft_model

    model = make_tiny_llama(64, hidden=48, inter=80)  # 48 rows of q/o, 24 of k/v: uneven shards too
    config = LoraConfig(r=3, lora_alpha=6, target_modules=TARGETS, task_type="CAUSAL_LM") if kind == "lora" \
        else OSFConfig(effective_rank=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # LoRA's B starts at 0 and OSF's factors at their initial copy: move them
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _trainer(model, rank: int):
    """What export_merged reads from a Trainer (the model, the unwrap, the main-process test, the tokenizer)."""
    from types import SimpleNamespace

    return SimpleNamespace(model=model, accelerator=SimpleNamespace(unwrap_model=lambda m: m),
                           is_world_process_zero=lambda: rank == 0, processing_class=None)


def _export_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    with gloo_rank(rank, world, port):
        from safetensors.torch import load_file

        from rpsft.methods._peft import export_merged

        for kind in ("lora", "osf"):
            model = _adapted(kind)
            shard_like_accelerate(model, world)
            assert any(type(p).__name__ == "DTensor" for p in model.parameters())
            sharded = os.path.join(out_dir, kind, "sharded")
            os.makedirs(sharded, exist_ok=True)
            info = export_merged(_trainer(model, rank), None, sharded)  # every rank calls it, as train() does
            if rank == 0:
                assert info["merged_model"] == os.path.join(sharded, "merged")
                single = os.path.join(out_dir, kind, "single")
                os.makedirs(single)
                export_merged(_trainer(_adapted(kind), 0), None, single)  # the same model, never sharded
                got = load_file(os.path.join(sharded, "merged", "model.safetensors"))
                want = load_file(os.path.join(single, "merged", "model.safetensors"))
                assert got.keys() == want.keys(), (set(got) ^ set(want))
                assert not any("lora_" in k or "base_layer" in k for k in got)
                for k in want:
                    torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)
                # and the merge is W0 + ΔW: LoRA's s·BA by hand on one matrix, OSF's moved away from W0
                ref = _adapted(kind)
                layer = ref.get_base_model().model.layers[1].mlp.down_proj
                w = got["model.layers.1.mlp.down_proj.weight"]
                if kind == "lora":
                    with torch.no_grad():
                        hand = layer.base_layer.weight + 2.0 * layer.lora_B["default"].weight \
                            @ layer.lora_A["default"].weight
                    torch.testing.assert_close(w, hand, rtol=1e-6, atol=1e-6)
                assert not torch.allclose(w, layer.base_layer.weight, atol=1e-3)
                import json

                cfg = json.loads(open(os.path.join(sharded, "merged", "config.json")).read())
                assert cfg["architectures"] == ["LlamaForCausalLM"]  # not FSDP2's dynamic FSDPLlamaForCausalLM
            else:
                assert "merged_model" not in info and not os.path.exists(os.path.join(sharded, "merged"))
            with open(os.path.join(out_dir, f"{kind}-ok{rank}"), "w") as f:
                f.write("ok")


def test_merged_export_under_fsdp2_joins_every_rank_and_equals_a_single_process_merge(tmp_path):
    run_ranks_or_fail(_export_worker, tmp_path)
    assert all((tmp_path / f"{kind}-ok{r}").is_file() for kind in ("lora", "osf") for r in (0, 1))


# ------------------------------------------------------------------ rpsft_lora: the factored anchor on DTensor factors

RANKS = {"q_proj": 1.0, "down_proj": 1.0, "*": 5}  # full rank (‖s·BA‖², square and not) and low-rank frames


def _lora_anchor():
    """(PEFT LoRA model with random factors, its factored anchor); the same values on every call and rank."""
    from peft import LoraConfig, get_peft_model

    from rpsft.anchor import RotationAnchor
    from rpsft.methods.rpsft_lora import LoraRotationAnchor

    model = make_tiny_llama(64, hidden=48, inter=80)
    dense = RotationAnchor.from_model(model, rank=RANKS)  # a collective: each SVD on one rank, then broadcast
    peft = get_peft_model(model, LoraConfig(r=3, lora_alpha=6, target_modules=TARGETS, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:  # r = 3 rows of A over 2 ranks: an uneven split (2 + 1)
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return peft, LoraRotationAnchor.from_dense(dense, peft)


def _rpsft_lora_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    with gloo_rank(rank, world, port):
        from rpsft.distributed import row_shard

        model, anchor = _lora_anchor()
        ref_model, ref = _lora_anchor()  # never sharded: the one-process reference
        assert {t.full for t in anchor.terms.values()} == {True, False}
        shard_like_accelerate(model, world)
        r = anchor.accumulate_grad_(model, weight=0.5)
        r_ref = ref.accumulate_grad_(ref_model, weight=0.5)
        assert r_ref > 0 and abs(r - r_ref) <= 1e-6 * r_ref, (r, r_ref)
        assert anchor.last_sq.keys() == ref.last_sq.keys()
        assert all(abs(anchor.last_sq[n] - v) <= 1e-5 * v for n, v in ref.last_sq.items())
        # each rank's gradient shard is its rows of the one-process gradient; a second pass adds to the shards
        anchor.accumulate_grad_(model, weight=0.25)
        ref.accumulate_grad_(ref_model, weight=0.25)
        refp = dict(ref_model.named_parameters())
        checked = 0
        for name, p in model.named_parameters():
            if "lora_" not in name:
                continue
            local, row0, _ = row_shard(p)
            want = refp[name].grad[row0:row0 + local.shape[0]]
            got = p.grad.to_local()
            assert got.shape == local.shape and want.numel() > 0
            assert float((got - want).norm() / want.norm()) < 1e-5, name  # fp32 summation order
            checked += 1
        assert checked == 2 * len(anchor.terms)
        for t in anchor.terms.values():  # only this rank's rows of U_k are kept
            if not t.full:
                B = dict(model.named_parameters())[f"base_model.model.{t.module}.lora_B.default.weight"]
                assert t.U.shape[0] == B.to_local().shape[0] < t.shape[0]
        drift, ref_drift = anchor.drift(model), ref.drift(ref_model)
        assert drift.keys() == ref_drift.keys()
        for n, d in ref_drift.items():
            assert abs(drift[n]["abs"] - d["abs"]) <= 1e-6 * d["abs"] and drift[n]["rel"] > 0, n
        with pytest.raises(NotImplementedError, match="under FSDP2 use accumulate_grad_"):
            anchor.penalty(model)
        with open(os.path.join(out_dir, f"ok{rank}"), "w") as f:
            f.write(f"{r} {r_ref}")


def test_rpsft_lora_anchor_on_fsdp2_factors_equals_the_single_process_one(tmp_path):
    run_ranks_or_fail(_rpsft_lora_worker, tmp_path)
    assert (tmp_path / "ok0").is_file() and (tmp_path / "ok1").is_file()


# ------------------------------------------------------------------ IW-SFT: the reference model under FSDP2


def _fsdp2_trainers(rank: int, world: int) -> None:
    """Trainers built in this process see FSDP2 with bf16 mixed precision, as under ``accelerate launch`` with
    configs/accelerate/fsdp2.yaml. accelerate turns FSDP on only for GPU processes, so on CPU the Trainer's
    accelerator is switched to the same plugin right after the Trainer creates it (gloo group, CPU mesh)."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from transformers import Trainer

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    create = Trainer.create_accelerator_and_postprocess

    def create_fsdp2(self):
        create(self)
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                                reshard_after_forward=True, state_dict_type="FULL_STATE_DICT")
        plugin.set_mixed_precision("bf16")
        self.accelerator.state.distributed_type = DistributedType.FSDP
        self.accelerator.state.fsdp_plugin = plugin
        self.is_fsdp_enabled = True

    Trainer.create_accelerator_and_postprocess = create_fsdp2


def _iw_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    with gloo_rank(rank, world, port):
        import json

        import torch.distributed as dist

        from methods.conftest import build_trainer, toy_batch  # tests/ is on sys.path
        from rpsft.config import load_config
        from rpsft.models import load_model

        paths = json.loads(open(os.path.join(out_dir, "paths.json")).read())
        _fsdp2_trainers(rank, world)
        cfg = load_config(None, ["method=iw", f"model.name={paths['model']}", f"data.train={paths['train']}",
                                 f"output_dir={out_dir}/run", "data.limit=8", "data.max_length=96",
                                 "train.batch_size=2", "train.bf16=true", "train.max_steps=1"])
        initial = {n: p.detach().clone() for n, p in load_model(paths["model"])[0].named_parameters()}
        trainer = build_trainer(cfg)
        assert trainer.is_fsdp_enabled and trainer.accelerator.is_fsdp2
        ref = trainer.ref_model

        # sharded like the policy: every weight a row shard, about half the bytes on each of the 2 ranks
        params = list(ref.parameters())
        assert all(type(p).__name__ == "DTensor" and not p.requires_grad for p in params) and not ref.training
        assert all(p.dtype == torch.float32 for p in params)  # stored as loaded; computed in bf16 (below)
        full = sum(p.numel() * p.element_size() for p in params)
        mine = torch.tensor(float(sum(p.to_local().numel() * p.element_size() for p in params)))
        assert 0.4 < float(mine) / full < 0.6, (float(mine), full)
        dist.all_reduce(mine)
        assert int(mine) == full  # the two shards are the whole model, once

        # its forward runs in the compute dtype: every projection and the embedding see bf16 weights and inputs
        seen = []

        def record(module, args):  # the embedding's input is token ids: only its weight has a dtype to check
            seen.append((module.weight.dtype, args[0].dtype if args[0].is_floating_point() else None))

        hooks = [m.register_forward_pre_hook(record) for m in ref.modules()
                 if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
        policy = trainer.accelerator.prepare(trainer.model)  # the policy sharded as the training loop does it
        policy.train()
        trainer.compute_loss(policy, dict(toy_batch(trainer, n=2)))
        for h in hooks:
            h.remove()
        assert len(seen) == 1 + 7 * 2 and set(seen) == {(torch.bfloat16, None), (torch.bfloat16, torch.bfloat16)}, seen
        # the same bf16 computation as the policy's at the initial weights: the importance weight is exactly 1
        assert trainer._metrics["train"]["iw/weight_mean"][-1] == 1.0
        assert all(type(p).__name__ == "DTensor" for p in ref.parameters())  # every unit freed its gather

        # the tuned policy is untouched by the reference: fp32 master weights, the initial values (its root keeps
        # the bf16 gather of a forward for the backward: put its shards back first)
        from torch.distributed.fsdp import FSDPModule

        for m in policy.modules():
            if isinstance(m, FSDPModule):
                m.reshard()
        for n, p in policy.named_parameters():
            assert type(p).__name__ == "DTensor" and p.dtype == torch.float32, n
            assert torch.equal(p.full_tensor().detach(), initial[n]), n
        with open(os.path.join(out_dir, f"ok{rank}"), "w") as f:
            f.write("ok")


def test_iw_reference_is_sharded_and_runs_in_the_compute_dtype_under_fsdp2(tiny_model_dir, synth_data, tmp_path):
    import json

    (tmp_path / "paths.json").write_text(json.dumps({"model": str(tiny_model_dir), "train": str(synth_data["train"])}))
    run_ranks_or_fail(_iw_worker, tmp_path)
    assert (tmp_path / "ok0").is_file() and (tmp_path / "ok1").is_file()
