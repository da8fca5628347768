"""benchmarks/gpu_check.py: its table logic on tiny shapes on the CPU (so it cannot rot before a GPU runs it), and
its one-line exit on a machine without CUDA."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_cpu_run_prints_every_row(gpu_check, tmp_path):
    from rich.console import Console

    out = io.StringIO()
    rows = gpu_check.main(["--device", "cpu", "--tiny", "--json", str(tmp_path / "rows.json")],
                          console=Console(file=out, width=200))
    checks = [r[0] for r in rows]
    assert not [r for r in rows if r[1].startswith("error")], rows
    assert sum(c.startswith("bases (tiny, k=8, svd=exact, 14 matrices)") for c in checks) == 2  # 7 projections × 2 layers
    values = {c: v for c, v, _ in rows}
    assert values["anchor memory on device (measured / formula)"].startswith("- / 0.00 GiB")
    R, max_rel = (float(x) for x in values["penalty at init: R, max ‖A‖/‖σ_k‖"].split(", "))
    assert 0 <= R < 1e-8 and max_rel < 1e-5  # round-off: the anchor was just built from these weights
    ratio_row = next(v for c, v, _ in rows if c.startswith("RPSFT/SFT step time (128 tokens/step, 2 interleaved"))
    assert float(ratio_row.split()[0]) > 0
    assert values["vllm vs hf greedy"] == "skipped (no GPU)"
    assert "rpsft GPU check: cpu" in out.getvalue() and "RPSFT/SFT step time" in out.getvalue()
    assert [r["check"] for r in json.loads((tmp_path / "rows.json").read_text())] == checks


def test_placement_check_runs_on_the_cpu_too(gpu_check):
    c = gpu_check.check_placement(torch.device("cpu"))
    assert c["terms_on"] == ["cpu"] and c["grad_rel_err"] < 1e-6 and c["R_rel_diff"] < 1e-6


def test_no_cuda_is_one_line_and_exit_2(gpu_check, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        gpu_check.main([])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA GPU" in err and "--device cpu --tiny" in err


def test_vllm_agreement_logic_with_a_stand_in_engine(gpu_check, monkeypatch):
    import sys

    from fake_vllm import FakeVLLM

    fake = FakeVLLM()
    for name, mod in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    v = gpu_check.check_vllm(n_prompts=3, max_new_tokens=6)
    assert v["n"] == 3 and 0 <= v["identical"] <= 3 and 0 <= v["mean_prefix"] <= 6
    assert fake.llm_kwargs == [dict(dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.5,
                                    enforce_eager=True)]
    assert fake.destroyed  # the engine was released at the end of the evaluation
