"""The experiment pipeline end to end on a tiny model: two methods + a 2-point sweep, then a resumed re-run."""

from __future__ import annotations

import json

import pytest

from rpsft.compare.config import load_compare_config
from rpsft.compare.grid import plan_runs
from rpsft.compare.report import plot_rank_sweep, plot_tradeoff, render_table
from rpsft.compare.run import run_compare
from rpsft.config import ConfigError


def make_cfg(tmp_path, tiny_model_dir, synth_data, *extra):
    train_cfg = tmp_path / "train.yaml"
    train_cfg.write_text(
        f"model: {{name: {tiny_model_dir}}}\ndata: {{train: {synth_data['train']}, limit: 16, max_length: 96}}\n"
        "anchor: {rank: 4}\ntrain: {max_steps: 2, batch_size: 4, grad_accum: 1, lr: 1.0e-3, save_steps: 1}\n")
    return load_compare_config(None, [
        f"output_dir={tmp_path / 'out'}", f"train_config={train_cfg}",
        "methods=[{name: sft}, {name: rpsft}]", "sweep={method: rpsft, ranks: [2, 4]}",
        "id={suites: [synth-math], optional: [gsm8k-nowhere.jsonl], limit: 3, max_new_tokens: 12, batch_size: 3}",
        "ood={suites: []}", "drift_limit=4", *extra])


def test_plan_dedupes_identical_runs(tmp_path, tiny_model_dir, synth_data):
    runs = plan_runs(make_cfg(tmp_path, tiny_model_dir, synth_data))
    assert [r.name for r in runs] == ["sft", "rpsft", "rpsft-k2"]  # rpsft-k4 is the rpsft run (rank 4)
    assert runs[1].aliases == ["rpsft-k4"]
    assert [r.k for r in runs] == [0, 4, 2]
    with pytest.raises(ConfigError, match="unknown compare key"):
        load_compare_config(None, ["method=sft"])


def test_extends_merges_the_parent_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "study.yaml").write_text(
        "output_dir: results/study\nmethods: [{name: sft, eval_steps: [4]}]\n"
        "sweep: [{method: rpsft, lam: [1, 10]}]\nid: {teacher_forced: t.jsonl, limit: 200}\nbootstrap: 1000\n")
    (tmp_path / "configs" / "more.yaml").write_text(  # the parent named relative to the working directory
        "extends: configs/study.yaml\nsweep: [{method: rpsft, lam: [1, 10]}, {method: rpsft, budget: [1.0e-4]}]\n"
        "id: {limit: 50}\n")
    (tmp_path / "configs" / "sib.yaml").write_text("extends: study.yaml\nbootstrap: 2000\n")  # next to it
    cfg = load_compare_config(tmp_path / "configs" / "more.yaml", ["bootstrap=1500"])
    assert cfg.output_dir == "results/study" and cfg.methods == [{"name": "sft", "eval_steps": [4]}]
    assert cfg.sweep[-1] == {"method": "rpsft", "budget": [1.0e-4]} and len(cfg.sweep) == 2  # lists replace
    assert (cfg.id.teacher_forced, cfg.id.limit) == ("t.jsonl", 50)  # sections merge key by key
    assert cfg.bootstrap == 1500  # --set still wins
    assert load_compare_config(tmp_path / "configs" / "sib.yaml").bootstrap == 2000
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_compare_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"c.yaml: extends nowhere.yaml, which does not exist"):
        load_compare_config(tmp_path / "c.yaml")


def test_pairs_name_points_of_the_plan(tmp_path, tiny_model_dir, synth_data):
    with pytest.raises(ConfigError, match="pairs: every entry is two point names"):
        make_cfg(tmp_path, tiny_model_dir, synth_data, "pairs=[[sft]]")
    cfg = make_cfg(tmp_path, tiny_model_dir, synth_data, "pairs=[[rpsft-k2, sfft]]")
    with pytest.raises(ConfigError, match="pairs: 'sfft' is not a point of this comparison; the points are base, "
                                          "rpsft, rpsft-k2, rpsft-k4, sft"):
        run_compare(cfg, log=lambda m: None)
    assert not (tmp_path / "out" / "runs").exists()  # refused before anything trained


def test_pipeline_end_to_end_and_resume(tmp_path, tiny_model_dir, synth_data, monkeypatch):
    monkeypatch.setenv("RPSFT_SYNTH_DIR", str(synth_data["test"].parent))
    cfg = make_cfg(tmp_path, tiny_model_dir, synth_data)
    logs = []
    summary = run_compare(cfg, log=logs.append)
    out = tmp_path / "out"
    for f in ("summary.json", "table.md", "tradeoff.png", "rank_sweep.png", "rotation.png", "drift.png"):
        assert (out / f).is_file(), f
    rows = {r["run"]: r for r in summary["rows"]}
    assert set(rows) == {"sft", "rpsft", "rpsft-k2", "base"} and summary["rows"][0]["run"] == "base"
    assert rows["base"]["probe_kl"] == 0.0 and rows["sft"]["probe_kl"] > 0
    assert rows["sft"]["rotation_deg"] > 0 and rows["rpsft"]["drift"] > 0
    assert rows["rpsft"]["cost"]["anchor_mib"] > 0 and rows["sft"]["cost"]["anchor_mib"] == 0
    assert rows["sft"]["delta"]["probe_kl"] == pytest.approx(rows["sft"]["probe_kl"])
    assert "id:synth-math" in rows["base"]
    skipped = json.loads((out / "stages" / "base" / "eval-id.json").read_text())["skipped"]
    assert "gsm8k-nowhere.jsonl" in skipped
    # every tuned point's ΔW split into the blocks of the base's top-k frame, at the training config's k (4)
    from rpsft.analysis.blocks import run_blocks

    direct = run_blocks(str(tiny_model_dir), [summary["rows"][1]["model"]], rank=4)["checkpoints"][0]["all"]["energy"]
    b = rows[summary["rows"][1]["run"]]["blocks"]
    assert b["rank"] == 4 and rows["base"]["blocks"] is None and (out / "blocks.png").is_file()
    assert (b["A"], b["BC"], b["D"], b["total"]) == (direct["A"], direct["B"] + direct["C"], direct["D"],
                                                      direct["total"])
    frontier = json.loads((out / "frontier.json").read_text())
    assert all(p["blocks"]["total"] > 0 for p in frontier["points"] if p["point"] != "base")
    kl = {a["block"]: a for a in frontier["block_association"] if a["measure"] == "probe_kl"}
    assert set(kl) == {"A", "BC", "D", "total"} and kl["total"]["n"] == 3
    assert frontier["block_association"] == summary["block_association"]
    md = (out / "table.md").read_text()
    assert "## Where the drift went" in md and "## Forgetting against where the drift went" in md
    table = render_table(summary)
    assert table.splitlines()[0].startswith("| run | k | id:synth-math")
    assert "paper protocol" in table  # the OOD multiple-choice protocol is named under the table
    assert "lm-eval protocol" in render_table({**summary, "config": {"ood": {"mc_protocol": "lm-eval"}}})
    # a second run redoes nothing: every stage is skipped
    logs.clear()
    run_compare(cfg, log=logs.append)
    assert not any(m.endswith("...") for m in logs), logs
    assert sum("skip" in m for m in logs) >= 10
    # a changed input redoes exactly the stages that depend on it
    logs.clear()
    run_compare(make_cfg(tmp_path, tiny_model_dir, synth_data, "drift_limit=3"), log=logs.append)
    redone = [m for m in logs if m.endswith("...")]
    assert [m for m in redone] == ["[bold]drift analysis[/bold] ..."], redone
    # a changed training config retrains from scratch (the finished run's checkpoints are stale, not resumed)
    logs.clear()
    changed = make_cfg(tmp_path, tiny_model_dir, synth_data, "drift_limit=3", "methods=[{name: sft}]", "sweep=null",
                       "train_set=[train.lr=5.0e-4]")
    summary = run_compare(changed, log=logs.append)
    assert "[bold]train sft[/bold] ..." in logs
    assert any(m.startswith("[yellow]train sft: its training config changed since") and "lr: 0.0005" in m
               and m.endswith("training it again from scratch[/yellow]") for m in logs), logs
    steps = [json.loads(x)["step"] for x in (out / "runs" / "sft" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2]  # logged once each: a fresh run, not a resumed one appending to the old log


def test_k_is_the_anchored_rank_of_each_method(tmp_path, tiny_model_dir, synth_data):
    cfg = make_cfg(tmp_path, tiny_model_dir, synth_data,
                   "methods=[{name: sft}, {name: dft}, {name: l2init}, {name: rpsft}, "
                   "{name: sft, label: sft-anchored, set: [anchor.enabled=true]}]", "sweep=null")
    # dft has no anchor: k is 0 although the train config says anchor.rank=4; L2-Init anchors at full rank
    assert {r.name: r.k for r in plan_runs(cfg)} == {"sft": 0, "dft": 0, "l2init": "full", "rpsft": 4,
                                                     "sft-anchored": 4}


def test_rank_sweep_plot_spans_sft_to_l2init(tmp_path, monkeypatch):
    import matplotlib.axes

    seen = {}
    real = matplotlib.axes.Axes.set_xticks
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xticks",
                        lambda self, ticks, labels=None, **kw: seen.update(labels=list(labels)) or
                        real(self, ticks, labels, **kw))
    row = lambda run, method, k, id_avg: {"run": run, "method": method, "k": k, "id_avg": id_avg,  # noqa: E731
                                           "ood_avg": None, "probe_kl": 0.1}
    summary = {"rows": [row("base", "base", None, 0.1), row("rpsft-k64", "rpsft", 64, 0.3),
                        row("l2init", "l2init", "full", 0.2), row("sft", "sft", 0, 0.5),
                        row("rpsft", "rpsft", 8, 0.4), row("dft", "dft", 0, 0.45)]}
    plot_rank_sweep(summary, "rpsft", tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert seen["labels"] == ["0 (SFT)", "8", "64", "full (L2-Init)"]  # dft (k=0, not SFT) is not a sweep point


def test_tradeoff_plot_labels_coincident_runs_once(tmp_path, monkeypatch):
    import matplotlib.axes

    notes = []
    real = matplotlib.axes.Axes.annotate
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate",
                        lambda self, text, *a, **kw: notes.append(text) or real(self, text, *a, **kw))
    row = lambda run, i, o, kl: {"run": run, "id_avg": i, "ood_avg": o, "probe_kl": kl}  # noqa: E731
    summary = {"rows": [row("base", 0.0, 0.3, 0.0), row("sft", 0.05, 0.2, 0.02), row("rpsft", 0.05, 0.2, 0.01),
                        row("lora", 0.03, None, 0.04)]}
    plot_tradeoff(summary, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000
    # panel 1 (ID vs OOD): sft and rpsft coincide, lora has no OOD score; panel 2 (ID vs −KL): all apart
    assert notes == ["base", "sft, rpsft", "base", "sft", "rpsft", "lora"]


def test_a_budget_a_run_cannot_use_fails_before_any_training(tmp_path, tiny_model_dir, synth_data):
    # the ball cannot project rpsft_lora's anchor (W0 + s·BA): train() would refuse that run when its turn came
    cfg = make_cfg(tmp_path, tiny_model_dir, synth_data, "methods=[{name: rpsft}, {name: rpsft_lora}]",
                   "train_set=[anchor.budget=0.1, anchor.budget_form=ball]")
    with pytest.raises(ConfigError, match="method=rpsft_lora anchors W0 \\+ s·BA"):
        run_compare(cfg, log=lambda m: None)
    assert not (tmp_path / "out" / "runs").exists()

def test_sweep_grid_names_keys_and_refuses_unknown_keys(tmp_path, tiny_model_dir, synth_data):
    ranks = tmp_path / "ranks.json"
    ranks.write_text('{"model.layers.0.self_attn.q_proj.weight": 3}')
    cfg = make_cfg(tmp_path, tiny_model_dir, synth_data, "methods=[{name: sft}]",
                   f"sweep=[{{method: rpsft, lam: [0.5, 10], rank: [2, '@{ranks}']}}, {{method: sft, seed: [7]}}]",
                   "eval_steps=[1]")
    runs = plan_runs(cfg)
    assert [r.name for r in runs] == ["sft", "rpsft-lam0.5-k2", "rpsft-lam0.5-kranks", "rpsft-lam10-k2",
                                      "rpsft-lam10-kranks", "sft-seed7"]
    assert [r.family for r in runs] == ["sft", "rpsft k=2", "rpsft k=ranks", "rpsft k=2", "rpsft k=ranks", "sft"]
    assert runs[3].overrides[-2:] == ["anchor.lam=10", "anchor.rank=2"] and runs[5].seed == 7
    assert all(r.eval_steps == [1] for r in runs)
    # any config key: aliases, dotted keys, or a bare anchor./train. field (as `budget` will be once it exists)
    from rpsft.compare.config import sweep_key

    assert [sweep_key(k) for k in ("lam", "ranks", "niter", "warmup_ratio", "data.max_length")] == [
        "anchor.lam", "anchor.rank", "anchor.niter", "train.warmup_ratio", "data.max_length"]
    with pytest.raises(ConfigError, match="did you mean 'lam'"):
        make_cfg(tmp_path, tiny_model_dir, synth_data, "sweep={method: rpsft, lamb: [1, 2]}")
    with pytest.raises(ConfigError, match="names nothing to sweep"):
        make_cfg(tmp_path, tiny_model_dir, synth_data, "sweep={method: rpsft}")
    with pytest.raises(ConfigError, match="eval_steps"):
        make_cfg(tmp_path, tiny_model_dir, synth_data, "eval_steps=[0, 2]")
    # a missing teacher-forced data file or rank map fails before any training
    with pytest.raises(ConfigError, match="id.teacher_forced: .*nowhere"):
        run_compare(make_cfg(tmp_path, tiny_model_dir, synth_data, "id={teacher_forced: nowhere.jsonl}"))
    with pytest.raises(ConfigError, match="rank map .*absent.json does not exist"):
        run_compare(make_cfg(tmp_path, tiny_model_dir, synth_data, "sweep={method: rpsft, rank: ['@absent.json']}"))
    assert not (tmp_path / "out" / "runs").exists()


def test_frontier_of_a_lambda_grid_with_checkpoints_end_to_end(tmp_path, tiny_model_dir, synth_data, monkeypatch):
    monkeypatch.setenv("RPSFT_SYNTH_DIR", str(synth_data["test"].parent))
    cfg = make_cfg(tmp_path, tiny_model_dir, synth_data, "methods=[{name: sft}]",
                   "sweep={method: l2init, lam: [0.1, 1000]}", "eval_steps=[2]", "rotation=false", "drift_limit=0",
                   "train_set=[train.max_steps=4, train.warmup_ratio=0]",
                   f"id={{teacher_forced: {synth_data['test']}, limit: 6}}", "bootstrap=200", "keep_checkpoints=false")
    summary = run_compare(cfg, log=lambda m: None)
    out = tmp_path / "out"
    assert (out / "frontier.png").stat().st_size > 1000
    rows = {r["point"]: r for r in json.loads((out / "frontier.json").read_text())["points"]}
    assert set(rows) == {"base", "sft@2", "sft", "l2init-lam0.1@2", "l2init-lam0.1", "l2init-lam1000@2", "l2init-lam1000"}
    assert (out / "runs" / "sft" / "points" / "step-2" / "config.json").is_file()
    assert not list((out / "runs" / "sft").glob("checkpoint-*"))  # finished: optimizer states deleted
    assert len(list((out / "stages" / "base").glob("base-logp-*.npy"))) == 1  # the base's probe side, computed once
    assert rows["sft@2"]["step"] == 2 and rows["sft"]["step"] == 4 and not rows["sft@2"]["final"]
    assert rows["l2init-lam1000@2"]["vs_sft"]["point"] == "sft@2" and rows["l2init-lam1000"]["vs_sft"]["point"] == "sft"
    for r in rows.values():
        for d in (r["id_gain"], r["probe_kl"], r["forgetting"]):
            assert d["lo"] <= d["delta"] <= d["hi"]
        assert r["id_gain"]["n"] == 6
    assert rows["base"]["pareto"]  # nothing forgets less than the base itself
    assert rows["sft"]["probe_kl"]["delta"] > 0 and rows["sft"]["probe_kl"]["n"] >= 200
    # the KL a checkpoint has moved grows along training, and the strong anchor moves less than SFT does
    assert rows["sft"]["probe_kl"]["delta"] > rows["sft@2"]["probe_kl"]["delta"]
    assert rows["l2init-lam1000"]["probe_kl"]["delta"] < rows["sft"]["probe_kl"]["delta"]
    assert "## Trade-off frontier" in (out / "table.md").read_text()
    assert [r["run"] for r in summary["rows"] if not r["final"]] == ["sft@2", "l2init-lam0.1@2", "l2init-lam1000@2"]


def test_cli_shows_stage_lines_and_training_progress_only(tmp_path, tiny_model_dir, synth_data):
    from typer.testing import CliRunner

    from rpsft.cli import app

    train_cfg = tmp_path / "train.yaml"
    train_cfg.write_text(
        f"model: {{name: {tiny_model_dir}}}\ndata: {{train: {synth_data['train']}, limit: 8, max_length: 96}}\n"
        "anchor: {rank: 4}\ntrain: {max_steps: 2, batch_size: 4, grad_accum: 1, lr: 1.0e-3, save_steps: 1}\n")
    out = tmp_path / "out"
    args = ["compare"]
    for s in [f"output_dir={out}", f"train_config={train_cfg}", "methods=[{name: sft}]", "sweep=null",
              f"id={{teacher_forced: {synth_data['test']}, limit: 4}}", "ood={suites: []}", "probe=false",
              "rotation=false", "drift_limit=0"]:
        args += ["--set", s]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "train sft done" in res.output and "eval-id-tf sft done" in res.output and "train step 2/2" in res.output
    for noise in ("Loading weights", "examples/s", "it/s]", "Warning"):
        assert noise not in res.output, noise
