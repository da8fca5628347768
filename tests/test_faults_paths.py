"""Fault paths that used to end silently or in a traceback: a rank map for another model, a full disk during a
save, a torn model directory, analyses of checkpoints of different architectures, a run killed during its final
export, and a run whose only checkpoint is torn. Each must be one `error:` line with exit status 2 that names the
bad input and a command that works (and the tests run that command)."""

from __future__ import annotations

import errno
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rpsft import guards
from rpsft.cli import app
from rpsft.selection import SelectionError

runner = CliRunner()

SETTINGS = ("data.limit=8", "data.max_length=256", "train.batch_size=2", "train.grad_accum=1", "train.max_steps=2",
            "train.lr=1e-3", "train.warmup_ratio=0", "train.lr_scheduler=constant", "train.save_steps=100",
            "anchor.rank=4", "anchor.lam=1")


def train_args(model, data, out, *extra) -> list[str]:
    args = ["train"]
    for item in (f"model.name={model}", f"data.train={data}", f"output_dir={out}", *SETTINGS, *extra):
        args += ["--set", item]
    return args


def cli(args: list[str]):
    """(result, the error: lines); a traceback in the output is a failure of its own."""
    r = runner.invoke(app, args)
    assert "Traceback" not in r.output, r.output
    return r, [line for line in r.output.splitlines() if line.startswith("error:")]


def refused(args: list[str]) -> str:
    r, err = cli(args)
    assert r.exit_code == 2 and len(err) == 1, (r.exit_code, r.output, repr(r.exception))
    return err[0]


def quoted_command(line: str) -> list[str]:
    """The command a message tells the user to run (between backticks), as CLI arguments without `rpsft`."""
    cmd = shlex.split(re.search(r"`(rpsft [^`]+)`", line).group(1))
    return cmd[1:]


# ------------------------------------------------------------------------ a rank map for another model
GPT2_MAP = {"transformer.h.0.attn.c_attn.weight": 4, "transformer.h.0.mlp.c_fc.weight": 4}


def test_a_rank_map_for_another_model_is_refused_before_the_model_loads(tiny_model_dir, synth_data, tmp_path,
                                                                       monkeypatch):
    import rpsft.train as train_mod

    monkeypatch.setattr(train_mod, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    f = tmp_path / "m.json"
    f.write_text(json.dumps(GPT2_MAP))
    out = tmp_path / "run"
    line = refused(train_args(tiny_model_dir, synth_data["train"], out, f"anchor.rank=@{f}"))
    # both unmatched keys named, with the model's closest real names, and how to make a map for this model
    assert "match no matrix of the model" in line and str(f) in line
    assert "'transformer.h.0.attn.c_attn.weight', 'transformer.h.0.mlp.c_fc.weight'" in line
    assert "closest real names" in line and "model.layers." in line and "rpsft analyze energy" in line
    assert not out.exists()  # refused before config.yaml: never the silent plain-SFT run it used to be


def test_every_key_must_match_a_matrix_even_when_others_do(tiny_model_dir, tmp_path):
    from rpsft.anchor import RotationAnchor
    from rpsft.models import load_model

    model, _ = load_model(str(tiny_model_dir))
    q0 = "model.layers.0.self_attn.q_proj.weight"
    f = tmp_path / "m.json"
    f.write_text(json.dumps({q0: 3, "model.layers.0.self_attn.q_prj.weight": 5}))
    with pytest.raises(SelectionError) as e:
        RotationAnchor.from_model(model, rank=f"@{f}")
    msg = str(e.value)
    assert "['model.layers.0.self_attn.q_prj.weight']" in msg and f"closest real names: ['{q0}']" in msg
    assert f"'{q0}'," not in msg.split("closest")[0]  # the matching key is not listed as unmatched
    # the same for a hand-written mapping: a typo'd pattern is named even with a '*' fallback
    with pytest.raises(SelectionError, match=r"rank map keys \['q_prj'\] match no matrix.*closest real names"):
        RotationAnchor.from_model(model, rank={"q_prj": 5, "*": 2})
    # '*' alone is no key of a matrix: it anchors every selected matrix
    f.write_text(json.dumps({"*": 2}))
    assert set(RotationAnchor.from_model(model, rank=f"@{f}").ranks.values()) == {2}
    # a key for a real matrix outside the selection (layers=0) is not an error: the map may cover the whole model
    f.write_text(json.dumps({q0: 3, "model.layers.1.self_attn.q_proj.weight": 5, "*": 2}))
    a = RotationAnchor.from_model(model, rank=f"@{f}", layers=0)
    assert a.ranks[q0] == 3 and all(".layers.0." in n for n in a.ranks)


# ----------------------------------------------------------------------------------------- a full disk
def fill_the_disk_on_the_second_save(monkeypatch):
    """Every weight file goes through transformers' safetensors writer: its first call (checkpoint-1) succeeds and
    is sealed, the second (checkpoint-2's model.safetensors) fails as a full disk does. Returns the undo."""
    import transformers.modeling_utils as mu

    real, calls = mu.safe_save_file, {"n": 0}

    def fills_the_disk(tensors, filename, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(mu, "safe_save_file", fills_the_disk)
    return lambda: monkeypatch.setattr(mu, "safe_save_file", real)


def test_disk_full_during_a_save_is_one_line_naming_the_last_sealed_checkpoint(tiny_model_dir, synth_data,
                                                                             tmp_path, monkeypatch):
    free_the_disk = fill_the_disk_on_the_second_save(monkeypatch)
    out = tmp_path / "run"
    line = refused(train_args(tiny_model_dir, synth_data["train"], out, "train.max_steps=3", "train.save_steps=1"))
    assert re.fullmatch(
        rf"error: disk full while writing {re.escape(str(out / 'checkpoint-2' / 'model.safetensors'))} \(\d+ MiB "
        rf"free on that filesystem\); nothing is lost: the last sealed checkpoint is "
        rf"{re.escape(str(out / 'checkpoint-1'))} — free space and run `rpsft train --config "
        rf"{re.escape(str(out / 'config.yaml'))} --resume latest`", line), line
    assert not (out / "checkpoint-2" / guards.COMPLETE).exists()
    # the named command finishes the run from checkpoint-1
    summary = finish_with_the_named_command(line, free_the_disk, out)
    assert summary["global_step"] == 3 and summary["resumed_from"] == str(out / "checkpoint-1")


def finish_with_the_named_command(line: str, free_the_disk, out: Path) -> dict:
    """Free the disk, run the command the error line names, and return the finished run's run.json."""
    free_the_disk()
    r, err = cli(quoted_command(line))
    assert r.exit_code == 0 and not err, r.output
    return json.loads((out / "run.json").read_text())


def test_disk_full_during_an_rl_save_names_the_rl_command(tiny_model_dir, tmp_path, monkeypatch):
    from .rl.rl_helpers import SYNTH_ROWS, tiny_overrides, write_jsonl

    free_the_disk = fill_the_disk_on_the_second_save(monkeypatch)
    out = tmp_path / "rl"
    args = ["rl", "--init", str(tiny_model_dir)]
    for item in tiny_overrides(write_jsonl(tmp_path / "synth.jsonl", SYNTH_ROWS), out, **{"eval.enabled": "false"}):
        args += ["--set", item]
    line = refused(args)
    assert line.startswith(f"error: disk full while writing {out / 'checkpoint-2' / 'model.safetensors'} (")
    assert line.endswith(f"the last sealed checkpoint is {out / 'checkpoint-1'} — free space and run `rpsft rl "
                         f"--config {out / 'config.yaml'} --resume latest`")
    summary = finish_with_the_named_command(line, free_the_disk, out)
    assert summary["global_step"] == 2 and summary["resumed_from"] == str(out / "checkpoint-1")


def test_disk_full_anywhere_else_is_one_line_too(tmp_path, monkeypatch, capsys):
    """A full disk in any command (here one writing a JSON file) is the wrapper's one line, not a traceback; so are
    the quota form (EDQUOT), safetensors' own error, which carries the OS message only as text, and torch.save's
    causeless "file write failed" on a filesystem with almost nothing left."""
    import typer

    from rpsft.terminal import disk_full_message, friendly_errors

    free = {"bytes": 3 * 2**20}
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(2**40, 2**39, free["bytes"]))
    target = tmp_path / "out" / "energy.json"
    quota = OSError(errno.EDQUOT, "Disk quota exceeded", str(target))
    assert disk_full_message(quota) == f"disk full while writing {target} (3 MiB free on that filesystem)"
    st_err = Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                       'left on device" })')
    assert disk_full_message(st_err, tmp_path) == f"disk full while writing {tmp_path} (3 MiB free on that filesystem)"
    torch_err = RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                             "data/0: file write failed")
    assert disk_full_message(torch_err, tmp_path) == f"disk full while writing {tmp_path} (3 MiB free on that " \
                                                     "filesystem)"
    assert disk_full_message(torch_err) is None  # no run directory to look at: not taken for a full disk
    assert disk_full_message(OSError(errno.EACCES, "Permission denied", str(target))) is None
    assert disk_full_message(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    # raised while handling a full disk: still a full disk; suppressed with `from None`: not
    try:
        try:
            raise quota
        except OSError as inner:
            raise RuntimeError("saving failed") from inner
    except RuntimeError as outer:
        assert disk_full_message(outer) is not None
    assert disk_full_message(_suppressed(quota)) is None
    free["bytes"] = 10 * 2**30
    assert disk_full_message(torch_err, tmp_path) is None  # 10 GiB free: the write failed for another reason

    @friendly_errors
    def command():
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    with pytest.raises(typer.Exit) as e:
        command()
    assert e.value.exit_code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"error: disk full while writing {target} (10240 MiB free on that filesystem)"]


def _suppressed(cause: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except OSError:
            raise ValueError("unrelated") from None
    except ValueError as e:
        return e


# ------------------------------------------------------------------------------- a torn model directory
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("method", ["rpsft", "sft"])
def test_a_truncated_config_json_is_one_line_before_anything_loads(tiny_model_dir, synth_data, tmp_path, method):
    bad = _copy(tiny_model_dir, tmp_path / "model")
    text = (bad / "config.json").read_text()
    (bad / "config.json").write_text(text[: len(text) // 2])
    out = tmp_path / "run"
    line = refused(train_args(bad, synth_data["train"], out, f"method={method}"))
    assert f"{bad / 'config.json'} is truncated or not valid JSON (" in line and "copy the checkpoint again" in line
    assert not out.exists()
    line = refused(["eval", "--model", str(bad), "--suite", str(synth_data["test"]), "--out", str(tmp_path / "e")])
    assert f"{bad / 'config.json'} is truncated" in line


def test_a_truncated_safetensors_file_is_one_line_before_anything_loads(tiny_model_dir, synth_data, tmp_path):
    bad = _copy(tiny_model_dir, tmp_path / "model")
    weights = bad / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)  # a copy cut short: the header is whole, the tensors after it are not
    out = tmp_path / "run"
    line = refused(train_args(bad, synth_data["train"], out))
    assert f"{weights} is truncated ({size // 2} bytes; its header describes {size})" in line
    assert not out.exists()
    weights.write_bytes(b"\xff" * 16)  # a garbage header length
    line = refused(train_args(bad, synth_data["train"], out))
    assert f"{weights} is not a safetensors file" in line


# --------------------------------------------------------- analyses of checkpoints of other architectures
@pytest.fixture(scope="module")
def other_archs(tmp_path_factory, tiny_tokenizer):
    """Checkpoints that are not the tiny model fine-tuned: one more layer; a wider MLP."""
    from rpsft_testing import make_tiny_llama

    root = tmp_path_factory.mktemp("archs")
    out = {}
    for tag, kw in (("deeper", {"layers": 3}), ("wider", {"inter": 64})):
        make_tiny_llama(len(tiny_tokenizer), tokenizer=tiny_tokenizer, **kw).save_pretrained(root / tag)
        tiny_tokenizer.save_pretrained(root / tag)
        out[tag] = str(root / tag)
    return out


@pytest.mark.parametrize("analysis", ["rotation", "first-order", "drift", "blocks"])
def test_analyses_refuse_other_architectures_up_front(tiny_model_dir, synth_data, other_archs, tmp_path, analysis):
    base = str(tiny_model_dir)
    data = {"rotation": ["--k", "4"], "blocks": ["--rank", "4"]}.get(
        analysis, ["--data", str(synth_data["train"]), "--limit", "2"])
    args = [analysis, "--base", base, *data, "--out", str(tmp_path / analysis)]
    line = refused(["analyze", *args, "--tuned", f"{base},{other_archs['deeper']}"])
    assert line == (f"error: {other_archs['deeper']} has 3 layers and the base {base} has 2; compare checkpoints "
                    "fine-tuned from the base (same architecture)")
    line = refused(["analyze", *args, "--tuned", other_archs["wider"]])
    assert line == (f"error: {other_archs['wider']}: model.layers.0.mlp.gate_proj.weight has shape (64, 32) and the "
                    f"base {base} has (48, 32); compare checkpoints fine-tuned from the base (same architecture)")
    assert not (tmp_path / analysis).exists()


def test_the_architecture_check_returns_the_base_selection_and_names_a_missing_matrix(tiny_model_dir,
                                                                                     tiny_tokenizer, tmp_path):
    from rpsft.analysis._common import check_comparable
    from rpsft_testing import make_tiny_llama

    base = str(tiny_model_dir)
    assert check_comparable(base, [base, base], targets=["q_proj"]) == [
        (f"model.layers.{i}.self_attn.q_proj.weight", (32, 32)) for i in (0, 1)]
    # an untied base has an lm_head matrix; the tied tiny model has none of its own
    untied = tmp_path / "untied"
    make_tiny_llama(len(tiny_tokenizer), tie=False).save_pretrained(untied)
    with pytest.raises(ValueError) as e:
        check_comparable(str(untied), [base], targets=["lm_head"])
    assert str(e.value) == (f"{base} has no matrix lm_head.weight (the base {untied} has ({len(tiny_tokenizer)}, "
                            "32)); compare checkpoints fine-tuned from the base (same architecture)")


# ----------------------------------------------------------------- a run killed during its final export
def _finished_run(model, data, out) -> None:
    r, err = cli(train_args(model, data, out, "train.save_steps=2"))
    assert r.exit_code == 0 and not err, r.output


@pytest.mark.parametrize("kill", ["before_weights", "mid_weights"])
def test_eval_of_a_run_killed_during_its_final_export_names_the_command_that_finishes_it(
        tiny_model_dir, synth_data, tmp_path, kill):
    out = tmp_path / "run"
    _finished_run(tiny_model_dir, synth_data["train"], out)
    weights = out / "model.safetensors"
    (out / "run.json").unlink()
    if kill == "before_weights":
        weights.unlink()
    else:
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size // 3)
    ev = ["eval", "--model", str(out), "--suite", str(synth_data["test"]), "--limit", "1", "--greedy",
          "--max-new-tokens", "2", "--out", str(tmp_path / "e")]
    line = refused(ev)
    assert "no file named" not in line
    assert f"{out} is an unfinished run (stopped before its final export was written: " in line
    assert f"`rpsft train --config {out / 'config.yaml'} --resume latest` finishes it" in line
    assert f"or pass its last sealed checkpoint {out / 'checkpoint-2'}" in line
    r, err = cli(quoted_command(line))
    assert r.exit_code == 0 and not err, r.output
    assert json.loads((out / "run.json").read_text())["global_step"] == 2
    r, err = cli(ev)
    assert r.exit_code == 0 and not err, r.output


# -------------------------------------------------------------------- a torn checkpoint, the only one
def test_a_run_whose_only_checkpoint_is_torn_gets_a_command_that_works(tiny_model_dir, synth_data, tmp_path):
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, synth_data["train"], out, "train.save_steps=2")
    _finished_run(tiny_model_dir, synth_data["train"], out)
    # killed while checkpoint-2 was being written (before its trainer_state.json and its marker): the final export
    # never happened either
    for name in (guards.COMPLETE, "trainer_state.json"):
        (out / "checkpoint-2" / name).unlink()
    for name in ("run.json", "model.safetensors"):
        (out / name).unlink()
    line = refused(args)
    assert "--resume latest" not in line
    assert line == (f"error: {out} holds an unfinished run with no complete checkpoint to resume from "
                    "(checkpoint-2 is incomplete: interrupted while saving); pass --overwrite to start again (or "
                    "choose another output_dir)")
    line = refused([*args, "--resume", "latest"])
    assert line.startswith(f"error: nothing to resume: no complete checkpoint-N with trainer_state.json in {out}")
    assert line.endswith("incomplete, skipped: checkpoint-2; pass --overwrite instead of --resume to start again")
    r, err = cli([*args, "--overwrite"])
    assert r.exit_code == 0 and not err, r.output
    assert (out / "checkpoint-2" / guards.COMPLETE).is_file() and (out / "run.json").is_file()
