"""The FSDP2-on-CPU stand-in: ``accelerate launch --config_file tests/launch/fsdp2-cpu2.yaml tests/launch/fsdp2_cpu.py
COMMAND ...`` runs ``rpsft COMMAND ...`` (``rpsft.cli.main``) in each of the processes accelerate starts, with FSDP2
in force on CPU processes over gloo.

Why a stand-in: accelerate 1.16 cannot run FSDP on CPU processes. A config with ``distributed_type: FSDP`` goes
through accelerate's multi-GPU launcher (torchrun: 2 processes, ``ACCELERATE_USE_FSDP=true``, ``FSDP_VERSION=2``,
every FSDP_* setting), but in each process ``AcceleratorState`` turns the plugin into ``distributed_type=FSDP``
only inside its branch for GPU-like process groups (MULTI_GPU, MULTI_NPU, MULTI_XPU, ...; accelerate/state.py).
With ``use_cpu`` (rpsft passes it on a machine without CUDA) the state is MULTI_CPU and the plugin is dropped: the
model is wrapped in DDP, the FSDP settings are ignored without a word. Without ``use_cpu`` there is no accelerator
backend and each process runs alone as rank 0.

What this file changes, and nothing else: after ``AcceleratorState.__init__`` has built a MULTI_CPU state while
``ACCELERATE_USE_FSDP`` is on, it applies the three assignments accelerate's GPU branch makes (``distributed_type =
FSDP``, the plugin's mixed precision, ``fsdp_plugin``), and it tells rpsft so (``rpsft.launch.FSDP_ON_CPU``: without
it rpsft refuses FSDP on CPU processes, as accelerate would not apply it). From there on every line is the installed
libraries' own: the launcher and its environment, transformers' Trainer, ``Accelerator.prepare`` ->
``fsdp2_prepare_model`` (``fully_shard`` per decoder layer on a CPU device mesh), FSDP2's sharded optimizer state and
FULL_STATE_DICT saving, and all of rpsft (``rpsft.launch.check_launch``, the sharded anchor, the exports)."""

from __future__ import annotations

import os
import sys


def _fsdp_on_cpu_processes() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def __init__(self, mixed_precision=None, cpu=False, dynamo_plugin=None, deepspeed_plugin=None, fsdp_plugin=None,
                 *args, **kwargs):
        init(self, mixed_precision, cpu, dynamo_plugin, deepspeed_plugin, fsdp_plugin, *args, **kwargs)
        if (self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None
                and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"):
            # accelerate/state.py's GPU branch, verbatim in effect
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type

    AcceleratorState.__init__ = __init__
    import rpsft.launch

    rpsft.launch.FSDP_ON_CPU = True  # accelerate now applies FSDP to CPU process groups: rpsft's check follows it


if __name__ == "__main__":
    _fsdp_on_cpu_processes()
    from rpsft.cli import main

    sys.argv[0] = "rpsft"
    sys.exit(main())
