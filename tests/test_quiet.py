"""The quiet console: library progress bars, log records and warnings go to the run's log file."""

from __future__ import annotations

import logging
import warnings

from typer.testing import CliRunner

from rpsft.cli import app
from rpsft.quiet import quiet_console


def test_library_logs_and_warnings_go_to_the_log_file(tmp_path, capsys):
    import transformers

    log = tmp_path / "run" / "train.log"
    with quiet_console(log):
        warnings.warn("`old_name` is deprecated", FutureWarning)
        transformers.utils.logging.get_logger("transformers.trainer").warning("a library message")
        logging.getLogger("datasets.builder").warning("another one")
        assert not transformers.utils.logging.is_progress_bar_enabled()
    err = capsys.readouterr().err
    assert "deprecated" not in err and "library message" not in err
    text = log.read_text()
    assert "FutureWarning: `old_name` is deprecated" in text and "a library message" in text and "another one" in text
    assert transformers.utils.logging.is_progress_bar_enabled()  # restored
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.warn("after", FutureWarning)
    assert len(seen) == 1  # warnings are back to normal outside


def test_train_command_shows_only_its_own_progress(tiny_model_dir, synth_data, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--set", f"model.name={tiny_model_dir}", "--set",
                                 f"data.train={synth_data['train']}", "--set", f"output_dir={out}", "--set",
                                 "data.limit=8", "--set", "train.max_steps=2", "--set", "train.batch_size=2",
                                 "--set", "train.grad_accum=1", "--set", "anchor.rank=4"])
    assert r.exit_code == 0, r.output
    for noise in ("Loading weights", "Tokenizing", "examples/s", "it/s]", "Warning"):
        assert noise not in r.output, noise
    print(r.output)
    assert "train step 2/2" in r.output
