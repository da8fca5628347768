"""What a run leaves on disk: the newest sealed checkpoint only (train.save_total_limit, default 1), rotated after
sealing so that an unsealed checkpoint never costs a sealed one; no optimizer state once the run has finished
(unless train.keep_optimizer_state); resuming such a checkpoint with steps left is refused; the disk use is in
run.json and printed at the end."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from transformers import TrainerCallback
from typer.testing import CliRunner

from rpsft_testing import StopAt

from rpsft import guards
from rpsft.cli import app
from rpsft.config import ConfigError, load_config
from rpsft.train import train

from .rl.rl_helpers import SYNTH_ROWS, tiny_overrides, write_jsonl
from .test_faults import cfg_for

OPTIMIZER_FILES = {"optimizer.pt", "scheduler.pt"}


class SeenAtSave(TrainerCallback):
    """After each save (and after the sealer, which is installed before extra callbacks): each checkpoint-N on
    disk and whether it is sealed."""

    def __init__(self, out: Path):
        self.out, self.seen = out, {}

    def on_save(self, args, state, control, **kwargs):
        self.seen[state.global_step] = {p.name: (p / guards.COMPLETE).is_file()
                                        for p in sorted(self.out.glob("checkpoint-*"))}


def files_of(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


def recount(out: Path) -> dict:
    """The disk use of ``out`` counted file by file, independently of guards.disk_use."""
    def size(p: Path) -> int:
        return sum(f.stat().st_size for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())

    return {"bytes": sum(size(p) for p in out.iterdir() if p.name != "run.json"),
            "model_bytes": (out / "model.safetensors").stat().st_size,
            "checkpoints": {p.name: {"bytes": size(p), "optimizer_state": bool(OPTIMIZER_FILES & files_of(p))}
                            for p in sorted(out.glob("checkpoint-*"), key=guards._step)}}


# ------------------------------------------------------------------------------------- the defaults, end to end
def test_a_finished_run_keeps_the_newest_sealed_checkpoint_without_optimizer_state(tiny_model_dir, synth_data,
                                                                                 tmp_path):
    assert load_config(None, []).train.save_total_limit == 1
    assert load_config(None, []).train.keep_optimizer_state is False
    out = tmp_path / "run"
    seen = SeenAtSave(out)
    summary = train(cfg_for(tiny_model_dir, synth_data["train"], out, "train.max_steps=3", "train.save_steps=1"),
                    progress=False, extra_callbacks=[seen])
    # during the run: right after each save exactly one checkpoint, the one just written, and it is sealed
    assert seen.seen == {1: {"checkpoint-1": True}, 2: {"checkpoint-2": True}, 3: {"checkpoint-3": True}}
    # at the end: it lost its optimizer, scheduler (and scaler) state, kept its weights and trainer state
    ckpt = out / "checkpoint-3"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert not OPTIMIZER_FILES & files_of(ckpt) and not any(n.startswith("optimizer") for n in files_of(ckpt))
    assert {"model.safetensors", "trainer_state.json", guards.COMPLETE} <= files_of(ckpt)
    assert json.loads((ckpt / guards.COMPLETE).read_text()) == {"global_step": 3, "optimizer_state": "deleted"}
    assert guards.latest_complete(out) == (ckpt, [])  # still the checkpoint --resume latest would take
    # the disk use, recounted file by file: in the summary and in run.json
    assert summary["disk"] == recount(out)
    assert json.loads((out / "run.json").read_text())["disk"] == summary["disk"]
    assert summary["disk"]["checkpoints"]["checkpoint-3"]["bytes"] < 2 * summary["disk"]["model_bytes"]


def test_keep_optimizer_state_keeps_it_and_null_keeps_every_checkpoint(tiny_model_dir, synth_data, tmp_path):
    out = tmp_path / "run"
    summary = train(cfg_for(tiny_model_dir, synth_data["train"], out, "train.max_steps=2", "train.save_steps=1",
                            "train.save_total_limit=null", "train.keep_optimizer_state=true"), progress=False)
    for name in ("checkpoint-1", "checkpoint-2"):
        assert OPTIMIZER_FILES <= files_of(out / name), name
        assert json.loads((out / name / guards.COMPLETE).read_text()) == {"global_step": int(name[-1])}
    assert summary["disk"] == recount(out)
    assert all(c["optimizer_state"] for c in summary["disk"]["checkpoints"].values())
    # AdamW in fp32: two moments per weight, so the optimizer state is about twice the weights
    opt = (out / "checkpoint-2" / "optimizer.pt").stat().st_size
    assert 1.8 < opt / (out / "checkpoint-2" / "model.safetensors").stat().st_size < 2.3


# -------------------------------------------------------------------------------------------- torn checkpoints
def test_a_torn_newer_checkpoint_never_costs_the_sealed_one(tiny_model_dir, synth_data, tmp_path):
    out = tmp_path / "run"
    cfg = cfg_for(tiny_model_dir, synth_data["train"], out, "train.max_steps=4", "train.save_steps=1")
    train(cfg, progress=False, extra_callbacks=[StopAt(2)])  # interrupted after step 2: checkpoint-2 sealed
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert OPTIMIZER_FILES <= files_of(out / "checkpoint-2")  # not finished: its optimizer state stays
    # a leftover of a killed session: checkpoint-4 written in part, never sealed, with the newest mtime
    torn = out / "checkpoint-4"
    shutil.copytree(out / "checkpoint-2", torn)
    (torn / guards.COMPLETE).unlink()
    (torn / "optimizer.pt").write_bytes(b"torn")
    later = time.time() + 3600
    os.utime(torn, (later, later))
    seen = SeenAtSave(out)
    resumed = train(cfg, resume="latest", progress=False, extra_callbacks=[seen])
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["global_step"] == 4
    # the save at step 3: the new sealed checkpoint stays (Trainer's own rotation, by mtime, kept the torn
    # checkpoint-4 as "newest" and deleted checkpoint-3 before it was sealed), the torn one waits to be re-written
    assert seen.seen[3] == {"checkpoint-3": True, "checkpoint-4": False}
    assert seen.seen[4] == {"checkpoint-4": True}
    assert json.loads((torn / "trainer_state.json").read_text())["global_step"] == 4  # re-written whole


def test_rotation_counts_only_sealed_checkpoints(tmp_path):
    def ckpt(step: int, sealed: bool = True, state: bool = True) -> Path:
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if state:
            (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        if sealed:
            (d / guards.COMPLETE).write_text(json.dumps({"global_step": step}))
        return d

    def names():
        return sorted((p.name for p in tmp_path.glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))

    ckpt(1), ckpt(2), ckpt(3, sealed=False), ckpt(4), ckpt(5, state=False), ckpt(6, sealed=False)
    assert guards.rotate_checkpoints(tmp_path, None) == [] and len(names()) == 6  # null: keep every one
    # keep 2: the two newest sealed (4, 2); the unsealed 3 and 1's sealed-but-old go; the unsealed 5, 6 are newer
    # than every sealed one (a killed session's leftovers, re-written when the run gets there) and stay
    deleted = guards.rotate_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in deleted) == ["checkpoint-1", "checkpoint-3"]
    assert names() == ["checkpoint-2", "checkpoint-4", "checkpoint-5", "checkpoint-6"]
    # keep 1 with a protected (best) checkpoint: both stay
    assert guards.rotate_checkpoints(tmp_path, 1, protect=[str(tmp_path / "checkpoint-2")]) == []
    guards.rotate_checkpoints(tmp_path, 1)
    assert names() == ["checkpoint-4", "checkpoint-5", "checkpoint-6"]
    # a finished run: the unsealed ones go too, and the optimizer state of the kept one
    (tmp_path / "checkpoint-4" / "optimizer.pt").write_bytes(b"x" * 100)
    (tmp_path / "checkpoint-4" / "scheduler.pt").write_bytes(b"y" * 10)
    assert guards.finish_checkpoints(tmp_path, 1, keep_optimizer_state=False) > 110
    assert names() == ["checkpoint-4"] and guards.optimizer_state_deleted(tmp_path / "checkpoint-4")
    assert files_of(tmp_path / "checkpoint-4") == {"trainer_state.json", guards.COMPLETE}
    with pytest.raises(ValueError, match=r"train.save_total_limit must be >= 1 or null \(keep all\), got 0"):
        guards.rotate_checkpoints(tmp_path, 0)
    # nothing sealed at all (a first save torn): nothing is deleted
    for p in tmp_path.glob("checkpoint-*"):
        shutil.rmtree(p)
    ckpt(7, sealed=False)
    assert guards.rotate_checkpoints(tmp_path, 1) == [] and names() == ["checkpoint-7"]


def test_deepspeed_state_goes_only_when_the_weights_are_kept_elsewhere(tmp_path):
    def ds_ckpt(step: int, weights: bool) -> Path:
        d = tmp_path / f"checkpoint-{step}"
        (d / f"global_step{step}").mkdir(parents=True)
        (d / f"global_step{step}" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o" * 64)
        (d / "latest").write_text(f"global_step{step}")
        (d / "zero_to_fp32.py").write_text("#")
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (d / guards.COMPLETE).write_text(json.dumps({"global_step": step}))
        if weights:
            (d / "model.safetensors").write_bytes(b"w" * 32)
        return d

    with_weights, zero3 = ds_ckpt(1, weights=True), ds_ckpt(2, weights=False)
    assert guards.drop_optimizer_state(with_weights) > 64
    assert files_of(with_weights) == {"model.safetensors", "trainer_state.json", guards.COMPLETE}
    # ZeRO-3 without gathered weights: global_step2/ is the only copy of the model, so nothing is deleted
    assert guards.drop_optimizer_state(zero3) == 0 and "global_step2" in files_of(zero3)
    assert not guards.optimizer_state_deleted(zero3)
    assert guards.disk_use(tmp_path)["checkpoints"] == {
        "checkpoint-1": {"bytes": sum(f.stat().st_size for f in with_weights.iterdir()), "optimizer_state": False},
        "checkpoint-2": {"bytes": sum(f.stat().st_size for f in zero3.rglob("*") if f.is_file()),
                         "optimizer_state": True}}


# ---------------------------------------------------------------------------------------- resuming a finished run
def test_resuming_a_finished_checkpoint_with_steps_left_is_refused(tiny_model_dir, synth_data, tmp_path):
    out = tmp_path / "run"
    cfg = cfg_for(tiny_model_dir, synth_data["train"], out, "train.max_steps=4", "train.save_steps=2",
                  "train.save_total_limit=null")
    train(cfg, progress=False)
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(guards.CheckpointError) as e:
        train(cfg, resume=str(out / "checkpoint-2"), progress=False)
    assert str(e.value) == (
        f"cannot resume {out / 'checkpoint-2'} to step 4: its run finished at step 2 and the optimizer state was "
        "deleted then (train.keep_optimizer_state=false), so training on would restart AdamW and the learning-rate "
        "schedule; a run can be extended only if it was trained with --set train.keep_optimizer_state=true, "
        f"otherwise start a new run from its weights ({out})")
    assert (out / "metrics.jsonl").read_text() == before  # refused before anything was touched
    # the CLI: one error line, exit status 2
    args = ["train"] + [a for s in (f"model.name={tiny_model_dir}", f"data.train={synth_data['train']}",
                                    f"output_dir={out}", "data.limit=8", "data.max_length=256", "train.batch_size=2",
                                    "train.grad_accum=1", "train.max_steps=4", "train.lr=1e-3",
                                    "train.warmup_ratio=0", "train.lr_scheduler=constant", "train.save_steps=2",
                                    "anchor.rank=4", "anchor.lam=1", "train.save_total_limit=null")
                        for a in ("--set", s)]
    r = CliRunner().invoke(app, args + ["--resume", str(out / "checkpoint-2")])
    assert r.exit_code == 2 and "train.keep_optimizer_state=true" in r.output, r.output
    # no step left: resuming the last checkpoint only rewrites the summary
    again = train(cfg, resume=str(out / "checkpoint-4"), progress=False)
    assert again["global_step"] == 4 and again["resumed_from"].endswith("checkpoint-4")


def test_resume_of_a_run_that_kept_its_optimizer_state(tiny_model_dir, synth_data, tmp_path):
    out = tmp_path / "run"
    cfg = cfg_for(tiny_model_dir, synth_data["train"], out, "train.max_steps=4", "train.save_steps=2",
                  "train.save_total_limit=null", "train.keep_optimizer_state=true")
    first = train(cfg, progress=False)
    resumed = train(cfg, resume=str(out / "checkpoint-2"), progress=False)
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["global_step"] == 4
    assert resumed["train_loss"] == pytest.approx(first["train_loss"], rel=1e-4)  # the same steps 3 and 4


# ----------------------------------------------------------------------------------------------- the printed line
def test_train_prints_its_disk_use(tiny_model_dir, synth_data, tmp_path):
    out = tmp_path / "run"
    args = ["train"] + [a for s in (f"model.name={tiny_model_dir}", f"data.train={synth_data['train']}",
                                    f"output_dir={out}", "data.limit=8", "data.max_length=256", "train.batch_size=2",
                                    "train.grad_accum=1", "train.max_steps=2", "train.lr=1e-3",
                                    "train.warmup_ratio=0", "train.save_steps=1", "anchor.rank=4")
                        for a in ("--set", s)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    disk = json.loads((out / "run.json").read_text())["disk"]
    line = guards.disk_line(disk, out)
    assert line in r.output.splitlines()
    other = disk["bytes"] - disk["model_bytes"] - disk["checkpoints"]["checkpoint-2"]["bytes"]
    assert line == (f"disk: {guards.human_bytes(disk['bytes'])} in {out} (model "
                    f"{guards.human_bytes(disk['model_bytes'])}, checkpoint-2 "
                    f"{guards.human_bytes(disk['checkpoints']['checkpoint-2']['bytes'])} without optimizer state, "
                    f"other {guards.human_bytes(other)})")


def test_human_bytes():
    assert [guards.human_bytes(n) for n in (0, 1023, 1024, 1536, 100 * 2**20 - 1, 514 * 2**20, 1.6 * 2**30)] == \
        ["0 B", "1023 B", "1.0 KiB", "1.5 KiB", "100.0 MiB", "514 MiB", "1.6 GiB"]


# ------------------------------------------------------------------------------------------------- config keys
def test_checkpoint_keys_are_checked(tmp_path):
    from trl import SFTConfig

    from rpsft.rl.config import load_rl_config
    from rpsft.trainer_args import check_trainer_section

    with pytest.raises(ConfigError, match="train.keep_optimizer_state: expected true/false, got 'sometimes'"):
        load_config(None, ["train.keep_optimizer_state=sometimes"])
    with pytest.raises(ConfigError, match=r"train.save_total_limit must be >= 1 or null \(keep all\), got 0"):
        load_config(None, ["train.save_total_limit=0"])
    with pytest.raises(ConfigError, match=r"train.save_total_limit must be >= 1 or null \(keep all\), got 0"):
        load_rl_config(None, ["train.save_total_limit=0"], init="x")
    with pytest.raises(ConfigError, match=r"trainer.save_total_limit: rpsft sets this one; set "
                                          r"train.save_total_limit instead"):
        check_trainer_section({"save_total_limit": 3}, SFTConfig)
    assert load_rl_config(None, [], init="x").train.save_total_limit == 1


# ---------------------------------------------------------------------------------------------------------- rl
def test_rl_drops_its_optimizer_state_and_refuses_to_extend_without_it(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "synth.jsonl", SYNTH_ROWS)
    out = tmp_path / "rl"
    args = ["rl", "--init", str(tiny_model_dir)]
    for s in tiny_overrides(data, out):
        args += ["--set", s]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not OPTIMIZER_FILES & files_of(out / "checkpoint-2")
    disk = json.loads((out / "run.json").read_text())["disk"]
    now = guards.disk_use(out)  # (rl.log may have grown since: "bytes" is checked file by file for train above)
    assert disk["checkpoints"] == now["checkpoints"] and disk["model_bytes"] == now["model_bytes"] > 0
    assert disk["checkpoints"]["checkpoint-2"]["optimizer_state"] is False
    assert guards.disk_line(disk, out) in r.output.splitlines()
    r = CliRunner().invoke(app, args + ["--resume", "latest", "--set", "train.max_steps=3"])
    assert r.exit_code == 2, r.output
    assert [x for x in r.output.splitlines() if x.startswith("error:")] == [
        f"error: cannot resume {out / 'checkpoint-2'} to step 3: its run finished at step 2 and the optimizer state "
        "was deleted then (train.keep_optimizer_state=false), so training on would restart AdamW and the "
        "learning-rate schedule; a run can be extended only if it was trained with --set "
        f"train.keep_optimizer_state=true, otherwise start a new run from its weights ({out})"]
