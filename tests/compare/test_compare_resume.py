"""`rpsft compare` owns its runs' directories: after a kill at the worst moment, or after a finished run's config
changed, a re-run resumes what it can, trains again what it must (its own points/ included) and reports nothing
stale. Tiny model, three optimizer steps, points at steps 1 and 2."""

from __future__ import annotations

import json

import pytest
import transformers

from rpsft.compare.config import load_compare_config
from rpsft.compare.run import run_compare
from rpsft.guards import COMPLETE


class Killed(BaseException):
    """The process dying: no handler of the code under test catches a BaseException that is not an Exception."""


def kill_in_checkpoint_save(monkeypatch, step: int) -> None:
    """Die inside Trainer's save of ``checkpoint-<step>``: after SavePoints wrote ``points/step-<step>`` (on_step_end
    runs before the save) and after the checkpoint's weights, before its optimizer state, trainer_state.json and
    seal: the checkpoint is torn, the point is on disk."""
    real = transformers.Trainer._save_optimizer_and_scheduler

    def save(self, output_dir):
        if self.state.global_step == step:
            raise Killed(output_dir)
        return real(self, output_dir)

    monkeypatch.setattr(transformers.Trainer, "_save_optimizer_and_scheduler", save)


def compare_sets(tmp_path, tiny_model_dir, synth_data, lr: float) -> list[str]:
    train_cfg = tmp_path / "train.yaml"
    train_cfg.write_text(
        f"model: {{name: {tiny_model_dir}}}\ndata: {{train: {synth_data['train']}, limit: 16, max_length: 96}}\n"
        "anchor: {rank: 4}\ntrain: {max_steps: 3, batch_size: 4, grad_accum: 1, lr: 1.0e-3, save_steps: 1}\n")
    return [f"output_dir={tmp_path / 'out'}", f"train_config={train_cfg}", "methods=[{name: sft}]", "sweep=null",
            "eval_steps=[1, 2]", f"id={{teacher_forced: {synth_data['test']}, limit: 4}}", "ood={suites: []}",
            "probe_max_new_tokens=4", "drift_limit=0", "bootstrap=100",
            f"train_set=[train.lr={lr}, train.warmup_ratio=0]"]


def compare_cli(sets: list[str]):
    from typer.testing import CliRunner

    from rpsft.cli import app

    return CliRunner().invoke(app, ["compare", *[a for s in sets for a in ("--set", s)]])


def steps_logged(run_dir) -> list[int]:
    return [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def frontier(out) -> dict[str, dict]:
    return {r["point"]: r for r in json.loads((out / "frontier.json").read_text())["points"]}


def test_rerun_after_a_kill_between_a_point_and_the_first_sealed_checkpoint(tmp_path, tiny_model_dir, synth_data):
    sets = compare_sets(tmp_path, tiny_model_dir, synth_data, 1e-3)
    out, run = tmp_path / "out", tmp_path / "out" / "runs" / "sft"
    with pytest.MonkeyPatch.context() as m:
        kill_in_checkpoint_save(m, 1)
        with pytest.raises(Killed):
            run_compare(load_compare_config(None, sets), log=lambda msg: None)
    # what the kill left: step 1 logged, its point saved, checkpoint-1 torn, no complete checkpoint to resume from
    assert steps_logged(run) == [1] and (run / "points" / "step-1" / "model.safetensors").is_file()
    assert (run / "checkpoint-1" / "model.safetensors").is_file()
    assert not (run / "checkpoint-1" / "trainer_state.json").exists() and not (run / "checkpoint-1" / COMPLETE).exists()

    res = compare_cli(sets)
    assert res.exit_code == 0, res.output
    assert "starting it again from step 0" in res.output and "train sft done" in res.output
    tr = json.loads((out / "stages" / "sft" / "train.json").read_text())
    assert tr["global_step"] == 3 and tr["resumed_from"] is None
    assert steps_logged(run) == [1, 2, 3]  # one fresh run: the killed attempt's log line is not counted twice
    assert (run / "checkpoint-3" / COMPLETE).is_file()
    rows = frontier(out)
    assert set(rows) == {"base", "sft@1", "sft@2", "sft"}
    assert [rows[p]["step"] for p in ("sft@1", "sft@2", "sft")] == [1, 2, 3]
    for p in ("sft@1", "sft@2", "sft"):
        assert rows[p]["id_gain"]["n"] == 4 and rows[p]["probe_kl"]["delta"] > 0
    # a second re-run has nothing left to do
    res = compare_cli(sets)
    assert res.exit_code == 0, res.output
    assert "skip train sft" in res.output and " ...\n" not in res.output


def test_changed_config_retrains_a_finished_run_through_a_kill(tmp_path, tiny_model_dir, synth_data):
    before = compare_sets(tmp_path, tiny_model_dir, synth_data, 1e-3)
    after = compare_sets(tmp_path, tiny_model_dir, synth_data, 5e-4)
    out, run = tmp_path / "out", tmp_path / "out" / "runs" / "sft"
    run_compare(load_compare_config(None, before), log=lambda msg: None)
    old = frontier(out)
    old_rotation = json.loads((out / "stages" / "rotation.json").read_text())
    # the training config changes; the retrain is killed after its point at step 2, inside checkpoint-2's save
    with pytest.MonkeyPatch.context() as m:
        kill_in_checkpoint_save(m, 2)
        with pytest.raises(Killed):
            run_compare(load_compare_config(None, after), log=lambda msg: None)
    assert (run / "checkpoint-1" / COMPLETE).is_file() and not (run / "checkpoint-2" / COMPLETE).exists()
    assert (run / "points" / "step-2").is_dir() and "lr: 0.0005" in (run / "config.yaml").read_text()
    # nothing of the first training may pass for this one's: not its stage record, evaluations or analyses
    assert not (out / "stages" / "sft" / "train.json").exists()
    assert not (out / "stages" / "sft@1").exists() and not (out / "stages" / "rotation.json").exists()

    res = compare_cli(after)
    assert res.exit_code == 0, res.output
    assert "resuming it from checkpoint-1" in res.output
    assert "discarding points/step-2 (saved after the last complete checkpoint)" in res.output
    tr = json.loads((out / "stages" / "sft" / "train.json").read_text())
    assert tr["global_step"] == 3 and tr["resumed_from"].endswith("checkpoint-1")
    assert tr["config"]["train"]["lr"] == 5e-4
    assert steps_logged(run) == [1, 2, 3]
    new = frontier(out)
    assert set(new) == set(old) == {"base", "sft@1", "sft@2", "sft"}
    for p in ("sft@1", "sft@2", "sft"):
        assert new[p]["probe_kl"]["delta"] != old[p]["probe_kl"]["delta"], p  # measured on the new weights
        for stage in ("eval-id-tf", "probe"):
            key = json.loads((out / "stages" / p / f"{stage}.json").read_text())["stage_key"]
            assert key[-1]["train"]["lr"] == 5e-4, (p, stage)
    rotation = json.loads((out / "stages" / "rotation.json").read_text())
    assert "rotation analysis ..." in res.output
    measured = lambda rep: {k: v for k, v in rep.items() if k not in ("stage_seconds", "stage_key")}  # noqa: E731
    assert measured(rotation) != measured(old_rotation)


def test_what_a_rerun_resumes_discards_and_forgets(tmp_path, tiny_model_dir, synth_data):
    from rpsft.compare.stages import (TrainStart, discard_points_after, forget_run, foreign_files, saved_points,
                                      training_start)
    from rpsft.config import dump_yaml, load_config

    sets = compare_sets(tmp_path, tiny_model_dir, synth_data, 1e-3)
    root, run = tmp_path / "out", tmp_path / "out" / "runs" / "sft"
    tcfg = load_config(tmp_path / "train.yaml", [f"output_dir={run}"])
    assert training_start(run, tcfg, [1, 2]) == TrainStart(None)  # nothing trained there yet
    for step, sealed in ((1, True), (2, True), (3, False)):  # checkpoint-3: torn by a kill before its seal
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        if sealed:
            (run / f"checkpoint-{step}" / COMPLETE).write_text("{}")
    for p in ("step-1", "step-2", "step-3", "step-4.tmp"):
        (run / "points" / p).mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(tcfg))
    (run / "metrics.jsonl").write_text("")
    assert sorted(saved_points(run)) == [1, 2, 3]
    assert training_start(run, tcfg, [1, 2]) == TrainStart(2, "resuming it from checkpoint-2")
    assert training_start(run, tcfg, [1, 2, 3]) == TrainStart(2, "resuming it from checkpoint-2")  # 3: saved again
    # a point the resumed run would not pass again is missing: only a fresh start can make it
    (run / "points" / "step-1").rmdir()
    assert training_start(run, tcfg, [1, 2]) == TrainStart(
        None, "points/step-1 is missing and a run resumed at step 2 would not pass step 1 again: starting it again "
              "from step 0")
    (run / "points" / "step-1").mkdir()
    changed = load_config(tmp_path / "train.yaml", [f"output_dir={run}", "train.lr=5.0e-4"])
    start = training_start(run, changed, [1, 2])
    assert start.step is None and start.why.startswith(f"its training config changed since {run} was trained (")
    assert "-  lr: 0.001" in start.why and "+  lr: 0.0005" in start.why

    # derived results: of this run and its points only, never of another run with a longer name
    derived = ["stages/sft/train.json", "stages/sft/probe.json", "stages/sft@2/probe.json", "stages/sft@3/probe.json",
               "eval/sft@3/id/samples.jsonl", "eval/sft/id/samples.jsonl", "stages/rotation.json",
               "stages/drift.json", "stages/sft-seed7/probe.json", "stages/sft-seed7@3/probe.json",
               "stages/base/base-logp-x.npy"]
    for f in derived:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("{}")
    assert discard_points_after(root, "sft", run, 2) == [3]
    assert sorted(p.name for p in (run / "points").iterdir()) == ["step-1", "step-2"]  # step-4.tmp: half-written
    left = {f for f in derived if (root / f).exists()}
    assert left == set(derived) - {"stages/sft@3/probe.json", "eval/sft@3/id/samples.jsonl"}

    (run / ".rpsft.lock").write_text("")
    (run / "notes.txt").write_text("mine")
    (run / "plots").mkdir()
    assert foreign_files(run) == ["notes.txt", "plots/"]
    with pytest.raises(FileExistsError) as e:
        run_compare(load_compare_config(None, [*sets[:-1], "train_set=[train.lr=5.0e-4, train.warmup_ratio=0]"]),
                    log=lambda msg: None)
    assert str(e.value) == (f"{run} holds files that neither rpsft train nor rpsft compare writes (notes.txt, plots/); "
                            "compare must train sft there from scratch and would delete them: move them out of that "
                            "directory and run compare again")
    assert (run / "config.yaml").is_file() and (root / "stages" / "sft" / "train.json").is_file()  # nothing touched
    (run / "notes.txt").unlink()
    (run / "plots").rmdir()
    forget_run(root, "sft", run)
    assert sorted(p.name for p in run.iterdir()) == [".rpsft.lock"]
    assert {f for f in derived if (root / f).exists()} == {"stages/sft-seed7/probe.json",
                                                           "stages/sft-seed7@3/probe.json",
                                                           "stages/base/base-logp-x.npy"}
