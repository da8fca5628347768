"""Spectral bases: solvers agree where they should, and the on-disk cache is never silently wrong."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import rpsft.bases as bases
from rpsft.bases import BasesCache, compute_bases, fingerprint, get_bases, subspace_overlap

pytestmark = pytest.mark.numerics  # floating-point thresholds: `make test` repeats these under other kernels


def gapped(m=96, n=64, seed=0):
    """A matrix with a clear spectral gap after the top 8."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, n, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    s = torch.cat([torch.linspace(10, 5, 8), torch.linspace(1, 0.1, n - 8)])
    return (U * s) @ V.T


def test_solvers_agree_on_gapped_spectrum():
    W = gapped()
    exact = compute_bases(W, 8, "exact")
    for solver in ("gram", "randomized"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            b = compute_bases(W, 8, solver, niter=6)
        assert subspace_overlap(exact.U, b.U) > 0.9999, solver
        assert subspace_overlap(exact.V, b.V) > 0.9999, solver
        torch.testing.assert_close(b.S, exact.S, rtol=1e-4, atol=1e-5)
    wide = compute_bases(W.T.contiguous(), 8, "gram")  # the m < n branch
    assert subspace_overlap(exact.U, wide.V) > 0.9999


def test_randomized_is_wrong_on_flat_spectrum_without_iterations():
    # The reason randomized bases are not the default: on flat spectra (like SmolLM2's) a sketch without power
    # iterations does not find the top-k subspace.
    g = torch.Generator().manual_seed(0)
    W = torch.randn(256, 256, generator=g)
    exact = compute_bases(W, 32, "exact")
    U, _, _ = torch.svd_lowrank(W, q=32, niter=0)
    assert subspace_overlap(exact.U, U) < 0.8  # hence the guard below
    with pytest.raises(ValueError, match="niter >= 4"):
        compute_bases(W, 32, "randomized", niter=2)
    with pytest.warns(UserWarning, match="prefer svd=gram"):
        compute_bases(W, 32, "randomized", niter=4)


def test_sigma_is_rayleigh_refined():
    W = gapped()
    b = compute_bases(W, 8)
    A = b.U.double().T @ W.double() @ b.V.double()
    torch.testing.assert_close(torch.diagonal(A).float(), b.S, rtol=1e-6, atol=1e-7)


def test_bad_k_and_solver():
    W = gapped()
    with pytest.raises(ValueError, match="must be in 1..min"):
        compute_bases(W, 65)
    with pytest.raises(ValueError, match="unknown SVD solver"):
        compute_bases(W, 4, "qr")


def test_cache_roundtrip_and_nested_k(tmp_path, monkeypatch):
    W = gapped()
    cache = BasesCache(tmp_path)
    b16 = get_bases(W, 16, cache=cache)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1

    def boom(*a, **k):
        raise AssertionError("recomputed although a cached basis covers k")

    monkeypatch.setattr(bases, "compute_bases", boom)
    b8 = get_bases(W, 8, cache=cache)  # top-8 is a prefix of the cached top-16
    torch.testing.assert_close(b8.U, b16.U[:, :8])
    torch.testing.assert_close(b8.S, b16.S[:8])
    again = get_bases(W, 16, cache=cache)
    assert torch.equal(again.V, b16.V)


def test_cache_grows_for_larger_k(tmp_path):
    W = gapped()
    cache = BasesCache(tmp_path)
    get_bases(W, 4, cache=cache)
    b = get_bases(W, 12, cache=cache)
    assert b.k == 12
    with safe_open(str(next(tmp_path.glob("*.safetensors"))), "pt") as f:
        assert f.metadata()["k"] == "12"


def _rewrite(path, tensors=None, **meta_changes):
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        t = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(meta_changes)
    save_file(tensors or t, str(path), metadata=meta)


@pytest.mark.parametrize("tamper", ["fingerprint", "shape", "tensors", "garbage"])
def test_cache_mismatch_is_recomputed(tmp_path, tamper, caplog):
    W = gapped()
    cache = BasesCache(tmp_path)
    good = get_bases(W, 8, cache=cache)
    path = next(tmp_path.glob("*.safetensors"))
    if tamper == "fingerprint":
        _rewrite(path, fingerprint="0" * 64)
    elif tamper == "shape":
        _rewrite(path, shape="64x96")
    elif tamper == "tensors":
        _rewrite(path, tensors={"U": torch.zeros(96, 8), "S": torch.ones(8), "V": torch.zeros(63, 8)})
    else:
        path.write_bytes(b"not a safetensors file")
    caplog.set_level("WARNING")
    again = get_bases(W, 8, cache=cache)
    torch.testing.assert_close(again.U, good.U)
    assert any("recomputing" in r.message for r in caplog.records)
    # and the bad entry was replaced by a good one
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["fingerprint"] == fingerprint(W)


def test_different_weights_never_share_an_entry(tmp_path):
    W = gapped()
    cache = BasesCache(tmp_path)
    get_bases(W, 8, cache=cache)
    W2 = W.clone()
    W2[0, 0] += 1e-6
    assert fingerprint(W2) != fingerprint(W)
    b2 = get_bases(W2, 8, cache=cache)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    torch.testing.assert_close(b2.S, compute_bases(W2, 8).S)


def test_fingerprint_covers_dtype_and_shape():
    W = gapped()
    assert fingerprint(W) != fingerprint(W.double())
    assert fingerprint(W) != fingerprint(W.reshape(64, 96))
    assert fingerprint(W.to(torch.bfloat16))  # bf16 hashes (numpy has no bf16)
