"""The launchers the matrix relies on, checked against accelerate's own code in seconds: the shipped ddp-cpu2 config
starts two processes, accelerate alone does not run FSDP on CPU processes (why the matrix has a stand-in) and the
stand-in does, and one-process commands are refused under a multi-process launch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rpsft import launch

from . import matrix


def _launcher_chosen(config, monkeypatch) -> tuple[str, object]:
    """Which of accelerate's launchers ``accelerate launch --config_file CONFIG -m rpsft.cli`` runs, and its args."""
    import accelerate.commands.launch as al

    chosen = []
    for name in ("simple_launcher", "multi_gpu_launcher", "deepspeed_launcher"):
        monkeypatch.setattr(al, name, lambda args, name=name: chosen.append((name, args)))
    al.launch_command(al.launch_command_parser().parse_args(["--config_file", str(config), "-m", "rpsft.cli"]))
    assert len(chosen) == 1
    return chosen[0]


def test_shipped_ddp_cpu2_starts_two_processes(monkeypatch, tmp_path):
    # accelerate's MULTI_CPU type goes to its simple launcher, which starts ONE process unless mpirun is configured
    # (the shipped file used it, and `rpsft launch ddp-cpu2` trained on one process); its torchrun launcher starts
    # num_processes of them
    name, args = _launcher_chosen(launch.accelerate_config("ddp-cpu2"), monkeypatch)
    assert name == "multi_gpu_launcher" and int(args.num_processes) == 2 and args.main_process_port == 0
    multi_cpu = tmp_path / "multi-cpu.yaml"
    multi_cpu.write_text(launch.accelerate_config("ddp-cpu2").read_text().replace("MULTI_GPU", "MULTI_CPU"))
    assert _launcher_chosen(multi_cpu, monkeypatch)[0] == "simple_launcher"


_PROBE = """
import json, os, sys
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=sys.argv[2], ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
if sys.argv[1] == "stand-in":
    sys.path.insert(0, sys.argv[3])
    import fsdp2_cpu
    fsdp2_cpu._fsdp_on_cpu_processes()
from accelerate import Accelerator
from rpsft import launch
a = Accelerator(cpu=True)  # what the Trainer builds on a machine without CUDA (rpsft passes use_cpu)
print(json.dumps({"type": str(a.distributed_type), "plugin": getattr(a.state, "fsdp_plugin", None) is not None,
                  "rpsft": launch.FSDP_ON_CPU}))
"""


@pytest.mark.parametrize("mode, expected", [
    ("accelerate", {"type": "DistributedType.MULTI_CPU", "plugin": False, "rpsft": False}),
    ("stand-in", {"type": "DistributedType.FSDP", "plugin": True, "rpsft": True})])
def test_fsdp_on_cpu_processes_needs_the_stand_in(mode, expected, tmp_path):
    # If accelerate ever turns FSDP on for CPU processes itself, the "accelerate" case fails: the matrix can then
    # launch FSDP2 through `accelerate launch -m rpsft.cli` and drop fsdp2_cpu.py, and rpsft.launch.FSDP_ON_CPU
    # (rpsft's record of this fact, on which its refusal of FSDP on CPU processes rests) must become True.
    from rpsft_testing import free_port

    res = subprocess.run([sys.executable, "-c", _PROBE, mode, str(free_port()), str(matrix.HERE)],
                         capture_output=True, text=True, timeout=120, env=matrix.env(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == expected


def test_one_process_commands_refused_in_a_launched_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    launch.check_one_process("eval")  # alone: fine
    monkeypatch.setenv("WORLD_SIZE", "1")
    launch.check_one_process("compare")  # a launch of one process: fine
    monkeypatch.setenv("WORLD_SIZE", "2")
    for command in ("train", "rl", None):  # None: `rpsft --help`
        launch.check_one_process(command)
    with pytest.raises(ValueError, match=r"^rpsft eval runs in one process, but this is one of 2 processes .*"
                                         r"run `rpsft eval \.\.\.` directly; only rpsft train and rpsft rl run"):
        launch.check_one_process("eval")


def test_rpsft_launch_refuses_one_process_commands_before_launching(tmp_path):
    with pytest.raises(ValueError, match=r"^rpsft launch runs rpsft train and rpsft rl; rpsft compare runs in one "
                                         r"process \(ddp-cpu2.yaml starts 2\)"):
        launch.launch_argv("ddp-cpu2", ["compare", "--config", "c.yaml"])
    assert launch.launch_argv("ddp-cpu2", ["rl", "--init", "x"])[-3:] == ["rl", "--init", "x"]
    one = tmp_path / "one.yaml"
    one.write_text("distributed_type: 'NO'\nnum_processes: 1\n")
    assert launch.launch_argv(str(one), ["eval", "--model", "m"])[-3:] == ["eval", "--model", "m"]


def test_stand_in_config_is_the_shipped_fsdp2_config_on_cpu():
    # the FSDP2 cells test what users launch: every FSDP setting of the shipped fsdp2.yaml; only the precision
    # (no bf16 on a CPU), the process count and the port (a free one) differ
    import yaml

    shipped = yaml.safe_load(launch.accelerate_config("fsdp2").read_text())
    stand_in = yaml.safe_load(matrix.FSDP2_CPU_CONFIG.read_text())
    differ = {k for k in shipped.keys() | stand_in.keys() if shipped.get(k) != stand_in.get(k)}
    assert differ == {"mixed_precision", "num_processes", "use_cpu", "main_process_port"}
    assert stand_in["mixed_precision"] == "no" and stand_in["num_processes"] == 2 and stand_in["use_cpu"]
