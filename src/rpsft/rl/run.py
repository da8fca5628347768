"""``rpsft rl``'s run: config checks, prompts, the run directory, the DAPO trainer, evaluations before/after and
run.json."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import yaml

from .. import fileio, runlock
from ..terminal import disk_full_is_a_user_error
from .config import RLConfig, rl_to_dict, validate_rl
from .data import load_prompts


def _is_main() -> bool:
    """Rank 0 of an ``accelerate launch`` / torchrun job (or the only process): the one that evaluates and
    writes run.json. Read from the environment, so it is known before the Trainer exists."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def _evaluate(cfg: RLConfig, model: str, out: Path, use_vllm: bool) -> dict:
    from ..eval import run_eval

    e = cfg.eval
    s = run_eval(model, e.suite, k=e.k, limit=e.limit, backend="vllm" if use_vllm else "hf", out_dir=out,
                 max_new_tokens=e.max_new_tokens or cfg.dapo.max_completion_length, temperature=e.temperature,
                 top_p=e.top_p, greedy=e.greedy, batch_size=e.batch_size, seed=cfg.train.seed,
                 system_prompt=e.system_prompt, judge_timeout_s=cfg.dapo.judge_timeout_s)
    return {name: {key: b.get(key) for key in ("avg_at_k", "accuracy", "pass_at_k", "problems", "k", "mean_tokens",
                                                "truncated", "answered") if key in b}
            for name, b in s["benchmarks"].items()} | {"wall_s": s["wall_s"], "dir": str(out)}


def _train_stats(rows: list[dict]) -> dict:
    """First / last logged training reward and accuracy, and seconds per optimizer step, from metrics.jsonl."""
    logged = [r for r in rows if "reward" in r]
    out: dict[str, Any] = {}
    if logged:
        for key in ("reward", "accuracy", "completions/mean_length"):
            vals = [r[key] for r in logged if r.get(key) is not None]
            if vals:
                out[f"{key}_first"] = vals[0]
                out[f"{key}_last"] = vals[-1]
        times = [r["step_time"] for r in logged if r.get("step_time") is not None]
        if times:
            out["step_time_mean_s"] = sum(times) / len(times)
    return out


# keys that may change when a run is resumed: they do not alter the steps already taken
RESUMABLE_CHANGES = ("train.max_steps", "train.save_steps", "train.logging_steps", "train.save_total_limit",
                     "train.keep_optimizer_state", "eval.")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def _prepare_output(out: Path, cfg: RLConfig, resume: bool | str | None, overwrite: bool | str) -> Path | None:
    """train.prepare_run_dir with the RL rule: a run may be resumed with another length or evaluation only."""
    from ..train import prepare_run_dir

    def diff(saved: str) -> list[str]:
        old, new = _flat(yaml.safe_load(saved) or {}), _flat(rl_to_dict(cfg))
        return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_CHANGES)]

    return prepare_run_dir(out, resume, overwrite, diff, may_change=", ".join(RESUMABLE_CHANGES),
                           max_steps=cfg.train.max_steps, trainer_section=cfg.trainer)  # rank 0 decides


def _check_trainer_args(cfg: RLConfig) -> None:
    """trainer: keys and trackers checked before the policy is loaded."""
    from trl import GRPOConfig

    from ..trainer_args import check_report_to, check_trainer_section

    check_trainer_section(cfg.trainer, GRPOConfig)
    check_report_to(cfg.train.report_to)


def _release_training_memory(engine: bool) -> None:
    """After the trainer's last reference is dropped: collect it and return its memory to the GPU. ``engine``: TRL's
    co-located vLLM engine was detached too; its teardown (:func:`rpsft.eval.generate.release_vllm_state`) also
    destroys the process group the engine ran in, so every rank first reaches this point, past its last collective."""
    import gc

    import torch

    if not engine:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    from ..eval.generate import release_vllm_state

    release_vllm_state()


@disk_full_is_a_user_error("rpsft rl", lambda a: a["cfg"].output_dir)  # a full disk: one line, what to run
@runlock.locked("rpsft rl", lambda a: a["cfg"].output_dir)  # one process per run directory (runlock.py)
def run_rl(cfg: RLConfig, resume: bool | str | None = None, overwrite: bool | str = False, console=None,
           progress: bool = True, extra_callbacks: list | None = None) -> dict:
    """DAPO from ``cfg.init``; returns the run summary (also ``output_dir/run.json``)."""
    import torch

    from .. import guards
    from ..launch import check_launch
    from ..models import load_model
    from ..train import (build_anchor, finish_checkpoints, install_callbacks, processes_on_cpu, resume_training,
                         trainer_precision)
    from .trainer import RLProgress, build_trainer, dapo_args, detach_vllm_engine, use_vllm_default

    validate_rl(cfg)
    check_launch(bool(cfg.anchor.enabled), nan_policy=cfg.train.nan_policy,
                 trainer_precision=trainer_precision(cfg.train, cfg.trainer), cpu=processes_on_cpu(cfg.trainer))
    _check_trainer_args(cfg)
    out = Path(cfg.output_dir)
    # data first: a bad file fails in a second, not after loading weights
    prompts = load_prompts(cfg)
    if len(prompts) < cfg.dapo.prompts_per_step:
        raise ValueError(f"{cfg.data.train}: {len(prompts)} prompts, fewer than dapo.prompts_per_step="
                         f"{cfg.dapo.prompts_per_step}; lower prompts_per_step or raise data.limit")
    ckpt = _prepare_output(out, cfg, resume, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    fileio.write_text(out / "config.yaml", yaml.safe_dump(rl_to_dict(cfg), sort_keys=False))
    use_vllm = use_vllm_default(cfg.dapo.use_vllm)

    summary: dict[str, Any] = {"init": cfg.init, "output_dir": str(out)}
    # evaluations and run.json on rank 0 only: each rank would start its own vLLM engine and append to one file
    main = _is_main()
    if cfg.eval.enabled and cfg.eval.before and main:
        summary["eval_before"] = _evaluate(cfg, cfg.init, out / "eval-init", use_vllm)

    import datasets

    torch.manual_seed(cfg.train.seed)
    model, tokenizer = load_model(cfg.init, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
    dataset = datasets.Dataset.from_list(prompts)
    args = dapo_args(cfg, tokenizer, dataset, out)
    _ = args.device  # initialises the process group under `accelerate launch`, so bases are split across ranks
    anchor = None
    if cfg.anchor.enabled:
        anchor = build_anchor(model, cfg, progress=progress)  # frames of the init (SFT) weights; cached bases
        anchor = anchor if len(anchor) else None
    trainer = build_trainer(cfg, model, tokenizer, dataset, out, anchor=anchor, args=args)
    if ckpt is not None:
        trainer.restore_anchor_budget(ckpt)  # continue the λ trajectory where the checkpoint left it
    # the same safety as SFT: no optimizer step with a non-finite loss, penalty or gradient (train.nan_policy), and
    # sealed checkpoints, so `--resume latest` never picks one torn by an interruption
    guard = guards.FiniteGuard(trainer, cfg.train.nan_policy, cfg.train.nan_max_skips, run_dir=out)
    install_callbacks(trainer, out, RLProgress(console) if progress else None,
                      [guard, guards.CheckpointSealer(keep=cfg.train.save_total_limit), *(extra_callbacks or [])])

    # read now: with train.save_total_limit the checkpoint resumed from is deleted once a newer one is sealed
    start = guards.checkpoint_state(ckpt)["global_step"] if ckpt else 0
    t0 = time.perf_counter()
    resume_training(trainer, ckpt, cfg.train.max_steps)  # from the last step: the export only
    train_s = time.perf_counter() - t0
    trainer.save_model(str(out))
    steps = trainer.state.global_step
    final_penalty = trainer.anchor_final_penalty()  # via drift(): FSDP2 shards too, where penalty() fails
    summary.update({
        "global_step": steps,
        "train_seconds": round(train_s, 2),
        "seconds_per_step": round(train_s / max(steps - start, 1), 2),  # wall clock, generation included
        "prompts": len(prompts),
        "generation": "vllm" if use_vllm else "transformers",
        "anchor": None if anchor is None else {"matrices": len(anchor), "ranks": sorted(set(anchor.ranks.values())),
                                               "lam": cfg.anchor.lam, **anchor.summary(),  # form, full-rank rule
                                               "final_penalty": final_penalty},
        "train": _train_stats(fileio.read_jsonl(out / "metrics.jsonl")),
        "resumed_from": str(ckpt) if ckpt else None,
        "metrics": str(out / "metrics.jsonl"),
        "config": rl_to_dict(cfg),
    })
    if main:
        finish_checkpoints(trainer, cfg.train, out)  # the newest sealed checkpoint(s), optimizer state dropped
    # Free the policy, its optimizer state, the anchor's frames and TRL's co-located vLLM engine before rank 0 starts
    # the evaluation's own engine (at 0.85 of the GPU). Nothing outside the trainer holds them (the finite guard
    # holds it weakly); the collection breaks the trainer's own reference cycles (callbacks, wrapped methods).
    engine = detach_vllm_engine(trainer)
    del trainer, model, anchor, guard
    _release_training_memory(engine)
    if not main:
        return summary
    if cfg.eval.enabled:
        summary["eval_after"] = _evaluate(cfg, str(out), out / "eval", use_vllm)
    summary["disk"] = guards.disk_use(out)  # what the run leaves on disk; `rpsft rl` prints it
    fileio.write_json(out / "run.json", summary)
    return summary
