"""Stages of ``rpsft compare``: each writes its result atomically and is skipped on a re-run when its inputs
(its key) are unchanged. Evaluation stages (generation, log-likelihood, teacher-forced exact match) and the
forgetting probe (with the base's log-probabilities cached once for every point) live here; the training stage and
the order of stages in :mod:`rpsft.compare.run`."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

from .. import fileio
from .config import CompareConfig, EvalSpec


def stored(path: Path, key: Any) -> tuple[dict | None, bool]:
    """(the result stored at ``path`` if it was made from these inputs, whether one from other inputs is there).
    Keys compare as they read back from JSON (tuples become lists, paths strings)."""
    if not path.is_file():
        return None, False
    old = json.loads(path.read_text())
    if old.get("stage_key") == json.loads(json.dumps(key, default=str)):
        return old, False
    return None, True


def run_stage(path: Path, fn: Callable[[], dict], log: Callable[[str], None], what: str, key: Any = None) -> dict:
    """Run ``fn`` unless ``path`` already holds its result for the same inputs (``key``); write it atomically."""
    key = json.loads(json.dumps(key, default=str))
    old, stale = stored(path, key)
    if old is not None:
        log(f"[dim]skip {what}: {path} is up to date[/dim]")
        return old
    if stale:
        log(f"[yellow]{what}: inputs changed since {path} was written; redoing it[/yellow]")
    t = time.perf_counter()
    log(f"[bold]{what}[/bold] ...")
    result = fn()
    result = {**result, "stage_seconds": round(time.perf_counter() - t, 1), "stage_key": key}
    fileio.write_json(path, result)
    log(f"  {what} done in {result['stage_seconds']:.0f}s")
    return result


def eval_model_path(run_dir: Path) -> str:
    """What to evaluate for a run: a merged full checkpoint when the method wrote one (LoRA), else the run dir."""
    merged = run_dir / "merged"
    return str(merged if (merged / "config.json").is_file() else run_dir)


def present_suites(optional: list[str], eval_dir: str | None) -> tuple[list[str], list[str]]:
    """(optional suites whose data files exist, those skipped because a file is absent)."""
    from ..eval.suites import expand_suites, source_path

    run, skipped = [], []
    for name in optional:
        try:
            for b in expand_suites(name)[0]:
                source_path(b, eval_dir)
        except (FileNotFoundError, ValueError):
            skipped.append(name)
            continue
        run.append(name)
    return run, skipped


def eval_stage(cfg: CompareConfig, spec: EvalSpec, model: str, root: Path, name: str, part: str) -> dict:
    from ..eval import run_eval

    present, absent = present_suites(spec.optional, cfg.eval_dir)
    suites = [*spec.suites, *present]
    if not suites:
        return {"benchmarks": {}, "groups": {}, "skipped": absent}
    out = root / "eval" / name / part
    if stored(root / "stages" / name / f"eval-{part}.json", None)[1] and out.is_dir():
        import shutil

        shutil.rmtree(out)  # samples of the model this point held before it was retrained: stale, not resumable
    s = run_eval(model, suites, k=spec.k, limit=spec.limit, greedy=spec.greedy, loglik=spec.loglik,
                 max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size, eval_dir=cfg.eval_dir,
                 out_dir=out, mc_protocol=spec.mc_protocol)
    return {"benchmarks": s["benchmarks"], "groups": s.get("groups", {}), "wall_s": s.get("wall_s"),
            "samples": s.get("samples"), "skipped": [*absent, *(s.get("skipped") or [])]}


class SavePoints(TrainerCallback):
    """Save the weights (no optimizer state: a point is for evaluation, resuming uses the checkpoints) at the
    given optimizer steps under ``out/step-N``. PEFT models save their adapter, which evaluation merges."""

    def __init__(self, steps: list[int], out: str | Path):
        self.steps, self.out = set(steps), Path(out)

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.global_step in self.steps and state.is_world_process_zero:
            import shutil

            final = self.out / f"step-{state.global_step}"
            tmp = final.with_name(final.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            if processing_class is not None:
                processing_class.save_pretrained(tmp)
            shutil.rmtree(final, ignore_errors=True)  # a resumed run passing this step again rewrites it whole
            tmp.rename(final)


# ------------------------------------------------------------------------ a run's directory and what it owns
# runs/NAME holds what `rpsft train` writes (guards.RUN_FILES, RUN_DIRS) and compare's own points/ (SavePoints);
# every result derived from the run lives outside it: stages/NAME[@N]/ and eval/NAME[@N]/, and the cross-run
# analyses stages/rotation.json and stages/drift.json.
POINTS = "points"
ANALYSES = ("rotation.json", "drift.json")


@dataclass
class TrainStart:
    """Where a run's training stage starts: at ``step`` (its newest complete checkpoint, or its last step when its
    training already finished) or, when ``step`` is None, from scratch; ``why`` says which, for the log."""

    step: int | None
    why: str = ""


def saved_points(run_dir: Path) -> dict[int, Path]:
    """{N: runs/NAME/points/step-N} for every point on disk (a ``step-N.tmp`` being written is none)."""
    d = Path(run_dir) / POINTS
    found = [p for p in d.iterdir() if p.is_dir() and p.name.startswith("step-")] if d.is_dir() else []
    return {int(p.name[5:]): p for p in found if p.name[5:].isdigit()}


def config_changes(run_dir: Path, tcfg) -> list[str] | None:
    """What differs between the training config ``run_dir`` was trained with (its config.yaml) and ``tcfg``; None
    when there is no config.yaml (nothing trained there, or a fresh start cleared it)."""
    from ..config import dump_yaml
    from ..train import _yaml_diff

    saved = Path(run_dir) / "config.yaml"
    return _yaml_diff(saved.read_text(), dump_yaml(tcfg)) if saved.is_file() else None


def training_start(run_dir: Path, tcfg, steps: list[int]) -> TrainStart:
    """Resume a run whose directory holds its training under ``tcfg`` up to a complete checkpoint (or to its end),
    with every point it has passed on disk; anything else starts from scratch: a directory trained under another
    config (train refuses to resume it), one with no complete checkpoint (killed before the first was sealed), or
    one missing a point at or before that step (a resumed run never passes that step again)."""
    from ..guards import checkpoint_state, latest_complete
    from ..preflight import finished_run

    changes = config_changes(run_dir, tcfg)
    if changes is None:
        return TrainStart(None)
    if changes:
        return TrainStart(None, f"its training config changed since {run_dir} was trained ({'; '.join(changes[:4])}"
                                f"{'; ...' if len(changes) > 4 else ''}): training it again from scratch")
    finished = finished_run(run_dir, "latest", lambda saved: changes, tcfg.train.max_steps)  # changes: none
    ckpt = None if finished is not None else latest_complete(run_dir)[0]
    if finished is None and ckpt is None:
        return TrainStart(None, "no complete checkpoint to resume from (interrupted before the first was sealed): "
                                "starting it again from step 0")
    at = int(finished["global_step"]) if finished is not None else int(checkpoint_state(ckpt)["global_step"])
    have = saved_points(run_dir)
    missing = [s for s in steps if s <= at and s not in have]
    if missing:
        return TrainStart(None, f"points/step-{missing[0]} is missing and a run resumed at step {at} would not pass "
                                f"step {missing[0]} again: starting it again from step 0")
    return TrainStart(at, f"its training already finished at step {at}" if finished is not None
                      else f"resuming it from {ckpt.name}")


def foreign_files(run_dir: Path) -> list[str]:
    """Entries of ``run_dir`` that neither `rpsft train` nor compare writes (the run lock aside)."""
    from ..guards import _written_by_run
    from ..runlock import LOCK_NAME

    if not Path(run_dir).is_dir():
        return []
    return [p.name + ("/" if p.is_dir() else "") for p in sorted(Path(run_dir).iterdir())
            if p.name not in (POINTS, LOCK_NAME) and not _written_by_run(p)]


def _point_outputs(root: Path, name: str) -> list[Path]:
    """stages/ and eval/ directories of run ``name`` and of its points ``name@N``."""

    def mine(entry: str) -> bool:
        run, at, step = entry.rpartition("@")  # grid.point_name: NAME@STEP
        return entry == name or (at == "@" and run == name and step.isdigit())

    return [p for parent in (root / "stages", root / "eval") if parent.is_dir() for p in parent.iterdir()
            if mine(p.name)]


def forget_run(root: Path, name: str, run_dir: Path) -> None:
    """Before run ``name`` trains again from scratch: delete its stage record (first, so that a kill during the
    rest never leaves a record claiming the half-cleared directory is trained), every result derived from it
    (evaluations and probes of the run and of its points, the cross-run analyses), its config.yaml (without it
    :func:`training_start` never resumes the directory), its points and then what `rpsft train` wrote there."""
    import shutil

    from ..guards import clear_run_dir

    (root / "stages" / name / "train.json").unlink(missing_ok=True)
    for p in _point_outputs(root, name):
        shutil.rmtree(p)
    for a in ANALYSES:
        (root / "stages" / a).unlink(missing_ok=True)
    (run_dir / "config.yaml").unlink(missing_ok=True)
    shutil.rmtree(run_dir / POINTS, ignore_errors=True)
    clear_run_dir(run_dir, True)  # foreign_files was checked before anything trained: nothing else is left


def discard_points_after(root: Path, name: str, run_dir: Path, step: int) -> list[int]:
    """Before a run resumes at ``step``: delete its points saved after it (a kill between a point and the next
    sealed checkpoint leaves one; the resumed run saves it again) with anything derived from them, and any
    half-written ``step-N.tmp``. Returns the discarded steps."""
    import shutil

    from .grid import point_name

    gone = sorted(s for s in saved_points(run_dir) if s > step)
    for s in gone:
        shutil.rmtree(run_dir / POINTS / f"step-{s}")
        for parent in (root / "stages", root / "eval"):
            shutil.rmtree(parent / point_name(name, s), ignore_errors=True)
    for tmp in (run_dir / POINTS).glob("*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    return gone


def teacher_forced_stage(cfg, model: str) -> dict:
    from ..eval.teacher_forced import teacher_forced_eval

    return teacher_forced_eval(model, teacher_forced_data(cfg.id.teacher_forced, cfg.eval_dir), limit=cfg.id.limit,
                               batch_size=cfg.id.batch_size or 16)


def teacher_forced_data(spec: str, eval_dir: str | None) -> str:
    """A data path as is; a suite name (``synth-math``) resolves to its file, which must hold completions."""
    from ..eval.suites import SuiteError, expand_suites, source_path

    if Path(spec).expanduser().is_file():
        return str(Path(spec).expanduser())
    try:
        benches = expand_suites(spec)[0]
    except (SuiteError, ValueError):
        raise FileNotFoundError(f"id.teacher_forced: {spec!r} is neither a file nor a suite name") from None
    return str(source_path(benches[0], eval_dir))


def probe_stage(cfg, base: str, model: str, cache_dir: Path | None = None) -> dict:
    """The forgetting probe with its per-prompt values kept (they are what the bootstrap resamples). With
    ``cache_dir``, the base model's next-token log-probabilities are computed once and reused for every point
    (:func:`cached_probe`), which halves the probe's cost."""
    if cache_dir is not None:
        return cached_probe(base, model, cache_dir, cfg.probe_max_new_tokens, cfg.probe_prompts)
    from ..eval.probe import forgetting_probe

    return forgetting_probe(base, model, max_new_tokens=cfg.probe_max_new_tokens, prompts_path=cfg.probe_prompts)


def base_logprobs(base: str, cache_dir: Path, max_new_tokens: int = 64, prompts_path: str | None = None):
    """(rows, memmap of the base's log-softmax at every answer position, float16, shape (Σ answer tokens, V)).

    Written once per (base weights, prompts, max_new_tokens) under ``cache_dir``: 243 prompts × ≤ 64 tokens ×
    49,152 vocabulary ≈ 1.5 GB for SmolLM2. float16 keeps log-probabilities to ~5e-4 relative, identical for
    every tuned model, so differences between models are unaffected to first order."""
    import hashlib

    import numpy as np

    from ..eval.generate import load_for_eval
    from ..eval.probe import _answer_logprobs, _model_fingerprint, base_answers, probe_prompts

    prompts = probe_prompts(prompts_path)
    key = hashlib.sha256(json.dumps([_model_fingerprint(base), [p["prompt"] for p in prompts], max_new_tokens])
                         .encode()).hexdigest()[:20]
    path, meta = Path(cache_dir) / f"base-logp-{key}.npy", Path(cache_dir) / f"base-logp-{key}.json"
    if path.is_file() and meta.is_file():
        return json.loads(meta.read_text()), np.load(path, mmap_mode="r")
    model, tok = load_for_eval(base)
    rows = [r for r in base_answers(base, model, tok, prompts, max_new_tokens) if r["answer_ids"]]
    n = sum(len(r["answer_ids"]) for r in rows)
    vocab = model.get_output_embeddings().weight.shape[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npy")
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, vocab))
    at = 0
    for r, lb in zip(rows, _answer_logprobs(model, rows, 8)):
        arr[at : at + len(lb)] = lb.cpu().numpy().astype(np.float16)
        at += len(lb)
    arr.flush()
    del arr
    tmp.rename(path)
    fileio.write_json(meta, rows)
    return rows, np.load(path, mmap_mode="r")


def cached_probe(base: str, tuned: str, cache_dir: Path, max_new_tokens: int = 64,
                 prompts_path: str | None = None, batch_size: int = 8) -> dict:
    """:func:`rpsft.eval.probe.forgetting_probe`'s result (kl, nll_tuned, nll_base, nll_delta, per_prompt)
    with the base's side read from :func:`base_logprobs` instead of recomputed: one forward pass per point."""
    import time

    import torch

    from ..eval.generate import load_for_eval
    from ..eval.probe import _answer_logprobs, _check_same_vocab

    t0 = time.time()
    rows, logp = base_logprobs(base, cache_dir, max_new_tokens, prompts_path)
    model, tok = load_for_eval(tuned)
    from ..models import load_tokenizer

    _check_same_vocab(load_tokenizer(base), tok, base, tuned)
    kl_sum = nll_t = nll_b = 0.0
    n_tok, at, per_prompt = 0, 0, []
    for r, lt in zip(rows, _answer_logprobs(model, rows, batch_size)):
        a = len(r["answer_ids"])
        lb = torch.from_numpy(logp[at : at + a].astype("float32")).to(lt.device)
        at += a
        tgt = torch.tensor(r["answer_ids"], device=lt.device).unsqueeze(-1)
        kl = (lb.exp() * (lb - lt)).sum(-1).clamp(min=0)
        nt, nb = -lt.gather(-1, tgt).squeeze(-1), -lb.gather(-1, tgt).squeeze(-1)
        kl_sum, nll_t, nll_b, n_tok = kl_sum + float(kl.sum()), nll_t + float(nt.sum()), nll_b + float(nb.sum()), \
            n_tok + a
        per_prompt.append({"id": r["id"], "tokens": a, "kl": float(kl.mean()), "nll_tuned": float(nt.mean()),
                           "nll_base": float(nb.mean())})
    return {"base": str(base), "tuned": str(tuned), "prompts": len(rows), "tokens": n_tok, "kl": kl_sum / n_tok,
            "nll_tuned": nll_t / n_tok, "nll_base": nll_b / n_tok, "nll_delta": (nll_t - nll_b) / n_tok,
            "max_new_tokens": max_new_tokens, "base_cache": "float16", "wall_s": round(time.time() - t0, 2),
            "per_prompt": per_prompt}


def blocks_stage(base: str, model: str, rank: Any, targets=None, layers=None, svd: str = "exact") -> dict:
    """Where the point's update went: ΔW split into the four blocks of the base's top-k frame (App. C.3;
    :func:`rpsft.analysis.blocks.run_blocks`, bases from the disk cache training filled), for one point. Returns
    that checkpoint's report (per matrix, per type, per layer, ``all``) with the rank spec it was taken at."""
    from ..analysis.blocks import run_blocks

    rep = run_blocks(base, [model], rank=rank, targets=targets, layers=layers, svd=svd)
    ck = rep["checkpoints"][0]
    return {"rank": rep["rank"], "svd": rep["svd"], "path": ck["path"], "all": ck["all"], "types": ck["types"],
            "layers": ck["layers"], "matrices": ck["matrices"], "seconds": rep["seconds"]}
