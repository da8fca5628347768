"""``rpsft eval --backend vllm`` passes the engine options into ``vllm.LLM`` and releases the engine when done
(vLLM itself is replaced by a recording stand-in: these tests need no GPU)."""

from __future__ import annotations

import gc
import sys

import pytest
from typer.testing import CliRunner

from fake_vllm import FakeVLLM


@pytest.fixture
def fake_vllm(monkeypatch):
    fake = FakeVLLM()
    for name, mod in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return fake


def test_cli_passes_engine_options_to_vllm(fake_vllm, tiny_dir, eval_dir, tmp_path):
    from rpsft.cli import app

    res = CliRunner().invoke(app, ["eval", "--model", str(tiny_dir), "--suite", "aime24", "--k", "1", "--backend",
                                   "vllm", "--eval-dir", str(eval_dir), "--out", str(tmp_path / "o"),
                                   "--tensor-parallel-size", "2", "--max-model-len", "4096", "--dtype", "bfloat16",
                                   "--gpu-memory-utilization", "0.5"])
    assert res.exit_code == 0, res.output
    assert fake_vllm.llm_kwargs == [dict(tensor_parallel_size=2, max_model_len=4096, dtype="bfloat16",
                                         gpu_memory_utilization=0.5)]


def test_engine_is_released_when_the_evaluation_ends(fake_vllm, tiny_dir, eval_dir, tmp_path):
    from rpsft.eval import run_eval

    s = run_eval(str(tiny_dir), "aime24", k=1, backend="vllm", out_dir=tmp_path / "o", eval_dir=eval_dir,
                 max_new_tokens=8)
    assert s["benchmarks"]["aime24"]["problems"] == 3 and s["benchmarks"]["aime24"]["answered"] == 1.0
    gc.collect()
    assert fake_vllm.llm_kwargs == [{"gpu_memory_utilization": 0.85}]  # unset options stay vLLM's / ours
    assert fake_vllm.engines[0]() is None  # no reference left to the engine
    assert fake_vllm.destroyed == ["model_parallel", "distributed"]


def test_engine_is_released_when_the_evaluation_fails(fake_vllm, tiny_dir, eval_dir, tmp_path, monkeypatch):
    from rpsft.eval import run_eval

    def broken(self, prompts, params, use_tqdm=False):
        raise KeyboardInterrupt  # an interruption mid-generation

    monkeypatch.setattr(fake_vllm.vllm.LLM, "generate", broken)
    with pytest.raises(KeyboardInterrupt):
        run_eval(str(tiny_dir), "aime24", k=1, backend="vllm", out_dir=tmp_path / "o", eval_dir=eval_dir,
                 limit=2, max_new_tokens=8)
    assert len(fake_vllm.engines) == 1 and fake_vllm.engines[0]() is None
    assert fake_vllm.destroyed == ["model_parallel", "distributed"]


def test_vllm_options_without_the_vllm_backend_are_refused(tiny_dir, eval_dir, tmp_path):
    from rpsft.eval import run_eval

    with pytest.raises(ValueError, match="--backend vllm"):
        run_eval(str(tiny_dir), "aime24", k=1, out_dir=tmp_path / "o", eval_dir=eval_dir,
                 vllm_options={"max_model_len": 4096})
