"""Run safety: the finite guard, complete-checkpoint markers, safe overwrite and whole-run summaries.

* :class:`FiniteGuard` checks, once per optimizer step and before ``optimizer.step()``, that the task loss of the
  window, the anchor penalty R and the gradient norm are finite. With ``train.nan_policy=stop`` (default) a
  non-finite value ends the run at that step with one line naming the step, what went non-finite and the likely
  cause; the weights are never updated with it, so every checkpoint on disk holds finite weights. With
  ``nan_policy=skip`` the step's gradients are dropped (the optimizer leaves every weight as it was), the step is
  counted (``rpsft/skipped_steps`` in metrics.jsonl) and the run stops once more than ``train.nan_max_skips``
  steps were skipped.
  Under DeepSpeed the check comes too late to hold the step back: accelerate runs DeepSpeed's optimizer step inside
  ``backward`` on the window's last micro-batch, and the gradients stay in DeepSpeed's own buffers. There the guard
  checks the window loss, R and the gradient norm DeepSpeed computed in that step, and ``stop`` guarantees that the
  run ends at the first non-finite step, before that step's checkpoint is written, so every checkpoint on disk
  still predates it; whether the weights in memory took the step is DeepSpeed's own overflow check's decision.
  ``skip`` cannot drop a step DeepSpeed has already taken and is refused there at launch
  (:func:`rpsft.launch.check_launch`).
* :class:`CheckpointSealer` writes a ``.rpsft-complete`` marker into ``checkpoint-N`` after Trainer has written
  every file of it (``on_save`` fires after ``_save_checkpoint``), and gives the files the umask's mode.
  :func:`complete_checkpoints` trusts only marked checkpoints, so a kill during a save leaves a checkpoint that
  ``--resume latest`` skips (and says so) instead of one it chokes on.
* :func:`rotate_checkpoints` keeps the newest ``train.save_total_limit`` sealed checkpoints (the sealer calls it
  after sealing; an unsealed newer one never makes a sealed one go), and :func:`finish_checkpoints` drops the
  optimizer state of a run that reached its last step unless ``train.keep_optimizer_state``; resuming such a
  checkpoint with steps left is refused (:func:`check_resumable`). :func:`disk_use` is what the run leaves on disk.
* :func:`clear_run_dir` is ``--overwrite``: it deletes what a run writes and nothing else.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
import weakref
from pathlib import Path

import torch
from transformers import TrainerCallback

COMPLETE = ".rpsft-complete"


class NonFiniteError(ValueError):
    """Training produced a non-finite loss, penalty or gradient; the message names the step and the likely cause."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names its path."""


# ---------------------------------------------------------------------------------------------- finite guard
class FiniteGuard(TrainerCallback):
    """Stop (or skip) an optimizer step whose loss, anchor penalty or gradient is not finite (see module doc)."""

    def __init__(self, trainer, policy: str = "stop", max_skips: int = 10, run_dir: str | Path | None = None):
        # Weak: the trainer holds this guard among its callbacks, and a strong reference back would keep the policy,
        # its optimizer state and TRL's vLLM engine alive after the run, when `rpsft rl` needs that memory for its
        # after-training evaluation. The caller keeps the trainer for as long as it trains.
        self._trainer = weakref.ref(trainer)
        self.policy = policy
        self.max_skips = int(max_skips)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.skipped = 0
        self.first_loss: float | None = None
        self.last_finite_loss: float | None = None
        self._window_loss = None
        self._window_pen: list[float] = []
        inner = trainer.training_step

        def training_step(model, inputs, num_items_in_batch=None):
            # sum of this window's micro-batch losses, kept on the device: one host sync per optimizer step
            pens = getattr(trainer, "_penalties", None)
            n = len(pens) if pens is not None else 0
            loss = inner(model, inputs, num_items_in_batch)
            d = loss.detach().float()
            self._window_loss = d if self._window_loss is None else self._window_loss + d
            if pens is not None:
                self._window_pen += pens[n:]  # the penalties this micro-batch added (the anchor's, once a window)
            return loss

        trainer.training_step = training_step  # an instance attribute: works for every trainer subclass
        log = trainer.log

        def log_with_skips(logs, *args, **kwargs):
            if self.skipped and "loss" in logs:  # before every on_log callback (metrics.jsonl, trackers) sees it
                logs["rpsft/skipped_steps"] = self.skipped
            return log(logs, *args, **kwargs)

        trainer.log = log_with_skips

    @property
    def trainer(self):
        """The guarded trainer (None once it has been freed)."""
        return self._trainer()

    def _checked(self, model, penalty: float) -> tuple[float, float, float]:
        """(window loss, penalty, gradient norm), agreed by every rank: one all-reduce and one host sync per step.

        Summed over ranks so that NaN anywhere is NaN everywhere and all ranks stop at the same step (a rank that
        stopped alone would leave the others waiting in a collective). Under DDP the gradient and penalty are
        replicated, so the printed values are then world-size multiples; only their finiteness is used."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]  # none under DeepSpeed: its own buffers
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP2 shards: squares add up
        device = local[0].device if local else (self._window_loss.device if self._window_loss is not None else "cpu")
        sq = torch.stack([g.float().pow(2).sum() for g in local]).sum() if local else torch.zeros((), device=device)
        engine = self._deepspeed_engine() if not local else None
        if engine is not None:
            # the (already global) norm of the step DeepSpeed just took; None when it computes none. DeepSpeed
            # reports an invalid norm as inf (0.19) or as the sentinel -1 (older releases): both are not finite here
            g = engine.get_global_grad_norm()
            g = 0.0 if g is None else float(g)
            sq = torch.tensor(g * g if 0 <= g < math.inf else math.nan, device=device)
        loss = self._window_loss.to(device) if self._window_loss is not None else torch.zeros((), device=device)
        v = torch.stack([loss, torch.tensor(penalty, device=device, dtype=torch.float32), sq.float()])
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(v)
        loss_v, pen_v, sq_v = v.tolist()
        return loss_v, pen_v, math.sqrt(sq_v) if sq_v >= 0 else sq_v

    def _deepspeed_engine(self):
        """The DeepSpeed engine training the guarded trainer's model (None without DeepSpeed)."""
        t = self.trainer
        engine = getattr(t, "model_wrapped", None) if getattr(t, "is_deepspeed_enabled", False) else None
        return engine if hasattr(engine, "get_global_grad_norm") else None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        step = state.global_step + 1  # the step being taken (global_step counts finished steps)
        new, self._window_pen = self._window_pen, []
        penalty = next((r for r in new if not math.isfinite(r)), new[-1] if new else 0.0)
        loss, penalty, gnorm = self._checked(model if model is not None else self.trainer.model, penalty)
        self._window_loss = None
        bad = [what for what, v in (("loss", loss), ("anchor penalty R", penalty), ("gradient norm", gnorm))
               if not math.isfinite(v)]
        if not bad:
            if self.first_loss is None:
                self.first_loss = loss
            self.last_finite_loss = loss
            return
        if self.policy == "skip" and self.skipped < self.max_skips:
            self.skipped += 1
            for p in (model if model is not None else self.trainer.model).parameters():
                p.grad = None  # torch optimizers leave a parameter without a gradient untouched
            return
        raise NonFiniteError(self.message(step, bad, loss, penalty, gnorm))

    def message(self, step: int, bad: list[str], loss: float, penalty: float, gnorm: float) -> str:
        cfg = getattr(self.trainer, "method_config", None)
        lr = cfg.train.lr if cfg is not None else self.trainer.args.learning_rate
        lam = getattr(self.trainer, "anchor_weight", None)
        what = f"{' and '.join(bad)} not finite (loss {loss:.4g}, R {penalty:.4g}, grad norm {gnorm:.4g})"
        at_start = step == 1  # (after a resume, first_loss is this session's first: no history before it)
        history = (f"step-1 loss {self.first_loss:.4g}, last finite {self.last_finite_loss:.4g}; "
                   if self.first_loss is not None else "")
        if "anchor penalty R" in bad and at_start:
            cause = ("the anchor's bases are wrong at the first step: delete the bases cache (anchor.cache_dir, "
                     "default <RPSFT_CACHE>/bases) and run again")
        elif "anchor penalty R" in bad:
            cause = f"the weights ran away from W0: lower anchor.lam (λ={lam}) or train.lr ({lr})"
        elif at_start:
            cause = "the first batch already gives it: check the data (empty or garbled rows) and the model weights"
        elif "loss" in bad or (math.isfinite(loss) and self.first_loss is not None
                               and loss > 100 * max(abs(self.first_loss), 1e-8)):
            cause = f"the loss diverged ({history}lower train.lr ({lr}))"
        else:
            cause = f"the gradient overflowed: lower train.lr ({lr}) or set train.max_grad_norm"
        skipped = f"; {self.skipped} earlier step(s) skipped (train.nan_max_skips={self.max_skips})" \
            if self.policy == "skip" else ""
        last = latest_complete(self.run_dir)[0] if self.run_dir is not None else None
        kept = f"; last finite checkpoint kept: {last}" if last is not None else "; no checkpoint was written"
        if self._deepspeed_engine() is not None:  # DeepSpeed stepped inside backward, before this check (module doc)
            return (f"training stopped at step {step}: {what}. Likely cause: {cause}. DeepSpeed had already run "
                    f"this step's optimizer update inside backward (its overflow check decides whether the weights "
                    f"in memory took it); no checkpoint holds this step{kept}")
        return (f"training stopped at step {step}: {what}. Likely cause: {cause}. The weights were not updated with "
                f"it{kept}{skipped} (train.nan_policy=skip skips such steps instead)")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # A finite gradient can still take a weight to inf; never let a checkpoint hold one.
        if control.should_save and model is not None:
            for name, p in model.named_parameters():
                if not bool(torch.isfinite(p.detach()).all()):
                    raise NonFiniteError(f"training stopped at step {state.global_step}: weight {name} is not finite "
                                         f"after the update; lower train.lr. Nothing was saved for this step")


# ------------------------------------------------------------------------------------ complete checkpoints
def file_mode() -> int:
    """The mode a plain ``open()`` gives a new file under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fix_modes(root: str | Path) -> None:
    """Give files under ``root`` (or the file ``root``) the umask's mode; some writers create them 0600."""
    root = Path(root)
    mode = file_mode()
    for p in [root] if root.is_file() else root.rglob("*"):
        if p.is_file() and (p.stat().st_mode & 0o777) != mode:
            try:
                p.chmod(mode)
            except OSError:
                pass


class CheckpointSealer(TrainerCallback):
    """Marks ``checkpoint-N`` complete once Trainer has written all of it (``on_save`` runs after the save), then
    keeps the newest ``keep`` sealed checkpoints (:func:`rotate_checkpoints`; None: all).

    The rotation is ours, not Trainer's (``save_total_limit`` is passed to it as None): Trainer rotates inside
    ``_save_checkpoint``, before ``on_save`` seals the new checkpoint, and ranks checkpoints by mtime (by step when
    mtimes are within a second) without knowing which are complete, so it could delete the last sealed checkpoint
    while the newest one is still unsealed, or keep a torn leftover of a killed session and delete a sound one."""

    def __init__(self, keep: int | None = None):
        self.keep = keep

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir():
            fix_modes(ckpt)
            from .fileio import write_text

            write_text(ckpt / COMPLETE, json.dumps({"global_step": state.global_step}) + "\n")
            fix_modes(ckpt / COMPLETE)
        if self.keep is not None:
            rotate_checkpoints(args.output_dir, self.keep, protect=best_checkpoint(args, state))


def _step(p: Path) -> int:
    return int(p.name.split("-")[-1])


def checkpoint_state(ckpt: Path) -> dict:
    """trainer_state.json of ``ckpt``; a missing or torn one is a :class:`CheckpointError` naming its path."""
    path = Path(ckpt) / "trainer_state.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {ckpt} is not a complete checkpoint")
    try:
        state = json.loads(path.read_text())
        int(state["global_step"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is torn or corrupt ({type(e).__name__}: {e}); resume from an earlier "
                              "checkpoint-N, or start again with --overwrite") from None
    return state


def is_complete(ckpt: Path, marked_run: bool) -> bool:
    """Marked complete (in a run that writes markers) and with a readable trainer_state.json."""
    if marked_run and not (ckpt / COMPLETE).is_file():
        return False
    try:
        checkpoint_state(ckpt)
    except CheckpointError:
        return False
    return True


def latest_complete(output_dir: str | Path | None) -> tuple[Path | None, list[Path]]:
    """The newest complete ``checkpoint-N`` in ``output_dir`` and the newer, incomplete ones it skipped."""
    if output_dir is None:
        return None, []
    ckpts = checkpoint_dirs(output_dir)
    marked = any((p / COMPLETE).is_file() for p in ckpts)
    skipped = []
    for p in ckpts:
        if is_complete(p, marked):
            return p, skipped
        skipped.append(p)
    return None, skipped


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Every ``checkpoint-N`` directory in ``output_dir``, newest step first."""
    return sorted((p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                  key=_step, reverse=True)


# ----------------------------------------------------------------------- checkpoint rotation and disk use
# What Trainer (transformers 5) writes into checkpoint-N besides the weights, trainer_state.json, the RNG states and
# rpsft_budget.json: the optimizer state (torch: optimizer.pt; accelerate FSDP: optimizer.bin or an optimizer_0/
# directory; XLA FSDP: rank*-of-*-optimizer.pt), the LR scheduler and the AMP grad scaler. For an AdamW run in fp32
# this is twice the weights (the two moments), so a checkpoint is three times the model.
OPTIMIZER_STATE = ("optimizer*", "rank*-of-*-optimizer.pt", "scheduler.pt", "scaler.pt")
# DeepSpeed: global_stepN/ holds the ZeRO optimizer partitions (and its own copy of the model states), `latest` names
# it and zero_to_fp32.py rebuilds fp32 weights from it.
DEEPSPEED_STATE = ("global_step*", "latest", "zero_to_fp32.py")
WEIGHTS = ("model.safetensors", "model-*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
           "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


def _nbytes(p: Path) -> int:
    """Bytes of the file ``p`` or of every file under the directory ``p`` (symbolic links not followed)."""
    if p.is_symlink():
        return 0
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def _optimizer_entries(ckpt: Path) -> list[Path]:
    """The optimizer, scheduler and scaler state in ``ckpt``: what :func:`drop_optimizer_state` deletes."""
    entries = list(ckpt.iterdir())
    deepspeed = [p for p in entries if _matches(p.name, DEEPSPEED_STATE)]
    if deepspeed and not any(p.is_file() and _matches(p.name, WEIGHTS) for p in entries):
        return []  # ZeRO-3 without gathered 16-bit weights: global_stepN/ is the only copy of the model, keep it all
    return [p for p in entries if _matches(p.name, OPTIMIZER_STATE)] + deepspeed


def _holds_optimizer_state(ckpt: Path) -> bool:
    return any(_matches(p.name, OPTIMIZER_STATE + DEEPSPEED_STATE) for p in ckpt.iterdir())


def best_checkpoint(args, state) -> tuple[str, ...]:
    """The best checkpoint, when Trainer loads it at the end of training (``load_best_model_at_end``)."""
    best = getattr(state, "best_model_checkpoint", None)
    return (best,) if best and getattr(args, "load_best_model_at_end", False) else ()


def rotate_checkpoints(output_dir: str | Path, keep: int | None, protect: tuple | list = ()) -> list[Path]:
    """Keep the newest ``keep`` complete (sealed) checkpoints of ``output_dir`` (``train.save_total_limit``; None:
    keep every checkpoint) and delete the older ones; returns what was deleted.

    Only complete checkpoints count, in step order: an incomplete one newer than the newest complete one (a
    leftover of a killed session, re-written when the run gets there again) is left alone and never makes a
    complete one go; an incomplete one older than it can never be resumed from and is deleted. ``protect`` names
    checkpoints kept whatever their age (the best one, when Trainer loads it at the end)."""
    if keep is None:
        return []
    if keep < 1:
        raise ValueError(f"train.save_total_limit must be >= 1 or null (keep all), got {keep}")
    ckpts = checkpoint_dirs(output_dir)
    marked = any((p / COMPLETE).is_file() for p in ckpts)
    complete = [p for p in ckpts if is_complete(p, marked)]
    if not complete:
        return []
    kept = {p.name for p in complete[:keep]} | {Path(p).name for p in protect}
    newest = _step(complete[0])
    doomed = [p for p in ckpts if p.name not in kept and (p in complete or _step(p) < newest)]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def drop_optimizer_state(ckpt: str | Path) -> int:
    """Delete the optimizer, scheduler and scaler state of the complete checkpoint ``ckpt`` and record that in its
    seal (``"optimizer_state": "deleted"``, which :func:`check_resumable` reads); returns the bytes freed."""
    ckpt = Path(ckpt)
    entries = _optimizer_entries(ckpt)
    if not entries:
        return 0
    freed = sum(_nbytes(p) for p in entries)
    for p in entries:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    from .fileio import write_text

    seal = ckpt / COMPLETE
    try:
        info = json.loads(seal.read_text()) if seal.is_file() else {}
    except ValueError:
        info = {}
    info = {**(info if isinstance(info, dict) else {}), "global_step": _step(ckpt), "optimizer_state": "deleted"}
    write_text(seal, json.dumps(info) + "\n")
    fix_modes(seal)
    return freed


def finish_checkpoints(output_dir: str | Path, keep: int | None, keep_optimizer_state: bool,
                       protect: tuple | list = ()) -> int:
    """The checkpoints of a run that reached its last step: the newest ``keep`` complete ones (None: all of them,
    incomplete ones too) and, unless ``keep_optimizer_state``, without their optimizer state. Incomplete ones are
    deleted when ``keep`` is set: nothing resumes from them once the run is finished. Returns the bytes freed."""
    before = sum(_nbytes(p) for p in checkpoint_dirs(output_dir))
    rotate_checkpoints(output_dir, keep, protect)
    marked = any((p / COMPLETE).is_file() for p in checkpoint_dirs(output_dir))
    for p in checkpoint_dirs(output_dir):
        if not is_complete(p, marked):
            if keep is not None:
                shutil.rmtree(p, ignore_errors=True)
        elif not keep_optimizer_state:
            drop_optimizer_state(p)
    return before - sum(_nbytes(p) for p in checkpoint_dirs(output_dir))


def optimizer_state_deleted(ckpt: str | Path) -> bool:
    """Whether :func:`drop_optimizer_state` emptied ``ckpt`` (as its seal records)."""
    seal = Path(ckpt) / COMPLETE
    try:
        info = json.loads(seal.read_text()) if seal.is_file() else {}
    except ValueError:
        return False
    return isinstance(info, dict) and info.get("optimizer_state") == "deleted"


def check_resumable(ckpt: str | Path, max_steps: int = -1) -> None:
    """Refuse to train on from ``ckpt`` when its optimizer state was deleted at the end of its run and steps are
    left to take (``max_steps``; <= 0: the total recorded in the checkpoint). Trainer would go on with fresh AdamW
    moments and a restarted learning-rate schedule without a word, and the loss curve would not be the one an
    uninterrupted run of that length draws. With no step left, resuming only rewrites the run's summary."""
    ckpt = Path(ckpt)
    if not optimizer_state_deleted(ckpt):
        return
    state = checkpoint_state(ckpt)
    step = int(state["global_step"])
    total = max_steps if max_steps > 0 else int(state.get("max_steps") or 0)
    if total <= step:
        return
    raise CheckpointError(f"cannot resume {ckpt} to step {total}: its run finished at step {step} and the "
                          "optimizer state was deleted then (train.keep_optimizer_state=false), so training on would "
                          "restart AdamW and the learning-rate schedule; a run can be extended only if it was "
                          "trained with --set train.keep_optimizer_state=true, otherwise start a new run from its "
                          f"weights ({ckpt.parent})")


# Files that exist only while a run is live: the run-directory lock, a JSON write's temp file.
TRANSIENT = (".rpsft.lock", ".*.tmp")


def disk_use(output_dir: str | Path) -> dict:
    """Bytes in the run directory: in all, the final model's weight files, a merged export, each checkpoint (and
    whether it still holds optimizer state). Apparent file sizes, as ``du --apparent-size`` counts them."""
    out = Path(output_dir)
    entries = [p for p in out.iterdir() if not _matches(p.name, TRANSIENT)] if out.is_dir() else []
    disk = {"bytes": sum(_nbytes(p) for p in entries),
            "model_bytes": sum(_nbytes(p) for p in entries if p.is_file() and _matches(p.name, WEIGHTS)),
            "checkpoints": {p.name: {"bytes": _nbytes(p), "optimizer_state": _holds_optimizer_state(p)}
                            for p in reversed(checkpoint_dirs(out))}}
    if (out / "merged").is_dir():
        disk["merged_bytes"] = _nbytes(out / "merged")
    return disk


def human_bytes(n: int) -> str:
    """``n`` bytes in binary units, three significant figures at most (``514 MiB``, ``1.5 GiB``, ``12.3 KiB``)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if v >= 100 else f"{v:.1f} {unit}"
    return f"{n} B"


def disk_line(disk: dict, output_dir: str | Path) -> str:
    """One line for the end of a run: ``disk: 1.0 GiB in runs/demo (model 514 MiB, checkpoint-18 514 MiB without
    optimizer state, other 3.5 MiB)``."""
    parts = [f"model {human_bytes(disk['model_bytes'])}"]
    if "merged_bytes" in disk:
        parts.append(f"merged {human_bytes(disk['merged_bytes'])}")
    for name, c in disk["checkpoints"].items():
        parts.append(f"{name} {human_bytes(c['bytes'])} {'with' if c['optimizer_state'] else 'without'} "
                     "optimizer state")
    other = disk["bytes"] - disk["model_bytes"] - disk.get("merged_bytes", 0) \
        - sum(c["bytes"] for c in disk["checkpoints"].values())
    parts.append(f"other {human_bytes(other)}")
    return f"disk: {human_bytes(disk['bytes'])} in {output_dir} ({', '.join(parts)})"


# --------------------------------------------------------------------------------------------- safe overwrite
# What `rpsft train` (and Trainer / TRL / PEFT under it) writes into a run directory.
RUN_FILES = ("config.yaml", "run.json", "metrics.jsonl", "config.json", "generation_config.json", "model.safetensors",
             "model-*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "tokenizer.json",
             "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "chat_template.jinja",
             "vocab.json", "merges.txt", "added_tokens.json", "training_args.bin", "adapter_config.json",
             "adapter_model.safetensors", "*.log", ".*.tmp")
RUN_DIRS = ("checkpoint-*", "merged", "runs", "logs", "wandb", "mlruns", "eval", "eval-init")  # trackers; rpsft rl


def _written_by_run(p: Path) -> bool:
    if p.is_dir():
        return any(fnmatch.fnmatchcase(p.name, pat) for pat in RUN_DIRS)
    if p.name == "README.md":  # the model card Trainer writes starts with YAML front matter
        try:
            return p.read_text(errors="replace").startswith("---")
        except OSError:
            return False
    return any(fnmatch.fnmatchcase(p.name, pat) for pat in RUN_FILES)


def clear_run_dir(out: Path, mode: bool | str) -> None:
    """``--overwrite``: delete what a run writes in ``out``; anything else is refused unless ``mode == "all"``."""
    if not out.exists():
        return
    from .runlock import LOCK_NAME

    # the run lock is this run's own (runlock.py): deleting it, even with "all", would let a second process in
    entries = sorted(p for p in out.iterdir() if p.name != LOCK_NAME)
    foreign = [p for p in entries if not _written_by_run(p)] if str(mode) != "all" else []
    if foreign:
        names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in foreign[:8])
        more = f" and {len(foreign) - 8} more" if len(foreign) > 8 else ""
        raise FileExistsError(f"--overwrite refuses to delete {out}: it also holds files a run does not write "
                              f"({names}{more}); move them, choose another output_dir, or pass --overwrite-all "
                              "to delete the whole directory")
    for p in entries:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


# ------------------------------------------------------------------------------------------ run summaries
def whole_run_loss(metrics_path: str | Path) -> float | None:
    """Mean task loss over every step of the run, across resumes, from metrics.jsonl: each logged ``loss`` is the
    mean over the steps since the previous log line, so it is weighted by that window's length."""
    from .fileio import read_jsonl

    rows = [r for r in read_jsonl(metrics_path) if isinstance(r.get("loss"), (int, float))]
    total, steps, prev = 0.0, 0, 0
    for r in sorted(rows, key=lambda r: r.get("step", 0)):
        w = int(r.get("step", 0)) - prev
        if w <= 0:
            continue
        total += float(r["loss"]) * w
        steps += w
        prev = int(r["step"])
    return total / steps if steps else None
