"""The four-block split of ΔW in the base's top-k frame (App. C.3) against explicit complements, oracle updates
built in one block at a time, and end to end through saved checkpoints and the CLI."""

import json
import math
import zlib

import pytest
import torch
from typer.testing import CliRunner

from rpsft.analysis.blocks import (block_split, frame, isotropic_shares, matrix_blocks, roundoff_bound,
                                   run_blocks)
from rpsft.bases import compute_bases

BLOCKS = ("A", "B", "C", "D")


def _full_frame(W0):
    """Full orthogonal U (m×m), V (n×n) of W0 from the fp64 SVD: the explicit U_⊥, V_⊥ the module avoids."""
    U, _, Vh = torch.linalg.svd(W0.double(), full_matrices=True)
    return U, Vh.T


def _brute(delta, U, V, k):
    """‖U_*ᵀ ΔW V_*‖² of each block with the complements formed explicitly."""
    d = delta.double()
    Uk, Uo, Vk, Vo = U[:, :k], U[:, k:], V[:, :k], V[:, k:]
    return {"A": float((Uk.T @ d @ Vk).pow(2).sum()), "B": float((Uk.T @ d @ Vo).pow(2).sum()),
            "C": float((Uo.T @ d @ Vk).pow(2).sum()), "D": float((Uo.T @ d @ Vo).pow(2).sum())}


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("m,n,k", [(24, 16, 5), (16, 24, 5), (20, 20, 1), (20, 20, 19), (30, 12, 11)])
@pytest.mark.numerics
def test_split_matches_explicit_complements(m, n, k):
    W0, delta = _rand(m, n, seed=1), _rand(m, n, seed=2)
    U, V = _full_frame(W0)
    got = block_split(delta, U[:, :k], V[:, :k])["energy"]
    ref = _brute(delta, U, V, k)
    for b in BLOCKS:
        assert got[b] == pytest.approx(ref[b], rel=1e-10)
    assert got["total"] == pytest.approx(float(delta.pow(2).sum()), rel=1e-14)
    assert sum(got[b] for b in BLOCKS) == pytest.approx(got["total"], rel=1e-13)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.numerics
def test_an_update_in_one_block_is_reported_exactly(block):
    m, n, k = 24, 16, 5
    W0 = _rand(m, n, seed=3)
    U, V = _full_frame(W0)
    rows = {"A": U[:, :k], "B": U[:, :k], "C": U[:, k:], "D": U[:, k:]}[block]
    cols = {"A": V[:, :k], "B": V[:, k:], "C": V[:, :k], "D": V[:, k:]}[block]
    M = _rand(rows.shape[1], cols.shape[1], seed=4)
    delta = rows @ M @ cols.T
    # the frame as training stores it: fp32 bases of an fp32 weight (its complement in fp64 from the full SVD)
    split = block_split(delta, U[:, :k].float(), V[:, :k].float())
    e, bound = split["energy"], split["roundoff_bound"]
    energy = float(M.pow(2).sum())
    assert e[block] == pytest.approx(energy, rel=1e-12)
    for other in set(BLOCKS) - {block}:
        # fp32 rounding of U_k, V_k tilts the frame by ~1e-7 rad: ≤ 1e-13 of the energy leaks, nothing more
        assert 0.0 <= e[other] <= 1e-13 * energy, (other, e[other])
    assert bound < 1e-10 * energy
    shares = matrix_blocks(W0, W0 + delta, k, bases=(U[:, :k], V[:, :k]))["share"]
    assert shares[block] == pytest.approx(1.0, abs=1e-13) and sum(shares.values()) == pytest.approx(1.0, abs=1e-14)


def test_sign_flips_and_rotations_inside_the_frame_change_nothing():
    m, n, k = 28, 20, 6
    W0, delta = _rand(m, n, seed=5), _rand(m, n, seed=6)
    U, V = _full_frame(W0)
    ref = block_split(delta, U[:, :k], V[:, :k])["energy"]
    su = torch.tensor([1, -1, 1, -1, -1, 1], dtype=torch.float64)
    sv = torch.tensor([-1, -1, 1, 1, -1, 1], dtype=torch.float64)
    for Uk, Vk in ((U[:, :k] * su, V[:, :k]), (U[:, :k], V[:, :k] * sv), (-U[:, :k] * su, V[:, :k] * sv),
                   (U[:, :k] @ torch.linalg.qr(_rand(k, k, seed=7))[0], V[:, :k].flip(1))):
        got = block_split(delta, Uk, Vk)["energy"]
        for b in (*BLOCKS, "total"):
            assert got[b] == pytest.approx(ref[b], rel=1e-11, abs=1e-13 * ref["total"])


def test_full_rank_frames_leave_the_missing_blocks_exactly_empty():
    sq, dsq = _rand(12, 12, seed=8), _rand(12, 12, seed=9)
    U, V = _full_frame(sq)
    e = block_split(dsq, U, V)["energy"]
    assert (e["B"], e["C"], e["D"]) == (0.0, 0.0, 0.0) and e["A"] == e["total"]
    # tall, k = n: V_k spans the input space, so only C (the output directions W0 does not reach) remains
    tall, dt = _rand(18, 7, seed=10), _rand(18, 7, seed=11)
    U, V = _full_frame(tall)
    e = block_split(dt, U[:, :7], V[:, :7])["energy"]
    ref = _brute(dt, U, V, 7)
    assert e["B"] == 0.0 and e["D"] == 0.0
    assert e["A"] == pytest.approx(ref["A"], rel=1e-12) and e["C"] == pytest.approx(ref["C"], rel=1e-12)
    # wide, k = m: the mirror image, B only
    e = block_split(dt.T, V[:, :7], U[:, :7])["energy"]
    assert e["C"] == 0.0 and e["D"] == 0.0 and e["B"] == pytest.approx(ref["C"], rel=1e-12)
    # k = 0: all of it is D
    e = block_split(dt, U[:, :0], V[:, :0])["energy"]
    assert (e["A"], e["B"], e["C"]) == (0.0, 0.0, 0.0) and e["D"] == e["total"]


@pytest.mark.numerics
def test_round_off_is_clamped_within_its_bound_and_a_broken_basis_is_refused():
    m, n, k = 40, 30, 8
    W0 = _rand(m, n, seed=12)
    U, V = _full_frame(W0)
    delta = U[:, :k] @ _rand(k, k, seed=13) @ V[:, :k].T  # all A: D = T − ‖X‖² − ‖Y‖² + A is pure round-off
    Q, P = frame(U[:, :k], V[:, :k])
    X, total = Q.T @ delta, float(delta.pow(2).sum())
    raw_d = total - float(X.pow(2).sum()) - float((delta @ P).pow(2).sum()) + float((X @ P).pow(2).sum())
    bound = roundoff_bound(m, n, k, total)
    assert abs(raw_d) <= bound
    assert bound == pytest.approx(2.0 ** -53 * total * (48 * 38 + 16 * 70 + 4 * math.sqrt(8) * 70))
    assert block_split(delta, Q, P, orthonormal=True)["energy"]["D"] >= 0.0
    # a basis that is not orthonormal (2·U_k passed as if it were): ‖X‖² = 4T, A = 4T, so C = T − 4T < −bound
    with pytest.raises(ArithmeticError, match="block C has energy .* not orthonormal"):
        block_split(delta, 2 * Q, P, name="q", orthonormal=True)
    with pytest.raises(ValueError, match="must be 40×k and 30×k"):
        block_split(delta, U[:, :k], V[:k, :k])


@pytest.mark.numerics
def test_isotropic_update_puts_each_block_its_area():
    m, n, k = 160, 120, 30
    iso = isotropic_shares(m, n, k)
    assert sum(iso.values()) == pytest.approx(1.0, abs=1e-15) and iso["A"] == pytest.approx(900 / 19200)
    W0 = _rand(m, n, seed=14)
    U, V = _full_frame(W0)
    row = matrix_blocks(W0, W0 + 0.01 * _rand(m, n, seed=15), k, bases=(U[:, :k], V[:, :k]))
    # N = 19,200 i.i.d. Gaussian entries, and the frame is orthonormal, so a block of N_b rotated entries holds a
    # χ²(N_b) share of a χ²(N) total: relative sd √(2/N_b·(1 − N_b/N)); each share within 5 sd of its area share
    # (torch.randn's draws differ between CPUs: a tolerance fitted to one draw is not)
    N = m * n
    for b in BLOCKS:
        assert row["share"][b] == pytest.approx(iso[b], rel=5 * math.sqrt(2 / (iso[b] * N) * (1 - iso[b]))), b
    # ‖ΔW‖/‖W0‖ = 0.01·‖R₂‖/‖R₁‖, each norm of N standard normals with relative sd 1/√(2N): 5 sd of the ratio
    assert row["isotropic"] == iso and row["relative"] == pytest.approx(0.01, rel=5 * math.sqrt(2 / (2 * N)))


# ------------------------------------------------------------------------------------------- end to end


def _save_with(base_dir, out_dir, edit):
    """A copy of the checkpoint at ``base_dir`` with ``edit(name, W0) -> ΔW`` added to each layer matrix."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    deltas = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2 and ".layers." in n:
                d = edit(n, p.detach().double())
                if d is not None:
                    p.add_(d.float())
                    deltas[n] = d
    model.save_pretrained(out_dir)
    return deltas


def test_checkpoints_built_in_one_block_each_are_reported_exactly(tiny, tmp_path):
    k = 4

    def in_block(block):
        def edit(name, W0):
            b = compute_bases(W0.float(), k)  # the frame run_blocks uses (exact fp32 SVD, as training's)
            Q = torch.linalg.qr(b.U.double(), mode="complete")[0]  # [U_k-span | its fp64 complement]
            P = torch.linalg.qr(b.V.double(), mode="complete")[0]
            rows = Q[:, :k] if block in "AB" else Q[:, k:]
            cols = P[:, :k] if block in "AC" else P[:, k:]
            g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{block}".encode()))
            M = torch.randn(rows.shape[1], cols.shape[1], generator=g, dtype=torch.float64)
            return 0.02 * rows @ M @ cols.T
        return edit

    dirs = []
    for block in BLOCKS:
        _save_with(tiny["base"], tmp_path / block, in_block(block))
        dirs.append(str(tmp_path / block))
    rep = run_blocks(tiny["base"], dirs, rank=k, cache_dir=str(tmp_path / "bases"), labels=list(BLOCKS))
    for block, ck in zip(BLOCKS, rep["checkpoints"]):
        assert len(ck["matrices"]) == 14 and all(r["k"] == k for r in ck["matrices"])
        for r in ck["matrices"]:
            # the saved fp32 weights round ΔW by ~1e-9 per entry: ≤ 1e-12 of the energy spreads to other blocks
            assert r["share"][block] == pytest.approx(1.0, abs=1e-10), (block, r["name"], r["share"])
        for g in [*ck["types"], *ck["layers"], ck["all"]]:
            assert g["share"][block] == pytest.approx(1.0, abs=1e-10)
            assert sum(g["share"].values()) == pytest.approx(1.0, abs=1e-12)


def test_run_blocks_energies_groups_rank_specs_and_cache(tiny, tmp_path):
    cache = tmp_path / "bases"
    rep = run_blocks(tiny["base"], [tiny["tuned"], tiny["base"]], rank=0.5, cache_dir=str(cache))
    assert rep["rank"] == 0.5 and [c["label"] for c in rep["checkpoints"]] == ["tuned", "base"]
    tuned, same = rep["checkpoints"]
    from safetensors import safe_open

    with safe_open(f"{tiny['base']}/model.safetensors", framework="pt") as f:
        base_w = {n: f.get_tensor(n) for n in tiny["delta"]}
    for r in tuned["matrices"]:
        W0 = base_w[r["name"]]
        assert r["k"] == round(0.5 * min(W0.shape))  # a fraction of min(m, n), as training resolves it
        U, V = _full_frame(W0)  # fp64 SVD vs the fp32 cached bases: the same frame to ~1e-6 here
        ref = _brute(tiny["delta"][r["name"]].double(), U, V, r["k"])
        for b in BLOCKS:
            assert r["energy"][b] == pytest.approx(ref[b], rel=1e-4)
        assert r["energy"]["total"] == pytest.approx(float(tiny["delta"][r["name"]].double().pow(2).sum()), rel=1e-6)
    # types and layers pool the energies of their matrices
    q = [r for r in tuned["matrices"] if r["type"] == "q_proj"]
    qrow = next(g for g in tuned["types"] if g["type"] == "q_proj")
    assert qrow["matrices"] == 2 and qrow["energy"]["D"] == pytest.approx(sum(r["energy"]["D"] for r in q))
    assert [g["type"] for g in tuned["types"]] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"]
    assert [g["layer"] for g in tuned["layers"]] == [0, 1]
    assert tuned["all"]["energy"]["total"] == pytest.approx(sum(r["energy"]["total"] for r in tuned["matrices"]))
    # the base against itself: nothing moved, no shares
    assert same["all"]["energy"]["total"] == 0.0 and same["all"]["share"] == dict.fromkeys(BLOCKS)
    # bases went through the disk cache: one entry per matrix, reused (not rewritten) by a second run
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 14
    stamp = [f.stat().st_mtime_ns for f in files]
    again = run_blocks(tiny["base"], [tiny["tuned"]], rank=0.5, cache_dir=str(cache))
    assert [f.stat().st_mtime_ns for f in sorted(cache.glob("*.safetensors"))] == stamp
    assert again["checkpoints"][0]["all"] == tuned["all"]
    # a mapping and a rank file, resolved as training resolves anchor.rank; k = 0 puts everything in D
    ranks = tmp_path / "ranks.json"
    ranks.write_text(json.dumps({"model.layers.0.self_attn.q_proj.weight": 3}))
    rep = run_blocks(tiny["base"], [tiny["tuned"]], rank={"@": str(ranks), "*": 0}, targets="q_proj",
                     cache_dir=str(cache))
    rows = {r["name"]: r for r in rep["checkpoints"][0]["matrices"]}
    assert rows["model.layers.0.self_attn.q_proj.weight"]["k"] == 3
    r1 = rows["model.layers.1.self_attn.q_proj.weight"]
    assert r1["k"] == 0 and r1["share"] == {"A": 0.0, "B": 0.0, "C": 0.0, "D": 1.0}


def test_run_blocks_refuses_bad_inputs_before_reading_weights(tiny, tmp_path):
    from rpsft.selection import SelectionError

    with pytest.raises(SelectionError, match="rank -1 is negative"):
        run_blocks(tiny["base"], [tiny["tuned"]], rank=-1)
    with pytest.raises(SelectionError, match="fractional rank must lie in"):
        run_blocks(tiny["base"], [tiny["tuned"]], rank=1.5)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run_blocks(tiny["base"], [str(tmp_path / "nowhere")], rank=4)
    with pytest.raises(ValueError, match="--labels has 2 entries for 1 checkpoints"):
        run_blocks(tiny["base"], [tiny["tuned"]], labels=["a", "b"])
    with pytest.raises(ValueError, match="--svd 'randomized'"):
        run_blocks(tiny["base"], [tiny["tuned"]], svd="randomized")


def test_a_whole_model_rank_map_reads_like_training_with_a_layer_selection(tiny):
    """A map's keys may name any matrix of the model (as in training with anchor.layers); a key naming none is
    refused with the closest real names."""
    from rpsft.selection import SelectionError

    whole = {"model.layers.0.self_attn.q_proj.weight": 3, "*": 2}
    rep = run_blocks(tiny["base"], [tiny["tuned"]], rank=whole, targets="q_proj", layers="1")
    assert {m["k"] for m in rep["checkpoints"][0]["matrices"]} == {2}
    with pytest.raises(SelectionError, match="transformer.h.0.attn"):
        run_blocks(tiny["base"], [tiny["tuned"]], rank={"transformer.h.0.attn.c_attn.weight": 3}, targets="q_proj")


def test_cli_writes_report_table_and_plot(tiny, tmp_path):
    from rpsft.analysis.cli import app

    out = tmp_path / "blocks"
    runner = CliRunner()
    res = runner.invoke(app, ["blocks", "--base", tiny["base"], "--tuned", tiny["tuned"], "--tuned",
                              f"{tiny['tuned2']},{tiny['base']}", "--labels", "a,b,same", "--rank", "0.25",
                              "--targets", "q_proj,down_proj", "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    rep = json.loads((out / "blocks.json").read_text())
    assert [c["label"] for c in rep["checkpoints"]] == ["a", "b", "same"] and rep["rank"] == 0.25
    assert {r["k"] for r in rep["checkpoints"][0]["matrices"]} == {8}  # 0.25 · min(32, 32) and 0.25 · min(32, 48)
    assert "down_proj" in res.output and "all" in res.output
    a = rep["checkpoints"][0]["all"]
    assert f"{100 * a['share']['D']:.1f}" in res.output
    lines = (out / "blocks.csv").read_text().splitlines()
    assert lines[0].startswith("checkpoint,name,type,layer,shape,k,energy_A") and len(lines) == 1 + 3 * 4
    png = (out / "blocks.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    # a mapping as training's anchor.rank takes it
    res = runner.invoke(app, ["blocks", "--base", tiny["base"], "--tuned", tiny["tuned"], "--rank",
                              "{q_proj: 2, '*': 5}", "--layers", "0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    ks = {r["type"]: r["k"] for r in json.loads((out / "blocks.json").read_text())["checkpoints"][0]["matrices"]}
    assert ks["q_proj"] == 2 and ks["gate_proj"] == 5
    res = runner.invoke(app, ["blocks", "--base", tiny["base"], "--tuned", tiny["tuned"], "--rank", "-3",
                              "--out", str(out)])
    assert res.exit_code == 2 and "rank -3 is negative" in res.output
