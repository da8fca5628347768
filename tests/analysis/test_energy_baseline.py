"""The uniform-energy reference of the energy plot, and rank maps that cover only some matrices."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from rpsft.analysis.energy import energy_curve
from rpsft.selection import resolve_ranks


@pytest.mark.parametrize("shape", [(12, 12), (24, 8), (6, 18)])
@pytest.mark.numerics
def test_isotropic_gradient_follows_the_uniform_reference(shape):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(*shape, generator=g)
    c = energy_curve(W, [torch.randn(*shape, generator=g) for _ in range(3000)])
    m, n = shape
    r = np.arange(1, min(shape) + 1)
    np.testing.assert_allclose(c.uniform, r ** 2 / (m * n))
    # an isotropic gradient's share in the r×r block is Beta(r²/2, (mn − r²)/2): sd ≤ 1/√(2(mn + 2)) per draw, so the
    # mean of 3000 lies within 0.01 ≥ 8 sd (mn ≥ 108) of r²/mn, whatever draws this CPU's randn makes
    np.testing.assert_allclose(c.y, c.uniform, atol=0.01)
    # in the plot's axes x = r²/R², the reference is the line y = x·min/max: y(R) = 1/3 on 24×8, not 1
    np.testing.assert_allclose(c.uniform, c.x * min(shape) / max(shape))
    assert c.to_json(0.2)["uniform_at_R"] == pytest.approx(min(shape) / max(shape))


SHAPES = [("model.layers.0.self_attn.q_proj.weight", (8, 8)), ("model.layers.0.self_attn.k_proj.weight", (4, 8)),
          ("model.layers.1.self_attn.q_proj.weight", (8, 8))]


def test_a_subset_rank_map_leaves_the_rest_unanchored_and_says_so(tmp_path, caplog):
    f = tmp_path / "ranks.json"
    f.write_text(json.dumps({"model.layers.0.self_attn.q_proj.weight": 3}))
    with caplog.at_level(logging.WARNING, logger="rpsft"):
        ranks = resolve_ranks(SHAPES, f"@{f}")
    assert ranks == {SHAPES[0][0]: 3, SHAPES[1][0]: 0, SHAPES[2][0]: 0}
    assert "covers 1 of 3 selected matrices; the other 2 are left unanchored" in caplog.text
    # a uniform k for the rest: the file under "@" plus a "*" entry
    assert resolve_ranks(SHAPES, {"@": str(f), "*": 2}) == {SHAPES[0][0]: 3, SHAPES[1][0]: 2, SHAPES[2][0]: 2}
    # a hand-written mapping without "*" still names the matrix it misses (a typo is likelier than intent)
    with pytest.raises(ValueError, match="no entry for model.layers.0.self_attn.k_proj"):
        resolve_ranks(SHAPES, {"q_proj": 3})


def test_training_anchor_accepts_a_subset_map(tmp_path, tiny_tokenizer):
    from rpsft.anchor import RotationAnchor
    from rpsft_testing import make_tiny_llama

    model = make_tiny_llama(len(tiny_tokenizer))
    f = tmp_path / "ranks.json"
    f.write_text(json.dumps({"model.layers.0.self_attn.q_proj.weight": 4}))
    anchor = RotationAnchor.from_model(model, rank=f"@{f}", cache_dir=tmp_path / "bases")  # default targets
    assert anchor.ranks == {"model.layers.0.self_attn.q_proj.weight": 4}
