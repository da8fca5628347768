"""Checks that run before anything expensive: every config value, the model and data paths, the targets and ranks
against the checkpoint's parameter names (read from its config on the meta device, no weights), and the cache
directory. Each failure is one line naming the bad input and the fix (the CLI turns it into exit status 2).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from .config import Config, check_values  # noqa: F401  (the value checks live with the schema, in config.py)


def local_model_dir(name: str) -> Path | None:
    """The checkpoint directory ``name`` will load from, if it is local and already there (no conversion)."""
    from .models import EMBEDDED, cache_root, resolve

    key = str(name).lower()
    if key in EMBEDDED:
        target = cache_root() / "models" / key
        return target if (target / "config.json").is_file() else None
    p = resolve(name)  # raises the one-line error for a missing local path
    return Path(p) if Path(p).is_dir() else None


def check_targets(cfg: Config, anchored: bool) -> None:
    """Targets, layers and ranks against the checkpoint's parameter names and shapes, from its config.json on the
    meta device (no weights read): a typo fails in a second, before the model loads and before config.yaml. The
    model directory itself is checked for every method (:func:`rpsft.models.check_model_path`: a truncated
    config.json or safetensors file, an unfinished run)."""
    d = local_model_dir(cfg.model.name)  # every method: a missing or torn model directory is one line here
    if not anchored or d is None:
        return  # no anchor to check; or a hub id: its config is not local, the checks run after the model loads
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .selection import candidate_matrices, resolve_ranks, select_matrices

    try:
        mcfg = AutoConfig.from_pretrained(d, trust_remote_code=cfg.model.trust_remote_code)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta = AutoModelForCausalLM.from_config(mcfg, trust_remote_code=cfg.model.trust_remote_code)
    except Exception:  # an architecture we cannot build empty: the checks run after loading instead
        return
    matrices = select_matrices(meta, cfg.anchor.targets, cfg.anchor.layers)
    resolve_ranks([(n, tuple(p.shape)) for n, p in matrices], cfg.anchor.rank,
                  known=[n for n, _ in candidate_matrices(meta)])


def check_data_path(source: str) -> None:
    """A data path that is meant to be local but is absent fails here, not as a hub ConnectionError later."""
    from .data.formats import looks_local

    p = Path(source).expanduser()
    if not p.exists() and looks_local(source):
        raise FileNotFoundError(f"data file {source} does not exist (generate the built-in data with "
                                "`rpsft data synth-math`, or point data.train at a JSONL file)")


def _log():
    import logging

    return logging.getLogger("rpsft")


def usable_cache_dir(path: str | Path) -> str | None:
    """``path`` if bases can be cached there, else None with a warning (read-only or not creatable): the run goes
    on without caching rather than failing on a cache."""
    p = Path(path).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _log().warning(f"bases cache {p} cannot be created ({e.strerror}); running without caching bases "
                       "(set anchor.cache_dir or RPSFT_CACHE to a writable directory)")
        return None
    if not os.access(p, os.W_OK | os.X_OK):
        _log().warning(f"bases cache {p} is not writable; running without caching bases (set anchor.cache_dir "
                       "or RPSFT_CACHE to a writable directory)")
        return str(p) if any(p.glob("*.safetensors")) and os.access(p, os.R_OK) else None
    return str(p)


def finished_run(out: Path, resume: Any, config_diff, max_steps: int = -1) -> dict | None:
    """The stored summary when ``--resume latest`` names a run that already finished with this config (resuming
    it would train past its last step and rewrite run.json); None otherwise. A run stopped early also has a
    run.json: finished means its global_step reached the run's total (``max_steps``, else the one Trainer
    recorded in the newest complete checkpoint)."""
    if not resume or str(resume) not in ("True", "latest"):
        return None
    summary, saved = out / "run.json", out / "config.yaml"
    if not summary.is_file() or (saved.is_file() and config_diff(saved.read_text())):
        return None
    import json

    try:
        stored = json.loads(summary.read_text())
    except ValueError:
        return None  # a torn run.json: the run did not finish cleanly, resume it
    if max_steps <= 0:
        from .guards import CheckpointError, checkpoint_state, latest_complete

        ckpt = latest_complete(out)[0]
        try:
            max_steps = int(checkpoint_state(ckpt).get("max_steps", 0)) if ckpt is not None else 0
        except CheckpointError:
            return None
    return stored if max_steps > 0 and int(stored.get("global_step", 0)) >= max_steps else None


def report_dropped(trainer, records: list[dict], tokenizer, max_length: int, source: str) -> dict:
    """Count the rows TRL dropped because truncation to ``max_length`` left no completion token (the prompt alone
    fills it), warn with the count and the longest prompt, and refuse a run that would have no rows at all."""
    import logging

    from .data.formats import DataFormatError

    report = {"rows": len(records)}
    try:
        kept = len(trainer.train_dataset)
    except TypeError:  # an iterable dataset: no length to compare
        return report
    report["kept"] = kept
    dropped = len(records) - kept
    if dropped <= 0:
        return report
    lens = []
    for r in records:
        text = tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
        lens.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    longest = max(lens)
    report.update(dropped_too_long=dropped, longest_prompt_tokens=longest)
    if kept == 0:
        raise DataFormatError(f"{source}: all {len(records)} rows were dropped: each prompt fills data.max_length="
                              f"{max_length} tokens, leaving no completion token to train on (longest prompt "
                              f"{longest} tokens); raise data.max_length")
    logging.getLogger("rpsft").warning(
        "%s: %d of %d rows dropped: the prompt leaves no completion token within data.max_length=%d (longest prompt "
        "%d tokens); raise data.max_length to keep them", source, dropped, len(records), max_length, longest)
    return report
