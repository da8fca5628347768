"""DAPOTrainer on a tiny random Llama: the overlong punishment reaches the advantages, dynamic sampling refills
and masks, the anchor acts during RL, and a 2-step ``rpsft rl`` run writes a loadable checkpoint and metrics."""

from __future__ import annotations

import json

import pytest
import torch

from .rl_helpers import SYNTH_ROWS, tiny_overrides

from rpsft.rl import load_prompts, load_rl_config
from rpsft.rl.trainer import build_trainer


def make_trainer(tiny_model_dir, synth_file, tmp_path, extra: dict, anchor: bool = False):
    import datasets

    from rpsft.models import load_model
    from rpsft.train import build_anchor

    cfg = load_rl_config(None, tiny_overrides(synth_file, tmp_path / "run", **extra), init=str(tiny_model_dir))
    model, tok = load_model(cfg.init)
    a = build_anchor(model, cfg) if anchor else None
    trainer = build_trainer(cfg, model, tok, datasets.Dataset.from_list(load_prompts(cfg)), tmp_path / "run",
                            anchor=a)
    return trainer, tok


class Canned:
    """Stands in for generation: round r returns ``plan[r]``, one completion spec per row (True = "\\boxed{7}",
    the right answer for every SYNTH_ROWS prompt, False = "\\boxed{3}", or an int = right answer padded to that
    many tokens). Each completion ends with EOS."""

    def __init__(self, tok, plan):
        self.tok, self.plan, self.calls = tok, plan, 0

    def ids(self, spec) -> list[int]:
        box = self.tok.encode("The answer is \\boxed{7}." if spec is not False else "The answer is \\boxed{3}.")
        if isinstance(spec, int) and not isinstance(spec, bool):
            filler = self.tok.encode(" apples")[:1]
            box = box + filler * (spec - len(box) - 1)
        return box + [self.tok.eos_token_id]

    def __call__(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        specs = self.plan[min(self.calls, len(self.plan) - 1)]
        self.calls += 1
        assert len(specs) == len(prompt_ids), (len(specs), len(prompt_ids))
        return [self.ids(s) for s in specs], None


def rows(trainer, n_groups: int) -> list[dict]:
    return [trainer.train_dataset[i] for i in range(n_groups) for _ in range(trainer.num_generations)]


def test_overlong_punishment_lowers_the_advantage(tiny_model_dir, synth_file, tmp_path):
    # L_max = 40, L_cache = 20: a correct 30-token answer earns 1 - 0.5, a correct short one 1
    trainer, tok = make_trainer(tiny_model_dir, synth_file, tmp_path,
                                {"dapo.max_completion_length": 40, "dapo.overlong_buffer": 20,
                                 "dapo.dynamic_sampling": "false"})
    canned = Canned(tok, [[True, 30, True, True]])
    assert len(canned.ids(30)) == 30
    trainer._generate_single_turn = canned
    trainer.model.train()
    out = trainer._generate_and_score_completions(rows(trainer, 2))
    adv = out["advantages"].tolist()
    assert adv[0] > 0 > adv[1]  # same correctness, the long one is punished
    assert adv[2] == adv[3] == 0.0
    m = trainer._metrics["train"]
    assert m["rewards/soft_overlong_punishment_reward/mean"][-1] == pytest.approx(-0.5 / 4)
    assert m["reward"][-1] == pytest.approx((4 - 0.5) / 4)


def test_dynamic_sampling_refills_with_informative_groups(tiny_model_dir, synth_file, tmp_path):
    trainer, tok = make_trainer(tiny_model_dir, synth_file, tmp_path, {"dapo.max_gen_rounds": 3})
    # round 1: group 0 all right (dropped), group 1 mixed; round 2 (refill of 2 groups): both mixed
    canned = Canned(tok, [[True, True, True, False], [False, True, True, False]])
    trainer._generate_single_turn = canned
    trainer.model.train()
    out = trainer._generate_and_score_completions(rows(trainer, 2))
    assert canned.calls == 2
    assert out["completion_ids"].shape[0] == 4
    assert (out["advantages"] != 0).all()  # every group in the batch carries signal
    assert int(out["num_items_in_batch"]) == int(out["completion_mask"].sum())
    m = trainer._metrics["train"]
    assert m["dynamic_sampling/gen_rounds"] == [2]
    assert m["dynamic_sampling/informative_frac"] == [pytest.approx(3 / 4)]
    assert m["dynamic_sampling/masked_groups"] == [0]


def test_dynamic_sampling_masks_what_it_cannot_refill(tiny_model_dir, synth_file, tmp_path):
    trainer, tok = make_trainer(tiny_model_dir, synth_file, tmp_path, {"dapo.max_gen_rounds": 1})
    trainer._generate_single_turn = Canned(tok, [[False, False, True, False]])
    trainer.model.train()
    out = trainer._generate_and_score_completions(rows(trainer, 2))
    assert out["completion_mask"][2:].sum() == 0 and (out["advantages"][2:] == 0).all()
    assert out["completion_mask"][:2].sum() > 0
    assert int(out["num_items_in_batch"]) == int(out["completion_mask"][:2].sum())
    assert trainer._metrics["train"]["dynamic_sampling/masked_groups"] == [1]


def test_two_steps_train_with_the_anchor_on(tiny_model_dir, synth_file, tmp_path):
    trainer, tok = make_trainer(tiny_model_dir, synth_file, tmp_path,
                                {"anchor.enabled": "true", "anchor.rank": 4, "train.save_steps": 100,
                                 "dapo.max_completion_length": 24}, anchor=True)
    trainer._generate_single_turn = Canned(tok, [[True, False, False, True]])
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 2
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert any("q_proj" in n for n in changed)
    logs = [r for r in trainer.state.log_history if "reward" in r]
    assert len(logs) == 2
    assert logs[0]["accuracy"] == 0.5 and logs[0]["reward"] == pytest.approx(0.0)  # (+1 - 1 - 1 + 1) / 4
    for key in ("entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "completions/mean_length",
                "dynamic_sampling/informative_frac"):
        assert key in logs[0], key
    # R = 0 at the first step (weights = the anchored init), > 0 once RL has moved them
    assert logs[0]["rpsft/penalty"] == pytest.approx(0.0, abs=1e-10)
    assert logs[1]["rpsft/penalty"] > 0


def test_rotation_budget_during_rl(tiny_model_dir, synth_file, tmp_path):
    trainer, tok = make_trainer(tiny_model_dir, synth_file, tmp_path,
                                {"anchor.enabled": "true", "anchor.rank": 4, "anchor.budget": 1e-6,
                                 "anchor.lam": 0.5, "train.save_steps": 2, "train.max_steps": 3,
                                 "dapo.max_completion_length": 24}, anchor=True)
    trainer._generate_single_turn = Canned(tok, [[True, False, False, True]])
    trainer.train()
    logs = [r for r in trainer.state.log_history if "reward" in r]
    lams = [r["rpsft/lambda"] for r in logs]
    # step 1 measures W0; then RL drifts far beyond ε = 1e-6 and the controller raises λ every step
    assert lams[0] == pytest.approx(0.5) and lams[2] > lams[1] > lams[0] and logs[2]["rpsft/drift"] > 1e-6
    saved = json.loads((tmp_path / "run" / "checkpoint-2" / "rpsft_budget.json").read_text())
    assert saved["lam"]["all"] == pytest.approx(lams[1])


def test_rl_cli_two_step_run(tiny_model_dir, synth_file, tmp_path):
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from rpsft.cli import app

    out = tmp_path / "rl"
    args = ["rl", "--init", str(tiny_model_dir)]
    # keep_optimizer_state: a finished run can be extended (below); without it, that is refused (tests/test_disk.py)
    for s in tiny_overrides(synth_file, out, **{"train.keep_optimizer_state": "true", "eval.enabled": "true",
                                                "eval.suite": str(synth_file), "eval.limit": 2,
                                                "eval.max_new_tokens": 8}):
        args += ["--set", s]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    run = json.loads((out / "run.json").read_text())
    assert run["global_step"] == 2 and run["generation"] == "transformers"
    assert set(run["eval_before"]) >= {"synth", "wall_s"} and "avg_at_k" in run["eval_after"]["synth"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert "rewards/math_reward/mean" in steps[0] and "rewards/soft_overlong_punishment_reward/mean" in steps[0]
    assert (out / "config.yaml").is_file() and (out / "checkpoint-2").is_dir()
    AutoModelForCausalLM.from_pretrained(out)  # the RL checkpoint loads
    # a second run refuses to clobber it; --resume continues from the last checkpoint
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "--resume" in res.output
    res = CliRunner().invoke(app, args + ["--resume", "latest", "--set", "dapo.epsilon_high=0.3"])
    assert res.exit_code == 2 and "cannot resume" in res.output and "dapo.epsilon_high" in res.output
    res = CliRunner().invoke(app, args + ["--resume", "latest", "--set", "train.max_steps=3",
                                          "--set", "eval.enabled=false"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "run.json").read_text())["global_step"] == 3


def test_cli_bad_input_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from rpsft.cli import app

    res = CliRunner().invoke(app, ["rl", "--set", "dapo.num_generation=2", "--init", "x"])
    assert res.exit_code == 2 and "did you mean 'dapo.num_generations'" in res.output
    res = CliRunner().invoke(app, ["rl"])
    assert res.exit_code == 2 and "--init" in res.output


def test_rows_all_answer_seven():
    assert {r["answer"] for r in SYNTH_ROWS} == {"7"}


def test_rl_stops_at_a_non_finite_step_and_seals_its_checkpoints(tiny_model_dir, synth_file, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    import rpsft.rl.trainer as rl_trainer
    from rpsft.guards import COMPLETE, NonFiniteError
    from rpsft.rl.run import run_rl

    made = {}

    def canned_build(cfg, model, tok, *args, **kwargs):
        trainer = build_trainer(cfg, model, tok, *args, **kwargs)
        trainer._generate_single_turn = Canned(tok, [[True, False, False, True]])
        made["trainer"] = trainer
        return trainer

    class PoisonAtStep2(TrainerCallback):  # a weight goes NaN before step 2's forward pass
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if "q_proj" in n)[0, 0] = float("nan")

    monkeypatch.setattr(rl_trainer, "build_trainer", canned_build)
    cfg = load_rl_config(None, tiny_overrides(synth_file, tmp_path / "run", **{"train.max_steps": 3,
                                                                               "dapo.max_completion_length": 24}),
                         init=str(tiny_model_dir))
    with pytest.raises(NonFiniteError, match=r"training stopped at step 2: loss .*not finite.*checkpoint-1"):
        run_rl(cfg, progress=False, extra_callbacks=[PoisonAtStep2()])
    assert made["trainer"].state.global_step == 1
    assert (tmp_path / "run" / "checkpoint-1" / COMPLETE).is_file()  # sealed: --resume latest may trust it
    assert not (tmp_path / "run" / "checkpoint-2").exists()
    with pytest.raises(ValueError, match="train.nan_policy must be stop or skip"):
        run_rl(load_rl_config(None, tiny_overrides(synth_file, tmp_path / "r2", **{"train.nan_policy": "ignore"}),
                              init=str(tiny_model_dir)), progress=False)
