"""The launch matrix: the real ``rpsft`` command lines, as users start them, on a tiny Llama with the SmolLM2
tokenizer (2 optimizer steps).

* ``rpsft train`` for every registered method (read from the registry: a method added later gets its cells) ×
  {one process; ``accelerate launch`` with the shipped ddp-cpu2 config (DDP over gloo, 2 CPU processes); FSDP2 over
  2 CPU processes (the stand-in of fsdp2_cpu.py)}. The three launchers compute the same optimizer steps (global
  batch 4), so every multi-process run must end where the one-process run ends. Each multi-process cell then leaves
  the run directory as a kill after step 1 would, finishes the run with ``--resume latest``, and trains it again
  from scratch with ``--overwrite``: both must end on the same weights.
* ``rpsft rl`` (1 step, dynamic sampling on) under 2 processes, with its before/after evaluation.
* ``rpsft eval`` and ``rpsft compare`` (a 1-run config) in one process, and their one-line refusal under a launcher.
* ``rpsft train`` and ``rpsft rl`` under the FSDP config launched by accelerate alone on CPU processes (no
  stand-in): each rank refuses, since accelerate would train DDP.

``make test`` runs every cell of rpsft, lora, rpsft_lora, rl, eval and compare and the refusals; the other methods'
cells are marked ``launch_full`` and run with ``make test-launch``.
"""

from __future__ import annotations

import math

import pytest

from rpsft.methods import REGISTRY, available

from . import matrix
from .matrix import LR, finished, loss_rows, rel_distance, simulate_kill_after_step

pytestmark = pytest.mark.slow  # minutes of subprocesses: in CI (`make test`), not in `make test-fast`

# every launcher of these methods runs in `make test` (CI); the other methods' cells with `make test-launch`
# (rpsft_lora: the anchor on DTensor LoRA factors under FSDP2 and the merge of sharded adapters)
CI_METHODS = ("rpsft", "lora", "rpsft_lora")

# How far two runs of the same steps may end apart, relative to how far they moved (‖a − b‖ / ‖b − W_init‖).
# Measured: DDP 4e-7 to 2e-6 from one process, FSDP2 5e-7 to 3e-6 (another summation order of the same fp32 sums),
# rpsft under FSDP2 1.2e-4 (its anchor gradient at step 1 is fp32 round-off, summed differently when sharded, and
# Adam's first step moves every coordinate by ±lr whatever its gradient's size); a resumed or repeated run on one
# launcher: 0 (bit for bit).
ACROSS_LAUNCHERS = 1e-3
SAME_LAUNCHER = 1e-4


# Cells whose correct outcome is a refusal at startup: (method, launcher) -> the start of each rank's `error:` line.
REFUSED_CELLS = {("osf", "fsdp2"): "error: method=osf under FSDP"}  # PEFT's OSF gradient hooks (methods/osf.py)


def _cells():
    for method in available():
        for launcher in matrix.LAUNCHERS:
            marks = () if method in CI_METHODS else (pytest.mark.launch_full,)
            yield pytest.param(method, launcher, marks=marks, id=f"{method}-{launcher}")


def check_run(t: matrix.Trained, method: str, init: dict) -> None:
    """What every finished 2-step run of ``method`` must have left, whatever launched it."""
    s = t.summary
    assert s["method"] == method and s["global_step"] == 2, t.launch.tail()
    assert len(t.losses) == 2 and all(math.isfinite(x) for x in t.losses), t.losses
    m = REGISTRY[method]
    anchored = m.anchor in ("on", "full")  # the others run without an anchor unless anchor.enabled=true
    assert (s["anchor"] is not None) == anchored, s["anchor"]
    if anchored:
        assert math.isfinite(s["anchor"]["final_penalty"]) and s["anchor"]["final_penalty"] > 0
    if m.finalize is not None:  # adapter methods: merged/ is a plain checkpoint under the base model's names
        assert (t.run_dir / "merged" / "config.json").is_file() and s.get("merged_model")
    missing = set(init) - set(t.weights)
    assert not missing, f"final weights lack {sorted(missing)[:4]}"
    extra = set(t.weights) - set(init)  # the tiny Llama ties its embeddings: lm_head.weight is not a second tensor
    assert not extra, f"final weights add {sorted(extra)[:4]}"
    moved = max(float((t.weights[k] - init[k]).abs().max()) for k in init)
    assert moved > 0.5 * LR, f"2 steps at lr {LR} moved no weight by more than {moved:.2e}"


def check_same_steps(t: matrix.Trained, ref: matrix.Trained, init: dict, tol: float) -> None:
    """``t`` took the optimizer steps ``ref`` took: same per-step losses, same final penalty, same weights."""
    assert t.losses == pytest.approx(ref.losses, rel=1e-4), (t.losses, ref.losses)
    if ref.summary["anchor"] is not None:
        assert t.summary["anchor"]["final_penalty"] == pytest.approx(ref.summary["anchor"]["final_penalty"],
                                                                     rel=1e-3)
    d = rel_distance(t.weights, ref.weights, init)
    matrix.DISTANCES.append((f"{t.launch.name} vs {ref.launch.name}", d))
    assert d <= tol, f"{t.run_dir.name} ended {d:.2e} (relative) away from {ref.run_dir.name}"


def _checkpoints(run_dir):
    return sorted(p.name for p in run_dir.glob("checkpoint-*"))


@pytest.mark.parametrize("method, launcher", list(_cells()))
def test_train(method, launcher, launch_matrix, assets):
    ref = launch_matrix.reference(method)  # the one-process cell itself, and every other cell's reference
    check_run(ref, method, assets.init)
    if launcher == "one":
        return
    out = assets.root / "runs" / f"{method}-{launcher}"
    name = f"train {method} {launcher}"
    if (method, launcher) in REFUSED_CELLS:
        refused = launch_matrix.launch(f"{name} (refused)", launcher, launch_matrix.train_args(method, out, 2))
        errors = refused.error_lines()
        assert refused.returncode != 0 and len(errors) == 2, refused.tail()  # each rank: one line, exit 2
        assert all(e.startswith(REFUSED_CELLS[method, launcher]) for e in errors), refused.tail()
        assert not out.exists()  # before the run directory was touched
        return

    # 1. a fresh run; every checkpoint kept with its optimizer state, so that a kill after step 1 can be replayed
    keep = ("train.keep_optimizer_state=true", "train.save_total_limit=null")
    first = launch_matrix.launch(name, launcher, launch_matrix.train_args(method, out, 2, *keep))
    assert first.returncode == 0, first.tail()
    a = finished(out, first)
    check_run(a, method, assets.init)
    assert a.summary["resumed_from"] is None and _checkpoints(out) == ["checkpoint-1", "checkpoint-2"]
    check_same_steps(a, ref, assets.init, ACROSS_LAUNCHERS)
    # the launcher was in force: FSDP writes its own model state into checkpoints, and the anchor of a sharded
    # weight keeps only this rank's rows of U_k (or W0); under DDP each rank holds the whole anchor
    assert (out / "checkpoint-1" / "pytorch_model_fsdp.bin").is_file() == (launcher == "fsdp2")
    if a.summary["anchor"] is not None and REGISTRY[method].wrap_anchor is None:
        nbytes, whole = a.summary["anchor"]["nbytes"], ref.summary["anchor"]["nbytes"]
        assert nbytes < whole if launcher == "fsdp2" else nbytes == whole

    # 2. killed after step 1, finished with --resume latest (through `accelerate launch` itself for DDP)
    simulate_kill_after_step(out, 1)
    resumed = launch_matrix.launch(f"{name} --resume latest", launcher,
                                   launch_matrix.train_args(method, out, 2, *keep) + ["--resume", "latest"],
                                   via="accelerate")
    assert resumed.returncode == 0, resumed.tail()
    r = finished(out, resumed)
    check_run(r, method, assets.init)
    assert r.summary["resumed_from"] == str(out / "checkpoint-1")
    assert [row["step"] for row in loss_rows(out)] == [1, 2]  # step 2 logged once: the killed run's row dropped
    check_same_steps(r, a, assets.init, SAME_LAUNCHER)

    # 3. trained again from scratch over the finished run, with the default checkpoint settings
    again = launch_matrix.launch(f"{name} --overwrite", launcher,
                                 launch_matrix.train_args(method, out, 2) + ["--overwrite"])
    assert again.returncode == 0, again.tail()
    o = finished(out, again)
    check_run(o, method, assets.init)
    assert o.summary["resumed_from"] is None
    assert _checkpoints(out) == ["checkpoint-2"]  # the earlier run's checkpoint-1 is gone, the newest kept
    assert o.summary["disk"]["checkpoints"]["checkpoint-2"]["optimizer_state"] is False  # dropped: run finished
    check_same_steps(o, a, assets.init, SAME_LAUNCHER)


# --------------------------------------------------------------------------------------------------------- rl


@pytest.mark.parametrize("launcher", ["ddp", "fsdp2"])
def test_rl_two_processes(launcher, launch_matrix, assets):
    out = assets.root / "runs" / f"rl-{launcher}"
    sets = [f"data.train={assets.train}", "data.limit=8", f"output_dir={out}", "train.max_steps=1",
            "train.save_steps=1", "train.lr=1e-3", "train.seed=0", "dapo.num_generations=2",
            "dapo.prompts_per_step=2", "dapo.micro_batch_size=2", "dapo.max_completion_length=12",
            "dapo.overlong_buffer=4", "dapo.dynamic_sampling=true", "dapo.max_gen_rounds=2", "anchor.enabled=true",
            "anchor.rank=8", "eval.enabled=true", "eval.before=true", f"eval.suite={assets.test}", "eval.limit=2",
            "eval.max_new_tokens=8"]
    args = ["rl", "--init", str(assets.model)] + [x for s in sets for x in ("--set", s)]
    launch = launch_matrix.launch(f"rl {launcher}", launcher, args)
    assert launch.returncode == 0, launch.tail()
    s = matrix.read_json(out / "run.json")
    assert s["global_step"] == 1 and s["anchor"] is not None and math.isfinite(s["anchor"]["final_penalty"])
    for when in ("eval_before", "eval_after"):  # rank 0 evaluated the init and the result, 2 problems each
        bench = next(v for v in s[when].values() if isinstance(v, dict) and "avg_at_k" in v)
        assert bench["problems"] == 2, s[when]
    row = next(r for r in loss_rows(out) if r["step"] == 1)
    # a random init answers nothing right and never stops before 12 tokens: every group's rewards are equal, so
    # dynamic sampling generates again up to its cap; both ranks took the same decision each round (their
    # gathered verdicts), else the run would have hung in a collective one rank skipped
    assert row["dynamic_sampling/gen_rounds"] == 2 and row["dynamic_sampling/informative_frac"] == 0.0, row


@pytest.mark.parametrize("command", ["train", "rl"])
def test_fsdp_on_cpu_processes_without_the_stand_in_is_refused(command, launch_matrix, assets):
    # accelerate alone would train these 2 CPU processes as DDP (test_launchers.py); each rank refuses instead
    out = assets.root / "runs" / f"{command}-fsdp2-alone"
    if command == "train":
        args = launch_matrix.train_args("rpsft", out, 2)
    else:
        sets = [f"data.train={assets.train}", f"output_dir={out}", "dapo.num_generations=2",
                "dapo.prompts_per_step=2", "dapo.micro_batch_size=2"]
        args = ["rl", "--init", str(assets.model)] + [x for s in sets for x in ("--set", s)]
    launch = launch_matrix.launch(f"{command} fsdp2 via accelerate alone (refused)", "fsdp2", args,
                                  via="accelerate-alone")
    assert launch.returncode != 0, launch.tail()
    errors = launch.error_lines()
    assert len(errors) == 2 and all(e.startswith("error: FSDP in the accelerate config, but these processes run on "
                                                 "the CPU") for e in errors), launch.tail()
    assert not out.exists()  # before the run directory was touched


# ---------------------------------------------------------------------------------------------- eval, compare


def _refusal(command: str, processes: int) -> str:
    return (f"error: rpsft {command} runs in one process, but this is one of {processes} processes of a launch "
            f"(accelerate launch / torchrun / rpsft launch; WORLD_SIZE={processes}): run `rpsft {command} ...` "
            "directly; only rpsft train and rpsft rl run under a launcher")


def _eval_args(model, assets, out):
    return ["eval", "--model", str(model), "--suite", str(assets.test), "--limit", "2", "--greedy",
            "--max-new-tokens", "8", "--batch-size", "2", "--out", str(out)]


def _compare_args(launch_matrix, assets, out):
    train_cfg = assets.root / "compare-train.yaml"
    train_cfg.write_text("\n".join(f"{k}: {v}" for k, v in {
        "model": f"{{name: {assets.model}}}", "data": f"{{train: {assets.train}, limit: 8, max_length: 128}}",
        "anchor": "{rank: 8}", "train": f"{{max_steps: 2, batch_size: 4, grad_accum: 1, lr: {LR}, save_steps: 1}}",
    }.items()) + "\n")
    sets = [f"output_dir={out}", f"train_config={train_cfg}", "methods=[{name: rpsft}]", "sweep=null",
            f"id={{teacher_forced: {assets.test}, limit: 2}}", "ood={suites: []}", "probe=false", "rotation=false",
            "drift_limit=0"]
    return ["compare"] + [x for s in sets for x in ("--set", s)]


def test_eval_one_process(launch_matrix, assets):
    model = launch_matrix.reference("rpsft").run_dir
    out = assets.root / "eval-one"
    launch = launch_matrix.launch("eval one", "one", _eval_args(model, assets, out))
    assert launch.returncode == 0, launch.tail()
    summary = matrix.read_json(out / "summary.json")
    assert summary["model"] == str(model) and summary["benchmarks"]["test"]["problems"] == 2
    assert summary["generated_now"] == 2 and len((out / "samples.jsonl").read_text().splitlines()) == 2


def test_compare_one_process(launch_matrix, assets):
    out = assets.root / "compare-one"
    launch = launch_matrix.launch("compare one", "one", _compare_args(launch_matrix, assets, out))
    assert launch.returncode == 0, launch.tail()
    assert (out / "table.md").is_file()
    runs = list(out.glob("**/run.json"))
    assert len(runs) == 1 and matrix.read_json(runs[0])["global_step"] == 2


REFUSED = [pytest.param("ddp", "rpsft", id="rpsft-launch-ddp"),
           pytest.param("ddp", "accelerate", id="accelerate-launch-ddp"),
           pytest.param("fsdp2", "accelerate", id="fsdp2")]


@pytest.mark.parametrize("command", ["eval", "compare"])
@pytest.mark.parametrize("launcher, via", REFUSED)
def test_one_process_commands_are_refused_under_a_launcher(command, launcher, via, launch_matrix, assets):
    out = assets.root / f"{command}-{launcher}-{via}"
    args = _eval_args(assets.model, assets, out) if command == "eval" else _compare_args(launch_matrix, assets, out)
    launch = launch_matrix.launch(f"{command} {launcher} via {via} (refused)", launcher, args, via=via)
    if via == "rpsft":
        # refused before the launcher starts: one line, exit 2
        assert launch.returncode == 2, launch.tail()
        assert launch.error_lines() == [f"error: rpsft launch runs rpsft train and rpsft rl; rpsft {command} runs "
                                        f"in one process (ddp-cpu2.yaml starts 2): run `rpsft {command} ...` without "
                                        "rpsft launch"], launch.tail()
    else:
        # each rank refuses at startup with the same line and exit 2; the launcher then reports the failed ranks
        assert launch.returncode != 0, launch.tail()
        assert launch.error_lines() == [_refusal(command, 2)] * 2, launch.tail()
    assert not out.exists()  # refused before anything was written
