"""CLI smoke on the tiny offline models: every command writes its JSON/CSV/PNG and prints a table."""

import json
import math
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from rpsft.analysis.cli import app

runner = CliRunner()


def _ok(args):
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def _png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_cli_module_imports_cheaply():
    code = "import sys, rpsft.analysis.cli; print(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_energy_cli_writes_rank_map(tiny, tmp_path):
    out = tmp_path / "energy"
    res = _ok(["energy", "--model", tiny["base"], "--data", tiny["data"], "--matrices", "q_proj,gate_proj",
               "--layers", "0-1", "--ranks", "2,4", "--limit", "3", "--out", str(out)])
    assert "r@20%" in res.output
    rep = json.loads((out / "energy.json").read_text())
    ranks = json.loads((out / "ranks.json").read_text())
    assert set(ranks) == {f"model.layers.{i}.{t}.weight" for i in (0, 1)
                          for t in ("self_attn.q_proj", "mlp.gate_proj")}
    for m in rep["matrices"]:
        assert ranks[m["name"]] == m["rank_for_target"]
        assert m["y"][ranks[m["name"]] - 1] >= 0.2 and (ranks[m["name"]] == 1 or m["y"][ranks[m["name"]] - 2] < 0.2)
        assert set(m["y_at"]) == {"2", "4"} and len(m["y"]) == m["R"]
    assert rep["samples"] == 3
    # the file is accepted as-is by the training side's rank resolution (`--set anchor.rank=@ranks.json`)
    from rpsft.selection import resolve_ranks

    shapes = [(m["name"], tuple(m["shape"])) for m in rep["matrices"]]
    assert resolve_ranks(shapes, f"@{out / 'ranks.json'}") == ranks
    lines = (out / "energy.csv").read_text().splitlines()
    assert lines[0] == "name,type,layer,r,x,y" and len(lines) == 1 + sum(m["R"] for m in rep["matrices"])
    _png(out / "energy.png")


def test_energy_cli_match_rank_writes_an_equal_memory_map(tiny, tmp_path):
    out = tmp_path / "energy"
    res = _ok(["energy", "--model", tiny["base"], "--data", tiny["data"], "--matrices", "q_proj,gate_proj",
               "--layers", "0-1", "--limit", "3", "--match-rank", "4", "--out", str(out)])
    rep = json.loads((out / "energy.json").read_text())
    ranks = json.loads((out / "ranks.json").read_text())
    mem = sum((m["shape"][0] + m["shape"][1] + 1) * ranks[m["name"]] for m in rep["matrices"]) * 4 / 2**20
    uniform = sum((m["shape"][0] + m["shape"][1] + 1) * min(4, m["R"]) for m in rep["matrices"]) * 4 / 2**20
    assert rep["match_rank"] == 4 and 0 < rep["target"] <= 1
    assert rep["anchor_mib"]["map"] == pytest.approx(mem) and mem <= uniform
    assert rep["anchor_mib"]["uniform_k4"] == pytest.approx(uniform)
    assert f"at uniform k=4" in res.output
    for m in rep["matrices"]:
        assert m["y"][ranks[m["name"]] - 1] >= rep["target"] or ranks[m["name"]] == m["R"]
    res = runner.invoke(app, ["energy", "--model", tiny["base"], "--data", tiny["data"], "--match-rank", "0",
                              "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "--match-rank 0" in res.output


def test_rotation_cli_several_checkpoints(tiny, tmp_path):
    out = tmp_path / "rot"
    ck = f"{tiny['tuned']},{tiny['tuned2']},{tiny['base']}"
    _ok(["rotation", "--base", tiny["base"], "--tuned", ck, "--labels", "a,b,same", "--k", "16", "--out", str(out)])
    rep = json.loads((out / "rotation.json").read_text())
    by = {c["label"]: c for c in rep["checkpoints"]}
    assert set(by) == {"a", "b", "same"}
    assert by["same"]["layer_mean"]["u_mean_deg"] == pytest.approx(0.0, abs=1e-5)
    # the larger perturbation rotates more; q_proj is 32×32 with K = 16 so U-space moves
    assert by["b"]["layer_mean"]["v_mean_deg"] > by["a"]["layer_mean"]["v_mean_deg"] > 0.01
    assert [r["layer"] for r in by["a"]["layers"]] == [0, 1] and all(r["types"] == 7 for r in by["a"]["layers"])
    rw = by["a"]["rankwise"]
    assert rw["matrix"] == "model.layers.0.self_attn.q_proj.weight" and rw["r"][-1] == 16
    assert len((out / "rotation.csv").read_text().splitlines()) == 1 + 3 * 14
    _png(out / "rotation.png")


def test_first_order_cli(tiny, tmp_path):
    out = tmp_path / "fo"
    _ok(["first-order", "--base", tiny["base"], "--tuned", tiny["tuned"], "--data", tiny["data"], "--limit", "4",
         "--out", str(out)])
    rep = json.loads((out / "first_order.json").read_text())
    ck = rep["checkpoints"][0]
    assert len(ck["matrices"]) == 14 and [r["layer"] for r in ck["layers"]] == [0, 1]
    assert ck["total_inner"] == pytest.approx(sum(r["inner"] for r in ck["matrices"]))
    _png(out / "first_order.png")


def test_drift_cli(tiny, tmp_path):
    out = tmp_path / "drift"
    _ok(["drift", "--base", tiny["base"], "--tuned", f"{tiny['tuned']},{tiny['tuned2']}", "--data", tiny["data"],
         "--out", str(out)])
    rep = json.loads((out / "drift.json").read_text())
    assert [m["label"] for m in rep["models"]] == ["tuned", "tuned2"]
    assert rep["samples"] == 5 and len(rep["pca"]["points"]["base"]) == 5
    assert all(m["centroid_distance"] > 0 for m in rep["models"])
    _png(out / "drift.png")


def test_entropy_cli(tiny, tmp_path):
    out = tmp_path / "ent"
    _ok(["entropy", "--model", f"{tiny['base']},{tiny['tuned']}", "--data", tiny["data"], "--limit", "4",
         "--max-new-tokens", "6", "--batch-size", "3", "--out", str(out)])
    rep = json.loads((out / "entropy.json").read_text())
    for m in rep["models"]:
        assert len(m["entropies"]) == 4 and all(1 <= n <= 6 for n in m["lengths"])
        assert all(0 < e <= math.log(320) + 1e-6 for e in m["entropies"])  # ≤ log(vocab) nats
        assert m["kde"]["bandwidth"] > 0
    _png(out / "entropy.png")


def test_clear_errors(tiny, tmp_path):
    res = runner.invoke(app, ["energy", "--model", tiny["base"], "--data", str(tmp_path / "nope.jsonl"),
                              "--out", str(tmp_path)])
    assert res.exit_code == 2 and "nope.jsonl" in res.output
    res = runner.invoke(app, ["rotation", "--base", tiny["base"], "--tuned", tiny["tuned"], "--matrices", "zz_proj",
                              "--out", str(tmp_path)])
    assert res.exit_code == 2 and "q_proj" in res.output  # lists candidates
    res = runner.invoke(app, ["rotation", "--base", tiny["base"], "--tuned", str(tmp_path / "missing"),
                              "--out", str(tmp_path)])
    assert res.exit_code == 2 and "missing" in res.output
    res = runner.invoke(app, ["energy", "--model", tiny["base"], "--data", tiny["data"], "--target", "1.5",
                              "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--target" in res.output
