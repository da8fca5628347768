"""``run_eval``: benchmarks -> samples.jsonl (every completion, its extracted answer and verdict) -> summary.json.

Resumable: every finished sample is appended (and fsynced) to ``samples.jsonl`` at once; a rerun with the same
settings reads it back and generates only what is missing. ``run.json`` records the settings that make
samples comparable (model weights, decoding, prompt policy); a rerun with different ones is refused instead of
silently mixing samples. Benchmarks, k and limit may change between runs (a larger k extends the samples).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from rpsft import runlock
from rpsft.eval import judges
from rpsft.eval.loaders import load_items
from rpsft.eval.metrics import stderr, summarize
from rpsft.eval.suites import Benchmark, expand_suites
from rpsft.fileio import append_jsonl, read_jsonl, write_json, write_jsonl

Progress = Callable[[str, int, int], None]

# settings that change what a sample is; samples written under other values are not reused
_RUN_KEYS = ("model", "model_fingerprint", "backend", "max_new_tokens", "temperature", "top_p", "greedy", "seed",
             "system_prompt", "loglik", "mc_protocol")
# the value a key had before it was recorded (run.json files written before it existed)
_RUN_DEFAULTS = {"mc_protocol": "paper"}
# the generation settings every sample row carries ("settings"): what it was made with, checked on every resume
_ROW_KEYS = tuple(key for key in _RUN_KEYS if key not in ("model", "model_fingerprint"))


def judge_completion(item: dict, completion: str, flex: bool = False, timeout_s: float = 5.0) -> dict:
    """Verdict fields for one completion of one item: ``extracted``, ``correct`` (+ ``extracted_flex``,
    ``correct_flex`` for GSM8K-style benchmarks, ``instructions`` for IFEval)."""
    kind = item["judge"]
    if kind == "math":
        box = judges.extract_boxed(judges._after_think(completion))
        out = {"extracted": box, "correct": box is not None and judges.math_equal(item["gold"], box, timeout_s)}
        if flex:
            num = judges.last_number(completion)
            out["extracted_flex"] = num
            out["correct_flex"] = num is not None and judges.math_equal(item["gold"], num, timeout_s)
        return out
    if kind == "mcq":
        letter = judges.mcq_letter(completion, len(item["options"]), item.get("labels"))
        return {"extracted": letter, "correct": letter == item["gold"]}
    if kind == "ifeval":
        user = next((m["content"] for m in reversed(item["prompt"]) if m["role"] == "user"), "")
        ok, details = judges.ifeval_loose(completion, item["instructions"], user)
        return {"extracted": None, "correct": ok, "instructions": details}
    raise ValueError(f"unknown judge {kind!r}")


def _same_path(model: str) -> str:
    """A local model directory as one string: "runs/x/" and "runs/x" are the same model and the same stored run."""
    return str(Path(str(model))) if Path(str(model)).expanduser().is_dir() else str(model)


def _check_run(out: Path, config: dict) -> None:
    import json

    path = out / "run.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k, _RUN_DEFAULTS.get(k)), config.get(k)) for k in _RUN_KEYS
                if old.get(k, _RUN_DEFAULTS.get(k)) != config.get(k)}
        if diff and (out / "samples.jsonl").is_file():
            raise RuntimeError(
                f"{out} holds samples made with other settings {diff} (old, new); pass a new --out directory, "
                f"or delete {out / 'samples.jsonl'} to start over")
    write_json(path, config)


def _check_row(path: Path, row: dict, settings: dict) -> None:
    """A stored sample made with other generation settings is refused, not mixed in (rows written before rows
    carried their settings are covered by run.json's check alone)."""
    made = row.get("settings")
    if not isinstance(made, dict):
        return
    diff = {k: (made.get(k, _RUN_DEFAULTS.get(k)), settings.get(k)) for k in settings
            if made.get(k, _RUN_DEFAULTS.get(k)) != settings.get(k)}
    if diff:
        raise RuntimeError(f"{path}: sample {row.get('benchmark')}[{row.get('index')}] #{row.get('sample', 0)} was "
                           f"made with other settings {diff} (old, new); pass a new --out directory, or delete "
                           f"{path} to start over")


def _read_samples(path: Path) -> list[dict]:
    """Finished rows; a line torn by a crash mid-append is cut off so new rows never glue onto it."""
    rows = read_jsonl(path)
    if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        write_jsonl(path, rows)
    return rows


def _primary(s: dict) -> float | None:
    return s.get("accuracy", s.get("avg_at_k"))


# one process per --out directory (runlock.py): two evaluations into one directory would interleave their samples
@runlock.locked("rpsft eval", lambda a: a["out_dir"], what="--out")
def run_eval(model: str, suites: list[str] | str, k: int | None = None, limit: int | None = None,
             backend: str = "hf", out_dir: str | Path = "runs/eval", max_new_tokens: int | None = None,
             temperature: float = 0.7, top_p: float = 0.95, greedy: bool = False, batch_size: int | None = None,
             seed: int = 0, eval_dir: str | Path | None = None, *, n: int | None = None, loglik: bool = False,
             system_prompt: str | None = None, probe_base: str | None = None, judge_timeout_s: float = 5.0,
             device: str | None = None, progress: Progress | None = None,
             vllm_options: dict | None = None, mc_protocol: str = "paper") -> dict:
    """Evaluate ``model`` on ``suites``; writes ``out_dir/summary.json`` and ``out_dir/samples.jsonl`` and
    returns the summary.

    k: samples per problem (default: each benchmark's paper k; greedy forces 1). n: samples drawn per problem
    when more than k are wanted for the unbiased pass@k (default k). loglik: score multiple-choice options
    by log-likelihood instead of generating (non-multiple-choice benchmarks are skipped). system_prompt:
    "boxed" | "file" | "none" (default per benchmark, see loaders). probe_base: base model for the ``probe``
    suite. progress(description, done, total) is called as work finishes. vllm_options: keyword arguments for
    ``vllm.LLM`` with backend vllm (tensor_parallel_size, max_model_len, dtype, gpu_memory_utilization).
    mc_protocol: "paper" (the benchmark's chat prompt) or "lm-eval" (lm-evaluation-harness's zero-shot
    "Question: ... Answer:" request; implies loglik), see rpsft.eval.loglik."""
    t0 = time.time()
    from rpsft.eval.loglik import MC_PROTOCOLS

    if mc_protocol not in MC_PROTOCOLS:
        raise ValueError(f"mc_protocol must be one of {', '.join(MC_PROTOCOLS)}, got {mc_protocol!r}")
    loglik = loglik or mc_protocol == "lm-eval"  # lm-eval's multiple choice is log-likelihood scoring
    if backend not in ("hf", "vllm"):
        raise ValueError(f"backend must be 'hf' or 'vllm', got {backend!r}")
    if loglik and backend != "hf":
        raise ValueError(f"{'--mc-protocol lm-eval' if mc_protocol == 'lm-eval' else '--loglik'} scores options "
                         f"with the HF model's forward pass; use --backend hf")
    vllm_options = {key: v for key, v in (vllm_options or {}).items() if v is not None}
    if vllm_options and backend != "vllm":
        raise ValueError(f"{', '.join(sorted(vllm_options))} configure the vLLM engine; add --backend vllm or drop "
                         "them")
    for name, v in (("k", k), ("n", n), ("limit", limit)):
        if v is not None and v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    benches, want_probe = expand_suites(suites)
    if want_probe and not probe_base:
        raise ValueError("suite 'probe' compares the model with its base: pass probe_base (--probe-base BASE)")
    from rpsft.models import check_model_path

    check_model_path(model)  # a missing or torn model directory, or an unfinished run: one line, nothing loaded

    # 1. data first: a missing file fails before minutes of model loading
    skipped: dict[str, str] = {}
    items: dict[str, list[dict]] = {}
    origins: dict[str, dict] = {}
    for b in benches:
        got = load_items(b, eval_dir, limit, system_prompt, origin=origins.setdefault(b.name, {}))
        if loglik and any(it["judge"] != "mcq" for it in got):
            skipped[b.name] = "not multiple choice: log-likelihood mode scores options only"
            continue
        items[b.name] = got
    benches = [b for b in benches if b.name in items]

    import torch

    cuda = torch.cuda.is_available()
    device = device or ("cuda" if cuda else None)
    max_new_tokens = max_new_tokens or (2048 if (cuda or backend == "vllm") else 512)
    batch_size = batch_size or (16 if loglik else (64 if cuda else 32))
    ks = {b.name: 1 if (greedy or loglik) else (k or b.k) for b in benches}
    ns = {b.name: max(ks[b.name], 1 if (greedy or loglik) else (n or ks[b.name])) for b in benches}

    from rpsft.eval.probe import _model_fingerprint

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"model": _same_path(model), "model_fingerprint": _model_fingerprint(model) if benches else None,
              "backend": backend, "max_new_tokens": None if loglik else max_new_tokens,
              "temperature": None if (greedy or loglik) else temperature,
              "top_p": None if (greedy or loglik) else top_p, "greedy": bool(greedy), "seed": seed,
              "system_prompt": system_prompt, "loglik": bool(loglik), "mc_protocol": mc_protocol}
    samples_path = out / "samples.jsonl"
    settings = {key: config[key] for key in _ROW_KEYS}
    stored = _read_samples(samples_path)
    if benches:
        for row in stored:  # before _check_run records this run's settings in run.json
            _check_row(samples_path, row, settings)
        _check_run(out, config)

    # 2. what is already done
    done: dict[tuple, dict] = {}
    for row in stored:
        done[(row["benchmark"], row["index"], row.get("sample", 0))] = row
    for b in benches:
        for i, it in enumerate(items[b.name]):
            row = done.get((b.name, i, 0))
            if row is not None and row.get("id") != it["id"]:
                raise RuntimeError(f"{samples_path}: row {b.name}[{i}] has id {row.get('id')!r} but the data now has "
                                   f"{it['id']!r}; the benchmark file changed - use a new --out directory")
    jobs = [(b, i, s) for b in benches for i in range(len(items[b.name])) for s in range(ns[b.name])
            if (b.name, i, s) not in done]
    total = sum(len(items[b.name]) * ns[b.name] for b in benches)
    finished = total - len(jobs)
    if progress:
        progress("resuming" if finished else "starting", finished, total)

    # 3. generate / score what is missing
    gen_s = 0.0
    new_tokens = 0
    if jobs:
        tg = time.time()
        if loglik or backend == "hf":
            from rpsft.eval.generate import load_for_eval

            dtype = "bfloat16" if cuda else "float32"  # fp32 on CPU: bf16 matmuls are 20-30x slower there
            lm, tok = load_for_eval(model, device=device, dtype=dtype)
        if loglik:
            finished = _run_loglik(lm, tok, jobs, items, batch_size, samples_path, done, progress, finished, total,
                                   mc_protocol, settings)
        else:
            finished, new_tokens = _run_generate(
                model, jobs, items, backend, batch_size, max_new_tokens, temperature, top_p, greedy, seed,
                samples_path, done, judge_timeout_s, progress, finished, total,
                (lm, tok) if backend == "hf" else None, vllm_options, settings)
        gen_s = time.time() - tg

    # 4. summaries
    per_bench: dict[str, dict] = {}
    for b in benches:
        rows = [[done[(b.name, i, s)] for s in range(ns[b.name])] for i in range(len(items[b.name]))]
        per_bench[b.name] = _bench_summary(b, rows, ks[b.name], loglik, mc_protocol)
        per_bench[b.name]["data"] = origins[b.name]  # where the rows came from, and a hash of them
    groups = {}
    for g in ("id", "ood"):
        vals = [_primary(per_bench[b.name]) for b in benches if b.group == g]
        if vals:
            groups[g] = {"mean": sum(vals) / len(vals), "benchmarks": [b.name for b in benches if b.group == g]}
    summary: dict[str, Any] = {
        **config, "suites": suites if isinstance(suites, str) else ",".join(suites), "limit": limit,
        "mode": "loglik" if loglik else "generate", "benchmarks": per_bench, "groups": groups,
        "skipped": skipped, "samples": str(samples_path), "generated_now": len(jobs),
        "new_tokens": new_tokens, "gen_s": round(gen_s, 2),
    }
    if vllm_options:
        summary["vllm_options"] = vllm_options
    if want_probe:
        from rpsft.eval.probe import forgetting_probe

        if progress:
            progress("forgetting probe", total, total)
        summary["probe"] = forgetting_probe(probe_base, model)
    summary["wall_s"] = round(time.time() - t0, 2)
    write_json(out / "summary.json", summary)
    return summary


def _run_generate(model, jobs, items, backend, batch_size, max_new_tokens, temperature, top_p, greedy, seed,
                  samples_path, done, judge_timeout_s, progress, finished, total, loaded, vllm_options=None,
                  settings=None):
    from rpsft.eval.generate import HFGenerator, VLLMGenerator, render_prompts

    if backend == "hf":
        lm, tok = loaded
        gen = HFGenerator(lm, tok, batch_size)
    else:
        from rpsft.models import resolve

        gen = VLLMGenerator(resolve(model), seed=seed, **(vllm_options or {}))
        tok = gen.tok
    try:
        rendered: dict[tuple[str, int], str] = {}
        for b, i, _ in jobs:
            if (b.name, i) not in rendered:
                rendered[(b.name, i)] = render_prompts(tok, [items[b.name][i]["prompt"]])[0]
        texts = [rendered[(b.name, i)] for b, i, _ in jobs]
        kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, greedy=greedy, seed=seed)
        if backend == "vllm":  # one seed per (benchmark, problem, sample): resumed runs redraw the same samples
            import zlib

            kwargs["request_seeds"] = [zlib.crc32(f"{seed}/{b.name}/{i}/{s}".encode()) for b, i, s in jobs]
        new_tokens = 0
        for batch in gen.generate_iter(texts, **kwargs):
            for j, res in batch:
                b, i, s = jobs[j]
                it = items[b.name][i]
                row = {"benchmark": b.name, "index": i, "id": it["id"], "sample": s, "prompt": it["prompt"],
                       "completion": res["text"], "n_tokens": res["n_tokens"], "finish": res["finish"],
                       "gold": it["gold"], "judge": it["judge"], "settings": settings}
                row.update(judge_completion(it, res["text"], b.flex, judge_timeout_s))
                append_jsonl(samples_path, row)
                done[(b.name, i, s)] = row
                new_tokens += res["n_tokens"]
            finished += len(batch)
            if progress:
                progress("generating", finished, total)
    finally:  # also on an error or an interruption: a failed evaluation must not keep the GPU memory
        if backend == "vllm":
            gen.close()  # its GPU memory back now (rpsft rl starts TRL's own vLLM engine next)
    return finished, new_tokens


def _run_loglik(lm, tok, jobs, items, batch_size, samples_path, done, progress, finished, total,
                mc_protocol="paper", settings=None):
    from rpsft.eval.generate import render_prompts
    from rpsft.eval.loglik import score_mcq, score_mcq_lm_eval

    by_bench: dict[str, tuple[Benchmark, list[int]]] = {}
    for b, i, _ in jobs:
        by_bench.setdefault(b.name, (b, []))[1].append(i)
    for name, (b, idx) in by_bench.items():
        its = [items[name][i] for i in idx]
        ctx = render_prompts(tok, [it["prompt"] for it in its]) if mc_protocol == "paper" else None

        def on_item(j: int, r: dict, name=name, idx=idx, its=its) -> None:
            nonlocal finished
            it = its[j]
            row = {"benchmark": name, "index": idx[j], "id": it["id"], "sample": 0, "mode": "loglik",
                   "mc_protocol": mc_protocol,
                   "prompt": it["prompt"], "options": it["options"], "gold": it["gold"], "judge": "mcq-loglik",
                   **r, "correct": r["correct_norm"], "settings": settings}
            append_jsonl(samples_path, row)
            done[(name, idx[j], 0)] = row
            finished += 1
            if progress:
                progress(f"scoring {name}", finished, total)

        if mc_protocol == "lm-eval":
            score_mcq_lm_eval(lm, tok, its, on_item)
        else:
            score_mcq(lm, tok, its, ctx, batch_size, on_item)
    return finished


def _bench_summary(b: Benchmark, rows: list[list[dict]], k: int, loglik: bool, mc_protocol: str = "paper") -> dict:
    flat = [r for rs in rows for r in rs]
    base = {"description": b.description, "group": b.group, "judge": "mcq-loglik" if loglik else
            (rows[0][0]["judge"] if rows else b.judge)}
    if loglik:
        keys = ("letter", "text", "norm") if mc_protocol == "paper" else ("text", "norm")  # lm-eval: no letters
        acc = {key: sum(r[f"correct_{key}"] for r in flat) / len(flat) for key in keys}
        chance = sum(1 / len(r["options"]) for r in flat) / len(flat)
        out = {**base, "mc_protocol": mc_protocol, "problems": len(flat), "accuracy": acc["norm"],
               "acc_norm": acc["norm"], "acc_text": acc["text"], "acc_letter": acc.get("letter"), "chance": chance,
               "stderr": stderr([float(r["correct_norm"]) for r in flat])}
        if mc_protocol == "lm-eval":
            out["acc"] = acc["text"]  # lm-eval's name for the unnormalised accuracy
        return out
    s = summarize([[bool(r["correct"]) for r in rs] for rs in rows], k)
    s.update(base)
    s["mean_tokens"] = sum(r["n_tokens"] for r in flat) / len(flat)
    s["truncated"] = sum(r["finish"] == "length" for r in flat) / len(flat)
    if base["judge"] != "ifeval":
        s["answered"] = sum(r.get("extracted") is not None for r in flat) / len(flat)
    if b.flex:
        s["avg_at_k_flex"] = sum(sum(bool(r.get("correct_flex")) for r in rs[:k]) / k for rs in rows) / len(rows)
    return s
