"""Checks of an ``accelerate launch`` setup that must run before the model is loaded or the bases are computed.

``accelerate launch`` hands its config file to the processes as environment variables (ACCELERATE_USE_FSDP,
FSDP_*, ACCELERATE_USE_DEEPSPEED, ACCELERATE_MIXED_PRECISION); transformers and accelerate read them only when the
Trainer is built — after the anchor, whose bases take minutes for a 7B model. So the combinations that would fail
there, or silently weaken the anchor, are settled here, at startup:

* ``fsdp_cpu_ram_efficient_loading: true`` is refused: every rank but the first would load the model on the meta
  device and build its anchor from empty weights.
* FSDP's own activation checkpointing and the ``gradient_checkpointing`` training argument cannot both be on
  (transformers raises when the Trainer is built). Resolved automatically: FSDP's is kept (it avoids a redundant
  all-gather in the backward pass) and the training argument is turned off, with a one-line note.
* DeepSpeed ZeRO-2 with bf16 mixed precision casts the module to bf16, so the anchor (autograd path) reads
  bf16-rounded W: drift smaller than one bf16 step (2⁻⁸ relative) is invisible and the penalty at initialisation is
  rounding noise. Warned, pointing to FSDP2, which keeps fp32 weights and casts only inside forward.
"""

from __future__ import annotations

import logging
import os

from .config import ConfigError

log = logging.getLogger("rpsft")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def fsdp_launch() -> dict | None:
    """The FSDP settings of the current ``accelerate launch`` (None when FSDP is not in use)."""
    if not _env_true("ACCELERATE_USE_FSDP"):
        return None
    return {"activation_checkpointing": _env_true("FSDP_ACTIVATION_CHECKPOINTING"),
            "cpu_ram_efficient_loading": _env_true("FSDP_CPU_RAM_EFFICIENT_LOADING"),
            "version": os.environ.get("FSDP_VERSION", "1")}


def check_launch(anchor: bool) -> list[str]:
    """Refuse launch settings the anchor cannot work with; return the warnings issued (also logged)."""
    notes = []
    fsdp = fsdp_launch()
    if fsdp is not None and fsdp["cpu_ram_efficient_loading"]:
        raise ConfigError("fsdp_cpu_ram_efficient_loading is true in the accelerate config: ranks other than 0 "
                          "would load meta (empty) weights and build the anchor from them; set "
                          "fsdp_cpu_ram_efficient_loading: false (configs/accelerate/fsdp2.yaml)")
    deepspeed_bf16 = _env_true("ACCELERATE_USE_DEEPSPEED") and \
        os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower() == "bf16"
    if anchor and deepspeed_bf16:
        notes.append("DeepSpeed with bf16 casts the weights to bf16 (the fp32 masters are partitioned inside its "
                     "optimizer), so the rotation anchor sees bf16-rounded W: drift below one bf16 step (2^-8 "
                     "relative) is invisible to it. For the paper's setting use FSDP2 "
                     "(configs/accelerate/fsdp2.yaml), which keeps fp32 weights, or mixed_precision: no")
    for note in notes:
        log.warning(note)
    return notes


def resolve_checkpointing(gradient_checkpointing: bool) -> bool:
    """The ``gradient_checkpointing`` training argument to use: off when FSDP checkpoints activations itself (the
    two cannot be combined; FSDP's is kept), with a one-line note."""
    fsdp = fsdp_launch()
    if gradient_checkpointing and fsdp is not None and fsdp["activation_checkpointing"]:
        log.warning("fsdp_activation_checkpointing is on in the accelerate config: using FSDP's activation "
                    "checkpointing and turning train.gradient_checkpointing off (they cannot be combined)")
        return False
    return gradient_checkpointing
