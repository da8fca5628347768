"""``accelerate launch`` for rpsft: the shipped configs found by name, and the checks of a launch setup that must run
before the model is loaded or the bases are computed.

The configs live in ``configs/accelerate/`` of the source tree and are installed as package data
(``rpsft/resources/accelerate``), so an installed rpsft can launch them without a clone:

    accelerate launch --config_file "$(rpsft accelerate-config fsdp2)" -m rpsft.cli train --config my.yaml
    rpsft launch fsdp2 train --config my.yaml            # the same, in one command

Checks:

``accelerate launch`` hands its config file to the processes as environment variables (ACCELERATE_USE_FSDP,
FSDP_*, ACCELERATE_USE_DEEPSPEED, ACCELERATE_MIXED_PRECISION); transformers and accelerate read them only when the
Trainer is built — after the anchor, whose bases take minutes for a 7B model. So the combinations that would fail
there, or silently weaken the anchor, are settled here, at startup:

* ``fsdp_cpu_ram_efficient_loading: true`` is refused: every rank but the first would load the model on the meta
  device and build its anchor from empty weights.
* FSDP's own activation checkpointing and the ``gradient_checkpointing`` training argument cannot both be on
  (transformers raises when the Trainer is built). Resolved automatically: FSDP's is kept (it avoids a redundant
  all-gather in the backward pass) and the training argument is turned off, with a one-line note.
* DeepSpeed ZeRO-3 and FSDP v1 are refused with the anchor: ZeRO-3 replaces every weight by an empty placeholder
  and FSDP v1 by flat parameters, so the anchor's shape and name checks fail (or, built before sharding, it would
  read nothing). FSDP2 (``fsdp2.yaml``) shards by rows, which the anchor follows; ZeRO-2 (``zero2.yaml``) keeps
  every weight whole.
* DeepSpeed with bf16 or fp16 mixed precision is refused with the anchor: DeepSpeed casts the module itself to 16
  bits (the fp32 masters are partitioned inside its optimizer), so R would be computed from 16-bit-rounded W
  against fp32 frames. Rounding alone gives a relative drift of 4.7e-4 on a random 1792² matrix at k = 384 — more
  than a whole SFT demo run drifts (1.4e-4) and above a budget of ε = 1e-4. The 16 bits come from the launcher's
  ``mixed_precision``, a DeepSpeed config file, or the Trainer's own ``bf16`` (``TrainingArguments`` hands it to
  DeepSpeed; ``train.bf16`` is on by default on a GPU). ZeRO-2 in fp32 (``mixed_precision: 'no'`` as in the shipped
  ``zero2.yaml``, with ``train.bf16=false``) or FSDP2 (fp32 weights, bf16 only inside forward) read exact weights.
* FSDP on CPU processes is refused: accelerate applies an FSDP config only to processes on an accelerator
  (``AcceleratorState`` takes its FSDP branch for MULTI_GPU / NPU / XPU / ... process groups). On a machine without
  CUDA, where rpsft passes ``use_cpu``, the processes would train as plain DDP, every rank holding the whole model
  and optimizer state, with FSDP's checkpoint format and memory plan silently gone.
* ``train.nan_policy=skip`` is refused under DeepSpeed: accelerate runs DeepSpeed's optimizer step inside
  ``backward`` on the last micro-batch of each window, before the finite guard's ``on_pre_optimizer_step`` check
  could drop the gradients, so nothing would be skipped (see :class:`rpsft.guards.FiniteGuard`).
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
from pathlib import Path

from .config import ConfigError

log = logging.getLogger("rpsft")


# Whether accelerate applies an FSDP config to CPU processes. It does not (1.16): the FSDP check of check_launch
# rests on this. tests/launch/test_launchers.py pins it against the installed accelerate; the launch matrix's
# FSDP2-on-CPU stand-in (tests/launch/fsdp2_cpu.py), which adds accelerate's FSDP branch for CPU process groups,
# sets it True in its processes.
FSDP_ON_CPU = False


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def fsdp_launch() -> dict | None:
    """The FSDP settings of the current ``accelerate launch`` (None when FSDP is not in use)."""
    if not _env_true("ACCELERATE_USE_FSDP"):
        return None
    return {"activation_checkpointing": _env_true("FSDP_ACTIVATION_CHECKPOINTING"),
            "cpu_ram_efficient_loading": _env_true("FSDP_CPU_RAM_EFFICIENT_LOADING"),
            "version": os.environ.get("FSDP_VERSION", "1").strip()}  # accelerate's default is v1


def deepspeed_launch(trainer_precision: str | None = None) -> dict | None:
    """The DeepSpeed settings of the current ``accelerate launch`` (None when DeepSpeed is not in use): ``stage``
    (ZeRO stage), ``precision`` (``bf16``, ``fp16`` or ``no``) and ``precision_from`` (the setting it comes from),
    resolved as transformers and accelerate resolve them. ``trainer_precision``: ``bf16`` / ``fp16`` when the
    Trainer's ``bf16`` / ``fp16`` argument is on (``TrainingArguments`` then hands that to DeepSpeed in place of the
    launcher's ``mixed_precision``). A DeepSpeed config file (``deepspeed_config_file``) has the last word on each
    value it sets explicitly (not ``auto``); the ZeRO stage is 2 when nothing sets it (accelerate's default)."""
    if not _env_true("ACCELERATE_USE_DEEPSPEED"):
        return None
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2").strip() or "2"
    if trainer_precision in ("bf16", "fp16"):
        precision = trainer_precision
        precision_from = "the Trainer's bf16: train.bf16, on by default on a GPU" if precision == "bf16" else \
            "the Trainer's fp16: trainer.fp16"
    else:
        precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower() or "no"
        precision_from = f"mixed_precision {precision} in the accelerate config"
    source = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if source != "none":
        from accelerate.utils.deepspeed import HfDeepSpeedConfig

        try:
            ds = HfDeepSpeedConfig(source)
        except (OSError, ValueError) as e:
            raise ConfigError(f"deepspeed_config_file {source} cannot be read ({e}); fix the file or the path in "
                              "the accelerate config") from None
        file_stage = ds.get_value("zero_optimization.stage")
        if file_stage not in (None, "auto"):
            stage = str(file_stage)
        for dtype in ("bf16", "fp16"):
            if ds.is_true(f"{dtype}.enabled"):
                precision, precision_from = dtype, f"{dtype}.enabled in {source}"
            elif ds.is_false(f"{dtype}.enabled") and precision == dtype:
                precision = "no"
    return {"stage": int(stage) if stage.isdigit() else stage, "precision": precision,
            "precision_from": precision_from}


def check_launch(anchor: bool, nan_policy: str = "stop", trainer_precision: str | None = None,
                 cpu: bool = False) -> None:
    """Refuse launch settings the anchor (``anchor``: this run has one) or the finite guard (``nan_policy``, the
    run's ``train.nan_policy``) cannot work with, or that accelerate would not apply, before the model loads;
    ``trainer_precision``: the Trainer's 16-bit mode (``bf16``, ``fp16`` or None,
    :func:`rpsft.train.trainer_precision`), which DeepSpeed follows; ``cpu``: the processes compute on the CPU
    (:func:`rpsft.train.processes_on_cpu`). Each refusal is one line naming the setting and the config that works
    (see the module doc)."""
    fsdp = fsdp_launch()
    if fsdp is not None and fsdp["cpu_ram_efficient_loading"]:
        raise ConfigError("fsdp_cpu_ram_efficient_loading is true in the accelerate config: ranks other than 0 "
                          "would load meta (empty) weights and build the anchor from them; set "
                          "fsdp_cpu_ram_efficient_loading: false (configs/accelerate/fsdp2.yaml)")
    if anchor and fsdp is not None and fsdp["version"] != "2":
        raise ConfigError(f"fsdp_version {fsdp['version']} in the accelerate config: FSDP v1's flat parameters "
                          "hide the weight matrices from the rotation anchor; set fsdp_version: 2 (FSDP2, "
                          "configs/accelerate/fsdp2.yaml)")
    ds = deepspeed_launch(trainer_precision)
    if ds is not None and anchor and ds["stage"] == 3:
        raise ConfigError("DeepSpeed ZeRO-3 in the accelerate config: it partitions the weights themselves and the "
                          "rotation anchor needs whole (or FSDP2 row-sharded) matrices; use FSDP2 "
                          "(configs/accelerate/fsdp2.yaml) or ZeRO-2 (configs/accelerate/zero2.yaml)")
    if ds is not None and anchor and ds["precision"] in ("bf16", "fp16"):
        raise ConfigError(f"DeepSpeed in {ds['precision']} ({ds['precision_from']}): DeepSpeed casts the weights "
                          f"to {ds['precision']}, so the rotation anchor would read rounded W (a relative drift of "
                          "~5e-4 from rounding alone); run ZeRO-2 in fp32 (train.bf16=false with mixed_precision: "
                          "'no', configs/accelerate/zero2.yaml) or use FSDP2 (configs/accelerate/fsdp2.yaml: fp32 "
                          "weights, bf16 compute)")
    if ds is not None and nan_policy == "skip":
        raise ConfigError("train.nan_policy=skip under DeepSpeed: DeepSpeed takes the optimizer step inside "
                          "backward, before the finite guard could drop the gradients, so no step would be "
                          "skipped; set train.nan_policy=stop (the run stops at the first non-finite step, and "
                          "no checkpoint holds it) or launch with FSDP2 or DDP")
    if fsdp is not None and cpu and not FSDP_ON_CPU:
        raise ConfigError("FSDP in the accelerate config, but these processes run on the CPU (no CUDA device, or "
                          "use_cpu), where accelerate applies no FSDP: they would train as plain DDP, each holding "
                          "the whole model, without a word; launch on GPUs, or use DDP on a CPU (rpsft launch "
                          "ddp-cpu2, configs/accelerate/ddp-cpu2.yaml)")


def resolve_checkpointing(gradient_checkpointing: bool) -> bool:
    """The ``gradient_checkpointing`` training argument to use: off when FSDP checkpoints activations itself (the
    two cannot be combined; FSDP's is kept), with a one-line note."""
    fsdp = fsdp_launch()
    if gradient_checkpointing and fsdp is not None and fsdp["activation_checkpointing"]:
        log.warning("fsdp_activation_checkpointing is on in the accelerate config: using FSDP's activation "
                    "checkpointing and turning train.gradient_checkpointing off (they cannot be combined)")
        return False
    return gradient_checkpointing


def _config_dir() -> Path:
    from importlib.resources import files

    return Path(str(files("rpsft") / "resources" / "accelerate"))


def accelerate_configs() -> dict[str, Path]:
    """Shipped accelerate configs by name (file stem)."""
    d = _config_dir()
    return {p.stem: p for p in sorted(d.glob("*.yaml"))} if d.is_dir() else {}


def accelerate_config(name: str) -> Path:
    """A shipped config by name (``fsdp2``, ``zero2``, ``ddp-cpu2``), or any existing YAML file given by path."""
    p = Path(name).expanduser()
    if p.is_file():
        return p.resolve()
    known = accelerate_configs()
    key = name[: -len(".yaml")] if name.endswith(".yaml") else name
    if key in known:
        return known[key].resolve()
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise FileNotFoundError(f"no accelerate config {name!r}: {hint}shipped configs are {', '.join(known)} "
                            f"(or pass a path to your own YAML file)")


# The commands that run as one job over several processes (each process a rank of the Trainer). Every other
# command does its whole work in one process: under a launcher each of N copies would do all of it and write the
# same files (eval's samples.jsonl, compare's stages), so it is refused there.
LAUNCHED_COMMANDS = ("train", "rl")


def launch_world() -> int:
    """How many processes the current launch started (``WORLD_SIZE``, which ``accelerate launch`` and torchrun set
    in each of them); 1 outside a launcher."""
    value = os.environ.get("WORLD_SIZE", "").strip()
    return int(value) if value.isdigit() else 1


def check_one_process(command: str | None) -> None:
    """Refuse ``rpsft COMMAND`` in a process of a multi-process launch unless COMMAND runs under one (train, rl)."""
    world = launch_world()
    if command is None or command in LAUNCHED_COMMANDS or world <= 1:
        return
    raise ValueError(f"rpsft {command} runs in one process, but this is one of {world} processes of a launch "
                     f"(accelerate launch / torchrun / rpsft launch; WORLD_SIZE={world}): run `rpsft {command} ...` "
                     f"directly; only {' and '.join('rpsft ' + c for c in LAUNCHED_COMMANDS)} run under a launcher")


def _num_processes(config: Path) -> int:
    """``num_processes`` of an accelerate config file (1 when unset or unreadable: accelerate reports the latter)."""
    import yaml

    try:
        n = (yaml.safe_load(config.read_text()) or {}).get("num_processes", 1)
        return int(n)
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError):
        return 1


def launch_argv(name: str, args: list[str]) -> list[str]:
    """``accelerate launch --config_file <config> -m rpsft.cli <args>`` with this interpreter. A command that runs in
    one process is refused here, before the launcher starts, when the config starts several."""
    if not args:
        raise ValueError("rpsft launch NAME COMMAND ...: give the rpsft command to run, e.g. rpsft launch fsdp2 "
                         "train --config my.yaml")
    config = accelerate_config(name)
    if args[0] not in LAUNCHED_COMMANDS and (n := _num_processes(config)) > 1:
        raise ValueError(f"rpsft launch runs {' and '.join('rpsft ' + c for c in LAUNCHED_COMMANDS)}; "
                         f"rpsft {args[0]} runs in one process ({config.name} starts {n}): run `rpsft {args[0]} "
                         "...` without rpsft launch")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "-m", "rpsft.cli", *args]


def exec_launch(name: str, args: list[str]) -> None:
    argv = launch_argv(name, args)
    os.execv(argv[0], argv)
