"""``AnchorMixin``: the one place the rotation anchor meets a ``transformers.Trainer`` (any subclass: TRL's
``SFTTrainer``, ``GRPOTrainer``, ``DPOTrainer``, ...).

Usage::

    class MyTrainer(AnchorMixin, transformers.Trainer): ...
    MyTrainer(model=..., args=..., anchor=RotationAnchor.from_model(model, rank=64), anchor_weight=1.0)

Where the anchor goes (Algorithm 1). The paper's objective per optimizer step is L_task + λ·R. Adding λ·R to every
micro-batch loss (the authors' way) builds an autograd graph for R and recomputes it grad_accum times. R does not
depend on the batch, so its gradient is the same closed form 2λ·U_k A V_kᵀ whatever the batch: we add it to
``.grad`` once, on the last micro-batch of each accumulation window — after every micro-batch's backward (and,
under DDP, after the all-reduce that backward performs) and before ``Trainer`` clips gradients. That is exactly
the gradient of L_task + λR (tests/test_train.py checks parameters after a step against the per-micro-batch
form), at ≈ 4·m·n·k FLOP per matrix per step instead of grad_accum autograd passes.

Why a ``training_step`` override and not a callback: ``on_pre_optimizer_step`` fires *after* clipping in
transformers 5, and the clipped gradient must include the anchor. ``training_step`` is the documented override
point, and ``accelerator.sync_gradients`` tells us it is the last micro-batch of the window.

Under DeepSpeed ZeRO-1/2 DeepSpeed owns the gradient buffers, so λR is added to the loss of the window's last
micro-batch instead (``compute_loss``, autograd mode); ZeRO-3 partitions the weights themselves and is refused.
Both overrides call ``super()``, so they compose with a trainer's own ``compute_loss``/``training_step`` (TRL's
GRPOTrainer times its steps in ``training_step`` and computes its DAPO loss in ``compute_loss``).

The hard budget (``anchor.budget_form=ball``, :class:`rpsft.budget.BallBudget`) acts on the weights, not the
gradient: it projects them back into d ≤ ε right *after* ``optimizer.step()``, from the ``on_optimizer_step``
callback, which transformers 5 fires on every process after every optimizer step (before the scheduler, logging
and checkpointing, so a saved checkpoint holds projected weights). No penalty pass runs then (λ = 0). Under
DeepSpeed the weights the optimizer updates are its own fp32 masters, out of reach: refused.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback
from trl import SFTTrainer

from .anchor import RotationAnchor
from .budget import BALL_DEEPSPEED, BudgetController, BudgetStateCallback, weighted_sum


class BallProjection(TrainerCallback):
    """After every optimizer step, on every process: the trainer's ball budget projects its anchored blocks."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        t = self.trainer
        t.anchor_budget.project(t.anchor, t.anchor_model())


def drop_tied_copies(model, state_dict: dict) -> dict:
    """``state_dict`` without the tied weights' second names (``model.all_tied_weights_keys``, target -> source:
    ``lm_head.weight`` -> ``model.embed_tokens.weight`` where the config ties them) whose tensor equals the source's,
    as ``save_pretrained`` leaves a model whose tied weights share storage. A copy that differs is kept: dropping it
    would lose what was trained."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    drop = {target for target, source in tied.items()
            if isinstance(state_dict.get(target), torch.Tensor) and isinstance(state_dict.get(source), torch.Tensor)
            and torch.equal(state_dict[target], state_dict[source])}
    return {k: v for k, v in state_dict.items() if k not in drop} if drop else state_dict


class AnchorMixin:
    """A :class:`RotationAnchor` applied once per optimizer step (every ``anchor_period`` steps) by any Trainer.

    Keywords: ``anchor`` (None or an empty anchor: a plain trainer), ``anchor_weight`` (λ of Eq. 4, a float or a
    per-type mapping), ``anchor_period`` (Algorithm 1's s), ``anchor_mode`` (auto | closed_form | autograd) and
    ``anchor_budget`` (a :class:`rpsft.budget.BudgetController` that adapts λ). Logs ``rpsft/penalty`` (R),
    ``rpsft/weighted_penalty`` (λ·R), ``rpsft/lambda`` and ``rpsft/drift/<type>`` with the trainer's loss. Being the
    class every rpsft trainer shares, it also saves FSDP's gathered state dicts without tied copies
    (:func:`drop_tied_copies`)."""

    def __init__(self, *args, anchor: RotationAnchor | None = None, anchor_weight: float = 1.0,
                 anchor_period: int = 1, anchor_mode: str = "auto", anchor_budget: BudgetController | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.anchor = anchor if anchor is not None and len(anchor) else None
        self.anchor_weight = float(anchor_weight)
        self.anchor_period = int(anchor_period)
        self.anchor_mode = self._resolve_mode(anchor_mode)
        self._penalties: list[float] = []
        self._drift: dict[str, float] = {}
        self._last_logged_step = 0
        # rotation budget (rpsft.budget): λ adapted each anchored step from the drift that pass measured
        self.anchor_budget = anchor_budget if self.anchor is not None else None
        self._weighted: list[float] = []  # λ_t·R_t of each anchored step (λ varies under a budget)
        if self.anchor_budget is not None:
            self.anchor_weight = self.anchor_budget.weight(self.anchor.terms)  # 0 for the ball: no penalty pass
            self.add_callback(BudgetStateCallback(self.anchor_budget))  # its state goes into every checkpoint
            if self.anchor_budget.form == "ball":
                self._check_ball()
                self.add_callback(BallProjection(self))

    def _check_ball(self) -> None:
        """The ball rewrites dense weights after the optimizer step: refuse where that cannot reach them."""
        if getattr(self.accelerator.state, "deepspeed_plugin", None) is not None:
            raise ValueError(BALL_DEEPSPEED)
        if not hasattr(self.anchor, "project_ball_"):
            raise ValueError(f"anchor.budget_form=ball projects dense weights, and this anchor "
                             f"({type(self.anchor).__name__}) is not on them (an adapter's W0 + s·BA); use "
                             "anchor.budget_form=penalty")

    def restore_anchor_budget(self, checkpoint) -> bool:
        """Continue the budget's λ trajectory from a checkpoint directory (False: no budget, or none saved there)."""
        if self.anchor_budget is None or not self.anchor_budget.load(checkpoint):
            return False
        self.anchor_weight = self.anchor_budget.weight(self.anchor.terms)
        return True

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # A state dict gathered by FSDP (FULL_STATE_DICT) holds a tied weight twice, as two copies; save_pretrained
        # drops tied duplicates by storage pointer only, so every export would carry lm_head.weight beside the
        # embedding it is tied to (twice the file for SmolLM2 or Qwen2.5-3B, equal values).
        if state_dict:
            state_dict = drop_tied_copies(self.accelerator.unwrap_model(self.model), state_dict)
        super()._save(output_dir, state_dict=state_dict)

    def _resolve_mode(self, mode: str) -> str:
        """closed_form everywhere ∇R can be added to .grad; autograd under DeepSpeed ZeRO-1/2; ZeRO-3 refused."""
        if self.anchor is None:
            return mode
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is not None:
            if getattr(plugin, "zero_stage", 0) == 3:
                raise NotImplementedError(
                    "DeepSpeed ZeRO-3 partitions the weights themselves; the rotation anchor needs full matrices (or "
                    "FSDP2 row shards). Use ZeRO-2 (configs/accelerate/zero2.yaml) or FSDP2 (fsdp2.yaml).")
            if mode == "closed_form":
                raise NotImplementedError("anchor.mode=closed_form adds to .grad, which DeepSpeed does not read; use "
                                          "anchor.mode=auto (autograd under DeepSpeed)")
            return "autograd"  # DeepSpeed owns the gradient buffers: let it differentiate λR like any loss term
        return "closed_form" if mode == "auto" else mode

    def anchor_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def anchor_final_penalty(self) -> float | None:
        """R = Σ‖U_kᵀ(W−W0)V_k‖²_F (Eq. 3) of the current weights, from ``drift()``: works on FSDP2 shards too (every
        rank takes part in its all-reduce), where ``penalty()`` (the autograd path) does not."""
        if self.anchor is None:
            return None
        return sum(v["abs"] ** 2 for v in self.anchor.drift(self.anchor_model()).values())

    def _anchor_due(self) -> bool:
        return (self.anchor is not None and self.anchor_weight != 0.0 and self.accelerator.sync_gradients
                and self.state.global_step % self.anchor_period == 0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self.anchor_mode != "autograd" or not self._anchor_due() or not model.training:
            return out
        # λR enters once per window, on its last micro-batch. Trainer divides a loss by the window length unless it
        # is already normalised by num_items_in_batch; c undoes that so the window's total is L_task + λR.
        scaled = self.loss_is_scaled_for_ga if self.loss_is_scaled_for_ga is not None else (
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)
        c = 1 if scaled else self.current_gradient_accumulation_steps
        w = self.anchor_weight
        r = self.anchor.penalty(self.anchor_model(), record=True, weight=w if isinstance(w, dict) else None)
        if isinstance(w, dict):  # r is already Σ λ_i R_i
            w = 1.0
        self._penalties.append(sum(self.anchor.last_sq.values()))  # recorded with one host sync, not another
        self._after_anchor()
        extra = (w * c) * r.to(out[0].dtype if return_outputs else out.dtype)
        return (out[0] + extra, out[1]) if return_outputs else out + extra

    def training_step(self, model, inputs, num_items_in_batch=None):
        due = self.anchor_mode == "closed_form" and self._anchor_due()
        loss = super().training_step(model, inputs, num_items_in_batch)
        if due:
            r = self.anchor.accumulate_grad_(self.anchor_model(), self.anchor_weight)
            self._penalties.append(r)
            self._after_anchor()
        return loss

    def _after_anchor(self) -> None:
        """Bookkeeping after each anchor pass: drift per type, λ·R for the log, and the budget's λ for the next."""
        self._drift = self.anchor.relative_drift_by_type()
        self._weighted.append(weighted_sum(self.anchor_weight, self.anchor.last_sq))
        if self.anchor_budget is not None:
            self.anchor_weight = self.anchor_budget.update(self.anchor)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._penalties:
            if self.anchor_mode == "autograd":
                # Trainer's logged loss is the mean over the logging window of each step's total, which here
                # includes λR: take it out, so "loss" is the task loss in both modes (as with SFT and closed_form).
                window = max(self.state.global_step - self._last_logged_step, 1)
                logs["loss"] = round(logs["loss"] - sum(self._weighted) / window, 6)
            r = sum(self._penalties) / len(self._penalties)
            logs["rpsft/penalty"] = r
            logs["rpsft/weighted_penalty"] = sum(self._weighted) / len(self._weighted)
            if self.anchor_budget is None:  # with a budget, log_values() below gives λ (per type with scope=type)
                logs["rpsft/lambda"] = self.anchor_weight
            for t, v in self._drift.items():
                logs[f"rpsft/drift/{t}"] = v
            self._penalties.clear()
            self._weighted.clear()
        if "loss" in logs and self.anchor_budget is not None:
            logs.update(self.anchor_budget.log_values())
        if "loss" in logs:
            self._last_logged_step = self.state.global_step
        super().log(logs, start_time)


class AnchoredSFTTrainer(AnchorMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` + a :class:`RotationAnchor` (:class:`AnchorMixin`); ``method_config`` is the full run
    config, for methods with options of their own (IW-SFT's temperature, the finite guard's message)."""

    def __init__(self, *args, method_config=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.method_config = method_config
