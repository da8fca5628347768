"""``rpsft rl`` on several processes and with vLLM: the run summary comes from drift() (which works on FSDP2
shards, unlike penalty()), only rank 0 evaluates and writes run.json, and vLLM's context is sized to the data."""

from __future__ import annotations

import json

import pytest

from .rl_helpers import tiny_overrides

import rpsft.rl.run as rl
from rpsft.rl import load_prompts, load_rl_config, run_rl
from rpsft.rl.trainer import build_grpo_config, vllm_max_model_length


def test_rank_comes_from_the_launcher(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert rl._is_main()
    monkeypatch.setenv("RANK", "3")
    assert not rl._is_main()
    monkeypatch.setenv("RANK", "0")
    assert rl._is_main()


@pytest.mark.parametrize("main", [True, False], ids=["rank0", "rank1"])
def test_summary_uses_drift_and_only_rank0_evaluates_and_writes(tiny_model_dir, synth_file, tmp_path,
                                                                  monkeypatch, main):
    from rpsft.anchor import RotationAnchor

    def sharded_penalty(self, model, record=False):  # what penalty() does on FSDP2 DTensor weights
        raise NotImplementedError("penalty() is the autograd path for unsharded weights")

    evaluated = []
    monkeypatch.setattr(RotationAnchor, "penalty", sharded_penalty)
    monkeypatch.setattr(rl, "_is_main", lambda: main)
    monkeypatch.setattr(rl, "_evaluate", lambda cfg, model, out, use_vllm: evaluated.append(model) or {"wall_s": 0})
    out = tmp_path / "rl"
    cfg = load_rl_config(None, tiny_overrides(synth_file, out, **{"anchor.enabled": "true", "anchor.rank": 4,
                                                                   "eval.enabled": "true", "train.max_steps": 1}),
                         init=str(tiny_model_dir))
    summary = run_rl(cfg, progress=False)
    assert summary["anchor"]["final_penalty"] > 0  # RL moved the weights; measured through drift()
    assert summary["global_step"] == 1
    if main:
        assert evaluated == [str(tiny_model_dir), str(out)]  # before and after
        assert json.loads((out / "run.json").read_text())["anchor"]["final_penalty"] == \
            pytest.approx(summary["anchor"]["final_penalty"])
    else:
        assert evaluated == [] and not (out / "run.json").exists()


def test_vllm_context_is_the_longest_prompt_plus_the_completion(tiny_model_dir, synth_file, tmp_path):
    from transformers import AutoTokenizer

    cfg = load_rl_config(None, tiny_overrides(synth_file, tmp_path / "run", **{"dapo.max_completion_length": 300}),
                         init=str(tiny_model_dir))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = load_prompts(cfg)
    longest = max(len(tok(tok.apply_chat_template(p["prompt"], tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False).input_ids) for p in prompts)
    n = vllm_max_model_length(cfg, tok, prompts)
    assert n % 256 == 0 and longest + 300 <= n < longest + 300 + 256
    args = build_grpo_config(cfg, tmp_path / "run", [1.0, 1.0], use_vllm=True, vllm_max_model_length=n)
    assert args.vllm_max_model_length == n
    cfg.dapo.vllm_max_model_length = 8192  # set explicitly: used as given
    assert build_grpo_config(cfg, tmp_path / "run", [1.0, 1.0], use_vllm=True).vllm_max_model_length == 8192


def test_vllm_context_shorter_than_the_completion_is_refused(tiny_model_dir, synth_file, tmp_path):
    from rpsft.config import ConfigError

    with pytest.raises(ConfigError, match="vllm_max_model_length"):
        load_rl_config(None, tiny_overrides(synth_file, tmp_path / "run", **{"dapo.vllm_max_model_length": 12}),
                       init=str(tiny_model_dir))


class _StopAfterAnchor(Exception):
    pass


def _anchor_world_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One `accelerate launch`-style process of `rpsft rl`: records the process group the anchor is built in."""
    import os
    from pathlib import Path

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    import rpsft.train as train_mod

    torch.set_num_threads(1)
    paths = json.loads((Path(out_dir) / "paths.json").read_text())
    built = train_mod.build_anchor

    def recording_build(model, cfg, **kw):
        anchor = built(model, cfg, **kw)
        seen = {"initialized": dist.is_initialized(), "world": dist.get_world_size() if dist.is_initialized() else 1,
                "matrices": len(anchor), "penalty_at_init": float(anchor.penalty(model))}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(seen))
        raise _StopAfterAnchor

    train_mod.build_anchor = recording_build
    cfg = load_rl_config(None, tiny_overrides(Path(paths["data"]), Path(out_dir) / "run",
                                              **{"anchor.enabled": "true", "anchor.rank": 4,
                                                 "anchor.cache_dir": str(Path(out_dir) / f"bases{rank}")}),
                         init=paths["model"])
    try:
        run_rl(cfg, progress=False)
    except _StopAfterAnchor:
        pass
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def test_the_anchor_is_built_inside_the_process_group(tiny_model_dir, synth_file, tmp_path):
    # Under `accelerate launch` the group must exist before the bases are computed: then each SVD runs on one
    # rank and is broadcast (rpsft.distributed.assign_owners) instead of every rank computing all of them.
    from rpsft_testing import run_ranks_on

    seen = run_ranks_on(_anchor_world_worker, tmp_path, world=2, model=tiny_model_dir, data=synth_file)
    assert all(s["initialized"] and s["world"] == 2 for s in seen)
    assert seen[0]["matrices"] == seen[1]["matrices"] > 0
    assert all(s["penalty_at_init"] < 1e-8 for s in seen)  # broadcast bases are the init's own frames
