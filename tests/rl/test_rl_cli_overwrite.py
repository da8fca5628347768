"""`rpsft rl --overwrite-all` (and its `--overwrite=all` spelling) reaches the run as train's does: the message that
refuses a directory with other files names it, so rl must have it."""

from __future__ import annotations

import sys

import pytest


@pytest.mark.parametrize("flag, expected", [("--overwrite", True), ("--overwrite-all", "all"),
                                            ("--overwrite=all", "all")])
def test_rl_overwrite_flags_reach_the_run(flag, expected, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import rpsft.rl.run
    from rpsft import cli

    seen = {}

    def run_rl(cfg, resume=None, overwrite=False, console=None):
        seen["overwrite"] = overwrite
        raise FileExistsError("stopped before training")

    monkeypatch.setattr(rpsft.rl.run, "run_rl", run_rl)
    app = cli.app
    # cli.main's argument rewrite turns --overwrite=all into --overwrite-all for every command
    monkeypatch.setattr(sys, "argv", ["rpsft", "rl", "--init", "x", flag, "--set", f"output_dir={tmp_path / 'o'}"])
    monkeypatch.setattr(cli, "app", lambda: seen.setdefault("argv", sys.argv[1:]))
    cli.main()
    res = CliRunner().invoke(app, seen["argv"])
    assert res.exit_code == 2 and "stopped before training" in res.output, res.output
    assert seen["overwrite"] == expected
