"""Where the anchor's tensors live and where its bases are computed.

The anchor is built while the model is still on the CPU (``rpsft train`` and ``rpsft rl`` load the model, build
the anchor, then the Trainer moves or shards the model). So:

* every anchor term moves its tensors to its parameter's device on first use (:meth:`AnchorTerms._place`), and
  every tensor the penalty or its gradient creates is made there;
* the SVDs run on the process's accelerator when there is one (:func:`bases_device`), otherwise on all the CPU
  cores this process may use (:func:`svd_threads`: ``accelerate launch`` sets OMP_NUM_THREADS=1);
* parameter names are compared without the wrapper components that activation checkpointing
  (``_checkpoint_wrapped_module``), ``torch.compile`` (``_orig_mod``) and FSDP1 (``_fsdp_wrapped_module``) insert
  (:func:`canonical_name`), so an anchor built on the plain model finds its matrices in the wrapped one.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

WRAPPER_COMPONENTS = frozenset({"_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module"})


def canonical_name(name: str) -> str:
    """``model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight`` -> ``model.layers.0.mlp.up_proj.weight``."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_COMPONENTS)


def canonical_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """``named_parameters`` keyed by :func:`canonical_name`."""
    return {canonical_name(n): p for n, p in model.named_parameters()}


def canonical_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """``named_modules`` keyed by :func:`canonical_name` (a wrapper and the module it wraps share a name; the
    innermost, i.e. the wrapped module itself, wins)."""
    return {canonical_name(n): m for n, m in model.named_modules()}


def accelerator_device() -> torch.device | None:
    """This process's CUDA device (the one ``accelerate launch`` selected), or None without CUDA."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return None


def bases_device(p: torch.Tensor) -> torch.device:
    """Where to run the SVD of parameter ``p``: its own device when it is on an accelerator, else this process's
    accelerator when there is one (an SVD of 18944×3584 takes seconds on a GPU, minutes on one CPU thread), else
    the CPU."""
    if p.device.type not in ("cpu", "meta"):
        return p.device
    return accelerator_device() or torch.device("cpu")


def cpu_budget() -> int:
    """CPU cores this process may use: its affinity set (or cpu_count) shared among the node's local ranks."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS / Windows
        cores = os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, cores // local)


@contextlib.contextmanager
def svd_threads() -> Iterator[int]:
    """Use :func:`cpu_budget` intra-op threads for the duration (OMP_NUM_THREADS=1 under ``accelerate launch``
    would leave the CPU SVDs on one core), then restore the caller's setting."""
    before = torch.get_num_threads()
    n = max(before, cpu_budget())
    if n != before:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def host_values(x: torch.Tensor) -> list[float]:
    """A 1-D tensor as Python floats with one device-to-host transfer (a single sync per optimizer step, not one
    per matrix). Meta tensors hold no values: NaN (used to check placement without a GPU)."""
    if x.device.type == "meta":
        return [float("nan")] * x.numel()
    return x.detach().double().cpu().tolist()
