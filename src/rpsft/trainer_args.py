"""Hugging Face Trainer integration: trackers (``train.report_to``), the ``trainer:`` pass-through section, and the
rpsft section of the model card.

``trainer:`` takes any field of the installed ``SFTConfig`` (``rpsft train``) or ``GRPOConfig`` (``rpsft rl``),
checked against that class's dataclass fields, so a typo is answered with the closest real field before a model is
loaded. Its values are applied last: they override what rpsft derived from the ``train`` section.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from .config import ConfigError

# Keys rpsft owns: the run directory is the top-level output_dir, so a checkpoint, config.yaml and run.json agree;
# which checkpoints stay is train.save_total_limit.
MANAGED = {"output_dir": "set the top-level output_dir instead",
           # rpsft deletes old checkpoints itself, after the new one is sealed (guards.rotate_checkpoints)
           "save_total_limit": "set train.save_total_limit instead (null keeps every checkpoint)"}


def trainer_fields(config_cls) -> list[str]:
    return sorted(f.name for f in dataclasses.fields(config_cls) if f.init and not f.name.startswith("_"))


def check_trainer_section(section: Any, config_cls) -> dict:
    """``section`` checked against ``config_cls``'s fields: a ConfigError naming the key and its closest field."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"trainer: expected a mapping of {config_cls.__name__} fields, got {section!r}")
    fields = set(trainer_fields(config_cls))
    for key in section:
        if key in MANAGED:
            raise ConfigError(f"trainer.{key}: rpsft sets this one; {MANAGED[key]}")
        if key not in fields:
            close = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = f"; did you mean 'trainer.{close[0]}'?" if close else ""
            raise ConfigError(f"unknown trainer key 'trainer.{key}': not a field of the installed "
                              f"{config_cls.__name__}{hint}")
    return dict(section)


def check_report_to(names: list[str] | None) -> list[str]:
    """Tracker names for ``TrainingArguments.report_to``: each one known to the installed transformers and
    importable here, checked before a model is loaded (transformers itself fails only at trainer creation)."""
    names = [n for n in (names or []) if n != "none"]
    if not names:
        return []
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    available = set(get_available_reporting_integrations())
    if names == ["all"]:
        return sorted(available)
    for n in names:
        if n not in INTEGRATION_TO_CALLBACK:
            close = difflib.get_close_matches(n, list(INTEGRATION_TO_CALLBACK), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"train.report_to: unknown tracker {n!r}; {hint}the installed transformers supports "
                              f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}")
        if n not in available:
            extra = " (pip install 'rpsft[tracking]')" if n == "tensorboard" else f" (pip install {n})"
            raise ConfigError(f"train.report_to: tracker {n!r} is not installed{extra}")
    return list(names)


def model_card_section(cfg: Any, anchor_info: dict | None, base_model: str) -> str:
    """Markdown appended to the Trainer's model card: method, k, λ, period, targets and the base model."""
    a = cfg.anchor
    lines = ["", "## rpsft", "", f"- method: `{cfg.method}`", f"- base model: `{base_model}`"]
    if anchor_info:
        lines += [f"- rotation anchor: {anchor_info['matrices']} matrices, k = {anchor_info['ranks']} "
                  f"(config `anchor.rank` = `{a.rank}`), λ = {a.lam}, period = {a.period}, svd = `{a.svd}`",
                  f"- targets: {', '.join(a.targets)}" + (f"; layers {a.layers}" if a.layers is not None else "")]
    else:
        lines.append("- rotation anchor: off")
    lines += [f"- data: `{cfg.data.train}`", f"- lr {cfg.train.lr}, seed {cfg.train.seed}", ""]
    return "\n".join(lines)


def write_model_card(trainer, cfg: Any, anchor_info: dict | None, out) -> None:
    """TRL's model card (README.md in the run directory) with the ``rpsft`` tags and the anchor settings."""
    if not trainer.is_world_process_zero():
        return
    from pathlib import Path

    tags = ["rpsft", f"rpsft-{cfg.method}"]
    data = str(cfg.data.train)
    hub_data = data[3:].split(":")[0] if data.startswith("hf:") else None  # only hub datasets get a hub link
    trainer.create_model_card(model_name=Path(str(out)).name, dataset_name=hub_data, tags=tags)
    card = Path(str(out)) / "README.md"
    if card.is_file():
        text = card.read_text()
        # TRL links the base model and the pipeline example to the hub; a local model has no hub id to link
        text = text.replace("[None](https://huggingface.co/None)", f"`{cfg.model.name}`")
        text = text.replace('model="None"', f'model="{out}"')
        card.write_text(text + model_card_section(cfg, anchor_info, cfg.model.name))
