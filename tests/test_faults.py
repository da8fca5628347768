"""Fault injection: each way a run can go wrong, and what the user gets instead of lost work or a traceback.

Every test asserts the message and that nothing was lost or written wrongly (no NaN weights, no deleted foreign
files, no config.yaml for a run refused before it started, the stored summary untouched)."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from rpsft import guards
from rpsft.bases import BasesCache, fingerprint, get_bases
from rpsft.cli import app
from rpsft.config import ConfigError, load_config
from rpsft.data.formats import DataFormatError, load_records
from rpsft.train import train

runner = CliRunner()


def cfg_for(model_dir, data, out, *extra):
    return load_config(None, [f"model.name={model_dir}", f"data.train={data}", f"output_dir={out}", "data.limit=8",
                              "data.max_length=256", "train.batch_size=2", "train.grad_accum=1", "train.max_steps=2",
                              "train.lr=1e-3", "train.warmup_ratio=0", "train.lr_scheduler=constant",
                              "train.save_steps=100", "anchor.rank=4", "anchor.lam=1", *extra])


def strict_rows(path: Path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON: a bare NaN/Infinity is an error, as in every non-Python reader."""
    def no_constants(c):
        raise ValueError(f"bare {c} in {path}")

    return [json.loads(line, parse_constant=no_constants) for line in path.read_text().splitlines()]


def all_finite(path: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values())


# ------------------------------------------------------------------------------------------ 1. diverging run
def test_divergence_stops_at_the_step_and_keeps_the_last_finite_checkpoint(tiny_model_dir, synth_data, tmp_path):
    out = tmp_path / "div"
    cfg = cfg_for(tiny_model_dir, synth_data["train"], out, "train.lr=1e3", "train.max_steps=8", "train.save_steps=1",
                  "train.save_total_limit=null")
    with pytest.raises(guards.NonFiniteError) as e:
        train(cfg, progress=False)
    msg = str(e.value)
    assert msg.startswith("training stopped at step ") and "Likely cause" in msg and "train.lr (1000.0)" in msg
    assert "nan_policy=skip" in msg and "\n" not in msg
    step = int(msg.split("step ")[1].split(":")[0])
    ckpts = sorted(out.glob("checkpoint-*"), key=guards._step)
    assert ckpts and guards._step(ckpts[-1]) < step and f"kept: {ckpts[-1]}" in msg
    assert all(all_finite(c / "model.safetensors") for c in ckpts)  # never a NaN weight on disk
    assert not (out / "model.safetensors").exists() and not (out / "run.json").exists()  # no "finished" model
    rows = strict_rows(out / "metrics.jsonl")
    assert max(r["step"] for r in rows) < step


def test_skip_policy_counts_and_stops_after_n(tiny_model_dir, synth_data, tmp_path, monkeypatch):
    # A poisoned batch: the loss is NaN on steps 2 and 3 only, so skipping lets the run finish.
    cfg = cfg_for(tiny_model_dir, synth_data["train"], tmp_path / "skip", "train.max_steps=4",
                  "train.nan_policy=skip", "train.nan_max_skips=2", "train.lr=1e-2")
    from rpsft.train import AnchoredSFTTrainer

    calls = {"n": 0}
    real = AnchoredSFTTrainer.compute_loss

    def poisoned(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = real(self, model, inputs, return_outputs, num_items_in_batch)
        calls["n"] += 1
        return out * float("nan") if calls["n"] in (2, 3) else out

    monkeypatch.setattr(AnchoredSFTTrainer, "compute_loss", poisoned)
    summary = train(cfg, progress=False)
    assert summary["skipped_steps"] == 2 and summary["global_step"] == 4
    assert all_finite(tmp_path / "skip" / "model.safetensors")
    rows = strict_rows(tmp_path / "skip" / "metrics.jsonl")
    assert [r.get("rpsft/skipped_steps") for r in rows if "loss" in r] == [None, 1, 2, 2]
    # one more poisoned step than allowed: stop, saying how many were skipped
    calls["n"] = 0
    cfg1 = cfg_for(tiny_model_dir, synth_data["train"], tmp_path / "skip1", "train.max_steps=4",
                   "train.nan_policy=skip", "train.nan_max_skips=1")
    with pytest.raises(guards.NonFiniteError, match=r"step 3: loss.*1 earlier step\(s\) skipped"):
        train(cfg1, progress=False)


def test_guard_message_names_the_likely_cause():
    class FakeTrainer:
        method_config = load_config(None, ["lr=0.5", "lam=3"])
        anchor_weight = 3.0

        def training_step(self, *a):
            return torch.tensor(1.0)

        def log(self, *a, **k):
            pass

    trainer = FakeTrainer()  # kept: the guard holds its trainer weakly
    g = guards.FiniteGuard(trainer)
    inf, nan = float("inf"), float("nan")
    assert "delete the bases cache" in g.message(1, ["anchor penalty R"], 1.0, inf, 1.0)
    assert "first batch already gives it" in g.message(1, ["loss"], nan, 0.0, nan)
    assert "lower anchor.lam (λ=3.0) or train.lr (0.5)" in g.message(7, ["anchor penalty R"], 1.0, inf, 1.0)
    assert "the loss diverged (lower train.lr (0.5))" in g.message(7, ["loss"], nan, 0.0, nan)  # resumed: no history
    g.first_loss, g.last_finite_loss = 2.0, 3.0
    assert "step-1 loss 2, last finite 3" in g.message(7, ["gradient norm"], 1e4, 0.0, nan)
    assert "the gradient overflowed" in g.message(7, ["gradient norm"], 2.5, 0.0, inf)


def test_non_finite_values_are_written_as_null(tmp_path):
    from rpsft import fileio

    fileio.append_jsonl(tmp_path / "m.jsonl", {"loss": float("nan"), "grad_norm": float("inf"), "x": [1.0, -float("inf")]})
    assert strict_rows(tmp_path / "m.jsonl") == [{"loss": None, "grad_norm": None, "x": [1.0, None]}]


@pytest.mark.parametrize("item,msg", [("lr=inf", "train.lr must be a finite number"),
                                      ("lam=inf", "anchor.lam must be a finite number"),
                                      ("lr=nan", "train.lr"), ("data.limit=0", "data.limit must be >= 1"),
                                      ("data.limit=-1", "data.limit must be >= 1"),
                                      ("output_dir=", "output_dir: empty value"),
                                      ("train.max_grad_norm=inf", "train.max_grad_norm"),
                                      ("anchor.targets=", "anchor.targets: expected a list"),
                                      ("train.nan_policy=ignore", "train.nan_policy must be stop or skip"),
                                      ("rank=1000.5", "anchor.rank=1000.5: give an int k"),
                                      ("rank=abc", "anchor.rank: rank 'abc' is not a number")])
def test_bad_values_are_refused_at_config_time(item, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(")):
        load_config(None, [item])


def test_rank_written_as_a_float_means_k():
    assert load_config(None, ["rank=1e3"]).anchor.rank == 1000


# --------------------------------------------------------------------------------------- 2. bases cache
def _rewrite(path: Path, edit) -> None:
    with safe_open(str(path), "pt") as f:
        meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    edit(t, meta)
    save_file(t, str(path), metadata=meta)  # header still valid, metadata (checksum included) kept


@pytest.mark.parametrize("what", ["sigma", "huge_u", "sigma_no_checksum"])
def test_corrupt_cache_entry_is_detected_recomputed_and_rewritten(tmp_path, caplog, what):
    torch.manual_seed(0)
    W = torch.randn(24, 16)
    cache = BasesCache(tmp_path)
    good = get_bases(W, 6, cache=cache)
    path = cache._path(fingerprint(W), "exact")

    def edit(t, meta):
        if what == "huge_u":
            t["U"][3, 2] = 1e30
        else:
            t["S"][0] *= 2
        if what == "sigma_no_checksum":  # an entry from before checksums: caught by the numerical check
            meta.pop("checksum")
            meta["format"] = "1"

    _rewrite(path, edit)
    with caplog.at_level(logging.WARNING, logger="rpsft.bases"):
        again = get_bases(W, 6, cache=cache)
    assert "recomputing" in caplog.text and path.name in caplog.text
    assert torch.equal(again.S, good.S) and torch.equal(again.U, good.U)
    # rewritten: the next load is a clean hit
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rpsft.bases"):
        assert torch.equal(get_bases(W, 6, cache=cache).S, good.S)
    assert caplog.text == ""


def test_corrupt_cache_does_not_reach_the_penalty(tiny_model_dir, synth_data, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("RPSFT_CACHE", str(tmp_path / "cache"))
    train(cfg_for(tiny_model_dir, synth_data["train"], tmp_path / "a", "train.max_steps=1"), progress=False)
    for f in (tmp_path / "cache" / "bases").glob("*.safetensors"):
        _rewrite(f, lambda t, meta: t["S"].__setitem__(0, t["S"][0] * 2))
    with caplog.at_level(logging.WARNING, logger="rpsft.bases"):
        train(cfg_for(tiny_model_dir, synth_data["train"], tmp_path / "b", "train.max_steps=1"), progress=False)
    assert caplog.text.count("fails its checksum") == 14
    r = strict_rows(tmp_path / "b" / "metrics.jsonl")[0]["rpsft/penalty"]
    assert r < 1e-9  # R(W0) at its round-off floor, not the O(σ₁²) a doubled σ₁ gives


@pytest.mark.parametrize("fault", ["full", "read_only"])
def test_unwritable_cache_warns_and_runs_uncached(tmp_path, caplog, monkeypatch, fault):
    import errno

    import safetensors.torch

    err = errno.ENOSPC if fault == "full" else errno.EROFS  # a full disk; a read-only mount (root included)

    def refuse(*a, **k):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(safetensors.torch, "save_file", refuse)
    cache = BasesCache(tmp_path / "c")
    with caplog.at_level(logging.WARNING, logger="rpsft.bases"):
        b = get_bases(torch.randn(12, 8), 3, cache=cache)
        b2 = get_bases(torch.randn(12, 8), 3, cache=cache)
    assert b.k == b2.k == 3 and cache.root is None and not list((tmp_path / "c").glob("*"))
    assert caplog.text.count("running without caching") == 1 and os.strerror(err) in caplog.text


def test_unwritable_cache_with_lean_frames(tmp_path, caplog):
    from rpsft.frames import get_lean_bases

    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    cache = BasesCache(blocker / "cache")
    with caplog.at_level(logging.WARNING, logger="rpsft"):
        b = get_lean_bases(torch.randn(12, 8), 3, torch.bfloat16, cache=cache)
    assert b.k == 3 and cache.root is None and caplog.text.count("running without caching") == 1


def test_uncreatable_rpsft_cache_is_a_warning_not_a_traceback(tiny_model_dir, synth_data, tmp_path, monkeypatch,
                                                              caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("RPSFT_CACHE", str(blocker / "cache"))
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="rpsft"):
        r = runner.invoke(app, ["train", "--set", f"model.name={tiny_model_dir}", "--set",
                                f"data.train={synth_data['train']}", "--set", f"output_dir={out}", "--set",
                                "data.limit=4", "--set", "max_steps=1", "--set", "rank=2", "--set",
                                "train.batch_size=2"])
    assert r.exit_code == 0, r.output
    assert (out / "run.json").is_file() and "Traceback" not in r.output
    assert "cannot be created (Not a directory); running without caching" in caplog.text


# -------------------------------------------------------------------------------------------- 3. overwrite
def test_overwrite_deletes_only_what_a_run_wrote(tiny_model_dir, synth_data, tmp_path):
    out = tmp_path / "run"
    cfg = cfg_for(tiny_model_dir, synth_data["train"], out, "train.max_steps=1", "train.save_steps=1")
    train(cfg, progress=False)
    (out / "my-notes.txt").write_text("mine")
    (out / "plots").mkdir()
    with pytest.raises(FileExistsError, match=r"my-notes\.txt, plots/.*--overwrite-all to delete"):
        train(cfg, overwrite=True, progress=False)
    assert (out / "my-notes.txt").read_text() == "mine" and (out / "run.json").is_file()  # nothing deleted
    (out / "my-notes.txt").unlink()
    (out / "plots").rmdir()
    (out / "checkpoint-1" / "stale").write_text("x")
    train(cfg, overwrite=True, progress=False)
    assert not (out / "checkpoint-1" / "stale").exists() and (out / "run.json").is_file()
    (out / "my-notes.txt").write_text("mine")
    train(cfg, overwrite="all", progress=False)
    assert not (out / "my-notes.txt").exists()


def test_cli_overwrite_all_spelling(tmp_path, monkeypatch):
    import sys

    from rpsft import cli

    seen = {}
    monkeypatch.setattr(sys, "argv", ["rpsft", "train", "--overwrite=all", "--set", "lr=inf"])
    monkeypatch.setattr(cli, "app", lambda: seen.setdefault("argv", list(sys.argv)))
    cli.main()
    assert seen["argv"][2] == "--overwrite-all"


# --------------------------------------------------------------------------- 4. torn checkpoints and resume
def test_resume_passes_over_a_torn_checkpoint(tiny_model_dir, synth_data, tmp_path, caplog):
    out = tmp_path / "run"
    # every checkpoint, with its optimizer state: the finished run stands in for one killed while saving step 4
    extra = ("train.max_steps=4", "train.save_steps=2", "train.save_total_limit=null",
             "train.keep_optimizer_state=true")
    full = train(cfg_for(tiny_model_dir, synth_data["train"], tmp_path / "full", *extra), progress=False)
    cfg = cfg_for(tiny_model_dir, synth_data["train"], out, *extra)
    train(cfg, progress=False)
    # a kill while checkpoint-4 was being written: its files are partly there, its completion marker is not
    (out / "checkpoint-4" / guards.COMPLETE).unlink()
    (out / "checkpoint-4" / "optimizer.pt").write_bytes(b"torn")
    (out / "run.json").unlink()
    with caplog.at_level(logging.WARNING, logger="rpsft"):
        resumed = train(cfg, resume="latest", progress=False)
    assert "skipping incomplete checkpoint-4" in caplog.text and "resuming from checkpoint-2" in caplog.text
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["global_step"] == 4
    # run.json summarises the whole run: the same mean loss as the uninterrupted run, not the resumed half's
    assert resumed["train_loss"] == pytest.approx(guards.whole_run_loss(tmp_path / "full" / "metrics.jsonl"),
                                                  rel=1e-5)
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], rel=1e-3)
    assert (out / "checkpoint-4" / guards.COMPLETE).is_file()  # re-written whole
    # sealed but its trainer_state.json lost afterwards (a disk fault): passed over as well
    (out / "checkpoint-4" / "trainer_state.json").unlink()
    assert guards.latest_complete(out) == (out / "checkpoint-2", [out / "checkpoint-4"])


def test_every_run_file_gets_the_umask_mode(tiny_model_dir, synth_data, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        train(cfg_for(tiny_model_dir, synth_data["train"], out, "train.max_steps=1", "train.save_steps=1"),
              progress=False)
    finally:
        os.umask(old)
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert modes["checkpoint-1/model.safetensors"] == modes["model.safetensors"] == modes["run.json"] == 0o644
    assert set(modes.values()) == {0o644}, modes


def test_resuming_a_finished_run_is_a_no_op(tiny_model_dir, synth_data, tmp_path, caplog):
    out = tmp_path / "run"
    cfg = cfg_for(tiny_model_dir, synth_data["train"], out, "train.save_steps=1")
    first = train(cfg, progress=False)
    before = (out / "run.json").read_text()
    with caplog.at_level(logging.WARNING, logger="rpsft"):
        again = train(cfg, resume="latest", progress=False)
    assert "already finished (step 2); nothing to resume" in caplog.text
    assert again["global_step"] == first["global_step"] == 2 and (out / "run.json").read_text() == before
    assert max(r["step"] for r in strict_rows(out / "metrics.jsonl")) == 2


def test_a_torn_trainer_state_is_named_with_its_path(tiny_model_dir, synth_data, tmp_path):
    out = tmp_path / "run"
    cfg = cfg_for(tiny_model_dir, synth_data["train"], out, "train.save_steps=1", "train.save_total_limit=null")
    train(cfg, progress=False)
    state = out / "checkpoint-2" / "trainer_state.json"
    state.write_text('{"global_st')
    with pytest.raises(guards.CheckpointError, match=str(state)):
        train(cfg, resume=str(out / "checkpoint-2"), progress=False)
    # a legacy run (no markers): the torn one is skipped by --resume latest
    for c in out.glob("checkpoint-*"):
        (c / guards.COMPLETE).unlink()
    (out / "run.json").unlink()
    assert guards.latest_complete(out) == (out / "checkpoint-1", [out / "checkpoint-2"])


# --------------------------------------------------------------------------- 5. one-line errors, exit 2
def _cli(*args):
    r = runner.invoke(app, list(args))
    lines = [x for x in r.output.splitlines() if x.startswith("error:")]
    return r, lines


def test_missing_model_is_one_line_in_train_and_eval(tmp_path, synth_data):
    r, err = _cli("train", "--set", f"output_dir={tmp_path / 'o'}", "--set", "model.name=/nonexistent",
                  "--set", f"data.train={synth_data['train']}")
    assert r.exit_code == 2 and err and "/nonexistent does not exist" in err[0] and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()
    r, err = _cli("eval", "--model", "/nonexistent", "--suite", str(synth_data["test"]), "--out", str(tmp_path / "e"))
    assert r.exit_code == 2 and "/nonexistent does not exist" in r.output and "Traceback" not in r.output


def test_absent_data_path_never_goes_to_the_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    import datasets

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("asked the hub"))
    monkeypatch.chdir(tmp_path)
    for name in ("mydata/train", "./mydata/train", "a/b/c"):
        with pytest.raises(FileNotFoundError, match=f"data file {name} does not exist"):
            load_records(name)
    r, err = _cli("train", "--set", "data.train=mydata/train", "--set", f"output_dir={tmp_path / 'o'}")
    assert r.exit_code == 2 and "ConnectionError" not in r.output and "mydata/train" in err[0]


def test_rank_and_target_errors_come_before_the_model_loads(tiny_model_dir, synth_data, tmp_path, monkeypatch):
    import rpsft.train as train_mod

    monkeypatch.setattr(train_mod, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "o"
    with pytest.raises(ValueError, match=r"targets \['q_projj'\].*match no 2-D weight.*q_proj"):
        train(cfg_for(tiny_model_dir, synth_data["train"], out, "anchor.targets=q_projj"), progress=False)
    with pytest.raises(ValueError, match="rank map has no entry"):
        train(cfg_for(tiny_model_dir, synth_data["train"], out, "anchor.rank={q_proj: 2}"), progress=False)
    assert not out.exists()  # no config.yaml for a run that never started


def test_rows_dropped_for_length_are_counted(tiny_model_dir, synth_data, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="rpsft"):
        s = train(cfg_for(tiny_model_dir, synth_data["train"], tmp_path / "a", "data.max_length=128",
                          "data.limit=16", "train.max_steps=1"), progress=False)
    d = s["data"]
    assert d["rows"] == 16 and d["dropped_too_long"] == 16 - d["kept"] > 0 and d["longest_prompt_tokens"] > 128
    assert f"{d['dropped_too_long']} of 16 rows dropped" in caplog.text and "data.max_length=128" in caplog.text
    with pytest.raises(DataFormatError, match=r"all 8 rows were dropped.*longest prompt \d+ tokens.*max_length"):
        train(cfg_for(tiny_model_dir, synth_data["train"], tmp_path / "b", "data.max_length=16"), progress=False)


def test_data_file_faults_name_file_and_line(tmp_path, synth_data):
    rows = Path(synth_data["train"]).read_bytes().splitlines(keepends=True)[:3]
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + b"".join(rows))
    assert len(load_records(bom)) == 3
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b"".join(rows) + '{"prompt": "café", "completion": "x"}\n'.encode("latin-1"))
    with pytest.raises(DataFormatError, match=rf"{bad}:4: not UTF-8 \(byte 0xe9"):
        load_records(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"".join(rows) + b'{"prompt": "hi", "completion": "  "}\n')
    with pytest.raises(DataFormatError, match=rf"{empty}:4: the completion is empty"):
        load_records(empty)
    msgs = tmp_path / "m.jsonl"
    msgs.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}))
    with pytest.raises(DataFormatError, match=rf"{msgs}:1: the completion is empty"):
        load_records(msgs)
    js = tmp_path / "rows.json"
    js.write_bytes(b"\xef\xbb\xbf" + json.dumps([json.loads(r) for r in rows]).encode())
    assert len(load_records(js)) == 3


def test_eval_accepts_the_same_model_path_with_a_trailing_slash(tiny_model_dir, synth_data, tmp_path):
    from rpsft.eval import run_eval

    args = dict(suites=str(synth_data["test"]), limit=1, greedy=True, max_new_tokens=2, out_dir=tmp_path / "e")
    first = run_eval(str(tiny_model_dir), **args)
    again = run_eval(str(tiny_model_dir) + "/", **args)
    assert again["generated_now"] == 0 and again["benchmarks"] == first["benchmarks"]
