"""Shared fixtures: a tiny ChatML tokenizer trained in-process and tiny random-init Llama models.

Unit tests never touch the 0.5 GB SmolLM2 checkpoint; the one real-model test is marked ``slow``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rpsft_testing import make_tiny_llama, make_tokenizer  # noqa: F401  (re-exported for fixtures)

# Tests never reach a model/data hub: where hub access is tested, the loader is mocked.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test runs on one torch thread: tiny-model ops are far too small to split (OpenMP start-up dominates a
    32x32 matmul; a tiny train run took 11 s on 2 threads, 1.3 s on 1, on 2 busy cores). Restored afterwards; the
    real-model test asks for all cores itself. ``RPSFT_TEST_THREADS=N`` runs them on N threads instead (`make test`
    repeats the numerics tests on 2: a threshold that holds only for one thread count fails there)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("RPSFT_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Bases caches of unit tests go to a temp dir, never the user's cache (the slow test opts back in)."""
    if "RPSFT_TEST_REAL_CACHE" not in os.environ:
        monkeypatch.setenv("RPSFT_CACHE", str(tmp_path_factory.getbasetemp() / "rpsft-cache"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny Llama + ChatML tokenizer that ``rpsft.models.load_model`` and ``rpsft train`` accept."""
    d = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(len(tiny_tokenizer)).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> dict:
    from rpsft.data.synthetic_math import write_splits

    return write_splits(tmp_path_factory.mktemp("synth"), n_train=64, n_test=8, seed=0)
