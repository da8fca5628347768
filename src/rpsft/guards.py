"""Run safety: the finite guard, complete-checkpoint markers, safe overwrite and whole-run summaries.

* :class:`FiniteGuard` checks, once per optimizer step and before ``optimizer.step()``, that the task loss of the
  window, the anchor penalty R and the gradient norm are finite. With ``train.nan_policy=stop`` (default) a
  non-finite value ends the run at that step with one line naming the step, what went non-finite and the likely
  cause; the weights are never updated with it, so every checkpoint on disk holds finite weights. With
  ``nan_policy=skip`` the step's gradients are dropped (the optimizer leaves every weight as it was), the step is
  counted (``rpsft/skipped_steps`` in metrics.jsonl) and the run stops once more than ``train.nan_max_skips``
  steps were skipped.
* :class:`CheckpointSealer` writes a ``.rpsft-complete`` marker into ``checkpoint-N`` after Trainer has written
  every file of it (``on_save`` fires after ``_save_checkpoint``), and gives the files the umask's mode.
  :func:`complete_checkpoints` trusts only marked checkpoints, so a kill during a save leaves a checkpoint that
  ``--resume latest`` skips (and says so) instead of one it chokes on.
* :func:`clear_run_dir` is ``--overwrite``: it deletes what a run writes and nothing else.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
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
        self.trainer = trainer
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

    def _checked(self, model, penalty: float) -> tuple[float, float, float]:
        """(window loss, penalty, gradient norm), agreed by every rank: one all-reduce and one host sync per step.

        Summed over ranks so that NaN anywhere is NaN everywhere and all ranks stop at the same step (a rank that
        stopped alone would leave the others waiting in a collective). Under DDP the gradient and penalty are
        replicated, so the printed values are then world-size multiples; only their finiteness is used."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]  # none under DeepSpeed: its own buffers
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP2 shards: squares add up
        device = local[0].device if local else (self._window_loss.device if self._window_loss is not None else "cpu")
        sq = torch.stack([g.float().pow(2).sum() for g in local]).sum() if local else torch.zeros((), device=device)
        loss = self._window_loss.to(device) if self._window_loss is not None else torch.zeros((), device=device)
        v = torch.stack([loss, torch.tensor(penalty, device=device, dtype=torch.float32), sq.float()])
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(v)
        loss_v, pen_v, sq_v = v.tolist()
        return loss_v, pen_v, math.sqrt(sq_v) if sq_v >= 0 else sq_v

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
    """Marks ``checkpoint-N`` complete once Trainer has written all of it (``on_save`` runs after the save)."""

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir():
            fix_modes(ckpt)
            from .fileio import write_text

            write_text(ckpt / COMPLETE, json.dumps({"global_step": state.global_step}) + "\n")
            fix_modes(ckpt / COMPLETE)


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
    ckpts = sorted((p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                   key=_step, reverse=True)
    marked = any((p / COMPLETE).is_file() for p in ckpts)
    skipped = []
    for p in ckpts:
        if is_complete(p, marked):
            return p, skipped
        skipped.append(p)
    return None, skipped


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
    if str(mode) == "all":
        shutil.rmtree(out)
        return
    entries = sorted(out.iterdir())
    foreign = [p for p in entries if not _written_by_run(p)]
    if foreign:
        names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in foreign[:8])
        more = f" and {len(foreign) - 8} more" if len(foreign) > 8 else ""
        raise FileExistsError(f"--overwrite refuses to delete {out}: it also holds files a run does not write "
                              f"({names}{more}); move them, choose another output_dir, or pass --overwrite=all "
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
