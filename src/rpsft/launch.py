"""accelerate configs shipped inside the package, found by name, and ``rpsft launch`` around ``accelerate launch``.

The configs live in ``configs/accelerate/`` of the source tree and are installed as package data
(``rpsft/resources/accelerate``), so an installed rpsft can launch them without a clone:

    accelerate launch --config_file "$(rpsft accelerate-config fsdp2)" -m rpsft.cli train --config my.yaml
    rpsft launch fsdp2 train --config my.yaml            # the same, in one command
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path


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


def launch_argv(name: str, args: list[str]) -> list[str]:
    """``accelerate launch --config_file <config> -m rpsft.cli <args>`` with this interpreter."""
    if not args:
        raise ValueError("rpsft launch NAME COMMAND ...: give the rpsft command to run, e.g. rpsft launch fsdp2 "
                         "train --config my.yaml")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config(name)),
            "-m", "rpsft.cli", *args]


def exec_launch(name: str, args: list[str]) -> None:
    argv = launch_argv(name, args)
    os.execv(argv[0], argv)
