"""Fixtures for the RL tests: hand-written math prompt files (synthetic-math and GSM8K shapes), one torch thread;
the tiny random Llama comes from tests/conftest.py's ``tiny_model_dir``."""

from __future__ import annotations

from pathlib import Path

import pytest

from rl_helpers import GSM8K_ROWS, SYNTH_ROWS, write_jsonl


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one thread, and much faster on a shared CPU (2 spinning threads stall)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def synth_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "synth.jsonl", SYNTH_ROWS)


@pytest.fixture
def gsm8k_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
