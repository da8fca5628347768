"""A quiet console for the CLI: one progress display per phase (GGUF conversion, anchor bases, training), with the
libraries' own progress bars switched off and their log records and warnings written to the run's log file.

Library use is untouched: only the ``rpsft`` commands enter :func:`quiet_console`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from pathlib import Path
from typing import Iterator

# Loggers whose records go to the log file instead of the console while a command runs. rpsft's own loggers are
# not among them: what rpsft warns about is meant for the user.
LIBRARY_LOGGERS = ("transformers", "datasets", "trl", "accelerate", "peft", "torch", "huggingface_hub", "py.warnings")


class RunLogHandler(logging.Handler):
    """Appends each record to ``path``, creating its folder on first use (the run directory may not exist yet,
    or be replaced by ``--overwrite`` after the command starts)."""

    def __init__(self, path: str | Path):
        super().__init__(logging.INFO)
        self.path = Path(path)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(self.format(record) + "\n")
        except Exception:  # a log line must never stop a run
            self.handleError(record)


@contextlib.contextmanager
def quiet_console(log_path: str | Path) -> Iterator[RunLogHandler]:
    """Inside: no transformers/datasets/GGUF progress bars, library log records and Python warnings (e.g.
    FutureWarnings from dependencies) go to ``log_path``; everything is restored on exit."""
    import datasets
    import transformers

    handler = RunLogHandler(log_path)
    saved = []
    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        saved.append((lg, list(lg.handlers), lg.propagate))
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lg.removeHandler(h)  # transformers' and datasets' default stderr handlers
        lg.addHandler(handler)
        lg.propagate = False
    tf_bars = transformers.utils.logging.is_progress_bar_enabled()
    ds_bars = datasets.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    gguf = _silence_gguf_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # each distinct warning once, into the log (captureWarnings below)
        logging.captureWarnings(True)
        try:
            yield handler
        finally:
            logging.captureWarnings(False)
            if gguf is not None:
                gguf[0].tqdm = gguf[1]
            if tf_bars:
                transformers.utils.logging.enable_progress_bar()
            if ds_bars:
                datasets.enable_progress_bars()
            for lg, handlers, propagate in saved:
                lg.handlers[:] = handlers
                lg.propagate = propagate


def _silence_gguf_bar():
    """transformers' GGUF reader draws a plain tqdm bar that its progress-bar switch does not reach."""
    try:
        import transformers.modeling_gguf_pytorch_utils as mod
    except Exception:  # an optional code path; nothing to silence
        return None
    old = mod.tqdm
    mod.tqdm = functools.partial(old, disable=True)
    return mod, old
