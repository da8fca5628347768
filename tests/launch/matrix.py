"""The launch matrix's machinery: the launchers (how a user starts rpsft: plain, ``rpsft launch``, ``accelerate
launch``, the FSDP2-on-CPU stand-in), one subprocess per launch with a hang limit, and what a finished run left on
disk (run.json, metrics, final weights)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent

# A launch still running after this long is a hang (a collective one rank never joins); a passing cell's launches
# take 5-40 s each on 2 cores.
HANG_S = 300.0

# Variables a launcher sets in its processes: none may leak into a launch from the shell running the tests.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
                  "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")

LR = 1e-3  # large enough that 2 steps move every trained weight far above fp32 round-off


def _console_script(name: str, module: str) -> list[str]:
    exe = BIN / name
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", module]


RPSFT = _console_script("rpsft", "rpsft.cli")
ACCELERATE_LAUNCH = ([str(BIN / "accelerate"), "launch"] if (BIN / "accelerate").is_file()
                     else [sys.executable, "-m", "accelerate.commands.launch"])
FSDP2_CPU_CONFIG = HERE / "fsdp2-cpu2.yaml"
FSDP2_CPU_SCRIPT = HERE / "fsdp2_cpu.py"

# launcher -> number of processes
LAUNCHERS = {"one": 1, "ddp": 2, "fsdp2": 2}


def argv(launcher: str, args: list[str], via: str = "rpsft") -> list[str]:
    """The command line that starts ``rpsft ARGS`` under ``launcher``.

    one:   ``rpsft ARGS``
    ddp:   ``rpsft launch ddp-cpu2 ARGS`` (via="rpsft") or
           ``accelerate launch --config_file $(rpsft accelerate-config ddp-cpu2) -m rpsft.cli ARGS`` (via="accelerate")
    fsdp2: ``accelerate launch --config_file tests/launch/fsdp2-cpu2.yaml tests/launch/fsdp2_cpu.py ARGS``: 2 CPU
           processes with FSDP2 in force (accelerate alone runs an FSDP config on CPU processes as DDP; fsdp2_cpu.py),
           or, via="accelerate-alone", ``accelerate launch --config_file tests/launch/fsdp2-cpu2.yaml -m rpsft.cli
           ARGS``: what a user without GPUs would run, which rpsft refuses
    """
    if launcher == "one":
        return RPSFT + args
    if launcher == "ddp":
        if via == "rpsft":
            return RPSFT + ["launch", "ddp-cpu2"] + args
        from rpsft.launch import accelerate_config

        return ACCELERATE_LAUNCH + ["--config_file", str(accelerate_config("ddp-cpu2")), "-m", "rpsft.cli"] + args
    if launcher == "fsdp2":
        entry = ["-m", "rpsft.cli"] if via == "accelerate-alone" else [str(FSDP2_CPU_SCRIPT)]
        return ACCELERATE_LAUNCH + ["--config_file", str(FSDP2_CPU_CONFIG), *entry] + args
    raise ValueError(launcher)


def env(cache: Path) -> dict[str, str]:
    """The environment of every launch: the caller's, without launcher variables, one thread per process (what
    ``accelerate launch`` gives each process anyway), hubs offline, bases cached in the session's own directory, and
    temporary files there too (torchrun leaves a torchelastic_* directory in TMPDIR per launch)."""
    e = {k: v for k, v in os.environ.items()
         if k not in _LAUNCHER_VARS and not k.startswith(("ACCELERATE_", "FSDP_"))}
    tmp = Path(cache) / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
             HF_DATASETS_OFFLINE="1", RPSFT_CACHE=str(cache), COLUMNS="250", PYTHONUNBUFFERED="1", TMPDIR=str(tmp))
    e.pop("RPSFT_DEBUG", None)  # user errors must come out as the one `error:` line
    return e


@dataclass
class Launch:
    argv: list[str]
    returncode: int
    output: str  # stdout and stderr, interleaved
    seconds: float  # wall time
    cpu_seconds: float = 0.0  # user + system time of the launch and every process it started
    name: str = ""  # the cell's name for it (reports)

    def tail(self, n: int = 4000) -> str:
        return f"$ {' '.join(self.argv)}\n(exit {self.returncode}, {self.seconds:.0f} s)\n...{self.output[-n:]}"

    def error_lines(self) -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith("error: ")]


def run(cmd: list[str], environ: dict[str, str], cwd: Path, timeout: float = HANG_S) -> Launch:
    """Run ``cmd`` in its own process group; a launch still running after ``timeout`` seconds is killed with its
    whole group (the launcher and every rank) and reported as hung."""
    import resource

    import pytest

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for descendants: the launcher and its ranks
        return r.ru_utime + r.ru_stime

    t0, c0 = time.perf_counter(), cpu()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environ, cwd=cwd, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"hung: still running after {timeout:.0f} s, killed\n"
                    + Launch(cmd, -9, out or "", time.perf_counter() - t0).tail())
    return Launch(cmd, proc.returncode, out, time.perf_counter() - t0, cpu() - c0)


# ------------------------------------------------------------------------------------------------ what a run left


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def loss_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl's per-step training rows (the ones with a loss)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r]


def weights(model_dir: Path) -> dict:
    """Every tensor of a saved checkpoint (all its safetensors files)."""
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    assert files, f"no safetensors weights in {model_dir}"
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


def final_weights(run_dir: Path) -> dict:
    """The trained model's full weights: merged/ for the adapter methods (the run dir holds the adapter there)."""
    return weights(run_dir / "merged" if (run_dir / "merged").is_dir() else run_dir)


DISTANCES: list[tuple[str, float]] = []  # (what was compared, rel_distance): printed after the session


def rel_distance(a: dict, b: dict, origin: dict) -> float:
    """‖a − b‖ / ‖b − origin‖ over the tensors all three share (Frobenius over the whole model): how far two
    trainings from ``origin`` ended apart, relative to how far ``b`` moved."""
    keys = [k for k in origin if k in a and k in b]
    num = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in keys)
    den = sum(float(((b[k].double() - origin[k].double()) ** 2).sum()) for k in keys)
    assert den > 0, "the reference run did not move any weight"
    return math.sqrt(num / den)


@dataclass
class Trained:
    """A finished training run: where, how it was launched, and what it left (read right after it finished)."""
    run_dir: Path
    launch: Launch
    summary: dict
    losses: list[float]
    weights: dict = field(repr=False)


def finished(run_dir: Path, launch: Launch) -> Trained:
    return Trained(run_dir, launch, read_json(run_dir / "run.json"), [r["loss"] for r in loss_rows(run_dir)],
                   final_weights(run_dir))


def simulate_kill_after_step(run_dir: Path, step: int) -> None:
    """Leave ``run_dir`` as a run killed after sealing checkpoint-``step`` leaves it: later checkpoints and the
    run summary gone (metrics.jsonl keeps the later rows; --resume drops them)."""
    for ckpt in run_dir.glob("checkpoint-*"):
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    (run_dir / "run.json").unlink()
