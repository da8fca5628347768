"""The parent side of ``rpsft bench``: one subprocess per method and repeat (interleaved), medians over the
repeats, ``bench.json`` + ``bench.md``. See :mod:`rpsft.bench`."""

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

from .. import fileio
from .report import markdown_table

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


def method_overrides(s: BenchSettings, method: str, out_dir: Path, data: str) -> list[str]:
    return [f"method={method}", f"model.name={s.model}", f"data.train={data}", f"output_dir={out_dir}",
            f"train.max_steps={s.steps}", f"train.batch_size={s.batch_size}", f"train.grad_accum={s.grad_accum}",
            f"data.max_length={s.max_length}", f"anchor.rank={s.rank}", f"train.save_steps={s.steps + 1000}",
            f"train.logging_steps={s.steps}", "train.warmup_ratio=0", *s.overrides]


def _run_child(spec: dict, log_path: Path, timeout_s: float) -> dict:
    spec_path = log_path.with_suffix(".spec.json")
    fileio.write_json(spec_path, spec)
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
        from ..data.synthetic_math import write_splits

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
    from ..methods import available

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
    fileio.write_json(out / "bench.json", report)
    fileio.write_text(out / "bench.md", markdown_table(report))
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
