"""Fixtures for the RL tests: hand-written math prompt files (synthetic-math and GSM8K shapes); one torch thread
comes from the root conftest's ``_one_thread``, the tiny random Llama from its ``tiny_model_dir``."""

from __future__ import annotations

from pathlib import Path

import pytest

from .rl_helpers import GSM8K_ROWS, SYNTH_ROWS, write_jsonl


@pytest.fixture
def synth_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "synth.jsonl", SYNTH_ROWS)


@pytest.fixture
def gsm8k_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
