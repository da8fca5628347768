"""``rpsft bench``: the cost table of the paper's Table 1 (samples/s, steps/s, peak memory, anchor cost) for our runs.

Every method trains in its own subprocess — peak RSS (and CUDA peak memory) is per process, and one method's
allocator state must not leak into the next. The child runs :func:`rpsft.train.train` with a short ``max_steps`` and a
:class:`TimingCallback`; it also times each ``RotationAnchor.accumulate_grad_`` call, so the anchor's share of a step
is measured inside the very steps being timed. Methods that are not registered (``rpsft.methods.available()``) get a
"not available" row; a child that fails gets a "failed" row with the tail of its log — neither stops the table.

The first optimizer step is warm-up (allocator, optimizer state, first-touch) and is not timed. With ``repeats`` > 1
the methods run interleaved (A B C A B C …) and the table reports the median of the repeats, which is what makes
ratios meaningful on a shared machine.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import io

DEFAULT_METHODS = ("sft", "rpsft", "l2init", "dft", "iw", "lora")


@dataclass
class BenchSettings:
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    model: str = "smollm2-135m-instruct"
    data: str | None = None  # None: write a small synthetic-math file under <out>/data
    steps: int = 6  # optimizer steps per method (the first is warm-up)
    batch_size: int = 4
    grad_accum: int = 4
    max_length: int = 256
    rank: Any = 128
    repeats: int = 1
    overrides: list[str] = field(default_factory=list)  # extra --set key=value for every method
    timeout_s: float = 3600.0  # per method and repeat


# ---------------------------------------------------------------------------------------------------- child side
class TimingCallback:
    """Wall time of every optimizer step (step end to step end: data, forward/backward, anchor, clip, optimizer)."""

    def __init__(self):
        self.step_ends: list[float] = []
        self.t_begin: float | None = None

    # transformers calls these by name; the base class is added lazily in make_timing_callback
    def on_train_begin(self, args, state, control, **kwargs):
        self.t_begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_ends.append(time.perf_counter())

    def step_times(self) -> list[float]:
        marks = ([self.t_begin] if self.t_begin is not None else []) + self.step_ends
        return [b - a for a, b in zip(marks, marks[1:])]


def make_timing_callback() -> TimingCallback:
    from transformers import TrainerCallback

    cls = type("BenchTimingCallback", (TimingCallback, TrainerCallback), {})
    return cls()


def peak_memory() -> dict[str, float]:
    """Peak memory of this process: RSS on CPU (getrusage; psutil too when installed), CUDA peaks on GPU, in MiB."""
    import resource

    import torch

    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    try:
        import psutil

        out["rss_now_mib"] = psutil.Process().memory_info().rss / 2**20
    except ImportError:
        pass
    if torch.cuda.is_available():
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_max_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    return out


def run_one(spec: dict) -> dict:
    """Train one method as described by ``spec`` and return its measurements (runs inside the child process)."""
    import torch

    from .anchor import RotationAnchor
    from .config import load_config
    from .train import train

    anchor_calls: list[float] = []
    original = RotationAnchor.accumulate_grad_

    def timed(self, *a, **k):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        r = original(self, *a, **k)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        anchor_calls.append(time.perf_counter() - t)
        return r

    RotationAnchor.accumulate_grad_ = timed  # this process is ours and trains one method, then exits
    cfg = load_config(None, spec["overrides"])
    cb = make_timing_callback()
    t0 = time.perf_counter()
    summary = train(cfg, overwrite=True, progress=False, extra_callbacks=[cb])
    wall = time.perf_counter() - t0
    steps = cb.step_times()
    timed_steps = steps[1:] if len(steps) > 1 else steps  # step 1 is warm-up
    # anchor calls: one per optimizer step (period 1); drop the warm-up step's call like its step time
    anchor_timed = anchor_calls[1:] if len(anchor_calls) > 1 else anchor_calls
    step_med = statistics.median(timed_steps) if timed_steps else float("nan")
    anchor_med = statistics.median(anchor_timed) if anchor_timed else 0.0
    samples_per_step = cfg.train.batch_size * cfg.train.grad_accum
    a = summary.get("anchor") or {}
    return {
        "status": "ok",
        "steps": len(steps),
        "timed_steps": len(timed_steps),
        "step_seconds_median": step_med,
        "step_seconds_all": steps,
        "steps_per_s": 1.0 / step_med if step_med > 0 else float("nan"),
        "samples_per_s": samples_per_step / step_med if step_med > 0 else float("nan"),
        "samples_per_step": samples_per_step,
        "anchor_call_seconds_median": anchor_med,
        "anchor_share_of_step": anchor_med / step_med if step_med > 0 and anchor_calls else 0.0,
        "anchor_bytes": int(a.get("nbytes", 0)),
        "anchor_matrices": int(a.get("matrices", 0)),
        "anchor_ranks": a.get("ranks", []),
        "bases_seconds": summary.get("anchor_seconds", 0.0),
        "train_seconds": summary.get("train_seconds"),
        "wall_seconds": wall,
        "train_loss": summary.get("train_loss"),
        "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        **peak_memory(),
    }


def _child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = run_one(spec)
    io.write_json(spec["result_path"], result)


# ---------------------------------------------------------------------------------------------------- parent side
def method_overrides(s: BenchSettings, method: str, out_dir: Path, data: str) -> list[str]:
    return [f"method={method}", f"model.name={s.model}", f"data.train={data}", f"output_dir={out_dir}",
            f"train.max_steps={s.steps}", f"train.batch_size={s.batch_size}", f"train.grad_accum={s.grad_accum}",
            f"data.max_length={s.max_length}", f"anchor.rank={s.rank}", f"train.save_steps={s.steps + 1000}",
            f"train.logging_steps={s.steps}", "train.warmup_ratio=0", *s.overrides]


def _run_child(spec: dict, log_path: Path, timeout_s: float) -> dict:
    spec_path = log_path.with_suffix(".spec.json")
    io.write_json(spec_path, spec)
    Path(spec["result_path"]).unlink(missing_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run([sys.executable, "-m", "rpsft.bench", str(spec_path)], stdout=log,
                                  stderr=subprocess.STDOUT, env=env, timeout=timeout_s)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if rc == 0 and Path(spec["result_path"]).is_file():
        return json.loads(Path(spec["result_path"]).read_text())
    tail = log_path.read_text(errors="replace").strip().splitlines()[-8:] if log_path.is_file() else []
    return {"status": "failed", "returncode": rc, "error": "\n".join(tail), "log": str(log_path),
            "wall_seconds": time.perf_counter() - t}


def default_data(out: Path) -> str:
    path = out / "data" / "train.jsonl"
    if not path.is_file():
        from .data.synthetic_math import write_splits

        write_splits(out / "data", n_train=256, n_test=8, seed=0)
    return str(path)


def _aggregate(runs: list[dict]) -> dict:
    """Median over repeats of the numeric fields; the first run's other fields; failed if any repeat failed."""
    bad = [r for r in runs if r.get("status") != "ok"]
    if bad:
        return {**bad[0], "repeats": len(runs)}
    out = dict(runs[0])
    for key in ("step_seconds_median", "steps_per_s", "samples_per_s", "anchor_call_seconds_median",
                "anchor_share_of_step", "peak_rss_mib", "cuda_max_allocated_mib", "cuda_max_reserved_mib",
                "bases_seconds", "wall_seconds"):
        vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        if vals:
            out[key] = statistics.median(vals)
    out["repeats"] = len(runs)
    if len(runs) > 1:
        out["step_seconds_by_repeat"] = [r["step_seconds_median"] for r in runs]
    return out


def run_bench(s: BenchSettings, out: str | Path, on_result=None) -> dict:
    """Run every method of ``s`` (each in a subprocess) and write ``bench.json`` + ``bench.md`` into ``out``."""
    from .methods import available

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = s.data or default_data(out)
    if not Path(data).is_file():
        raise FileNotFoundError(f"--data {data} does not exist; pass a JSONL training file (or omit --data to use "
                                "a small built-in synthetic-math file)")
    known = set(available())
    runs: dict[str, list[dict]] = {m: [] for m in s.methods}
    for rep in range(s.repeats):
        for m in s.methods:  # interleaved across repeats: A B C A B C …
            if m not in known:
                runs[m] = [{"status": "not available",
                            "error": f"method {m!r} is not registered in this installation (available: "
                                     f"{', '.join(sorted(known))})"}]
                continue
            run_dir = out / "runs" / m
            spec = {"overrides": method_overrides(s, m, run_dir, data),
                    "result_path": str(out / "runs" / f"{m}.r{rep}.result.json")}
            res = _run_child(spec, out / "runs" / f"{m}.r{rep}.log", s.timeout_s)
            _drop_weights(run_dir)
            runs[m].append(res)
            if on_result is not None:
                on_result(m, rep, res)
    rows = {m: _aggregate(r) for m, r in runs.items()}
    report = {"settings": asdict(s) | {"data": data}, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
              "host": {"cpus": os.cpu_count(), "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None},
              "methods": rows}
    io.write_json(out / "bench.json", report)
    io.write_text(out / "bench.md", markdown_table(report))
    return report


def _drop_weights(run_dir: Path) -> None:
    """A bench run's weights are a by-product (a few steps of timing): delete them, keep its logs and run.json.
    Without this every method left a full checkpoint behind (≈ 0.5 GB each for SmolLM2, more with merged LoRA)."""
    import shutil

    if not run_dir.is_dir():
        return
    for p in run_dir.iterdir():
        if p.is_dir() and (p.name.startswith("checkpoint-") or p.name == "merged"):
            shutil.rmtree(p, ignore_errors=True)
        elif p.suffix in (".safetensors", ".bin", ".pt", ".pth"):
            p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------- reporting
def _fmt(v, spec: str, missing: str = "–") -> str:
    return missing if not isinstance(v, (int, float)) or v != v else format(v, spec)


def markdown_table(report: dict) -> str:
    """The cost table as markdown: one row per method, ratios against sft when sft ran."""
    rows = report["methods"]
    s = report["settings"]
    base = rows.get("sft", {})
    base_step = base.get("step_seconds_median") if base.get("status") == "ok" else None
    base_mem = base.get("peak_rss_mib") if base.get("status") == "ok" else None
    gpu = any("cuda_max_allocated_mib" in r for r in rows.values())
    head = ["method", "status", "steps/s", "samples/s", "step s (median)", "step vs sft", "peak RSS MiB",
            "RSS vs sft"]
    if gpu:
        head += ["CUDA max alloc MiB", "CUDA max reserved MiB"]
    head += ["anchor MiB", "anchor % of step", "bases s"]
    lines = [f"Cost per method: {s['model']}, {s['steps']} optimizer steps (first is warm-up), batch "
             f"{s['batch_size']} × grad accum {s['grad_accum']}, max length {s['max_length']}, k = {s['rank']}, "
             f"median of {s['repeats']} repeat(s).", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for m, r in rows.items():
        if r.get("status") != "ok":
            reason = (r.get("error") or "").strip().splitlines()
            cells = [m, f"{r.get('status')}: {reason[-1][:120] if reason else ''}".replace("|", "/")]
            cells += ["–"] * (len(head) - 2)
        else:
            step = r["step_seconds_median"]
            cells = [m, "ok", _fmt(r["steps_per_s"], ".3f"), _fmt(r["samples_per_s"], ".2f"), _fmt(step, ".3f"),
                     _fmt(step / base_step if base_step else None, ".3f"), _fmt(r.get("peak_rss_mib"), ".0f"),
                     _fmt(r["peak_rss_mib"] / base_mem if base_mem else None, ".3f")]
            if gpu:
                cells += [_fmt(r.get("cuda_max_allocated_mib"), ".0f"), _fmt(r.get("cuda_max_reserved_mib"), ".0f")]
            cells += [_fmt(r.get("anchor_bytes", 0) / 2**20, ".1f"),
                      _fmt(100 * r.get("anchor_share_of_step", 0.0), ".2f"), _fmt(r.get("bases_seconds"), ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    _child_main(sys.argv[1])
