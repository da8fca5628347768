"""``rpsft train``: one SFT run — config, data, model, anchor, TRL ``SFTConfig``, the anchored trainer, run.json.

The anchor's place in the optimizer step (Algorithm 1) lives in :class:`rpsft.trainer.AnchorMixin`;
``AnchoredSFTTrainer`` (AnchorMixin + TRL's SFTTrainer) is re-exported here, where scripts import it from.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import TrainerCallback
from trl import SFTConfig

from . import distributed, fileio, guards, preflight, runlock
from .anchor import RotationAnchor
from .budget import BudgetController, check_budget_method
from .config import Config, dump_yaml, to_dict
from .launch import check_launch, resolve_checkpointing
from .models import cache_root, load_model, parse_dtype
from .preflight import usable_cache_dir
from .terminal import disk_full_is_a_user_error
from .trainer import AnchoredSFTTrainer  # also importable from here, as scripts and docs do
from .trainer_args import check_report_to, check_trainer_section, write_model_card

log = logging.getLogger("rpsft")


class MetricsJsonlCallback(TrainerCallback):
    """Every log line (loss, lr, grad norm, rpsft/*) appended to ``metrics.jsonl`` as it happens."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            fileio.append_jsonl(self.path, {"step": state.global_step, "epoch": state.epoch, **logs})


class RichProgressCallback(TrainerCallback):
    """A rich progress bar (steps, ETA, latest loss and penalty) in place of transformers' tqdm bar."""

    def __init__(self, console=None):
        self.console = console
        self.progress = None
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from .terminal import progress_bar

        self.progress = progress_bar("[bold]train[/bold] {task.description}", console=self.console)
        self.progress.start()
        self.task = self.progress.add_task("", total=state.max_steps or None, completed=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, total=state.max_steps)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is not None and logs and "loss" in logs:
            desc = f"loss {logs['loss']:.4f}"
            if "rpsft/penalty" in logs:
                desc += f"  R {logs['rpsft/penalty']:.3e}"
            self.progress.update(self.task, description=desc)
            if not self.progress.console.is_terminal:
                # a log file or CI: the bar is not redrawn there, so say each step on a line of its own
                task = self.progress.tasks[0]
                eta = task.time_remaining
                self.progress.console.print(f"train step {state.global_step}/{state.max_steps}  {desc}  elapsed "
                                            f"{task.elapsed or 0:.0f}s  eta {eta:.0f}s" if eta is not None else
                                            f"train step {state.global_step}/{state.max_steps}  {desc}",
                                            highlight=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def on_gpu() -> bool:
    return torch.cuda.is_available()


def processes_on_cpu(trainer_section: dict | None = None) -> bool:
    """Whether this run's processes compute on the CPU: the Trainer's ``use_cpu`` (rpsft sets it where CUDA is
    absent; a ``trainer:`` section may set it) or the launcher's (``use_cpu`` in the accelerate config, handed to the
    processes as ACCELERATE_USE_CPU)."""
    import os

    return bool((trainer_section or {}).get("use_cpu", not on_gpu())) or \
        os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes")


def default_bf16(t: Any) -> bool:
    """The Trainer's ``bf16`` from a ``train`` section: as set, else on where the GPU supports it (never on a CPU)."""
    return bool(t.bf16) if t.bf16 is not None else (on_gpu() and torch.cuda.is_bf16_supported())


def trainer_precision(t: Any, section: dict | None = None) -> str | None:
    """The Trainer's 16-bit mode (``bf16``, ``fp16`` or None) for a ``train`` section and the ``trainer:`` section
    that overrides it: what ``TrainingArguments`` hands DeepSpeed in place of the launcher's mixed precision, for
    the launch check (:func:`rpsft.launch.check_launch`) before anything is built."""
    section = section or {}
    if section.get("fp16"):
        return "fp16"
    return "bf16" if section.get("bf16", default_bf16(t)) else None


def common_trainer_kwargs(t: Any, output_dir: str | Path) -> dict:
    """The ``TrainingArguments`` fields SFT and DAPO runs share, from a ``train`` config section.

    CPU-safe defaults: fp32 unless ``bf16`` is asked for (bf16 matmuls are 20-30x slower on CPUs without bf16
    units), gradient checkpointing only on a GPU unless set, no reporting integrations, no dataloader workers."""
    gpu = on_gpu()
    bf16 = default_bf16(t)
    gc = t.gradient_checkpointing if t.gradient_checkpointing is not None else gpu
    gc = resolve_checkpointing(bool(gc))  # FSDP's own activation checkpointing (accelerate config) wins
    kwargs = dict(
        output_dir=str(output_dir),
        learning_rate=t.lr,
        max_steps=t.max_steps,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of total steps
        lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        # Trainer rotates before on_save seals the new checkpoint and knows nothing of seals: rotation is
        # guards.CheckpointSealer(keep=train.save_total_limit)'s, after sealing
        save_total_limit=None,
        seed=t.seed,
        data_seed=t.seed,
        bf16=bool(bf16),
        fp16=False,
        use_cpu=not gpu,
        report_to=check_report_to(getattr(t, "report_to", None)),
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    # always explicit, under the new name: TRL's configs default the deprecated `gradient_checkpointing` to True,
    # which transformers 5 copies into `activation_checkpointing` (with a FutureWarning) when that is left unset
    kwargs["activation_checkpointing"] = bool(gc)
    return kwargs


def build_sft_config(cfg: Config, output_dir: str | Path, **overrides: Any) -> SFTConfig:
    """TRL ``SFTConfig`` from our config, with CPU-safe defaults (:func:`common_trainer_kwargs`: fp32 and no
    gradient checkpointing on CPU) and the SFT-specific fields."""
    t = cfg.train
    kwargs = common_trainer_kwargs(t, output_dir)
    kwargs.update(
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        max_length=cfg.data.max_length,
        loss_type=t.loss_type,
        model_init_kwargs=None,
    )
    if cfg.data.eval:  # eval_loss on data.eval every save_steps (and once at the end of train())
        kwargs.update(eval_strategy="steps", eval_steps=t.save_steps, per_device_eval_batch_size=t.batch_size)
    kwargs.update(overrides)
    kwargs.update(check_trainer_section(cfg.trainer, SFTConfig))  # the trainer: section has the last word
    return SFTConfig(**kwargs)


def build_anchor(model: torch.nn.Module, cfg: Config, full_rank: bool = False,
                 progress: bool = False) -> RotationAnchor:
    a = cfg.anchor
    cache = a.cache_dir if a.cache_dir is not None else str(cache_root() / "bases")
    cache = usable_cache_dir(cache)  # read-only or not creatable: a warning, and no caching
    rank = 1.0 if full_rank else a.rank  # fraction 1.0 = min(m, n); with full_rank_as="l2": ‖W − W0‖² exactly
    from .methods import get_method

    # the method's regulariser (Eq. 3's block or its complement); an rl config has no method: the block
    form = get_method(cfg.method).anchor_form if hasattr(cfg, "method") else "block"
    return RotationAnchor.from_model(model, rank=rank, targets=a.targets, layers=a.layers, svd=a.svd,
                                     dtype=parse_dtype(a.dtype), cache_dir=cache, niter=a.niter, progress=progress,
                                     frame_dtype=a.frame_dtype, full_rank_as="l2" if full_rank else a.full_rank,
                                     form=form)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest *complete* checkpoint-N (one torn by a kill during its save is passed over; guards.py)."""
    return guards.latest_complete(output_dir)[0]


def start_process_group(trainer_section: dict | None = None) -> None:
    """Under a multi-process launch (``accelerate launch``, torchrun: WORLD_SIZE > 1), start the process group now,
    through accelerate's ``PartialState`` with the settings ``TrainingArguments`` starts it with (transformers'
    ``_setup_devices``: on a CPU ``cpu=True`` and ``ddp_backend``; otherwise ``ddp_backend`` and ``ddp_timeout``,
    from the run's ``trainer:`` section or their defaults), so the Trainer built later joins this group unchanged.
    Needed before the run directory is read, which rank 0 alone does (:func:`prepare_run_dir`). A no-op alone or
    once a group exists."""
    import os

    import torch.distributed as dist

    size = os.environ.get("WORLD_SIZE", "").strip()  # set in each process by accelerate launch and torchrun
    if (dist.is_available() and dist.is_initialized()) or not size.isdigit() or int(size) <= 1:
        return
    from datetime import timedelta

    from accelerate import PartialState
    from transformers import TrainingArguments

    section = dict(trainer_section or {})
    defaults = TrainingArguments.__dataclass_fields__
    cpu = processes_on_cpu(section)
    backend = section.get("ddp_backend", defaults["ddp_backend"].default)
    if cpu:
        PartialState(cpu=True, backend=backend)
    else:
        timeout = section.get("ddp_timeout", defaults["ddp_timeout"].default)
        PartialState(backend=backend, timeout=timedelta(seconds=timeout))


def prepare_run_dir(out: Path, resume: bool | str | None, overwrite: bool | str,
                    config_diff: Callable[[str], list[str]], may_change: str = "", max_steps: int = -1,
                    trainer_section: dict | None = None) -> Path | None:
    """The checkpoint to resume from (None: a fresh start) for a run directory ``out``.

    Refuses to clobber an earlier run without ``overwrite``, and to resume one whose saved ``config.yaml``
    differs from the current config: ``config_diff(saved_text)`` lists the differences that matter
    (``may_change`` names what may differ, for the message). On resume, drops metrics.jsonl lines past the
    checkpoint so the log continues the same run without duplicate steps. A checkpoint whose optimizer state was
    deleted when its run finished is refused while steps up to ``max_steps`` are left (guards.check_resumable).

    Under several processes rank 0 alone looks at ``out``, deletes the old run and trims the log (it alone holds the
    run lock, runlock.py); the others wait for its outcome — the checkpoint, or the same error — so every rank
    resumes from the same checkpoint or refuses alike (:func:`rpsft.distributed.main_decides`). ``trainer_section``
    (the run's ``trainer:``) sets how the process group is started (:func:`start_process_group`)."""
    start_process_group(trainer_section)
    return distributed.main_decides(lambda: _prepare_run_dir(out, resume, overwrite, config_diff, may_change,
                                                             max_steps))


def _prepare_run_dir(out: Path, resume: bool | str | None, overwrite: bool | str,
                     config_diff: Callable[[str], list[str]], may_change: str, max_steps: int) -> Path | None:
    """:func:`prepare_run_dir`'s work, on one process."""
    ckpt = None
    if resume:
        saved = out / "config.yaml"
        diff = config_diff(saved.read_text()) if saved.is_file() else []
        if diff:
            raise ValueError(f"cannot resume {out}: the config differs from the one the run started with "
                             f"({'; '.join(diff[:6])}){'; only ' + may_change + ' may change' if may_change else ''}."
                             " Resume with the same config, or start again with --overwrite")
        explicit = isinstance(resume, (str, Path)) and str(resume) not in ("True", "latest")
        ckpt, skipped = (Path(resume), []) if explicit else guards.latest_complete(out)
        if skipped:
            log.warning("skipping incomplete %s (interrupted while saving); resuming from %s",
                        ", ".join(p.name for p in skipped), ckpt.name if ckpt else "nothing")
        if ckpt is None or not (ckpt / "trainer_state.json").is_file():
            raise FileNotFoundError(f"nothing to resume: no complete checkpoint-N with trainer_state.json in {out}"
                                    + (f" ({resume})" if isinstance(resume, str) else "")
                                    + (f"; incomplete, skipped: {', '.join(p.name for p in skipped)}" if skipped
                                       else "")
                                    + ("" if explicit else "; pass --overwrite instead of --resume to start again"))
        step = guards.checkpoint_state(ckpt)["global_step"]  # a torn trainer_state.json is named with its path
        guards.check_resumable(ckpt, max_steps)
        rows = [r for r in fileio.read_jsonl(out / "metrics.jsonl") if r.get("step", 0) <= step]
        fileio.write_jsonl(out / "metrics.jsonl", rows)
    elif out.exists() and (latest_checkpoint(out) or (out / "metrics.jsonl").exists()):
        if not overwrite:
            last, torn = guards.latest_complete(out)
            if last is not None:
                raise FileExistsError(f"{out} already holds a run; pass --resume latest to continue it or "
                                      "--overwrite to start again (or choose another output_dir)")
            # nothing --resume latest could take: name the command that works
            what = "a finished run with no checkpoint left" if (out / "run.json").is_file() else \
                "an unfinished run with no complete checkpoint"
            names = ", ".join(p.name for p in torn)
            why = f" ({names} {'is' if len(torn) == 1 else 'are'} incomplete: interrupted while saving)" if torn else ""
            raise FileExistsError(f"{out} holds {what} to resume from{why}; pass --overwrite to start again (or "
                                  "choose another output_dir)")
        guards.clear_run_dir(out, overwrite)  # only what a run writes, unless --overwrite-all
    return ckpt


def _yaml_diff(saved: str, current: str) -> list[str]:
    import difflib

    import yaml

    try:
        if yaml.safe_load(saved) == yaml.safe_load(current):
            return []  # the same values in another field order (a run written before train: fields were reordered)
    except yaml.YAMLError:
        pass
    return [line for line in difflib.unified_diff(saved.splitlines(), current.splitlines(), lineterm="", n=0)
            if line[:1] in "+-" and line[:3] not in ("+++", "---")]


def install_callbacks(trainer, out: Path, progress_callback=None, extra_callbacks: list | None = None) -> None:
    """Our logging in place of transformers' tqdm bar and printer: metrics.jsonl, an optional rich progress
    callback, and the caller's extra callbacks (timing in ``rpsft bench``, interruptions in tests)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(cb)
    trainer.add_callback(MetricsJsonlCallback(out / "metrics.jsonl"))
    for cb in ([progress_callback] if progress_callback is not None else []) + list(extra_callbacks or []):
        trainer.add_callback(cb)


def finish_checkpoints(trainer, t: Any, out: Path) -> None:
    """The checkpoints of a run that reached its last step (rank 0, SFT and RL): the newest
    ``train.save_total_limit`` sealed ones, without optimizer state unless ``train.keep_optimizer_state``. A run
    stopped early (interrupted, diverged) keeps its optimizer state, for --resume."""
    state = trainer.state
    if state.max_steps > 0 and state.global_step >= state.max_steps:
        guards.finish_checkpoints(out, t.save_total_limit, t.keep_optimizer_state,
                                  protect=guards.best_checkpoint(trainer.args, state))


def resume_training(trainer, ckpt: Path | None, max_steps: int = -1):
    """``trainer.train(resume_from_checkpoint=ckpt)``, except from a checkpoint at the run's last step (a run
    stopped during its final export, e.g. by a full disk): there Trainer would take one more optimizer step past
    ``max_steps`` whenever the last step is not at an epoch boundary (it tests for the end only after a step), so
    the checkpoint's weights and state are loaded and nothing is trained; the caller then exports as usual. Under
    DeepSpeed or FSDP the weights load only inside ``train()``, so there the plain resume is kept."""
    if ckpt is not None and not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled):
        state = guards.checkpoint_state(ckpt)
        total = max_steps if max_steps > 0 else int(state.get("max_steps") or 0)
        if total > 0 and int(state["global_step"]) >= total:
            from transformers.trainer_callback import TrainerState
            from transformers.trainer_utils import TrainOutput

            trainer._load_from_checkpoint(str(ckpt))  # what train() does first on a resume
            trainer.state = TrainerState.load_from_json(str(Path(ckpt) / "trainer_state.json"))
            return TrainOutput(trainer.state.global_step, None, {})
    return trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)


def _final_eval(trainer) -> dict:
    """eval_loss at the last step: the Trainer's own evaluation if it ran there (eval_strategy fires at the end
    of training too), else one now."""
    done = [h for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == trainer.state.global_step]
    return done[-1] if done else trainer.evaluate()


# one process per run directory, from before --resume/--overwrite read or delete anything in it (runlock.py)
@disk_full_is_a_user_error("rpsft train", lambda a: a["cfg"].output_dir)  # one line naming what to run
@runlock.locked("rpsft train", lambda a: a["cfg"].output_dir)
def train(cfg: Config, resume: bool | str | None = None, overwrite: bool | str = False, console=None,
          extra_callbacks: list | None = None, progress: bool = True) -> dict:
    """Run one training job described by ``cfg``; returns the run summary (also written to run.json)."""
    from .data.formats import load_records, to_dataset
    from .methods import get_method

    method = get_method(cfg.method)
    use_anchor = method.anchor_enabled(cfg.anchor.enabled)
    if method.check is not None:
        method.check(cfg)  # settings the method cannot honour (e.g. complement with 16-bit frames), in one line
    # accelerate settings the anchor or the finite guard cannot work with fail here, not after the bases
    check_launch(use_anchor, nan_policy=cfg.train.nan_policy,
                 trainer_precision=trainer_precision(cfg.train, cfg.trainer), cpu=processes_on_cpu(cfg.trainer))
    check_budget_method(cfg.anchor, f"method={cfg.method}", use_anchor, method=method)
    out = Path(cfg.output_dir)
    check_trainer_section(cfg.trainer, SFTConfig)  # typos in trainer:/report_to fail before anything is loaded
    check_report_to(cfg.train.report_to)
    # paths, targets and ranks, then the data: all before the run directory is touched or the model loads
    d = cfg.data
    preflight.check_data_path(d.train)
    preflight.check_targets(cfg, use_anchor)
    from .plan import plan_for_training

    mem_plan = plan_for_training(cfg, console)  # printed on rank 0; a run that cannot fit or train stops here
    records = load_records(d.train, split=d.split, limit=d.limit, columns=d.columns, turns=d.turns)
    dataset = to_dataset(records)
    eval_dataset = to_dataset(load_records(d.eval, split=d.split, columns=d.columns, turns=d.turns)) if d.eval \
        else None
    def config_diff(saved: str) -> list[str]:  # what differs between a saved run's config.yaml and this one
        return _yaml_diff(saved, dump_yaml(cfg))

    # under several processes rank 0 alone reads (and clears) the run directory; the others take its outcome
    start_process_group(cfg.trainer)
    finished = distributed.main_decides(lambda: preflight.finished_run(out, resume, config_diff, cfg.train.max_steps))
    if finished is not None:
        log.warning("%s already finished (step %s); nothing to resume", out, finished.get("global_step"))
        return finished
    ckpt = prepare_run_dir(out, resume, overwrite, config_diff, max_steps=cfg.train.max_steps,
                           trainer_section=cfg.trainer)
    out.mkdir(parents=True, exist_ok=True)
    fileio.write_text(out / "config.yaml", dump_yaml(cfg))

    torch.manual_seed(cfg.train.seed)
    model, tokenizer = load_model(cfg.model.name, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)

    args = build_sft_config(cfg, out, **method.sft_overrides)
    _ = args.device  # initialises the process group under `accelerate launch`, so bases are split across ranks
    t0 = time.perf_counter()
    anchor = build_anchor(model, cfg, full_rank=method.anchor == "full", progress=progress) if use_anchor else None
    anchor_s = time.perf_counter() - t0
    if anchor is not None and len(anchor) == 0:
        anchor = None  # every k is 0: the run is plain SFT, and says so in run.json
    if method.prepare_model is not None:
        model = method.prepare_model(model, cfg)
    if anchor is not None and method.wrap_anchor is not None:
        anchor = method.wrap_anchor(anchor, model, cfg)  # e.g. the anchor on W0 + s·BA of a PEFT model

    trainer_cls = method.trainer_class() if method.trainer_class is not None else AnchoredSFTTrainer
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
                          processing_class=tokenizer, anchor=anchor,
                          anchor_weight=cfg.anchor.lam, anchor_period=cfg.anchor.period, method_config=cfg,
                          anchor_mode=cfg.anchor.mode, anchor_budget=BudgetController.from_config(cfg.anchor))
    data_report = preflight.report_dropped(trainer, records, tokenizer, cfg.data.max_length, cfg.data.train)
    guard = guards.FiniteGuard(trainer, cfg.train.nan_policy, cfg.train.nan_max_skips, run_dir=out)
    extra_callbacks = [guard, guards.CheckpointSealer(keep=cfg.train.save_total_limit), *(extra_callbacks or [])]
    install_callbacks(trainer, out, RichProgressCallback(console) if progress else None, extra_callbacks)
    if ckpt is not None:
        trainer.restore_anchor_budget(ckpt)  # continue the λ trajectory where the checkpoint left it

    t1 = time.perf_counter()
    result = resume_training(trainer, ckpt, cfg.train.max_steps)  # from the last step: the export only
    train_s = time.perf_counter() - t1
    trainer.save_model(str(out))
    eval_metrics = _final_eval(trainer) if eval_dataset is not None else {}
    extra = method.finalize(trainer, cfg, out) if method.finalize is not None else {}
    if trainer.is_world_process_zero():
        guards.fix_modes(out)  # safetensors files are written 0600; give every run file the umask's mode

    summary = {
        "method": cfg.method,
        "output_dir": str(out),
        "global_step": trainer.state.global_step,
        # the whole run's mean logged loss, across resumes (Trainer's own covers only this session's steps)
        "train_loss": guards.whole_run_loss(out / "metrics.jsonl") if ckpt else result.training_loss,
        "train_loss_session": result.training_loss,
        "skipped_steps": guard.skipped,
        "data": data_report,
        "train_seconds": round(train_s, 2),
        "anchor_seconds": round(anchor_s, 2),
        "memory_plan": None if mem_plan is None else mem_plan.to_dict(),  # per-rank bytes planned (rpsft.plan)
        "anchor": None if anchor is None else {
            "matrices": len(anchor), "nbytes": anchor.nbytes, "ranks": sorted(set(anchor.ranks.values())),
            "lam": cfg.anchor.lam, "period": cfg.anchor.period, **anchor.summary(),  # form, full-rank rule
            **({} if trainer.anchor_budget is None else {"budget": trainer.anchor_budget.state_dict()}),
            "final_penalty": trainer.anchor_final_penalty(),  # via drift(): FSDP2 shards too
        },
        "eval_loss": eval_metrics.get("eval_loss"),
        "resumed_from": str(ckpt) if ckpt else None,
        "metrics": str(out / "metrics.jsonl"),
        "config": to_dict(cfg),
        **extra,
    }
    write_model_card(trainer, cfg, summary["anchor"], out)
    if trainer.is_world_process_zero():
        finish_checkpoints(trainer, cfg.train, out)
        summary["disk"] = guards.disk_use(out)  # what the run leaves on disk; `rpsft train` prints it
        fileio.write_json(out / "run.json", summary)
    return summary

