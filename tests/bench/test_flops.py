"""The FLOP/memory model of benchmarks/flops.py against hand-computed values."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def flops():
    spec = importlib.util.spec_from_file_location("bench_flops", ROOT / "benchmarks" / "flops.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_per_matrix_cost_and_full_rank_rule(flops):
    # low rank: 4mnk + 4k²·min(m, n) FLOP and (m + n + 1)·k fp32 numbers
    assert flops.anchor_cost(18944, 3584, 768) == (4 * 18944 * 3584 * 768 + 4 * 768**2 * 3584,
                                                  4 * (18944 + 3584 + 1) * 768, False)
    # k >= min(m, n) on a non-square matrix (Qwen2.5-7B k_proj is 512×3584): the paper's ‖W − W0‖², W0 kept, ≈ 3mn
    # FLOP; with eq3, Eq. 3 on the bases at k = min(m, n)
    assert flops.anchor_cost(512, 3584, 768) == (3 * 512 * 3584, 4 * 512 * 3584, True)
    assert flops.anchor_cost(512, 3584, 768, "eq3") == (4 * 512 * 3584 * 512 + 4 * 512**2 * 512,
                                                       4 * (512 + 3584 + 1) * 512, False)
    # a square matrix at full rank keeps W0 under both rules: ‖W − W0‖², the same value as Eq. 3
    for rule in ("l2", "eq3"):
        assert flops.anchor_cost(3584, 3584, 4096, rule) == (3 * 3584 * 3584, 4 * 3584 * 3584, True)


def test_model_numbers_match_known_sizes_and_closed_form(flops):
    r = flops.model_numbers("qwen2.5-7b", 768, tokens=16 * 4096, seq=4096, period=1, mfu=0.4)
    assert abs(r["params_total"] / 1e9 - 7.62) < 0.01  # Qwen2.5-7B: 7.62 B parameters
    assert r["full_rank_types"] == ["k_proj", "v_proj"] and r["anchored_matrices"] == 196
    eq3 = flops.model_numbers("qwen2.5-7b", 768, tokens=16 * 4096, seq=4096, period=1, mfu=0.4, full_rank="eq3")
    assert eq3["full_rank_types"] == [] and eq3["anchor_bytes"] > r["anchor_bytes"]
    # the ratio is close to the per-matrix closed form 2k/(3T) (k/v cost 3mn, not 4mnk, and the LM head adds to N)
    closed = 2 * 768 / (3 * 16 * 4096)
    assert 0.9 * closed < r["flop_ratio_6NT"] < 1.0 * closed
    llama = flops.model_numbers("llama-3.1-8b", 768, tokens=16 * 4096, seq=4096, period=2, mfu=0.4)
    assert abs(llama["params_total"] / 1e9 - 8.03) < 0.01 and not llama["full_rank_types"]
    # period s divides the anchor's share
    one = flops.model_numbers("llama-3.1-8b", 768, tokens=16 * 4096, seq=4096, period=1, mfu=0.4)
    assert llama["anchor_flop"] == pytest.approx(one["anchor_flop"] / 2)
