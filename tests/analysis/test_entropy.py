import math

import numpy as np
import pytest
import torch

from rpsft.analysis.entropy import gaussian_kde, kde_summary, silverman_bandwidth, token_entropy


def test_kde_matches_hand_computation():
    x = [1.0, 2.0, 4.0]
    # s = std([1,2,4], ddof=1) = sqrt(((1-7/3)^2 + (2-7/3)^2 + (4-7/3)^2) / 2) = sqrt(7/3)
    s = math.sqrt(7 / 3)
    h = 1.06 * s * 3 ** (-0.2)
    assert silverman_bandwidth(x) == pytest.approx(h, rel=1e-12)
    g = 2.5
    phi = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    hand = (phi((g - 1) / h) + phi((g - 2) / h) + phi((g - 4) / h)) / (3 * h)
    assert gaussian_kde(x, [g])[0] == pytest.approx(hand, rel=1e-12)


def test_kde_integrates_to_one_and_summary_uses_silverman():
    x = np.array([0.2, 0.5, 0.55, 0.9, 1.4, 1.5])
    s = kde_summary(x.tolist(), points=2000)
    grid, dens = np.array(s["grid"]), np.array(s["density"])
    assert s["bandwidth"] == pytest.approx(1.06 * x.std(ddof=1) * len(x) ** -0.2)
    assert np.trapezoid(dens, grid) == pytest.approx(1.0, abs=2e-3)
    with pytest.raises(ValueError, match="at least 2"):
        silverman_bandwidth([1.0])


def test_token_entropy():
    V = 50
    assert float(token_entropy(torch.zeros(V))) == pytest.approx(math.log(V))
    peaked = torch.full((V,), -1e4)
    peaked[3] = 0
    assert float(token_entropy(peaked)) == pytest.approx(0.0, abs=1e-9)
    p = torch.tensor([0.5, 0.25, 0.25])
    assert float(token_entropy(p.log())) == pytest.approx(1.5 * math.log(2))
