"""One process per run directory (rpsft.runlock): a second train/eval/analyze/compare into a directory another
process holds is one `error:` line naming the holder's pid, exit 2, before anything in it is read or deleted.

Every two-process test is ordered by construction, never by timing: the holder says it holds the lock (a line on
its stdout) and then waits for a line on its stdin, so the second process always meets a held lock."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rpsft import guards, runlock
from rpsft.cli import app
from rpsft.fileio import read_jsonl

runner = CliRunner()

# holds argv[1]'s run lock as `rpsft train` until a line arrives on stdin
HOLDER = ("import sys\nfrom rpsft.runlock import hold\nwith hold(sys.argv[1], 'rpsft train'):\n"
          "    print('held', flush=True)\n    sys.stdin.readline()\n")

# the real `rpsft train` command, paused once checkpoint-1 is saved until a line arrives on stdin
PAUSED_TRAIN = r"""
import sys
from transformers import TrainerCallback
import rpsft.train as t

class Pause(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 1:
            print("paused", flush=True)
            sys.stdin.readline()

_install = t.install_callbacks
t.install_callbacks = lambda trainer, out, progress_callback=None, extra_callbacks=None: _install(
    trainer, out, progress_callback, [*(extra_callbacks or []), Pause()])
from rpsft.cli import main
sys.argv = ["rpsft", *sys.argv[1:]]
main()
"""


def lock_taken(d: Path) -> bool:
    """Whether some open file holds d's lock, probed on a descriptor of our own (flock locks of two descriptors
    conflict even within one process)."""
    try:
        fd = os.open(d / runlock.LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def start(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, word: str) -> None:
    """Read the child's stdout until ``word`` (blocking: no clock involved); its stderr if it ended first."""
    for line in proc.stdout:
        if line.strip() == word:
            return
    proc.wait()
    pytest.fail(f"the child ended (rc {proc.returncode}) before {word!r}: {proc.stderr.read()[-3000:]}")


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, err = proc.communicate("go\n", timeout=300)
    return proc.returncode, err


def train_args(tiny_model_dir, synth_data, out, *extra) -> list[str]:
    sets = [f"model.name={tiny_model_dir}", f"data.train={synth_data['train']}", f"output_dir={out}",
            "data.limit=8", "data.max_length=96", "train.max_steps=2", "train.batch_size=2", "train.grad_accum=1",
            "train.save_steps=1", "anchor.rank=4", *extra]
    return ["train", *[a for s in sets for a in ("--set", s)]]


def errors(output: str) -> list[str]:
    return [x for x in output.splitlines() if x.startswith("error:")]


def test_commands_refuse_a_directory_another_process_holds(tmp_path, tiny_model_dir, synth_data):
    out = tmp_path / "run"
    out.mkdir()
    # an earlier run's files: --overwrite-all would delete them, --resume and eval would read and extend them
    earlier = {"config.yaml": "method: sft\n", "metrics.jsonl": '{"step": 1, "loss": 1.0}\n',
               "samples.jsonl": '{"benchmark": "x", "index": 0}\n'}
    for name, text in earlier.items():
        (out / name).write_text(text)
    holder = start(HOLDER, out)
    try:
        wait_for(holder, "held")
        busy = (f"error: {out} is in use by another rpsft process (pid {holder.pid}, rpsft train); wait for it to "
                "finish or choose another")
        r = runner.invoke(app, [*train_args(tiny_model_dir, synth_data, out), "--overwrite-all"])
        assert r.exit_code == 2 and errors(r.output) == [busy + " output_dir"], r.output
        r = runner.invoke(app, [*train_args(tiny_model_dir, synth_data, out), "--resume", "latest"])
        assert r.exit_code == 2 and errors(r.output) == [busy + " output_dir"], r.output
        r = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--suite", str(synth_data["test"]),
                                "--limit", "1", "--out", str(out)])
        assert r.exit_code == 2 and errors(r.output) == [busy + " --out"], r.output
        r = runner.invoke(app, ["analyze", "entropy", "--model", str(tiny_model_dir), "--data",
                                str(synth_data["test"]), "--limit", "1", "--out", str(out)])
        assert r.exit_code == 2 and errors(r.output) == [busy + " --out"], r.output
        assert "Traceback" not in r.output
        # nothing was read into, written or deleted
        assert sorted(p.name for p in out.iterdir()) == sorted([*earlier, runlock.LOCK_NAME])
        assert all((out / name).read_text() == text for name, text in earlier.items())
    finally:
        rc, err = finish(holder)
    assert rc == 0, err
    assert not (out / runlock.LOCK_NAME).exists()  # removed on release


def test_two_train_processes_one_directory(tmp_path, tiny_model_dir, synth_data):
    """The real `rpsft train` (A) holds the directory mid-run, paused right after saving checkpoint-1; a second
    `rpsft train --overwrite` (B, another seed) is refused with A's pid and the directory ends up A's alone."""
    out = tmp_path / "run"
    a = start(PAUSED_TRAIN, *train_args(tiny_model_dir, synth_data, out, "train.seed=0"))
    try:
        wait_for(a, "paused")
        assert lock_taken(out)
        r = runner.invoke(app, [*train_args(tiny_model_dir, synth_data, out, "train.seed=1"), "--overwrite"])
        assert r.exit_code == 2, r.output
        assert errors(r.output) == [f"error: {out} is in use by another rpsft process (pid {a.pid}, rpsft train); "
                                    "wait for it to finish or choose another output_dir"]
        rc, err = finish(a)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert rc == 0, err[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["train"]["seed"] == 0 and run["global_step"] == 2 and run["resumed_from"] is None
    assert "seed: 0" in (out / "config.yaml").read_text()
    assert [row["step"] for row in read_jsonl(out / "metrics.jsonl") if "loss" in row] == [1, 2]
    assert guards.latest_complete(out) == (out / "checkpoint-2", [])  # A's last checkpoint, sealed
    assert not (out / runlock.LOCK_NAME).exists() and not lock_taken(out)


def test_a_killed_holder_releases_the_directory(tmp_path):
    out = tmp_path / "run"
    holder = start(HOLDER, out)
    wait_for(holder, "held")
    with pytest.raises(runlock.RunDirInUse, match=rf"\(pid {holder.pid}, rpsft train\)"):
        with runlock.hold(out, "rpsft eval", what="--out"):
            pass
    holder.send_signal(signal.SIGKILL)  # no chance to clean up: the kernel drops the lock with the process
    holder.communicate()
    assert holder.returncode == -signal.SIGKILL
    assert (out / runlock.LOCK_NAME).is_file() and not lock_taken(out)  # a stale file, no lock
    with runlock.hold(out, "rpsft eval"):
        assert lock_taken(out)
        assert json.loads((out / runlock.LOCK_NAME).read_text()) == {
            "pid": os.getpid(), "host": socket.gethostname(), "command": "rpsft eval"}
    assert list(out.iterdir()) == []  # the stale file was taken over, then removed on release


def test_nested_holds_in_one_process_share_the_lock(tmp_path):
    out = tmp_path / "a" / "b"
    with runlock.hold(out, "rpsft compare"):
        with runlock.hold(out / ".." / "b", "rpsft train"):  # the same directory by another spelling
            assert lock_taken(out)
        assert lock_taken(out)  # the inner exit did not release the outer hold
        with runlock.hold(out / "runs" / "x", "rpsft train"):  # a directory under it: its own lock file
            assert lock_taken(out / "runs" / "x")
            # recorded as the outer command: the process a user sees and waits for
            assert json.loads((out / "runs" / "x" / runlock.LOCK_NAME).read_text())["command"] == "rpsft compare"
        assert not (out / "runs").exists()
    assert not lock_taken(out) and not (tmp_path / "a").exists()


def test_only_rank_zero_locks(tmp_path, monkeypatch):
    out = tmp_path / "run"
    holder = start(HOLDER, out)
    try:
        wait_for(holder, "held")
        monkeypatch.setenv("RANK", "1")  # another rank of a launch whose rank 0 holds the lock
        with runlock.hold(out, "rpsft train"):
            pass
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(runlock.RunDirInUse):
            with runlock.hold(out, "rpsft train"):
                pass
        monkeypatch.delenv("RANK")
        monkeypatch.setenv("LOCAL_RANK", "0")
        with pytest.raises(runlock.RunDirInUse):
            with runlock.hold(out, "rpsft train"):
                pass
    finally:
        finish(holder)


def test_overwrite_keeps_the_lock_file(tmp_path):
    out = tmp_path / "run"
    with runlock.hold(out, "rpsft train"):
        (out / "metrics.jsonl").write_text("{}\n")
        (out / "notes.txt").write_text("mine")
        (out / "checkpoint-1").mkdir()
        with pytest.raises(FileExistsError, match=r"\(notes\.txt\)"):  # the lock file is not "foreign"
            guards.clear_run_dir(out, True)
        guards.clear_run_dir(out, "all")
        assert [p.name for p in out.iterdir()] == [runlock.LOCK_NAME] and lock_taken(out)


def test_a_file_in_place_of_the_directory_is_named(tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(FileExistsError, match=rf"^{tmp_path / 'x'} is a file, not a directory; choose another "
                                              r"--out$"):
        with runlock.hold(tmp_path / "x", "rpsft eval", what="--out"):
            pass


def test_compare_holds_its_directory_and_its_runs_lock_their_own(tmp_path, tiny_model_dir, synth_data,
                                                                    monkeypatch):
    import rpsft.train
    from rpsft.compare.config import load_compare_config
    from rpsft.compare.run import run_compare

    train_cfg = tmp_path / "train.yaml"
    train_cfg.write_text(
        f"model: {{name: {tiny_model_dir}}}\ndata: {{train: {synth_data['train']}, limit: 4, max_length: 96}}\n"
        "train: {max_steps: 1, batch_size: 2, grad_accum: 1, save_steps: 1}\n")
    root = tmp_path / "out"
    monkeypatch.setenv("RPSFT_SYNTH_DIR", str(synth_data["test"].parent))
    cfg = load_compare_config(None, [f"output_dir={root}", f"train_config={train_cfg}", "methods=[{name: sft}]",
                                     "id={suites: [synth-math], limit: 1, max_new_tokens: 2, batch_size: 1}",
                                     "ood={suites: []}", "probe=false", "rotation=false", "drift_limit=0"])
    seen = []
    real_train = rpsft.train.train

    def train(tcfg, **kw):
        seen.append(("compare dir held", lock_taken(root)))
        with runlock.hold(root, "rpsft compare"):  # a nested lock on the held directory: shared, not refused
            summary = real_train(tcfg, **kw)  # locks runs/sft, its own directory
        seen.append(("run dir released", not lock_taken(Path(tcfg.output_dir))))
        return summary

    monkeypatch.setattr(rpsft.train, "train", train)
    summary = run_compare(cfg, log=lambda m: None)
    assert seen == [("compare dir held", True), ("run dir released", True)]
    assert [r["run"] for r in summary["rows"] if r["run"] != "base"] == ["sft"]
    assert (root / "runs" / "sft" / "run.json").is_file() and (root / "eval" / "sft" / "id" / "samples.jsonl").is_file()
    assert not lock_taken(root) and list(root.rglob(runlock.LOCK_NAME)) == []


def test_eval_samples_carry_their_settings_and_other_settings_are_refused(tmp_path, tiny_model_dir, synth_data):
    from rpsft.eval import run_eval

    out = tmp_path / "e"
    args = dict(suites=str(synth_data["test"]), k=2, limit=2, out_dir=out, max_new_tokens=3, batch_size=4, seed=7)
    run_eval(str(tiny_model_dir), temperature=0.5, top_p=0.9, **args)
    rows = read_jsonl(out / "samples.jsonl")
    assert len(rows) == 4
    assert all(r["settings"] == {"backend": "hf", "max_new_tokens": 3, "temperature": 0.5, "top_p": 0.9,
                                 "greedy": False, "seed": 7, "system_prompt": None, "loglik": False,
                                 "mc_protocol": "paper"} for r in rows)
    # run.json lost (it held the settings the run's check compares): the rows themselves still refuse a mix
    (out / "run.json").unlink()
    with pytest.raises(RuntimeError, match=r"samples\.jsonl: sample .*\[0\] #0 was made with other settings "
                                           r"\{'temperature': \(0\.5, 0\.7\)\} \(old, new\); pass a new --out"):
        run_eval(str(tiny_model_dir), temperature=0.7, top_p=0.9, **args)
    assert read_jsonl(out / "samples.jsonl") == rows  # nothing appended
    # the same settings resume and generate nothing
    assert run_eval(str(tiny_model_dir), temperature=0.5, top_p=0.9, **args)["generated_now"] == 0
