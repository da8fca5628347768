"""Importance-weighted SFT (IW-SFT; paper App. D baseline, authors' defaults T = 1, w_max = 16).

Each sequence's token NLL is scaled by a weight from the current model θ and the frozen initial model (reference):

    w_i = min(exp(T · mean_{t ∈ completion_i}[log p_θ(y_t) − log p_ref(y_t)]), w_max)
    L   = (1/N) · Σ_i w_i · Σ_{t ∈ completion_i} −log p_θ(y_t)        (N: completion tokens of the accumulation window)

so with w ≡ 1 it is exactly TRL's token-averaged NLL, and it uses TRL's batching as is: the prompt and padding
positions (labels −100) are outside every sum, both for the mean in w_i and for the loss.

Detach (``iw.detach``, default true): w_i is a stop-gradient weight. Without the detach, d/dθ of w·NLL_i adds
NLL_i·∇w_i = −w_i·T·(NLL_i/n_i)·∇NLL_i, so the total gradient is w_i·(1 − T·mean-NLL_i)·∇NLL_i: for any sequence
whose mean token NLL exceeds 1/T nats (a typical SFT sequence early in training) the sign flips and the step
*lowers* the likelihood of the demonstration — the hard examples are pushed away rather than learned. Detached, the
gradient is w_i·∇NLL_i, a re-weighting of the ordinary SFT gradient, which is what an importance weight is for.
(The authors' code does not detach; ``iw.detach=false`` reproduces that, and tests check both gradients.)

Memory: one frozen copy of the initial model (the reference) in the dtype the model was loaded in, placed like the
policy (``place_reference``). Under FSDP2 it is sharded the same way, so each of N ranks holds 1/N of it (a 7B model
loaded in fp32: 30.5 GB in all, 3.8 GB per rank on 8 GPUs) plus, while its forward runs, the bf16 gather of one
decoder layer at a time; under DeepSpeed a copy in the engine's precision (≈ 15 GB at 7B in bf16; sharded under
ZeRO-3); on one process or under DDP a whole copy on every process (0.54 GB for SmolLM2-135M in fp32, 30.5 GB for a
7B model in fp32). Its forward runs in the policy's compute dtype (FSDP2's bf16 param_dtype, or the accelerator's
autocast), so at the initial weights its log-probs are the policy's own and w = 1 (exactly, in the CPU tests).
Compute: one extra no-grad forward per micro-batch (≈ +1/3 of a step's compute).
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch

from . import Method, register


def sequence_log_ratio(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean_t[log p_θ − log p_ref] over the masked (completion) tokens of each row; 0 for a row without any."""
    m = mask.to(log_probs.dtype)
    return ((log_probs - ref_log_probs) * m).sum(-1) / m.sum(-1).clamp(min=1)


def iw_weights(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
               w_max: float = 16.0) -> torch.Tensor:
    """w_i = min(exp(T · mean_t[log p_θ − log p_ref]), w_max), computed in log space (no overflow before the clamp)."""
    log_w = temperature * sequence_log_ratio(log_probs, ref_log_probs, mask)
    return torch.exp(torch.clamp(log_w, max=math.log(w_max)))


def iw_loss(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
            w_max: float = 16.0, detach: bool = True, num_items_in_batch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, w) for per-token log-probs of shape (batch, seq) (zero where the label is −100) and the label mask."""
    w = iw_weights(log_probs, ref_log_probs.detach(), mask, temperature, w_max)
    if detach:
        w = w.detach()
    nll = -(log_probs * mask.to(log_probs.dtype)).sum(-1)  # per-sequence summed NLL
    n = mask.sum() if num_items_in_batch is None else num_items_in_batch
    return (w * nll).sum() / torch.as_tensor(n, device=nll.device).clamp(min=1), w


def place_reference(ref: torch.nn.Module, accelerator) -> tuple[torch.nn.Module, bool]:
    """Place the frozen reference like the policy, so its forward runs in the policy's compute dtype and, where the
    policy is sharded, the reference is too; returns (reference, whether its forward needs the accelerator's
    autocast).

    FSDP2: accelerate's own ``fsdp2_prepare_model`` with the policy's plugin (one unit per decoder layer, the same
    mixed-precision policy and mesh), so each rank keeps 1/N of the weights and the forward gathers one unit at a
    time in the compute dtype (bf16 under bf16 mixed precision); every unit, the root included, frees its gathered
    weights after the forward, since no backward follows. DeepSpeed: TRL's ``prepare_deepspeed`` (sharded under
    ZeRO-3, a copy in the engine's precision otherwise); FSDP v1: TRL's ``prepare_fsdp``. One process or DDP: the
    whole model on this process's device, run under the accelerator's autocast like the policy. The policy itself
    is not touched; ``ref`` must be a separate copy."""
    ref.eval().requires_grad_(False)
    state = accelerator.state
    if getattr(state, "deepspeed_plugin", None) is not None:
        from trl.models.utils import prepare_deepspeed

        return prepare_deepspeed(ref, accelerator), False
    if accelerator.is_fsdp2:
        from accelerate.utils import fsdp2_prepare_model

        ref = fsdp2_prepare_model(accelerator, ref)
        ref.set_reshard_after_forward(True)  # FSDP2 keeps the root's weights gathered for a backward otherwise
        return ref, False
    if getattr(state, "fsdp_plugin", None) is not None:
        from trl.models.utils import prepare_fsdp

        return prepare_fsdp(ref, accelerator), False
    return ref.to(accelerator.device), True


def _trainer_class():
    from ..config import ConfigError, IWSection
    from ..train import AnchoredSFTTrainer

    class IWSFTTrainer(AnchoredSFTTrainer):
        """AnchoredSFTTrainer whose training loss is the IW-SFT loss against a frozen copy of the initial model."""

        def __init__(self, *args, **kwargs):
            model = kwargs.get("model", args[0] if args else None)
            if not isinstance(model, torch.nn.Module):
                raise TypeError("IW-SFT needs a model object (the reference is a frozen copy of it), not a name")
            # the reference is taken before training touches the weights; on --resume it is still the initial model
            ref = copy.deepcopy(model).eval().requires_grad_(False)
            super().__init__(*args, **kwargs)
            cfg = self.method_config.iw if self.method_config is not None else IWSection()
            if cfg.temperature <= 0:
                raise ConfigError(f"iw.temperature must be > 0, got {cfg.temperature}")
            if cfg.w_max < 1:
                raise ConfigError(f"iw.w_max must be >= 1 (it caps weights whose baseline is 1), got {cfg.w_max}")
            if self.args.loss_type != "nll":
                raise ConfigError(f"method=iw defines its own loss; train.loss_type={self.args.loss_type!r} cannot be "
                                  "combined with it — set train.loss_type=nll (or use method=dft)")
            if self.args.packing or self.args.padding_free:
                raise ConfigError("method=iw weighs whole sequences; packing / padding-free batches mix sequences "
                                  "in one row — turn them off")
            from trl.trainer.utils import add_fused_lm_head

            add_fused_lm_head(ref, outputs=("log_probs",))
            self.ref_model, self._ref_autocast = place_reference(ref, self.accelerator)
            self.iw = cfg

        def _ref_log_probs(self, inputs) -> torch.Tensor:
            # the policy's own compute dtype: FSDP2's param_dtype / DeepSpeed's cast are in the placed model itself;
            # one process and DDP run the policy under the accelerator's autocast, so the reference runs under it too
            ctx = self.accelerator.autocast() if self._ref_autocast else contextlib.nullcontext()
            with torch.no_grad(), ctx:
                return self.ref_model(**inputs, fused_lm_head=True).log_probs

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not model.training:  # evaluation reports the plain NLL
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs["use_cache"] = False
            outputs = model(**inputs, fused_lm_head=True)
            ref_lp = self._ref_log_probs(inputs)
            loss, w = iw_loss(outputs.log_probs, ref_lp, outputs.label_mask, self.iw.temperature, self.iw.w_max,
                              self.iw.detach, num_items_in_batch)
            # like TRL: num_items_in_batch counts every rank's tokens and DDP averages gradients across ranks
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            self._log_metrics(inputs, outputs, w)
            return (loss, outputs) if return_outputs else loss

        def _log_metrics(self, inputs, outputs, w):
            gather = self.accelerator.gather_for_metrics
            metrics = self._metrics["train"]
            valid = outputs.label_mask.any(-1)
            w = w.detach()[valid]
            # fixed-size per-rank stats (rows with completion tokens differ across ranks): count, Σw, #clamped, max
            stats = torch.stack([w.new_tensor(float(w.numel())), w.sum(), (w >= self.iw.w_max * (1 - 1e-6)).sum().to(w.dtype),
                                 w.max() if w.numel() else w.new_tensor(0.0)])
            stats = gather(stats[None]).reshape(-1, 4)
            n = stats[:, 0].sum()
            if n > 0:
                metrics["iw/weight_mean"].append((stats[:, 1].sum() / n).item())
                metrics["iw/weight_max"].append(stats[:, 3].max().item())
                metrics["iw/clamped_frac"].append((stats[:, 2].sum() / n).item())
            # the same entropy / accuracy / token metrics TRL's compute_loss logs
            num_valid = gather(outputs.label_mask.sum()).sum()
            if num_valid > 0:
                metrics["entropy"].append((gather(outputs.entropy.detach().sum()).sum() / num_valid).item())
                metrics["mean_token_accuracy"].append((gather(outputs.is_top1.sum()).sum() / num_valid).item())
            if "attention_mask" in inputs:
                self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
            metrics["num_tokens"] = [self._total_train_tokens]

    return IWSFTTrainer


register(Method("iw", "importance-weighted SFT vs the frozen initial model (T=1, w_max=16, detached w)",
                anchor="optional", trainer_class=_trainer_class,
                extra_memory="a frozen copy of the initial model (the reference; 1/N of it per rank under FSDP2, "
                             "whole under DDP) + one no-grad forward per batch"))
