import numpy as np
import pytest
import torch

from rpsft.analysis._common import encode_records
from rpsft.analysis.energy import energy_curve, gradient_energy, prefix_share, rank_map
from rpsft.selection import resolve_ranks, select_matrices


def _grads(shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _brute(W, grads):
    """y(r) by explicit projections P_U = U_r U_rᵀ, P_V = V_r V_rᵀ, one r at a time."""
    U, _, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    V = Vh.T
    tot = sum(float(g.double().pow(2).sum()) for g in grads)
    out = []
    for r in range(1, min(W.shape) + 1):
        PU, PV = U[:, :r] @ U[:, :r].T, V[:, :r] @ V[:, :r].T
        out.append(sum(float((PU @ g.double() @ PV).pow(2).sum()) for g in grads) / tot)
    return np.array(out)


@pytest.mark.parametrize("shape", [(9, 9), (12, 7), (6, 11)])
@pytest.mark.numerics
def test_curve_equals_brute_force_projection(shape):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    grads = _grads(shape, 5, 1)
    c = energy_curve(W, grads)
    np.testing.assert_allclose(c.y, _brute(W, grads), rtol=1e-5, atol=1e-7)
    assert np.all(np.diff(c.y) >= -1e-12)  # monotone in r
    assert c.x[-1] == 1.0 and c.x[0] == pytest.approx(1 / min(shape) ** 2)


@pytest.mark.numerics
def test_share_is_one_at_full_rank_for_square():
    W = torch.randn(10, 10, generator=torch.Generator().manual_seed(2))
    c = energy_curve(W, _grads((10, 10), 3, 3))
    assert c.share(10) == pytest.approx(1.0, abs=1e-6)
    # rectangular: the thin frame misses the gradient energy outside W's column space
    Wr = torch.randn(12, 5, generator=torch.Generator().manual_seed(4))
    cr = energy_curve(Wr, _grads((12, 5), 3, 5))
    assert cr.share(5) < 0.9


def test_gradient_aligned_with_top_block_and_rank_for():
    W = torch.diag(torch.arange(8, 0, -1).float())  # U = V = I (up to sign), sorted
    G = torch.zeros(8, 8)
    G[0, 0], G[1, 1], G[5, 5] = 3.0, 1.0, 1.0  # energies 9, 1, 1 of 11
    c = energy_curve(W, [G])
    assert c.share(1) == pytest.approx(9 / 11, rel=1e-6)
    assert c.share(5) == pytest.approx(10 / 11, rel=1e-6)
    assert c.rank_for(0.5) == 1 and c.rank_for(0.95) == 6 and c.rank_for(1.01) is None


def test_prefix_share_is_block_sum():
    P = torch.rand(6, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    y = prefix_share(P, 10.0)
    for r in range(1, 7):
        assert y[r - 1] == pytest.approx(float(P[:r, :r].sum()) / 10.0)
    with pytest.raises(ValueError, match="zero"):
        prefix_share(P, 0.0)


@pytest.mark.numerics
def test_gradient_energy_on_tiny_model_uses_per_sample_gradients(tiny):
    from rpsft.analysis._common import completion_nll
    from rpsft.models import load_model

    model, tok = load_model(tiny["base"])
    enc = encode_records(tok, tiny["records"][:3])
    params = select_matrices(model, ["q_proj", "down_proj"], layers="1")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    curves = gradient_energy(model, tok, enc, params)
    assert [c.name for c in curves] == [n for n, _ in params]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # restored
    assert all(p.grad is None for p in model.parameters())
    # reference: separate autograd per sample, brute-force projection
    name, p = params[0]
    grads = []
    for e in enc:
        g, = torch.autograd.grad(completion_nll(model, [e], tok.pad_token_id)[0], p)
        grads.append(g)
    np.testing.assert_allclose(curves[0].y, _brute(p.detach(), grads), rtol=1e-4, atol=1e-6)
    # the rank map is in the form rpsft.selection reads back (full parameter names -> k)
    ranks = rank_map(curves, 0.2)
    assert set(ranks) == {n for n, _ in params}
    shapes = [(n, tuple(p.shape)) for n, p in params]
    assert resolve_ranks(shapes, ranks) == ranks


def _curve(name, shape, y):
    from rpsft.analysis.energy import EnergyCurve

    return EnergyCurve(name, shape, np.asarray(y, dtype=float), 1.0, 1)


def test_target_matching_rank_spends_exactly_the_uniform_memory():
    from rpsft.analysis.energy import anchor_elements, target_matching_rank

    rng = np.random.default_rng(0)
    curves = []
    for i, shape in enumerate([(40, 40), (40, 16), (24, 40)]):
        R = min(shape)
        y = np.cumsum(rng.random(R))
        curves.append(_curve(f"m{i}", shape, 0.9 * y / y[-1]))  # never reaches 1 (an m != n matrix can't)
    for k in (1, 4, 10, 16):
        budget = anchor_elements(curves, {c.name: k for c in curves})
        t = target_matching_rank(curves, k)
        assert anchor_elements(curves, rank_map(curves, t)) <= budget  # never more memory than uniform k
        assert anchor_elements(curves, rank_map(curves, t + 1e-9)) > budget  # and the largest such target
    # a budget that holds every full frame: target 1.0 (matrices that never reach it get their whole R)
    assert target_matching_rank(curves, 40) == 1.0
    with pytest.raises(ValueError, match="--match-rank 0"):
        target_matching_rank(curves, 0)


def test_anchor_elements_is_the_uniform_formula():
    from rpsft.analysis.energy import anchor_elements

    curves = [_curve("a", (6, 4), np.linspace(0.1, 1, 4)), _curve("b", (3, 8), np.linspace(0.1, 1, 3))]
    assert anchor_elements(curves, {"a": 2, "b": 5}) == (6 + 4 + 1) * 2 + (3 + 8 + 1) * 3  # k clipped at R
