import numpy as np
import pytest

from rpsft.analysis.drift import drift_summary, pca_2d


def test_pca_2d_captures_main_axis():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(200, 5)) * np.array([10, 3, 0.1, 0.1, 0.1])
    coords, comps, mean = pca_2d(pts)
    assert coords.shape == (200, 2)
    assert abs(comps[0, 0]) > 0.99 and abs(comps[1, 1]) > 0.99
    np.testing.assert_allclose(coords.mean(0), 0, atol=1e-10)


def test_arrows_start_at_base_centroid():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(30, 6))
    tuned = {"sft": base + np.array([3.0, 0, 0, 0, 0, 0]) + 0.1 * rng.normal(size=(30, 6)),
             "rpsft": base + np.array([0.5, 0.5, 0, 0, 0, 0])}
    rep = drift_summary(base, tuned)
    pts = {k: np.asarray(v) for k, v in rep["pca"]["points"].items()}
    base_c2 = pts["base"].mean(0)
    for m in rep["models"]:
        np.testing.assert_allclose(m["arrow_start"], base_c2, atol=1e-10)
        np.testing.assert_allclose(m["arrow_end"], pts[m["label"]].mean(0), atol=1e-10)
    d = {m["label"]: m["centroid_distance"] for m in rep["models"]}
    assert d["rpsft"] == pytest.approx(np.sqrt(0.5), rel=1e-9)
    assert d["sft"] == pytest.approx(np.linalg.norm(tuned["sft"].mean(0) - base.mean(0)))
    assert d["sft"] > d["rpsft"]
    assert sum(rep["pca"]["explained_variance_ratio"]) <= 1 + 1e-9
