"""Two CPU processes (gloo): lean frames (bf16) under FSDP2 row shards equal the unsharded lean anchor, and the
broadcast frames and A_ref are bit-identical to the ones computed locally."""

from __future__ import annotations

import os

import torch

from rpsft_testing import gloo_rank, make_tiny_llama, perturb_and_shard, run_ranks, sharded_terms_match


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    with gloo_rank(rank, world, port):
        from rpsft.anchor import RotationAnchor
        from rpsft.frames import get_lean_bases

        model = make_tiny_llama(64, inter=80, hidden=48)  # 48 rows of q/o; 24 of k/v: uneven over 2 ranks too
        ref_model = make_tiny_llama(64, inter=80, hidden=48)
        rank_spec = {"q_proj": 7, "down_proj": 1.0, "*": 5}  # low rank (lean) and full rank (L2) terms
        anchor = RotationAnchor.from_model(model, rank=rank_spec, frame_dtype="bf16")  # each SVD on one rank
        ref = RotationAnchor.from_model(ref_model, rank=rank_spec, frame_dtype="bf16")
        params = dict(model.named_parameters())
        for name, t in anchor.terms.items():
            if t.full:
                continue
            local = get_lean_bases(params[name].detach(), t.k, torch.bfloat16)  # no collectives: this rank alone
            assert t.U.dtype == torch.bfloat16, name
            assert torch.equal(t.U, local.U) and torch.equal(t.V, local.V) and torch.equal(t.Aref, local.A), name
            assert t.Aref.dtype == local.A.dtype == torch.float16 and torch.equal(t.S, local.S), name

        perturb_and_shard(model, ref_model, world)

        r_sharded, r_ref, shards = sharded_terms_match(anchor, ref, model, ref_model, rel_r=1e-6)
        for name, local, t in shards:
            assert (t.W0 if t.full else t.U).shape[0] == local.shape[0]  # only this rank's rows are kept
            assert t.full or t.Aref.shape == (t.k, t.k)  # A_ref is replicated whole
        drift, ref_drift = anchor.drift(model), ref.drift(ref_model)
        for n in drift:
            assert abs(drift[n]["abs"] - ref_drift[n]["abs"]) <= 1e-5 * ref_drift[n]["abs"]
        with open(os.path.join(out_dir, f"ok{rank}"), "w") as f:
            f.write(f"{r_sharded} {r_ref}")


def test_sharded_lean_anchor_matches_unsharded(tmp_path):
    run_ranks(_worker, tmp_path, world=2)
    assert (tmp_path / "ok0").is_file() and (tmp_path / "ok1").is_file()
