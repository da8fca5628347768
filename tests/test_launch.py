"""accelerate configs as package data: found by name, launchable without a clone."""

from __future__ import annotations

import sys

import pytest
import yaml
from typer.testing import CliRunner

from rpsft import launch
from rpsft.cli import app


def test_shipped_configs_are_the_repository_ones():
    found = launch.accelerate_configs()
    assert {"fsdp2", "zero2", "ddp-cpu2"} <= set(found)
    cfg = yaml.safe_load(found["fsdp2"].read_text())
    assert cfg["distributed_type"] == "FSDP"
    assert launch.accelerate_config("zero2.yaml") == found["zero2"].resolve()


def test_unknown_name_and_own_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="did you mean 'fsdp2'"):
        launch.accelerate_config("fsdp")
    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: NO\n")
    assert launch.accelerate_config(str(own)) == own.resolve()


def test_cli_prints_path_and_launch_argv(monkeypatch):
    r = CliRunner().invoke(app, ["accelerate-config", "fsdp2"])
    assert r.exit_code == 0 and r.output.strip().endswith("fsdp2.yaml")
    seen = {}
    monkeypatch.setattr(launch.os, "execv", lambda path, argv: seen.update(path=path, argv=argv))
    r = CliRunner().invoke(app, ["launch", "ddp-cpu2", "train", "--config", "c.yaml", "--set", "lr=1e-5"])
    assert r.exit_code == 0, r.output
    assert seen["argv"][:4] == [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    assert seen["argv"][4].endswith("ddp-cpu2.yaml")
    assert seen["argv"][5:] == ["-m", "rpsft.cli", "train", "--config", "c.yaml", "--set", "lr=1e-5"]
    bad = CliRunner().invoke(app, ["launch", "nope", "train"])
    assert bad.exit_code == 2 and "shipped configs are" in bad.output
